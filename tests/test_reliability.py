"""What a careless or hostile user can do to a run, and what the project answers (the reliability issue)."""

import importlib
import subprocess
import sys
import textwrap

import httpx
import orjson
import pytest
from conftest import make_cfg
from test_train import QA, cfg_for, metrics, write_data

from promptbake import train
from promptbake.errors import UserError
from promptbake.io import read_jsonl

gen = importlib.import_module("promptbake.generate")  # the package exports the function under the same name


# ---------------------------------------------------------------- secrets
def test_password_in_the_base_url_never_reaches_wandb(workdir, tiny_model_dir, monkeypatch):
    """W&B records the command line; the URL's password and query key must not be in the offline run files."""
    write_data(workdir / "data" / "default.jsonl")
    url = "http://user:PASSWORD-123456@127.0.0.1:9/v1?key=QUERYKEY-123456"
    monkeypatch.setattr(sys, "argv", ["bake.py", "--api_base_url", url, "--wandb_mode", "offline"])
    train.bake(cfg_for(tiny_model_dir, num_epochs=1, api_base_url=url, wandb_mode="offline"))
    files = [p for p in (workdir / "checkpoints" / "default" / "wandb").rglob("*") if p.is_file()]
    assert files
    blob = b"".join(p.read_bytes() for p in files)
    assert b"PASSWORD-123456" not in blob and b"QUERYKEY-123456" not in blob


# ---------------------------------------------------------------- two runs, bad input, resume
def hold_lock(path):
    """Another process holding the run's lock, as a second `bake.py` on the same name would."""
    code = textwrap.dedent(f"""
        import sys, time
        from promptbake.locks import run_lock
        with run_lock({str(path)!r}, "bake"):
            print("held", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_bake_on_the_same_name_stops_and_names_the_first(workdir, tiny_model_dir):
    write_data(workdir / "data" / "default.jsonl")
    holder = hold_lock(workdir / "checkpoints" / "default")
    try:
        with pytest.raises(UserError, match=rf"checkpoints/default is in use by process {holder.pid} "):
            train.bake(cfg_for(tiny_model_dir, num_epochs=1))
    finally:
        holder.kill()
        holder.wait()
    assert not (workdir / "checkpoints" / "default").exists()


def test_second_generation_on_the_same_data_file_stops(workdir, tiny_model_dir):
    holder = hold_lock(workdir / "data" / "default.jsonl")
    try:
        with pytest.raises(UserError, match=rf"default.jsonl is in use by process {holder.pid} "):
            gen.generate(make_cfg(model_name_or_path=tiny_model_dir, num_queries=2, max_new_tokens=4))
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("damage", ["prompt", "data", "top_k"])
def test_a_bake_with_bad_input_leaves_the_previous_run_in_place(workdir, tiny_model_dir, damage):
    write_data(workdir / "data" / "default.jsonl")
    final = train.bake(cfg_for(tiny_model_dir, num_epochs=1))
    cfg = cfg_for(tiny_model_dir, num_epochs=1)
    if damage == "prompt":
        (workdir / "prompt.md").write_bytes(b"\xff\xfe bad bytes")
    elif damage == "data":
        with open(workdir / "data" / "default.jsonl", "a") as f:
            f.write("{broken\n")
    else:
        cfg.top_k = 60000  # over the vocabulary of 49152
    with pytest.raises(UserError):
        train.bake(cfg)
    assert (final / "adapter_model.safetensors").exists()
    assert not list((workdir / "checkpoints").glob("default-*"))  # nothing was moved aside


def interrupted_run(workdir, tiny_model_dir, **kw):
    """A 3-epoch bake killed after step 3: later checkpoints gone, metrics.jsonl holding later steps."""
    import shutil

    write_data(workdir / "data" / "default.jsonl")
    cfg = cfg_for(tiny_model_dir, num_epochs=3, save_steps=1, **kw)
    train.bake(cfg)
    run = workdir / "checkpoints" / "default"
    for p in [run / "final", *(p for p in run.glob("step-*") if int(p.name.split("-")[1]) > 3)]:
        shutil.rmtree(p)
    return cfg, run


def test_resume_logs_each_step_once(workdir, tiny_model_dir):
    cfg, run = interrupted_run(workdir, tiny_model_dir, wandb_mode="offline")
    cfg.resume = True
    train.bake(cfg)
    steps = [r["step"] for r in metrics(run) if "train/kl" in r]
    assert steps == list(range(1, 10))  # each step once: the interrupted run's 4..9 were cut before resuming
    assert sum("eval/kl_full_before" in r for r in metrics(run)) == 1
    runs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({p.name.rsplit("-", 1)[1] for p in runs}) == 1  # the same W&B run, continued


def test_resume_refuses_changed_settings_that_change_the_math(workdir, tiny_model_dir):
    cfg, run = interrupted_run(workdir, tiny_model_dir)
    cfg.resume, cfg.learning_rate, cfg.log_every = True, 5e-3, 2  # log_every may change, learning_rate may not
    with pytest.raises(UserError, match=r"--resume: learning_rate differ from .*step-3's settings"):
        train.bake(cfg)
    assert (run / "step-3").exists() and not (run / "final").exists()


def test_resume_refuses_a_changed_prompt(workdir, tiny_model_dir):
    cfg, run = interrupted_run(workdir, tiny_model_dir)
    (workdir / "prompt.md").write_text("You are a cowboy.")
    cfg.resume = True
    with pytest.raises(UserError, match="default: the system prompt differ"):
        train.bake(cfg)


def test_damaged_trainer_state_is_one_line(workdir, tiny_model_dir):
    cfg, run = interrupted_run(workdir, tiny_model_dir)
    (run / "step-3" / "trainer_state.pt").write_bytes(b"not a torch file")
    cfg.resume = True
    with pytest.raises(UserError, match=r"step-3: the checkpoint is damaged .*delete that folder"):
        train.bake(cfg)


def test_damaged_adapter_is_one_line(workdir, tiny_model_dir):
    from promptbake.baked import load_baked

    write_data(workdir / "data" / "default.jsonl")
    final = train.bake(cfg_for(tiny_model_dir, num_epochs=1))
    weights = final / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(UserError, match="the adapter does not load"):
        load_baked(final)


# ---------------------------------------------------------------- generation
def test_a_huge_system_prompt_is_refused_before_generation(workdir, tiny_model_dir):
    (workdir / "prompt.md").write_text("Speak like a pirate. " * 4000)  # about 20k tokens
    with pytest.raises(UserError, match=r"prompt.md: the system prompt is \d+ tokens, over max_prompt_tokens=4096"):
        gen.generate(make_cfg(model_name_or_path=tiny_model_dir, num_queries=2, max_new_tokens=4))
    assert not (workdir / "data" / "default.jsonl").exists()


def test_a_run_that_writes_no_rows_fails(workdir, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(gen, "decode_response", lambda tokenizer, ids: "   ")
    with pytest.raises(UserError, match="no rows were written"):
        gen.generate(make_cfg(model_name_or_path=tiny_model_dir, num_queries=2, max_new_tokens=4))
    meta = orjson.loads((workdir / "data" / "default.meta.json").read_bytes())
    assert meta["status"] == "incomplete" and meta["counts"]["written"] == 0


def test_reported_count_is_the_count_on_disk(workdir, tiny_model_dir, capsys):
    """A complete last row without its newline is kept by the appender, and the summary counts the file."""
    cfg = make_cfg(model_name_or_path=tiny_model_dir, num_queries=2, temperatures=[0.7, 1.0], max_new_tokens=4,
                   samples_per_query=1, drop_loops=False)
    out = gen.generate(cfg)
    lines = out.read_bytes().rstrip(b"\n").split(b"\n")
    out.write_bytes(b"\n".join(lines[:3]))  # 3 complete rows, the last without "\n"; row 4 to redo
    gen.generate(cfg)
    assert len(read_jsonl(out)) == 4
    assert "wrote data/default.jsonl: 4/4 rows" in capsys.readouterr().out
    assert orjson.loads((workdir / "data" / "default.meta.json").read_bytes())["status"] == "complete"


def test_data_dir_that_is_a_file(workdir, tiny_model_dir):
    (workdir / "somefile").write_text("x")
    with pytest.raises(UserError, match="--data_dir somefile is a file"):
        gen.generate(make_cfg(model_name_or_path=tiny_model_dir, data_dir="somefile"))


def test_api_query_writer_and_answers_share_one_client(workdir, monkeypatch):
    """--generate_queries through an API: one HTTP client and one event loop for queries and answers alike."""
    clients = []
    real = gen.ChatClient

    def handler(request):
        body = orjson.loads(request.content)
        n = len(body["messages"])
        text = "Arr, a fine answer." if n > 1 else f"What is the best ship for a voyage number {len(clients)}-{id(body)}?"
        return httpx.Response(200, json={"choices": [{"message": {"content": text}, "finish_reason": "stop"}]})

    def counting_client(*a, **k):
        clients.append(1)
        return real(*a, transport=httpx.MockTransport(handler), **k)

    monkeypatch.setattr(gen, "ChatClient", counting_client)
    out = gen.generate(make_cfg(api_base_url="http://127.0.0.1:9/v1", generate_queries=5, temperatures=[0.7],
                                samples_per_query=1))
    assert len(clients) == 1 and len(read_jsonl(out)) == 5


def test_evaluate_with_a_missing_queries_file(workdir, tiny_model_dir):
    from promptbake.evaluate import evaluate

    write_data(workdir / "data" / "default.jsonl", QA)
    final = train.bake(cfg_for(tiny_model_dir, num_epochs=1))
    with pytest.raises(UserError, match="nope.txt: queries file not found"):
        evaluate(cfg_for(tiny_model_dir), str(final), queries="nope.txt")
