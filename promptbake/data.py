"""Inputs: the system prompt, prompt sources (built-in, files, datasets) and chat rows, all validated
with errors that name the file, the line and the fix."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import orjson

from .errors import UserError
from .io import read_jsonl
from .seeds import seed_queries

ROLES = ("system", "user", "assistant")
PROMPT_KEYS = ("prompt", "question", "instruction", "query", "input", "text")


def read_prompt(path: str) -> str:
    p = Path(path)
    if not p.exists():
        raise UserError(f"{path}: system prompt file not found; write the prompt to bake into it")
    text = p.read_text().strip()
    if not text:
        raise UserError(f"{path}: the system prompt is empty; write the prompt to bake into it")
    return text


@dataclass
class Row:
    """One chat row. `context` holds the turns before the trained assistant message."""
    line: int
    context: list[dict]
    response: str | None = None  # None: prompts only, the teacher must answer
    response_ids: list[int] | None = None  # the teacher's own token ids, when the local backend kept them
    complete: bool = True  # False: cut at max_new_tokens, so no end-of-turn is trained
    key: tuple | None = None  # (query, sample index, temperature) of generated rows


def row_key(context: list[dict], index, temperature) -> tuple:
    """Identifies a generated row: the same query, sample index and temperature is the same row."""
    return (orjson.dumps(context).decode(), index, None if temperature is None else float(temperature))


def _row_from_obj(obj, where: str, line: int, strip_system: bool) -> Row:
    if isinstance(obj, str):
        return Row(line, [{"role": "user", "content": obj}])
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected an object with `messages` or `prompt`, got {type(obj).__name__}")
    if "messages" not in obj:
        for k in PROMPT_KEYS:
            if isinstance(obj.get(k), str):
                resp = obj.get("response") or obj.get("completion") or obj.get("output")
                return Row(line, [{"role": "user", "content": obj[k]}], resp if isinstance(resp, str) else None)
        raise UserError(f"{where}: a row needs `messages` or one of {list(PROMPT_KEYS)}")
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: `messages` must be a non-empty list of {{role, content}}")
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise UserError(f"{where}: each message needs a role in {list(ROLES)} and a string content; "
                            f"got {str(m)[:80]}")
    if any(m["role"] == "system" for m in messages):
        if not strip_system:
            raise UserError(f"{where}: the row has a system message. The student must never see the prompt "
                            f"(it is baked from prompt.md); remove it, or pass --strip_system to drop it")
        messages = [m for m in messages if m["role"] != "system"]
    if messages[-1]["role"] == "assistant":
        gen = obj.get("generation") or {}
        key = row_key(messages[:-1], gen.get("index"), gen.get("temperature")) if gen else None
        return Row(line, messages[:-1], messages[-1]["content"], obj.get("response_token_ids"),
                   gen.get("finish_reason", "stop") != "length", key)
    return Row(line, messages)


def load_rows(path: str, strip_system: bool = False, need_responses: bool = False) -> list[Row]:
    """Reads chat rows from JSONL (one row a line) or a JSON list."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{path}: data file not found; run `python generate_data.py` first, or point --targets at it")
    if p.suffix == ".json":
        try:
            items = list(enumerate(orjson.loads(p.read_bytes()), 1))
        except orjson.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON ({e})") from None
        rows = [_row_from_obj(o, f"{path}: item {i}", i, strip_system) for i, o in items]
    else:
        rows = [_row_from_obj(o, f"{path}:{i}", i, strip_system) for i, o in read_jsonl(p)]
    if not rows:
        raise UserError(f"{path}: no rows; generate data first (python generate_data.py)")
    if need_responses:
        for r in rows:
            if r.response is None:
                raise UserError(f"{path}:{r.line}: the row has no assistant turn; paired data needs one in every "
                                "row (or give prompts only, and the teacher answers them)")
    return rows


def _dataset_prompts(source: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise UserError(f"{source!r} is not a file; to read a Hugging Face dataset, `pip install datasets`") from None
    try:
        ds = datasets.load_from_disk(source) if os.path.isdir(source) else datasets.load_dataset(source, split="train")
    except Exception as e:  # noqa: BLE001 - the hub raises many kinds; all mean "cannot load"
        raise UserError(f"could not load dataset {source!r} ({str(e).splitlines()[0]}); without a network, "
                        "save it with save_to_disk and pass the folder") from None
    if hasattr(ds, "keys"):  # a DatasetDict: take its train split, or the first
        ds = ds["train"] if "train" in ds else ds[list(ds.keys())[0]]
    return [r.context[-1]["content"] for i, o in enumerate(ds, 1)
            for r in [_row_from_obj(o, f"{source}: row {i}", i, True)]]


def load_prompts(source: str) -> list[Row]:
    """Prompt rows from: `builtin`, a .txt file (one a line), .json list, .jsonl rows, a folder of such
    files, or a dataset (HF id or save_to_disk folder). Rows may carry responses (paired data)."""
    if source == "builtin":
        return [Row(i, [{"role": "user", "content": q}]) for i, q in enumerate(seed_queries(), 1)]
    p = Path(source)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix in (".txt", ".json", ".jsonl"))
        if files:
            return [r for f in files for r in load_prompts(str(f))]
        return [Row(i, [{"role": "user", "content": q}]) for i, q in enumerate(_dataset_prompts(source), 1)]
    if p.suffix == ".txt":
        if not p.exists():
            raise UserError(f"{source}: prompts file not found")
        lines = [(i, s.strip()) for i, s in enumerate(p.read_text().splitlines(), 1) if s.strip()]
        if not lines:
            raise UserError(f"{source}: no prompts; write one prompt per line")
        return [Row(i, [{"role": "user", "content": s}]) for i, s in lines]
    if p.suffix in (".json", ".jsonl"):
        return load_rows(source, strip_system=False)
    if p.exists():
        raise UserError(f"{source}: unknown prompts format; use .txt (one per line), .json (a list) or .jsonl")
    if "/" in source and not source.startswith((".", "/")):
        return [Row(i, [{"role": "user", "content": q}]) for i, q in enumerate(_dataset_prompts(source), 1)]
    raise UserError(f"{source}: prompts file not found (use `builtin`, a file, or a dataset id)")
