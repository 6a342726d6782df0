"""Inputs: the system prompt, prompt sources (built-in, files, datasets) and chat rows, all validated
with errors that name the file, the line and the fix."""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import orjson

from .checks import split_front_matter
from .errors import UserError
from .io import check_utf8, read_jsonl, read_text
from .seeds import seed_queries

ROLES = ("system", "user", "assistant")
PROMPT_KEYS = ("prompt", "question", "instruction", "query", "input", "text")
RESPONSE_KEYS = ("response", "completion", "output")
PROMPT_SUFFIXES = (".txt", ".json", ".jsonl")
GENERATION_EXAMPLE = '{"index": 0, "temperature": 0.7, "finish_reason": "stop"}'


# ---------------------------------------------------------------- text files
def _json_type(v) -> str:
    """The JSON name of a value's type, for error messages."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(v), "a number" if isinstance(v, (int, float)) else type(v).__name__)


def read_prompt(path: str) -> str:
    """The system prompt of a prompt file: its body, without the front matter (promptbake/checks.py), which is
    never baked."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{path}: is a folder; --prompt_file must name the file holding the system prompt "
                        "(e.g. prompt.md)")
    if not p.exists():
        raise UserError(f"{path}: system prompt file not found; write the prompt to bake into it")
    text = split_front_matter(read_text(p), path)[1].strip()
    if not text:
        raise UserError(f"{path}: the system prompt is empty; write the prompt to bake into it"
                        + (" (below the front matter)" if read_text(p).strip() else ""))
    return text


def normalise_query(query: str | list[dict]) -> str:
    """A query as compared and hashed (held-out split, overlap warnings): the text of its user turns, lower case,
    whitespace collapsed. `query` is a text or a chat context."""
    if isinstance(query, list):
        query = " ".join(str(m.get("content", "")) for m in query if m.get("role") == "user")
    return " ".join(query.lower().split())


# ---------------------------------------------------------------- rows
@dataclass
class Row:
    """One chat row. `context` holds the turns before the trained assistant message."""
    line: int
    context: list[dict]
    response: str | None = None  # None: prompts only, the teacher must answer
    response_ids: list[int] | None = None  # the teacher's own token ids, when the local backend kept them
    complete: bool = True  # False: cut at max_new_tokens, so no end-of-turn is trained
    key: tuple | None = None  # (query, sample index, temperature) of generated rows
    source: str = ""  # where the query came from: prompt | generic | builtin | user (generate.gather_queries)


class Skip(NamedTuple):
    where: str  # "file:line", "file: item N" or "dataset ID: row N"
    reason: str


class Rows(list):
    """A list of Row, plus `skipped`: a Skip for every row that was read but left out (an empty assistant
    answer would train a bare end-of-turn; a cut-off last line is a write that was interrupted). The skips
    are printed when the rows are loaded; callers may also count them into their own reports."""

    def __init__(self, rows=(), skipped=()):
        super().__init__(rows)
        self.skipped: list[Skip] = list(skipped)


def row_key(context: list[dict], index, temperature) -> tuple:
    """Identifies a generated row: the same query, sample index and temperature is the same row."""
    return (orjson.dumps(context).decode(), index, None if temperature is None else float(temperature))


def _check_types(obj: dict, where: str) -> dict:
    """Validates the fields generate_data.py writes beside `messages`; returns `generation` ({} if absent)."""
    gen = obj.get("generation")
    if gen is None:
        gen = {}
    if not isinstance(gen, dict):
        raise UserError(f"{where}: `generation` must be an object like {GENERATION_EXAMPLE}, got {_json_type(gen)}")
    for key, types, name in (("index", int, "an integer"), ("temperature", (int, float), "a number"),
                             ("finish_reason", str, "a string")):
        v = gen.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, types)):
            raise UserError(f"{where}: `generation.{key}` must be {name}, got {_json_type(v)} ({str(v)[:40]})")
    ids = obj.get("response_token_ids")
    if ids is not None and not (isinstance(ids, list) and all(type(t) is int for t in ids)):
        raise UserError(f"{where}: `response_token_ids` must be a list of integer token ids; fix the row, or delete "
                        "the field so the response text is tokenized")
    return gen


def _check_turns(context: list[dict], where: str) -> None:
    """The trained answer must follow a user turn, and no user turn may be empty."""
    if not context:
        raise UserError(f"{where}: the row has no user turn; add the user message, or delete the row")
    if context[-1]["role"] != "user":
        raise UserError(f"{where}: the row has no user turn before the assistant's answer; add the user message "
                        "it answers, or delete the row")
    for m in context:
        if m["role"] == "user" and not m["content"].strip():
            raise UserError(f"{where}: the user turn is empty; write the prompt, or delete the row")


def _prompt_text(obj: dict, where: str) -> str:
    """The prompt of a flat row: the first of PROMPT_KEYS, with Alpaca's `input` appended to its `instruction`."""
    key = next((k for k in PROMPT_KEYS if obj.get(k) is not None), None)
    if key is None:
        raise UserError(f"{where}: a row needs `messages` or one of {list(PROMPT_KEYS)}")
    if not isinstance(obj[key], str):
        raise UserError(f"{where}: `{key}` must be a string, got {_json_type(obj[key])}")
    extra = obj.get("input") if key == "instruction" else None
    return f"{obj[key]}\n\n{extra}" if isinstance(extra, str) and extra.strip() else obj[key]


def _flat_row(obj: dict, where: str, line: int) -> Row:
    """A row of columns: a prompt (PROMPT_KEYS) and optionally a response (RESPONSE_KEYS)."""
    context = [{"role": "user", "content": _prompt_text(obj, where)}]
    _check_turns(context, where)
    key = next((k for k in RESPONSE_KEYS if obj.get(k) is not None), None)
    if key is not None and not isinstance(obj[key], str):
        raise UserError(f"{where}: `{key}` must be a string, got {_json_type(obj[key])}")
    return Row(line, context, obj[key] if key else None)


def _messages_row(obj: dict, where: str, line: int, strip_system: bool) -> Row:
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
    if not messages or messages[-1]["role"] != "assistant":
        _check_turns(messages, where)
        return Row(line, messages)
    context, answer = messages[:-1], messages[-1]["content"]
    _check_turns(context, where)
    gen = _check_types(obj, where)
    key = row_key(context, gen.get("index"), gen.get("temperature")) if gen else None
    return Row(line, context, answer, obj.get("response_token_ids"), gen.get("finish_reason", "stop") != "length", key)


def _row_from_obj(obj, where: str, line: int, strip_system: bool) -> Row:
    if isinstance(obj, str):
        _check_turns([{"role": "user", "content": obj}], where)
        return Row(line, [{"role": "user", "content": obj}])
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected an object with `messages` or `prompt`, got {_json_type(obj)}")
    if obj.get("messages") is None:
        return _flat_row(obj, where, line)
    return _messages_row(obj, where, line, strip_system)


def _rows_from_items(items, where, strip_system: bool) -> Rows:
    """Rows from (number, object) pairs; `where(number)` locates one in messages. Rows with an empty
    assistant answer are skipped: trained, they would teach the student to end its turn at once."""
    rows = Rows()
    for i, obj in items:
        r = _row_from_obj(obj, where(i), i, strip_system)
        if r.response is not None and not r.response.strip():
            rows.skipped.append(Skip(where(i), "the assistant's answer is empty (it would train a bare end-of-turn)"))
        else:
            rows.append(r)
    return rows


def _report_skipped(skipped: list[Skip]) -> None:
    by_reason: dict[str, list[str]] = {}
    for s in skipped:
        by_reason.setdefault(s.reason, []).append(s.where)
    for reason, wheres in by_reason.items():
        if len(wheres) == 1:
            print(f"{wheres[0]}: {reason}; it was skipped")
        else:
            print(f"skipped {len(wheres)} rows: {reason}: {', '.join(wheres[:5])}{' ...' if len(wheres) > 5 else ''}")


def _json_items(path, data: bytes) -> list[tuple[int, object]]:
    data = data.removeprefix(codecs.BOM_UTF8)
    check_utf8(path, data)
    try:
        items = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(items, list):
        raise UserError(f"{path}: expected a JSON list of prompts or rows, got {_json_type(items)}")
    return list(enumerate(items, 1))


def _torn_last_line(data: bytes, items: list[tuple[int, object]]) -> int | None:
    """The number of the last line if read_jsonl dropped it as cut off (no final newline, not parsed)."""
    if not data or data.endswith(b"\n") or not data.rsplit(b"\n", 1)[-1].strip():
        return None
    last = data.count(b"\n") + 1
    return None if items and items[-1][0] == last else last


def load_rows(path: str, strip_system: bool = False) -> Rows:
    """Reads chat rows from JSONL (one row a line) or a JSON list. Returns Rows: a list of Row whose
    `skipped` lists the rows left out (empty answers, a cut-off last line), each also printed here."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{path}: is a folder; point --targets at a .jsonl data file")
    if not p.exists():
        raise UserError(f"{path}: data file not found; run `python generate_data.py` first, or point --targets at it")
    data = p.read_bytes()
    if p.suffix == ".json":
        rows = _rows_from_items(_json_items(path, data), lambda i: f"{path}: item {i}", strip_system)
    else:
        check_utf8(path, data, torn_end_ok=True)
        items = read_jsonl(p)
        rows = _rows_from_items(items, lambda i: f"{path}:{i}", strip_system)
        torn = _torn_last_line(data, items)
        if torn:
            rows.skipped.append(Skip(f"{path}:{torn}", "the last line is cut off (a write was interrupted)"))
    _report_skipped(rows.skipped)
    if not rows:
        raise UserError(f"{path}: no rows" + (f" left ({len(rows.skipped)} skipped)" if rows.skipped else "")
                        + "; generate data first (python generate_data.py)")
    return rows


# ---------------------------------------------------------------- prompt sources
def _is_saved_dataset(folder: Path) -> bool:
    """A folder written by Dataset.save_to_disk or DatasetDict.save_to_disk."""
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def _looks_like_dataset_id(source: str) -> bool:
    """`squad`, `tatsu-lab/alpaca`: a Hub id, as opposed to a path."""
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", source) is not None


def _load_dataset(source: str):
    try:
        import datasets
    except ImportError:
        raise UserError(f"{source!r} is not a file; to read a Hugging Face dataset, `pip install datasets`") from None
    try:
        if Path(source).is_dir():
            ds = datasets.load_from_disk(source)
        else:
            ds = datasets.load_dataset(source, split="train")
    except Exception as e:  # noqa: BLE001 - the hub raises many kinds; all mean "cannot load"
        raise UserError(f"{source!r} is not a file here, and loading it as a Hugging Face dataset failed "
                        f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); without a network, save the "
                        "dataset with save_to_disk and pass the folder") from None
    if hasattr(ds, "keys"):  # a DatasetDict: take its train split, or the first
        split = "train" if "train" in ds else list(ds.keys())[0]
        if split != "train":
            print(f"dataset {source}: no train split; using {split!r}")
        ds = ds[split]
    return ds


def _dataset_rows(source: str, strip_system: bool) -> Rows:
    """A dataset's rows, read exactly like a JSONL file's: `messages` (paired when the last is the assistant's)
    or prompt/response columns."""
    rows = _rows_from_items(enumerate(_load_dataset(source), 1), lambda i: f"dataset {source}: row {i}", strip_system)
    _report_skipped(rows.skipped)
    if not rows:
        raise UserError(f"dataset {source}: no rows")
    return rows


def _txt_rows(p: Path) -> Rows:
    if not p.exists():
        raise UserError(f"{p}: prompts file not found")
    # a line starting with # is a comment (a file's header), never a prompt
    lines = [(i, s.strip()) for i, s in enumerate(read_text(p).splitlines(), 1) if s.strip()
             and not s.strip().startswith("#")]
    if not lines:
        raise UserError(f"{p}: no prompts; write one prompt per line")
    return Rows(Row(i, [{"role": "user", "content": s}]) for i, s in lines)


def _folder_rows(folder: Path, strip_system: bool) -> Rows:
    if _is_saved_dataset(folder):  # checked first: save_to_disk writes .json files of its own
        return _dataset_rows(str(folder), strip_system)
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix in PROMPT_SUFFIXES
                   and not f.name.startswith("."))
    if not files:
        raise UserError(f"{folder}: the folder holds no .txt, .json or .jsonl files and is not a saved dataset "
                        "(save_to_disk); put prompt files in it, or name a file")
    parts = [load_prompts(str(f), strip_system) for f in files]
    return Rows((r for rows in parts for r in rows), (s for rows in parts for s in rows.skipped))


def load_prompts(source: str, strip_system: bool = False) -> Rows:
    """Prompt rows from: `builtin`, a .txt file (one a line; a line starting with # is a comment), .json list,
    .jsonl rows, a folder of such files, or a dataset (Hub id or save_to_disk folder). Rows may carry responses
    (paired data), read as load_rows reads them; `strip_system` drops system messages instead of refusing them.
    `skipped` lists rows left out."""
    if source == "builtin":
        return Rows(Row(i, [{"role": "user", "content": q}]) for i, q in enumerate(seed_queries(), 1))
    p = Path(source)
    if p.is_dir():
        return _folder_rows(p, strip_system)
    if p.suffix == ".txt":
        return _txt_rows(p)
    if p.suffix in (".json", ".jsonl"):
        return load_rows(source, strip_system=strip_system)
    if p.exists():
        raise UserError(f"{source}: unknown prompts format; use .txt (one per line), .json (a list) or .jsonl")
    if _looks_like_dataset_id(source):
        return _dataset_rows(source, strip_system)
    raise UserError(f"{source}: prompts file not found (use `builtin`, a file, or a dataset id)")
