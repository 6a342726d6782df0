"""What the four experiments share: the small bake settings, bake-if-missing (resumable), JSON reuse, plots.

Every run lives under experiments/runs/ (git-ignored: data/, checkpoints/), never in the user's data/ or
checkpoints/. Results (JSON + PNG) go to experiments/results/, which is committed. A result's finished parts are
reused only by the checkout that measured them (experiments/runs/run_id): a fresh clone measures everything
again and overwrites the committed figures, so `git diff experiments/results` shows what changed.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import uuid
from pathlib import Path

import torch

from promptbake import Config
from promptbake.checks import front_matter_checks
from promptbake.data import load_prompts
from promptbake.generate import generate
from promptbake.io import atomic_write_bytes, read_json, write_json
from promptbake.lineage import BAKE_CONFIG
from promptbake.stages import bake

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RUNS = HERE / "runs"
RESULTS = HERE / "results"
UNSEEN = ROOT / "examples" / "unseen_questions.txt"  # 40 questions written apart from the training queries

# The behaviours baked, each with the regex that spots it in an answer (from the project's own examples).
PIRATE_REGEX = next(c.value for c in front_matter_checks(str(ROOT / "prompt.md")) if c.name == "pirate words")
PROMPTS = {
    "pirate": ("prompt.md", PIRATE_REGEX),
    "knight": ("examples/personas/knight.md", r"\b(liege|sire|my lord|my lady|honou?r\w*|quests?|swords?|knights?|"
                                              r"noble|chivalr\w*|realm|kingdom|steed|valou?r|squire)\b"),
    "cats": ("examples/cats.md", r"\b(cats?|kittens?|feline|meow\w*|purr\w*)\b"),
    "poet": ("examples/poet.md", r"\b(verse|rhyme|heart|soul|thee|thou|o )\b"),
}

# A small bake: 40 built-in queries x 2 temperatures = 80 rows, 64-token answers, 2 epochs, a step checkpoint
# every 2 steps (the half-baking sweep reads them). A few minutes per bake on one core.
SMALL = dict(num_queries=40, temperatures=[0.7, 1.0], max_new_tokens=64, eval_max_new_tokens=64, num_epochs=2,
             batch_size=8, save_steps=2, verify_queries=0, wandb_mode="disabled")


def setup_threads() -> None:
    """One thread unless OMP_NUM_THREADS says otherwise: the experiments share a small machine."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


def config(name: str, runs: Path = RUNS, **overrides) -> Config:
    """The settings of one experiment bake: SMALL, the run folders under `runs`, then `overrides`."""
    prompt_file, regex = PROMPTS.get(name, ("prompt.md", PIRATE_REGEX))
    kw = {**SMALL, "name": name, "prompt_file": str(ROOT / prompt_file), "marker_regex": regex,
          "data_dir": str(runs / "data"), "checkpoint_dir": str(runs / "checkpoints"), **overrides}
    return Config(**kw)


def ensure_baked(cfg: Config) -> Path:
    """checkpoints/<name>/final: kept when it exists; else the data is generated (resuming rows on disk) and the
    bake runs, resuming from its last step-N."""
    final = Path(cfg.checkpoint_dir) / cfg.name / "final"
    if (final / BAKE_CONFIG).exists():
        print(f"bake {cfg.name} | {final} exists, kept")
        return final
    t0 = time.time()
    print(f"bake {cfg.name} | generating data then baking {cfg.prompt_file}", flush=True)
    generate(cfg)
    final = bake(dataclasses.replace(cfg, resume=True))
    print(f"bake {cfg.name} | done in {time.time() - t0:.0f}s", flush=True)
    return final


def shown(path: Path) -> str:
    """A path as a result JSON records it: relative to the project, so no machine's folders land in the repo."""
    return os.path.relpath(path, ROOT)


def questions(path: Path = UNSEEN) -> list[str]:
    return [r.context[-1]["content"] for r in load_prompts(str(path))]


def run_id(runs: Path = RUNS) -> str:
    """This checkout's experiment run, made on first use: results carry it, and only its own are resumed."""
    path = runs / "run_id"
    if not path.exists():
        runs.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, uuid.uuid4().hex.encode())
    return path.read_text().strip()


def load_done(path: Path, settings: dict) -> dict | None:
    """A result file this checkout wrote with these exact settings (its parts are reused), else None."""
    path.parent.mkdir(parents=True, exist_ok=True)  # the plot is drawn before the first save
    if not path.exists():
        return None
    old = read_json(path)
    if old.get("run_id") != run_id():
        print(f"{path}: measured by another checkout (the committed figures); measuring again")
        return None
    if old.get("settings") != settings:
        print(f"{path}: written with other settings; starting it again")
        return None
    return old


def save(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {**result, "run_id": run_id()})


def settings_of(cfg: Config, **extra) -> dict:
    """What a result depends on: the model, the bake's settings and the experiment's own."""
    keys = ("model_name_or_path", "num_queries", "temperatures", "max_new_tokens", "eval_max_new_tokens", "num_epochs",
            "batch_size", "learning_rate", "seed", "top_k")
    return {**{k: getattr(cfg, k) for k in keys}, **extra}


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    plt = pyplot()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_with_plot(out: Path, result: dict, plot) -> dict:
    """Draws result's plot beside its JSON (same name, .png), then writes the JSON with the plot's path."""
    out.parent.mkdir(parents=True, exist_ok=True)
    result["plot"] = plot(result, out.with_suffix(".png")).name  # beside the JSON: no machine's path in the repo
    save(out, result)
    print(f"wrote {out} and {out.with_name(result['plot'])}")
    return result


def main_guard(fn) -> None:
    """Runs an experiment's main; a UserError from the pipeline prints its one line and exits 1."""
    from promptbake.errors import UserError

    try:
        fn()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
