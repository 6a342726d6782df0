"""bake.py with teacher-cache shards of 2 rows, so that 8 rows make 4 shards and two ranks split them.
Run by tests/test_distributed.py under torchrun; everything else is bake.py's own main."""

import runpy
import sys
from pathlib import Path

from promptbake import teacher

teacher.SHARD_ROWS = 2
bake = Path(__file__).resolve().parent.parent / "bake.py"
sys.argv[0] = str(bake)
runpy.run_path(str(bake), run_name="__main__")
