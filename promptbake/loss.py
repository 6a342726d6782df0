"""The baking objective: forward KL(teacher || student) per response token, over the teacher's top-K
tokens plus one tail bucket for the rest of the vocabulary.

Without the tail bucket, Σ_k p_k (log p_k − log q_k) is not a divergence: a student that piles all its
mass onto the K ids minimises it (over-sharpening), and it can go negative. With the bucket it is the
exact KL between the two distributions coarsened to K+1 outcomes: ≥ 0, ≤ the full KL, and equal to it
when K = V. All arithmetic is float32.
"""

from __future__ import annotations

import functools
import math

import torch

from .forward import cast_once

_LOG_EPS = -1e-7  # log Σp ≤ this: keeps log(1 − Σp) finite when the top-K hold (almost) all the mass


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x ≤ 0, stable at both ends (Mächler 2012)."""
    x = x.clamp(max=_LOG_EPS)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


class _LogProbsAt(torch.autograd.Function):
    """log_softmax(logits)[ids] without materialising log_softmax, and a one-pass backward:
    d/dz_j = Σ_k g_k [j = ids_k] − softmax(z)_j Σ_k g_k. Autograd's logsumexp would take three passes
    over [N, V] for the same gradient; at V = 49k this is the most memory-bound part of a step."""

    @staticmethod
    def forward(ctx, logits, ids):
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        ctx.save_for_backward(logits, ids)
        return logits.gather(-1, ids) - lse

    @staticmethod
    def backward(ctx, grad):
        logits, ids = ctx.saved_tensors
        grad_logits = torch.softmax(logits, dim=-1).mul_(-grad.sum(-1, keepdim=True))
        return grad_logits.scatter_add_(-1, ids, grad), None


def log_probs_at(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits.float())[..., ids], float32."""
    return _LogProbsAt.apply(logits.float(), ids.long())


def topk_tail_kl_per_token(log_q: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(p || q) on the top-K ids plus the tail bucket, per position, from the student's log-probs at the
    teacher's top-K ids (log_q) and the teacher's own (teacher_logprobs), both [..., K]."""
    log_p = teacher_logprobs.float()
    kl_topk = (log_p.exp() * (log_p - log_q)).sum(-1)
    log_p_tail = log1mexp(torch.logsumexp(log_p, dim=-1))
    log_q_tail = log1mexp(torch.logsumexp(log_q, dim=-1))
    return kl_topk + log_p_tail.exp() * (log_p_tail - log_q_tail)


def topk_kl_with_tail(student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor,
                      mask: torch.Tensor) -> torch.Tensor:
    """Mean over valid positions of KL(p || q) on the teacher's top-K plus a tail bucket.

    student_logits:   [..., V] raw logits of the student at the response positions
    teacher_ids:      [..., K] the teacher's top-K token ids
    teacher_logprobs: [..., K] the teacher's log-probabilities at those ids (full-vocabulary log_softmax)
    mask:             [...]    1 where the position is trained
    """
    per_token = topk_tail_kl_per_token(log_probs_at(student_logits, teacher_ids), teacher_logprobs)
    mask = mask.float()
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


class _HeadLoss(torch.autograd.Function):
    """Sum over positions of per_token(log_softmax(head(hidden))[ids], logprobs), with the [N, V] logits made and
    dropped CHUNK positions at a time. The head is frozen, so the gradient wrt `hidden` is all the backward
    needs: it is computed here, chunk by chunk, and only scaled in backward. One copy of this code serves every
    objective (forward KL off-policy, reverse KL or JSD on-policy), so their numerics cannot drift apart.
    `softcap`: the model's final logit soft-cap (Gemma 2), applied to each chunk's logits as the model does."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, logprobs, chunk, per_token, softcap):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden)
        for c in range(0, len(hidden), chunk):
            with torch.enable_grad():
                logits = torch.nn.functional.linear(hidden[c:c + chunk], weight, bias).float().requires_grad_()
                capped = torch.tanh(logits / softcap) * softcap if softcap else logits
                loss = per_token(log_probs_at(capped, ids[c:c + chunk]), logprobs[c:c + chunk]).sum()
                (grad_logits,) = torch.autograd.grad(loss, logits)
            total += loss.detach()
            grad_hidden[c:c + chunk] = grad_logits.to(weight.dtype) @ weight
        ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_total.to(grad_hidden.dtype), None, None, None, None, None, None, None


def head_loss(hidden: torch.Tensor, head, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor,
              per_token, chunk: int, matmul_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Mean over the N positions of per_token(...) from hidden states [N, d] through a frozen linear head
    (a `forward.Head`, whose final soft-cap is applied, or a plain nn.Linear). `matmul_dtype` (training only):
    the head's two matmuls run in it (bf16: precision.py); the logits are cast to fp32 before the softmax."""
    if torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
        weight, bias = head.weight, head.bias
        if matmul_dtype is not None and matmul_dtype != weight.dtype:  # the frozen head cast once (remade if it changes)
            hidden, weight = hidden.to(matmul_dtype), cast_once(weight, matmul_dtype)
            bias = cast_once(bias, matmul_dtype) if bias is not None else None
        total = _HeadLoss.apply(hidden, weight, bias, teacher_ids.long(), teacher_logprobs, chunk, per_token,
                                getattr(head, "softcap", None))
    else:
        total = sum(per_token(log_probs_at(head(hidden[c:c + chunk]), teacher_ids[c:c + chunk]),
                              teacher_logprobs[c:c + chunk]).sum() for c in range(0, len(hidden), chunk))
    return total / max(len(hidden), 1)


def _frozen_linear(head) -> bool:
    linear = getattr(head, "linear", head)  # a forward.Head wraps the model's lm_head
    return isinstance(linear, torch.nn.Linear) and not linear.weight.requires_grad


def head_topk_kl_with_tail(hidden: torch.Tensor, head: torch.nn.Module, teacher_ids: torch.Tensor,
                           teacher_logprobs: torch.Tensor, chunk: int = 128,
                           matmul_dtype: torch.dtype | None = None) -> torch.Tensor:
    """topk_kl_with_tail(head(hidden), ...) averaged over all N positions (hidden [N, d]), without ever
    holding the [N, V] logits or their gradient: at V = 49k-152k those are the largest tensors of a step."""
    if not _frozen_linear(head):  # a trained head: plain autograd
        return topk_kl_with_tail(head(hidden), teacher_ids, teacher_logprobs, hidden.new_ones(len(hidden)))
    return head_loss(hidden, head, teacher_ids, teacher_logprobs, topk_tail_kl_per_token, chunk, matmul_dtype)


def full_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over valid positions of the full-vocabulary KL(p || q); for evaluation and references."""
    log_p = torch.log_softmax(teacher_logits.float(), dim=-1)
    log_q = torch.log_softmax(student_logits.float(), dim=-1)
    per_token = (log_p.exp() * (log_p - log_q)).sum(-1)
    mask = mask.float()
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


def teacher_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, logprobs) of the K most likely tokens, from a float32 log_softmax."""
    logprobs, ids = torch.log_softmax(logits.float(), dim=-1).topk(k, dim=-1)
    return ids, logprobs


# ---------------------------------------------------------------- on-policy: divergences of coarsened distributions
def coarse_log_probs(log_at_k: torch.Tensor) -> torch.Tensor:
    """[..., K] log-probabilities at K ids -> [..., K+1]: the same plus the tail bucket log(1 − Σ exp), so the
    K+1 outcomes form a distribution (the full one coarsened to {each of the K ids, anything else})."""
    return torch.cat([log_at_k, log1mexp(torch.logsumexp(log_at_k, dim=-1, keepdim=True))], dim=-1)


def _kl_of_logs(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def coarse_divergence_per_token(log_q: torch.Tensor, teacher_logprobs: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """Generalised JSD between the teacher P and the student Q, both coarsened to the teacher's top-K ids plus one
    tail bucket, per position. log_q: the student's log-probs at those ids, teacher_logprobs: the teacher's, [..., K].

    beta = 1: reverse KL(Q || P), the on-policy distillation loss (mode-seeking: it never asks the student to
    cover teacher tokens it does not produce). beta = 0: forward KL(P || Q), as `topk_tail_kl_per_token`.
    Between: beta KL(P || M) + (1 − beta) KL(Q || M) with M = beta P + (1 − beta) Q (TRL GKD's convention).
    Exact for the coarsened distributions: ≥ 0, 0 iff they match, and ≤ the full-vocabulary divergence."""
    wide = torch.promote_types(log_q.dtype, torch.float32)  # float32, or float64 when given (gradcheck)
    log_p = coarse_log_probs(teacher_logprobs.to(wide))
    log_q = coarse_log_probs(log_q.to(wide))
    if beta >= 1:
        return _kl_of_logs(log_q, log_p)
    if beta <= 0:
        return _kl_of_logs(log_p, log_q)
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log(1 - beta))
    return beta * _kl_of_logs(log_p, log_m) + (1 - beta) * _kl_of_logs(log_q, log_m)


def topk_divergence(student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor,
                    mask: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """Mean over valid positions of coarse_divergence_per_token, from the student's raw logits [..., V]."""
    per_token = coarse_divergence_per_token(log_probs_at(student_logits, teacher_ids), teacher_logprobs, beta)
    mask = mask.float()
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


def head_topk_divergence(hidden: torch.Tensor, head: torch.nn.Module, teacher_ids: torch.Tensor,
                         teacher_logprobs: torch.Tensor, beta: float = 1.0, chunk: int = 128,
                         matmul_dtype: torch.dtype | None = None) -> torch.Tensor:
    """topk_divergence(head(hidden), ...) averaged over all N positions (hidden [N, d]), never holding the
    [N, V] logits or their gradient (see head_topk_kl_with_tail)."""
    if not _frozen_linear(head):  # a trained head: plain autograd
        return topk_divergence(head(hidden), teacher_ids, teacher_logprobs, hidden.new_ones(len(hidden)), beta)
    return head_loss(hidden, head, teacher_ids, teacher_logprobs,
                     functools.partial(coarse_divergence_per_token, beta=beta), chunk, matmul_dtype)
