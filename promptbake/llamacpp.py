"""llama.cpp's own GGUF converters, brought in from a registry package at install time, never at run time.

    python -m promptbake.llamacpp install     # make export / make test run this once

The llama-cpp-python source distribution (the version pinned in requirements-server.txt) ships llama.cpp with
convert_hf_to_gguf.py, convert_lora_to_gguf.py, their `conversion` package and gguf-py. `install` downloads that
sdist with pip (pip caches it), and unpacks just those into <venv>/llama.cpp-convert. Exporting finds them there
(or in $PROMPTBAKE_LLAMACPP_CONVERT) and runs them with this interpreter; when they are not there, the GGUF
formats are skipped with a one-line reason.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from .errors import UserError

ROOT = Path(__file__).resolve().parent.parent
WANTED = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
STAMP = "VERSION"


def converter_dir() -> Path:
    return Path(os.environ.get("PROMPTBAKE_LLAMACPP_CONVERT") or Path(sys.prefix) / "llama.cpp-convert")


def pinned_version(requirements: Path = ROOT / "requirements-server.txt") -> str:
    m = re.search(r"^llama-cpp-python(?:\[[^\]]*\])?==([\w.]+)", requirements.read_text(), re.M)
    if not m:
        raise UserError(f"{requirements}: no `llama-cpp-python==VERSION` line; pin one")
    return m.group(1)


def find_converters() -> tuple[Path | None, str]:
    """(the folder with the converters, '') or (None, why not)."""
    d = converter_dir()
    if (d / "convert_hf_to_gguf.py").exists() and (d / "gguf-py").is_dir():
        return d, ""
    return None, (f"llama.cpp's converters are not installed at {d}; run `make export` or "
                  f"`python -m promptbake.llamacpp install` once (it needs the package index)")


def unpack(sdist: Path, dest: Path, version: str) -> None:
    """Extracts the converters from the sdist's vendor/llama.cpp into dest, atomically."""
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
    try:
        with tarfile.open(sdist) as tar:
            members = []
            for m in tar.getmembers():
                parts = m.name.split("/vendor/llama.cpp/", 1)
                if len(parts) == 2 and (m.isfile() or m.isdir()) and parts[1].startswith(WANTED) \
                        and ".." not in parts[1].split("/"):
                    m.name = parts[1]
                    members.append(m)
            if not any(m.name == "convert_hf_to_gguf.py" for m in members):
                raise UserError(f"{sdist}: no vendor/llama.cpp/convert_hf_to_gguf.py inside")
            tar.extractall(tmp, members=members, filter="data")
        (tmp / STAMP).write_text(f"llama-cpp-python=={version}\n")
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def install(version: str | None = None) -> Path:
    version = version or pinned_version()
    dest = converter_dir()
    if (dest / STAMP).exists() and (dest / STAMP).read_text().strip() == f"llama-cpp-python=={version}":
        print(f"llama.cpp converters: {dest} (llama-cpp-python=={version}, already there)")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as dl:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", dl,
               f"llama-cpp-python=={version}"]
        p = subprocess.run(cmd, capture_output=True, text=True)
        sdists = list(Path(dl).glob("llama_cpp_python-*.tar.gz"))
        if p.returncode != 0 or not sdists:
            raise UserError(f"could not download the llama-cpp-python=={version} sdist: "
                            f"{(p.stderr.strip().splitlines() or ['no file'])[-1]}")
        unpack(sdists[0], dest, version)
    print(f"llama.cpp converters: {dest} (from the llama-cpp-python=={version} sdist)")
    return dest


def run_converter(script: str, args: list[str]) -> str:
    """Runs one converter with this interpreter (and its bundled gguf-py); returns its output."""
    d, why = find_converters()
    if d is None:
        raise UserError(why)
    env = dict(os.environ, PYTHONPATH=str(d / "gguf-py"), HF_HUB_OFFLINE="1")
    env.pop("NO_LOCAL_GGUF", None)
    p = subprocess.run([sys.executable, str(d / script), *args], cwd=d, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        tail = [line for line in (p.stdout + p.stderr).splitlines() if line.strip()][-1:] or ["no output"]
        raise UserError(f"llama.cpp's {script} failed (exit {p.returncode}): {tail[0][:300]}")
    return p.stdout + p.stderr


if __name__ == "__main__":
    from .cli import main_guard

    if sys.argv[1:] != ["install"]:
        sys.exit("usage: python -m promptbake.llamacpp install")
    main_guard(install)
