"""report.html: one self-contained page per run folder, to look at a bake instead of reading its logs.

The page shows the prompt, the lineage, the curves of metrics.jsonl, the evaluation table and answers of
eval.json (else of the newest eval_<queries>.json), and the half-baking and pursuit plots when they exist.
Every image is an inline base64 PNG and nothing is fetched, so the file opens from file:// on any machine, mailed
or copied alone.

bake.py writes it at the end, evaluate.py and pursue.py refresh it, `python report.py` rebuilds it. A report
that fails to build never costs a bake: `try_write_report` prints a warning and carries on.
"""

from __future__ import annotations

import base64
import io
import re
import time
from pathlib import Path

from .errors import UserError
from .io import atomic_write_bytes, read_json, read_jsonl, reading
from .lineage import BAKE_CONFIG, check_info
from .metrics import kl_cut

REPORT = "report.html"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MODELS = [("base", "base, no prompt"), ("prompted", "base + prompt"), ("baked", "baked, no prompt"),
          ("baked_reprompted", "baked + prompt")]


# ---------------------------------------------------------------- where things are
def run_and_checkpoint(path: str | Path) -> tuple[Path, Path | None]:
    """A run folder (checkpoints/<name>) or a checkpoint inside it (final, step-N) -> (run folder, checkpoint).
    The checkpoint of a run folder is final/, else its newest step-N, else None (a bake still running)."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: no such folder; pass a run folder (checkpoints/<name>) or a checkpoint in it")
    if (path / "adapter_model.safetensors").exists() or path.name == "final" or path.name.startswith("step-"):
        return path.parent, path
    if not ((path / BAKE_CONFIG).exists() or (path / "metrics.jsonl").exists()):
        raise UserError(f"{path}: not a run folder (no {BAKE_CONFIG} or metrics.jsonl); pass checkpoints/<name>")
    if (path / "final" / BAKE_CONFIG).exists():
        return path, path / "final"
    steps = sorted(path.glob("step-*"), key=lambda p: int(p.name.split("-")[1]) if p.name[5:].isdigit() else -1)
    return path, (steps[-1] if steps else None)


def pursuit_folder(run_dir: Path) -> Path | None:
    """checkpoints/<name>-pursuit for run <name>, or for an iteration <name>-pursuit-<i> of it."""
    root, name = run_dir.parent, run_dir.name
    for candidate in (root / f"{name}-pursuit", root / re.sub(r"-pursuit-\d+$", "-pursuit", name)):
        if candidate != run_dir and (candidate / "pursuit.json").exists():
            return candidate
    return None


# ---------------------------------------------------------------- images
def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def png_file_uri(path: Path) -> str | None:
    """A PNG file as a data URI; None when it is missing or not a PNG (a torn write shows as no plot, not a broken one)."""
    if not path.is_file():
        return None
    data = path.read_bytes()
    return png_uri(data) if data.startswith(PNG_MAGIC) else None


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and "step" in r]
    return [s for s, _ in pts], [v for _, v in pts]


def curves_png(rows: list[dict]) -> bytes | None:
    """KL against step (training, held-out, full-vocabulary before and after) beside the learning rate."""
    plots = {key: series(rows, key) for key in ("train/kl", "eval/kl", "eval/kl_full_before", "eval/kl_full",
                                                  "onpolicy/divergence", "train/lr", "onpolicy/lr")}
    if not any(plots[k][0] for k in plots):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (ax, lr) = plt.subplots(1, 2, figsize=(10, 3.4), gridspec_kw={"width_ratios": [3, 2]})
    styles = {"train/kl": ("-", "tab:blue", "train KL (top-K + tail)"),
              "eval/kl": ("o--", "tab:orange", "held-out KL (top-K + tail), each epoch"),
              "eval/kl_full_before": ("*", "tab:gray", "held-out KL, full vocabulary, before"),
              "eval/kl_full": ("*", "tab:red", "held-out KL, full vocabulary, after"),
              "onpolicy/divergence": ("-", "tab:purple", "on-policy divergence")}
    values = []
    for key, (style, color, label) in styles.items():
        x, y = plots[key]
        if x:
            ax.plot(x, y, style, color=color, label=label, markersize=12 if style == "*" else 5)
            values += y
    if values and min(values) > 0:
        ax.set_yscale("log")
        plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")  # 0.02, 0.05, 0.1: not 2 x 10^-2
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_locator(matplotlib.ticker.LogLocator(subs=(2, 5)))
        ax.yaxis.set_minor_formatter(plain)
    ax.set_xlabel("step")
    ax.set_ylabel("KL to the prompted teacher")
    ax.set_title("KL")
    ax.grid(alpha=0.3)
    if values:
        ax.legend(fontsize=7, framealpha=0.9)
    for key, color, label in (("train/lr", "tab:green", "learning rate"), ("onpolicy/lr", "tab:purple", "on-policy lr")):
        x, y = plots[key]
        if x:
            lr.plot(x, y, "-", color=color, label=label)
    lr.set_xlabel("step")
    lr.set_title("learning rate")
    lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    lr.grid(alpha=0.3)
    if plots["onpolicy/lr"][0]:
        lr.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


# ---------------------------------------------------------------- what the page shows
def pick(rows: list[dict], keys: tuple[str, ...]) -> list[dict]:
    """Each row with exactly these keys (None where an older file lacks one): the template never meets a missing key."""
    return [{k: r.get(k) for k in keys} for r in rows]


def eval_targets(result: dict) -> list[dict]:
    """eval.json holds one target's result, or {"targets": {name: result}} for several."""
    return list(result["targets"].values()) if "targets" in result else [result]


def as_rate(x) -> dict | None:
    """A rate of eval.json as {"rate", "ci"}: a RATE already, or an older file's bare number (no interval)."""
    if isinstance(x, dict):
        return x if x.get("rate") is not None else None
    return {"rate": x, "ci": None} if isinstance(x, (int, float)) else None


def eval_table(r: dict, retention: dict | None) -> list[dict]:
    """The four models of one target: KL to the prompted teacher, top-1 agreement, adherence (every declared check
    passes) on non-degenerate and on all answers, loop share, the LLR score, retention; rates with their 95%
    intervals. The prompted base is the teacher itself: KL 0 and agreement 1 by definition. Retention (multiple-choice
    accuracy on standard benchmarks, retention.py) is measured for the base, the prompted base and the baked model."""
    kl = {"base": r.get("kl_before"), "prompted": 0.0, "baked": r.get("kl_after"), "baked_reprompted": r.get("kl_reprompted")}
    agree = {"base": r.get("top1_agreement_before"), "prompted": 1.0, "baked": r.get("top1_agreement_after"),
             "baked_reprompted": r.get("top1_agreement_reprompted")}
    accuracy = (retention or {}).get("accuracy", {})
    kept = {who: (accuracy.get(key) or {}).get("rate") for who, key in
            (("base", "reference"), ("prompted", "prompted"), ("baked", "baked"))}
    start = "parent" if r.get("start_model") == "parent" else "base"
    rows = []
    for who, label in MODELS:
        adh = r.get("adherence", {}).get(who)
        if adh is None and who not in kl:
            continue
        adh = adh or {}
        rows.append({"who": who, "label": label.replace("base", start, 1) if who in ("base", "prompted") else label,
                     "kl": kl[who], "top1": agree[who],
                     "adherence": as_rate(adh.get("non_degenerate", adh.get("marker_rate"))),
                     "adherence_all": as_rate(adh.get("all")), "loop": as_rate(adh.get("loop")), "llr": adh.get("llr"),
                     "judge": as_rate(adh.get("judge", adh.get("judge_rate"))), "retention": kept.get(who)})
    return rows


def check_rows(r: dict) -> list[dict]:
    """One row per declared check: what it demands, and per model the share of non-degenerate answers passing it."""
    adh = r.get("adherence", {})
    out = []
    for c in r.get("checks") or []:
        name = c.get("name")
        demand = ", ".join(f"{k}: {v}" for k, v in c.items() if k != "name")
        out.append({"name": name, "demand": demand,
                    "cells": [as_rate(((adh.get(who) or {}).get("checks") or {}).get(name, {}).get("non_degenerate"))
                              for who, _ in MODELS if who in adh]})
    return out


def bake_summary(rows: list[dict]) -> dict | None:
    """The bake's own held-out numbers (full-vocabulary KL and top-1 agreement before and after), from metrics.jsonl."""
    before = next((r for r in rows if "eval/kl_full_before" in r), None)
    after = next((r for r in reversed(rows) if "eval/kl_full" in r), None)
    if not before and not after:
        return None
    out = {"kl_before": before and before["eval/kl_full_before"], "kl_after": after and after["eval/kl_full"],
           "top1_before": before and before.get("eval/top1_agreement_before"),
           "top1_after": after and after.get("eval/top1_agreement"),
           "steps": max((r["step"] for r in rows if "train/kl" in r), default=0)}
    out["kl_cut"] = kl_cut(out["kl_before"], out["kl_after"])
    return out


def lineage_rows(info: dict) -> list[dict]:
    return [{"name": a.get("name"), "checkpoint": a.get("checkpoint"), "adapter": (a.get("adapter_sha256") or "")[:12],
             "prompts": [(t.get("system_prompt") or "").strip() for t in a.get("targets", [])]}
            for a in info.get("lineage", [])]


def config_rows(config: dict) -> list[tuple[str, str]]:
    """Every setting as saved (to_dict already dropped URL credentials); long lists shortened for the page."""
    out = []
    for k in sorted(config):
        v = config[k]
        if isinstance(v, list) and len(v) > 8:
            text = ", ".join(map(repr, v[:8])) + f", ... ({len(v)} in all)"
        else:
            text = repr(v) if isinstance(v, str) else str(v)
        out.append((k, text))
    return out


def eval_file(checkpoint: Path | None) -> Path | None:
    """What the page shows: eval.json (the run's own held-out rows), else the newest eval_<queries>.json that
    `evaluate.py --queries FILE` wrote."""
    if checkpoint is None:
        return None
    if (checkpoint / "eval.json").exists():
        return checkpoint / "eval.json"
    others = sorted(checkpoint.glob("eval_*.json"), key=lambda p: p.stat().st_mtime)
    return others[-1] if others else None


def load_context(run_dir: Path, checkpoint: Path | None) -> dict:
    """Everything the template shows, read from the run's files; a missing file is a missing section."""
    info_path = next((p for p in ([checkpoint / BAKE_CONFIG] if checkpoint else []) + [run_dir / BAKE_CONFIG]
                      if p.exists()), None)
    if info_path is None:
        raise UserError(f"{run_dir}: no {BAKE_CONFIG}; is this a run folder (checkpoints/<name>)?")
    info = check_info(read_json(info_path), info_path)
    rows = [r for _, r in read_jsonl(run_dir / "metrics.jsonl")] if (run_dir / "metrics.jsonl").exists() else []
    with reading(run_dir / "metrics.jsonl"):
        curves, summary = curves_png(rows), bake_summary(rows)
    shown = eval_file(checkpoint)
    result = read_json(shown) if shown else None
    with reading(shown):
        evals, retention, lineage_adherence = eval_context(result, checkpoint)
    pursuit = None
    group = pursuit_folder(run_dir)
    if group is not None:
        state = read_json(group / "pursuit.json")
        with reading(group / "pursuit.json"):
            pursuit = {"folder": str(group), "plot": png_file_uri(group / "pursuit.png"),
                       "reference": dict(state.get("reference", {})),
                       "iterations": pick(state.get("iterations", []), ("iteration", "adherence", "adherence_reprompted",
                                                                        "kl_to_prompted_base", "top1_agreement",
                                                                        "checkpoint"))}
    config = info.get("config", {})
    timings = read_json(run_dir / "timings.json") if (run_dir / "timings.json").exists() else {}
    with reading(run_dir / "timings.json"):
        timings = {k: v for k, v in timings.items() if isinstance(v, (int, float))}
    targets = pick(info.get("targets", []), ("name", "weight", "system_prompt", "student_prompt", "train_rows",
                                             "held_out_rows", "data", "marker_regex"))
    return {"name": config.get("name") or run_dir.name, "run_dir": str(run_dir),
            "checkpoint": str(checkpoint) if checkpoint else None,
            "generated": time.strftime("%Y-%m-%d %H:%M"), "base_model": info.get("base_model_path"),
            "targets": targets, "lineage": lineage_rows(info), "config": config_rows(config),
            "curves": png_uri(curves) if curves else None, "summary": summary,
            "evals": evals, "eval_file": shown.name if shown else "eval.json", "retention": retention,
            "lineage_adherence": lineage_adherence, "pursuit": pursuit, "timings": timings}


def eval_context(result: dict | None, checkpoint: Path | None) -> tuple[list[dict], dict | None, list[dict]]:
    """What the page shows of an evaluation: each target's table, answers and sweep; retention; lineage adherence."""
    evals = []
    for i, r in enumerate(eval_targets(result) if result else []):
        plot = png_file_uri(checkpoint / Path(r["plot"]).name) if r.get("plot") else None
        evals.append({"target": r.get("target"), "queries": r.get("queries"), "n_queries": r.get("n_queries"),
                      "samples": r.get("samples_per_query"), "n_tokens": r.get("n_tokens"),
                      "answers": r.get("answers_per_model"), "greedy": r.get("greedy_per_query"),
                      "kl_cut": kl_cut(r.get("kl_before"), r.get("kl_after")),
                      "marker_regex": r.get("marker_regex"), "markers": r.get("markers"),
                      "table": eval_table(r, result.get("retention")), "checks": check_rows(r),
                      "has_checks": "checks" in r, "models": [label for who, label in MODELS
                                                              if who in r.get("adherence", {})],
                      "examples": pick(r.get("examples", []), ("user", *(who for who, _ in MODELS))),
                      "sweep": [{**p, "adherence": p["adherence"] if p["adherence"] is not None else p["marker_rate"]}
                                for p in pick(r.get("sweep", []), ("point", "strength", "kl", "top1_agreement",
                                                                   "adherence", "marker_rate", "loop_share"))],
                      "half_baking": plot, "first": i == 0})
    retention = pick([result["retention"]], ("n_items", "tasks", "reference", "retention_vs_reference",
                                             "retention_vs_prompted", "kl_reference_to_baked"))[0] \
        if result and "accuracy" in (result.get("retention") or {}) else None
    lineage_adherence = pick((result or {}).get("lineage", []), ("bake", "target", "prompt", "base", "base_all_prompts",
                                                                 "baked"))
    return evals, retention, lineage_adherence


# ---------------------------------------------------------------- rendering
def _num(x, digits: int = 4) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.0f}%"


def _ci(r) -> str:
    """A rate with its 95% interval: 0.45 [0.36–0.55]; an older file's bare rate alone; a dash when missing."""
    if not r or r.get("rate") is None:
        return "—"
    return f"{r['rate']:.2f}" + (f" [{r['ci'][0]:.2f}–{r['ci'][1]:.2f}]" if r.get("ci") else "")


def _llr(m) -> str:
    if not m or m.get("mean") is None:
        return "—"
    return f"{m['mean']:+.3f} [{m['ci'][0]:+.3f}, {m['ci'][1]:+.3f}]"


def environment():
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    env = Environment(loader=PackageLoader("promptbake", "templates"), autoescape=select_autoescape(["html"]),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                      finalize=lambda x: "—" if x is None else x)  # a value an older file lacks shows as a dash
    env.filters.update(num=_num, pct=_pct, ci=_ci, llr=_llr)
    return env


def render(context: dict) -> str:
    return environment().get_template("report.html").render(**context)


def write_report(path: str | Path) -> Path:
    """Builds <run folder>/report.html for a run folder or a checkpoint in it; returns its path."""
    run_dir, checkpoint = run_and_checkpoint(path)
    out = run_dir / REPORT
    context = load_context(run_dir, checkpoint)
    with reading(f"{run_dir} (one of its JSON files)"):  # a value of another type than the page shows
        page = render(context)
    atomic_write_bytes(out, page.encode("utf-8"))
    return out


def try_write_report(path: str | Path) -> Path | None:
    """write_report, but a failure is a warning: whatever called it (a finished bake) has its result already."""
    try:
        out = write_report(path)
    except Exception as e:  # noqa: BLE001 - any failure here must not lose the bake that called it
        print(f"warning: report.html not written ({type(e).__name__}: {(str(e).splitlines() or [''])[0]}); "
              f"rebuild it with `python report.py --checkpoint {path}`")
        return None
    print(f"wrote {out}")
    return out
