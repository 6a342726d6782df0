import errno
import json
import os
import subprocess
import sys
import time

import pytest
from helpers import ROOT, env

from promptbake import io
from promptbake.errors import UserError
from promptbake.io import JsonlAppender, read_json, read_jsonl, write_json
from promptbake.locks import lock_path, run_lock


def rows(path):
    return [r for _, r in read_jsonl(path)]


def fail_with(code):
    def fail(*args, **kw):
        raise OSError(code, os.strerror(code))

    return fail


# --- JSONL: the loader and the appender agree on what a row is ---


def test_complete_last_row_without_newline_is_kept(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\n".join(json.dumps({"i": i}).encode() for i in range(4)))  # no final newline
    assert rows(path) == [{"i": i} for i in range(4)]
    with JsonlAppender(path) as w:
        w.write({"i": 4})
    assert rows(path) == [{"i": i} for i in range(5)]
    assert path.read_bytes().endswith(b'{"i": 3}\n{"i":4}\n')


def test_torn_last_line_dropped_by_both_with_a_note(tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"i":0}\n{"i":1}\n{"i": 2, "te')
    assert rows(path) == [{"i": 0}, {"i": 1}]
    assert "ignoring an incomplete last line (12 bytes)" in capsys.readouterr().err
    with JsonlAppender(path) as w:
        w.write({"i": 2})
    assert "dropped an incomplete last line (12 bytes)" in capsys.readouterr().err
    assert rows(path) == [{"i": 0}, {"i": 1}, {"i": 2}]


def test_bad_middle_line_still_fails(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"i":0}\n{"i": 1,\n{"i":2}\n')
    with pytest.raises(UserError, match=r"d.jsonl:2: malformed JSON .*fix or delete that line"):
        read_jsonl(path)


def test_failed_append_leaves_no_torn_row(tmp_path, monkeypatch):
    path = tmp_path / "d.jsonl"
    with JsonlAppender(path) as w:
        w.write({"i": 0})
        real_write = os.write
        monkeypatch.setattr(io.os, "write", lambda fd, data: real_write(fd, bytes(data[:5])))  # a short write...
        monkeypatch.setattr(io.os, "fsync", fail_with(errno.ENOSPC))  # ...then the disk is full
        with pytest.raises(UserError, match=r"could not append to .*d.jsonl: No space left on device; rows written"):
            w.write({"i": 1, "text": "a long row"})
    assert path.read_bytes() == b'{"i":0}\n'


# --- writes: a one-line UserError naming the path and the reason, nothing half-written ---


def test_path_under_a_file_is_not_a_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    for target in (tmp_path / "file" / "meta.json", tmp_path / "file" / "sub" / "meta.json"):
        with pytest.raises(UserError, match=f"{target}: Not a directory"):
            write_json(target, {})
    with pytest.raises(UserError, match="Not a directory"):
        io.atomic_dir(tmp_path / "file" / "sub" / "ckpt")
    with pytest.raises(UserError, match="Not a directory"):
        JsonlAppender(tmp_path / "file" / "d.jsonl")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_name_too_long(tmp_path):
    with pytest.raises(UserError, match=r"could not write .*: File name too long; .*use a shorter name"):
        write_json(tmp_path / ("x" * 300 + ".json"), {})
    with pytest.raises(UserError, match="File name too long"):
        JsonlAppender(tmp_path / ("x" * 300 + ".jsonl"))
    with pytest.raises(UserError, match="File name too long"):
        io.commit_dir(io.atomic_dir(tmp_path / ("c" * 300)), tmp_path / ("c" * 300))
    assert list(tmp_path.iterdir()) == []  # no temp file or folder left behind


def test_long_but_legal_name_is_writable(tmp_path):
    target = tmp_path / ("x" * 245 + ".json")  # 250 bytes: legal, but too long for a temp name built on it
    write_json(target, {"ok": 1})
    assert read_json(target) == {"ok": 1} and list(tmp_path.iterdir()) == [target]
    folder = tmp_path / ("c" * 250)
    io.commit_dir(io.atomic_dir(folder), folder)
    io.commit_dir(io.atomic_dir(folder), folder)  # replacing goes through a backup name beside it
    assert folder.is_dir()


@pytest.mark.parametrize("call", ["write", "fsync", "replace"])
def test_disk_full_at_each_step_keeps_the_old_file(tmp_path, monkeypatch, call):
    target = tmp_path / "meta.json"
    write_json(target, {"old": True})
    monkeypatch.setattr(io.os, call, fail_with(errno.ENOSPC))
    with pytest.raises(UserError, match=r"could not write .*meta.json: No space left on device; the previous file"):
        write_json(target, {"new": True})
    monkeypatch.undo()
    assert read_json(target) == {"old": True} and list(tmp_path.iterdir()) == [target]


def test_read_only_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(io.os, "open", fail_with(errno.EROFS))
    with pytest.raises(UserError, match=r"could not write .*meta.json: Read-only file system; .*writable disk"):
        write_json(tmp_path / "meta.json", {})
    with pytest.raises(UserError, match=r"could not open .*d.jsonl: Read-only file system"):
        JsonlAppender(tmp_path / "d.jsonl")
    monkeypatch.setattr(io.os, "mkdir", fail_with(errno.EROFS))
    with pytest.raises(UserError, match=r"could not create the folder .*new for .*: Read-only file system"):
        write_json(tmp_path / "new" / "meta.json", {})


def test_commit_dir_failure_restores_the_previous_folder(tmp_path, monkeypatch):
    final = tmp_path / "final"
    final.mkdir()
    (final / "v").write_text("1")
    tmp = io.atomic_dir(final)
    (tmp / "v").write_text("2")
    real_replace, calls = os.replace, []

    def second_fails(src, dst):
        calls.append(src)
        if len(calls) == 2:  # final -> .old worked; tmp -> final hits a full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", second_fails)
    with pytest.raises(UserError, match=r"could not save .*final: No space left on device; the previous final"):
        io.commit_dir(tmp, final)
    assert (final / "v").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_folder_written_atomically_cleans_up_on_failure(tmp_path):
    final = tmp_path / "ckpt"
    with pytest.raises(UserError, match=r"could not save .*ckpt: No space left on device"), \
            io.folder_written_atomically(final) as tmp:
        (tmp / "a").write_text("x")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []
    with io.folder_written_atomically(final) as tmp:
        (tmp / "a").write_text("x")
    assert (final / "a").read_text() == "x" and list(tmp_path.iterdir()) == [final]


# --- read_json: one line naming the file and the fix ---


@pytest.mark.parametrize("data, what", [(b'{"a": 1,', r"is not valid JSON \(line 1"),
                                        (b'{"a": "\xff\xfe"}', "is not UTF-8"), (b"", "is empty")])
def test_read_json_bad_file_names_file_and_fix(tmp_path, data, what):
    path = tmp_path / "meta.json"
    path.write_bytes(data)
    with pytest.raises(UserError, match=f"meta.json {what}.*delete it and rerun the step that wrote it"):
        read_json(path)


def test_read_json_missing_file(tmp_path):
    with pytest.raises(UserError, match="nope.json: file not found"):
        read_json(tmp_path / "nope.json")


# --- locks: one run per data file or checkpoint folder ---

HOLD = """
import sys
from promptbake.locks import run_lock
with run_lock(sys.argv[1], "bake"):
    print("locked", flush=True)
    sys.stdin.read()
"""


def holder(path):
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], cwd=ROOT, env=env(), text=True,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert p.stdout.readline().strip() == "locked"
    return p


def try_lock(path):
    code = "import sys\nfrom promptbake.locks import run_lock\nwith run_lock(sys.argv[1], 'generate'): pass"
    return subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT, env=env(), capture_output=True, text=True,
                          check=False)


def test_second_holder_refused_then_free_after_exit(tmp_path):
    target = tmp_path / "checkpoints" / "pirate"
    p = holder(target)
    try:
        with pytest.raises(UserError, match=rf"{target} is in use by process {p.pid} \(.*python.* -c .*pirate\); "
                                            "wait for it to finish or stop it"):
            with run_lock(target, "bake"):
                pass
    finally:
        p.stdin.close()
        p.wait(timeout=30)
    with run_lock(target, "bake"):
        assert lock_path(target).read_text().startswith(f"{os.getpid()}\n")


def test_killed_holder_does_not_block(tmp_path):
    target = tmp_path / "data.jsonl"
    p = holder(target)
    p.kill()
    p.wait(timeout=30)
    assert lock_path(target).read_text().startswith(f"{p.pid}\n")  # a stale lock file, as a kill -9 leaves it
    with run_lock(target, "generate"):
        pass


def test_released_on_exception_and_nested_in_one_process(tmp_path):
    target = tmp_path / "data.jsonl"
    with pytest.raises(ValueError), run_lock(target, "generate"):
        with run_lock(target, "generate"):  # a nested call in the same run is no conflict
            pass
        assert try_lock(target).returncode != 0  # still held after the nested block ends
        raise ValueError
    done = try_lock(target)
    assert done.returncode == 0, done.stderr
    deadline = time.time() + 5
    while lock_path(target).read_text() and time.time() < deadline:  # the holder's PID is cleared on release
        time.sleep(0.05)
    assert lock_path(target).read_text() == ""


def test_jsonl_with_a_bom_and_crlf_reads(tmp_path):
    from promptbake.io import read_jsonl

    f = tmp_path / "bom.jsonl"
    f.write_bytes(b'\xef\xbb\xbf{"a": 1}\r\n{"a": 2}\r\n')
    assert [r for _, r in read_jsonl(f)] == [{"a": 1}, {"a": 2}]
