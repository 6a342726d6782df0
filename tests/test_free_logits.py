"""Free teacher logits: the top-K the local generator keeps while it samples equal a teacher pass's, and bake.py
uses them exactly when model, prompt, K, template and token ids match, after checking a row of every stored part.
The bookkeeping runs on the tiny random model; one test checks the equality on the embedded SmolLM2 (slow)."""

import importlib.util
import re

import pytest
import torch
from conftest import make_cfg
from helpers import ROOT

from promptbake.data import load_rows, read_prompt
from promptbake.forward import response_logits
from promptbake.freelogits import (
    CHECK_ROWS,
    entry_key,
    free_teacher,
    load_parts,
    pick_check_rows,
    read_part,
    topk_dir,
    write_part,
)
from promptbake.generate import generate
from promptbake.loss import teacher_topk
from promptbake.model import load_model
from promptbake.sampling import TopKRecorder
from promptbake.teacher import build_examples
from promptbake.train import prepare_target

# Short answers beside long ones, so one left-padded batch holds rows that end early and rows cut at the cap.
QUERIES = ["Say just the word yes.", "Reply with one word: what colour is the sky?", "Who are you?",
           "Is water wet? Answer yes or no.", "Name a fruit, one word only.", "Say hi.", "What is 2+2? Just the number.",
           "Greet me in two words."]
K = 8
ATOL, RTOL = 1e-3, 1e-3  # fp16 storage of an fp32 log-prob: at most half an fp16 ulp, 2^-11 relative


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(tiny_model_dir)


def cfg_for(model_dir, **kw):
    kw = {"model_name_or_path": model_dir, "training_prompts": QUERIES, "temperatures": [0.7], "top_p": 0.9,
          "samples_per_query": 1, "max_new_tokens": 16, "gen_batch_size": 8, "top_k": K,
          "drop_loops": False, **kw}
    return make_cfg(**kw)


def examples_of(out, tokenizer, system):
    rows = load_rows(str(out))
    examples, _ = build_examples(rows, tokenizer, system, "", 512, True, str(out))
    return rows, examples


def teacher_pass(model, tokenizer, examples):
    """The reference: full rows, fp32 log_softmax, top-K (the cache's numbers)."""
    with torch.inference_mode():
        logits = response_logits(model, [e.teacher_ids for e in examples], [e.n_response for e in examples],
                                 tokenizer.pad_token_id, share=False)
    return teacher_topk(logits, K)


def spec(out):
    return {"prompt_file": "prompt.md", "student_prompt": "", "data": str(out), "weight": 1.0, "name": "t",
            "marker_regex": "", "data_file": str(out), "rows": load_rows(str(out))}


def shift_part(path, by: float) -> None:
    """A valid part (checksum and all) holding wrong numbers."""
    meta, tensors = read_part(path)
    write_part(path, meta, {**tensors, "logprobs": tensors["logprobs"] - by})


def assert_equal_to_teacher(teacher, want_ids, want_lp):
    assert torch.equal(teacher.ids.long(), want_ids)
    torch.testing.assert_close(teacher.logprobs.float(), want_lp, atol=ATOL, rtol=RTOL)


@pytest.mark.slow
def test_stored_topk_equal_the_teacher_pass_on_the_real_model(workdir, tokenizer, embedded_dir):
    model = load_model(embedded_dir)
    out = generate(cfg_for(embedded_dir), model, tokenizer, embedded_dir)
    system = read_prompt("prompt.md")
    rows, examples = examples_of(out, tokenizer, system)
    entries, notes = load_parts(topk_dir(out))
    assert not notes and len(entries) == len(rows) == len(QUERIES)
    complete = [r.complete for r in rows]
    assert any(complete) and not all(complete), "want rows ending early beside rows cut at the cap in one batch"
    want_ids, want_lp = teacher_pass(model, tokenizer, examples)
    got = [entries[entry_key(r.key)] for r in rows]
    for r, entry in zip(rows, got):
        assert entry.response_ids.tolist() == r.response_ids  # positions after the end of turn are not stored
    ids = torch.cat([g.ids for g in got]).long()
    lps = torch.cat([g.logprobs for g in got]).float()
    assert ids.shape == want_ids.shape == (sum(e.n_response for e in examples), K)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(lps, want_lp, atol=ATOL, rtol=RTOL)


def test_bake_reuses_them_and_falls_back_when_prompt_k_or_model_change(workdir, tiny, tokenizer, tiny_model_dir,
                                                                       capsys):
    cfg = cfg_for(tiny_model_dir)
    out = generate(cfg, tiny, tokenizer, tiny_model_dir)
    capsys.readouterr()
    target = prepare_target(cfg, spec(out), tiny, tokenizer, tiny_model_dir)
    log = capsys.readouterr().out
    assert f"reused the generator's top-{K} for {len(QUERIES)}/{len(QUERIES)} rows" in log
    assert "teacher cache: built" not in log and not list((workdir / "data" / "cache").glob("*"))
    want_ids, want_lp = teacher_pass(tiny, tokenizer, target.examples)
    assert_equal_to_teacher(target.teacher, want_ids, want_lp)

    system = read_prompt("prompt.md")
    rows, examples = examples_of(out, tokenizer, system)
    assert free_teacher(tiny, tokenizer, examples, rows, system, tiny_model_dir, K, out, 8) is not None
    other_prompt = "You are a cowboy. Say howdy."
    ex2, _ = build_examples(rows, tokenizer, other_prompt, "", 512, True, str(out))
    assert free_teacher(tiny, tokenizer, ex2, rows, other_prompt, tiny_model_dir, K, out, 8) is None
    assert "another system prompt" in capsys.readouterr().out
    assert free_teacher(tiny, tokenizer, examples, rows, system, tiny_model_dir, K + 1, out, 8) is None
    assert f"stored K={K} < top_k={K + 1}" in capsys.readouterr().out
    assert free_teacher(tiny, tokenizer, examples, rows, system, tiny_model_dir + "+lineage:abc", K, out, 8) is None
    assert "another model" in capsys.readouterr().out
    smaller = free_teacher(tiny, tokenizer, examples, rows, system, tiny_model_dir, K // 2, out, 8)  # a prefix of top-K
    assert torch.equal(smaller.ids.long(), want_ids[:, :K // 2])
    capsys.readouterr()

    cfg.free_teacher_logits = False
    prepare_target(cfg, spec(out), tiny, tokenizer, tiny_model_dir)
    log = capsys.readouterr().out
    assert "teacher cache: built" in log and "free teacher logits" not in log


def test_numbers_that_differ_from_the_teacher_pass_are_refused(workdir, tiny, tokenizer, tiny_model_dir, capsys):
    cfg = cfg_for(tiny_model_dir)
    out = generate(cfg, tiny, tokenizer, tiny_model_dir)
    (part,) = topk_dir(out).glob("part-*.safetensors")
    shift_part(part, 0.05)
    capsys.readouterr()
    prepare_target(cfg, spec(out), tiny, tokenizer, tiny_model_dir)
    log = capsys.readouterr().out
    assert "does not match a teacher pass" in log and "teacher cache: built" in log
    assert 0.04 < float(re.search(r"max \|Δlogprob\| (\S+) ", log).group(1)) < 0.08  # 0.05, fp16-rounded


def test_a_wrong_part_is_caught_wherever_it_lies(workdir, tiny, tokenizer, tiny_model_dir, capsys):
    """Three parts, the last one wrong, a teacher batch of 2: the old check (the first batch) read part 1 alone."""
    out = generate(cfg_for(tiny_model_dir, gen_batch_size=3), tiny, tokenizer, tiny_model_dir)
    parts = sorted(topk_dir(out).glob("part-*.safetensors"))
    assert len(parts) == 3
    shift_part(parts[-1], 0.05)
    system = read_prompt("prompt.md")
    rows, examples = examples_of(out, tokenizer, system)
    capsys.readouterr()
    assert free_teacher(tiny, tokenizer, examples, rows, system, tiny_model_dir, K, out, 2) is None
    log = capsys.readouterr().out
    assert "does not match a teacher pass on 3 rows" in log and f"first in {parts[-1].name}" in log


def test_bf16_noise_passes_and_a_small_shift_is_refused(workdir, tiny_model_dir, tokenizer, capsys):
    """bf16's per-position tolerance (0.5 + 0.1|lp|, sized from measured noise) is wider than the 0.05 shift: the mean
    difference refuses it."""
    model = load_model(tiny_model_dir).to(torch.bfloat16)
    out = generate(cfg_for(tiny_model_dir), model, tokenizer, tiny_model_dir)
    system = read_prompt("prompt.md")
    rows, examples = examples_of(out, tokenizer, system)
    capsys.readouterr()
    assert free_teacher(model, tokenizer, examples, rows, system, tiny_model_dir, K, out, 8) is not None
    assert "checked on 8 rows of 1 parts" in capsys.readouterr().out
    (part,) = topk_dir(out).glob("part-*.safetensors")
    shift_part(part, 0.05)
    assert free_teacher(model, tokenizer, examples, rows, system, tiny_model_dir, K, out, 8) is None
    shift = float(re.search(r"shifted on average by (\S+),", capsys.readouterr().out).group(1))
    assert -0.06 < shift < -0.04  # stored minus fresh: 0.05 lower, fp16-rounded


def test_check_rows_cover_every_part_and_at_least_a_batch():
    part_of = ["a"] * 5 + ["b"] * 3 + ["c"]
    n_response = [1, 9, 2, 8, 3, 5, 7, 6, 4]
    # each part's longest first (a: 1, b: 6, c: 8), then the next longest of each in turn up to a batch of 5
    assert pick_check_rows(list(range(9)), part_of, n_response, 5) == [1, 6, 8, 3, 7]
    assert pick_check_rows(list(range(9)), part_of, n_response, 2) == [1, 6, 8]  # every part, even past a batch
    assert pick_check_rows([0, 2], part_of, n_response, 8) == [2, 0]  # no more rows than are reused
    many = [f"p{i:03d}" for i in range(100)]
    picks = pick_check_rows(list(range(100)), many, [1] * 100, 8)
    assert len(picks) == CHECK_ROWS and picks[0] == 0 and picks[-1] == 99 and picks == sorted(set(picks))


def test_resumed_generation_keeps_them_consistent_and_a_bad_part_falls_back(workdir, tiny, tokenizer, tiny_model_dir,
                                                                            capsys):
    cfg = cfg_for(tiny_model_dir, gen_batch_size=3)
    out = generate(cfg, tiny, tokenizer, tiny_model_dir)
    parts = sorted(topk_dir(out).glob("part-*.safetensors"))
    assert len(parts) == 3
    # a crash: the last part written, its rows not yet; and one row of the batch before it lost too
    lines = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:2]))
    generate(cfg, tiny, tokenizer, tiny_model_dir)
    assert f"resuming: 2 of {len(QUERIES)} rows" in capsys.readouterr().out
    assert len(list(topk_dir(out).glob("part-*.safetensors"))) > 3
    system = read_prompt("prompt.md")
    rows, examples = examples_of(out, tokenizer, system)
    want_ids, want_lp = teacher_pass(tiny, tokenizer, examples)
    teacher = free_teacher(tiny, tokenizer, examples, rows, system, tiny_model_dir, K, out, 8)
    assert f"for {len(QUERIES)}/{len(QUERIES)} rows" in capsys.readouterr().out
    assert_equal_to_teacher(teacher, want_ids, want_lp)

    newest = sorted(topk_dir(out).glob("part-*.safetensors"))[-1]
    newest.write_bytes(newest.read_bytes()[:-200])  # truncated: its rows get the teacher pass
    teacher = free_teacher(tiny, tokenizer, examples, rows, system, tiny_model_dir, K, out, 8)
    log = capsys.readouterr().out
    assert f"{newest.name} is corrupt or truncated" in log and "teacher pass for " in log
    assert_equal_to_teacher(teacher, want_ids, want_lp)

    for p in topk_dir(out).glob("part-*.safetensors"):
        p.unlink()
    assert free_teacher(tiny, tokenizer, examples, rows, system, tiny_model_dir, K, out, 8) is None


def test_switched_off_nothing_is_kept_and_a_fresh_data_file_drops_old_parts(workdir, tiny, tokenizer, tiny_model_dir):
    cfg = cfg_for(tiny_model_dir, num_queries=2)
    out = generate(cfg, tiny, tokenizer, tiny_model_dir)
    assert list(topk_dir(out).glob("part-*.safetensors"))
    generate(cfg_for(tiny_model_dir, num_queries=2, overwrite=True, free_teacher_logits=False), tiny, tokenizer,
             tiny_model_dir)
    assert not topk_dir(out).exists()


def test_the_levers_benchmark_measures_the_recorder_the_generator_ships(tiny, tokenizer, monkeypatch):
    """benchmarks/levers.py's free-logit check reads the top-K through answer_locally's TopKRecorder (it had its own
    LogitsProcessor): a fault put into the shipped recorder shows in its figures, and the bake's check refuses it."""
    spec = importlib.util.spec_from_file_location("levers", ROOT / "benchmarks" / "levers.py")
    levers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(levers)
    system = read_prompt(str(ROOT / "prompt.md"))
    good = levers.check_free_logits(tiny, tokenizer, system, 3, K)
    assert good["top1_same"] == 1.0 and good["logprob_abs_diff_max"] < 1e-3 and good["bake_check_accepts"]

    real_add = TopKRecorder.add

    def add_shifted(self, logits, rows=None):  # the recorder keeps log-probs 0.05 too low
        real_add(self, logits, rows)
        r, ids, lp = self.steps[-1]
        self.steps[-1] = (r, ids, lp - 0.05)

    monkeypatch.setattr(TopKRecorder, "add", add_shifted)
    bad = levers.check_free_logits(tiny, tokenizer, system, 3, K)
    assert abs(bad["logprob_abs_diff_mean"] - 0.05) < 1e-3 and not bad["bake_check_accepts"]
    assert "mean Δ -5.0e-02; first in the generated rows" in bad["bake_check"]
