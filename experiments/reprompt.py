"""Experiment 2, re-prompting: is the baked model given its prompt again stronger than the prompted base?

    OMP_NUM_THREADS=1 python experiments/reprompt.py       # writes experiments/results/reprompt.json and reprompt.png

For each prompt (the pirate prompt.md, the knight persona, the cats prompt), a small bake, then
promptbake.evaluate.evaluate_target on examples/unseen_questions.txt (40 questions never trained on, `samples`
answers each at T=0.7, the same seeds for every model): adherence (the prompt's marker regex) and full-vocabulary
KL to the prompted base for four models: base, base + prompt, baked (no prompt), baked + prompt.
The paper (sec. 5) claims re-prompting a baked model amplifies the prompt: baked + prompt beats base + prompt.
Rerun: bakes and prompts already in the JSON are kept.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from promptbake.baked import load_baked
from promptbake.data import load_prompts
from promptbake.evaluate import evaluate_target
from promptbake.metrics import headline_rate

if __package__:  # imported as experiments.reprompt, as the tests do
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
    )
else:  # run as a script: python experiments/reprompt.py
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
    )

NAMES = ("pirate", "knight", "cats")
SAMPLES = 2
WHO = ("base", "prompted", "baked", "baked_reprompted")


def run(cfgs: list, out: Path = RESULTS / "reprompt.json", samples: int = SAMPLES, queries: Path = UNSEEN) -> dict:
    settings = settings_of(cfgs[0], prompts={c.name: Path(c.prompt_file).name for c in cfgs}, samples=samples,
                           queries=queries.name)
    result = load_done(out, settings) or {"settings": settings, "prompts": {}}
    contexts = [r.context for r in load_prompts(str(queries))]
    for cfg in cfgs:
        if cfg.name in result["prompts"]:
            print(f"reprompt | {cfg.name:8} | in {out}, kept")
            continue
        final = ensure_baked(cfg)
        t0 = time.time()
        model, tokenizer, info = load_baked(final, device=cfg.device, model_cache_dir=cfg.model_cache_dir)
        target = {**info["targets"][0], "marker_regex": cfg.marker_regex}
        # this experiment measures its behaviour's regex, and nothing else (not the prompt file's own checks)
        only_regex = dataclasses.replace(cfg, checks=[{"matches": cfg.marker_regex, "name": "marker_regex"}])
        r, _, _ = evaluate_target(model, tokenizer, only_regex, target, contexts, str(queries), samples)
        rates = {who: headline_rate(r["adherence"][who]) for who in WHO}
        result["prompts"][cfg.name] = {"prompt": target["system_prompt"], "marker_regex": cfg.marker_regex,
                                       "adherence": rates, "answers": r["answers_per_model"],
                                       "kl_base": r["kl_before"], "kl_baked": r["kl_after"],
                                       "kl_baked_reprompted": r["kl_reprompted"], "examples": r["examples"][:2]}
        save(out, result)
        print(f"reprompt | {cfg.name:8} | " + " | ".join(f"{w} {rates[w]:.2f}" for w in WHO)
              + f" | {time.time() - t0:.0f}s", flush=True)
        del model
    return save_with_plot(out, result, plot)


def plot(result: dict, path: Path) -> Path:
    plt = pyplot()
    names = list(result["prompts"])
    labels = {"base": "base", "prompted": "base + prompt", "baked": "baked", "baked_reprompted": "baked + prompt"}
    colors = {"base": "tab:gray", "prompted": "tab:blue", "baked": "tab:red", "baked_reprompted": "tab:purple"}
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.2
    for i, who in enumerate(WHO):
        xs = [j + (i - 1.5) * width for j in range(len(names))]
        ys = [result["prompts"][n]["adherence"][who] for n in names]
        bars = ax.bar(xs, ys, width, label=labels[who], color=colors[who])
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("adherence (marker rate)")
    ax.set_ylim(0, 1.12)
    n = next(iter(result["prompts"].values()))["answers"] if names else 0
    ax.set_title(f"Re-prompting: {n} answers per bar (unseen questions)")
    ax.legend(loc="upper right", fontsize=8, ncol=2)
    return save_figure(fig, path)


def main() -> None:
    setup_threads()
    run([config(name) for name in NAMES])


if __name__ == "__main__":
    main_guard(main)
