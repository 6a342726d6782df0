"""Stage 4: measure how well the prompt was baked.

    python evaluate.py                                   # newest checkpoint, its held-out queries
    python evaluate.py --checkpoint checkpoints/default/final --queries my_prompts.txt
    python evaluate.py --strengths 0,0.25,0.5,0.75,1,1.25    # half-baking sweep -> half_baking.png
    python evaluate.py --steps                           # sweep over the saved step-N checkpoints
    python evaluate.py --target french                   # one target of a multi-target bake (default: each)
    python evaluate.py --checkpoint checkpoints/a/final --checkpoint checkpoints/b/final   # A/B, same queries and seeds

Prints full-vocabulary KL to the prompted teacher (base vs baked, and the baked model re-prompted with
its prompt), top-1 agreement, and per model, on the same answers (1 greedy + --samples at T=0.7 per query, the
same seeds for every model): adherence to the prompt's declared checks (front matter `checks:` of the prompt
file, or the `checks` setting) among non-loop answers and among all, each check's rate, the loop share, and the
LLR score (log P(answer | prompt) - log P(answer) per token under the base), all with 95% intervals; a judge
model's rate too when API_BASE_URL is set. A checkpoint baked on another (--init_from) also gets adherence to
every prompt of its lineage. --queries FILE warns when FILE holds training queries. Writes eval.json and
refreshes the run's report.html.
"""

import argparse

from promptbake.cli import main_guard
from promptbake.config import STRENGTH, ConfigError, check_range, parse_args


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", action="append", help="a checkpoints/<run>/final or step-N folder (default: "
                        "newest); twice or more: compare them side by side on the same queries and seeds")
    parser.add_argument("--queries", help="held-out prompts: .txt (one a line) or .jsonl (default: the run's held_out.jsonl)")
    parser.add_argument("--strengths", default="", help="comma list of adapter strengths to sweep")
    parser.add_argument("--steps", action="store_true", help="also sweep the run's step-N checkpoints")
    parser.add_argument("--samples", type=int, default=3, help="sampled answers per query (T=0.7), beside one greedy, "
                        "for KL and adherence")
    parser.add_argument("--target", help="evaluate only this target of a multi-target bake")
    cfg, args = parse_args(parser=parser)
    try:
        strengths = [float(s) for s in args.strengths.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--strengths takes numbers separated by commas, got {args.strengths!r}") from None
    for s in strengths:
        check_range("--strengths", s, STRENGTH)
    if not 1 <= args.samples <= 100:
        raise ConfigError(f"--samples is {args.samples}; it must be in [1, 100]")
    from promptbake.evaluate import compare_checkpoints, evaluate  # torch loads after every setting passed

    if args.checkpoint and len(args.checkpoint) > 1:
        if strengths or args.steps:
            raise ConfigError("--strengths and --steps sweep one checkpoint; drop them to compare several")
        compare_checkpoints(cfg, args.checkpoint, args.queries, args.samples, args.target)
    else:
        evaluate(cfg, args.checkpoint[0] if args.checkpoint else None, args.queries, strengths, args.steps, args.samples,
                 args.target)


if __name__ == "__main__":
    main_guard(main)
