"""Measures shared by bake.py and evaluate.py: full-vocabulary KL to the prompted teacher, top-1
agreement, and adherence (does an answer show the baked behaviour)."""

from __future__ import annotations

import math
import re
from contextlib import nullcontext

import torch

from .forward import backbone_and_head, response_hidden
from .loss import full_kl

KL_CHUNK = 128  # positions whose full-vocabulary logits exist at once


@torch.inference_mode()
def kl_and_agreement(model, examples, pad_id: int, batch_size: int = 8, adapter: bool = True,
                     teacher_model=None) -> tuple[float, float]:
    """Full-vocabulary KL(prompted base || model without prompt), and top-1 agreement, token-weighted.
    The teacher is the model with its adapter disabled, or `teacher_model` (e.g. the plain base under a baked
    chain); adapter=False measures the base model without the prompt."""
    kl, agree, n = 0.0, 0.0, 0
    head = backbone_and_head(model)[1]
    teacher_head = backbone_and_head(teacher_model)[1] if teacher_model is not None else head
    for b in range(0, len(examples), batch_size):
        ex = examples[b:b + batch_size]
        n_resp = [e.n_response for e in ex]
        with nullcontext() if teacher_model is not None else model.disable_adapter():
            t_hidden = response_hidden(teacher_model or model, [e.teacher_ids for e in ex], n_resp, pad_id)
        with nullcontext() if adapter else model.disable_adapter():
            s_hidden = response_hidden(model, [e.student_ids for e in ex], n_resp, pad_id)
        for c in range(0, len(t_hidden), KL_CHUNK):
            t, s = teacher_head(t_hidden[c:c + KL_CHUNK]), head(s_hidden[c:c + KL_CHUNK])
            kl += full_kl(t, s, torch.ones(len(t), device=t.device)).item() * len(t)
            agree += (t.argmax(-1) == s.argmax(-1)).sum().item()
        n += len(t_hidden)
    return kl / n, agree / n


def follows(text: str, markers: list[str], regex: str) -> bool:
    """An answer shows the behaviour when `regex` matches it (any case), else when it holds one of `markers`."""
    if regex:
        return re.search(regex, text, flags=re.I) is not None
    low = text.lower()
    return any(m.lower() in low for m in markers)


def marker_rate(texts: list[str], markers: list[str], regex: str) -> float | None:
    if not (markers or regex) or not texts:
        return None
    return sum(follows(t, markers, regex) for t in texts) / len(texts)


# ---------------------------------------------------------------- intervals
Z95 = 1.959963984540054


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval of a rate k/n (95% by default); None when n is 0. Unlike k/n +- 1.96 SE it stays
    inside [0, 1] and is not empty at 0/n or n/n."""
    if n == 0:
        return None
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def rate(hits: list[bool | None]) -> dict:
    """{"k", "n", "rate", "ci"} of a list of pass/fail (None: not counted). rate and ci are None when n is 0."""
    counted = [h for h in hits if h is not None]
    k, n = sum(counted), len(counted)
    ci = wilson(k, n)
    return {"k": k, "n": n, "rate": k / n if n else None, "ci": list(ci) if ci else None}
