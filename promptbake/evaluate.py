"""Measures how well a prompt was baked: KL to the prompted teacher and behaviour, before and after."""

from __future__ import annotations

import asyncio
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from .baked import latest_checkpoint, load_baked, set_strength
from .chat import render_prompt_ids
from .data import Row, load_prompts
from .errors import UserError
from .forward import backbone_and_head, response_hidden
from .generate import decode_response, generate_ids
from .io import write_json
from .loss import full_kl
from .teacher import build_examples


@contextmanager
def variant(model, kind: str):
    """'base' = adapter off; 'baked' = adapter on (at whatever strength is set)."""
    if kind == "base":
        with model.disable_adapter():
            yield
    else:
        yield


def follows(text: str, markers: list[str], regex: str) -> bool:
    if regex:
        return re.search(regex, text, flags=re.I) is not None
    low = text.lower()
    return any(m.lower() in low for m in markers)


def judge_fn(system: str):
    """With an API configured, a judge model answers yes/no to 'does this answer follow the system prompt?'."""
    base_url = os.environ.get("API_BASE_URL", "")
    if not base_url:
        return None
    from .api_client import ChatClient

    model = os.environ.get("API_JUDGE_MODEL") or os.environ.get("API_MODEL") or "default"

    async def ask(answers: list[tuple[str, str]]) -> list[bool]:
        client = ChatClient(base_url, model, concurrency=8)
        try:
            outs = await asyncio.gather(*[client.chat([{"role": "user", "content":
                f"System prompt:\n---\n{system}\n---\nUser: {q}\nAssistant: {a}\n---\nDoes the assistant's answer "
                f"follow the system prompt? Answer yes or no."}], temperature=0.0, max_tokens=3) for q, a in answers])
        finally:
            await client.aclose()
        return [o.content.strip().lower().startswith("yes") for o in outs]

    return lambda answers: asyncio.run(ask(answers))


@torch.inference_mode()
def kl_and_agreement(model, examples, pad_id: int, batch_size: int = 8, adapter: bool = True) -> tuple[float, float]:
    """Full-vocabulary KL(prompted base || model without prompt), and top-1 agreement, token-weighted.
    adapter=False measures the base model without the prompt."""
    kl, agree, n = 0.0, 0.0, 0
    head = backbone_and_head(model)[1]
    for b in range(0, len(examples), batch_size):
        ex = examples[b:b + batch_size]
        n_resp = [e.n_response for e in ex]
        with model.disable_adapter():
            t_hidden = response_hidden(model, [e.teacher_ids for e in ex], n_resp, pad_id)
        with variant(model, "baked" if adapter else "base"):
            s_hidden = response_hidden(model, [e.student_ids for e in ex], n_resp, pad_id)
        for c in range(0, len(t_hidden), 128):  # full-vocabulary logits of both sides, a chunk at a time
            t, s = head(t_hidden[c:c + 128]), head(s_hidden[c:c + 128])
            kl += full_kl(t, s, torch.ones(len(t), device=t.device)).item() * len(t)
            agree += (t.argmax(-1) == s.argmax(-1)).sum().item()
        n += len(t_hidden)
    return kl / n, agree / n


def sample(model, tokenizer, contexts, system: str | None, max_new_tokens: int, samples: int, seed: int,
           batch_size: int = 32) -> list[tuple[list[dict], list[int], bool]]:
    """`samples` answers per query at temperature 0.7, with the same seeds for every model compared:
    (context, response ids, complete) for each."""
    out = []
    for i in range(samples):
        for b in range(0, len(contexts), batch_size):
            chunk = contexts[b:b + batch_size]
            prompts = [render_prompt_ids(tokenizer, c, system) for c in chunk]
            outs = generate_ids(model, tokenizer, prompts, temperature=0.7, max_new_tokens=max_new_tokens,
                                seed=seed + 1000 * i + b)
            out += [(c, ids, complete) for c, (ids, complete) in zip(chunk, outs)]
    return out


def texts_of(tokenizer, sampled) -> list[str]:
    return [decode_response(tokenizer, ids) for _, ids, _ in sampled]


def evaluate(cfg, checkpoint: str | None = None, queries: str | None = None, strengths: list[float] | None = None,
             steps: bool = False, samples: int = 3) -> dict:
    """Writes eval.json (eval_<queries>.json for other queries, and half_baking.png for a sweep) into the
    checkpoint folder; returns the results."""
    path = Path(checkpoint) if checkpoint else latest_checkpoint(cfg.checkpoint_dir, cfg.name)
    model, tokenizer, info = load_baked(path, device=cfg.device, model_cache_dir=cfg.model_cache_dir)
    target = info["targets"][0]
    system, student_prompt = target["system_prompt"], target.get("student_prompt", "")
    held = Path(queries) if queries else path.parent / "held_out.jsonl"
    if not held.exists():
        raise UserError(f"{held}: no held-out queries; pass --queries FILE (one prompt a line, or JSONL)")
    contexts = [r.context for r in load_prompts(str(held))]
    if not contexts:
        raise UserError(f"{held}: no queries")
    print(f"evaluating {path} on {len(contexts)} held-out queries from {held}")
    t0 = time.time()

    # Teacher-sampled responses: the prompted base answers each query `samples` times. They are the KL's
    # rows and the prompted base's answers for adherence; base and baked are sampled with the same seeds.
    n_new = cfg.eval_max_new_tokens
    with model.disable_adapter():
        teacher = sample(model, tokenizer, contexts, system, n_new, samples, cfg.seed)
        base_texts = texts_of(tokenizer, sample(model, tokenizer, contexts, None, n_new, samples, cfg.seed))
    rows = [Row(j, c, None, ids, complete) for j, (c, ids, complete) in enumerate(teacher, 1)]
    prompted_texts = texts_of(tokenizer, teacher)
    examples, _ = build_examples(rows, tokenizer, system, student_prompt, cfg.max_seq_len, True, str(held))
    pad = tokenizer.pad_token_id
    judge = judge_fn(system)

    if not (cfg.markers or cfg.marker_regex or judge):
        print("note: no markers, marker_regex or judge API configured: adherence is not measured")

    def adherence(texts):
        result = {"marker_rate": sum(follows(t, cfg.markers, cfg.marker_regex) for t in texts) / len(texts)
                  if cfg.markers or cfg.marker_regex else None}
        if judge:
            users = [c[-1]["content"] for c, _, _ in teacher]
            result["judge_rate"] = sum(judge(list(zip(users, texts)))) / len(texts)
        return result

    set_strength(model, 0.0)
    kl_before, agree_before = kl_and_agreement(model, examples, pad)
    set_strength(model, 1.0)
    kl_after, agree_after = kl_and_agreement(model, examples, pad)
    baked_texts = texts_of(tokenizer, sample(model, tokenizer, contexts, student_prompt or None, n_new, samples, cfg.seed))
    result = {
        "checkpoint": str(path), "queries": str(held), "n_queries": len(contexts), "n_tokens": sum(e.n_response for e in examples),
        "kl_before": kl_before, "kl_after": kl_after, "kl_ratio": kl_after / kl_before if kl_before else None,
        "top1_agreement_before": agree_before, "top1_agreement_after": agree_after,
        "adherence": {"base": adherence(base_texts), "prompted": adherence(prompted_texts), "baked": adherence(baked_texts)},
        "markers": cfg.markers, "marker_regex": cfg.marker_regex,
        "samples_per_query": samples, "adherence_answers": len(baked_texts),
        "examples": [{"user": c[-1]["content"], "base": b, "prompted": p, "baked": k}
                     for (c, _, _), b, p, k in list(zip(teacher, base_texts, prompted_texts, baked_texts))[:5]],
    }

    sweep = []
    points = [(f"strength {s:g}", path, s) for s in (strengths or [])]
    if steps:
        points += [(p.name, p, 1.0) for p in sorted(path.parent.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))]
    for label, ckpt, s in points:
        if ckpt != path:
            model.load_adapter(str(ckpt), adapter_name="sweep")
            model.set_adapter("sweep")
        set_strength(model, s)
        kl, agree = kl_and_agreement(model, examples, pad)
        texts = texts_of(tokenizer, sample(model, tokenizer, contexts, student_prompt or None, n_new, samples, cfg.seed))
        sweep.append({"point": label, "strength": s, "kl": kl, "top1_agreement": agree, **adherence(texts)})
        if ckpt != path:
            model.set_adapter("default")
            model.delete_adapter("sweep")
        print(f"  {label:>14} | kl {kl:.4f} | top-1 {agree:.3f} | adherence {_rate(sweep[-1]['marker_rate'])}")
    set_strength(model, 1.0)
    if sweep:
        result["sweep"] = sweep
        result["plot"] = str(plot_sweep(sweep, path / "half_baking.png"))
    result["seconds"] = round(time.time() - t0, 1)
    from config import to_dict

    result["config"] = to_dict(cfg)
    log_wandb(cfg, path, result)
    out = path / ("eval.json" if not queries else f"eval_{Path(queries).stem}.json")  # never overwrite the default
    write_json(out, result)
    print_table(result)
    print(f"wrote {out}")
    return result


def log_wandb(cfg, path: Path, result: dict) -> None:
    from .train import open_wandb

    run = open_wandb(cfg, path.parent, {"checkpoint": str(path), **result["config"]}, f"{cfg.name}-eval")
    if run is None:
        return
    flat = {f"eval/{k}": v for k, v in result.items() if isinstance(v, (int, float)) and v is not None}
    flat.update({f"eval/adherence_{who}": a["marker_rate"] for who, a in result["adherence"].items()
                 if a["marker_rate"] is not None})
    run.log(flat)
    for p in result.get("sweep", []):
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
