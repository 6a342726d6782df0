"""Running the scripts as a user does: a subprocess in a project folder."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def env(**extra):
    e = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_SILENT="true", HF_HUB_OFFLINE="1")
    e.update(extra)
    return {k: v for k, v in e.items() if v is not None}  # None: the variable is unset for the script


def script(name, *args, cwd, timeout=600, check=True, input=None, **extra_env):
    p = subprocess.run([sys.executable, str(ROOT / name), *map(str, args)], cwd=cwd, env=env(**extra_env),
                       capture_output=True, text=True, timeout=timeout, input=input)
    if check and p.returncode != 0:
        raise AssertionError(f"{name} exited {p.returncode}\n--- stdout\n{p.stdout[-3000:]}\n--- stderr\n{p.stderr[-3000:]}")
    return p


def kill_when(name, *args, cwd, ready, timeout=300, **extra_env):
    """Starts a script and kill -9s it as soon as ready() is true; returns its output so far."""
    p = subprocess.Popen([sys.executable, str(ROOT / name), *map(str, args)], cwd=cwd, env=env(**extra_env),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + timeout
    try:
        while not ready():
            if p.poll() is not None:
                raise AssertionError(f"{name} ended (rc {p.returncode}) before the kill point:\n{p.stdout.read()[-3000:]}")
            if time.time() > deadline:
                raise AssertionError(f"{name}: kill point not reached in {timeout}s")
            time.sleep(0.05)
        os.kill(p.pid, signal.SIGKILL)
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()
    return p.stdout.read()
