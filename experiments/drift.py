"""Experiment 1, persona drift: does the persona fade as a conversation grows, prompted vs baked?

    OMP_NUM_THREADS=1 python experiments/drift.py          # writes experiments/results/drift.json and drift.png

Each conversation is `turns` neutral questions (from examples/unseen_questions.txt, never trained on), asked one
after the other; the model's own answers become the history. Three models hold the same conversations with the
same seeds: the base model with the pirate prompt as the system turn at the top (the prompt every user would
send), the baked model with no prompt, and the base model with no prompt (the floor). Adherence at turn t is the
share of turn-t answers the project's marker regex matches, over `conversations` x `samples` conversations.
The paper (Bhargava et al. 2024, sec. 4) claims a baked persona resists the "prompt forgetting" that makes a
prompted model drift over long conversations. Rerun: finished models are read back from the JSON.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

from promptbake.baked import load_baked
from promptbake.chat import render_prompt_ids
from promptbake.evaluate import EVAL_TEMPERATURE
from promptbake.io import derive_seed
from promptbake.metrics import follows
from promptbake.sampling import decode_response, generate_ids

if __package__:  # imported as experiments.drift, as the tests do
    from .common import (
        RESULTS,
        config,
        ensure_baked,
        load_done,
        main_guard,
        pyplot,
        questions,
        save,
        save_figure,
        save_with_plot,
        settings_of,
        setup_threads,
    )
else:  # run as a script: python experiments/drift.py
    from common import (
        RESULTS,
        config,
        ensure_baked,
        load_done,
        main_guard,
        pyplot,
        questions,
        save,
        save_figure,
        save_with_plot,
        settings_of,
        setup_threads,
    )

TURNS = 10
CONVERSATIONS = 8
SAMPLES = 2  # each conversation is held twice, with other seeds
MODELS = ("prompted base", "baked", "base")  # who answers: (adapter on?, system prompt?) below


def conversations(qs: list[str], n: int, turns: int, seed: int) -> list[list[str]]:
    """n conversations of `turns` distinct questions each, drawn with a fixed seed."""
    rng = random.Random(seed)
    return [rng.sample(qs, turns) for _ in range(n)]


def hold(model, tokenizer, convs: list[list[str]], system: str | None, max_new_tokens: int, seed: int) -> list[list[str]]:
    """Holds every conversation at once, turn by turn: the answers of turn t are the history of turn t+1."""
    histories = [[] for _ in convs]
    answers = [[] for _ in convs]
    for t in range(len(convs[0])):
        for h, conv in zip(histories, convs):
            h.append({"role": "user", "content": conv[t]})
        prompts = [render_prompt_ids(tokenizer, h, system) for h in histories]
        outs = generate_ids(model, tokenizer, prompts, temperature=EVAL_TEMPERATURE, max_new_tokens=max_new_tokens,
                            seed=derive_seed("drift", seed, t))
        for h, a, (ids, _) in zip(histories, answers, outs):
            text = decode_response(tokenizer, ids)
            h.append({"role": "assistant", "content": text})
            a.append(text)
    return answers


def run(cfg, out: Path = RESULTS / "drift.json", turns: int = TURNS, n_conv: int = CONVERSATIONS,
        samples: int = SAMPLES) -> dict:
    settings = settings_of(cfg, prompt_file=Path(cfg.prompt_file).name, turns=turns, conversations=n_conv,
                           samples=samples, marker_regex=cfg.marker_regex)
    result = load_done(out, settings) or {"settings": settings, "models": {}}
    final = ensure_baked(cfg)
    model, tokenizer, info = load_baked(final, device=cfg.device, model_cache_dir=cfg.model_cache_dir)
    system = info["targets"][0]["system_prompt"]
    convs = conversations(questions(), n_conv, turns, cfg.seed)
    for who in MODELS:
        if who in result["models"]:
            print(f"drift | {who:13} | in {out}, kept")
            continue
        t0 = time.time()
        answers = []
        for s in range(samples):
            if who == "baked":
                answers += hold(model, tokenizer, convs, None, cfg.eval_max_new_tokens, s)
            else:
                with model.disable_adapter():
                    answers += hold(model, tokenizer, convs, system if who == "prompted base" else None,
                                    cfg.eval_max_new_tokens, s)
        hits = [[follows(a, [], cfg.marker_regex) for a in conv] for conv in answers]
        per_turn = [sum(h[t] for h in hits) / len(hits) for t in range(turns)]
        result["models"][who] = {"per_turn": per_turn, "hits": hits, "n_per_turn": len(hits),
                                 "example": [{"user": q, "answer": a} for q, a in zip(convs[0], answers[0])]}
        save(out, result)
        print(f"drift | {who:13} | per turn {' '.join(f'{r:.2f}' for r in per_turn)} | {time.time() - t0:.0f}s", flush=True)
    result["summary"] = {who: {"first_3_turns": mean(m["per_turn"][:3]), "last_3_turns": mean(m["per_turn"][-3:]),
                               "all_turns": mean(m["per_turn"])} for who, m in result["models"].items()}
    result.pop("partial", None)  # a run stopped early said which models were missing
    return save_with_plot(out, result, plot)


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def plot(result: dict, path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    styles = {"prompted base": ("o-", "tab:blue"), "baked": ("s-", "tab:red"), "base": ("^--", "tab:gray")}
    for who, m in result["models"].items():
        n = m["n_per_turn"]
        turns = range(1, len(m["per_turn"]) + 1)
        err = [(p * (1 - p) / n) ** 0.5 for p in m["per_turn"]]  # binomial standard error
        style, color = styles.get(who, ("o-", None))
        label = {"prompted base": "base + prompt (system turn at the top)", "baked": "baked, no prompt",
                 "base": "base, no prompt"}.get(who, who)
        ax.errorbar(list(turns), m["per_turn"], yerr=err, fmt=style, color=color, capsize=3, label=label)
    ax.set_xlabel("turn of the conversation")
    ax.set_ylabel("adherence (marker rate)")
    ax.set_ylim(-0.05, 1.05)
    ax.set_xticks(list(range(1, result["settings"]["turns"] + 1)))
    s = result["settings"]
    ax.set_title(f"Persona drift: {s['conversations']} conversations x {s['samples']} samples per turn")
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def main() -> None:
    setup_threads()
    run(config("pirate"))


if __name__ == "__main__":
    main_guard(main)
