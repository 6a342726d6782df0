"""One writer at a time: two runs appending to the same data file or checkpoint folder would interleave rows.

run_lock(path, what) holds an exclusive flock on `.<name>.lock` beside `path` (beside, not inside: a folder that is
replaced by an atomic rename would take a lock file inside it along). The kernel drops a flock when its holder
dies, so a lock file left by a killed run never blocks the next one. The holder's PID and command line are
written into the file so that a second run can say who holds it.

Why not the `filelock` package (installed already, for torch and the hub): tried (4.3.2), it writes nothing into the
lock file, and a refused acquire says only "The file lock '...' could not be acquired" (its `pid` is None for a lock
held elsewhere), so the holder's PID and command line would still be written and read here, through its private file
descriptor; and where the filesystem has no flock it switches to a marker-file ("soft") lock, where this runs
unlocked with a note. The flock call it would replace is one line.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError
from .io import make_parent, side_name
from .redact import redact

_held: dict[str, int] = {}  # lock file -> nesting depth in this process (flock would refuse a second open)


def lock_path(path: str | Path) -> Path:
    path = Path(path).absolute()
    return path.with_name(f".{side_name(path.name)}.lock")  # a legal long name stays lockable


def _holder(fd: int) -> str:
    """'process <pid> (<command line>)' from the lock file; a holder may be a moment from writing it."""
    for _ in range(10):
        os.lseek(fd, 0, os.SEEK_SET)
        lines = os.read(fd, 4096).decode("utf-8", "replace").splitlines()
        if len(lines) >= 2 and lines[0].isdigit():
            return f"process {lines[0]} ({lines[1]})"
        time.sleep(0.05)
    return "another process"


def _try_lock(fd: int, path: Path, lock: Path) -> bool:
    """True when locked; False where the filesystem has no flock (the run goes on unlocked, with a note)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        raise UserError(f"{path} is in use by {_holder(fd)}; wait for it to finish or stop it") from None
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        print(f"note: {lock}: this filesystem cannot lock files ({e.strerror}); running without a lock",
              file=sys.stderr)
        return False


def _write_holder(fd: int, what: str) -> None:
    command = " ".join([os.path.basename(sys.executable), *sys.argv]).replace("\n", " ")
    info = f"{os.getpid()}\n{redact(command)}\n{what}\n"  # a key pasted on the command line stays off disk
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode(), 0)
    except OSError:
        pass  # the note is for humans; a full disk must not stop the run here


def _clear(fd: int) -> None:
    """The file stays (deleting it would race a newcomer that opened it already); its stale PID goes."""
    try:
        os.ftruncate(fd, 0)
    except OSError:
        pass


@contextmanager
def run_lock(path: str | Path, what: str):
    """Holds `path` for this process while the block runs (`what`, e.g. "bake", is recorded for humans)."""
    lock = lock_path(path)
    key = str(lock)
    if key in _held:  # already ours: a nested call in the same run
        _held[key] += 1
        try:
            yield lock
        finally:
            _held[key] -= 1
        return
    make_parent(lock)
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)  # no O_TRUNC: the holder's PID is in there
    except OSError as e:
        raise UserError(f"could not create the lock file {lock}: {e.strerror or e}") from None
    try:
        if _try_lock(fd, path, lock):
            _write_holder(fd, what)
        _held[key] = 1
        try:
            yield lock
        finally:
            del _held[key]
            _clear(fd)
    finally:
        os.close(fd)  # releases the flock
