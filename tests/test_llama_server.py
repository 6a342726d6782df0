"""The API path against a real OpenAI-compatible server: llama.cpp serving the embedded GGUF on 127.0.0.1."""

import socket
import subprocess
import sys
import time

import httpx
import orjson
import pytest
from conftest import make_cfg

from promptbake.errors import UserError
from promptbake.generate import generate
from promptbake.io import read_jsonl

pytestmark = pytest.mark.slow
SENTINEL = "sk-SENTINEL-never-written-0123456789"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port, log, model=None):
    """llama.cpp's OpenAI-compatible server on 127.0.0.1:port, serving `model` (default: the embedded GGUF);
    returns when it answers."""
    from promptbake.model import embedded_gguf_path

    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(model or embedded_gguf_path()),
                                 "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "4096", "--verbose", "false"],
                                stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 120
    while True:
        try:
            if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"llama.cpp server did not start:\n{log.read_text()[-2000:]}")
        time.sleep(0.5)


def stop(proc):
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("llama_cpp.server", reason="llama-cpp-python[server] is installed by `make test`")
    proc, url = start_server(free_port(), tmp_path_factory.mktemp("server") / "server.log")
    yield url
    stop(proc)


def rows_of(path):
    return [r for _, r in read_jsonl(path)]


def test_api_rows_have_the_local_format(workdir, server, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", SENTINEL)
    out = generate(make_cfg(api_base_url=server, num_queries=4, temperatures=[0.7, 1.0], max_new_tokens=24,
                            prompts="builtin", samples_per_query=1, drop_loops=False))
    rows = rows_of(out)
    assert len(rows) == 8
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in rows)
    assert all(r["messages"][1]["content"].strip() for r in rows)
    meta = orjson.loads((workdir / "data" / "default.meta.json").read_bytes())
    assert meta["settings"]["backend"] == "api" and meta["status"] == "complete"
    logs = capsys.readouterr()
    assert "backend: api" in logs.out
    for f in workdir.rglob("*"):
        if f.is_file():
            assert SENTINEL.encode() not in f.read_bytes(), f
    assert SENTINEL not in logs.out + logs.err


def test_load_200_rows_at_concurrency_8(workdir, server, capsys):
    prompts = workdir / "p.txt"
    prompts.write_text("".join(f"Give me fact number {i} about the sea.\n" for i in range(100)))
    out = generate(make_cfg(api_base_url=server, prompts=str(prompts), temperatures=[0.7, 1.0], max_new_tokens=8,
                            samples_per_query=1, drop_loops=False,
                            concurrency=8))
    rows = rows_of(out)
    keys = {(r["messages"][0]["content"], r["generation"]["temperature"]) for r in rows}
    meta = orjson.loads((workdir / "data" / "default.meta.json").read_bytes())
    assert len(rows) == 200 and len(keys) == 200, meta["counts"]
    assert meta["api"]["errors"] == 0 and "retries" in meta["api"]
    assert "retries" in capsys.readouterr().out


def test_api_goes_down_mid_run_then_back(workdir, server, tmp_path):
    """Connection refused mid-run: retries, then a resumable stop with every written row kept; a rerun once
    the server is back ends with exactly the requested rows."""
    import threading

    port = free_port()
    proc, url = start_server(port, tmp_path / "s1.log")
    cfg = make_cfg(api_base_url=url, num_queries=30, temperatures=[0.7], max_new_tokens=8, concurrency=2, max_retries=2,
                   prompts="builtin", samples_per_query=1, drop_loops=False)
    data = workdir / "data" / "default.jsonl"
    errors = []

    def run():
        try:
            generate(cfg)
        except UserError as e:
            errors.append(str(e))

    t = threading.Thread(target=run)
    t.start()
    deadline = time.time() + 120
    while len(rows_of(data) if data.exists() else []) < 5 and time.time() < deadline:
        time.sleep(0.05)
    stop(proc)  # the server goes down mid-run
    t.join(timeout=120)
    assert errors and "rerun the same command to resume" in errors[0]
    written = rows_of(data)
    assert 5 <= len(written) < 30
    proc, _ = start_server(port, tmp_path / "s2.log")  # back
    try:
        generate(cfg)
    finally:
        stop(proc)
    rows = rows_of(data)
    assert len(rows) == 30 and len({r["messages"][0]["content"] for r in rows}) == 30
    assert rows[:len(written)] == written  # nothing written before was lost or rewritten


def test_readme_env_path_sends_the_requests_to_the_server(workdir, server):
    """README: copy .env.example to .env, set API_BASE_URL, run `python generate_data.py` with no flag. The real
    server must answer every row (before the fix, the local model silently did)."""
    from helpers import script

    (workdir / ".env").write_text(f"API_BASE_URL={server}\nAPI_MODEL=smol\nOPENAI_API_KEY={SENTINEL}\n")
    p = script("generate_data.py", "--num_queries", "3", "--temperatures", "0.7", "--max_new_tokens", "16",
               "--generate_queries", "3", "--samples_per_query", "1", "--drop_loops", "false", cwd=workdir,
               API_BASE_URL=None, API_MODEL=None)
    assert f"api_base_url: {server} <- $API_BASE_URL (from .env)" in p.stdout
    assert "backend: api" in p.stdout
    meta = orjson.loads((workdir / "data" / "default.meta.json").read_bytes())
    assert meta["settings"]["backend"] == "api" and meta["settings"]["model"] == "api:smol"
    assert meta["api"]["requests"] >= 3 and meta["status"] == "complete"
    assert len(rows_of(workdir / "data" / "default.jsonl")) == 3
    queries = (workdir / "data" / "default.queries.txt").read_text().splitlines()
    assert len([q for q in queries if not q.startswith("#")]) == 3  # written by the server too (or frames)
    for f in (workdir / "data").glob("*"):
        if f.is_file():
            assert SENTINEL not in f.read_text(errors="replace")
