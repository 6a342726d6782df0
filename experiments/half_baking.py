"""Experiment 3, half-baking: prompt strength against LoRA strength and against training step, on one figure.

    OMP_NUM_THREADS=1 python experiments/half_baking.py    # writes experiments/results/half_baking.json and .png
    python experiments/half_baking.py --from_log LOG       # the JSON and plot again from a run's printed sweep

The pirate bake (saved every 2 steps) is swept with promptbake.evaluate's own sweep (sweep_points + run_sweep, as
`evaluate.py --strengths ... --steps` does): at each adapter strength of the final adapter, and at each saved
step-N, the full-vocabulary KL to the prompted base (on its sampled answers to examples/unseen_questions.txt)
and adherence (marker rate, the same seeds at every point). Step 0 is strength 0 (no adapter).
The paper (sec. 4) claims stopping early or scaling the adapter gives a prompt strength that rises steadily
from the base to the fully baked model. Rerun: a finished JSON with the same settings is kept.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

from promptbake.baked import load_baked
from promptbake.checks import marker_checks
from promptbake.data import Row, load_prompts
from promptbake.evaluate import run_sweep, sample, score_answers, sweep_points, texts_of
from promptbake.metrics import headline_rate
from promptbake.teacher import build_examples

if __package__:  # imported as experiments.half_baking, as the tests do
    from .common import (
        RESULTS,
        UNSEEN,
        config,
        ensure_baked,
        load_done,
        main_guard,
        pyplot,
        save,
        save_figure,
        save_with_plot,
        settings_of,
        setup_threads,
        shown,
    )
else:  # run as a script: python experiments/half_baking.py
    from common import (
        RESULTS,
        UNSEEN,
        config,
        ensure_baked,
        load_done,
        main_guard,
        pyplot,
        save,
        save_figure,
        save_with_plot,
        settings_of,
        setup_threads,
        shown,
    )

STRENGTHS = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5]
SAMPLES = 1


def run(cfg, out: Path = RESULTS / "half_baking.json", strengths: list[float] = STRENGTHS, samples: int = SAMPLES,
        queries: Path = UNSEEN) -> dict:
    settings = settings_of(cfg, strengths=strengths, samples=samples, queries=queries.name, save_steps=cfg.save_steps,
                           marker_regex=cfg.marker_regex)
    done = load_done(out, settings)
    if done and "sweep" in done:
        print(f"half-baking | {out} exists with these settings, kept")
        return done
    final = ensure_baked(cfg)
    t0 = time.time()
    model, tokenizer, info = load_baked(final, device=cfg.device, model_cache_dir=cfg.model_cache_dir)
    target = {**info["targets"][0], "marker_regex": cfg.marker_regex}
    contexts = [r.context for r in load_prompts(str(queries))]
    # the KL rows: the prompted base's sampled answers, as evaluate_target builds them
    with model.disable_adapter():
        teacher = sample(model, tokenizer, contexts, target["system_prompt"], cfg.eval_max_new_tokens, samples, cfg.seed)
    rows = [Row(j, c, None, ids, complete) for j, (c, ids, complete) in enumerate(teacher, 1)]
    examples, _ = build_examples(rows, tokenizer, target["system_prompt"], "", cfg.max_seq_len, True, str(queries))
    checks = marker_checks([], cfg.marker_regex)  # this experiment measures its behaviour's regex, and nothing else

    def score(answers) -> dict:
        return score_answers(texts_of(tokenizer, answers), [c[-1]["content"] for c, _, _ in answers], checks,
                             len(contexts))

    prompted = headline_rate(score(teacher))
    print(f"half-baking | base + prompt adherence {prompted:.2f} | sweeping {len(strengths)} strengths and the steps",
          flush=True)
    sweep = run_sweep(model, tokenizer, cfg, final, examples, contexts, "", score,
                      sweep_points(final, strengths, steps=True), samples)
    for p in sweep:  # step-N points carry their step number
        p["step"] = int(p["point"].split("-")[1]) if p["point"].startswith("step-") else None
    result = {"settings": settings, "checkpoint": shown(final), "prompted_adherence": prompted,
              "n_answers": len(contexts) * samples, "sweep": sweep, "seconds": round(time.time() - t0, 1)}
    return save_with_plot(out, result, plot)


def plot(result: dict, path: Path) -> Path:
    plt = pyplot()
    by_strength = [p for p in result["sweep"] if p["step"] is None]
    zero = next((p for p in by_strength if p["strength"] == 0), None)
    by_step = ([{**zero, "step": 0}] if zero else []) + [p for p in result["sweep"] if p["step"] is not None]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, points, key, xlabel in ((axes[0], by_strength, "strength", "LoRA strength (0 = base, 1 = baked)"),
                                    (axes[1], by_step, "step", "training step (adapter at strength 1)")):
        xs = [p[key] for p in points]
        ax.plot(xs, [p["kl"] for p in points], "o-", color="tab:blue")
        ax.set_ylabel("held-out KL to base + prompt", color="tab:blue")
        ax.set_xlabel(xlabel)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax2 = ax.twinx()
        ax2.plot(xs, [p.get("adherence", p.get("marker_rate")) or 0 for p in points], "s--", color="tab:red")
        ax2.axhline(result["prompted_adherence"], color="tab:red", alpha=0.4, lw=1, ls=":")
        ax2.text(xs[0], result["prompted_adherence"] + 0.02, "base + prompt", color="tab:red", alpha=0.7, fontsize=8)
        ax2.set_ylabel("adherence (marker rate)", color="tab:red")
        ax2.set_ylim(-0.05, 1.05)
    axes[0].set_title("Half-baking by adapter strength")
    axes[1].set_title("Half-baking by training step")
    return save_figure(fig, path)


def from_log(log: Path, cfg, out: Path = RESULTS / "half_baking.json") -> dict:
    """Rebuilds the JSON and plot from the lines run_sweep printed (a run that died after its sweep, before its
    save): the figures are the printed ones (4 decimals), marked from_log."""
    text = log.read_text()
    sweep = []
    for label, kl, top1, adh in re.findall(r"^ *(strength [\d.]+|step-\d+) \| kl ([\d.]+) \| top-1 ([\d.]+) \| "
                                           r"adherence ([\d.]+)", text, flags=re.M):
        step = int(label.split("-")[1]) if label.startswith("step-") else None
        sweep.append({"point": label, "strength": 1.0 if step else float(label.split()[1]), "kl": float(kl),
                      "top1_agreement": float(top1), "adherence": float(adh), "step": step})
    prompted = float(re.search(r"base \+ prompt adherence ([\d.]+)", text).group(1))
    settings = settings_of(cfg, strengths=STRENGTHS, samples=SAMPLES, queries=UNSEEN.name, save_steps=cfg.save_steps,
                           marker_regex=cfg.marker_regex)
    result = {"settings": settings, "from_log": str(log), "prompted_adherence": prompted,
              "n_answers": 40 * SAMPLES, "sweep": sweep}
    out.parent.mkdir(parents=True, exist_ok=True)
    result["plot"] = plot(result, out.with_suffix(".png")).name
    save(out, result)
    print(f"wrote {out} and {out.with_name(result['plot'])} from {log} ({len(sweep)} points)")
    return result


def main() -> None:
    setup_threads()
    if len(sys.argv) == 3 and sys.argv[1] == "--from_log":
        from_log(Path(sys.argv[2]), config("pirate"))
        return
    run(config("pirate"))


if __name__ == "__main__":
    main_guard(main)
