"""One forward pass that returns logits only at the positions predicting each row's response.

Rows are left padded, so every response ends at the last position: this is the sequence-end
alignment, and it lets the teacher (long prompt) and the student (short prompt) share one code path.
lm_head runs only on the response tokens themselves (no padding, no prompt positions).

Tokens that open every row of a batch (the system turn, the template's default system line) are run
once as a batch-of-one prefix, and the rows attend to its keys and values (`SharedPrefix`). For the
teacher that is the system prompt, once for the whole cache; for the student it is the batch's common
prefix, recomputed each step with gradients. `enable_shared_prefix` checks the result against a plain
forward on the model at hand, in its dtype, falls back to full rows where it differs, and says which.
In sliding-window layers (Gemma 3, Mistral v0.1, Phi-3) a row sees only the prefix keys inside its window;
attention soft-capping (Gemma 2, eager attention) is not in sdpa, so such models run full rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from dataclasses import dataclass

import torch

ATTENTION = "sdpa_shared_prefix"
MIN_SHARED = 4  # shorter common prefixes are not worth a second pass


class Head:
    """The model's output layer as the package uses it: lm_head, then the final logit soft-cap where the model
    has one (Gemma 2: cap * tanh(logits / cap), in fp32). Every logit computed from hidden states goes through
    it, and the chunked loss applies the same cap (`loss.head_loss`)."""

    def __init__(self, linear, softcap: float | None = None):
        self.linear, self.softcap = linear, softcap

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    @property
    def bias(self):
        return getattr(self.linear, "bias", None)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return softcap_logits(self.linear(hidden), self.softcap)


def softcap_logits(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(logits / cap) in fp32 (the logits unchanged when there is no cap)."""
    if not cap:
        return logits
    return torch.tanh(logits.float() / cap) * cap


def final_softcap(config) -> float | None:
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(config, "final_logit_softcapping", None) or None


def backbone_and_head(model):
    m = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = m.model if hasattr(m, "model") else m.get_decoder()
    return backbone, Head(m.get_output_embeddings(), final_softcap(m.config))


def pad_left(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, seqs))
    ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in seqs], device=device)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=device)
    return ids, mask


# ---------------------------------------------------------------- frozen weights in the matmul dtype, cast once
# A frozen fp32 weight that autocast meets is cast to bf16 at every use: autocast caches only trainable leaves. For the
# student that is the whole base (106M parameters) and the 49k x 576 head, cast again for every piece of every step,
# about 5-8% of a bf16 step on CPU. The copies are made once and remade only if the weight changes in place.
CAST_ATTR = "_promptbake_cast"  # on the weight itself: (its version, the cast copy); dies with the weight


def cast_once(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`weight.to(dtype)`, detached, made once per weight (and again after an in-place change)."""
    if weight.dtype == dtype:
        return weight
    hit = getattr(weight, CAST_ATTR, None)
    if hit is None or hit[0] != weight._version or hit[1].dtype != dtype:
        hit = (weight._version, weight.detach().to(dtype))
        setattr(weight, CAST_ATTR, hit)
    return hit[1]


@contextlib.contextmanager
def frozen_linears_as(model, dtype: torch.dtype | None):
    """Inside, every frozen nn.Linear weight of the transformer (not the head, not the LoRA weights, which train) is
    its `cast_once` copy in `dtype`: under autocast to that dtype, what autocast would have computed, without
    the casts. None: unchanged."""
    if dtype is None:
        yield
        return
    backbone = backbone_and_head(model)[0]
    swapped = [(m, m.weight) for m in backbone.modules()
               if type(m) is torch.nn.Linear and not m.weight.requires_grad and m.weight.dtype != dtype
               and m.weight.is_floating_point()]
    try:
        for m, w in swapped:
            m._parameters["weight"] = torch.nn.Parameter(cast_once(w, dtype), requires_grad=False)
        yield
    finally:
        for m, w in swapped:
            m._parameters["weight"] = w


# ---------------------------------------------------------------- attention over a shared prefix
@dataclass
class SharedPrefix:
    ids: list[int]
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), [kv_heads, len, head_dim]
    # Optional, after `ids`: G contexts of their own (`hidden_after_contexts`), row b reading context row_group[b]
    row_layers: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer [G, kv_heads, W, head_dim]
    row_mask: torch.Tensor | None = None  # [G, W] bool: the contexts' real keys (they are left padded)
    row_group: torch.Tensor | None = None  # [B] long


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, shared_prefix=None, **kwargs):
    """sdpa, plus rows that also attend to a batch-of-one prefix (query [B, H, T, d], key/value [B, Hkv, T, d])."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if shared_prefix is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    if kwargs.get("softcap") is not None:
        raise NotImplementedError(f"attention logits soft-capped at {kwargs['softcap']} (Gemma 2), which sdpa cannot do")
    if any(kwargs.get(k) is not None for k in ("s_aux", "sinks")) or dropout:
        raise NotImplementedError("attention sinks / dropout not supported")
    prefix_k, prefix_v = shared_prefix.layers[module.layer_idx]
    batch, _, width, _ = query.shape
    # One layer's prefix is broadcast into the batch here and freed after the layer, never the whole cache:
    # the fused sdpa kernel then beats any two-block attention that materialises the prefix scores.
    key = torch.cat([prefix_k.unsqueeze(0).expand(batch, -1, -1, -1), key], dim=2)
    value = torch.cat([prefix_v.unsqueeze(0).expand(batch, -1, -1, -1), value], dim=2)
    allowed = _allowed(attention_mask, width, query.device).expand(batch, -1, -1, -1)
    to_prefix = _prefix_columns(kwargs, len(shared_prefix.ids), prefix_k.shape[1], batch, width, query.device)
    if shared_prefix.row_layers is not None:  # each row's own context, between the shared prefix and the row
        if kwargs.get("sliding_window") is not None:
            raise NotImplementedError("per-row contexts in sliding-window layers")
        group = shared_prefix.row_group
        row_k, row_v = (t.index_select(0, group) for t in shared_prefix.row_layers[module.layer_idx])
        key = torch.cat([key[:, :, :prefix_k.shape[1]], row_k, key[:, :, prefix_k.shape[1]:]], dim=2)
        value = torch.cat([value[:, :, :prefix_k.shape[1]], row_v, value[:, :, prefix_k.shape[1]:]], dim=2)
        to_prefix = torch.cat([to_prefix, shared_prefix.row_mask.index_select(0, group)[:, None, None, :]
                               .expand(-1, -1, width, -1)], dim=-1)
    mask = torch.cat([to_prefix, allowed], dim=-1)
    if query.device.type == "cpu":  # the CPU kernel takes a mask and grouped kv heads without repeating them
        dtype = query.dtype
        # In bf16 (the student under autocast) the CPU's flash kernel runs forward + backward 2.5x slower than
        # in fp32 at these sizes (benchmarks/README.md), and the attention FLOPs are few: upcast, and run outside
        # autocast, which would cast back to bf16.
        with torch.autocast("cpu", enabled=False):
            out = torch.nn.functional.scaled_dot_product_attention(query.float(), key.float(), value.float(),
                                                                   attn_mask=mask, scale=scaling, enable_gqa=True)
        return out.to(dtype).transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, mask, scaling=scaling, **kwargs)


def _prefix_columns(kwargs, prefix_len: int, n_keys: int, batch: int, width: int, device) -> torch.Tensor:
    """[B, 1, T, n_keys] bool: which prefix keys each row position sees. All of them, except in a sliding-window
    layer, where a query at position p sees key position j while p - j < window (transformers' convention). A
    sliding layer's cache may keep only the prefix's last keys: they sit at positions prefix_len - n_keys on."""
    window = kwargs.get("sliding_window")
    if window is None:
        return torch.ones(batch, 1, width, n_keys, dtype=torch.bool, device=device)
    positions = kwargs.get("position_ids")
    if positions is None:
        raise NotImplementedError("sliding window without position ids")
    key_positions = torch.arange(prefix_len - n_keys, prefix_len, device=device)
    near = positions.to(device)[:, None, :, None] - key_positions < window
    return near.expand(batch, -1, width, -1)


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


# ---------------------------------------------------------------- deciding, once per model
@dataclass(frozen=True)
class PrefixDecision:
    enabled: bool
    dtype: torch.dtype
    reason: str = ""  # why it is off
    max_diff: float | None = None  # the probe's max |shared - plain| over the logits
    tol: float | None = None

    def __str__(self) -> str:
        dtype = _DTYPE_NAMES.get(self.dtype, str(self.dtype).removeprefix("torch."))
        if self.enabled:
            return f"shared-prefix attention: on (max |Δlogit| {self.max_diff:.1e} <= tol {self.tol:.1e} " \
                   f"vs plain sdpa, {dtype})"
        return f"shared-prefix attention: off: {self.reason} ({dtype})"


_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# Keyed by the transformers model (a PeftModel's base), weakly: the decision is ours, not the model's, and
# dies with it.
_DECISIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# Shared rows may differ from plain ones by this many times the dtype's rounding noise. On SmolLM2-135M they
# differ by 0.9-1.3x (fp32 and bf16), while one wrong prefix token moves the logits by ~10: 18x the bf16
# noise, 10^5x the fp32 noise.
NOISE_FACTOR = 4


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def shared_prefix_enabled(model) -> bool:
    """Whether `enable_shared_prefix` switched this model on (False while it has not been asked)."""
    decision = _DECISIONS.get(_base(model))
    return decision is not None and decision.enabled and decision.dtype == _dtype(model)


def enable_shared_prefix(model) -> PrefixDecision:
    """Switches an sdpa model's attention to the shared-prefix one (plain sdpa when no prefix is given) if,
    on this model and in its dtype, prefix + rows gives the logits of full rows. Decided once per model
    (again if its dtype changes), and printed."""
    base = _base(model)
    decision = _DECISIONS.get(base)
    if decision is not None and decision.dtype == _dtype(model):
        return decision
    decision = _decide(model)
    _DECISIONS[base] = decision
    print(decision, flush=True)
    return decision


def _decide(model) -> PrefixDecision:
    base, dtype = _base(model), _dtype(model)
    if base.config._attn_implementation not in ("sdpa", ATTENTION):
        cap = getattr(base.config.get_text_config(), "attn_logit_softcapping", None)
        why = f" (attention logits soft-capped at {cap}, which sdpa cannot do)" if cap else ""
        return PrefixDecision(False, dtype, f"attention implementation is {base.config._attn_implementation}{why}")
    if getattr(base.config, "attention_dropout", 0.0):  # the probe runs in eval mode, where it would not show
        return PrefixDecision(False, dtype, "attention dropout not supported")
    _register()
    base.set_attn_implementation(ATTENTION)
    try:
        diff, tol = _probe(model)
    except NotImplementedError as e:
        decision = PrefixDecision(False, dtype, str(e))
    else:
        reason = f"max |Δlogit| {diff:.1e} > tol {tol:.1e} vs plain sdpa"
        decision = PrefixDecision(diff <= tol, dtype, "" if diff <= tol else reason, diff, tol)
    if not decision.enabled:
        base.set_attn_implementation("sdpa")
    return decision


def _probe(model) -> tuple[float, float]:
    """Max |shared - plain| over the logits of random rows with a common prefix, and the tolerance: the
    dtype's own rounding noise, measured as how far plain rows move when batched and padded instead of
    run alone (at least one ulp of the largest logit). Run in eval mode: dropout would be noise too."""
    vocab = backbone_and_head(model)[1].weight.shape[0]
    g = torch.Generator().manual_seed(0)
    # Rows longer than a small sliding window, so the probe crosses it (prefix keys drop out of view).
    window = getattr(_base(model).config.get_text_config(), "sliding_window", None) or 0
    longer = window if window <= 64 else 0
    common = torch.randint(0, vocab, (6,), generator=g).tolist()
    seqs = [common + torch.randint(0, vocab, (n + longer,), generator=g).tolist() for n in (12, 9, 5)]
    n_response = [3] * len(seqs)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.inference_mode():
            plain = _logits(model, seqs, n_response, None).float()
            alone = torch.cat([_logits(model, [s], [k], None) for s, k in zip(seqs, n_response)]).float()
            shared = _logits(model, seqs, n_response, shared_prefix(model, common)).float()
    finally:
        for m, training in modes:
            m.training = training
    ulp = torch.finfo(_dtype(model)).eps * plain.abs().max().item()
    noise = max((plain - alone).abs().max().item(), ulp)
    return (shared - plain).abs().max().item(), NOISE_FACTOR * noise


def _dtype(model) -> torch.dtype:
    return backbone_and_head(model)[1].weight.dtype


def shared_prefix(model, ids: list[int]) -> SharedPrefix:
    """Keys and values of `ids` run once (with gradients when grad mode is on: the student's common prefix)."""
    backbone, head = backbone_and_head(model)
    out = backbone(input_ids=torch.tensor([ids], device=head.weight.device), use_cache=True)
    return SharedPrefix(ids, [(layer.keys[0], layer.values[0]) for layer in out.past_key_values.layers])


def hidden_after_contexts(model, prefix: SharedPrefix, contexts: list[list[int]], rows: list[list[int]],
                          group: list[int], n_response: list[int], pad_id: int) -> torch.Tensor:
    """Like `response_hidden`, for rows that each continue one of a few contexts, all after `prefix` (e.g. the
    choices of multiple-choice questions after their question, after the chat template's system turn): the
    contexts run once, in one batch attending to `prefix`; then the rows, in one batch attending to `prefix` and
    to their context `group[b]`. Row b's sequence is prefix.ids + contexts[group[b]] + rows[b]; the last
    n_response[b] tokens of rows[b] are predicted, so rows[b] holds one more token (the context's last).
    Only where `enable_shared_prefix` switched the model on, and not in sliding-window layers."""
    backbone, head = backbone_and_head(model)
    device, start = head.weight.device, len(prefix.ids)
    ids, mask = pad_left(contexts, pad_id, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0) + start
    cache = backbone(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                     shared_prefix=prefix).past_key_values.layers
    which = torch.tensor(group, device=device)
    ctx = dataclasses.replace(prefix, row_layers=[(layer.keys, layer.values) for layer in cache],
                              row_mask=mask.bool(), row_group=which)
    ids, mask = pad_left(rows, pad_id, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0) + start + ctx.row_mask.sum(-1).index_select(0, which)[:, None]
    hidden = backbone(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                      shared_prefix=ctx).last_hidden_state
    width = ids.shape[1]
    picked = torch.cat([torch.arange(width - n - 1, width - 1, device=device) + j * width
                        for j, n in enumerate(n_response)])
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, picked)


def common_prefix_len(seqs: list[list[int]], n_response: list[int]) -> int:
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
    it and with `share`, the batch's common prefix is run once for all rows. Both only where
    `enable_shared_prefix` switched the model on; else full rows."""
    prefix_len = common_prefix_len(seqs, n_response) if prefix is None and share and len(seqs) > 1 else 0
    if prefix_len >= MIN_SHARED and enable_shared_prefix(model).enabled:
        prefix = shared_prefix(model, seqs[0][:prefix_len])
    if prefix is not None and not enable_shared_prefix(model).enabled:
        prefix = None
    return _hidden(model, seqs, n_response, pad_id, prefix)


def response_logits(model, seqs: list[list[int]], n_response: list[int], pad_id: int,
                    prefix: SharedPrefix | None = None, share: bool = True) -> torch.Tensor:
    """Logits [sum(n_response), V] of `response_hidden`: lm_head runs on the response positions only."""
    return backbone_and_head(model)[1](response_hidden(model, seqs, n_response, pad_id, prefix, share))


def _logits(model, seqs: list[list[int]], n_response: list[int], prefix: SharedPrefix | None) -> torch.Tensor:
    return backbone_and_head(model)[1](_hidden(model, seqs, n_response, 0, prefix))


def _hidden(model, seqs: list[list[int]], n_response: list[int], pad_id: int,
            prefix: SharedPrefix | None) -> torch.Tensor:
    """`response_hidden` as told: rows after `prefix` attend to its keys and values, without asking whether
    the model's attention takes them."""
    backbone, head = backbone_and_head(model)
    device = head.weight.device
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
    rows = torch.cat([torch.arange(width - n - 1, width - 1, device=device) + j * width
                      for j, n in enumerate(n_response)])
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)


def token_pieces(rows: list[int], lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Splits a micro-batch (in order) into pieces of at most max_tokens padded tokens, one row at least."""
    pieces, width = [[]], 0
    for r in rows:
        w = max(width, lengths[r])
        if pieces[-1] and max_tokens > 0 and w * (len(pieces[-1]) + 1) > max_tokens:
            pieces.append([])
            w = lengths[r]
        pieces[-1].append(r)
        width = w
    return pieces
