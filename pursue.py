"""Prompt Pursuit: bake the prompt, then bake the re-prompted baked model again, and again.

    python pursue.py --iterations 3                       # checkpoints/default-pursuit-{1,2,3}/final
    python pursue.py --iterations 3 --name pirate --prompt_file pirate.md --num_epochs 2
    python pursue.py --iterations 3                       # again after a kill: resumes where it stopped

Iteration i's teacher is iteration i-1's baked model WITH the prompt, with fresh data from it. After each
iteration the chained model (no prompt) is measured against the original prompted base: adherence and KL on
the first iteration's held-out queries. It stops early when adherence stops rising. Writes
checkpoints/<name>-pursuit/pursuit.json and pursuit.png. Settings: promptbake/config.py, as for bake.py.
"""

import argparse

from promptbake.cli import main_guard
from promptbake.config import ConfigError, parse_args


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=3, help="at most this many bakes (1-20)")
    parser.add_argument("--queries", help="evaluation prompts (default: the first iteration's held-out queries)")
    parser.add_argument("--samples", type=int, default=3, help="sampled answers per query (T=0.7)")
    parser.add_argument("--min_gain", type=float, default=0.0,
                        help="stop when adherence rises by no more than this (0: when it stops rising)")
    cfg, args = parse_args(parser=parser)
    from promptbake.pursuit import pursue  # torch and transformers load after the settings pass: a bad one fails fast
    if not 1 <= args.iterations <= 20:
        raise ConfigError(f"--iterations is {args.iterations}; it must be in [1, 20]")
    if not 1 <= args.samples <= 100:
        raise ConfigError(f"--samples is {args.samples}; it must be in [1, 100]")
    pursue(cfg, args.iterations, args.queries, args.samples, args.min_gain)


if __name__ == "__main__":
    main_guard(main)
