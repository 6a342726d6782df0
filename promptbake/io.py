"""Files: atomic writes, append-only JSONL, content hashes. Nothing half-written is ever trusted.

Every write here turns an OSError (full or read-only disk, a name too long, a file where a folder should be)
into a one-line UserError naming the path and the reason, and leaves nothing half-written under the final name.
"""

from __future__ import annotations

import codecs
import errno
import hashlib
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import orjson

from .errors import UserError

# What to do about the common write failures; other errors get their reason only.
FIXES = {
    errno.ENOSPC: "free some disk space and rerun",
    errno.EDQUOT: "free some disk space (you are over quota) and rerun",
    errno.EROFS: "the disk is mounted read-only: pick a folder on a writable disk",
    errno.ENAMETOOLONG: "use a shorter name",
    errno.ENOTDIR: "a part of that path is a file, not a folder: rename it or pick another path",
    errno.EACCES: "check the folder's permissions",
    errno.EPERM: "check the folder's permissions",
}
MAX_SIDE_NAME = 120  # temp and backup names beside a file stay well under the usual 255-byte limit


def _failed(action: str, path, e: OSError, kept: str = "") -> UserError:
    """'could not <action> <path>: <reason>[; <what is kept>][; <the fix>]', one line."""
    fix = FIXES.get(e.errno)
    return UserError(f"could not {action} {path}: {e.strerror or e}" + (f"; {kept}" if kept else "") +
                     (f"; {fix}" if fix else ""))


def side_name(name: str) -> str:
    """A short form of `name` for temp and backup files beside it: a legal long name must stay writable."""
    if len(name.encode()) <= MAX_SIDE_NAME:
        return name
    return name[:40] + "-" + hashlib.sha256(name.encode()).hexdigest()[:16]


def make_parent(path: Path) -> None:
    """Creates the folder `path` goes in, or raises a UserError naming it and why not."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # the parent is a file: say so, as mkdir does for a file further up
        why = OSError(errno.ENOTDIR, f"{os.strerror(errno.ENOTDIR)} ({path.parent} is a file)")
        raise _failed("write", path, why) from None
    except OSError as e:
        raise _failed(f"create the folder {path.parent} for", path, e) from None


def _fsync_dir(folder: Path) -> None:
    """Makes a rename durable; some filesystems refuse to fsync a folder, which costs only durability."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Writes to a temp file beside `path`, fsyncs, then renames: a crash or a full disk leaves the old file."""
    path = Path(path)
    make_parent(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{side_name(path.name)}.", suffix=".tmp")
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        raise _failed("write", path, e, "the previous file, if any, is intact") from None
    except BaseException:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_json(path: str | Path, obj) -> None:
    atomic_write_bytes(path, orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))


def read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except OSError as e:
        raise _failed("read", path, e) from None


def read_json(path: str | Path):
    path = Path(path)
    fix = "restore it, or delete it and rerun the step that wrote it"
    data = read_bytes(path)
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (bad byte at offset {e.start}): {fix}") from None
    if not data.strip():
        raise UserError(f"{path} is empty, not JSON: {fix}")
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}): {fix}") from None


def atomic_dir(final: str | Path) -> Path:
    """Returns a fresh temp folder beside `final`; call commit_dir(tmp, final) when it is complete."""
    final = Path(final)
    make_parent(final)
    try:
        return Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{side_name(final.name)}.", suffix=".tmp"))
    except OSError as e:
        raise _failed("create a temporary folder beside", final, e) from None


def commit_dir(tmp: Path, final: str | Path) -> None:
    """Puts the complete folder `tmp` in place of `final`. On failure `final` is as it was and `tmp` is removed."""
    final = Path(final)
    old = final.with_name(f".{side_name(final.name)}.old")
    moved_old = False
    try:
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            moved_old = True
        os.replace(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        kept = f"the previous {final.name}, if any, is intact"
        if moved_old:
            try:
                os.replace(old, final)  # a rename back within one folder needs no space
            except OSError:
                kept = f"the previous {final.name} is at {old}: rename it back"
        raise _failed("save", final, e, kept) from None
    shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(final.parent)


@contextmanager
def folder_written_atomically(final: str | Path):
    """`with folder_written_atomically(path) as tmp:` fill tmp; it replaces `path` only if the block completes."""
    tmp = atomic_dir(final)
    try:
        yield tmp
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _failed("save", final, e, f"the previous {Path(final).name}, if any, is intact") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit_dir(tmp, final)


def torn_tail(data: bytes) -> int:
    """Bytes of a torn last line (a writer killed mid-row): a last line without its newline that is not JSON.

    A last line that parses is a complete row missing only its newline; JsonlAppender and read_jsonl agree on this.
    """
    if not data or data.endswith(b"\n"):
        return 0
    tail = data[data.rfind(b"\n") + 1:]
    if not tail.strip():
        return 0
    try:
        orjson.loads(tail)
        return 0
    except orjson.JSONDecodeError:
        return len(tail)


def _note_torn(path: Path, n: int, action: str) -> None:
    print(f"note: {path}: {action} an incomplete last line ({n} bytes), left by an interrupted write",
          file=sys.stderr)


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """Returns (line number, row) pairs. A torn last line (a crash mid-write) is skipped; other bad lines fail."""
    path = Path(path)
    data = read_bytes(path).removeprefix(b"\xef\xbb\xbf")  # a UTF-8 BOM, as some editors save
    torn = torn_tail(data)
    if torn:
        _note_torn(path, torn, "ignoring")
        data = data[:-torn]
    rows = []
    for i, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            rows.append((i, orjson.loads(line)))
        except orjson.JSONDecodeError as e:
            raise UserError(f"{path}:{i}: malformed JSON ({e}); fix or delete that line") from None
    return rows


class JsonlAppender:
    """Appends one row per line and fsyncs it, so a crash loses at most the row in flight.

    Writes go straight to the file descriptor (no buffer that could replay a failed row on close), and a row
    that fails half-way is cut off again, so a full disk never leaves a torn line between complete rows.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        make_parent(self.path)
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as e:
            raise _failed("open", self.path, e) from None
        try:
            self.size = self._repair_tail()
        except OSError as e:
            os.close(self.fd)
            raise _failed("repair the last line of", self.path, e) from None

    def _repair_tail(self) -> int:
        """Drops a torn last line, or ends a complete one with its missing newline; returns the file size."""
        data = self.path.read_bytes()
        torn = torn_tail(data)
        if torn:
            os.ftruncate(self.fd, len(data) - torn)
            os.fsync(self.fd)
            _note_torn(self.path, torn, "dropped")
            return len(data) - torn
        if data and not data.endswith(b"\n"):
            _write_all(self.fd, b"\n")
            os.fsync(self.fd)
            return len(data) + 1
        return len(data)

    def write(self, row: dict) -> None:
        line = orjson.dumps(row) + b"\n"
        try:
            _write_all(self.fd, line)
            os.fsync(self.fd)
        except OSError as e:
            self._cut_back()
            raise _failed("append to", self.path, e, "rows written so far are kept") from None
        self.size += len(line)

    def _cut_back(self) -> None:
        try:
            os.ftruncate(self.fd, self.size)
        except OSError:
            pass  # the next open drops the torn line anyway

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

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


SHAPE_ERRORS = (KeyError, TypeError, AttributeError, ValueError, IndexError)  # what a JSON file of another shape raises


@contextmanager
def reading(path: str | Path):
    """`with reading(path):` use what was read from `path`; a file of another shape than promptbake writes (a hand
    edit, a damaged file) is one line naming it, not a traceback."""
    try:
        yield
    except SHAPE_ERRORS as e:
        raise UserError(f"{path}: not as promptbake writes it ({type(e).__name__}: {str(e)[:80]}); restore it, or "
                        f"delete it and rerun the step that wrote it") from None


# ---------------------------------------------------------------- text files and seeds
def check_utf8(path, data: bytes, torn_end_ok: bool = False) -> None:
    """Refuses bytes that are not UTF-8, naming the line. `torn_end_ok`: a multi-byte character cut off at
    the very end of an append-only file is a write that was interrupted, not a wrong encoding."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        if torn_end_ok and e.reason == "unexpected end of data" and b"\n" not in data[e.start:]:
            return
        line = data[:e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save it as UTF-8") from None


def read_text(path) -> str:
    """A UTF-8 text file's contents, without a byte order mark (Windows editors add one) and with \\n line ends."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{path}: is a folder, not a text file; name the file itself")
    data = p.read_bytes().removeprefix(codecs.BOM_UTF8)
    check_utf8(path, data)
    return data.decode("utf-8").replace("\r\n", "\n")


def derive_seed(*parts) -> int:
    """A seed from a hash of everything that identifies a sample: distinct parts never share a seed."""
    digest = hashlib.sha256(orjson.dumps(parts, option=orjson.OPT_SERIALIZE_NUMPY)).digest()
    return int.from_bytes(digest[:8], "little") % (2**63 - 1)
