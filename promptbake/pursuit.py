"""Prompt Pursuit (Bhargava et al. 2024, sec. 5): bake, then bake the re-prompted baked model again.

Iteration 1 is a normal bake of the prompt. Iteration i bakes on iteration i-1: its teacher is baked_{i-1}
WITH the prompt, its student baked_{i-1} plus a new LoRA without it, on fresh data from that teacher. After
each iteration the chained model, with no prompt, is measured against the ORIGINAL prompted base: adherence (the
share of non-loop answers passing the prompt's declared checks; with none declared, the mean per-token LLR of its
answers under the original base, metrics.prompt_llr) on greedy and sampled answers, and full-vocabulary KL, on the
first iteration's held-out queries (never trained on: every iteration splits the same queries with the same seed).
Results go to checkpoints/<name>-pursuit/pursuit.json after each iteration, so a killed run resumes where it
stopped: generation and bake resume themselves.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from . import model as models
from .baked import check_parent_outside_run, load_baked, read_bake_config, with_parent_model
from .data import Row, load_prompts, read_prompt
from .errors import UserError
from .evaluate import answer_llr, eval_contexts, sample, score_answers, target_checks, texts_of
from .generate import generate
from .io import read_json, reading, sha256_text, write_json
from .lineage import BAKE_CONFIG, stored_path
from .metrics import headline_rate, kl_and_agreement, mean_interval
from .report import try_write_report
from .stages import bake
from .teacher import build_examples
from .train import target_specs


def iteration_name(cfg, i: int) -> str:
    return f"{cfg.name}-pursuit-{i}"


def bake_iteration(cfg, i: int, parent: str) -> Path:
    """Generates the iteration's data from its teacher and bakes it; both resume, a finished one is kept."""
    icfg = dataclasses.replace(cfg, name=iteration_name(cfg, i), init_from=parent, resume=True)
    final = Path(cfg.checkpoint_dir) / icfg.name / "final"
    if (final / BAKE_CONFIG).exists():
        print(f"pursuit iteration {i}: {final} exists, kept")
        return final
    print(f"\n=== pursuit iteration {i}: teacher = {parent or 'the base model'} with the prompt")
    generate(icfg)
    return bake(icfg)


@dataclasses.dataclass
class Reference:
    """The original prompted base on the evaluation queries: its sampled answers are the KL rows."""
    base: object
    tokenizer: object
    contexts: list
    examples: list
    rates: dict
    system: str = ""
    checks: list = dataclasses.field(default_factory=list)
    max_seq_len: int = 512


def adherence_of(ref: Reference, answers) -> float | None:
    """The pursuit's figure for a list of answers: the share of non-loop ones passing every declared check; with no
    checks declared, their mean LLR (log P(y | prompt, x) - log P(y | x) per token) under the original base."""
    if ref.checks:
        texts = texts_of(ref.tokenizer, answers)
        return headline_rate(score_answers(texts, [c[-1]["content"] for c, _, _ in answers], ref.checks,
                                           len(ref.contexts)))
    return mean_interval(answer_llr(ref.base, ref.tokenizer, answers, ref.system, ref.max_seq_len, "pursuit"))["mean"]


def reference(cfg, first: Path, queries: str | None, samples: int) -> Reference:
    info = read_json(first / BAKE_CONFIG)
    system = info["targets"][0]["system_prompt"]
    base, tokenizer, _, _ = models.load(dataclasses.replace(cfg, init_from=""))
    contexts, _ = eval_contexts(first, queries, info["targets"][0]["name"])
    n = cfg.eval_max_new_tokens
    prompted = sample(base, tokenizer, contexts, system, n, samples, cfg.seed, greedy=True)
    rows = [Row(j, c, None, ids, complete) for j, (c, ids, complete) in enumerate(prompted, 1)]
    examples, _ = build_examples(rows, tokenizer, system, "", cfg.max_seq_len, True, "pursuit queries")
    plain = sample(base, tokenizer, contexts, None, n, samples, cfg.seed, greedy=True)
    ref = Reference(base, tokenizer, contexts, examples, {}, system, target_checks(cfg, info["targets"][0]),
                    cfg.max_seq_len)
    ref.rates = {"base": adherence_of(ref, plain), "prompted": adherence_of(ref, prompted),
                 "measure": "checks" if ref.checks else "llr"}
    return ref


def measure(cfg, final: Path, ref: Reference, samples: int) -> dict:
    """The chained model without the prompt (and re-prompted) against the original prompted base."""
    model, tokenizer, info = load_baked(final, device=cfg.device, model_cache_dir=cfg.model_cache_dir)
    system = info["targets"][0]["system_prompt"]
    n = cfg.eval_max_new_tokens
    baked = sample(model, tokenizer, ref.contexts, None, n, samples, cfg.seed, greedy=True)
    reprompted = sample(model, tokenizer, ref.contexts, system, n, samples, cfg.seed, greedy=True)
    kl, agree = kl_and_agreement(model, ref.examples, tokenizer.pad_token_id, teacher_model=ref.base)
    return {"checkpoint": str(final), "adherence": adherence_of(ref, baked),
            "adherence_reprompted": adherence_of(ref, reprompted), "kl_to_prompted_base": kl, "top1_agreement": agree,
            "example": texts_of(tokenizer, baked[:1])[0] if baked else ""}


def plot(state: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = state["iterations"]
    x = [it["iteration"] for it in its]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    ax.plot(x, [it["adherence"] or 0 for it in its], "o-", color="tab:red", label="baked, no prompt")
    ax.plot(x, [it["adherence_reprompted"] or 0 for it in its], "s:", color="tab:orange", label="baked + prompt")
    ax.axhline(state["reference"]["prompted"] or 0, color="gray", ls="--", label="base + prompt")
    ax.set_xlabel("pursuit iteration")
    if state["reference"].get("measure") == "llr":
        ax.set_ylabel("prompt score (LLR per token)")
    else:
        ax.set_ylabel("adherence (checks)")
        ax.set_ylim(-0.05, 1.05)
    ax.set_xticks(x)
    ax2 = ax.twinx()
    ax2.plot(x, [it["kl_to_prompted_base"] for it in its], "^-", color="tab:blue", label="KL to base + prompt")
    ax2.set_ylabel("KL to the prompted base", color="tab:blue")
    fig.legend(loc="lower center", ncol=4, fontsize=8)  # below the axes: off the data and the ticks
    ax.set_title("Prompt Pursuit")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def stopped_rising(its: list[dict], min_gain: float) -> bool:
    if len(its) < 2 or its[-1]["adherence"] is None or its[-2]["adherence"] is None:
        return False
    return its[-1]["adherence"] - its[-2]["adherence"] <= min_gain


def check_inputs(cfg, iterations: int, queries: str | None) -> None:
    """Every input, before iteration 1 is generated: the queries file, the parent, and the iterations an earlier
    run finished, which are kept: they must have baked this prompt on this parent, or the new prompt would be
    chained onto the old one's iterations in one pursuit."""
    if queries:
        if not Path(queries).is_file():
            raise UserError(f"--queries {queries}: file not found; pass a .txt (one prompt a line) or .jsonl file")
        load_prompts(queries)
    if cfg.init_from:
        with_parent_model(cfg)
    for i in range(1, iterations + 1):
        check_parent_outside_run(dataclasses.replace(cfg, name=iteration_name(cfg, i)))
    prompts = [sha256_text(read_prompt(spec["prompt_file"])) for spec in target_specs(cfg)]
    parent = stored_path(Path(cfg.init_from)) if cfg.init_from else "the base model"
    for i in range(1, iterations + 1):
        final = Path(cfg.checkpoint_dir) / iteration_name(cfg, i) / "final"
        if not (final / BAKE_CONFIG).exists():
            continue
        info = read_bake_config(final)
        fix = f"pass a new --name for this pursuit, or restore the earlier settings to resume checkpoints/{cfg.name}-pursuit"
        if [t.get("system_prompt_sha256") for t in info["targets"]] != prompts:
            raise UserError(f"{final} baked another prompt than {cfg.prompt_file} holds now; {fix}")
        lineage = info.get("lineage", [])
        baked_on = lineage[-1]["checkpoint"] if lineage else "the base model"
        if i == 1 and baked_on != parent:
            raise UserError(f"{final} was baked on {baked_on}, not on {parent} (--init_from); {fix}")


def pursue(cfg, iterations: int, queries: str | None = None, samples: int = 3, min_gain: float = 0.0) -> dict:
    """Runs (or resumes) up to `iterations` iterations; stops early once adherence stops rising."""
    check_inputs(cfg, iterations, queries)
    group = Path(cfg.checkpoint_dir) / f"{cfg.name}-pursuit"
    group.mkdir(parents=True, exist_ok=True)
    state_path = group / "pursuit.json"
    state = read_json(state_path) if state_path.exists() else {"iterations": []}
    with reading(state_path):
        done = {int(it["iteration"]): it for it in state["iterations"]}
    ref, parent = None, cfg.init_from
    for i in range(1, iterations + 1):
        if not (Path(cfg.checkpoint_dir) / iteration_name(cfg, i) / "final" / BAKE_CONFIG).exists():
            done.pop(i, None)  # baked now: an earlier measurement of that iteration is of another model
        final = bake_iteration(cfg, i, parent)
        if i not in done:
            if ref is None:
                ref = reference(cfg, Path(cfg.checkpoint_dir) / iteration_name(cfg, 1) / "final", queries, samples)
                state["reference"] = ref.rates
            done[i] = {"iteration": i, **measure(cfg, final, ref, samples)}
            state["iterations"] = [done[k] for k in sorted(done)]
            write_json(state_path, state)
        it = done[i]
        print(f"pursuit {i}/{iterations} | adherence {it['adherence']} | re-prompted {it['adherence_reprompted']} | "
              f"KL to the prompted base {it['kl_to_prompted_base']:.4f} | prompted base {state['reference']['prompted']}")
        state["plot"] = str(plot(state, group / "pursuit.png"))
        write_json(state_path, state)
        try_write_report(final)  # the iteration's report.html gains the pursuit so far
        if stopped_rising(state["iterations"][:i], min_gain):
            print(f"adherence stopped rising at iteration {i}: stopping")
            break
        parent = str(final)
    print(f"wrote {state_path} and {group / 'pursuit.png'}")
    return state
