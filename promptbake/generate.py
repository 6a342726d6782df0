"""The data stage: queries in, (user, assistant) rows out, answered WITH the system prompt and saved WITHOUT it."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import re
import shutil
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import orjson
import torch
from tqdm.auto import tqdm

from .api_client import ChatClient, redact_url
from .baked import load_start, teacher_system, with_parent_model
from .chat import render_prompt_ids, stop_ids
from .checks import load_checks
from .config import to_dict
from .data import Row, load_prompts, load_rows, row_key
from .errors import UserError
from .forward import backbone_and_head, pad_left, softcap_logits
from .freelogits import PartWriter, header, topk_dir
from .io import JsonlAppender, atomic_write_bytes, read_json, sha256_text, write_json
from .locks import run_lock
from .loss import teacher_topk
from .seeds import SEED_QUERIES

QUERY_MAX_TOKENS = 48  # a written query is one short message
QUERY_ROUNDS = 4  # rounds of asking for the queries still missing after deduplication


# ---------------------------------------------------------------- local batched generation
class TopKRecorder:
    """Keeps the model's own top-K log-probabilities at every generated position: a hook on the output head
    sees the raw logits of each step, before temperature, top-p or any logits processor, and runs the
    teacher cache's exact op on them (fp32 log_softmax, then top-K). O(B x steps x K) memory, not V."""

    def __init__(self, model, k: int):
        head = backbone_and_head(model)[1]
        self.linear, self.softcap, self.k, self.steps = head.linear, head.softcap, k, []

    def _hook(self, module, inputs, output):
        logits = softcap_logits(output[:, -1], self.softcap)  # as the model's forward and the teacher pass do
        self.steps.append(teacher_topk(logits, min(self.k, logits.shape[-1])))

    def __enter__(self):
        self.handle = self.linear.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@torch.inference_mode()
def _generate(model, tokenizer, prompts: list[list[int]], *, temperature: float, max_new_tokens: int,
              top_p: float = 1.0, seed: int | None = None, keep_topk: int = 0) -> list[tuple]:
    """(response ids, complete, top-K or None) per prompt; see generate_ids."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    input_ids, attention_mask = pad_left(prompts, pad, device)
    width = input_ids.shape[1]
    stops = stop_ids(tokenizer, model)
    if seed is not None:
        torch.manual_seed(seed)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 else \
        dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    with TopKRecorder(model, keep_topk) if keep_topk else contextlib.nullcontext() as rec:
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                             pad_token_id=pad, eos_token_id=stops, **sampling)
    topk = None
    if rec is not None and len(rec.steps) == out.shape[1] - width:  # one head call per generated token
        topk = (torch.stack([i for i, _ in rec.steps], 1).cpu(), torch.stack([lp for _, lp in rec.steps], 1).cpu())
    elif rec is not None:
        print(f"note: the model's head ran {len(rec.steps)} times for {out.shape[1] - width} tokens; "
              f"no free teacher logits kept for this batch")
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
                   keep_topk: int = 0):
    """Yields one list of Answer per batch of rows answered by the local model, in batches sorted by
    prompt length to cut padding. Each batch's seed hashes `seed` (e.g. (seed, temperature, sample index))
    with the batch's queries. `keep_topk`: also keep the model's top-K at every response position."""
    prompts = [render_prompt_ids(tokenizer, r.context, system) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: len(prompts[i]))
    bar = tqdm(total=len(rows), desc="generating", unit="row", disable=not progress)
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        outs = _generate(model, tokenizer, [prompts[i] for i in idx], temperature=temperature,
                         max_new_tokens=max_new_tokens, top_p=top_p, keep_topk=keep_topk,
                         seed=derive_seed(seed, [rows[i].context for i in idx]))
        yield [Answer(rows[i], prompts[i], ids, complete, topk) for i, (ids, complete, topk) in zip(idx, outs)]
        bar.update(len(idx))
    bar.close()


# ---------------------------------------------------------------- seeds and queries
def derive_seed(*parts) -> int:
    """A seed from a hash of everything that identifies a sample: distinct parts never share a seed."""
    digest = hashlib.sha256(orjson.dumps(parts, option=orjson.OPT_SERIALIZE_NUMPY)).digest()
    return int.from_bytes(digest[:8], "little") % (2**63 - 1)


def _clean_query(text: str) -> str:
    line = next((s for s in text.strip().splitlines() if s.strip()), "")
    line = re.sub(r"^(question|query|user|q)\s*[:\-]\s*", "", line.strip(), flags=re.I)
    return line.strip().strip('"').strip()


def query_request(system: str, topic: str) -> list[dict]:
    return [{"role": "user", "content":
             f"An AI assistant was given these instructions:\n---\n{system}\n---\nWrite one message that a user of "
             f"this assistant might send it, about {topic}. Reply with the user's message only."}]


def write_queries(cfg, system: str, ask_many, path: Path) -> list[str]:
    """Lets the model write cfg.generate_queries queries that fit the system prompt; deduplicated.
    `ask_many(requests, seeds)` answers a list of requests at once (one batch, or one HTTP client)."""
    topics = list(SEED_QUERIES)
    rng = random.Random(cfg.seed)
    seen, queries = set(), []
    for attempt in range(QUERY_ROUNDS):
        missing = cfg.generate_queries - len(queries)
        if missing <= 0:
            break
        n = missing + missing // 2 + 1  # some come back duplicated or unusable
        requests = [query_request(system, rng.choice(topics)) for _ in range(n)]
        for text in ask_many(requests, [derive_seed("query", cfg.seed, attempt, i) for i in range(n)]):
            q = _clean_query(text)
            norm = re.sub(r"\W+", " ", q.lower()).strip()
            if len(norm) >= 8 and norm not in seen and len(queries) < cfg.generate_queries:
                seen.add(norm)
                queries.append(q)
    if not queries:
        raise UserError("the model wrote no usable queries; give prompts instead (--prompts FILE)")
    atomic_write_bytes(path, ("\n".join(queries) + "\n").encode())
    print(f"wrote {len(queries)} queries to {path}")
    return queries


# ---------------------------------------------------------------- the stage
def data_path(cfg) -> Path:
    return Path(cfg.data_dir) / f"{cfg.name}.jsonl"


def pick_backend(cfg) -> str:
    """api when an API base URL is set (in settings, the environment or .env: the config resolves them)."""
    if cfg.backend != "auto":
        if cfg.backend == "api" and cfg.init_from:
            print(f"note: --backend api with --init_from: the API model must serve {cfg.init_from} (merged), "
                  f"or the data will not come from the baked teacher")
        return cfg.backend
    if cfg.init_from and cfg.api_base_url:
        print(f"backend auto: local, because the teacher is {cfg.init_from} with the prompt, which the API does not serve")
        return "local"
    return "api" if cfg.api_base_url else "local"


def _settings(cfg, system: str, backend: str, model_id: str, rows: list[Row]) -> dict:
    return {"prompt_sha256": sha256_text(system), "backend": backend, "model": model_id,
            "temperatures": [float(t) for t in cfg.temperatures], "samples_per_query": cfg.samples_per_query,
            "max_new_tokens": cfg.max_new_tokens, "top_p": cfg.top_p,
            "queries_sha256": sha256_text(orjson.dumps([r.context for r in rows]).decode())}


def check_prompt_length(cfg, system: str, tokenizer) -> None:
    """A system prompt too long to bake is refused before any row is generated."""
    n = len(tokenizer(system, add_special_tokens=False)["input_ids"]) if tokenizer is not None else len(system) // 4
    if n > cfg.max_prompt_tokens:
        raise UserError(f"{cfg.prompt_file}: the system prompt is {'' if tokenizer else 'about '}{n} tokens, over "
                        f"max_prompt_tokens={cfg.max_prompt_tokens}; shorten it or raise --max_prompt_tokens")


@dataclass
class Backend:
    """Where the answers come from: `run(jobs, emit)` answers rows, `ask_many` writes queries."""
    name: str
    model_id: str
    run: object
    ask_many: object
    client: ChatClient | None = None
    tokenizer: object = None  # the local tokenizer, to count the prompt's tokens exactly
    close: object = lambda: None


def api_backend(cfg, system: str) -> Backend:
    """One HTTP client on one event loop for the whole stage: written queries and answers share its connections."""
    if not cfg.api_base_url:
        raise UserError("backend api needs api_base_url (in config, --api_base_url, or API_BASE_URL in .env)")
    api_model = cfg.api_model or "default"
    loop = asyncio.new_event_loop()
    client = ChatClient(cfg.api_base_url, api_model, concurrency=cfg.concurrency, timeout=cfg.request_timeout,
                        max_retries=cfg.max_retries)

    def ask_many(requests, seeds):
        async def all_of():
            return await asyncio.gather(*[client.chat(r, temperature=1.0, max_tokens=QUERY_MAX_TOKENS) for r in requests])

        return [c.content for c in loop.run_until_complete(all_of())]

    def close():
        loop.run_until_complete(client.aclose())
        loop.close()

    def run(jobs, emit, parts=None):  # an API returns no logits: `parts` stays empty
        loop.run_until_complete(_run_api(client, jobs, system, cfg, emit))

    return Backend("api", f"api:{api_model}", run, ask_many, client, close=close)


def local_backend(cfg, system: str, model, tokenizer, model_id: str | None = None) -> Backend:
    if model is None:
        model, tokenizer, model_id, _, _ = load_start(cfg)
    model_id = model_id or model.name_or_path

    def ask_many(requests, seeds):
        prompts = [render_prompt_ids(tokenizer, r, None) for r in requests]
        out = []
        for b in range(0, len(prompts), cfg.gen_batch_size):
            batch = generate_ids(model, tokenizer, prompts[b:b + cfg.gen_batch_size], temperature=1.0,
                                 max_new_tokens=QUERY_MAX_TOKENS, seed=seeds[b])
            out += [decode_response(tokenizer, ids) for ids, _ in batch]
        return out

    return Backend("local", model_id, lambda jobs, emit, parts=None: _run_local(model, tokenizer, jobs, system, cfg,
                                                                                emit, parts),
                   ask_many, tokenizer=tokenizer)


def _source_rows(cfg, system: str, ask_many) -> list[Row]:
    if cfg.training_prompts:
        rows = [Row(i, [{"role": "user", "content": q}]) for i, q in enumerate(cfg.training_prompts, 1)]
    elif cfg.generate_queries > 0:
        path = Path(cfg.data_dir) / f"{cfg.name}.queries.txt"
        if path.exists() and not cfg.overwrite:
            print(f"reusing queries from {path} (--overwrite to write new ones)")
            rows = load_prompts(str(path))
        else:
            queries = write_queries(cfg, system, ask_many, path)
            rows = [Row(i, [{"role": "user", "content": q}]) for i, q in enumerate(queries, 1)]
    else:
        rows = load_prompts(cfg.prompts, strip_system=cfg.strip_system)
    return rows[:cfg.num_queries] if cfg.num_queries > 0 else rows


def _row(context, text, index, temperature, finish_reason, ids=None) -> dict:
    row = {"messages": [*context, {"role": "assistant", "content": text}],
           "generation": {"index": index, "temperature": temperature, "finish_reason": finish_reason}}
    if ids is not None:
        row["response_token_ids"] = ids
    return row


def write_paired(out: Path, meta_path: Path, rows: list[Row], system: str) -> Path:
    print(f"the prompts already carry responses: writing {len(rows)} paired rows as they are")
    data = b"".join(orjson.dumps({"messages": [*r.context, {"role": "assistant", "content": r.response}]}) + b"\n"
                    for r in rows)
    shutil.rmtree(topk_dir(out), ignore_errors=True)  # an earlier generation's logits: not of these rows
    atomic_write_bytes(out, data)
    write_json(meta_path, {"settings": {"backend": "paired", "prompt_sha256": sha256_text(system)},
                           "rows": len(rows), "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return out


def rows_done(cfg, out: Path, meta_path: Path, settings: dict) -> set:
    """Keys of the rows already on disk from a run with the same settings (a resume); refuses other settings."""
    if not out.exists():
        return set()
    old = read_json(meta_path).get("settings") if meta_path.exists() else None
    if cfg.overwrite:
        out.unlink()
        return set()
    if old != settings:
        changed = sorted(k for k in settings if (old or {}).get(k) != settings[k])
        raise UserError(f"{out} was made with other settings ({', '.join(changed) or 'unknown'} differ); "
                        f"rerun with --overwrite to replace it, or pick another --name")
    if b"\n" not in out.read_bytes().strip():  # killed before or while writing its first row
        try:
            return {r.key for r in load_rows(str(out))}
        except UserError:
            return set()
    return {r.key for r in load_rows(str(out))}


class Progress:
    """Counts what happens to each requested row and writes the kept ones; drives the progress bar."""

    def __init__(self, writer: JsonlAppender, total: int, done: int, client: ChatClient | None):
        self.writer, self.client = writer, client
        self.counts = {"written": done, "empty": 0, "filtered": 0, "truncated": 0}
        self.bar = tqdm(total=total, initial=done, desc="rows", unit="row")

    def __call__(self, row, index, temp, text, finish_reason, ids=None) -> None:
        if finish_reason == "content_filter":
            self.counts["filtered"] += 1
        elif not text.strip():
            self.counts["empty"] += 1
        else:
            self.counts["truncated"] += finish_reason == "length"
            self.writer.write(_row(row.context, text, index, temp, finish_reason, ids))
            self.counts["written"] += 1
        self.bar.update(1)
        stats = self.client.stats if self.client else None
        self.bar.set_postfix(empty=self.counts["empty"], filtered=self.counts["filtered"],
                             errors=stats.errors if stats else 0, retries=stats.retries if stats else 0)


def generate(cfg, model=None, tokenizer=None, model_id: str | None = None) -> Path:
    """Writes data/<name>.jsonl (+ .meta.json). Resumes: rows already written are skipped."""
    cfg = with_parent_model(cfg)
    system = teacher_system(cfg, cfg.prompt_file)
    load_checks(cfg, {"prompt_file": cfg.prompt_file})  # a mistake in the checks stops here, not after the data
    out, meta_path = data_path(cfg), Path(cfg.data_dir) / f"{cfg.name}.meta.json"
    check_data_dir(cfg.data_dir)
    with ExitStack() as stack:
        stack.enter_context(run_lock(out, "generate_data"))
        name = pick_backend(cfg)
        backend = api_backend(cfg, system) if name == "api" else local_backend(cfg, system, model, tokenizer, model_id)
        stack.callback(backend.close)
        check_prompt_length(cfg, system, backend.tokenizer)
        print(f"backend: {name}" + (f" ({redact_url(cfg.api_base_url)})" if name == "api" else
                                    f" ({cfg.init_from or 'the base model'}, with the prompt)"))
        rows = _source_rows(cfg, system, backend.ask_many)
        if all(r.response is not None for r in rows):  # paired input: used as is
            return write_paired(out, meta_path, rows, system)
        settings = _settings(cfg, system, name, backend.model_id, rows)
        done = rows_done(cfg, out, meta_path, settings)
        if not out.exists():  # a fresh data file: an earlier one's stored logits go with it
            shutil.rmtree(topk_dir(out), ignore_errors=True)
        parts = PartWriter(topk_dir(out), header(backend.model_id, system, cfg.top_k, backend.tokenizer),
                           len(backend.tokenizer)) if name == "local" and cfg.free_teacher_logits else None
        jobs = [(r, i, float(t)) for t in cfg.temperatures for i in range(cfg.samples_per_query) for r in rows
                if row_key(r.context, i, float(t)) not in done]
        total = len(rows) * len(cfg.temperatures) * cfg.samples_per_query
        meta = {"settings": settings, "config": to_dict(cfg), "rows_requested": total}
        write_json(meta_path, {**meta, "status": "running", "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
        if done:
            print(f"resuming: {total - len(jobs)} of {total} rows already in {out}")
        t0 = time.time()
        with JsonlAppender(out) as writer:
            progress = Progress(writer, total, total - len(jobs), backend.client)
            try:
                backend.run(jobs, progress, parts)
            finally:
                progress.bar.close()
        finish_data(out, meta_path, meta, progress.counts, backend.client, total - len(jobs), time.time() - t0)
    return out


def check_data_dir(data_dir: str) -> None:
    if Path(data_dir).exists() and not Path(data_dir).is_dir():
        raise UserError(f"--data_dir {data_dir} is a file, not a folder; pass a folder (default: data)")


def finish_data(out: Path, meta_path: Path, meta: dict, counts: dict, client, done_before: int, elapsed: float) -> None:
    """Writes the final meta (counted from the file on disk), prints the summary, fails on an empty result."""
    on_disk = len(load_rows(str(out))) if out.exists() and out.stat().st_size else 0
    counts = {**counts, "written": on_disk}
    stats = vars(client.stats) if client else {}
    new_rows = on_disk - done_before
    total = meta["rows_requested"]
    write_json(meta_path, {**meta, "counts": counts, "api": stats,
                           "status": "complete" if on_disk == total else "incomplete",
                           "rows_per_s": round(new_rows / elapsed, 3) if elapsed > 0 else None,
                           "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
    print(f"wrote {out}: {on_disk}/{total} rows | {new_rows / max(elapsed, 1e-9):.2f} rows/s | "
          f"empty {counts['empty']} | filtered {counts['filtered']} | truncated {counts['truncated']}"
          + (f" | retries {stats['retries']}" if stats else ""))
    if counts["empty"] or counts["filtered"]:
        print("note: empty or filtered responses were not written; rerun to try those rows again")
    if on_disk == 0:
        raise UserError(f"{out}: no rows were written (every answer was empty or filtered); check the model or API")


def _run_local(model, tokenizer, jobs, system, cfg, emit, parts=None):
    """Answers the jobs in batches; with `parts` (a freelogits.PartWriter), each batch's top-K is written
    before its rows, so every row on disk has its logits stored (a part's entries without a row are ignored)."""
    by_sample: dict[tuple, list] = {}
    for row, index, temp in jobs:
        by_sample.setdefault((temp, index), []).append(row)
    for (temp, index), rows in by_sample.items():
        for batch in answer_locally(model, tokenizer, rows, system, temperature=temp, max_new_tokens=cfg.max_new_tokens,
                                    batch_size=cfg.gen_batch_size, top_p=cfg.top_p, seed=(cfg.seed, temp, index),
                                    progress=False, keep_topk=cfg.top_k if parts is not None else 0):
            if parts is not None:
                parts.write([(a, row_key(a.row.context, index, temp)) for a in batch])
            for a in batch:
                emit(a.row, index, temp, decode_response(tokenizer, a.ids), "stop" if a.complete else "length", a.ids)


async def _run_api(client, jobs, system, cfg, emit):
    async def one(row, index, temp):
        c = await client.chat([{"role": "system", "content": system}, *row.context], temperature=temp,
                              max_tokens=cfg.max_new_tokens, top_p=cfg.top_p)
        emit(row, index, temp, c.content, c.finish_reason)

    tasks = [asyncio.create_task(one(*job)) for job in jobs]
    try:
        for fut in asyncio.as_completed(tasks):
            await fut
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
