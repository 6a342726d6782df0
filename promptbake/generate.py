"""The data stage: queries in, (user, assistant) rows out, answered WITH the system prompt and saved WITHOUT it."""

from __future__ import annotations

import asyncio
import os
import random
import re
import time
from pathlib import Path

import orjson
import torch
from tqdm.auto import tqdm

from .api_client import ChatClient, redact_url
from .chat import render_prompt_ids, stop_ids
from .data import Row, load_prompts, load_rows, read_prompt, row_key
from .errors import UserError
from .io import JsonlAppender, atomic_write_bytes, read_json, sha256_text, write_json
from .seeds import SEED_QUERIES


# ---------------------------------------------------------------- local batched generation
@torch.inference_mode()
def generate_ids(model, tokenizer, prompts: list[list[int]], *, temperature: float, max_new_tokens: int,
                 top_p: float = 1.0, seed: int | None = None) -> list[tuple[list[int], bool]]:
    """Generates for a batch of prompt ids (left padded). Returns (response ids, complete) per prompt:
    a complete response ends with the model's own end-of-turn token; a truncated one has none."""
    device = next(model.parameters()).device
    width = max(map(len, prompts))
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    stops = stop_ids(tokenizer, model)
    if seed is not None:
        torch.manual_seed(seed)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 else \
        dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                         pad_token_id=pad, eos_token_id=stops, **sampling)
    results = []
    for row in out[:, width:].tolist():
        end = next((i for i, t in enumerate(row) if t in stops), None)
        results.append((row[:end + 1], True) if end is not None else (row, False))
    return results


def decode_response(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def answer_locally(model, tokenizer, rows: list[Row], system: str | None, *, temperature: float,
                   max_new_tokens: int, batch_size: int, top_p: float = 1.0, seed: int = 0, progress: bool = True):
    """Yields (row, response_ids, complete) for rows answered by the local model, in batches sorted by
    prompt length to cut padding."""
    prompts = [render_prompt_ids(tokenizer, r.context, system) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: len(prompts[i]))
    bar = tqdm(total=len(rows), desc="generating", unit="row", disable=not progress)
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        outs = generate_ids(model, tokenizer, [prompts[i] for i in idx], temperature=temperature,
                            max_new_tokens=max_new_tokens, top_p=top_p, seed=seed + b)
        for i, (ids, complete) in zip(idx, outs):
            yield rows[i], ids, complete
        bar.update(len(idx))
    bar.close()


# ---------------------------------------------------------------- queries
def _clean_query(text: str) -> str:
    line = next((s for s in text.strip().splitlines() if s.strip()), "")
    line = re.sub(r"^(question|query|user|q)\s*[:\-]\s*", "", line.strip(), flags=re.I)
    return line.strip().strip('"').strip()


def query_request(system: str, topic: str) -> list[dict]:
    return [{"role": "user", "content":
             f"An AI assistant was given these instructions:\n---\n{system}\n---\nWrite one message that a user of "
             f"this assistant might send it, about {topic}. Reply with the user's message only."}]


def write_queries(cfg, system: str, ask, path: Path) -> list[str]:
    """Lets the model write cfg.generate_queries queries that fit the system prompt; deduplicated."""
    topics = list(SEED_QUERIES)
    rng = random.Random(cfg.seed)
    seen, queries = set(), []
    for attempt in range(cfg.generate_queries * 4):
        if len(queries) >= cfg.generate_queries:
            break
        q = _clean_query(ask(query_request(system, rng.choice(topics)), attempt))
        norm = re.sub(r"\W+", " ", q.lower()).strip()
        if len(norm) >= 8 and norm not in seen:
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
    if cfg.backend != "auto":
        return cfg.backend
    return "api" if cfg.api_base_url else "local"


def _settings(cfg, system: str, backend: str, model_id: str, rows: list[Row]) -> dict:
    return {"prompt_sha256": sha256_text(system), "backend": backend, "model": model_id,
            "temperatures": [float(t) for t in cfg.temperatures], "samples_per_query": cfg.samples_per_query,
            "max_new_tokens": cfg.max_new_tokens, "top_p": cfg.top_p,
            "queries_sha256": sha256_text(orjson.dumps([r.context for r in rows]).decode())}


def _source_rows(cfg, system: str, ask) -> list[Row]:
    if cfg.training_prompts:
        rows = [Row(i, [{"role": "user", "content": q}]) for i, q in enumerate(cfg.training_prompts, 1)]
    elif cfg.generate_queries > 0:
        path = Path(cfg.data_dir) / f"{cfg.name}.queries.txt"
        if path.exists() and not cfg.overwrite:
            print(f"reusing queries from {path} (--overwrite to write new ones)")
            rows = load_prompts(str(path))
        else:
            rows = [Row(i, [{"role": "user", "content": q}]) for i, q in enumerate(write_queries(cfg, system, ask, path), 1)]
    else:
        rows = load_prompts(cfg.prompts)
    return rows[:cfg.num_queries] if cfg.num_queries > 0 else rows


def _row(context, text, index, temperature, finish_reason, ids=None) -> dict:
    row = {"messages": [*context, {"role": "assistant", "content": text}],
           "generation": {"index": index, "temperature": temperature, "finish_reason": finish_reason}}
    if ids is not None:
        row["response_token_ids"] = ids
    return row


def generate(cfg, model=None, tokenizer=None) -> Path:
    """Writes data/<name>.jsonl (+ .meta.json). Resumes: rows already written are skipped."""
    from . import model as models

    system = read_prompt(cfg.prompt_file)
    out, meta_path = data_path(cfg), Path(cfg.data_dir) / f"{cfg.name}.meta.json"
    backend = pick_backend(cfg)
    base_url = cfg.api_base_url or os.environ.get("API_BASE_URL", "")
    if backend == "api" and not base_url:
        raise UserError("backend api needs api_base_url (in config, --api_base_url, or API_BASE_URL in .env)")
    print(f"backend: {backend}" + (f" ({redact_url(base_url)})" if backend == "api" else " (the base model, with the prompt)"))

    client = None
    if backend == "api":
        api_model = cfg.api_model or os.environ.get("API_MODEL", "") or "default"
        model_id = f"api:{api_model}"
        client = ChatClient(base_url, api_model, concurrency=cfg.concurrency, timeout=cfg.request_timeout,
                            max_retries=cfg.max_retries)

        def ask(messages, i):
            return asyncio.run(_ask_once(base_url, api_model, messages, cfg))
    else:
        if model is None:
            model, tokenizer, model_id, _ = models.load(cfg)
        else:
            model_id = model.name_or_path

        def ask(messages, i):
            ids = render_prompt_ids(tokenizer, messages, None)
            ((resp, _),) = generate_ids(model, tokenizer, [ids], temperature=1.0, max_new_tokens=48, seed=cfg.seed + i)
            return decode_response(tokenizer, resp)

    rows = _source_rows(cfg, system, ask)
    if all(r.response is not None for r in rows):  # paired input: used as is
        print(f"the prompts already carry responses: writing {len(rows)} paired rows as they are")
        data = b"".join(orjson.dumps({"messages": [*r.context, {"role": "assistant", "content": r.response}]}) + b"\n"
                        for r in rows)
        atomic_write_bytes(out, data)
        write_json(meta_path, {"settings": {"backend": "paired", "prompt_sha256": sha256_text(system)},
                               "rows": len(rows), "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
        return out

    settings = _settings(cfg, system, backend, model_id, rows)
    done = set()
    if out.exists():
        old = read_json(meta_path).get("settings") if meta_path.exists() else None
        if cfg.overwrite:
            out.unlink()
        elif old != settings:
            changed = sorted(k for k in settings if (old or {}).get(k) != settings[k])
            raise UserError(f"{out} was made with other settings ({', '.join(changed) or 'unknown'} differ); "
                            f"rerun with --overwrite to replace it, or pick another --name")
        else:
            done = {r.key for r in load_rows(str(out))}
    jobs = [(r, i, float(t)) for t in cfg.temperatures for i in range(cfg.samples_per_query) for r in rows
            if row_key(r.context, i, float(t)) not in done]
    total = len(rows) * len(cfg.temperatures) * cfg.samples_per_query
    from config import to_dict

    write_json(meta_path, {"settings": settings, "config": to_dict(cfg), "rows_requested": total, "status": "running",
                           "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
    if done:
        print(f"resuming: {total - len(jobs)} of {total} rows already in {out}")
    counts = {"written": total - len(jobs), "empty": 0, "filtered": 0, "truncated": 0}
    t0 = time.time()
    with JsonlAppender(out) as writer:
        bar = tqdm(total=total, initial=total - len(jobs), desc="rows", unit="row")

        def emit(row, index, temp, text, finish_reason, ids=None):
            if finish_reason == "content_filter":
                counts["filtered"] += 1
            elif not text.strip():
                counts["empty"] += 1
            else:
                counts["truncated"] += finish_reason == "length"
                writer.write(_row(row.context, text, index, temp, finish_reason, ids))
                counts["written"] += 1
            bar.update(1)
            bar.set_postfix(empty=counts["empty"], filtered=counts["filtered"],
                            errors=client.stats.errors if client else 0, retries=client.stats.retries if client else 0)

        try:
            if backend == "api":
                asyncio.run(_run_api(client, jobs, system, cfg, emit))
            else:
                _run_local(model, tokenizer, jobs, system, cfg, emit)
        finally:
            bar.close()
    elapsed = time.time() - t0
    stats = vars(client.stats) if client else {}
    new_rows = counts["written"] - (total - len(jobs))
    write_json(meta_path, {"settings": settings, "config": to_dict(cfg), "rows_requested": total, "counts": counts,
                           "api": stats,
                           "status": "complete" if counts["written"] == total else "incomplete",
                           "rows_per_s": round(new_rows / elapsed, 3) if elapsed > 0 else None,
                           "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
    print(f"wrote {out}: {counts['written']}/{total} rows | {new_rows / max(elapsed, 1e-9):.2f} rows/s | "
          f"empty {counts['empty']} | filtered {counts['filtered']} | truncated {counts['truncated']}"
          + (f" | retries {stats['retries']}" if stats else ""))
    if counts["empty"] or counts["filtered"]:
        print("note: empty or filtered responses were not written; rerun to try those rows again")
    return out


def _run_local(model, tokenizer, jobs, system, cfg, emit):
    by_temp: dict[tuple, list] = {}
    for row, index, temp in jobs:
        by_temp.setdefault((temp, index), []).append(row)
    for (temp, index), rows in by_temp.items():
        seed = cfg.seed * 1000 + index * 7 + int(temp * 100)
        for row, ids, complete in answer_locally(model, tokenizer, rows, system, temperature=temp,
                                                 max_new_tokens=cfg.max_new_tokens, batch_size=cfg.gen_batch_size,
                                                 top_p=cfg.top_p, seed=seed, progress=False):
            emit(row, index, temp, decode_response(tokenizer, ids), "stop" if complete else "length", ids)


async def _ask_once(base_url, api_model, messages, cfg):
    client = ChatClient(base_url, api_model, timeout=cfg.request_timeout, max_retries=cfg.max_retries)
    try:
        c = await client.chat(messages, temperature=1.0, max_tokens=64)
        return c.content
    finally:
        await client.aclose()


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
        await client.aclose()
