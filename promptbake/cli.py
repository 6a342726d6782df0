"""What every script shares: user errors as one line, Ctrl-C as a hint to resume."""

from __future__ import annotations

import sys

from .errors import UserError


def main_guard(fn):
    """Runs a script's main so that user errors print one line and exit 1, with no traceback."""
    try:
        fn()
    except UserError as e:
        from .distributed import world  # under torchrun, say which rank failed

        w = world()
        rank = f"rank {w.rank}: " if w.enabled and not str(e).startswith("rank ") else ""
        print(f"error: {rank}{e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
