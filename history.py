"""The project's baked checkpoints, newest first: name, parent, prompt, rows, held-out KL cut, adherence, date.

    python history.py                        # checkpoints/
    python history.py --checkpoint_dir runs  # another folder
    python history.py --json                 # the same as JSON, for scripts

Compare two of them on the same queries and seeds with
    python evaluate.py --checkpoint checkpoints/a/final --checkpoint checkpoints/b/final
"""

import argparse

import orjson

from promptbake.cli import main_guard
from promptbake.config import parse_args
from promptbake.history import history, print_history


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    cfg, args = parse_args(parser=parser)
    entries = history(cfg.checkpoint_dir)
    if args.json:
        print(orjson.dumps([{k: v for k, v in e.items() if k != "mtime"} for e in entries], option=orjson.OPT_INDENT_2).decode())
    else:
        print_history(entries)


if __name__ == "__main__":
    main_guard(main)
