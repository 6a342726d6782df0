"""Run tracking: metrics.jsonl always, W&B when enabled (offline without WANDB_API_KEY).

Nothing secret reaches either: the config is logged through `to_dict` (URL credentials dropped), and the
command line W&B records is redacted before W&B reads it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import orjson

from .io import JsonlAppender, atomic_write_bytes, read_jsonl
from .redact import redact

WANDB_ID_FILE = "wandb_run_id"


def redact_argv() -> None:
    """W&B records sys.argv; the arguments were parsed already, so redact them in place."""
    sys.argv[1:] = [redact(a) for a in sys.argv[1:]]


def wandb_mode(cfg) -> str:
    return cfg.wandb_mode or ("online" if os.environ.get("WANDB_API_KEY") else "offline")


def open_wandb(cfg, run_dir: Path, config: dict, name: str, run_id: str | None = None):
    """A W&B run, or None when disabled. `run_id` continues an earlier run (resume) instead of opening another."""
    mode = wandb_mode(cfg)
    if mode == "disabled":
        return None
    import wandb

    redact_argv()
    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(project=cfg.wandb_project, name=name, dir=str(run_dir), mode=mode, config=config,
                      reinit="finish_previous", id=run_id, resume="allow" if run_id else None)


def metrics_until(path: Path, step: int) -> None:
    """Cuts metrics.jsonl back to the rows of steps <= `step`: a resumed run logs every later step once."""
    if not path.exists():
        return
    keep = [row for _, row in read_jsonl(path) if row.get("step", 0) <= step]
    atomic_write_bytes(path, b"".join(orjson.dumps(r) + b"\n" for r in keep))


class Logger:
    """One metrics row per call to metrics.jsonl, and to W&B when enabled. On resume, pass the step resumed
    from: later rows of the interrupted run are dropped and the same W&B run continues."""

    def __init__(self, cfg, run_dir: Path, config: dict, resume_step: int | None = None):
        self.path = run_dir / "metrics.jsonl"
        id_file = run_dir / WANDB_ID_FILE
        run_id = None
        if resume_step is not None:
            metrics_until(self.path, resume_step)
            run_id = id_file.read_text().strip() if id_file.exists() else None
        elif self.path.exists():
            self.path.unlink()
        self.metrics = JsonlAppender(self.path)
        self.wandb = open_wandb(cfg, run_dir, config, cfg.name, run_id)
        if self.wandb is not None:
            atomic_write_bytes(id_file, self.wandb.id.encode())

    def log(self, step: int, values: dict) -> None:
        self.metrics.write({"step": step, **values})
        if self.wandb:
            self.wandb.log(values, step=step)

    def rows(self) -> list[dict]:
        return [r for _, r in read_jsonl(self.path)]

    def close(self) -> None:
        self.metrics.close()
        if self.wandb:
            self.wandb.finish()
            self.wandb = None
