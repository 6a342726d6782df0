import orjson
import pytest
import torch
from conftest import make_cfg

from promptbake.errors import UserError
from promptbake.generate import generate, write_queries
from promptbake.io import read_jsonl


def rows_of(path):
    return [r for _, r in read_jsonl(path)]


def test_local_backend_writes_rows_without_system_and_resumes(workdir, tiny_model_dir, capsys):
    cfg = make_cfg(model_name_or_path=tiny_model_dir, num_queries=4, temperatures=[0.7, 1.0], max_new_tokens=8,
                   gen_batch_size=3)
    out = generate(cfg)
    rows = rows_of(out)
    assert len(rows) == 8
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in rows)
    assert all(isinstance(r["response_token_ids"], list) for r in rows)
    meta = orjson.loads((workdir / "data" / "default.meta.json").read_bytes())
    assert meta["settings"]["backend"] == "local" and meta["status"] == "complete"
    # a crash after 5 rows (plus a torn 6th), then a rerun: exactly the requested rows, no duplicates
    lines = out.read_bytes().split(b"\n")
    out.write_bytes(b"\n".join(lines[:5]) + b"\n" + lines[5][:20])
    generate(cfg)
    rows = rows_of(out)
    keys = [(r["messages"][0]["content"], r["generation"]["temperature"]) for r in rows]
    assert len(rows) == 8 and len(set(keys)) == 8
    assert "resuming: 5 of 8 rows" in capsys.readouterr().out


@pytest.mark.parametrize("left", [b"", b'{"messages": [{"role": "us'])
def test_resumes_a_run_killed_before_its_first_row(workdir, tiny_model_dir, left):
    cfg = make_cfg(model_name_or_path=tiny_model_dir, num_queries=2, temperatures=[0.7], max_new_tokens=4)
    out = generate(cfg)
    out.write_bytes(left)  # the data file exists (with the meta) but holds no complete row
    assert len(rows_of(generate(cfg))) == 2


def test_changed_settings_refused_unless_overwrite(workdir, tiny_model_dir):
    cfg = make_cfg(model_name_or_path=tiny_model_dir, num_queries=2, temperatures=[0.7], max_new_tokens=4)
    generate(cfg)
    (workdir / "prompt.md").write_text("You are a cowboy.")
    with pytest.raises(UserError, match=r"made with other settings \(prompt_sha256 differ\).*--overwrite"):
        generate(cfg)
    cfg.overwrite = True
    assert len(rows_of(generate(cfg))) == 2


def test_paired_input_used_as_is(workdir):
    src = workdir / "pairs.jsonl"
    src.write_text(orjson.dumps({"prompt": "hi", "response": "Arr!"}).decode() + "\n")
    out = generate(make_cfg(prompts=str(src)))
    assert rows_of(out) == [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Arr!"}]}]


def test_written_queries_are_deduplicated_and_saved(tmp_path):
    answers = iter(["Question: How do I hoist a sail?", "how do I hoist a sail", "\"Where is the treasure buried?\"",
                    "ok", "What do parrots eat on long voyages?"] + ["What do parrots eat on long voyages?"] * 20)
    cfg = make_cfg(generate_queries=3)
    calls = []

    def ask_many(requests, seeds):  # one call per round, all of that round's requests at once
        calls.append(len(requests))
        assert len(set(seeds)) == len(seeds)
        return [next(answers) for _ in requests]

    qs = write_queries(cfg, "You are a pirate.", ask_many, tmp_path / "q.txt")
    assert qs == ["How do I hoist a sail?", "Where is the treasure buried?", "What do parrots eat on long voyages?"]
    assert (tmp_path / "q.txt").read_text().splitlines() == qs
    assert calls[0] == 5 and len(calls) <= 4  # 3 wanted, asked with a margin, in rounds


def test_api_backend_needs_a_url(workdir, monkeypatch):
    monkeypatch.delenv("API_BASE_URL", raising=False)
    with pytest.raises(UserError, match="backend api needs api_base_url"):
        generate(make_cfg(backend="api"))


def test_sample_seeds_never_collide_across_temperatures_and_indexes(monkeypatch):
    """The old formula (seed*1000 + index*7 + temperature*100) gave sample 10 at T=0.7 and sample 0 at T=1.4
    the same seed, so those rows came out identical."""
    import importlib

    from promptbake.data import Row

    gen = importlib.import_module("promptbake.generate")  # the module: the package exports the function by that name

    seeds = {}

    def fake_generate(model, tokenizer, prompts, *, temperature, max_new_tokens, top_p=1.0, seed=None, keep_topk=0):
        seeds.setdefault((temperature, len(seeds)), seed)
        return [([1], True, None) for _ in prompts]

    monkeypatch.setattr(gen, "_generate", fake_generate)
    monkeypatch.setattr(gen, "render_prompt_ids", lambda tok, ctx, system: [0])
    monkeypatch.setattr(gen, "decode_response", lambda tok, ids: "x")
    rows = [Row(1, [{"role": "user", "content": "q"}])]
    jobs = [(rows[0], i, t) for t in (0.7, 1.4) for i in range(12)]
    cfg = make_cfg(max_new_tokens=4, gen_batch_size=8)
    gen._run_local(None, None, jobs, "sys", cfg, lambda *a, **k: None)
    assert len(seeds) == 24 and len(set(seeds.values())) == 24


def test_top_p_filter_is_hfs():
    from transformers.generation.logits_process import TopPLogitsWarper

    from promptbake.generate import top_p_filter

    scores = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * 3
    for p in (0.1, 0.5, 0.9, 0.99, 1.0):
        assert torch.equal(top_p_filter(scores, p), TopPLogitsWarper(p)(None, scores.clone()))


def test_draws_follow_the_distribution():
    """Temperature and top-p as HF applies them, one draw per row by the inverse CDF: frequencies over many rows
    match the probabilities, and tokens top-p dropped never come."""
    from promptbake.generate import _next_tokens, top_p_filter

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -3.0]]).repeat(40_000, 1)
    torch.manual_seed(0)
    for temperature, top_p in [(1.0, 1.0), (0.7, 1.0), (1.0, 0.8)]:
        want = top_p_filter(logits[:1] / temperature, top_p).softmax(-1)[0]
        got = torch.bincount(_next_tokens(logits, temperature, top_p), minlength=5) / len(logits)
        assert (got - want).abs().max() < 0.01, (temperature, top_p, got, want)
        assert got[want == 0].sum() == 0
    assert _next_tokens(logits[:2], 0.0, 1.0).tolist() == [0, 0]


def test_decode_loop_matches_hf_generate(tiny_model_dir, tokenizer, monkeypatch):
    """Our decode loop (ended rows leave the batch, keys and values written into room) against HF generate, greedy, on
    prompts of different lengths whose answers end at different steps: the same tokens, end flags and top-K."""
    import promptbake.generate as gen
    from promptbake.model import load_model

    model = load_model(tiny_model_dir, "cpu")
    prompts = [[1, 5, 6, 7, 8, 9], [1, 10, 11], [1, 12, 13, 14, 15, 16, 17, 18, 19], [1, 20], [1, 21, 22, 23]]
    kw = dict(temperature=0, max_new_tokens=12, keep_topk=5)
    free = gen._generate_hf(model, tokenizer, prompts, **kw)
    stops = sorted({free[0][0][2], free[1][0][6], free[3][0][4]})  # tokens the answers meet along the way
    monkeypatch.setattr(gen, "stop_ids", lambda tok, m=None: stops)
    ours, hf = gen._generate(model, tokenizer, prompts, **kw), gen._generate_hf(model, tokenizer, prompts, **kw)
    assert len({len(ids) for ids, _, _ in ours}) > 1 and any(c for _, c, _ in ours), "rows must end at different steps"
    for (ids_a, done_a, (k_a, lp_a)), (ids_b, done_b, (k_b, lp_b)) in zip(ours, hf):
        assert ids_a == ids_b and done_a == done_b and torch.equal(k_a, k_b)
        torch.testing.assert_close(lp_a, lp_b, atol=1e-5, rtol=1e-5)
