"""A bake as bake.py runs it: the stages in order, each from its own module.

    answer prompts-only data with the local teacher (generate.py) -> train (train.py) -> report.html (report.py)

train.bake is the training stage alone; this module only sequences the stages, so that a caller who wants the
whole bake (bake.py, Prompt Pursuit, the experiments, benchmarks/levers.py, `promptbake.bake`) gets the same one.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from . import train
from .baked import load_start
from .data import load_rows
from .distributed import world_from_env
from .generate import check_data_dir, generate
from .report import try_write_report


def answer_prompts_only(cfg) -> list[dict]:
    """The targets, read (train.read_targets); each whose data holds prompts only is answered first by the local
    teacher (the same code as generate_data.py --prompts, into data/<stem>.answered.jsonl), and its rows are those
    answers. Under several processes nothing is answered here: train.bake then says to answer with one process."""
    cfg = train.checked_settings(cfg)  # what the bake would refuse after the answers is refused before them
    check_data_dir(cfg.data_dir)
    specs = train.read_targets(cfg)
    todo = [spec for spec in specs if train.is_prompts_only(spec["rows"])]
    if not todo or world_from_env().enabled:
        return specs
    model, tokenizer, model_path, _, _ = load_start(cfg)
    train.check_top_k(cfg, tokenizer)
    for spec in todo:
        print(f"{spec['data']} holds prompts only: the local teacher answers them first")
        gen_cfg = dataclasses.replace(cfg, prompts=spec["data"], prompt_file=spec["prompt_file"], training_prompts=[],
                                      generate_queries=0, backend="local", name=f"{Path(spec['data']).stem}.answered")
        spec["data_file"] = str(generate(gen_cfg, model, tokenizer, model_path))
        spec["rows"] = load_rows(spec["data_file"])
    return specs


def bake(cfg) -> Path:
    """Answers prompts-only data, trains checkpoints/<name>/final (train.bake), then writes its report.html.
    Returns the final checkpoint's path."""
    final = train.bake(cfg, answer_prompts_only(cfg))
    if world_from_env().main:
        try_write_report(final)  # after the save: a report that fails only warns
    return final
