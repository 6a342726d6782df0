"""The shared-prefix decision: taken once per model, in the model's dtype, printed, and safe when it says off."""

import gc
import weakref

import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)

from promptbake import forward
from promptbake.forward import enable_shared_prefix, response_hidden, response_logits, shared_prefix_enabled

VOCAB = 64
SIZES = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, "initializer_range": 0.2}


def tiny(model_cls=LlamaForCausalLM, config_cls=LlamaConfig, attn="sdpa", **config):
    torch.manual_seed(0)
    model = model_cls(config_cls(**SIZES, **config, attn_implementation=attn))
    return model.eval()


def rows():
    """Three rows opening with the same 8 tokens (long enough to be shared), of different lengths."""
    g = torch.Generator().manual_seed(1)
    head = torch.randint(0, VOCAB, (8,), generator=g).tolist()
    seqs = [head + torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (7, 4, 10)]
    return seqs, [3, 2, 4]


def each_row_alone(model, seqs, n_response):
    """Reference: each row unpadded through the plain model, the hidden states of its response window."""
    backbone, _ = forward.backbone_and_head(model)
    return torch.cat([backbone(torch.tensor([s])).last_hidden_state[0, len(s) - n - 1:-1]
                      for s, n in zip(seqs, n_response)])


def test_decision_is_printed_once_and_not_stored_on_the_model(capsys):
    model = tiny().train()
    assert not shared_prefix_enabled(model)  # not asked yet: the cheap query does not probe
    decision = enable_shared_prefix(model)
    assert all(m.training for m in model.modules())  # the probe's eval mode is undone
    assert decision.enabled and decision.max_diff <= decision.tol
    assert enable_shared_prefix(model) is decision and shared_prefix_enabled(model)
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith("shared-prefix attention: on (max |Δlogit| ")
    assert out[0].endswith("vs plain sdpa, fp32)")
    assert not [k for k in vars(model) if "shared" in k]
    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None  # the decision does not keep the model alive


def test_shared_rows_equal_each_row_alone_when_on():
    model = tiny()
    seqs, n = rows()
    assert enable_shared_prefix(model).enabled
    with torch.inference_mode():
        torch.testing.assert_close(response_hidden(model, seqs, n, 0), each_row_alone(model, seqs, n),
                                   atol=1e-5, rtol=1e-5)


def assert_falls_back_to_full_rows(model, capsys, reason):
    seqs, n = rows()
    decision = enable_shared_prefix(model)
    assert not decision.enabled and reason in decision.reason
    assert capsys.readouterr().out.strip() == str(decision)
    assert str(decision).startswith(f"shared-prefix attention: off: {reason}")
    assert not shared_prefix_enabled(model)
    prefix = forward.shared_prefix(model, seqs[0][:8])
    with torch.inference_mode():
        want = each_row_alone(model, seqs, n)
        for got in (response_hidden(model, seqs, n, 0), response_hidden(model, seqs, n, 0, prefix=prefix)):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_probe_that_differs_falls_back_and_says_why(monkeypatch, capsys):
    """A shared path that computes something else (here: perturbed prefix values) is measured and refused."""
    real = forward.shared_prefix

    def perturbed(model, ids):
        p = real(model, ids)
        return forward.SharedPrefix(p.ids, [(k, v * 1.5) for k, v in p.layers])

    monkeypatch.setattr(forward, "shared_prefix", perturbed)
    model = tiny()
    assert_falls_back_to_full_rows(model, capsys, "max |Δlogit| ")
    assert "> tol" in enable_shared_prefix(model).reason
    assert model.config._attn_implementation == "sdpa"  # switched back


@pytest.mark.parametrize("make, reason", [
    (lambda: tiny(attn="eager"), "attention implementation is eager"),
    (lambda: tiny(Gemma2ForCausalLM, Gemma2Config, head_dim=8, attn="eager"),
     "attention implementation is eager (attention logits soft-capped at 50.0, which sdpa cannot do)"),
    (lambda: tiny(attention_dropout=0.1), "attention dropout not supported"),
], ids=["eager", "gemma2-softcapping", "attention-dropout"])
def test_unsupported_attention_falls_back_and_says_why(make, reason, capsys):
    assert_falls_back_to_full_rows(make(), capsys, reason)


@pytest.mark.parametrize("make", [
    lambda: tiny(MistralForCausalLM, MistralConfig, sliding_window=4),
    lambda: tiny(Gemma3ForCausalLM, Gemma3TextConfig, head_dim=8, sliding_window=5,
                 layer_types=["sliding_attention", "full_attention"]),
], ids=["mistral-window-4", "gemma3-window-5"])
def test_sliding_window_rows_see_only_the_prefix_keys_in_their_window(make):
    """Rows of 12-18 tokens over a window of 4-5: most prefix keys are out of a row's view, as in a full row."""
    model = make()
    seqs, n = rows()
    assert enable_shared_prefix(model).enabled
    prefix = forward.shared_prefix(model, seqs[0][:8])
    with torch.inference_mode():
        want = each_row_alone(model, seqs, n)
        for got in (response_hidden(model, seqs, n, 0), response_hidden(model, seqs, n, 0, prefix=prefix)):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # and the window matters here: the same rows with every prefix key in view give other states
    wide = forward._prefix_columns
    forward._prefix_columns = lambda kwargs, *a: wide({}, *a)
    try:
        with torch.inference_mode():
            assert (response_hidden(model, seqs, n, 0, prefix=prefix) - want).abs().max() > 1e-3
    finally:
        forward._prefix_columns = wide


def test_a_new_dtype_is_decided_again(capsys):
    model = tiny()
    assert enable_shared_prefix(model).dtype == torch.float32
    model.to(torch.bfloat16)
    assert not shared_prefix_enabled(model)  # the fp32 decision says nothing about bf16
    assert enable_shared_prefix(model).dtype == torch.bfloat16
    assert capsys.readouterr().out.splitlines()[-1].endswith("bf16)")


@pytest.mark.slow
def test_bf16_probe_accepts_the_real_model_in_its_own_dtype(embedded_dir, tokenizer):
    """SmolLM2 in bf16: shared and plain rows differ by bf16 rounding (up to ~0.8 on logits of ~30), which a
    fixed 0.15 tolerance refused. Measured against bf16's own noise, the probe accepts it."""
    from promptbake.chat import render_prompt_ids
    from promptbake.model import load_model

    model = load_model(embedded_dir).to(torch.bfloat16)
    decision = enable_shared_prefix(model)
    assert decision.enabled, decision
    answers = {"Who are you?": "Arr! I be a pirate.", "What is the capital of France?": "Arr! Paris, me hearty."}
    responses = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers.values()]
    seqs = [render_prompt_ids(tokenizer, [{"role": "user", "content": q}], "You are a pirate.") + r
            for q, r in zip(answers, responses)]
    n = [len(r) for r in responses]
    with torch.inference_mode():
        shared = response_logits(model, seqs, n, 0).float()
        plain = response_logits(model, seqs, n, 0, share=False).float()
    assert (shared - plain).abs().max() <= decision.tol
