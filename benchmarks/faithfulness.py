"""The faithfulness benchmark: one prompt of each kind users write, baked with the project's defaults, scored on that
kind's own questions (never trained on) and on generic ones, against the prompted base.

    python benchmarks/faithfulness.py                              # every kind, the defaults (25-50 min a kind on 2 shared cores)
    python benchmarks/faithfulness.py --kinds facts,policy         # some kinds
    python benchmarks/faithfulness.py --tag long --set max_new_tokens=256 --set num_epochs=3   # a lever
    python benchmarks/faithfulness.py --table                      # the table of every result so far

Kinds (benchmarks/faithfulness/<kind>.md: the prompt, with the checks it demands in its front matter;
<kind>.txt: its own questions): persona, facts (a fact sheet the model cannot know), format (one short sentence),
policy (a topic policy with a fixed refusal), signoff (a fixed sign-off).

Each kind runs the user's own commands, generate_data.py -> bake.py -> evaluate.py, in a work folder of its own
(benchmarks/runs/faithfulness/<tag>/), so the figures are what a user gets. A stage whose output exists is skipped:
a rerun resumes. evaluate.py runs twice per kind: on the kind's questions (its checks, the loop share, the prompt
log-likelihood ratio, the KL cut and retention) and on examples/unseen_questions.txt (the KL cut on generic
questions). Every rate is printed with its 95% interval; results accumulate in benchmarks/faithfulness_results.json
under the tag, with the commit they ran on.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from promptbake.config import FIELDS
from promptbake.io import write_json
from promptbake.redact import redact

ROOT = Path(__file__).resolve().parent.parent
KINDS_DIR = ROOT / "benchmarks" / "faithfulness"
KINDS = ("persona", "facts", "format", "policy", "signoff")
GENERIC = ROOT / "examples" / "unseen_questions.txt"
RESULTS = ROOT / "benchmarks" / "faithfulness_results.json"
WORK = ROOT / "benchmarks" / "runs" / "faithfulness"
EVAL_SAMPLES = 2  # sampled answers per question and model, beside the greedy one
MODELS = ("base", "prompted", "baked", "baked_reprompted")
NO_RETENTION = ["--retention_items", "0"] if "retention_items" in FIELDS else []  # measured once, on the kind's run


# ---------------------------------------------------------------- running the stages
def run(script: str, *args: str, log: Path) -> None:
    """One stage as a user runs it; its output goes to the kind's log, a failure stops with the log's tail."""
    cmd = [sys.executable, str(ROOT / script), *args]
    with log.open("a") as f:
        f.write(f"\n$ {redact(' '.join(cmd))}\n")  # a key passed with --set stays off disk
        f.flush()
        p = subprocess.run(cmd, cwd=log.parent, stdout=f, stderr=subprocess.STDOUT)
    if p.returncode:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise SystemExit(f"{script} failed for {log.parent.name} (exit {p.returncode}); see {log}:\n{tail}")


def bake_kind(kind: str, work: Path, settings: list[str]) -> tuple[Path, dict]:
    """generate -> bake for one kind (each skipped when done); returns the final checkpoint and stage seconds."""
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    common = ["--name", kind, "--prompt_file", str(KINDS_DIR / f"{kind}.md"), "--wandb_mode", "disabled", *settings]
    seconds = {}
    final = work / "checkpoints" / kind / "final"
    if not final.is_dir():
        t0 = time.time()
        run("generate_data.py", *common, log=log)
        seconds["generate_s"] = round(time.time() - t0, 1)
        t0 = time.time()
        run("bake.py", *common, log=log)
        seconds["bake_s"] = round(time.time() - t0, 1)
    return final, seconds


def evaluate_kind(kind: str, work: Path, final: Path, queries: Path, settings: list[str]) -> dict:
    """evaluate.py on `queries` (skipped when its eval file is newer than the checkpoint); returns the eval JSON."""
    out = final / f"eval_{queries.stem}.json"
    if not out.exists() or out.stat().st_mtime < (final / "adapter_model.safetensors").stat().st_mtime:
        run("evaluate.py", "--checkpoint", str(final), "--queries", str(queries), "--samples", str(EVAL_SAMPLES),
            "--prompt_file", str(KINDS_DIR / f"{kind}.md"), "--wandb_mode", "disabled", *settings, log=work / "log.txt")
    return json.loads(out.read_text())


# ---------------------------------------------------------------- the figures
def rate_cell(r: dict | None) -> str:
    """'0.62 [0.51-0.72]' from an eval.json RATE {k, n, rate, ci}; '-' where not measured."""
    if not isinstance(r, dict) or r.get("rate") is None:
        return "-"
    return f"{r['rate']:.2f} [{r['ci'][0]:.2f}-{r['ci'][1]:.2f}]"


def llr_cell(m: dict | None) -> str:
    if not isinstance(m, dict) or m.get("mean") is None:
        return "-"
    return f"{m['mean']:+.2f}"


def kl_cut(ev: dict) -> float | None:
    from promptbake.metrics import kl_cut as cut  # here: the summary table needs no torch otherwise

    return cut(ev.get("kl_before"), ev.get("kl_after"))


def summarise(own: dict, generic: dict) -> dict:
    """One kind's row from its two evaluations (eval.json's shape: the docstring of promptbake/evaluate.py)."""
    adherence = own.get("adherence", {})
    per_model = {m: adherence.get(m) or {} for m in MODELS}
    row = {"n_queries": own.get("n_queries"), "answers_per_model": own.get("answers_per_model"),
           "kl_cut_own": kl_cut(own), "kl_cut_generic": kl_cut(generic),
           "checks_clean": {m: a.get("non_degenerate") for m, a in per_model.items()},
           "checks_all": {m: a.get("all") for m, a in per_model.items()},
           "loop_share": {m: a.get("loop") for m, a in per_model.items()},
           "llr": {m: a.get("llr") for m, a in per_model.items()},
           "retention_vs_base": (own.get("retention") or {}).get("retention_vs_reference"),
           "retention_vs_prompted": (own.get("retention") or {}).get("retention_vs_prompted")}
    row["baked_over_prompted"] = ratio(row["checks_clean"])
    unseen = own.get("adherence_unseen")  # some of the kind's questions were training queries: those left out
    if unseen:
        row["unseen_queries"] = unseen["n_queries"]
        row["checks_clean_unseen"] = {m: (unseen.get(m) or {}).get("non_degenerate") for m in MODELS}
        row["baked_over_prompted_unseen"] = ratio(row["checks_clean_unseen"])
    return row


def ratio(rates: dict) -> float | None:
    """The baked model's rate over the prompted base's."""
    prompted, baked = (rates.get(k) or {} for k in ("prompted", "baked"))
    return baked["rate"] / prompted["rate"] if prompted.get("rate") and baked.get("rate") is not None else None


def print_table(results: dict, out=print) -> None:
    pct = lambda x: "-" if x is None else f"{100 * x:.0f}%"  # noqa: E731
    for tag, kinds in results.items():
        out(f"\n## {tag} (commit {kinds.get('_commit', '?')})\n")
        out("| kind | checks, non-degenerate answers: base / prompted / baked / baked re-prompted (95% CI) | "
              "baked/prompted | loop share prompted / baked | LLR prompted / baked | KL cut own / generic | "
              "retention vs base / prompted |")
        out("|---|---|---|---|---|---|---|")
        for kind in KINDS:
            r = kinds.get(kind)
            if not r:
                continue
            checks = " / ".join(rate_cell(r["checks_clean"].get(m)) for m in MODELS)
            loops = " / ".join(rate_cell(r["loop_share"].get(m)) for m in ("prompted", "baked"))
            cut = "-" if r["baked_over_prompted"] is None else f"{r['baked_over_prompted']:.2f}"
            if r.get("unseen_queries"):  # the figure on the questions never trained on beside it
                unseen = r.get("baked_over_prompted_unseen")
                cut += f" ({'-' if unseen is None else f'{unseen:.2f}'} on the {r['unseen_queries']} never trained on)"
            llr = " / ".join(llr_cell(r["llr"].get(m)) for m in ("prompted", "baked"))
            kept = " / ".join("-" if r.get(k) is None else f"{r[k]:.2f}" for k in ("retention_vs_base",
                                                                                  "retention_vs_prompted"))
            out(f"| {kind} | {checks} | {cut} | {loops} | {llr} | {pct(r['kl_cut_own'])} / "
                  f"{pct(r['kl_cut_generic'])} | {kept} |")


def commit() -> str:
    p = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return p.stdout.strip() or "unknown"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma list of {','.join(KINDS)}")
    parser.add_argument("--tag", default="defaults", help="names this set of settings in the results")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting for every stage (repeat), e.g. --set num_epochs=3")
    parser.add_argument("--table", action="store_true", help="print the table of every result so far, run nothing")
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if args.table:
        print_table(results)
        return
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise SystemExit(f"error: unknown kind {unknown[0]!r}; choose from {','.join(KINDS)}")
    settings = [arg for kv in args.set for arg in (f"--{kv.partition('=')[0]}", kv.partition("=")[2])]
    for kind in kinds:
        work = WORK / args.tag / kind
        t0 = time.time()
        final, seconds = bake_kind(kind, work, settings)
        own = evaluate_kind(kind, work, final, KINDS_DIR / f"{kind}.txt", settings)
        generic = evaluate_kind(kind, work, final, GENERIC, [*settings, *NO_RETENTION])
        row = {**summarise(own, generic), **seconds, "seconds": round(time.time() - t0, 1),
               "settings": [redact(kv) for kv in args.set]}
        results.setdefault(args.tag, {})[kind] = row
        results[args.tag]["_commit"] = commit()
        write_json(RESULTS, results)  # after each kind, atomically: a crash keeps every result so far
        print(f"{kind} | {row['seconds']:.0f}s | written to {RESULTS.relative_to(ROOT)}", flush=True)
    print_table({args.tag: results[args.tag]})


if __name__ == "__main__":
    main()
