"""Free teacher logits: the local generator IS the teacher (the start model with the system prompt), and it
computes the teacher's logits at every response token while it samples. generate_data.py keeps their top-K
(fp32 log_softmax of the raw logits, before temperature and top-p) beside the data, and bake.py uses them
instead of a separate teacher pass.

Stored as data/<name>.topk/part-NNNNNN.safetensors, one per generation batch, written atomically before the
batch's rows are appended, with its keys and a checksum in its metadata (no pickle). An entry is matched to a data
row by the row's key (query, sample index, temperature), the hash of the prompt ids the generator read (system
prompt, template, context) and the response ids themselves; every part names the model identity (and its files),
the prompt's hash, K and the template's hash. A row without a valid entry (a corrupt or missing part, API data) gets
the teacher pass. Before any of it is trusted, rows of every part (each part's longest, at least a teacher batch, at
most CHECK_ROWS spread over the parts) are recomputed by the real teacher pass and compared: a part written wrongly
is caught wherever it lies, not only when it happens to hold the first rows.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import NamedTuple

import orjson
import torch

from .forward import response_logits
from .io import sha256_text
from .loss import teacher_topk
from .teacher import (
    Example,
    TeacherTopK,
    load_checked,
    model_fingerprint,
    save_checked,
    teacher_prefix,
    teacher_topk_rows,
    topk_id_dtype,
)

FORMAT_VERSION = 2  # 2: safetensors parts
# Allowed difference to a teacher pass, |stored - fresh| <= atol + rtol |fresh|, per position, by the model's dtype.
# fp32: the generator's KV-cached steps and the teacher's full forward differ by ~1e-5; the fp16 storage rounds to
# 2^-11 relative. bf16: both passes carry bf16's noise through every layer, and it is large. Measured on the embedded
# SmolLM2 in bf16 (CPU, avx512_bf16; 62 rows of up to 48 tokens, K=20, 48k log-probs): |Δ| median 0.045, p99 0.24,
# max 0.64, growing with |lp|; top-1 ids agree at 96.5% of positions, all 20 at 1%. The old bound (0.1 + 0.04|lp|)
# refused those true numbers; 0.5 + 0.1|lp| admits them with the worst at 0.65 of the bound (ties among the ids at
# 0.55). fp16 is not measured. This bound catches gross errors; the mean below catches small systematic ones.
TOLERANCE = {torch.float32: (1e-3, 2e-3), torch.float16: (5e-2, 2e-2), torch.bfloat16: (5e-1, 1e-1)}
# Allowed mean of (stored - fresh) over every checked log-prob. Rounding noise averages out, a systematic error does
# not: this refuses the small shifts that bf16's per-position bound must let through. bf16, same 62 rows: the mean
# over 8 random rows stays within 0.0087 (2000 draws; 4 rows 0.014, 1 row 0.028, all 62 -0.00005); with every stored
# log-prob 0.05 too low it is never under 0.041. A check of few rows may be refused by noise: it falls back to the
# teacher pass, which is safe.
BIAS = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 2e-2}


# Rows recomputed by the teacher pass before stored numbers are trusted: at least one of every part (its longest:
# the late positions are where the generator's KV-cached steps drift furthest from a full forward) and at least one
# teacher batch; beyond this many parts, this many rows spread evenly over them. The default data (192 rows in 6
# parts of 32) checks 8 rows, as many as before but from every part.
CHECK_ROWS = 32


class Entry(NamedTuple):
    """One stored row: what it was computed for, its response ids, its top-K, and the part file it came from."""
    header: dict
    prompt_sha: str
    response_ids: torch.Tensor
    ids: torch.Tensor
    logprobs: torch.Tensor
    part: str


PART_SUFFIX = "safetensors"


def topk_dir(data_file: str | Path) -> Path:
    p = Path(data_file)
    return p.with_name(p.name.removesuffix(".jsonl") + ".topk")


def entry_key(key: tuple) -> str:
    """A data row's key (data.row_key: query, sample index, temperature), hashed."""
    return hashlib.sha256(orjson.dumps(list(key))).hexdigest()[:32]


def ids_sha(ids: list[int]) -> str:
    return hashlib.sha256(orjson.dumps(list(ids))).hexdigest()[:32]


def header(model_id: str, system: str, k: int, tokenizer) -> dict:
    """What the stored numbers depend on, beside the per-row prompt ids and response ids."""
    return {"version": FORMAT_VERSION, "model": model_id, "model_files": model_fingerprint(model_id),
            "prompt_sha256": sha256_text(system), "k": k, "template_sha256": sha256_text(tokenizer.chat_template or "")}


class PartWriter:
    """Appends one part per generation batch after the parts already there (a resumed generation)."""

    def __init__(self, folder: Path, head: dict, vocab_size: int):
        self.folder, self.head = folder, head
        self.id_dtype = topk_id_dtype(vocab_size)
        folder.mkdir(parents=True, exist_ok=True)
        self.next = 1 + max((int(p.stem.split("-")[1]) for p in folder.glob(f"part-*.{PART_SUFFIX}")
                             if p.stem.split("-")[1].isdigit()), default=0)

    def write(self, answers) -> None:
        """answers: (sampling.Answer, its data.row_key) pairs."""
        answers = [(a, key) for a, key in answers if a.topk is not None and len(a.ids)]
        if not answers:
            return
        meta = {"header": self.head, "keys": [entry_key(key) for _, key in answers],
                "prompt_sha": [ids_sha(a.prompt_ids) for a, _ in answers]}
        tensors = {"offsets": torch.tensor([0] + [len(a.ids) for a, _ in answers]).cumsum(0),
                   "response_ids": torch.tensor([t for a, _ in answers for t in a.ids], dtype=torch.int32),
                   "ids": torch.cat([a.topk[0] for a, _ in answers]).to(self.id_dtype),
                   "logprobs": torch.cat([a.topk[1] for a, _ in answers]).half()}
        write_part(self.folder / f"part-{self.next:06d}.{PART_SUFFIX}", meta, tensors)
        self.next += 1


def write_part(path: Path, meta: dict, tensors: dict) -> None:
    save_checked(path, tensors, meta)


def read_part(path: Path) -> tuple[dict, dict] | None:
    """(meta, tensors) of a part, or None when it is unreadable, fails its checksum or its lengths disagree."""
    loaded = load_checked(path)
    if loaded is None:
        return None
    t, meta = loaded
    try:
        off = t["offsets"]
        ok = (len(off) == len(meta["keys"]) + 1 == len(meta["prompt_sha"]) + 1
              and len(t["response_ids"]) == int(off[-1]) == len(t["ids"]) == len(t["logprobs"]))
    except (KeyError, TypeError):
        ok = False
    return (meta, t) if ok else None


def load_parts(folder: Path) -> tuple[dict[str, Entry], list[str]]:
    """{entry key: Entry} over every valid part, and notes on the
    parts left out. A later part wins over an earlier one for the same key (a row generated again on resume)."""
    entries, notes = {}, []
    for path in sorted(folder.glob(f"part-*.{PART_SUFFIX}")):
        part = read_part(path)
        if part is None:
            notes.append(f"{path.name} is corrupt or truncated")
            continue
        meta, t = part
        off = t["offsets"]
        for j, key in enumerate(meta["keys"]):
            a, b = int(off[j]), int(off[j + 1])
            entries[key] = Entry(meta["header"], meta["prompt_sha"][j], t["response_ids"][a:b], t["ids"][a:b],
                                 t["logprobs"][a:b], path.name)
    return entries, notes


def _match(example: Example, row, entries: dict, want: dict) -> tuple[tuple | None, str]:
    """The stored (ids, logprobs) for this example, cut to its response, or None and why not."""
    if row.key is None:
        return None, "no generation key"
    entry = entries.get(entry_key(row.key))
    if entry is None:
        return None, "no stored entry"
    head, prompt_sha, resp, ids, lps, _ = entry
    for field in ("version", "model", "model_files", "prompt_sha256", "template_sha256"):
        if head.get(field) != want[field]:
            return None, {"model_files": "model files changed", "prompt_sha256": "another system prompt",
                          "template_sha256": "another chat template"}.get(field, f"another {field}")
    if head["k"] < want["k"]:
        return None, f"stored K={head['k']} < top_k={want['k']}"
    n = example.n_response
    if prompt_sha != ids_sha(example.teacher_ids[:-n]):
        return None, "another prompt rendering"
    if resp[:n].tolist() != example.teacher_ids[-n:]:
        return None, "other response ids"
    return (ids[:n, :want["k"]], lps[:n, :want["k"]]), ""


def _compare(stored_ids, stored_lp, fresh_ids, fresh_lp, at_stored, dtype) -> torch.Tensor:
    """Per position, whether the stored top-K equal a fresh teacher pass's: the same ids (a swap only between
    near-equal log-probs: the fresh log-prob at the stored id equals the fresh one at that rank) and log-probs
    within the dtype's tolerance."""
    atol, rtol = TOLERANCE.get(dtype, TOLERANCE[torch.bfloat16])
    bound = atol + rtol * fresh_lp.abs()
    lp_ok = (stored_lp.float() - fresh_lp).abs() <= bound
    ids_ok = (stored_ids.long() == fresh_ids) | ((at_stored - fresh_lp).abs() <= bound)
    return (lp_ok & ids_ok).all(-1)


def pick_check_rows(reused: list[int], part_of: list, n_response: list[int], batch_size: int) -> list[int]:
    """The rows to recompute: every stored part's longest reused row, then each part's next longest in turn until
    there is a teacher batch of them; over CHECK_ROWS parts, CHECK_ROWS of them spread evenly."""
    by_part: dict[str, list[int]] = {}
    for i in sorted(reused, key=lambda i: -n_response[i]):
        by_part.setdefault(part_of[i], []).append(i)
    queues = [by_part[part] for part in sorted(by_part)]
    if len(queues) > CHECK_ROWS:
        return [queues[round(j * (len(queues) - 1) / (CHECK_ROWS - 1))][0] for j in range(CHECK_ROWS)]
    picks, depth = [], 0
    while len(picks) < min(max(len(queues), batch_size), len(reused)):
        picks += [q[depth] for q in queues if depth < len(q)]
        depth += 1
    return picks


def check_against_teacher(model, tokenizer, examples: list[Example], found: list, part_of: list, check: list[int],
                          k: int, batch_size: int) -> tuple[bool, str]:
    """Recomputes the `check` rows with a real teacher pass, batch by batch, and compares them with the stored
    numbers. Returns (all equal, a one-line account naming the first part that differs)."""
    dtype = next(model.parameters()).dtype
    bias_bound = BIAS.get(dtype, BIAS[torch.bfloat16])
    n_pos = n_same = 0
    max_diff, sum_diff, bad = 0.0, 0.0, None
    for b in range(0, len(check), batch_size):
        idx = check[b:b + batch_size]
        with torch.inference_mode():
            logits = response_logits(model, [examples[i].teacher_ids for i in idx], [examples[i].n_response for i in idx],
                                     tokenizer.pad_token_id, share=False).cpu()
        stored_ids = torch.cat([found[i][0] for i in idx])
        stored_lp = torch.cat([found[i][1] for i in idx]).float()
        fresh_ids, fresh_lp = teacher_topk(logits, k)
        at_stored = torch.log_softmax(logits.float(), -1).gather(-1, stored_ids.long())
        ok = _compare(stored_ids, stored_lp, fresh_ids, fresh_lp, at_stored, dtype)
        diff = stored_lp - fresh_lp
        n_pos += len(diff)
        n_same += int((stored_ids.long() == fresh_ids).all(-1).sum())
        max_diff, sum_diff = max(max_diff, diff.abs().max().item()), sum_diff + diff.sum().item()
        if bad is None and not ok.all():
            ends = torch.tensor([examples[i].n_response for i in idx]).cumsum(0)  # each row's positions end here
            row = idx[int(torch.searchsorted(ends, int((~ok).nonzero()[0]), right=True))]
            bad = f"first in {part_of[row]} (data line {examples[row].line})"
    bias = sum_diff / max(n_pos * k, 1)
    atol, rtol = TOLERANCE.get(dtype, TOLERANCE[torch.bfloat16])
    if bad is None and abs(bias) > bias_bound:
        bad = f"shifted on average by {bias:+.3f}, over {bias_bound:g}"
    detail = (f"{n_same}/{n_pos} positions with identical top-{k} ids, max |Δlogprob| {max_diff:.2e} "
              f"(tolerance {atol:g} + {rtol:g}|lp|), mean Δ {bias:+.1e}" + (f"; {bad}" if bad else ""))
    return bad is None, detail


def free_teacher(model, tokenizer, examples: list[Example], rows, system: str, model_id: str, k: int,
                 data_file: str | Path, batch_size: int) -> TeacherTopK | None:
    """The teacher's top-K for these examples from the generator's stored logits, checked on a row of every part
    against a teacher pass; rows without a stored entry get the teacher pass. None (with the reason printed) when there
    is nothing to reuse or the check fails: the caller then runs the teacher pass over everything."""
    folder = topk_dir(data_file)
    if not folder.is_dir():
        return None
    t0 = time.time()
    entries, notes = load_parts(folder)
    for note in notes:
        print(f"free teacher logits: {folder}/{note}; its rows get the teacher pass")
    found, part_of, why = _match_rows(examples, rows, entries, header(model_id, system, k, tokenizer))
    reused = [i for i, f in enumerate(found) if f is not None]
    if not reused:
        print(f"free teacher logits: none of {folder}'s entries fit ({_count_reasons(why)}); running the teacher pass")
        return None
    check = pick_check_rows(reused, part_of, [e.n_response for e in examples], batch_size)
    ok, detail = check_against_teacher(model, tokenizer, examples, found, part_of, check, k, batch_size)
    if not ok:
        print(f"free teacher logits: {folder} does not match a teacher pass on {len(check)} rows ({detail}); "
              f"running the teacher pass instead")
        return None
    id_dtype = topk_id_dtype(len(tokenizer))
    missing = _fill_missing(model, tokenizer, examples, found, k, batch_size, id_dtype)
    print(f"free teacher logits: reused the generator's top-{k} for {len(reused)}/{len(examples)} rows of {data_file}"
          + (f", teacher pass for {len(missing)} ({_count_reasons(why)})" if missing else "")
          + f" | checked on {len(check)} rows of {len(set(part_of) - {None})} parts: {detail} | {time.time() - t0:.1f}s")
    return _as_teacher(examples, found, id_dtype)


def _match_rows(examples: list[Example], rows, entries: dict, want: dict) -> tuple[list, list, dict]:
    """Per example, its stored (ids, logprobs) or None, and the part they came from or None; and how many rows
    found no entry, by reason."""
    found, part_of, why = [], [], {}
    for e, r in zip(examples, rows):
        got, reason = _match(e, r, entries, want)
        found.append(got)
        part_of.append(entries[entry_key(r.key)].part if got is not None else None)
        if got is None:
            why[reason] = why.get(reason, 0) + 1
    return found, part_of, why


def _count_reasons(why: dict) -> str:
    return ", ".join(f"{n} {w}" for w, n in why.items())


def _fill_missing(model, tokenizer, examples: list[Example], found: list, k: int, batch_size: int, id_dtype) -> list[int]:
    """Runs the teacher pass over the rows without a stored entry, filling them into `found`; returns their indices."""
    missing = [i for i, f in enumerate(found) if f is None]
    if not missing:
        return missing
    ex = [examples[i] for i in missing]
    _, _, prefix = teacher_prefix(model, ex)
    part = teacher_topk_rows(model, ex, prefix, k, batch_size, tokenizer.pad_token_id, id_dtype)
    for j, i in enumerate(missing):
        a, b = int(part["offsets"][j]), int(part["offsets"][j + 1])
        found[i] = (part["ids"][a:b], part["logprobs"][a:b])
    return missing


def _as_teacher(examples: list[Example], found: list, id_dtype) -> TeacherTopK:
    """Every row's (ids, logprobs), stored or recomputed, as one TeacherTopK in row order."""
    return TeacherTopK(torch.tensor([0] + [e.n_response for e in examples]).cumsum(0),
                       torch.tensor([t for e in examples for t in e.teacher_ids[-e.n_response:]], dtype=torch.int32),
                       torch.cat([f[0] for f in found]).to(id_dtype), torch.cat([f[1] for f in found]).half())
