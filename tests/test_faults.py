"""Faults lose nothing: kill -9 at every stage, a full disk, a 429 storm, secrets in every artifact."""

import asyncio
import errno
import json
import shutil
from pathlib import Path

import httpx
import orjson
import pytest
from conftest import make_cfg
from helpers import kill_when, script

from promptbake import api_client, io
from promptbake.errors import UserError
from promptbake.io import read_jsonl

SENTINEL = "sk-SENTINEL-never-written-0123456789"


def lines(path):
    return [r for _, r in read_jsonl(path)] if Path(path).exists() else []


def write_pairs(path, n):
    path.write_text("".join(orjson.dumps({"messages": [{"role": "user", "content": f"Question {i} about ships?"},
                                                       {"role": "assistant", "content": f"Arr! Answer {i}, matey. " * 3}]}
                                         ).decode() + "\n" for i in range(n)))


@pytest.mark.slow
def test_kill_during_generation_then_rerun(workdir, tiny_model_dir):
    args = ["--model_name_or_path", tiny_model_dir, "--num_queries", 40, "--temperatures", "0.7,1.0",
            "--max_new_tokens", 12, "--gen_batch_size", 4,
            "--samples_per_query", 1, "--drop_loops", "false"]
    data = workdir / "data" / "default.jsonl"
    kill_when("generate_data.py", *args, cwd=workdir, ready=lambda: len(lines(data)) >= 10)
    n_before = len(lines(data))
    assert 10 <= n_before < 80
    script("generate_data.py", *args, cwd=workdir)
    rows = lines(data)
    keys = {(r["messages"][0]["content"], r["generation"]["temperature"]) for r in rows}
    assert len(rows) == 80 and len(keys) == 80


@pytest.mark.slow
def test_kill_during_teacher_cache_then_rerun(workdir, tiny_model_dir):
    write_pairs(workdir / "data" / "default.jsonl", 400)  # 7 shards of 64 rows
    args = ["--model_name_or_path", tiny_model_dir, "--num_epochs", 1, "--teacher_batch_size", 2, "--top_k", 4,
            "--wandb_mode", "disabled", "--verify_queries", 0]
    cache = workdir / "data" / "cache"
    kill_when("bake.py", *args, cwd=workdir, ready=lambda: len(list(cache.glob("*/shard-*.safetensors"))) >= 2)
    (key_dir,) = cache.iterdir()
    done = sorted(key_dir.glob("shard-*.safetensors"))
    assert 2 <= len(done) < 7
    victim = done[0]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # as if torn by the crash
    out = script("bake.py", *args, cwd=workdir).stdout
    assert "corrupt or truncated; rebuilding" in out and "resuming" in out, out
    assert (workdir / "checkpoints" / "default" / "final" / "adapter_model.safetensors").exists()
    # the rebuilt cache equals one built from scratch
    resumed = {p.name: p.read_bytes() for p in key_dir.glob("shard-*.safetensors")}
    shutil.rmtree(cache)
    script("bake.py", *args, cwd=workdir)
    assert {p.name: p.read_bytes() for p in key_dir.glob("shard-*.safetensors")} == resumed  # byte for byte


@pytest.mark.slow
def test_kill_during_training_then_resume(workdir, tiny_model_dir):
    write_pairs(workdir / "data" / "default.jsonl", 40)
    args = ["--model_name_or_path", tiny_model_dir, "--num_epochs", 3, "--batch_size", 4, "--save_steps", 2,
            "--top_k", 4, "--wandb_mode", "disabled", "--verify_queries", 0]
    run = workdir / "checkpoints" / "default"
    kill_when("bake.py", *args, cwd=workdir, ready=lambda: (run / "step-4" / "trainer_state.pt").exists())
    kept = {p.name: (p / "adapter_model.safetensors").read_bytes() for p in run.glob("step-*")}
    assert not (run / "final").exists()
    out = script("bake.py", *args, "--resume", cwd=workdir).stdout
    assert "resumed from" in out
    metrics = [r for _, r in read_jsonl(run / "metrics.jsonl") if "train/kl" in r]
    import re

    total = int(re.search(r"resumed from \S+ at step \d+/(\d+)", out).group(1))
    train_rows = int(re.search(r"(\d+) train rows", out).group(1))
    assert 30 <= train_rows < 40  # the hash split holds out about a tenth of the 40 queries
    assert metrics[-1]["step"] == total == 3 * -(-train_rows // 4)  # ceil(train rows / batch) steps x 3 epochs
    for name, blob in kept.items():
        assert (run / name / "adapter_model.safetensors").read_bytes() == blob  # earlier checkpoints intact
    assert (run / "final" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_kill_during_conversion_then_rerun(tmp_path):
    cache = tmp_path / "cache"
    code = "from promptbake.model import resolve_model_path; print(resolve_model_path('embedded'))"
    import subprocess
    import sys

    from helpers import ROOT, env

    p = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env(PROMPTBAKE_CACHE=str(cache)),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    import time

    deadline = time.time() + 300
    while not any(cache.glob(".*.tmp/*")) and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    p.kill()
    p.wait()
    assert not (cache / "SmolLM2-135M-Instruct-fp32").exists()  # nothing half-written is trusted
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env(PROMPTBAKE_CACHE=str(cache)),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "converting the embedded model" in done.stdout
    assert (cache / "SmolLM2-135M-Instruct-fp32" / "model.safetensors").exists()
    assert not list(cache.glob(".*.tmp"))


def test_disk_full_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "meta.json"
    io.write_json(target, {"old": True})

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io.os, "fsync", full)
    with pytest.raises(UserError, match=r"could not write .*meta.json: No space left on device; the previous file"):
        io.write_json(target, {"new": True})
    assert json.loads(target.read_text()) == {"old": True}
    assert list(tmp_path.iterdir()) == [target]  # no temp file left behind
    with pytest.raises(UserError, match="could not append to .*rows written so far are kept"):
        with io.JsonlAppender(tmp_path / "d.jsonl") as w:
            w.write({"a": 1})


def test_429_storm_respects_retry_after_and_progresses(monkeypatch):
    waits, calls = [], []

    async def fake_sleep(s):
        waits.append(s)

    monkeypatch.setattr(api_client.asyncio, "sleep", fake_sleep)

    def handler(request):
        calls.append(1)
        if len(calls) % 3:  # two of every three requests are rate limited
            return httpx.Response(429, headers={"Retry-After": "2"}, json={"error": "slow down"})
        return httpx.Response(200, json={"choices": [{"message": {"content": "Arr!"}, "finish_reason": "stop"}]})

    async def go():
        client = api_client.ChatClient("http://t/v1", "m", concurrency=4, max_retries=10,
                                       transport=httpx.MockTransport(handler))
        results = await asyncio.gather(*[client.chat([{"role": "user", "content": str(i)}]) for i in range(20)])
        await client.aclose()
        return results, client.stats

    results, stats = asyncio.run(go())
    assert len(results) == 20 and all(r.content == "Arr!" for r in results)
    assert stats.retries == len(calls) - 20 and set(waits) == {2.0}


def test_sentinel_key_never_reaches_artifacts(workdir, tiny_model_dir, monkeypatch, capsys):
    for var in ("OPENAI_API_KEY", "OPENROUTER_API_KEY", "WANDB_API_KEY"):
        monkeypatch.setenv(var, SENTINEL)
    from promptbake.generate import generate
    from promptbake.stages import bake  # as bake.py runs it: report.html is checked too

    cfg = make_cfg(model_name_or_path=tiny_model_dir, num_queries=6, temperatures=[0.7], max_new_tokens=8,
                   num_epochs=1, batch_size=2, eval_fraction=0.34, wandb_mode="offline", top_k=4)
    generate(cfg)
    bake(cfg)
    logs = capsys.readouterr()
    checked = 0
    for f in workdir.rglob("*"):
        if f.is_file():
            checked += 1
            assert SENTINEL.encode() not in f.read_bytes(), f
    (wandb_file,) = workdir.glob("checkpoints/default/wandb/offline-run-*/*.wandb")
    assert checked >= 10 and b"train/kl" in wandb_file.read_bytes()  # the offline W&B run recorded the metrics
    assert SENTINEL not in logs.out + logs.err
