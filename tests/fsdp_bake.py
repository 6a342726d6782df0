"""bake.py where ranks other than 0 may not write anything under the working folder: opening a file there for
writing, making a folder, or renaming into it raises PermissionError, and the run fails. Run by
tests/test_distributed.py under torchrun / accelerate launch to check that under FSDP rank 0 alone writes."""

import builtins
import io
import os
import runpy
import sys
from pathlib import Path

if os.environ.get("RANK", "0") != "0":
    root = Path.cwd().resolve()

    def _inside(path) -> bool:
        try:
            return Path(os.fsdecode(path)).resolve().is_relative_to(root)
        except (TypeError, ValueError):
            return False

    def _refuse(what, path):
        raise PermissionError(f"rank {os.environ['RANK']} tried to {what} {path}: only rank 0 may write")

    real_open, real_mkdir, real_replace, real_rename = builtins.open, os.mkdir, os.replace, os.rename

    def guarded_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+") and _inside(file):
            _refuse("write", file)
        return real_open(file, mode, *args, **kwargs)

    def guarded_mkdir(path, *args, **kwargs):
        if _inside(path):
            _refuse("make the folder", path)
        return real_mkdir(path, *args, **kwargs)

    def guarded_move(real):
        def move(src, dst, *args, **kwargs):
            if _inside(dst):
                _refuse("rename into", dst)
            return real(src, dst, *args, **kwargs)
        return move

    builtins.open = io.open = guarded_open
    os.mkdir = guarded_mkdir
    os.replace, os.rename = guarded_move(real_replace), guarded_move(real_rename)

bake = Path(__file__).resolve().parent.parent / "bake.py"
sys.argv[0] = str(bake)
runpy.run_path(str(bake), run_name="__main__")
