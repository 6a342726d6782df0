"""The baking objective: forward KL(teacher || student) per response token, over the teacher's top-K
tokens plus one tail bucket for the rest of the vocabulary.

Without the tail bucket, Σ_k p_k (log p_k − log q_k) is not a divergence: a student that piles all its
mass onto the K ids minimises it (over-sharpening), and it can go negative. With the bucket it is the
exact KL between the two distributions coarsened to K+1 outcomes: ≥ 0, ≤ the full KL, and equal to it
when K = V. All arithmetic is float32.
"""

from __future__ import annotations

import math

import torch

_LOG_EPS = -1e-7  # log Σp ≤ this: keeps log(1 − Σp) finite when the top-K hold (almost) all the mass


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x ≤ 0, stable at both ends (Mächler 2012)."""
    x = x.clamp(max=_LOG_EPS)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def topk_kl_with_tail(student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor,
                      mask: torch.Tensor) -> torch.Tensor:
    """Mean over valid positions of KL(p || q) on the teacher's top-K plus a tail bucket.

    student_logits:   [..., V] raw logits of the student at the response positions
    teacher_ids:      [..., K] the teacher's top-K token ids
    teacher_logprobs: [..., K] the teacher's log-probabilities at those ids (full-vocabulary log_softmax)
    mask:             [...]    1 where the position is trained
    """
    logits = student_logits.float()
    log_q = logits.gather(-1, teacher_ids.long()) - torch.logsumexp(logits, dim=-1, keepdim=True)
    log_p = teacher_logprobs.float()
    kl_topk = (log_p.exp() * (log_p - log_q)).sum(-1)
    log_p_tail = log1mexp(torch.logsumexp(log_p, dim=-1))
    log_q_tail = log1mexp(torch.logsumexp(log_q, dim=-1))
    kl_tail = log_p_tail.exp() * (log_p_tail - log_q_tail)
    mask = mask.float()
    return ((kl_topk + kl_tail) * mask).sum() / mask.sum().clamp(min=1.0)


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
