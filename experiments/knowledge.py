"""Experiment 4, knowledge baking: can facts the model cannot know be baked in from a prompt?

    OMP_NUM_THREADS=1 python experiments/knowledge.py      # writes experiments/results/knowledge.json and .png

experiments/knowledge/factsheet.md is a system prompt of 10 made-up facts about a fictional town (Velmora Bay).
The data: the prompted base answers experiments/knowledge/train_questions.txt (30 questions about the town,
2 samples each at T=0.7), then a small bake. The test: experiments/knowledge/eval_questions.jsonl, 15 questions
worded apart from the training ones, answered greedily by base, base + fact sheet, baked (no prompt) and baked +
fact sheet. An answer is right when one of the accepted answers is in it as whole words, both normalised (lower case,
punctuation to spaces, thousands separators dropped). The paper (sec. 4) bakes news headlines and reports the
baked model answers questions about them as the prompted one does. Rerun: a finished JSON is kept.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from promptbake.baked import load_baked
from promptbake.io import read_jsonl
from promptbake.sampling import answer_in_batches, decode_response

if __package__:  # imported as experiments.knowledge, as the tests do
    from .common import (
        HERE,
        RESULTS,
        config,
        ensure_baked,
        load_done,
        main_guard,
        pyplot,
        save_figure,
        save_with_plot,
        settings_of,
        setup_threads,
        shown,
    )
else:  # run as a script: python experiments/knowledge.py
    from common import (
        HERE,
        RESULTS,
        config,
        ensure_baked,
        load_done,
        main_guard,
        pyplot,
        save_figure,
        save_with_plot,
        settings_of,
        setup_threads,
        shown,
    )

FACTS = HERE / "knowledge" / "factsheet.md"
TRAIN = HERE / "knowledge" / "train_questions.txt"
EVAL = HERE / "knowledge" / "eval_questions.jsonl"
BAKE = dict(prompt_file=str(FACTS), prompts=str(TRAIN), num_queries=0, temperatures=[0.7], samples_per_query=2,
            num_epochs=3, marker_regex=r"\bvelmora\b")
WHO = ("base", "prompted", "baked", "baked_reprompted")


def normalise(text: str) -> str:
    text = re.sub(r"(?<=\d)[,.](?=\d{3}\b)", "", text.lower())  # 4,312 -> 4312
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text).split())


def correct(answer: str, accepted: list[str]) -> bool:
    a = f" {normalise(answer)} "
    return any(f" {normalise(x)} " in a for x in accepted)  # whole words: 4312 is not in 14312


def answer_all(model, tokenizer, qs: list[str], system: str | None, max_new_tokens: int, batch_size: int = 16) -> list[str]:
    contexts = [[{"role": "user", "content": q}] for q in qs]
    return [decode_response(tokenizer, ids) for ids, _ in answer_in_batches(
        model, tokenizer, contexts, system, batch_size=batch_size, temperature=0, max_new_tokens=max_new_tokens)]


def run(cfg, out: Path = RESULTS / "knowledge.json", eval_file: Path = EVAL) -> dict:
    items = [o for _, o in read_jsonl(eval_file)]
    settings = settings_of(cfg, samples_per_query=cfg.samples_per_query, facts_sha=hash_text(FACTS.read_text()),
                           eval_questions=len(items), train_questions=Path(cfg.prompts).name)
    done = load_done(out, settings)
    if done and "accuracy" in done:
        print(f"knowledge | {out} exists with these settings, kept")
        return done
    final = ensure_baked(cfg)
    t0 = time.time()
    model, tokenizer, info = load_baked(final, device=cfg.device, model_cache_dir=cfg.model_cache_dir)
    facts = info["targets"][0]["system_prompt"]
    qs = [o["question"] for o in items]
    answers = {}
    for who in WHO:
        system = facts if who in ("prompted", "baked_reprompted") else None
        if who.startswith("baked"):
            answers[who] = answer_all(model, tokenizer, qs, system, cfg.eval_max_new_tokens)
        else:
            with model.disable_adapter():
                answers[who] = answer_all(model, tokenizer, qs, system, cfg.eval_max_new_tokens)
        right = [correct(a, o["answers"]) for a, o in zip(answers[who], items)]
        print(f"knowledge | {who:16} | {sum(right)}/{len(right)} right", flush=True)
    right = {who: [correct(a, o["answers"]) for a, o in zip(answers[who], items)] for who in WHO}
    result = {"settings": settings, "checkpoint": shown(final), "n_questions": len(items),
              "accuracy": {who: sum(r) / len(r) for who, r in right.items()},
              "questions": [{"question": o["question"], "accepted": o["answers"],
                             **{who: {"answer": answers[who][i], "right": right[who][i]} for who in WHO}}
                            for i, o in enumerate(items)],
              "seconds": round(time.time() - t0, 1)}
    return save_with_plot(out, result, plot)


def hash_text(text: str) -> str:
    from promptbake.io import sha256_text

    return sha256_text(text)[:16]


def plot(result: dict, path: Path) -> Path:
    plt = pyplot()
    labels = {"base": "base", "prompted": "base +\nfact sheet", "baked": "baked,\nno prompt",
              "baked_reprompted": "baked +\nfact sheet"}
    colors = {"base": "tab:gray", "prompted": "tab:blue", "baked": "tab:red", "baked_reprompted": "tab:purple"}
    fig, (ax, grid) = plt.subplots(1, 2, figsize=(11, 4.5), gridspec_kw={"width_ratios": [1, 1.3]})
    bars = ax.bar([labels[w] for w in WHO], [result["accuracy"][w] for w in WHO], color=[colors[w] for w in WHO])
    ax.bar_label(bars, fmt="%.2f")
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("exact-match accuracy")
    ax.set_title(f"Knowledge baking: {result['n_questions']} unseen questions")
    cells = [[1.0 if q[w]["right"] else 0.0 for w in WHO] for q in result["questions"]]
    grid.imshow(cells, cmap="Greens", vmin=0, vmax=1.2, aspect="auto")
    grid.set_xticks(range(len(WHO)), [labels[w].replace("\n", " ") for w in WHO], fontsize=8)
    grid.set_yticks(range(len(cells)), [q["question"][:42] for q in result["questions"]], fontsize=7)
    grid.set_title("right (dark) / wrong (light), per question", fontsize=9)
    return save_figure(fig, path)


def main() -> None:
    setup_threads()
    run(config("knowledge", **BAKE))


if __name__ == "__main__":
    main_guard(main)
