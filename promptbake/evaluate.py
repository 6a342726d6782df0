"""Measures how well a prompt was baked: KL to the prompted teacher and behaviour, before and after."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from .api_client import ChatClient
from .baked import latest_checkpoint, load_baked, set_strength
from .chat import render_prompt_ids
from .config import to_dict
from .data import Row, load_prompts
from .errors import UserError
from .generate import decode_response, derive_seed, generate_ids
from .io import read_jsonl, write_json
from .metrics import kl_and_agreement, marker_rate
from .retention import retention
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
    system, student_prompt = target["system_prompt"], target.get("student_prompt", "")
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
    result = {
        "target": target["name"], "queries": where, "n_queries": len(contexts),
        "n_tokens": sum(e.n_response for e in examples),
        "kl_before": kl_before, "kl_after": kl_after, "kl_ratio": kl_after / kl_before if kl_before else None,
        "top1_agreement_before": agree_before, "top1_agreement_after": agree_after,
        "adherence": {"base": rate(base_texts), "prompted": rate(prompted_texts), "baked": rate(baked_texts)},
        "markers": cfg.markers, "marker_regex": regex, "samples_per_query": samples,
        "adherence_answers": len(baked_texts),
        "examples": [{"user": c[-1]["content"], "base": b, "prompted": p, "baked": baked}
                     for (c, _, _), b, p, baked in list(zip(teacher, base_texts, prompted_texts, baked_texts))[:5]],
    }
    return result, examples, rate


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
    result["retention"] = kept = retention(model, tokenizer, cfg.max_seq_len)
    print(f"retention ({kept['questions']} arithmetic and factual questions, greedy, no prompt): accuracy base "
          f"{kept['accuracy_base']:.2f} | baked {kept['accuracy_baked']:.2f} | KL(base || baked) {kept['kl_base_to_baked']:.4f}")
    result.update({"checkpoint": str(path), "seconds": round(time.time() - t0, 1), "config": to_dict(cfg)})
    log_wandb(cfg, path, result)
    out = path / ("eval.json" if not queries else f"eval_{Path(queries).stem}.json")  # never overwrite the default
    write_json(out, result)
    print(f"wrote {out}")
    return result


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
        run.log({f"retention/{k}": v for k, v in result["retention"].items() if isinstance(v, (int, float))})
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
    print(f"\n{'':18}{'KL to teacher':>14}{'top-1 agree':>13}{'adherence':>11}")
    rows = [("base, no prompt", r["kl_before"], r["top1_agreement_before"], r["adherence"]["base"]),
            ("prompted base", 0.0, 1.0, r["adherence"]["prompted"]),
            ("baked, no prompt", r["kl_after"], r["top1_agreement_after"], r["adherence"]["baked"])]
    for name, kl, agree, adh in rows:
        judge = f"  judge {adh['judge_rate']:.2f}" if "judge_rate" in adh else ""
        print(f"{name:18}{kl:>14.4f}{agree:>13.3f}{_rate(adh['marker_rate']):>11}{judge}")
    if r["kl_before"]:
        print(f"KL before -> after: {r['kl_before']:.4f} -> {r['kl_after']:.4f} "
              f"({100 * (1 - r['kl_after'] / r['kl_before']):.0f}% lower)")
