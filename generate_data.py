"""Stage 1: off-policy data. Queries are answered WITH the system prompt and saved WITHOUT it.

    python generate_data.py                     # the default mix (quick preset) -> data/default.jsonl
    python generate_data.py --queries_only      # write data/default.queries.txt and print the plan; edit, then rerun
    python generate_data.py --config examples/full.yaml     # the paper's scale (2,304 answers; for a GPU)
    python generate_data.py --prompts my_prompts.txt --temperatures 0.5,0.7,0.9,1.0   # your queries replace the mix
    python generate_data.py --prompts my_prompts.txt --query_mix user:0.5,prompt:0.5   # ... or join it
    python generate_data.py --training_prompts "Hello, who are you?" --training_prompts "Tell me a joke."
    API_BASE_URL=http://127.0.0.1:8080/v1 python generate_data.py   # any OpenAI-compatible server (.env works too)

The queries come from `query_mix` (prompt-aware, generic, built-in, your own); the plan printed before any answer
says how many of each, how many answers, their token cap and an estimated time. Rerunning resumes: rows already
written are skipped. Settings: promptbake/config.py.
"""

import argparse

from promptbake.cli import main_guard
from promptbake.config import parse_args, to_dict


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries_only", action="store_true",
                        help="write the prompt-aware queries and print the plan, then stop (edit them, then rerun)")
    cfg, args = parse_args(parser=parser)
    from promptbake.generate import generate  # torch and transformers load after the settings pass: a bad one fails fast
    print("config:", {k: v for k, v in to_dict(cfg).items() if v not in ("", [], None)})
    generate(cfg, queries_only=args.queries_only)


if __name__ == "__main__":
    main_guard(main)
