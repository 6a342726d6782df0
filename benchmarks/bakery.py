"""Side by side with bakery (github.com/marksverdhei/bakery, a peer prompt-baking tool): the same work, each tool a
whole process, timed by the wall clock.

    python benchmarks/bakery.py                          # installs bakery into .venv-bakery once, then times both
    python benchmarks/bakery.py --data data/default.jsonl --repeats 1
    python benchmarks/bakery.py --bakery_src ~/src/bakery # a clone, or a bare git dir (its HEAD is unpacked)
    make bench-bakery

The same work for both: the same model (the embedded SmolLM2-135M-Instruct folder), the same `--rows` paired rows
(the first rows of `--data`, else of a small set made once by our local generator under benchmarks/runs/bakery/),
the same system prompt (`--prompt_file`'s body), LoRA r16 / alpha 32 on every linear layer, no dropout, `--epochs`
epochs of `--batch_size` rows, AdamW at `--learning_rate` with 5% warm-up and linear decay, gradient clip 1.0,
bf16 autocast over fp32 weights, `--threads` threads each. Every row is trained by both: ours holds none out
(--eval_fraction 0) and answers no verification queries (bakery does neither). Ours computes its teacher's top-K
once (no free logits from the generator: the rows are copied without them), bakery recomputes the teacher's full
logits every step; that difference is the point of the comparison.

bakery lives in its own venv (`--venv`, made once and reused), installed from the snapshot with the same torch,
transformers, peft, datasets and accelerate versions as ours, on our Python (its pyproject asks for 3.12; it runs on
3.11 unchanged: --ignore-requires-python). Runs alternate ours / bakery / ours / bakery (`--repeats`), each in a
fresh folder, because a shared machine's load drifts; the table gives each time and the ratio of the medians.
Writes benchmarks/bakery_results.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import orjson
import yaml

from promptbake.cli import main_guard
from promptbake.data import load_rows, read_prompt
from promptbake.errors import UserError
from promptbake.io import atomic_write_bytes, read_json, write_json

ROOT = Path(__file__).resolve().parent.parent
MIRROR = Path("/work/.mirror/marksverdhei+bakery/repo")  # where this project's machines keep a snapshot
RUNS = ROOT / "benchmarks" / "runs" / "bakery"
RESULTS = ROOT / "benchmarks" / "bakery_results.json"
SHARED_DEPS = ("torch", "transformers", "peft", "datasets", "accelerate")  # bakery's dependencies, pinned to ours
LORA_ALPHA, WARMUP_RATIO, MAX_GRAD_NORM = 32, 0.05, 1.0  # our defaults (promptbake/config.py), given to both


# ---------------------------------------------------------------- bakery's source and venv
def is_git_dir(path: Path) -> bool:
    return (path / "HEAD").is_file() and (path / "objects").is_dir()


def unpack_source(src: Path, dest: Path) -> Path:
    """A folder holding bakery's pyproject.toml: `src` itself when it is a checkout, else its HEAD unpacked."""
    if (src / "pyproject.toml").is_file():
        return src
    if not is_git_dir(src):
        raise UserError(f"--bakery_src {src}: neither a bakery checkout (no pyproject.toml) nor a git dir; get one "
                        "with `git clone https://github.com/marksverdhei/bakery` and pass its folder")
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "--git-dir", str(src), "archive", "HEAD"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def source_commit(src: Path) -> str:
    git = ["git", "--git-dir", str(src)] if is_git_dir(src) else ["git", "-C", str(src)]
    out = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def dependency_pins() -> list[str]:
    """bakery's dependencies at the versions installed here: both tools on the same stack. torch's local label
    (+cpu) is dropped, as requirements.txt pins it: pip's find-links supply the CPU build."""
    return [f"{name}=={version(name).split('+')[0]}" for name in SHARED_DEPS]


def bakery_fields(python: Path) -> set[str]:
    """Every key bakery's YAML reads (its three config dataclasses), asked of its own venv: it accepts unknown keys
    silently (allow_extra_keys), so a key it renamed would quietly fall back to its default."""
    code = ("import dataclasses; from bakery.config import BakeryConfig, DataConfig, LoraConfig; "
            "print(' '.join(f.name for c in (BakeryConfig, DataConfig, LoraConfig) for f in dataclasses.fields(c)))")
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, env=run_env(1))
    if out.returncode != 0:
        raise UserError(f"bakery in {python.parent.parent} does not import: {out.stderr.strip()[-200:]}; "
                        f"remove {python.parent.parent} to reinstall it")
    return set(out.stdout.split())


def check_config_keys(config: dict, fields: set[str], where: str) -> None:
    unknown = sorted(set(config) - fields)
    if unknown:
        raise UserError(f"{where}: bakery has no setting {', '.join(unknown)} (renamed in this snapshot?); update "
                        "bakery_config() in benchmarks/bakery.py")


def ensure_venv(venv: Path, src: Path, commit: str) -> Path:
    """bakery's own venv, made once; remade when the snapshot or our dependency versions change. Returns its python."""
    python = venv / "bin" / "python"
    stamp = venv / ".installed-bakery"
    want = orjson.dumps({"commit": commit, "pins": dependency_pins(), "python": platform.python_version()}).decode()
    if stamp.exists() and stamp.read_text() == want and python.exists():
        return python
    print(f"installing bakery {commit[:12]} into {venv} (once; {', '.join(dependency_pins())})", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        source = unpack_source(src, Path(tmp) / "bakery")
        steps = [
            [sys.executable, "-m", "venv", str(venv)],
            [str(python), "-m", "pip", "install", "-q", *dependency_pins()],
            # its pyproject asks for Python >= 3.12 for no feature it uses: it compiles and runs on 3.11
            [str(python), "-m", "pip", "install", "-q", "--no-deps", "--ignore-requires-python", str(source)],
        ]
        for cmd in steps:
            if subprocess.run(cmd).returncode != 0:
                raise UserError(f"installing bakery into {venv} failed at `{' '.join(cmd)}` (output above); fix it "
                                f"and rerun, or remove {venv} to start over")
    stamp.write_text(want)
    return python


# ---------------------------------------------------------------- the work both tools do
def generation_complete(data: Path) -> bool:
    """The generator marks its meta file complete at the end; an interrupted run leaves it running, and a rerun of
    the generator resumes it."""
    meta = data.with_name(data.name.removesuffix(".jsonl") + ".meta.json")
    return meta.exists() and read_json(meta).get("status") == "complete"


def generated_data(rows: int, model: str) -> Path:
    """A small data set made once by our local generator (reused after): one answer at T=1 per query, a quarter
    more queries than rows, since answers that loop are dropped."""
    data = RUNS / "data" / "bench.jsonl"
    if not generation_complete(data):
        print(f"generating {rows} rows once into {data.parent} (our local generator, a few minutes)", flush=True)
        cmd = [sys.executable, str(ROOT / "generate_data.py"), "--name", "bench", "--data_dir", str(data.parent),
               "--backend", "local", "--model_name_or_path", model, "--num_queries", str(rows + rows // 4),
               "--temperatures", "1.0", "--samples_per_query", "1", "--wandb_mode", "disabled"]
        if subprocess.run(cmd, cwd=ROOT).returncode != 0:
            raise UserError(f"generating the benchmark's data into {data.parent} failed (output above); pass "
                            "--data FILE to use rows you have")
    return data


def paired_rows(data: Path, n: int) -> list[dict]:
    """The first n rows of a data file of ours, as {prompt, response, complete}: one user turn and its answer."""
    rows = [r for r in load_rows(str(data)) if r.response is not None]
    if len(rows) < n:
        raise UserError(f"{data}: {len(rows)} answered rows, fewer than --rows {n}; lower --rows or add rows")
    out = []
    for r in rows[:n]:
        if len(r.context) != 1:
            raise UserError(f"{data}:{r.line}: {len(r.context)} turns before the answer; bakery trains single-turn "
                            "rows only: pass a file of one question and one answer per row")
        out.append({"prompt": r.context[0]["content"], "response": r.response, "complete": r.complete})
    return out


def ours_jsonl(pairs: list[dict]) -> bytes:
    """Our data format (README, the pipeline): messages without a system turn; a response cut at the generator's
    cap keeps finish_reason "length", so its turn end is not trained."""
    lines = [orjson.dumps({"messages": [{"role": "user", "content": p["prompt"]},
                                        {"role": "assistant", "content": p["response"]}],
                           "generation": {"finish_reason": "stop" if p["complete"] else "length"}})
             for p in pairs]
    return b"\n".join(lines) + b"\n"


def bakery_json(pairs: list[dict]) -> bytes:
    """bakery's local paired format (its data.py): a list of {prompt, response}."""
    return orjson.dumps([{"prompt": p["prompt"], "response": p["response"]} for p in pairs], option=orjson.OPT_INDENT_2)


def bakery_config(args, model: str, data: Path, prompt: Path, out: Path, cuda: bool = False) -> dict:
    """bakery's flat YAML (HF TrainingArguments + its own fields), set to the same training as ours."""
    return {
        "use_cpu": not cuda,  # the Trainer refuses bf16 on a CPU unless told it is one
        "output_dir": str(out),
        "num_train_epochs": args.epochs,
        "per_device_train_batch_size": args.batch_size,
        "gradient_accumulation_steps": 1,
        "learning_rate": args.learning_rate,
        "lr_scheduler_type": "linear",
        "warmup_steps": WARMUP_RATIO,  # transformers 5 reads a float under 1 as a ratio of the steps
        "weight_decay": 0.0,
        "max_grad_norm": MAX_GRAD_NORM,
        "optim": "adamw_torch",
        "bf16": args.bf16,  # autocast, like ours (--bf16 auto on a CPU with native bf16)
        "save_strategy": "no",  # its final adapter is still saved, as ours is
        "logging_steps": 5,
        "report_to": "none",
        "seed": 0,
        "dataloader_num_workers": 0,
        "system_prompt_file": str(prompt),
        "temperature": 1.0,
        "model_name_or_path": model,
        "torch_dtype": args.bakery_dtype,
        "attn_implementation": "sdpa",
        "auto_install_optional_deps": False,  # never pip-install anything while timed
        "r": args.lora_r,
        "lora_alpha": LORA_ALPHA,
        "lora_dropout": 0.0,
        "target_modules": ["all-linear"],
        "dataset": str(data),
    }


def ours_command(args, model: str, prompt_file: Path, work: Path) -> list[str]:
    return [sys.executable, str(ROOT / "bake.py"), "--name", "bench", "--prompt_file", str(prompt_file),
            "--data_dir", str(work / "data"), "--checkpoint_dir", str(work / "checkpoints"),
            "--model_name_or_path", model, "--num_epochs", str(args.epochs), "--batch_size", str(args.batch_size),
            "--learning_rate", str(args.learning_rate), "--lora_r", str(args.lora_r), "--lora_alpha", str(LORA_ALPHA),
            "--lora_dropout", "0", "--warmup_ratio", str(WARMUP_RATIO), "--max_grad_norm", str(MAX_GRAD_NORM),
            "--bf16", "on" if args.bf16 else "off", "--eval_fraction", "0", "--verify_queries", "0",
            "--save_steps", "1000000", "--wandb_mode", "disabled", "--seed", "0"]


def write_work(work: Path, pairs: list[dict], args, model: str, prompt_file: Path) -> dict[str, list[str]]:
    """Both tools' inputs in one fresh folder; returns each tool's command."""
    atomic_write_bytes(work / "data" / "bench.jsonl", ours_jsonl(pairs))
    atomic_write_bytes(work / "bakery" / "pairs.json", bakery_json(pairs))
    prompt = work / "bakery" / "system_prompt.txt"
    atomic_write_bytes(prompt, read_prompt(str(prompt_file)).encode())
    config = bakery_config(args, model, work / "bakery" / "pairs.json", prompt, work / "bakery" / "out", args.cuda)
    atomic_write_bytes(work / "bakery" / "config.yaml", yaml.safe_dump(config, sort_keys=False).encode())
    return {"ours": ours_command(args, model, prompt_file, work),
            "bakery": [str(args.bakery_python), "-m", "bakery.cli", "--config", str(work / "bakery" / "config.yaml")]}


def run_env(threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled")
    env.pop("PYTHONPATH", None)  # bakery's venv must not see our packages
    return env


def timed_run(tool: str, cmd: list[str], cwd: Path, log: Path, env: dict) -> float:
    """Wall seconds of one whole process: imports, model load, training, saving."""
    with open(log, "wb") as out:
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
        seconds = time.perf_counter() - t0
    if rc != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        raise UserError(f"{tool} failed (exit {rc}) after {seconds:.0f}s: {tail[0][:200]}; its log is {log}")
    return seconds


# ---------------------------------------------------------------- report
def summary(times: dict[str, list[float]]) -> dict:
    ours, theirs = statistics.median(times["ours"]), statistics.median(times["bakery"])
    return {"ours_s": times["ours"], "bakery_s": times["bakery"], "ours_median_s": ours, "bakery_median_s": theirs,
            "ratio_ours_over_bakery": ours / theirs}


def table(result: dict) -> str:
    lines = ["| run | ours (s) | bakery (s) | ours / bakery |", "|---|---|---|---|"]
    for i, (a, b) in enumerate(zip(result["ours_s"], result["bakery_s"]), 1):
        lines.append(f"| {i} | {a:.1f} | {b:.1f} | {a / b:.2f} |")
    lines.append(f"| median | {result['ours_median_s']:.1f} | {result['bakery_median_s']:.1f} | "
                 f"**{result['ratio_ours_over_bakery']:.2f}** |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bakery_src", default=str(MIRROR) if MIRROR.exists() else "",
                        help="bakery's checkout or git dir (default: this machine's snapshot, when present)")
    parser.add_argument("--venv", default=str(ROOT / ".venv-bakery"), help="bakery's own venv, made once")
    parser.add_argument("--data", default="", help="a data file of ours (the first --rows rows are used); "
                        "default: a small set made once by our local generator")
    parser.add_argument("--prompt_file", default=str(ROOT / "prompt.md"))
    parser.add_argument("--model", default="embedded", help="model for both (default: the embedded SmolLM2-135M)")
    parser.add_argument("--rows", type=int, default=60)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--learning_rate", type=float, default=5e-4)
    parser.add_argument("--lora_r", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each, alternating ours / bakery")
    parser.add_argument("--bf16", type=int, choices=(0, 1), default=1, help="bf16 autocast for both (1) or fp32 (0)")
    parser.add_argument("--bakery_dtype", default="float32", choices=("float32", "bfloat16"),
                        help="the dtype bakery loads the model in (float32: fp32 weights like ours)")
    parser.add_argument("--out", default=str(RESULTS), help="where the results go (JSON)")
    args = parser.parse_args()
    if not args.bakery_src:
        raise UserError("no bakery snapshot: pass --bakery_src DIR, a clone of https://github.com/marksverdhei/bakery "
                        "(git clone https://github.com/marksverdhei/bakery) or a bare git dir of it")
    src = Path(args.bakery_src).expanduser().resolve()
    if not src.exists():
        raise UserError(f"--bakery_src {src}: not found; clone https://github.com/marksverdhei/bakery and pass its folder")
    for name in ("rows", "epochs", "batch_size", "lora_r", "threads", "repeats"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} {getattr(args, name)}: must be at least 1")

    import torch  # loads here, after the arguments passed

    from promptbake.model import resolve_model_path

    args.cuda = torch.cuda.is_available()

    model = resolve_model_path(args.model)  # converted once, before any timing
    prompt_file = Path(args.prompt_file).resolve()
    read_prompt(str(prompt_file))
    data = Path(args.data).resolve() if args.data else generated_data(args.rows, model)
    pairs = paired_rows(data, args.rows)
    commit = source_commit(src)
    args.bakery_python = ensure_venv(Path(args.venv).resolve(), src, commit)
    check_config_keys(bakery_config(args, model, data, prompt_file, RUNS), bakery_fields(args.bakery_python),
                      f"bakery {commit[:12]}")

    settings = {"rows": args.rows, "data": str(data), "epochs": args.epochs, "batch_size": args.batch_size,
                "learning_rate": args.learning_rate, "lora_r": args.lora_r, "lora_alpha": LORA_ALPHA,
                "threads": args.threads, "bf16": bool(args.bf16), "bakery_dtype": args.bakery_dtype,
                "bakery_commit": commit, "model": model, "cpu_count": os.cpu_count(),
                "versions": {"python": platform.python_version(), **dict(p.split("==") for p in dependency_pins())}}
    compare(args, pairs, model, prompt_file, settings, Path(args.out).resolve())


def compare(args, pairs: list[dict], model: str, prompt_file: Path, settings: dict, out: Path) -> None:
    """ours / bakery, `--repeats` times; the results are written after every pair, so a stopped run keeps its
    finished pairs."""
    env = run_env(args.threads)
    logs = RUNS / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    times = {"ours": [], "bakery": []}
    load = [os.getloadavg()[0]]
    for i in range(args.repeats):
        for tool in ("ours", "bakery"):
            with tempfile.TemporaryDirectory(prefix=f"bakery-bench-{tool}-") as tmp:
                commands = write_work(Path(tmp), pairs, args, model, prompt_file)
                seconds = timed_run(tool, commands[tool], Path(tmp), logs / f"{tool}_{i + 1}.log", env)
            times[tool].append(seconds)
            load.append(os.getloadavg()[0])
            print(f"run {i + 1}: {tool} {seconds:.1f}s (load {load[-1]:.1f})", flush=True)
        write_json(out, {**summary(times), **settings, "pairs_done": i + 1, "load_average_1min": load,
                         "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})
    print(table(summary(times)))
    print(f"wrote {out}; logs in {logs}/")


if __name__ == "__main__":
    main_guard(main)
