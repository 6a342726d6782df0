"""Rebuild report.html, one self-contained page per run: prompt, lineage, curves, evaluation, answers, plots.

    python report.py                                         # the newest run: checkpoints/<name>/report.html
    python report.py --checkpoint checkpoints/default        # a run folder
    python report.py --checkpoint checkpoints/default/step-40   # that checkpoint's eval.json

bake.py writes it at the end and evaluate.py refreshes it; this rebuilds it (after a template change, or for an
older run). It reads bake_config.json, metrics.jsonl, eval.json, half_baking.png and the run's
checkpoints/<name>-pursuit/ if any. Open it from disk: it fetches nothing.
"""

import argparse

from promptbake.baked import latest_checkpoint
from promptbake.cli import main_guard
from promptbake.config import parse_args
from promptbake.report import write_report


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a run folder (checkpoints/<name>) or a checkpoint in it (default: newest)")
    cfg, args = parse_args(parser=parser)
    out = write_report(args.checkpoint or latest_checkpoint(cfg.checkpoint_dir, cfg.name))
    print(f"wrote {out}")


if __name__ == "__main__":
    main_guard(main)
