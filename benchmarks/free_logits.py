"""The teacher stage with and without free teacher logits, side by side on the same data and machine.

    python benchmarks/free_logits.py                 # default data: 120 builtin queries x 2 temperatures
    python benchmarks/free_logits.py --num_queries 32

Generates the data once (local backend, the generator keeping its top-K), then runs bake.py's teacher stage
(train.prepare_target) alternately with --free_teacher_logits true and false (the teacher cache deleted before
each teacher pass), `--rounds` times each, and the generation itself with and without keeping the top-K.
Writes benchmarks/free_logits.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from promptbake.config import Config
from promptbake.data import load_prompts, load_rows, read_prompt
from promptbake.generate import generate
from promptbake.model import load_model, load_tokenizer, resolve_model_path
from promptbake.sampling import answer_locally
from promptbake.train import prepare_target

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num_queries", type=int, default=0, help="0 = all 120 builtin queries")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--gen_rows", type=int, default=32, help="rows of the generation-overhead check (0 = skip)")
    ap.add_argument("--workdir", default="/tmp/promptbake-free-logits")
    args = ap.parse_args()
    work = Path(args.workdir)
    (work / "data").mkdir(parents=True, exist_ok=True)
    cfg = Config(name="default", data_dir=str(work / "data"), prompt_file=str(ROOT / "prompt.md"),
                 num_queries=args.num_queries, wandb_mode="disabled", verify_queries=0)
    path = resolve_model_path(cfg.model_name_or_path)
    tokenizer, model = load_tokenizer(path), load_model(path)
    t0 = time.time()
    out = generate(cfg, model, tokenizer, path)
    gen_s = time.time() - t0
    spec = {"prompt_file": cfg.prompt_file, "student_prompt": "", "data": str(out), "weight": 1.0, "name": "default",
            "marker_regex": "", "data_file": str(out), "rows": load_rows(str(out))}
    result = {"rows": len(spec["rows"]), "threads": torch.get_num_threads(),
              "generate_s (~0 when the data was already there)": gen_s, "teacher_stage_s": {"free": [], "teacher_pass": []}}
    for _ in range(args.rounds):
        for free in (True, False):
            shutil.rmtree(work / "data" / "cache", ignore_errors=True)
            cfg.free_teacher_logits = free
            t0 = time.time()
            target = prepare_target(cfg, spec, model, tokenizer, path)
            result["teacher_stage_s"]["free" if free else "teacher_pass"].append(time.time() - t0)
            result["response_tokens"] = sum(e.n_response for e in target.examples)
    # the generator's own cost of keeping the top-K, on the first --gen_rows queries at T=0.7
    rows = load_prompts("builtin")[:args.gen_rows]
    system = read_prompt(cfg.prompt_file)
    gen = {"keep_topk": [], "plain": []}
    for _ in range(args.rounds if rows else 0):
        for k in (cfg.top_k, 0):
            t0 = time.time()
            for _batch in answer_locally(model, tokenizer, rows, system, temperature=0.7, max_new_tokens=64,
                                         batch_size=32, progress=False, keep_topk=k):
                pass
            gen["keep_topk" if k else "plain"].append(time.time() - t0)
    if rows:
        result[f"generation_{len(rows)}_rows_s"] = gen
    med = {k: sum(v) / len(v) for k, v in result["teacher_stage_s"].items()}
    result["teacher_stage_ratio_free_over_pass"] = med["free"] / med["teacher_pass"]
    result["time"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    print(json.dumps(result, indent=1))
    (ROOT / "benchmarks" / "free_logits.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
