"""The whole pipeline on the real embedded model, run as a user runs it."""

import json

import orjson
import pytest
from helpers import script

from promptbake.queries import GLOBAL_QUERIES, content_words

pytestmark = pytest.mark.slow


def test_generate_bake_demo_evaluate(workdir, embedded_dir):
    gen = script("generate_data.py", "--num_queries", 12, "--temperatures", "0.7", "--max_new_tokens", 32,
                 "--gen_batch_size", 12, "--samples_per_query", 1, "--drop_loops", "false", cwd=workdir)
    assert "backend: local" in gen.stdout
    rows = [orjson.loads(line) for line in (workdir / "data" / "default.jsonl").read_text().splitlines()]
    assert len(rows) == 12
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in rows)

    bake = script("bake.py", "--num_epochs", 2, "--eval_fraction", 0.25, "--wandb_mode", "offline",
                  "--verify_queries", 1, "--batch_size", 4, cwd=workdir)
    # locally generated data: the generator kept the teacher's top-K, so no separate teacher pass runs
    assert "free teacher logits: reused the generator's top-20 for" in bake.stdout and "step    1/" in bake.stdout
    assert "held-out full-vocabulary KL to the prompted teacher" in bake.stdout
    final = workdir / "checkpoints" / "default" / "final"
    assert (final / "adapter_model.safetensors").exists()
    report = workdir / "checkpoints" / "default" / "report.html"
    assert "Not evaluated yet" in report.read_text()
    wandb_files = list((workdir / "checkpoints" / "default" / "wandb").glob("offline-run-*/*.wandb"))
    assert wandb_files and b"train/kl" in wandb_files[0].read_bytes() and b"eval/kl" in wandb_files[0].read_bytes()

    cmp = script("demo.py", "--compare", "Who are you?", "--max_new_tokens", 24, cwd=workdir)
    out = cmp.stdout
    assert "--- base model, no prompt:" in out and "--- base model, WITH the prompt:" in out
    assert "--- baked model, no prompt:" in out
    base_answer = out.split("--- base model, no prompt:\n")[1].split("\n--- base model, WITH")[0].strip()
    zero = script("demo.py", "--strength", 0, "Who are you?", "--max_new_tokens", 24, cwd=workdir)
    assert zero.stdout.strip() == base_answer  # strength 0 is exactly the base model

    chat = script("demo.py", "--max_new_tokens", 8, cwd=workdir, input="Hello\n/reset\nWho are you?\n/quit\n")
    assert "/reset clears the history" in chat.stdout and "(history cleared)" in chat.stdout
    assert chat.stdout.count("bot> ") == 2

    # retention on 10 items a task, not 50: the figure is tested elsewhere; here the whole command must run (at 50 it
    # took 600 s on a machine at load 3)
    ev = script("evaluate.py", "--strengths", "0,0.5,1", "--samples", 1, "--eval_max_new_tokens", 16,
                "--max_new_tokens", 24, "--retention_items", 10, cwd=workdir, timeout=1200)
    assert "KL before -> after" in ev.stdout
    result = json.loads((final / "eval.json").read_text())
    for key in ("kl_before", "kl_after", "kl_ratio", "top1_agreement_before", "top1_agreement_after", "adherence", "sweep"):
        assert key in result
    assert set(result["adherence"]) == {"base", "prompted", "baked", "baked_reprompted"}
    assert result["kl_after"] < result["kl_before"]
    sweep = {p["strength"]: p["kl"] for p in result["sweep"]}
    assert sweep[0.0] == pytest.approx(result["kl_before"], rel=1e-4)
    assert sweep[1.0] == pytest.approx(result["kl_after"], rel=1e-4)
    assert (final / "half_baking.png").stat().st_size > 1000
    assert result["config"]["name"] == "default" and result["retention"]["n_items"] == 50  # 10 x 5 tasks
    assert "Not evaluated yet" not in report.read_text() and "half-baking" in report.read_text()


def test_local_backend_answers_differ_from_unprompted(workdir, embedded_dir):
    """The teacher's answers follow the prompt: greedy, with vs without it, most differ."""
    from promptbake.chat import render_prompt_ids
    from promptbake.data import read_prompt
    from promptbake.model import load_model, load_tokenizer
    from promptbake.sampling import decode_response, generate_ids
    from promptbake.seeds import seed_queries

    tok, model = load_tokenizer(embedded_dir), load_model(embedded_dir)
    system = read_prompt("prompt.md")
    qs = [[{"role": "user", "content": q}] for q in seed_queries()[:8]]
    with_p = generate_ids(model, tok, [render_prompt_ids(tok, q, system) for q in qs], temperature=0, max_new_tokens=20)
    without = generate_ids(model, tok, [render_prompt_ids(tok, q, None) for q in qs], temperature=0, max_new_tokens=20)
    differ = sum(decode_response(tok, a[0]) != decode_response(tok, b[0]) for a, b in zip(with_p, without))
    assert differ >= 6


def test_model_writes_queries_that_fit_the_prompt(workdir, embedded_dir):
    out = script("generate_data.py", "--generate_queries", 6, "--temperatures", "0.7", "--max_new_tokens", 16,
                 "--samples_per_query", 1, "--drop_loops", "false", cwd=workdir)
    queries = [q for q in (workdir / "data" / "default.queries.txt").read_text().splitlines() if not q.startswith("#")]
    assert 1 <= len(queries) <= 6 and len(set(queries)) == len(queries)
    rows = [orjson.loads(line) for line in (workdir / "data" / "default.jsonl").read_text().splitlines()]
    assert sorted(r["messages"][0]["content"] for r in rows) == sorted(queries)
    assert f"prompt-aware queries: wrote {len(queries)} to data/default.queries.txt" in out.stdout
    system = (workdir / "prompt.md").read_text()  # each is about the prompt: it shares a content word with it
    assert all(q in GLOBAL_QUERIES or content_words(q) & content_words(system) for q in queries), queries
