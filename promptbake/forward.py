"""One forward pass that returns logits only at the positions predicting each row's response.

Rows are left padded, so every response ends at the last position: this is the sequence-end
alignment, and it lets the teacher (long prompt) and the student (short prompt) share one code path.
lm_head runs only on the response window, never over the whole sequence.
"""

from __future__ import annotations

import copy

import torch


def backbone_and_head(model):
    m = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = m.model if hasattr(m, "model") else m.get_decoder()
    return backbone, m.get_output_embeddings()


def pad_left(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, seqs))
    ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in seqs], device=device)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=device)
    return ids, mask


def response_logits(model, seqs: list[list[int]], n_response: list[int], pad_id: int,
                    prefix_cache=None, prefix_len: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (logits [B, N, V], valid [B, N]) with N = max(n_response). Row i's response is its last
    n_response[i] tokens; position j of the window predicts token j of the response (right-aligned).

    With `prefix_cache` (a KV cache of `prefix_len` tokens shared by all rows, e.g. the system prompt),
    `seqs` hold only what follows the prefix."""
    backbone, head = backbone_and_head(model)
    device = head.weight.device
    ids, mask = pad_left(seqs, pad_id, device)
    batch, width = ids.shape
    positions = (mask.cumsum(-1) - 1).clamp(min=0) + prefix_len
    past = None
    if prefix_cache is not None:
        past = copy.deepcopy(prefix_cache)
        past.batch_repeat_interleave(batch)
        mask = torch.cat([torch.ones(batch, prefix_len, dtype=mask.dtype, device=device), mask], dim=1)
    hidden = backbone(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=past,
                      use_cache=past is not None).last_hidden_state
    n_max = max(n_response)
    logits = head(hidden[:, width - n_max - 1: width - 1])
    n = torch.tensor(n_response, device=device)
    valid = torch.arange(n_max, device=device)[None, :] >= (n_max - n)[:, None]
    return logits, valid


@torch.inference_mode()
def prefix_kv(model, prefix_ids: list[int]):
    """The KV cache of a prefix shared by every row (the system prompt), computed once."""
    backbone, head = backbone_and_head(model)
    ids = torch.tensor([prefix_ids], device=head.weight.device)
    return backbone(input_ids=ids, use_cache=True).past_key_values
