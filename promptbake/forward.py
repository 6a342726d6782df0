"""One forward pass that returns logits only at the positions predicting each row's response.

Rows are left padded, so every response ends at the last position: this is the sequence-end
alignment, and it lets the teacher (long prompt) and the student (short prompt) share one code path.
lm_head runs only on the response tokens themselves (no padding, no prompt positions).

Tokens that open every row of a batch (the system turn, the template's default system line) are run
once as a batch-of-one prefix, and the rows attend to its keys and values (`SharedPrefix`). For the
teacher that is the system prompt, once for the whole cache; for the student it is the batch's common
head, recomputed each step with gradients. `supports_shared_prefix` checks the result against a plain
forward on the model at hand and falls back to full rows where it differs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ATTENTION = "sdpa_shared_prefix"
MIN_SHARED = 4  # shorter common heads are not worth a second pass


def backbone_and_head(model):
    m = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = m.model if hasattr(m, "model") else m.get_decoder()
    return backbone, m.get_output_embeddings()


def pad_left(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, seqs))
    ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in seqs], device=device)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=device)
    return ids, mask


# ---------------------------------------------------------------- attention over a shared prefix
@dataclass
class SharedPrefix:
    ids: list[int]
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), [kv_heads, len, head_dim]


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, shared_prefix=None, **kwargs):
    """sdpa, plus rows that also attend to a batch-of-one prefix (query [B, H, T, d], key/value [B, Hkv, T, d])."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if shared_prefix is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    if any(kwargs.get(k) is not None for k in ("sliding_window", "softcap", "s_aux", "sinks")) or dropout:
        raise NotImplementedError("shared-prefix attention supports plain causal attention only")
    prefix_k, prefix_v = shared_prefix.layers[module.layer_idx]
    batch, _, width, _ = query.shape
    # One layer's prefix is broadcast into the batch here and freed after the layer, never the whole cache:
    # the fused sdpa kernel then beats any two-block attention that materialises the prefix scores.
    key = torch.cat([prefix_k.unsqueeze(0).expand(batch, -1, -1, -1), key], dim=2)
    value = torch.cat([prefix_v.unsqueeze(0).expand(batch, -1, -1, -1), value], dim=2)
    allowed = _allowed(attention_mask, width, query.device).expand(batch, -1, -1, -1)
    mask = torch.cat([allowed.new_ones(batch, 1, width, prefix_k.shape[1]), allowed], dim=-1)
    if query.device.type == "cpu":  # the CPU kernel takes a mask and grouped kv heads without repeating them
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                                               enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, mask, scaling=scaling, **kwargs)


def _allowed(attention_mask, width: int, device) -> torch.Tensor:
    """[B or 1, 1, T, T] bool: causal and not padding, from sdpa's bool mask (None means plain causal)."""
    if attention_mask is None:
        return torch.ones(width, width, dtype=torch.bool, device=device).tril()[None, None]
    return attention_mask[..., -width:]


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    if ATTENTION not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionInterface.register(ATTENTION, _attention)
        AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def supports_shared_prefix(model) -> bool:
    """Switches an sdpa model to the shared-prefix attention (plain sdpa when no prefix is given) if, on
    this model, prefix + rows gives the same logits as full rows. Checked once per model."""
    _, head = backbone_and_head(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(base, "_shared_prefix_ok"):
        return base._shared_prefix_ok
    ok = base._shared_prefix_ok = False
    if base.config._attn_implementation in ("sdpa", ATTENTION):
        _register()
        base.set_attn_implementation(ATTENTION)
        base._shared_prefix_ok = True  # for the probe's own calls
        try:
            vocab = head.weight.shape[0]
            g = torch.Generator().manual_seed(0)
            seqs = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (12, 9)]
            seqs = [seqs[0][:5] + s for s in seqs]
            with torch.inference_mode():
                full = response_logits(model, seqs, [3, 3], 0, share=False)
                shared = response_logits(model, seqs, [3, 3], 0, prefix=shared_prefix(model, seqs[0][:5]))
            tol = 1e-3 if head.weight.dtype == torch.float32 else 0.15
            ok = bool(torch.allclose(full.float(), shared.float(), atol=tol, rtol=tol))
        except NotImplementedError:
            ok = False
        if not ok:
            base.set_attn_implementation("sdpa")
    base._shared_prefix_ok = ok
    return ok


def shared_prefix(model, ids: list[int]) -> SharedPrefix:
    """Keys and values of `ids` run once (with gradients when grad mode is on: the student's head)."""
    backbone, head = backbone_and_head(model)
    out = backbone(input_ids=torch.tensor([ids], device=head.weight.device), use_cache=True)
    return SharedPrefix(ids, [(layer.keys[0], layer.values[0]) for layer in out.past_key_values.layers])


def common_head(seqs: list[list[int]], n_response: list[int]) -> int:
    """Length of the tokens that open every row and stop before the first position whose logits are needed."""
    limit = min(len(s) - n - 1 for s, n in zip(seqs, n_response))
    first = seqs[0]
    n = 0
    while n < limit and all(s[n] == first[n] for s in seqs):
        n += 1
    return n


# ---------------------------------------------------------------- the forward
def response_hidden(model, seqs: list[list[int]], n_response: list[int], pad_id: int,
                    prefix: SharedPrefix | None = None, share: bool = True) -> torch.Tensor:
    """Final hidden states [sum(n_response), d] at the positions predicting each row's last n_response[i]
    tokens, rows concatenated in order.

    `prefix`: the KV of tokens every row starts with (the teacher's system turn), computed once; without
    it and with `share`, the batch's common head is run once for all rows."""
    backbone, head = backbone_and_head(model)
    device = head.weight.device
    head_len = common_head(seqs, n_response) if prefix is None and share and len(seqs) > 1 else 0
    if head_len >= MIN_SHARED and supports_shared_prefix(model):
        prefix = shared_prefix(model, seqs[0][:head_len])
    if prefix is not None and not supports_shared_prefix(model):
        prefix = None
    kwargs = {}
    if prefix is not None:
        p = len(prefix.ids)
        assert all(s[:p] == prefix.ids for s in seqs), "every row must start with the shared prefix"
        seqs = [s[p:] for s in seqs]
        kwargs = {"shared_prefix": prefix}
    ids, mask = pad_left(seqs, pad_id, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0) + (len(prefix.ids) if prefix is not None else 0)
    hidden = backbone(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                      **kwargs).last_hidden_state
    width = ids.shape[1]
    rows = torch.cat([torch.arange(width - n - 1, width - 1, device=device) + j * width for j, n in enumerate(n_response)])
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)


def response_logits(model, seqs: list[list[int]], n_response: list[int], pad_id: int,
                    prefix: SharedPrefix | None = None, share: bool = True) -> torch.Tensor:
    """Logits [sum(n_response), V] of `response_hidden`: lm_head runs on the response positions only."""
    return backbone_and_head(model)[1](response_hidden(model, seqs, n_response, pad_id, prefix, share))
