"""Local sampling: our batched decode loop (HF's sampling distribution), the model's own top-K on the way, and
the answering of rows. The stages (generate, evaluate, train, onpolicy) sample through here."""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
from tqdm.auto import tqdm
from transformers.cache_utils import DynamicCache, DynamicLayer

from .chat import render_prompt_ids, stop_ids
from .data import Row
from .forward import backbone_and_head, pad_left, softcap_logits
from .io import derive_seed
from .loss import teacher_topk

# ---------------------------------------------------------------- local batched generation
# The decode loop is our own, not HF `generate`: rows that have ended leave the batch (their keys and values too), so a
# batch of answers of mixed lengths costs about its mean length, not its longest; each layer's keys and values are
# written into room allocated once, not concatenated anew at every token; and the head runs on the last position only.
# Sampling draws from HF's distribution (temperature, then top-p; greedy = argmax), so the answers have the same
# distribution, not the same draws. `_generate_hf` is the HF path, kept for benchmarks/bench_bake.py's side-by-side figure.
COMPACT_FRACTION = 8  # drop ended rows once they are 1/8 of the batch: each drop copies the cache


class TopKRecorder:
    """Keeps the model's own top-K log-probabilities at every generated position, from the raw logits of each step
    (before temperature, top-p or any logits processor), with the teacher cache's exact op (fp32 log_softmax, then
    top-K). O(B x steps x K) memory, not V. `add(logits, rows)` records a step of the decode loop (rows: which
    prompts its logits belong to); as a context manager it hooks the output head instead (HF generate)."""

    def __init__(self, model, k: int):
        head = backbone_and_head(model)[1]
        self.linear, self.softcap, self.k, self.steps = head.linear, head.softcap, k, []

    def add(self, logits: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        self.steps.append((rows, *teacher_topk(logits, min(self.k, logits.shape[-1]))))

    def per_row(self, n_rows: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(ids [n, K], logprobs [n, K]) of each prompt, its steps in order."""
        rows = torch.cat([r for r, _, _ in self.steps]).cpu()
        order = torch.argsort(rows, stable=True)  # by prompt; each prompt's steps stay in order
        counts = torch.bincount(rows, minlength=n_rows).tolist()
        ids = torch.cat([i for _, i, _ in self.steps]).cpu()[order].split(counts)
        lps = torch.cat([lp for _, _, lp in self.steps]).cpu()[order].split(counts)
        return list(zip(ids, lps))

    def _hook(self, module, inputs, output):
        logits = softcap_logits(output[:, -1], self.softcap)  # as the model's forward and the teacher pass do
        self.add(logits, torch.arange(len(logits), device=logits.device))

    def __enter__(self):
        self.handle = self.linear.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


class _RoomLayer(DynamicLayer):
    """A full-attention layer's cache: keys and values written into room for the whole answer, allocated at the
    first update; `keys`/`values` are views of the filled part. (DynamicLayer concatenates at every token: a copy
    of the whole cache per token.)"""

    def __init__(self, room: int):
        super().__init__()
        self.room, self.length = room, 0

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            b, h, _, _ = key_states.shape
            self.k_room = key_states.new_empty(b, h, self.room, key_states.shape[-1])
            self.v_room = value_states.new_empty(b, h, self.room, value_states.shape[-1])
        n = key_states.shape[-2]
        if self.length + n > self.room:  # never for a loop that allocated enough; grows rather than fails
            self.room = 2 * (self.length + n)
            self.k_room = torch.cat([self.k_room[:, :, :self.length], self.k_room.new_empty(
                *self.k_room.shape[:2], self.room - self.length, self.k_room.shape[-1])], dim=2)
            self.v_room = torch.cat([self.v_room[:, :, :self.length], self.v_room.new_empty(
                *self.v_room.shape[:2], self.room - self.length, self.v_room.shape[-1])], dim=2)
        self.k_room[:, :, self.length:self.length + n] = key_states
        self.v_room[:, :, self.length:self.length + n] = value_states
        self.length += n
        self.keys, self.values = self.k_room[:, :, :self.length], self.v_room[:, :, :self.length]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.k_room, self.v_room = self.k_room[indices], self.v_room[indices]
            self.keys, self.values = self.k_room[:, :, :self.length], self.v_room[:, :, :self.length]


def _kv_cache(model, room: int) -> DynamicCache:
    """HF's DynamicCache for this model (sliding-window layers and all), its plain full-attention layers replaced
    by `_RoomLayer`s of `room` tokens."""
    cache = DynamicCache(config=model.config)
    cache.layers = [_RoomLayer(room) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """HF's TopPLogitsWarper: the least likely tokens set to -inf while their cumulative probability stays
    <= 1 - top_p; the most likely one always stays."""
    if top_p >= 1.0:
        return scores
    sorted_scores, order = scores.sort(dim=-1)
    drop = sorted_scores.softmax(-1).cumsum(-1) <= 1 - top_p
    drop[:, -1] = False
    return scores.masked_fill(drop.scatter(1, order, drop), -float("inf"))


def min_p_filter(scores: torch.Tensor, min_p: float) -> torch.Tensor:
    """HF's MinPLogitsWarper: tokens less likely than min_p x the most likely one set to -inf."""
    if min_p <= 0:
        return scores
    probs = scores.softmax(-1)
    return scores.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), -float("inf"))


def _next_tokens(logits: torch.Tensor, temperature: float, top_p: float, min_p: float = 0.0) -> torch.Tensor:
    """HF's sampling distribution: argmax at temperature 0; else logits / temperature, top-p, min-p (HF's order), one
    draw per row. The
    draw inverts the CDF with one uniform number per row: torch.multinomial draws an exponential number per
    vocabulary entry (49k per row), which took ~7% of a decode step on CPU."""
    if temperature <= 0:
        return logits.argmax(-1)
    cdf = min_p_filter(top_p_filter(logits.float() / temperature, top_p), min_p).softmax(-1).cumsum(-1)
    u = torch.rand(len(cdf), 1, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True)[:, 0].clamp(max=cdf.shape[-1] - 1)


@torch.inference_mode()
def _generate(model, tokenizer, prompts: list[list[int]], *, temperature: float, max_new_tokens: int,
              top_p: float = 1.0, seed: int | None = None, keep_topk: int = 0, min_p: float = 0.0) -> list[tuple]:
    """(response ids, complete, top-K or None) per prompt; see generate_ids. `min_p` drops tokens whose (tempered)
    probability is under min_p times the top token's: a hot temperature then stays legible."""
    backbone, head = backbone_and_head(model)
    device = head.weight.device
    input_ids, mask = pad_left(prompts, tokenizer.pad_token_id, device)
    stops = torch.tensor(stop_ids(tokenizer, model), device=device)
    if seed is not None:
        torch.manual_seed(seed)
    cache = _kv_cache(model, input_ids.shape[1] + max_new_tokens)
    rec = TopKRecorder(model, keep_topk) if keep_topk else None
    live = torch.arange(len(prompts), device=device)  # the prompt of each batch row
    ended = torch.zeros(len(prompts), dtype=torch.bool, device=device)  # rows still in the batch whose turn ended
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    tokens, complete = [[] for _ in prompts], [False] * len(prompts)
    step_ids = input_ids
    for t in range(max_new_tokens):
        hidden = backbone(input_ids=step_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                          use_cache=True).last_hidden_state[:, -1]
        logits = head(hidden)  # the raw logits (final soft-cap included, as the model's forward)
        going = ~ended
        if rec is not None:
            rec.add(logits[going], live[going])
        nxt = _next_tokens(logits, temperature, top_p, min_p)
        stop = torch.isin(nxt, stops)
        for row, tok, end in zip(live[going].tolist(), nxt[going].tolist(), stop[going].tolist()):
            tokens[row].append(tok)
            complete[row] = end
        ended |= stop
        n_ended = int(ended.sum())
        if n_ended == len(live) or t == max_new_tokens - 1:
            break
        if n_ended * COMPACT_FRACTION >= len(live):  # the ended rows leave the batch, their cache with them
            keep = (~ended).nonzero()[:, 0]
            cache.batch_select_indices(keep)
            live, mask, positions, nxt, ended = live[keep], mask[keep], positions[keep], nxt[keep], ended[keep]
        mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)
        positions = positions[:, -1:] + 1
        step_ids = nxt[:, None]
    topk = rec.per_row(len(prompts)) if rec is not None else None
    return [(tokens[b], complete[b], topk[b] if topk else None) for b in range(len(prompts))]


@torch.inference_mode()
def _generate_hf(model, tokenizer, prompts: list[list[int]], *, temperature: float, max_new_tokens: int,
                 top_p: float = 1.0, seed: int | None = None, keep_topk: int = 0, min_p: float = 0.0) -> list[tuple]:
    """`_generate` through HF `generate` (dynamic cache, every row to the longest answer): the old path, for
    benchmarks/bench_bake.py's side-by-side figure."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    input_ids, attention_mask = pad_left(prompts, pad, device)
    width = input_ids.shape[1]
    stops = stop_ids(tokenizer, model)
    if seed is not None:
        torch.manual_seed(seed)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0, min_p=min_p or None) if temperature > 0 else \
        dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    with TopKRecorder(model, keep_topk) if keep_topk else contextlib.nullcontext() as rec:
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                             pad_token_id=pad, eos_token_id=stops, **sampling)
    topk = None
    if rec is not None and len(rec.steps) == out.shape[1] - width:  # one head call per generated token
        topk = (torch.stack([i for _, i, _ in rec.steps], 1).cpu(), torch.stack([lp for _, _, lp in rec.steps], 1).cpu())
    results = []
    for b, row in enumerate(out[:, width:].tolist()):
        end = next((i for i, t in enumerate(row) if t in stops), None)
        n = end + 1 if end is not None else len(row)  # tokens after the end of turn are padding: never kept
        results.append((row[:n], end is not None, (topk[0][b, :n], topk[1][b, :n]) if topk else None))
    return results


def generate_ids(model, tokenizer, prompts: list[list[int]], *, temperature: float, max_new_tokens: int,
                 top_p: float = 1.0, seed: int | None = None) -> list[tuple[list[int], bool]]:
    """Generates for a batch of prompt ids (left padded). Returns (response ids, complete) per prompt:
    a complete response ends with the model's own end-of-turn token; a truncated one has none."""
    return [(ids, complete) for ids, complete, _ in _generate(model, tokenizer, prompts, temperature=temperature,
                                                              max_new_tokens=max_new_tokens, top_p=top_p, seed=seed)]


def answer_in_batches(model, tokenizer, contexts: list[list[dict]], system: str | None, *, batch_size: int,
                      temperature: float, max_new_tokens: int, batch_seed=None, bar=None) -> list[tuple[list[int], bool]]:
    """(response ids, complete) per context, in order: each context rendered with `system` (None: no system
    message) and answered by the local model, `batch_size` at a time. `batch_seed(start)` gives the seed of the
    batch that starts at that index; None leaves the generator unseeded (greedy needs none). Unlike
    answer_locally, the batches keep the given order: a batch's answers depend on who shares it, so callers that
    compare models on the same seeds (evaluate) get the same batches every time. `bar`: a tqdm bar to advance."""
    out = []
    for b in range(0, len(contexts), batch_size):
        prompts = [render_prompt_ids(tokenizer, c, system) for c in contexts[b:b + batch_size]]
        out += generate_ids(model, tokenizer, prompts, temperature=temperature, max_new_tokens=max_new_tokens,
                            seed=batch_seed(b) if batch_seed is not None else None)
        if bar is not None:
            bar.update(len(prompts))
    return out


def decode_response(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


class Answer(NamedTuple):
    row: Row
    prompt_ids: list[int]  # what the model read: [system, context] rendered
    ids: list[int]  # the response, with its end-of-turn token when complete
    complete: bool
    topk: tuple | None  # (ids [n, K], fp32 logprobs [n, K]) of the raw logits at each response position


def answer_locally(model, tokenizer, rows: list[Row], system: str | None, *, temperature: float,
                   max_new_tokens: int, batch_size: int, top_p: float = 1.0, seed=0, progress: bool = True,
                   keep_topk: int = 0, min_p: float = 0.0):
    """Yields one list of Answer per batch of rows answered by the local model, in batches sorted by
    prompt length to cut padding. Each batch's seed hashes `seed` (e.g. (seed, temperature, sample index))
    with the batch's queries. `keep_topk`: also keep the model's top-K at every response position."""
    prompts = [render_prompt_ids(tokenizer, r.context, system) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: len(prompts[i]))
    bar = tqdm(total=len(rows), desc="generating", unit="row", disable=not progress)
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        outs = _generate(model, tokenizer, [prompts[i] for i in idx], temperature=temperature,
                         max_new_tokens=max_new_tokens, top_p=top_p, keep_topk=keep_topk, min_p=min_p,
                         seed=derive_seed(seed, [rows[i].context for i in idx]))
        yield [Answer(rows[i], prompts[i], ids, complete, topk) for i, (ids, complete, topk) in zip(idx, outs)]
        bar.update(len(idx))
    bar.close()
