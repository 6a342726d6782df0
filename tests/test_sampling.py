"""Local sampling (promptbake/sampling.py): HF's filters and distribution, our decode loop against HF generate,
and the batched answering the stages share."""

import torch

import promptbake.sampling as sampling
from promptbake.sampling import _next_tokens, answer_in_batches, generate_ids, min_p_filter, top_p_filter


def test_top_p_filter_is_hfs():
    from transformers.generation.logits_process import TopPLogitsWarper

    scores = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * 3
    for p in (0.1, 0.5, 0.9, 0.99, 1.0):
        assert torch.equal(top_p_filter(scores, p), TopPLogitsWarper(p)(None, scores.clone()))


def test_min_p_filter_is_hfs():
    from transformers.generation.logits_process import MinPLogitsWarper

    scores = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * 3
    for p in (0.05, 0.1, 0.3, 0.9):
        assert torch.equal(min_p_filter(scores, p), MinPLogitsWarper(p)(None, scores.clone()))
    assert torch.equal(min_p_filter(scores, 0.0), scores)


def test_draws_follow_the_distribution():
    """Temperature and top-p as HF applies them, one draw per row by the inverse CDF: frequencies over many rows
    match the probabilities, and tokens top-p dropped never come."""

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -3.0]]).repeat(40_000, 1)
    torch.manual_seed(0)
    for temperature, top_p, min_p in [(1.0, 1.0, 0.0), (0.7, 1.0, 0.0), (1.0, 0.8, 0.0), (2.0, 1.0, 0.1)]:
        want = min_p_filter(top_p_filter(logits[:1] / temperature, top_p), min_p).softmax(-1)[0]
        got = torch.bincount(_next_tokens(logits, temperature, top_p, min_p), minlength=5) / len(logits)
        assert (got - want).abs().max() < 0.01, (temperature, top_p, got, want)
        assert got[want == 0].sum() == 0
    assert _next_tokens(logits[:2], 0.0, 1.0).tolist() == [0, 0]


def test_decode_loop_matches_hf_generate(tiny_model_dir, tokenizer, monkeypatch):
    """Our decode loop (ended rows leave the batch, keys and values written into room) against HF generate, greedy, on
    prompts of different lengths whose answers end at different steps: the same tokens, end flags and top-K."""
    from promptbake.model import load_model

    model = load_model(tiny_model_dir, "cpu")
    prompts = [[1, 5, 6, 7, 8, 9], [1, 10, 11], [1, 12, 13, 14, 15, 16, 17, 18, 19], [1, 20], [1, 21, 22, 23]]
    kw = dict(temperature=0, max_new_tokens=12, keep_topk=5)
    free = sampling._generate_hf(model, tokenizer, prompts, **kw)
    stops = sorted({free[0][0][2], free[1][0][6], free[3][0][4]})  # tokens the answers meet along the way
    monkeypatch.setattr(sampling, "stop_ids", lambda tok, m=None: stops)
    ours, hf = sampling._generate(model, tokenizer, prompts, **kw), sampling._generate_hf(model, tokenizer, prompts, **kw)
    assert len({len(ids) for ids, _, _ in ours}) > 1 and any(c for _, c, _ in ours), "rows must end at different steps"
    for (ids_a, done_a, (k_a, lp_a)), (ids_b, done_b, (k_b, lp_b)) in zip(ours, hf):
        assert ids_a == ids_b and done_a == done_b and torch.equal(k_a, k_b)
        torch.testing.assert_close(lp_a, lp_b, atol=1e-5, rtol=1e-5)


def test_answer_in_batches_keeps_order_batches_and_seeds(monkeypatch):
    """Contexts are answered `batch_size` at a time in the given order (never sorted: evaluate compares models on
    the same batches), each batch seeded by `batch_seed(start)`, the answers back in input order."""
    calls = []

    def fake_generate(model, tokenizer, prompts, *, temperature, max_new_tokens, top_p, seed, **kw):
        calls.append(([p[0] for p in prompts], seed, temperature, max_new_tokens))
        return [([p[0], 100 + p[0]], p[0] % 2 == 0, None) for p in prompts]

    monkeypatch.setattr(sampling, "_generate", fake_generate)
    monkeypatch.setattr(sampling, "render_prompt_ids", lambda tok, ctx, system: [int(ctx[-1]["content"])])
    contexts = [[{"role": "user", "content": str(n)}] for n in (5, 1, 4, 2, 6, 3, 7)]
    out = answer_in_batches(None, None, contexts, "sys", batch_size=3, temperature=0.7, max_new_tokens=9,
                            batch_seed=lambda b: 1000 + b)
    assert calls == [([5, 1, 4], 1000, 0.7, 9), ([2, 6, 3], 1003, 0.7, 9), ([7], 1006, 0.7, 9)]
    assert out == [([n, 100 + n], n % 2 == 0) for n in (5, 1, 4, 2, 6, 3, 7)]
    calls.clear()
    answer_in_batches(None, None, contexts[:2], None, batch_size=8, temperature=0, max_new_tokens=4)
    assert calls == [([5, 1], None, 0, 4)]  # greedy: no seed
    assert answer_in_batches(None, None, [], None, batch_size=8, temperature=0, max_new_tokens=4) == []


def test_answer_in_batches_is_the_loop_it_replaced(tiny_model_dir, tokenizer):
    """On a real (tiny) model, sampled: the same answers as rendering, batching and calling generate_ids by hand
    with each batch's seed, as evaluate.sample, train.verify and the query writer did before."""
    from promptbake.chat import render_prompt_ids
    from promptbake.model import load_model

    model = load_model(tiny_model_dir, "cpu")
    contexts = [[{"role": "user", "content": q}] for q in ("hi", "what is two plus two?", "name a colour", "why?",
                                                            "tell me about the sea")]
    by_hand = []
    for b in range(0, len(contexts), 2):
        prompts = [render_prompt_ids(tokenizer, c, "Be brief.") for c in contexts[b:b + 2]]
        by_hand += generate_ids(model, tokenizer, prompts, temperature=1.0, max_new_tokens=6, seed=7 + b)
    got = answer_in_batches(model, tokenizer, contexts, "Be brief.", batch_size=2, temperature=1.0, max_new_tokens=6,
                            batch_seed=lambda b: 7 + b)
    assert got == by_hand and len(got) == len(contexts)
