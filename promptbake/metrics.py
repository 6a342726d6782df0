"""Measures shared by bake.py and evaluate.py: full-vocabulary KL to the prompted teacher, top-1
agreement, and adherence (does an answer show the baked behaviour)."""

from __future__ import annotations

import math
import re
from collections import Counter
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

from .forward import backbone_and_head, response_hidden, softcap_logits
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


# ---------------------------------------------------------------- degeneration
WORD = re.compile(r"\w+(?:'\w+)*")
LOOP_MIN_WORDS = 8  # shorter answers are too short to call loops
LOOP_DISTINCT_BIGRAMS = 0.5  # fewer than half of the word bigrams distinct: the answer goes round in circles
LOOP_NGRAM, LOOP_NGRAM_REPEATS = 3, 4  # or one word 3-gram 4 times or more: a loop at the end of a longer answer
CHAR_RUN = re.compile(r"(\S.{0,9}?)\1{9,}")  # or a piece of up to 10 characters 10 times in a row


def is_loop(text: str) -> bool:
    """A degenerate answer: "Aye, aye, aye, aye, ..." or a phrase repeated over and over. Two signs, either enough:
    fewer than half of its word bigrams distinct (a normal answer of 20-60 words has nearly all distinct), or one word
    3-gram 4 times or more (a normal answer repeats a 3-gram twice at most; a loop that starts late still shows it).
    Answers under 8 words are never loops: too short to tell, unless a short piece runs ten times in a row
    ("hahahahaha...", "!!!!!!!!!!"), which no word count sees."""
    if CHAR_RUN.search(text):
        return True
    words = [w.lower() for w in WORD.findall(text)]
    if len(words) < LOOP_MIN_WORDS:
        return False
    bigrams = list(zip(words, words[1:]))
    if len(set(bigrams)) < LOOP_DISTINCT_BIGRAMS * len(bigrams):
        return True
    grams = Counter(zip(*(words[i:] for i in range(LOOP_NGRAM))))
    return max(grams.values()) >= LOOP_NGRAM_REPEATS


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
    # exactly 0 and 1 at the ends (the formula gives them up to rounding)
    return (0.0 if k == 0 else max(0.0, centre - half)), (1.0 if k == n else min(1.0, centre + half))


def rate(hits: list[bool | None]) -> dict:
    """{"k", "n", "rate", "ci"} of a list of pass/fail (None: not counted). rate and ci are None when n is 0."""
    counted = [h for h in hits if h is not None]
    k, n = sum(counted), len(counted)
    ci = wilson(k, n)
    return {"k": k, "n": n, "rate": k / n if n else None, "ci": list(ci) if ci else None}


def mean_interval(values: list[float], resamples: int = 2000, seed: int = 0) -> dict:
    """{"mean", "ci", "n"}: the mean and its 95% percentile-bootstrap interval (over answers, fixed seed)."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if len(v) == 0:
        return {"mean": None, "ci": None, "n": 0}
    means = v[np.random.default_rng(seed).integers(0, len(v), (resamples, len(v)))].mean(1)
    return {"mean": float(v.mean()), "ci": [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))],
            "n": len(v)}


# ---------------------------------------------------------------- a judge-free score
@torch.inference_mode()
def response_logprobs(model, seqs: list[list[int]], n_response: list[int], pad_id: int) -> list[float]:
    """Sum of log P(token) over each row's last n_response[i] tokens, in fp32 (the head's weights cast up)."""
    head = backbone_and_head(model)[1]
    weight = head.weight.float()
    bias = head.bias.float() if head.bias is not None else None
    hidden = response_hidden(model, seqs, n_response, pad_id)
    targets = torch.cat([torch.tensor(s[len(s) - n:], dtype=torch.long) for s, n in zip(seqs, n_response)])
    targets = targets.to(hidden.device)
    token_lp = torch.empty(len(targets), dtype=torch.float32, device=hidden.device)
    for c in range(0, len(targets), KL_CHUNK):
        logits = softcap_logits(F.linear(hidden[c:c + KL_CHUNK].float(), weight, bias), head.softcap)
        token_lp[c:c + KL_CHUNK] = logits.log_softmax(-1).gather(-1, targets[c:c + KL_CHUNK, None])[:, 0]
    return [part.sum().item() for part in token_lp.split(n_response)]


@torch.inference_mode()
def prompt_llr(model, examples, pad_id: int, batch_size: int = 8) -> list[float | None]:
    """Per answer: mean over its tokens of log P(y | u, x) - log P(y | x), both under the base model (adapter off):
    how much more likely the prompted teacher finds the answer than the unprompted base. `examples` carry
    teacher_ids = [u, x] + y and student_ids = [x] + y (teacher.build_examples with student_prompt ""). An answer
    written the way the prompt asks scores above 0; None for an empty answer."""
    out = []
    disable = model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()
    with disable:
        for b in range(0, len(examples), batch_size):
            ex = examples[b:b + batch_size]
            live = [e for e in ex if e.n_response > 0]
            n = [e.n_response for e in live]
            with_prompt = response_logprobs(model, [e.teacher_ids for e in live], n, pad_id) if live else []
            without = response_logprobs(model, [e.student_ids for e in live], n, pad_id) if live else []
            scores = iter([(a - c) / k for a, c, k in zip(with_prompt, without, n)])
            out += [next(scores) if e.n_response > 0 else None for e in ex]
    return out


def kl_ratio(kl_before: float | None, kl_after: float | None) -> float | None:
    """Held-out KL to the prompted teacher after baking over before; None when either is missing or the base
    already matched the teacher (kl_before 0: nothing to cut)."""
    return kl_after / kl_before if kl_before and kl_after is not None else None


def kl_cut(kl_before: float | None, kl_after: float | None) -> float | None:
    """The share of the KL that baking removed (0.9: 90% lower); None as kl_ratio."""
    ratio = kl_ratio(kl_before, kl_after)
    return None if ratio is None else 1 - ratio


def headline_rate(adherence: dict | None) -> float | None:
    """One model's adherence figure in eval.json: the share of non-degenerate answers passing every declared check
    (older files: the marker rate); None when nothing was measured."""
    if not isinstance(adherence, dict):
        return adherence if isinstance(adherence, (int, float)) else None
    if "non_degenerate" in adherence:
        return (adherence["non_degenerate"] or {}).get("rate")
    return adherence.get("marker_rate")
