"""Files: atomic writes, append-only JSONL, content hashes. Nothing half-written is ever trusted."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import orjson

from .errors import UserError


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Writes to a temp file beside `path`, fsyncs, then renames: a crash or a full disk leaves the old file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise UserError(f"could not write {path}: {e.strerror or e}; the previous file, if any, is intact") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj) -> None:
    atomic_write_bytes(path, orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))


def read_json(path: str | Path):
    try:
        return orjson.loads(Path(path).read_bytes())
    except orjson.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


def atomic_dir(final: str | Path):
    """Returns a fresh temp folder beside `final`; call commit_dir(tmp, final) when it is complete."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))


def commit_dir(tmp: Path, final: str | Path) -> None:
    final = Path(final)
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """Returns (line number, row) pairs. A torn last line (a crash mid-write) is skipped; other bad lines fail."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: file not found")
    rows, lines = [], path.read_bytes().split(b"\n")
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append((i, orjson.loads(line)))
        except orjson.JSONDecodeError as e:
            if i == len(lines) and not path.read_bytes().endswith(b"\n"):
                continue  # the row in flight when a writer was killed
            raise UserError(f"{path}:{i}: malformed JSON ({e}); fix or delete that line") from None
    return rows


class JsonlAppender:
    """Appends one row per line and flushes it, so a crash loses at most the row in flight."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and self.path.stat().st_size:
            with open(self.path, "rb+") as f:  # drop a torn last line left by a killed writer
                data = f.read()
                if not data.endswith(b"\n"):
                    f.truncate(data.rfind(b"\n") + 1)
        self.f = open(self.path, "ab")

    def write(self, row: dict) -> None:
        try:
            self.f.write(orjson.dumps(row) + b"\n")
            self.f.flush()
            os.fsync(self.f.fileno())
        except OSError as e:
            raise UserError(f"could not append to {self.path}: {e.strerror or e}; rows written so far are kept") from None

    def close(self) -> None:
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return sha256_bytes(text.encode())
