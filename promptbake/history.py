"""The baked checkpoints of a project, newest first: what each one is, what it stands on, how well it baked."""

from __future__ import annotations

import time
from pathlib import Path

from .errors import UserError
from .io import read_json, read_jsonl, reading
from .lineage import BAKE_CONFIG, check_info


def kl_cut(run: Path) -> float | None:
    """Held-out full-vocabulary KL, after baking over before, from the run's metrics.jsonl."""
    if not (run / "metrics.jsonl").exists():
        return None
    rows = [r for _, r in read_jsonl(run / "metrics.jsonl")]
    with reading(run / "metrics.jsonl"):
        before = next((r["eval/kl_full_before"] for r in rows if "eval/kl_full_before" in r), None)
        after = next((r["eval/kl_full"] for r in reversed(rows) if "eval/kl_full" in r), None)
        from . import metrics  # here: the history table needs no torch otherwise

        return metrics.kl_cut(before, after)


def adherence(final: Path) -> tuple[float | None, float | None]:
    """(baked, prompted) adherence (metrics.headline_rate) from the newest evaluation (eval.json, or eval_<queries>.json from
    `evaluate.py --queries`), if evaluate.py ran; the first target's for several."""
    evals = sorted(final.glob("eval*.json"), key=lambda p: p.stat().st_mtime)
    if not evals:
        return None, None
    result = read_json(evals[-1])
    with reading(evals[-1]):
        result = next(iter(result["targets"].values())) if "targets" in result else result
        rates = result.get("adherence", {})
        from .metrics import headline_rate  # here: the history table needs no torch otherwise

        return headline_rate(rates.get("baked")), headline_rate(rates.get("prompted"))


def entry(final: Path) -> dict:
    """What history shows of one run; a UserError naming the file when one of its files is damaged."""
    info = check_info(read_json(final / BAKE_CONFIG), final / BAKE_CONFIG)
    baked, prompted = adherence(final)
    lineage = info.get("lineage", [])
    with reading(final / BAKE_CONFIG):
        return {"name": final.parent.name, "checkpoint": str(final),
                "parent": lineage[-1]["name"] if lineage else None,
                "chain": [a["name"] for a in lineage],
                "prompts": [t["system_prompt"].strip().splitlines()[0][:60] if t["system_prompt"].strip() else ""
                            for t in info["targets"]],
                "rows": sum(int(t.get("train_rows", 0)) + int(t.get("held_out_rows", 0)) for t in info["targets"]),
                "kl_cut": kl_cut(final.parent), "adherence": baked, "adherence_prompted": prompted}


def history(checkpoint_dir: str) -> list[dict]:
    """One entry per run folder that has a final/ checkpoint, newest first. A run with a damaged file is listed
    with what is wrong (`damaged`) instead of its numbers: it never hides the others."""
    out = []
    for final in Path(checkpoint_dir).glob("*/final"):
        if not (final / BAKE_CONFIG).exists():
            continue
        try:
            found = entry(final)
        except UserError as e:
            found = {"name": final.parent.name, "checkpoint": str(final), "damaged": str(e)}
        out.append({**found, "date": time.strftime("%Y-%m-%d %H:%M", time.localtime(final.stat().st_mtime)),
                    "mtime": final.stat().st_mtime})
    return sorted(out, key=lambda e: -e["mtime"])


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def print_history(entries: list[dict]) -> None:
    if not entries:
        print("no baked checkpoints yet: run `python bake.py`")
        return
    print(f"{'name':24} {'parent':18} {'rows':>5} {'KL cut':>7} {'adherence':>14}  {'date':16}  prompt")
    for e in entries:
        if "damaged" in e:
            print(f"{e['name'][:24]:24} DAMAGED: {e['damaged']}")
            continue
        adh = "-" if e["adherence"] is None else f"{_pct(e['adherence'])} ({_pct(e['adherence_prompted'])})"
        print(f"{e['name'][:24]:24} {(e['parent'] or '-')[:18]:18} {e['rows']:>5} {_pct(e['kl_cut']):>7} {adh:>14}  "
              f"{e['date']:16}  {' | '.join(e['prompts'])}")
    print("adherence: the baked model without its prompt (the prompted model's in brackets), from evaluate.py")
