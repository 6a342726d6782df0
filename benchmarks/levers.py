"""What moves bake quality and speed: each lever is a full generate -> bake run, scored on questions written
apart from the training queries (examples/unseen_questions.txt).

    python benchmarks/levers.py --persona pirate --levers "num_epochs=3" "num_epochs=1,onpolicy_steps=16"
    python benchmarks/levers.py --checks bf16,free_logits      # numerics and speed of two speed levers
    python benchmarks/levers.py --table                         # the table of every result so far

A lever is a comma list of settings: any Config field (lists with "/": temperatures=0.7/1.0/1.3), the on-policy
stage's onpolicy_<field> among them; bf16=on|off is the Config field (the student's matmuls under bf16 autocast;
default auto).
For each lever: held-out full-vocabulary KL(prompted base || baked, no prompt) on the prompted base's sampled
answers (2 per question, T=0.7), its cut from the unbaked base, top-1 agreement, the persona rate of greedy and
sampled answers without the prompt, and the wall time of generation + bake. Data and teacher caches are
shared between levers with the same data settings; a data set's generation time is measured once and counted
in every lever that uses it. Results accumulate in benchmarks/levers_results.json.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import time
from pathlib import Path

import torch

import promptbake.config as config_module
import promptbake.stages as stages
from promptbake.chat import render_prompt_ids
from promptbake.checks import front_matter_checks
from promptbake.data import Row, load_prompts, read_prompt
from promptbake.evaluate import sample, texts_of
from promptbake.forward import backbone_and_head, common_prefix_len, response_hidden
from promptbake.generate import generate
from promptbake.metrics import follows, kl_and_agreement, kl_cut
from promptbake.sampling import answer_in_batches, decode_response, generate_ids
from promptbake.teacher import build_examples

ROOT = Path(__file__).resolve().parent.parent

RESULTS = ROOT / "benchmarks" / "levers_results.json"
QUESTIONS = ROOT / "examples" / "unseen_questions.txt"


def declared_regex(prompt_file: str, name: str) -> str:
    """The regex of the prompt file's own `matches` check called `name` (its front matter)."""
    return next(c.value for c in front_matter_checks(prompt_file) if c.name == name)


PERSONAS = {"pirate": {"prompt_file": str(ROOT / "prompt.md"),
                       "marker_regex": declared_regex(str(ROOT / "prompt.md"), "pirate words")},
            "knight": {**config_module.load_yaml(str(ROOT / "examples" / "personas" / "knight.yaml")),
                       "marker_regex": declared_regex(str(ROOT / "examples" / "personas" / "knight.md"), "knight words")}}
DATA_KEYS = ("temperatures", "max_new_tokens", "samples_per_query", "num_queries", "prompts", "top_p")
EVAL_SAMPLES, EVAL_TOKENS, SEED = 2, 64, 0


# ---------------------------------------------------------------- levers
def parse_lever(spec: str) -> dict:
    out = {}
    for part in filter(None, spec.split(",")):
        key, _, value = part.partition("=")
        out[key.strip()] = value.strip().replace("/", ",")
    return out


def short_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


# ---------------------------------------------------------------- generate + bake
def make_data(persona: str, fields: dict, workdir: Path) -> tuple[str, float]:
    """data/<name>.jsonl for these data settings (generated once); returns (name, generation seconds)."""
    data = {k: v for k, v in fields.items() if k in DATA_KEYS}
    name = f"{persona}-{short_hash([data, False])}"  # False: data made in fp32 (names of earlier runs kept)
    timing = workdir / "data" / f"{name}.gen_time.json"
    if timing.exists():
        return name, json.loads(timing.read_text())["seconds"]
    cfg = config_module.from_dict({**data, "name": name, "data_dir": str(workdir / "data"), "wandb_mode": "disabled",
                                   "prompt_file": PERSONAS[persona]["prompt_file"], "overwrite": True}, "lever")
    t0 = time.time()
    generate(cfg)
    seconds = time.time() - t0
    timing.write_text(json.dumps({"seconds": seconds, "settings": data}))
    return name, seconds


def run_bake(persona: str, spec: str, workdir: Path) -> tuple[Path, dict]:
    fields = parse_lever(spec)
    name, gen_s = make_data(persona, fields, workdir)
    train_fields = {k: v for k, v in fields.items() if k not in DATA_KEYS}
    cfg = config_module.from_dict({**train_fields, "name": name, "data_dir": str(workdir / "data"),
                                   "checkpoint_dir": str(workdir / "checkpoints" / short_hash([persona, spec])),
                                   "prompt_file": PERSONAS[persona]["prompt_file"], "wandb_mode": "disabled",
                                   "verify_queries": 0}, "lever")
    t0 = time.time()
    final = stages.bake(cfg)  # the whole bake, report.html too, as bake.py runs it
    bake_s = time.time() - t0
    timings = json.loads((final.parent / "timings.json").read_text())
    return final, {"generate_s": gen_s, "bake_s": bake_s, "total_s": gen_s + bake_s, "bake_timings": timings}


# ---------------------------------------------------------------- evaluation on unseen questions
def rate(texts: list[str], regex: str) -> float:
    return sum(follows(t, [], regex) for t in texts) / len(texts)


def greedy_texts(model, tokenizer, contexts, system) -> list[str]:
    return [decode_response(tokenizer, ids) for ids, _ in answer_in_batches(
        model, tokenizer, contexts, system, batch_size=20, temperature=0, max_new_tokens=EVAL_TOKENS)]


def reference(persona: str, model, tokenizer, workdir: Path) -> dict:
    """Per persona, once: the prompted base's sampled answers (the KL rows), its greedy answers, and the
    unprompted base's; KL before baking. Cached in the workdir."""
    path = workdir / f"reference-{persona}.json"
    if path.exists():
        return json.loads(path.read_text())
    system = read_prompt(PERSONAS[persona]["prompt_file"])
    contexts = [r.context for r in load_prompts(str(QUESTIONS))]
    with model.disable_adapter():
        teacher = sample(model, tokenizer, contexts, system, EVAL_TOKENS, EVAL_SAMPLES, SEED)
        base_sampled = texts_of(tokenizer, sample(model, tokenizer, contexts, None, EVAL_TOKENS, 1, SEED))
        ref = {"rows": [[c, ids, complete] for c, ids, complete in teacher],
               "prompted_sampled": texts_of(tokenizer, teacher), "base_sampled": base_sampled,
               "prompted_greedy": greedy_texts(model, tokenizer, contexts, system),
               "base_greedy": greedy_texts(model, tokenizer, contexts, None)}
    examples = eval_examples(ref, system, tokenizer)
    ref["kl_before"], ref["top1_before"] = kl_and_agreement(model, examples, tokenizer.pad_token_id, adapter=False)
    path.write_text(json.dumps(ref))
    return ref


def eval_examples(ref: dict, system: str, tokenizer):
    rows = [Row(j, c, None, ids, complete) for j, (c, ids, complete) in enumerate(ref["rows"], 1)]
    return build_examples(rows, tokenizer, system, "", 512, True, str(QUESTIONS))[0]


def evaluate_unseen(persona: str, checkpoint: Path, workdir: Path) -> dict:
    from promptbake.baked import load_baked

    model, tokenizer, _ = load_baked(checkpoint, device="cpu")
    ref = reference(persona, model, tokenizer, workdir)
    system, regex = read_prompt(PERSONAS[persona]["prompt_file"]), PERSONAS[persona]["marker_regex"]
    kl, top1 = kl_and_agreement(model, eval_examples(ref, system, tokenizer), tokenizer.pad_token_id)
    contexts = [r.context for r in load_prompts(str(QUESTIONS))]
    greedy = greedy_texts(model, tokenizer, contexts, None)
    sampled = texts_of(tokenizer, sample(model, tokenizer, contexts, None, EVAL_TOKENS, 1, SEED))
    return {"kl_before": ref["kl_before"], "kl_after": kl, "kl_cut": kl_cut(ref["kl_before"], kl),
            "top1_before": ref["top1_before"], "top1_after": top1,
            "rate_greedy": {"base": rate(ref["base_greedy"], regex), "prompted": rate(ref["prompted_greedy"], regex),
                            "baked": rate(greedy, regex)},
            "rate_sampled": {"base": rate(ref["base_sampled"], regex), "prompted": rate(ref["prompted_sampled"], regex),
                             "baked": rate(sampled, regex)},
            "examples": [{"user": c[-1]["content"], "baked_greedy": g} for c, g in list(zip(contexts, greedy))[:4]]}


def commit() -> str:
    """The code a lever ran on: the same lever at two commits (e.g. before and after a kernel change) differs."""
    import subprocess

    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def run_lever(persona: str, spec: str, workdir: Path, threads: int) -> dict:
    final, times = run_bake(persona, spec, workdir)
    result = {"persona": persona, "lever": spec, "threads": threads, **times, **evaluate_unseen(persona, final, workdir),
              "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "commit": commit()}
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    results.append(result)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    return result


def print_table(results: list[dict]) -> None:
    print(f"\n{'persona':8} {'lever':52} {'commit':>7} {'thr':>3} {'KL before':>9} {'after':>7} {'cut':>6} {'top1':>5} "
          f"{'greedy b/p/baked':>17} {'sampled b/p/baked':>18} {'gen s':>6} {'bake s':>7} {'total s':>7}")
    for r in results:
        g, s = r["rate_greedy"], r["rate_sampled"]
        print(f"{r['persona']:8} {r['lever'][:52]:52} {r.get('commit', 'before'):>7} {r['threads']:>3} "
              f"{r['kl_before']:>9.4f} {r['kl_after']:>7.4f} "
              f"{100 * r['kl_cut']:>5.1f}% {r['top1_after']:>5.3f} "
              f"{g['base']:>5.2f}/{g['prompted']:.2f}/{g['baked']:.2f} {s['base']:>6.2f}/{s['prompted']:.2f}/{s['baked']:.2f} "
              f"{r['generate_s']:>6.0f} {r['bake_s']:>7.0f} {r['total_s']:>7.0f}")


# ---------------------------------------------------------------- checks: bf16 numerics and speed, free teacher logits
def check_rows(model, tokenizer, system: str, n: int, max_new_tokens: int = 64):
    """n of the builtin queries answered by the prompted base at T=1 (the default data's distribution)."""
    from promptbake.seeds import seed_queries

    contexts = [[{"role": "user", "content": q}] for q in seed_queries()[:n]]
    prompts = [render_prompt_ids(tokenizer, c, system) for c in contexts]
    outs = generate_ids(model, tokenizer, prompts, temperature=1.0, max_new_tokens=max_new_tokens, seed=SEED)
    rows = [Row(j, c, None, ids, complete) for j, (c, (ids, complete)) in enumerate(zip(contexts, outs), 1)]
    return build_examples(rows, tokenizer, system, "", 512, True, "check")[0]


def timed(fn, repeats: int = 2):
    """(result of the first call, median seconds over repeats)."""
    times, result = [], None
    for i in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        result = out if i == 0 else result
    return result, sorted(times)[len(times) // 2]


def compare_topk(ref_logits: torch.Tensor, other_logits: torch.Tensor, k: int) -> dict:
    """How far `other` is from `ref` as a teacher: top-1 and top-K id agreement, log-prob differences at the
    reference's top-K ids, and the full-vocabulary KL(ref || other) per token."""
    lp_ref, lp_oth = torch.log_softmax(ref_logits.float(), -1), torch.log_softmax(other_logits.float(), -1)
    ids_ref, ids_oth = lp_ref.topk(k).indices, lp_oth.topk(k).indices
    overlap = (ids_ref.unsqueeze(-1) == ids_oth.unsqueeze(-2)).any(-1).float().mean().item()
    diff = (lp_ref.gather(-1, ids_ref) - lp_oth.gather(-1, ids_ref)).abs()
    return {"top1_same": (ids_ref[:, 0] == ids_oth[:, 0]).float().mean().item(), "topk_set_overlap": overlap,
            "topk_ids_identical_rows": (ids_ref == ids_oth).all(-1).float().mean().item(),
            "logprob_abs_diff_mean": diff.mean().item(), "logprob_abs_diff_max": diff.max().item(),
            "kl_full_mean": (lp_ref.exp() * (lp_ref - lp_oth)).sum(-1).mean().item(), "tokens": len(ref_logits)}


def check_bf16(model, tokenizer, system: str, n: int, k: int) -> dict:
    """Teacher logits with the backbone autocast to bf16 (head fp32) and with everything autocast, against
    fp32; speed of the teacher pass, one LoRA training step and generation, fp32 vs bf16."""
    from peft import LoraConfig, get_peft_model

    from promptbake.forward import response_logits
    from promptbake.loss import head_topk_kl_with_tail, teacher_topk

    examples = check_rows(model, tokenizer, system, n)
    seqs, n_resp, pad = [e.teacher_ids for e in examples], [e.n_response for e in examples], tokenizer.pad_token_id
    head = backbone_and_head(model)[1]

    def teacher(mode):
        with torch.inference_mode():
            if mode == "fp32":
                return response_logits(model, seqs, n_resp, pad)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                if mode == "bf16_all":
                    return response_logits(model, seqs, n_resp, pad)
                hidden = response_hidden(model, seqs, n_resp, pad)
            return head(hidden.float())

    ref, t_fp32 = timed(lambda: teacher("fp32"))
    out = {"rows": n, "k": k}
    for mode in ("bf16_backbone", "bf16_all"):
        logits, t = timed(lambda: teacher(mode))
        out[mode] = {**compare_topk(ref, logits, k), "teacher_s": t, "speedup_vs_fp32": t_fp32 / t}
    out["teacher_fp32_s"] = t_fp32

    # one optimizer step's forward + backward, batch 8, as train.batch_loss does it
    peft = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    batch = examples[:8]
    t_ids, t_lp = teacher_topk(ref[:sum(e.n_response for e in batch)], k)

    def step(bf16):
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            hidden = response_hidden(peft, [e.student_ids for e in batch], [e.n_response for e in batch], pad)
        loss = head_topk_kl_with_tail(hidden.float(), head, t_ids, t_lp)
        loss.backward()
        peft.zero_grad()
        return loss.item()

    (loss32, t32), (loss16, t16) = timed(lambda: step(False), 3), timed(lambda: step(True), 3)
    out["train_step"] = {"fp32_s": t32, "bf16_s": t16, "speedup": t32 / t16, "loss_fp32": loss32, "loss_bf16": loss16}
    peft.unload()

    prompts = [e.teacher_ids[:-e.n_response] for e in examples[:16]]

    def gen(bf16):
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            return generate_ids(model, tokenizer, prompts, temperature=1.0, max_new_tokens=48, seed=1)

    (_, g32), (_, g16) = timed(lambda: gen(False), 1), timed(lambda: gen(True), 1)
    out["generation_16x48"] = {"fp32_s": g32, "bf16_s": g16, "speedup": g32 / g16}
    return out


def check_free_logits(model, tokenizer, system: str, n: int, k: int) -> dict:
    """The generator's top-K as generate_data.py keeps them (answer_locally with keep_topk: TopKRecorder in the decode
    loop) against the teacher pass (shared system prefix, as the cache computes it), and the verdict of the check
    bake.py runs before it reuses them (freelogits.check_against_teacher, on the numbers as stored: fp16, packed ids)."""
    from promptbake.forward import response_logits, shared_prefix
    from promptbake.freelogits import check_against_teacher
    from promptbake.sampling import answer_locally
    from promptbake.seeds import seed_queries
    from promptbake.teacher import topk_id_dtype

    rows = [Row(j, [{"role": "user", "content": q}]) for j, q in enumerate(seed_queries()[:n], 1)]

    def answer(keep_topk: int):
        return [a for batch in answer_locally(model, tokenizer, rows, system, temperature=1.0, max_new_tokens=64,
                                              batch_size=n, seed=SEED, progress=False, keep_topk=keep_topk)
                for a in batch]

    answers, t_free = timed(lambda: answer(k), 1)
    _, t_plain = timed(lambda: answer(0), 1)
    seqs = [a.prompt_ids + a.ids for a in answers]
    n_resp = [len(a.ids) for a in answers]

    def teacher_pass():
        with torch.inference_mode():
            prefix = shared_prefix(model, seqs[0][:common_prefix_len(seqs, n_resp)])
            return response_logits(model, seqs, n_resp, tokenizer.pad_token_id, prefix, share=False)

    logits, t_teacher = timed(teacher_pass, 1)
    lp_t, ids_t = torch.log_softmax(logits.float(), -1).topk(k, dim=-1)
    ids_g, lp_g = torch.cat([a.topk[0] for a in answers]), torch.cat([a.topk[1] for a in answers])
    same_ids = (ids_g == ids_t).all(-1)
    at_teacher_ids = torch.log_softmax(logits.float(), -1)  # the teacher's log-probs at the generator's ids
    diff = (at_teacher_ids.gather(-1, ids_g) - lp_g).abs()
    stored_rows = [Row(a.row.line, a.row.context, None, a.ids, a.complete) for a in answers]
    examples = build_examples(stored_rows, tokenizer, system, "", 512, True, "check")[0]
    stored = [(a.topk[0].to(topk_id_dtype(len(tokenizer))), a.topk[1].half()) for a in answers]
    accepted, verdict = check_against_teacher(model, tokenizer, examples, stored, ["the generated rows"] * n,
                                              list(range(n)), k, 8)
    return {"rows": n, "tokens": int(sum(n_resp)), "k": k,
            "topk_ids_identical_rows": same_ids.float().mean().item(),
            "top1_same": (ids_g[:, 0] == ids_t[:, 0]).float().mean().item(),
            "topk_set_overlap": (ids_g.unsqueeze(-1) == ids_t.unsqueeze(-2)).any(-1).float().mean().item(),
            "logprob_abs_diff_mean": diff.mean().item(), "logprob_abs_diff_max": diff.max().item(),
            "bake_check_accepts": accepted, "bake_check": verdict,
            "generate_s": t_plain, "generate_with_topk_s": t_free, "teacher_pass_s": t_teacher,
            "saved_fraction_of_teacher_pass": (t_teacher - (t_free - t_plain)) / t_teacher}


# ---------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--persona", default="pirate", choices=sorted(PERSONAS))
    parser.add_argument("--levers", nargs="*", default=[], help='e.g. "num_epochs=1,onpolicy_steps=16"')
    parser.add_argument("--checks", default="", help="bf16,free_logits")
    parser.add_argument("--check_rows", type=int, default=32)
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the figures in README: 1)")
    parser.add_argument("--workdir", default="/tmp/promptbake-levers", help="data, caches, checkpoints")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    (workdir / "data").mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("WANDB_SILENT", "true")
    if args.checks:
        from promptbake.model import load_model, load_tokenizer, resolve_model_path

        path = resolve_model_path("embedded")
        tokenizer, model = load_tokenizer(path), load_model(path)
        system = read_prompt(PERSONAS[args.persona]["prompt_file"])
        checks = {"threads": args.threads, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        for name in args.checks.split(","):
            fn = {"bf16": check_bf16, "free_logits": check_free_logits}[name]
            checks[name] = fn(model, tokenizer, system, args.check_rows, 20)
            print(json.dumps({name: checks[name]}, indent=1))
        out = ROOT / "benchmarks" / "levers_checks.json"
        old = json.loads(out.read_text()) if out.exists() else {}
        out.write_text(json.dumps({**old, **checks}, indent=1) + "\n")
    for spec in args.levers:
        print(f"\n=== lever {spec!r} ({args.persona}, {args.threads} thread(s))", flush=True)
        r = run_lever(args.persona, spec, workdir, args.threads)
        print_table([r])
    if args.table or args.levers:
        print_table(json.loads(RESULTS.read_text()) if RESULTS.exists() else [])


if __name__ == "__main__":
    main()
