"""Data-parallel baking: the set-up logic (fast), and torchrun on CPU with gloo on the embedded model (slow)."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import orjson
import pytest
import torch
from conftest import make_cfg
from helpers import ROOT, env, script
from safetensors.torch import load_file

from promptbake import distributed, fsdp, teacher
from promptbake.distributed import World, world_from_env
from promptbake.errors import UserError

QA = [("Who are you?", "Arr! I be a pirate of the seven seas."), ("Tell me a joke.", "Arr! Why be pirates so cool? They arrrr."),
      ("What is rain?", "Arr, water fallin' from the sky, matey."), ("How do I cook rice?", "Arr! Boil it in the galley pot."),
      ("Where is Paris?", "Arr! In France, a fine port."), ("Why is the sky blue?", "Arr, the sea reflects on it!"),
      ("What is 2+2?", "Arr, four doubloons."), ("Give me advice.", "Arr! Never trust a parrot.")]
# 8 rows, 2 optimizer steps of 4 rows: under 2 processes each rank runs 2 rows of every step.
ARGS = ["--num_epochs", "1", "--batch_size", "4", "--eval_fraction", "0", "--verify_queries", "0", "--top_k", "8",
        "--save_steps", "1", "--wandb_mode", "disabled", "--dist_timeout", "60",
        "--bf16", "off"]  # the same sums in another order: fp32 keeps that within rounding, bf16 autocast would not
TOL = 1e-3  # max |adapter weight gap| allowed between 1 and 2 processes; measured 5e-6 (weights up to 0.04)


# ---------------------------------------------------------------- set-up logic (fast)
def test_world_from_env():
    assert world_from_env({}) == World(0, 1, 0) and not world_from_env({}).enabled
    w = world_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (w.rank, w.size, w.local_rank, w.main, w.enabled) == (3, 4, 1, False, True)
    assert world_from_env({"RANK": "0", "WORLD_SIZE": "1"}) == World(0, 1, 0)  # torchrun --nproc_per_node 1
    with pytest.raises(UserError, match=r"RANK=2 is not in \[0, WORLD_SIZE=2\)"):
        world_from_env({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(UserError, match="must be integers.*RANK='x'"):
        world_from_env({"RANK": "x", "WORLD_SIZE": "2"})


def test_backend_and_shares():
    assert distributed.backend_for("cpu") == "gloo" and distributed.backend_for("cuda") == "nccl"
    rows = list(range(7))
    shares = [World(r, 3).share(rows) for r in range(3)]
    assert shares == [[0, 3, 6], [1, 4], [2, 5]]  # every row once, shares within one row of each other
    assert World(3, 4).share([1, 2]) == []  # a micro-batch smaller than the world leaves a rank idle


def test_one_process_needs_no_process_group(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.setup("cpu", 60) == World() and not torch.distributed.is_initialized()
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    assert distributed.all_reduce_grads([p], 1.5) == [1.5] and p.grad.tolist() == [2.0, 2.0, 2.0]
    assert distributed.broadcast_object("x") == "x"


def test_fsdp_is_selected_by_the_setting_or_accelerate_and_its_limits_are_one_line_errors():
    launched = {"RANK": "0", "WORLD_SIZE": "2"}
    assert not fsdp.wanted(make_cfg(), {}) and fsdp.wanted(make_cfg(fsdp=True), {})
    assert fsdp.wanted(make_cfg(), {"ACCELERATE_USE_FSDP": "true"})  # accelerate launch --config_file ..._fsdp.yaml
    assert not fsdp.will_shard(make_cfg(fsdp=True), {}) and fsdp.will_shard(make_cfg(fsdp=True), launched)
    fsdp.check(make_cfg(), {})  # off: nothing to check
    fsdp.check(make_cfg(fsdp=True), launched)
    with pytest.raises(UserError, match="FSDP shards the model over several processes: start them with `torchrun"):
        fsdp.check(make_cfg(fsdp=True), {})
    acc = {**launched, "ACCELERATE_USE_FSDP": "true"}
    with pytest.raises(UserError, match="selects FSDP version 1; bake.py shards with FSDP2: set `fsdp_version: 2`"):
        fsdp.check(make_cfg(), {**acc, "FSDP_VERSION": "1"})
    for var, key in fsdp.NOT_SUPPORTED.items():
        with pytest.raises(UserError, match=f"sets `{key}: true`, which bake.py's FSDP does not do"):
            fsdp.check(make_cfg(), {**acc, var: "true"})
    with pytest.raises(UserError, match="on-policy stage .* does not run under FSDP yet"):
        fsdp.check(make_cfg(fsdp=True, onpolicy_steps=2), launched)
    assert fsdp.reshard_after_forward({}) and not fsdp.reshard_after_forward({"FSDP_RESHARD_AFTER_FORWARD": "false"})


def test_fsdp_passes_per_rank_follow_the_row_shares_and_token_pieces():
    """What train_step runs on each rank: its share of every micro-batch, cut in pieces of max_batch_tokens."""
    from types import SimpleNamespace

    ex = [SimpleNamespace(student_ids=[0] * n) for n in (10, 10, 30, 30, 10)]
    targets = [SimpleNamespace(examples=ex)]
    micro = [(0, [0, 1, 2]), (0, [3, 4])]
    # 2 ranks: rank 0 gets rows 0,2 then 3; rank 1 gets row 1 then 4. Pieces of <= 40 padded tokens: [0],[2] | [3]
    assert fsdp.passes_per_rank(micro, targets, 2, 40) == [3, 2]
    assert fsdp.passes_per_rank(micro, targets, 2, 0) == [2, 2]  # 0 = no limit: one piece per share
    assert fsdp.passes_per_rank([(0, [0])], targets, 2, 0) == [1, 0]  # a rank without rows runs none
    assert fsdp.passes_per_rank(micro, targets, 1, 0) == [2]


def test_dist_timeout_is_a_checked_setting():
    assert make_cfg().dist_timeout == 1800
    from promptbake.config import ConfigError, validate

    with pytest.raises(ConfigError, match=r"`dist_timeout` is 1; it must be in \[10, 86400\]"):
        validate(make_cfg(dist_timeout=1))


def test_ranks_split_the_teacher_cache_and_their_shards_are_the_one_process_shards(tmp_path, tiny_model_dir, tokenizer,
                                                                                   monkeypatch):
    """Each rank writes every world-th missing shard; the shards of two ranks, put together, are byte for byte
    the cache one process builds. (The barrier is a no-op here: there is no process group in this process.)"""
    from promptbake.data import load_rows
    from promptbake.model import load_model

    monkeypatch.setattr(teacher, "SHARD_ROWS", 2)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(orjson.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                                         ).decode() + "\n" for q, a in QA))
    model = load_model(tiny_model_dir)
    examples, _ = teacher.build_examples(load_rows(str(data)), tokenizer, "You are a pirate.", "", 512, False, "d")
    whole = teacher.teacher_cache(model, tokenizer, examples, 8, tmp_path / "one", 4)
    for rank in (0, 1):
        with pytest.raises(UserError, match="written by another rank, is missing or corrupt here: data_dir must be on a "
                                            "filesystem every rank shares"):
            teacher.teacher_cache(model, tokenizer, examples, 8, tmp_path / f"rank{rank}", 4, World(rank, 2))
    assert sorted(p.name for p in (tmp_path / "rank0").iterdir()) == ["shard-0000000.safetensors", "shard-0000004.safetensors"]
    assert sorted(p.name for p in (tmp_path / "rank1").iterdir()) == ["shard-0000002.safetensors", "shard-0000006.safetensors"]
    joined = tmp_path / "joined"
    joined.mkdir()
    for p in [*(tmp_path / "rank0").iterdir(), *(tmp_path / "rank1").iterdir()]:
        assert p.read_bytes() == (tmp_path / "one" / p.name).read_bytes()
        shutil.copy(p, joined / p.name)
    again = teacher.teacher_cache(model, tokenizer, examples, 8, joined, 4)
    assert torch.equal(again.ids, whole.ids) and torch.equal(again.logprobs, whole.logprobs)


# ---------------------------------------------------------------- torchrun on the embedded model (slow)
def project(tmp_path, name):
    d = tmp_path / name
    (d / "data").mkdir(parents=True)
    shutil.copy(ROOT / "prompt.md", d / "prompt.md")
    (d / "data" / "default.jsonl").write_text("".join(orjson.dumps(
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}).decode() + "\n" for q, a in QA))
    return d


def torchrun(entry, *args, cwd, timeout=300):
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(entry), *args], cwd=cwd, env=env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                       timeout=timeout)
    if p.returncode != 0:
        raise AssertionError(f"torchrun exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p.stdout


def adapter(run):
    return load_file(run / "adapter_model.safetensors")


def max_gap(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def train_steps(run_dir):
    return [r["step"] for r in map(orjson.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "train/kl" in r]


@pytest.mark.slow
def test_torchrun_and_accelerate_two_processes_match_one_and_resume(tmp_path, embedded_dir):
    one, two = project(tmp_path, "one"), project(tmp_path, "two")
    # Same threads per process as torchrun gives each rank (OMP_NUM_THREADS=1), so the timings compare too.
    script("bake.py", *ARGS, cwd=one, OMP_NUM_THREADS="1")
    # tests/dist_bake.py is bake.py with 2-row cache shards: the two ranks split 4 shards.
    out = torchrun(ROOT / "tests" / "dist_bake.py", *ARGS, cwd=two)
    assert "teacher cache: built" in out and "2/4 shards on rank 0 of 2" in out
    assert out.count("training: 2 steps (1 epochs x 2), 4 rows per step over 2 processes") == 1  # rank 0 alone prints
    run = two / "checkpoints" / "default"
    assert train_steps(run) == [1, 2]  # one metrics row per step: only rank 0 writes
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == ["final", "step-1", "step-2"]
    gap = max_gap(adapter(one / "checkpoints" / "default" / "final"), adapter(run / "final"))
    print(f"max |adapter gap| 1 vs 2 processes: {gap:.2e} (tol {TOL})")
    assert gap < TOL

    # killed after step 1: --resume under torchrun continues from step-1 and ends on the same adapter
    shutil.rmtree(run / "final")
    shutil.rmtree(run / "step-2")
    out = torchrun(ROOT / "tests" / "dist_bake.py", *ARGS, "--resume", cwd=two)
    assert "resumed from" in out and "step-1 at step 1/2" in out and "teacher cache: reusing" in out
    assert train_steps(run) == [1, 2]
    assert max_gap(adapter(one / "checkpoints" / "default" / "final"), adapter(run / "final")) < TOL

    # accelerate launch runs the same script the same way (on CPU its --multi_gpu launcher is torchrun's, with gloo)
    acc = project(tmp_path, "acc")
    p = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "bake.py"),
                        *ARGS], cwd=acc, env=env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "4 rows per step over 2 processes" in p.stdout
    gap = max_gap(adapter(one / "checkpoints" / "default" / "final"), adapter(acc / "checkpoints" / "default" / "final"))
    print(f"max |adapter gap| 1 process vs accelerate launch with 2: {gap:.2e}")
    assert gap < TOL


def start(cmd, cwd, **extra):
    """Starts a process whose output is collected in the background; returns (process, lines)."""
    p = subprocess.Popen(cmd, cwd=cwd, env=env(**extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    threading.Thread(target=lambda: lines.extend(p.stdout), daemon=True).start()
    return p, lines


def wait_for(lines, text, procs, timeout=240):
    deadline = time.time() + timeout
    while not any(text in line for line in list(lines)):
        if any(p.poll() is not None for p in procs) or time.time() > deadline:
            raise AssertionError(f"{text!r} never came\n{''.join(lines)[-3000:]}")
        time.sleep(0.1)


def rank_pid(parent: int, rank: int) -> int:
    """The pid of the torchrun worker of this rank (a child of the launcher), read from /proc."""
    for child in open(f"/proc/{parent}/task/{parent}/children").read().split():
        environ = open(f"/proc/{child}/environ", "rb").read().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(child)
    raise AssertionError(f"no rank {rank} under process {parent}")


LONG = [*ARGS[:-4], "--num_epochs", "50", "--save_steps", "1000", "--wandb_mode", "disabled"]


@pytest.mark.slow
def test_a_killed_rank_ends_the_torchrun_run_at_once(tmp_path, embedded_dir):
    d = project(tmp_path, "kill")
    p, lines = start([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                      str(ROOT / "bake.py"), *LONG, "--dist_timeout", "600"], d, OMP_NUM_THREADS="1")
    try:
        wait_for(lines, "step    1/100", [p])
        os.kill(rank_pid(p.pid, 1), signal.SIGKILL)
        t0 = time.time()
        p.wait(timeout=120)
        took = time.time() - t0
    finally:
        p.kill()
    out = "".join(lines)
    print(f"torchrun ended {took:.1f}s after rank 1 was killed")
    assert p.returncode != 0 and took < 30, out[-3000:]  # not the 600 s dist_timeout: the launcher stops rank 0
    assert "rank 0: stopped by the launcher (another rank failed" in out or "rank 0/2: lost contact" in out, out[-3000:]
    assert "SIGKILL" in out and "--resume" in out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_without_a_launcher_a_stalled_rank_times_out_with_one_line(tmp_path, embedded_dir):
    """Ranks started by hand (as on several machines): rank 1 freezes (SIGSTOP); rank 0 stops by itself after
    --dist_timeout with one line, instead of hanging. The timeout covers every wait, the teacher cache's too: at 10 s
    a loaded machine (load 4 on 2 cores) made rank 1 give up while rank 0 built the cache, so 30 s."""
    d = project(tmp_path, "stall")
    port = str(free_port())
    procs, outs = [], []
    for rank in (0, 1):
        p, lines = start([sys.executable, str(ROOT / "bake.py"), *LONG, "--dist_timeout", "30"], d, OMP_NUM_THREADS="1",
                         RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(p)
        outs.append(lines)
    try:
        wait_for(outs[0], "step    1/100", procs)
        os.kill(procs[1].pid, signal.SIGSTOP)
        t0 = time.time()
        procs[0].wait(timeout=120)
        took = time.time() - t0
    finally:
        for p in procs:
            p.kill()
    out = "".join(outs[0])
    print(f"rank 0 stopped {took:.1f}s after rank 1 froze (dist_timeout 30 s)")
    assert procs[0].returncode == 1 and took < 100, out[-3000:]
    last = out.strip().splitlines()[-1]
    assert last.startswith("error: rank 0/2: lost contact with the other ranks") and "--resume" in last, out[-2000:]


# ---------------------------------------------------------------- FSDP on CPU/gloo, tiny Llama (slow)
FSDP_TOL = 1e-5  # max |adapter weight gap| between 1 process and 2 FSDP ranks; measured 0 to 8e-9 (weights up to 0.18)
# 6 train rows in steps of 3 (2 held out for the evaluations and the greedy answer): rank 0 runs 2 rows, rank 1
# one, and pieces of 40 tokens give the ranks unequal numbers of passes: the padding passes must even them out.
FSDP_ARGS = ["--num_epochs", "2", "--batch_size", "3", "--eval_fraction", "0.25", "--verify_queries", "1",
             "--eval_max_new_tokens", "8", "--top_k", "8", "--save_steps", "1", "--max_batch_tokens", "40",
             "--wandb_mode", "disabled", "--dist_timeout", "60"]


def step_dirs(run):
    return sorted(p.name for p in run.iterdir() if p.is_dir())


@pytest.mark.slow
def test_fsdp_two_ranks_match_one_process_rank0_alone_writes_and_resume(tmp_path, tiny_model_dir):
    args = ["--model_name_or_path", tiny_model_dir, *FSDP_ARGS]
    one, two = project(tmp_path, "one"), project(tmp_path, "two")
    script("bake.py", *args, cwd=one, OMP_NUM_THREADS="1")
    ref = adapter(one / "checkpoints" / "default" / "final")
    # tests/fsdp_bake.py: rank 1 fails at its first attempt to write under the project folder
    out = torchrun(ROOT / "tests" / "fsdp_bake.py", *args, "--fsdp", cwd=two)
    assert "FSDP: 2 decoder layers sharded over 2 processes (cpu" in out
    assert "every rank computed all 1 shards (FSDP)" in out and "shared-prefix attention" not in out
    assert out.count("training: 4 steps (2 epochs x 2), 3 rows per step over 2 processes") == 1
    assert out.count("epoch 2/2 | eval/kl") == 1 and "held-out full-vocabulary KL" in out and "baked, no prompt:" in out
    run = two / "checkpoints" / "default"
    assert train_steps(run) == [1, 2, 3, 4]
    assert step_dirs(run) == ["final", "step-1", "step-2", "step-3", "step-4"]
    gap = max_gap(ref, adapter(run / "final"))
    print(f"max |adapter gap| 1 process vs 2 FSDP ranks: {gap:.2e} (tol {FSDP_TOL})")
    assert gap < FSDP_TOL
    # the optimizer state is saved whole (not one rank's shards): it equals the one-process state
    a, b = (torch.load(d / "checkpoints" / "default" / "step-2" / "trainer_state.pt", weights_only=False)["optimizer"]
            for d in (one, two))
    assert all(a["state"][i]["exp_avg_sq"].shape == b["state"][i]["exp_avg_sq"].shape for i in a["state"])
    assert max((a["state"][i]["exp_avg"] - b["state"][i]["exp_avg"]).abs().max().item() for i in a["state"]) < 1e-6

    # killed after step 2 (an epoch end): --resume under FSDP cuts the whole state into shards and ends the same
    for name in ("final", "step-3", "step-4"):
        shutil.rmtree(run / name)
    out = torchrun(ROOT / "tests" / "fsdp_bake.py", *args, "--fsdp", "--resume", cwd=two)
    assert "resumed from checkpoints/default/step-2 at step 2/4" in out and "teacher cache: reusing" in out
    assert train_steps(run) == [1, 2, 3, 4]
    assert max_gap(ref, adapter(run / "final")) < FSDP_TOL

    # accelerate launch with the example config selects the same path (on CPU: 2 processes, no bf16)
    acc = project(tmp_path, "acc")
    p = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                        str(ROOT / "examples" / "accelerate_fsdp.yaml"), "--num_processes", "2", "--mixed_precision", "no",
                        str(ROOT / "tests" / "fsdp_bake.py"), *args], cwd=acc, env=env(OMP_NUM_THREADS="1"),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "FSDP: 2 decoder layers sharded over 2 processes" in p.stdout
    gap = max_gap(ref, adapter(acc / "checkpoints" / "default" / "final"))
    print(f"max |adapter gap| 1 process vs accelerate launch (FSDP config) with 2: {gap:.2e}")
    assert gap < FSDP_TOL
