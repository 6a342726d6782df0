import pytest
import torch
from safetensors import safe_open

from promptbake.chat import render_prompt_ids
from promptbake.data import Row
from promptbake.errors import UserError
from promptbake.forward import common_prefix_len, enable_shared_prefix, response_logits, shared_prefix
from promptbake.model import load_model
from promptbake.teacher import build_examples, check_alignment, load_checked, save_checked, teacher_cache, topk_id_dtype

SYSTEM = "You are a pirate. Always begin every reply with \"Arr!\"."


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(tiny_model_dir)


def rows(n=5):
    qs = ["Who are you?", "Tell me a joke about the sea and ships.", "Why?", "What is the capital of France, matey?",
          "How do I cook rice?", "Hello there"]
    answers = ["Arr! I be a pirate.", "Arr! Why did the ship blush? It saw the sea's bottom!", "Arr, because.",
               "Arr! Paris, me hearty, the finest port.", "Arr! Boil it.", "Ahoy!"]
    return [Row(i + 1, [{"role": "user", "content": q}], a, None, i % 2 == 0) for i, (q, a) in enumerate(zip(qs, answers))][:n]


def full_forward_logits(model, examples):
    """Slow reference: each row alone, unpadded, every position's logits, then the response window."""
    return torch.cat([model(torch.tensor([e.teacher_ids])).logits[0, len(e.teacher_ids) - e.n_response - 1:-1]
                      for e in examples])


@pytest.mark.parametrize("share", [False, True])
def test_left_padded_response_logits_equal_unpadded_full_forward(tiny, tokenizer, share):
    examples, _ = build_examples(rows(), tokenizer, SYSTEM, "", 512, False, "t")
    assert enable_shared_prefix(tiny).enabled  # else share=True would silently test the plain path
    logits = response_logits(tiny, [e.teacher_ids for e in examples], [e.n_response for e in examples],
                             tokenizer.pad_token_id, share=share)
    assert logits.shape[0] == sum(e.n_response for e in examples)
    torch.testing.assert_close(logits, full_forward_logits(tiny, examples), atol=1e-4, rtol=1e-4)


def test_system_prompt_kv_reuse_matches_recompute(tiny, tokenizer):
    examples, _ = build_examples(rows(), tokenizer, SYSTEM, "", 512, False, "t")
    head = common_prefix_len([e.teacher_ids for e in examples], [e.n_response for e in examples])
    prefix = examples[0].teacher_ids[:head]
    assert SYSTEM in tokenizer.decode(prefix)  # the system turn is what runs once
    with torch.inference_mode():
        reused = response_logits(tiny, [e.teacher_ids for e in examples], [e.n_response for e in examples],
                                 tokenizer.pad_token_id, prefix=shared_prefix(tiny, prefix))
    torch.testing.assert_close(reused, full_forward_logits(tiny, examples), atol=1e-4, rtol=1e-4)


def test_gradients_through_the_shared_head_equal_full_rows(tiny_model_dir, tokenizer):
    """The student runs its batch's common prefix once; the gradient must be the one of full rows
    (padded query rows included: they must not turn it into NaN)."""
    examples, _ = build_examples(rows(), tokenizer, SYSTEM, "", 512, False, "t")
    seqs, n = [e.student_ids for e in examples], [e.n_response for e in examples]
    grads = []
    for share in (False, True):
        model = load_model(tiny_model_dir)
        model.train()
        weight = torch.randn(sum(n), model.config.vocab_size, generator=torch.Generator().manual_seed(0))
        (response_logits(model, seqs, n, tokenizer.pad_token_id, share=share) * weight).sum().backward()
        grads.append([p.grad.clone() for p in model.model.layers[0].parameters()])
    for plain, shared in zip(*grads):
        assert torch.isfinite(shared).all()
        assert (shared - plain).norm() <= 1e-5 * plain.norm()  # fp32 summation order only


def test_truncated_response_trains_no_turn_end(tokenizer):
    examples, _ = build_examples(rows(2), tokenizer, SYSTEM, "", 512, False, "t")
    assert examples[0].student_ids[-1] == tokenizer.eos_token_id  # complete
    assert examples[1].student_ids[-1] != tokenizer.eos_token_id  # finish_reason length
    long = [Row(1, [{"role": "user", "content": "hi"}], "word " * 300)]
    (ex,), cut = build_examples(long, tokenizer, SYSTEM, "", 64, False, "t")
    assert cut == 1 and len(ex.student_ids) == 64 and ex.student_ids[-1] != tokenizer.eos_token_id


def test_kept_token_ids_are_used_not_reencoded(tokenizer):
    ids = [28, 28, 28, 2]  # a tokenization that re-encoding the text would not give back
    (ex,), _ = build_examples([Row(1, [{"role": "user", "content": "hi"}], "x", ids)], tokenizer, SYSTEM, "", 512,
                              True, "t")
    assert ex.student_ids[-4:] == ids and ex.teacher_ids[-4:] == ids


def test_cache_reused_and_corrupt_shard_rebuilt(tiny, tokenizer, tmp_path, capsys):
    examples, _ = build_examples(rows(), tokenizer, SYSTEM, "", 512, False, "t")
    first = teacher_cache(tiny, tokenizer, examples, 8, tmp_path, 2)
    assert "built" in capsys.readouterr().out
    assert first.ids.dtype == torch.uint16 and first.logprobs.dtype == torch.float16
    assert first.bytes_per_token <= 8 * 4 + 4
    again = teacher_cache(tiny, tokenizer, examples, 8, tmp_path, 2)
    assert "reusing" in capsys.readouterr().out
    assert torch.equal(again.ids, first.ids)
    (shard,) = tmp_path.glob("shard-*.safetensors")
    with safe_open(str(shard), framework="pt") as f:  # no pickle: plain tensors, the checksum in the metadata
        assert set(f.keys()) == {"offsets", "response_ids", "ids", "logprobs"} and '"sha256":' in f.metadata()["promptbake"]
    flipped = bytearray(shard.read_bytes())
    flipped[-3] ^= 0xFF  # a flipped byte among the numbers: the file still parses
    shard.write_bytes(bytes(flipped))
    rebuilt = teacher_cache(tiny, tokenizer, examples, 8, tmp_path, 2)
    assert "corrupt or truncated; rebuilding" in capsys.readouterr().out
    assert torch.equal(rebuilt.ids, first.ids)
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated, as by a crash or a full disk
    rebuilt = teacher_cache(tiny, tokenizer, examples, 8, tmp_path, 2)
    assert "corrupt or truncated; rebuilding" in capsys.readouterr().out
    assert torch.equal(rebuilt.ids, first.ids)
    # the cached top-K equal a direct full-vocabulary log_softmax + topk on one row
    e = examples[0]
    full = torch.log_softmax(tiny(torch.tensor([e.teacher_ids])).logits[0].float(), -1)
    want = full[len(e.teacher_ids) - e.n_response - 1:-1].topk(8)
    _, ids, lps = first.row(0)
    assert torch.equal(ids.long(), want.indices)
    torch.testing.assert_close(lps.float(), want.values, atol=2e-3, rtol=1e-3)


def test_alignment_mismatch_names_row_and_tokens(tiny, tokenizer, tmp_path):
    examples, _ = build_examples(rows(3), tokenizer, SYSTEM, "", 512, False, "data.jsonl")
    cache = teacher_cache(tiny, tokenizer, examples, 4, tmp_path, 4)
    examples[1].student_ids[-2] = 9999
    with pytest.raises(UserError, match=r"data.jsonl:2: the student's response tokens differ.*student \[.*teacher \["):
        check_alignment(examples, cache, tokenizer, "data.jsonl")


def test_a_cache_computed_for_other_response_tokens_is_refused(tiny, tokenizer, tmp_path):
    """What check_alignment can catch: the cache folder holds numbers for another tokenization of the same rows (the
    generator's own ids, then the text re-encoded); student and teacher ids agree by construction."""
    text = rows(2)
    chars = [tokenizer.convert_tokens_to_ids(c) for c in "Arr"]  # "Arr" spelled letter by letter, as a sampler may
    generated = [Row(r.line, r.context, r.response, chars + tokenizer.encode(r.response[3:], add_special_tokens=False),
                     False) for r in text]
    by_ids, _ = build_examples(generated, tokenizer, SYSTEM, "", 512, True, "data.jsonl")
    teacher_cache(tiny, tokenizer, by_ids, 4, tmp_path, 4)
    by_text, _ = build_examples(generated, tokenizer, SYSTEM, "", 512, False, "data.jsonl")
    assert all(e.student_ids[-e.n_response:] == e.teacher_ids[-e.n_response:] for e in by_text)
    cache = teacher_cache(tiny, tokenizer, by_text, 4, tmp_path, 4)  # same folder: the shards are reused
    with pytest.raises(UserError, match=r"data.jsonl:1: the student's response tokens differ .* at token 0"):
        check_alignment(by_text, cache, tokenizer, "data.jsonl")


def test_prompt_longer_than_context(tokenizer):
    with pytest.raises(UserError, match="over the model's context of 50; shorten the prompt"):
        build_examples(rows(1), tokenizer, SYSTEM * 20, "", 512, False, "t", max_context=50)


def test_student_prompt_trigger(tokenizer):
    (ex,), _ = build_examples(rows(1), tokenizer, SYSTEM, "pirate mode", 512, False, "t")
    student = tokenizer.decode(ex.student_ids)
    assert "pirate mode" in student and "Arr!\"" not in student.split("assistant")[0]
    assert render_prompt_ids(tokenizer, rows(1)[0].context, "pirate mode") == ex.student_ids[:-ex.n_response]


@pytest.mark.parametrize("vocab_size, dtype", [(49152, torch.uint16), (65535, torch.uint16), (65536, torch.uint16),
                                               (65537, torch.int32), (151936, torch.int32)])
def test_stored_top_k_ids_keep_the_largest_id_exactly(vocab_size, dtype, tmp_path):
    """uint16 (half the bytes) while every id fits, int32 beyond: the vocabulary's last id survives the round trip."""
    assert topk_id_dtype(vocab_size) == dtype
    ids = torch.tensor([[0, vocab_size - 1]]).to(topk_id_dtype(vocab_size))
    save_checked(tmp_path / "s.safetensors", {"ids": ids})
    stored, _ = load_checked(tmp_path / "s.safetensors")
    assert stored["ids"].long().tolist() == [[0, vocab_size - 1]]
