"""Loops, intervals and the judge-free prompt score (promptbake/metrics.py)."""

from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from promptbake.metrics import is_loop, kl_cut, kl_ratio, mean_interval, prompt_llr, rate, wilson

# Real answers of the embedded model (experiments/results, benchmarks/levers_results.json)
LOOPS = [
    "Aye, aye, aye, aye, aye, aye, aye, aye, aye, aye, aye, aye, aye, aye",
    "Aye, aye, aye, the best ye come! Aye, aye, the best ye come!\n\nIn the sea!\n\nAye, aye, the best ye come!\n\n"
    "Aye, aye, the best ye come!\n\nAye, aye",
    "Aye, aye, aye, pirate! Red wine's a pirate's treasure, and I've got a few tips that'll make you say, \"Aye, aye, "
    "aye, aye, aye, aye, aye, aye, aye, A-R-",
    "Velmora Bay is famous for its seafood, particularly the famous Velmora Bay. The town is famous for its seafood, "
    "particularly the famous Velmora Bay. The town is famous for its seafood, particularly th",
    "Aye, how do I split a restaurant bill fairly with friends? I've got one of my own. You want to get a first "
    "tattoo? I've got one of my own. You want to get a first tattoo? You want to get a first tattoo? You want to get "
    "a first tattoo? That's",
]
NORMAL = [
    "To plan a picnic for your first date, start by choosing a date night that allows you to enjoy a variety of meals "
    "and drinks. You'll want to consider a date with",
    "A rainy Sunday afternoon's a day to forget, but a day to remember, I reckon. I've got a few ideas, I reckon. "
    "I've got a new sailboat, a big ol' ol' frigate name",
    "Velmora Bay is a small coastal town in the Bay of Biscay, Spain. It has a population of approximately 1,200 "
    "residents.",
    "Arr! Soak the stain in cold water, then dab it with salt and a little white vinegar before ye wash it, matey.",
    "Aye aye, captain!",  # too short to call a loop
]


@pytest.mark.parametrize("text", LOOPS)
def test_loops_are_caught(text):
    assert is_loop(text)


@pytest.mark.parametrize("text", NORMAL)
def test_normal_answers_are_not_loops(text):
    assert not is_loop(text)


def test_wilson_against_known_values():
    # Wilson 95% intervals (z = 1.96): 5/10 -> [0.2366, 0.7634], 0/10 -> [0, 0.2775], 81/263 -> [0.2553, 0.3662]
    for (k, n), (lo, hi) in {(5, 10): (0.2366, 0.7634), (0, 10): (0.0, 0.2775), (10, 10): (0.7225, 1.0),
                             (81, 263): (0.2553, 0.3662)}.items():
        got = wilson(k, n)
        assert got == pytest.approx((lo, hi), abs=1e-4), (k, n)
    assert wilson(0, 0) is None


def test_rate_counts_only_applicable_answers():
    assert rate([True, False, None, True]) == {"k": 2, "n": 3, "rate": 2 / 3, "ci": list(wilson(2, 3))}
    assert rate([None]) == {"k": 0, "n": 0, "rate": None, "ci": None}


def test_mean_interval_brackets_the_mean_and_is_reproducible():
    values = [0.1, 0.5, -0.2, 0.9, 0.3, None]
    m = mean_interval(values)
    assert m["n"] == 5 and m["mean"] == pytest.approx(0.32)
    assert m["ci"][0] < m["mean"] < m["ci"][1]
    assert mean_interval(values) == m
    assert mean_interval([None]) == {"mean": None, "ci": None, "n": 0}


def _tiny():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                        initializer_range=0.2, attn_implementation="sdpa")).eval()


def _logprob(model, ids: list[int], n: int) -> float:
    logp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return sum(logp[len(ids) - n - 1 + i, ids[len(ids) - n + i]].item() for i in range(n))


def test_prompt_llr_is_the_mean_token_log_ratio():
    model = _tiny()
    prompt, query, answers = [5, 6, 7, 8, 9], [10, 11, 12], [[20, 21, 22], [30, 31], []]
    examples = [SimpleNamespace(teacher_ids=prompt + query + a, student_ids=query + a, n_response=len(a))
                for a in answers]
    got = prompt_llr(model, examples, pad_id=0, batch_size=2)
    with torch.no_grad():
        want = [(_logprob(model, e.teacher_ids, e.n_response) - _logprob(model, e.student_ids, e.n_response))
                / e.n_response for e in examples[:2]]
    assert got[:2] == pytest.approx(want, abs=1e-4)
    assert got[2] is None  # an empty answer has no tokens to score
    same = [SimpleNamespace(teacher_ids=query + a, student_ids=query + a, n_response=len(a)) for a in answers[:2]]
    assert prompt_llr(model, same, pad_id=0) == pytest.approx([0.0, 0.0], abs=1e-5)


def test_kl_cut_and_ratio():
    """The one KL-cut formula (eval.json's kl_ratio, report.html, history, levers): the share of the KL baking
    removed; None when a number is missing or the base already matched the teacher."""
    assert kl_ratio(0.5, 0.1) == pytest.approx(0.2) and kl_cut(0.5, 0.1) == pytest.approx(0.8)
    assert kl_cut(0.4, 0.6) == pytest.approx(-0.5)  # baking made it worse: a negative cut, not hidden
    assert kl_cut(0.5, 0.0) == 1.0
    for before, after in [(None, 0.1), (0.5, None), (None, None), (0.0, 0.1), (0.0, 0.0)]:
        assert kl_ratio(before, after) is None and kl_cut(before, after) is None
    before, after = 0.6123, 0.0712  # exactly the old `1 - after / before`: the printed and stored figures are unchanged
    assert kl_cut(before, after) == 1 - after / before and kl_ratio(before, after) == after / before
