"""Free teacher logits: the top-K the local generator keeps while it samples equal a teacher pass's, and bake.py
uses them exactly when model, prompt, K, template and token ids match (embedded SmolLM2, a few short rows)."""

import re

import pytest
import torch
from conftest import make_cfg

from promptbake.data import load_rows, read_prompt
from promptbake.forward import response_logits
from promptbake.freelogits import _part_checksum, entry_key, free_teacher, load_parts, topk_dir
from promptbake.generate import generate
from promptbake.loss import teacher_topk
from promptbake.model import load_model
from promptbake.teacher import build_examples
from promptbake.train import prepare_target

# Short answers beside long ones, so one left-padded batch holds rows that end early and rows cut at the cap.
QUERIES = ["Say just the word yes.", "Reply with one word: what colour is the sky?", "Who are you?",
           "Is water wet? Answer yes or no.", "Name a fruit, one word only.", "Say hi.", "What is 2+2? Just the number.",
           "Greet me in two words."]
K = 8
ATOL, RTOL = 1e-3, 1e-3  # fp16 storage of an fp32 log-prob: at most half an fp16 ulp, 2^-11 relative


@pytest.fixture(scope="module")
def model(embedded_dir):
    return load_model(embedded_dir)


def cfg_for(embedded_dir, **kw):
    kw = {"model_name_or_path": embedded_dir, "training_prompts": QUERIES, "temperatures": [0.7], "top_p": 0.9,
          "max_new_tokens": 16, "gen_batch_size": 8, "top_k": K,
          "samples_per_query": 1, "drop_loops": False, **kw}
    return make_cfg(**kw)


def run_generate(cfg, model, tokenizer, embedded_dir):
    return generate(cfg, model, tokenizer, embedded_dir)


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
            "marker_regex": "", "rows": load_rows(str(out))}


def test_stored_topk_equal_the_teacher_pass(workdir, model, tokenizer, embedded_dir):
    out = run_generate(cfg_for(embedded_dir), model, tokenizer, embedded_dir)
    system = read_prompt("prompt.md")
    rows, examples = examples_of(out, tokenizer, system)
    entries, notes = load_parts(topk_dir(out))
    assert not notes and len(entries) == len(rows) == len(QUERIES)
    complete = [r.complete for r in rows]
    assert any(complete) and not all(complete), "want rows ending early beside rows cut at the cap in one batch"
    want_ids, want_lp = teacher_pass(model, tokenizer, examples)
    got = [entries[entry_key(r.key)] for r in rows]
    for r, (_, _, resp, _, _) in zip(rows, got):
        assert resp.tolist() == r.response_ids  # positions after the end of turn are not stored
    ids = torch.cat([g[3] for g in got]).long()
    lps = torch.cat([g[4] for g in got]).float()
    assert ids.shape == want_ids.shape == (sum(e.n_response for e in examples), K)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(lps, want_lp, atol=ATOL, rtol=RTOL)


def test_bake_reuses_them_and_falls_back_when_prompt_k_or_model_change(workdir, model, tokenizer, embedded_dir,
                                                                       capsys):
    cfg = cfg_for(embedded_dir)
    out = run_generate(cfg, model, tokenizer, embedded_dir)
    capsys.readouterr()
    target = prepare_target(cfg, spec(out), model, tokenizer, embedded_dir)
    log = capsys.readouterr().out
    assert f"reused the generator's top-{K} for {len(QUERIES)}/{len(QUERIES)} rows" in log
    assert "teacher cache: built" not in log and not list((workdir / "data" / "cache").glob("*"))
    want_ids, want_lp = teacher_pass(model, tokenizer, target.examples)
    assert torch.equal(target.teacher.ids.long(), want_ids)
    torch.testing.assert_close(target.teacher.logprobs.float(), want_lp, atol=ATOL, rtol=RTOL)

    rows, examples = examples_of(out, tokenizer, read_prompt("prompt.md"))
    args = (examples, rows, read_prompt("prompt.md"), embedded_dir, K, out, 8)
    assert free_teacher(model, tokenizer, *args) is not None
    other_prompt = "You are a cowboy. Say howdy."
    ex2, _ = build_examples(rows, tokenizer, other_prompt, "", 512, True, str(out))
    assert free_teacher(model, tokenizer, ex2, rows, other_prompt, embedded_dir, K, out, 8) is None
    assert "another system prompt" in capsys.readouterr().out
    assert free_teacher(model, tokenizer, examples, rows, args[2], embedded_dir, K + 1, out, 8) is None
    assert f"stored K={K} < top_k={K + 1}" in capsys.readouterr().out
    assert free_teacher(model, tokenizer, examples, rows, args[2], embedded_dir + "+lineage:abc", K, out, 8) is None
    assert "another model" in capsys.readouterr().out
    smaller = free_teacher(model, tokenizer, examples, rows, args[2], embedded_dir, K // 2, out, 8)  # a prefix of top-K
    assert torch.equal(smaller.ids.long(), want_ids[:, :K // 2])
    capsys.readouterr()

    cfg.free_teacher_logits = False
    prepare_target(cfg, spec(out), model, tokenizer, embedded_dir)
    log = capsys.readouterr().out
    assert "teacher cache: built" in log and "free teacher logits" not in log


def test_numbers_that_differ_from_the_teacher_pass_are_refused(workdir, model, tokenizer, embedded_dir, capsys):
    cfg = cfg_for(embedded_dir)
    out = run_generate(cfg, model, tokenizer, embedded_dir)
    (part,) = topk_dir(out).glob("part-*.pt")
    blob = torch.load(part, weights_only=True)
    blob["tensors"]["logprobs"] = blob["tensors"]["logprobs"] - 0.05  # a valid part with wrong numbers
    blob["sha256"] = _part_checksum(blob["meta"], blob["tensors"])
    torch.save(blob, part)
    capsys.readouterr()
    prepare_target(cfg, spec(out), model, tokenizer, embedded_dir)
    log = capsys.readouterr().out
    assert "does not match a teacher pass" in log and "teacher cache: built" in log
    assert 0.04 < float(re.search(r"max \|Δlogprob\| (\S+) ", log).group(1)) < 0.08  # 0.05, fp16-rounded


def test_resumed_generation_keeps_them_consistent_and_a_bad_part_falls_back(workdir, model, tokenizer, embedded_dir,
                                                                            capsys):
    cfg = cfg_for(embedded_dir, gen_batch_size=3)
    out = run_generate(cfg, model, tokenizer, embedded_dir)
    parts = sorted(topk_dir(out).glob("part-*.pt"))
    assert len(parts) == 3
    # a crash: the last part written, its rows not yet; and one row of the batch before it lost too
    lines = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:2]))
    run_generate(cfg, model, tokenizer, embedded_dir)
    assert f"resuming: 2 of {len(QUERIES)} rows" in capsys.readouterr().out
    assert len(list(topk_dir(out).glob("part-*.pt"))) > 3
    system = read_prompt("prompt.md")
    rows, examples = examples_of(out, tokenizer, system)
    want_ids, want_lp = teacher_pass(model, tokenizer, examples)
    teacher = free_teacher(model, tokenizer, examples, rows, system, embedded_dir, K, out, 8)
    assert f"for {len(QUERIES)}/{len(QUERIES)} rows" in capsys.readouterr().out
    assert torch.equal(teacher.ids.long(), want_ids)
    torch.testing.assert_close(teacher.logprobs.float(), want_lp, atol=ATOL, rtol=RTOL)

    newest = sorted(topk_dir(out).glob("part-*.pt"))[-1]
    newest.write_bytes(newest.read_bytes()[:-200])  # truncated: its rows get the teacher pass
    teacher = free_teacher(model, tokenizer, examples, rows, system, embedded_dir, K, out, 8)
    log = capsys.readouterr().out
    assert f"{newest.name} is corrupt or truncated" in log and "teacher pass for " in log
    assert torch.equal(teacher.ids.long(), want_ids)
    torch.testing.assert_close(teacher.logprobs.float(), want_lp, atol=ATOL, rtol=RTOL)

    for p in topk_dir(out).glob("part-*.pt"):
        p.unlink()
    assert free_teacher(model, tokenizer, examples, rows, system, embedded_dir, K, out, 8) is None


def test_switched_off_nothing_is_kept_and_a_fresh_data_file_drops_old_parts(workdir, model, tokenizer, embedded_dir):
    cfg = cfg_for(embedded_dir, num_queries=2)
    out = run_generate(cfg, model, tokenizer, embedded_dir)
    assert list(topk_dir(out).glob("part-*.pt"))
    run_generate(cfg_for(embedded_dir, num_queries=2, overwrite=True, free_teacher_logits=False), model, tokenizer,
                 embedded_dir)
    assert not topk_dir(out).exists()
