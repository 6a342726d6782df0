"""Examples (tokenized rows) and the teacher cache.

The teacher is the base model WITH the system prompt. Its top-K log-probabilities at every response
position are computed once, stored under data/cache/<key>/ in safetensors shards (uint16/int32 ids, fp16
logprobs, about 84 bytes a token at K=20; no pickle), and reused across epochs and runs. The key hashes everything the
numbers depend on, so a changed model, prompt, data file, K or template builds a new cache. Each shard
carries a checksum in its metadata: a truncated or corrupt shard is rebuilt, never trained on.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import orjson
import torch
from tqdm.auto import tqdm

from .chat import render_prompt_ids, response_ids_from_text
from .distributed import SINGLE, World, barrier
from .errors import UserError
from .forward import PrefixDecision, SharedPrefix, common_prefix_len, enable_shared_prefix, response_logits, shared_prefix
from .io import atomic_write_bytes
from .loss import teacher_topk

CACHE_VERSION = 3  # 2: the final logit soft-cap (Gemma 2) applied to the teacher's logits; 3: safetensors shards
SHARD_ROWS = 64


@dataclass
class Example:
    line: int  # line of the data file, for error messages
    teacher_ids: list[int]  # [system, context] rendered + response
    student_ids: list[int]  # [student prompt?, context] rendered + response
    n_response: int  # trained tokens at the end of both
    group: str  # the context, so held-out queries are never trained on


def _checked_token_ids(ids: list[int], vocab_size: int, where: str) -> list[int]:
    """A row's stored response ids, refused if any lies outside this tokenizer (data made with another model)."""
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise UserError(f"{where}: response_token_ids holds id {bad}, outside this tokenizer's {vocab_size} ids; "
                        "regenerate the data with this model (the ids belong to another tokenizer)")
    return list(ids)


def build_examples(rows, tokenizer, system: str, student_prompt: str, max_seq_len: int, use_token_ids: bool,
                   where: str, max_context: int | None = None) -> tuple[list[Example], int]:
    """Tokenizes rows for both sides. Returns (examples, number of responses cut to fit max_seq_len)."""
    examples, cut = [], 0
    vocab_size = len(tokenizer)
    for r in rows:
        if use_token_ids and r.response_ids:
            resp = _checked_token_ids(r.response_ids, vocab_size, f"{where}:{r.line}")  # never decoded, re-encoded
        else:
            resp = response_ids_from_text(tokenizer, r.response, complete=r.complete)
        student_prompt_ids = render_prompt_ids(tokenizer, r.context, student_prompt or None)
        room = max_seq_len - len(student_prompt_ids)
        if room < 1:
            raise UserError(f"{where}:{r.line}: the user turn alone is {len(student_prompt_ids)} tokens, over "
                            f"max_seq_len={max_seq_len}; raise --max_seq_len or shorten the row")
        if len(resp) > room:
            resp, cut = resp[:room], cut + 1  # a cut response has no end-of-turn: none is trained
        teacher_ids = render_prompt_ids(tokenizer, r.context, system) + resp
        if max_context and len(teacher_ids) > max_context:
            raise UserError(f"the system prompt makes row {where}:{r.line} {len(teacher_ids)} tokens, over the "
                            f"model's context of {max_context}; shorten the prompt or --max_seq_len")
        examples.append(Example(r.line, teacher_ids, student_prompt_ids + resp, len(resp),
                                orjson.dumps(r.context).decode()))
    return examples, cut


def cache_key(model_path: str, system: str, data_sha256: str, k: int, chat_template: str,
              max_seq_len: int, student_prompt: str) -> str:
    fingerprint = {"version": CACHE_VERSION, "model": model_path, "system": system, "data": data_sha256, "k": k,
                   "template": chat_template, "max_seq_len": max_seq_len, "student_prompt": student_prompt}
    files = model_fingerprint(model_path)
    if files is not None:
        fingerprint["files"] = files
    return hashlib.sha256(orjson.dumps(fingerprint, option=orjson.OPT_SORT_KEYS)).hexdigest()[:20]


def model_fingerprint(model_path: str) -> list | None:
    """(name, size, mtime) of a model folder's weights and config: a folder's weights can change under the same
    name. `model_path` is a model identity (baked.model_identity): a chain's is the base folder + the chain's hash."""
    folder = model_path.split("+lineage:")[0]
    if not os.path.isdir(folder):
        return None
    files = sorted(Path(folder).glob("*.safetensors")) + sorted(Path(folder).glob("config.json"))
    return [[f.name, f.stat().st_size, int(f.stat().st_mtime)] for f in files]


def cache_complete(cache_dir: Path, n_rows: int) -> bool:
    """Whether every shard of a teacher cache for n_rows rows is on disk (they are still checked when loaded)."""
    return all(shard_path(cache_dir, s).exists() for s in range(0, n_rows, SHARD_ROWS))


def topk_id_dtype(vocab_size: int) -> torch.dtype:
    """The integer dtype of stored top-K token ids: uint16 while every id fits (up to 65,536 ids: half the bytes),
    int32 beyond. The teacher cache and the generator's stored top-K both pack ids with it."""
    return torch.uint16 if vocab_size <= 1 << 16 else torch.int32


@dataclass
class TeacherTopK:
    """The cached teacher: for row i, positions offsets[i]:offsets[i+1] of ids/logprobs and response_ids."""
    offsets: torch.Tensor  # [R+1] int64
    response_ids: torch.Tensor  # [T] int32
    ids: torch.Tensor  # [T, K] uint16 or int32
    logprobs: torch.Tensor  # [T, K] float16

    def row(self, i: int):
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.response_ids[a:b], self.ids[a:b], self.logprobs[a:b]

    @property
    def bytes_per_token(self) -> float:
        t = max(len(self.response_ids), 1)
        return sum(x.numel() * x.element_size() for x in (self.response_ids, self.ids, self.logprobs)) / t


def _checksum(tensors: dict, meta: dict) -> str:
    h = hashlib.sha256(orjson.dumps(meta, option=orjson.OPT_SORT_KEYS))
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_checked(path: Path, tensors: dict, meta: dict | None = None) -> None:
    """Tensors as safetensors (no pickle), atomically, with `meta` (JSON) and a checksum of both in its metadata."""
    from safetensors.torch import save

    meta = meta or {}
    # one metadata entry: safetensors writes several in a per-process random order, and equal shards must be equal bytes
    info = orjson.dumps({"meta": meta, "sha256": _checksum(tensors, meta)}, option=orjson.OPT_SORT_KEYS).decode()
    atomic_write_bytes(path, save(tensors, metadata={"promptbake": info}))


def load_checked(path: Path) -> tuple[dict, dict] | None:
    """(tensors, meta) of a save_checked file, or None when it is unreadable, truncated or fails its checksum."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            info = orjson.loads((f.metadata() or {})["promptbake"])
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        return (tensors, info["meta"]) if info["sha256"] == _checksum(tensors, info["meta"]) else None
    except Exception:  # noqa: BLE001 - any unreadable file counts as missing
        return None


def shard_path(cache_dir: Path, start: int) -> Path:
    return cache_dir / f"shard-{start:07d}.safetensors"


def _load_shard(path: Path, n_rows: int, k: int) -> dict | None:
    """The shard's tensors, or None if it is missing, truncated, corrupt or of the wrong shape."""
    if not path.exists():
        return None
    loaded = load_checked(path)
    t = loaded[0] if loaded else None
    ok = t is not None and set(t) == {"offsets", "response_ids", "ids", "logprobs"} \
        and len(t["offsets"]) == n_rows + 1 and t["ids"].shape == t["logprobs"].shape == (int(t["offsets"][-1]), k) \
        and len(t["response_ids"]) == int(t["offsets"][-1])
    if not ok:
        print(f"teacher cache: {path} is corrupt or truncated; rebuilding it")
        path.unlink(missing_ok=True)
        return None
    return t


@torch.inference_mode()
def teacher_topk_rows(model, examples: list[Example], prefix: SharedPrefix | None, k: int, batch_size: int, pad_id: int,
                      id_dtype, bar=None) -> dict:
    """The teacher's top-K at every response position of these rows (one shard's tensors).
    `prefix`: the KV of the tokens every row opens with (the system turn), or None to run full rows."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].teacher_ids))
    per_row: list = [None] * len(examples)
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        n_resp = [examples[i].n_response for i in idx]
        logits = response_logits(model, [examples[i].teacher_ids for i in idx], n_resp, pad_id, prefix, share=False)
        ids, logprobs = teacher_topk(logits, k)
        for i, row_ids, row_lp in zip(idx, ids.cpu().split(n_resp), logprobs.cpu().split(n_resp)):
            per_row[i] = (row_ids, row_lp)
        if bar is not None:
            bar.update(sum(n_resp))
    offsets = torch.tensor([0] + [e.n_response for e in examples]).cumsum(0)
    return {"offsets": offsets,
            "response_ids": torch.tensor([t for e in examples for t in e.teacher_ids[-e.n_response:]], dtype=torch.int32),
            "ids": torch.cat([r[0] for r in per_row]).to(id_dtype),
            "logprobs": torch.cat([r[1] for r in per_row]).half()}


def teacher_cache(model, tokenizer, examples: list[Example], k: int, cache_dir: Path, batch_size: int,
                  world: World = SINGLE) -> TeacherTopK:
    """Loads the cached teacher top-K for these examples, computing only the shards that are missing.
    Under several processes the ranks split the missing shards, each writes its own, and all read every shard.
    Under FSDP every forward is a collective: every rank computes every missing shard, and rank 0 writes them."""
    from . import fsdp

    sharded = fsdp.on()
    writes = world.main or not sharded  # under FSDP rank 0 alone writes
    if writes:
        cache_dir.mkdir(parents=True, exist_ok=True)
    shards = [(s, examples[s:s + SHARD_ROWS]) for s in range(0, len(examples), SHARD_ROWS)]
    loaded = {s: _load_shard(shard_path(cache_dir, s), len(ex), k) for s, ex in shards}
    if world.enabled:
        barrier()  # every rank has looked before any writes: they agree on what is missing
    missing = [(s, ex) for s, ex in shards if loaded[s] is None]
    mine = missing if sharded else world.share(missing)
    _print_cache_state(cache_dir, len(examples), len(shards), len(missing))
    if mine:
        built = _build_shards(model, tokenizer, examples, mine, loaded, k, batch_size, cache_dir, writes, world)
        print(f"teacher cache: built {cache_dir} | {built}{_ranks_note(world, sharded, len(mine), len(missing))}")
    if world.enabled and missing:
        barrier()  # every rank's shards are written
        _load_other_ranks_shards(cache_dir, missing, loaded, k)
    return _join_shards([loaded[s] for s, _ in shards])


def _print_cache_state(cache_dir: Path, n_rows: int, n_shards: int, n_missing: int) -> None:
    """Says whether the cache is reused whole or resumed; a cache built from scratch says nothing here."""
    if not n_missing:
        print(f"teacher cache: reusing {cache_dir} ({n_rows} rows)")
    elif n_missing < n_shards:
        print(f"teacher cache: resuming {cache_dir}: {n_shards - n_missing}/{n_shards} shards done")


def teacher_prefix(model, examples: list[Example]) -> tuple[PrefixDecision, int, SharedPrefix | None]:
    """(the model's shared-prefix decision, the length of the head every row opens with, its KV or None).
    The head is taken over all the given rows, so a shard computed alone equals one of a build of them all."""
    decision = enable_shared_prefix(model)
    prefix_len = common_prefix_len([e.teacher_ids for e in examples], [e.n_response for e in examples]) \
        if decision.enabled else 0
    with torch.inference_mode():
        prefix = shared_prefix(model, examples[0].teacher_ids[:prefix_len]) if prefix_len else None
    return decision, prefix_len, prefix


def _build_shards(model, tokenizer, examples: list[Example], mine: list, loaded: dict, k: int, batch_size: int,
                  cache_dir: Path, writes: bool, world: World) -> str:
    """Computes this rank's shards into `loaded`, saving each (when this rank `writes`) as soon as it is computed,
    so a killed build resumes from the shards on disk. Returns the build line's tokens, rate and prefix."""
    # The head every row opens with (system turn and template), over all rows so a resumed shard
    # is computed exactly as in a build from scratch.
    decision, prefix_len, prefix = teacher_prefix(model, examples)
    id_dtype = topk_id_dtype(len(tokenizer))
    t0 = time.time()
    n_tokens = sum(e.n_response for _, ex in mine for e in ex)
    bar = tqdm(total=n_tokens, desc="teacher top-k", unit="tok", disable=not world.main)
    for s, ex in mine:
        loaded[s] = teacher_topk_rows(model, ex, prefix, k, batch_size, tokenizer.pad_token_id, id_dtype, bar)
        if writes:
            save_checked(shard_path(cache_dir, s), loaded[s])
    bar.close()
    dt = time.time() - t0
    shared = f"shared prefix of {prefix_len} tokens computed once" if prefix_len else \
        f"no shared prefix: {decision.reason or 'the rows open with no common tokens'}"
    return f"{n_tokens} tokens | {n_tokens / dt:.0f} tok/s | {shared}"


def _ranks_note(world: World, sharded: bool, n_mine: int, n_missing: int) -> str:
    """The build line's account of how the ranks split the missing shards ("" for one process)."""
    if sharded:
        return f" | every rank computed all {n_missing} shards (FSDP)"
    return f" | {n_mine}/{n_missing} shards on rank {world.rank} of {world.size}" if world.enabled else ""


def _load_other_ranks_shards(cache_dir: Path, missing: list, loaded: dict, k: int) -> None:
    """Reads into `loaded` the shards other ranks wrote; refuses a shard this rank cannot see or read."""
    for s, ex in missing:
        if loaded[s] is None:
            loaded[s] = _load_shard(shard_path(cache_dir, s), len(ex), k)
        if loaded[s] is None:
            raise UserError(f"teacher cache: {shard_path(cache_dir, s)}, written by another rank, is missing or "
                            f"corrupt here: data_dir must be on a filesystem every rank shares")


def _join_shards(parts: list[dict]) -> TeacherTopK:
    """One TeacherTopK of the shards in row order, each shard's offsets moved past the tokens before it."""
    offsets = [torch.zeros(1, dtype=torch.long)]
    total = 0
    for p in parts:
        offsets.append(p["offsets"][1:] + total)
        total += int(p["offsets"][-1])
    return TeacherTopK(torch.cat(offsets), torch.cat([p["response_ids"] for p in parts]),
                       torch.cat([p["ids"] for p in parts]), torch.cat([p["logprobs"] for p in parts]))


def check_alignment(examples: list[Example], teacher: TeacherTopK, tokenizer, where: str) -> None:
    """The student's response ids must equal the teacher's, token for token, aligned from the end."""
    for i, e in enumerate(examples):
        want = teacher.row(i)[0].tolist()
        got = e.student_ids[-e.n_response:]
        if got != want:
            j = next((j for j, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            raise UserError(f"{where}:{e.line}: the student's response tokens differ from the teacher's at token "
                            f"{j}: student {tokenizer.convert_ids_to_tokens(got[j:j + 3])} vs teacher "
                            f"{tokenizer.convert_ids_to_tokens(want[j:j + 3])}; delete data/cache and rerun")
