"""The bakery comparison (benchmarks/bakery.py), the parts that need no bakery install: both tools get the same rows
and the same training settings, bakery's YAML holds only keys it reads, and a snapshot is unpacked from a git dir."""

import dataclasses
import importlib.util
import json
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import yaml
from helpers import ROOT
from transformers import TrainingArguments

from promptbake.config import parse_args
from promptbake.data import load_rows
from promptbake.errors import UserError

spec = importlib.util.spec_from_file_location("bakery_bench", ROOT / "benchmarks" / "bakery.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

# bakery's own settings at commit 8da2ae5 (src/bakery/config.py: BakeryConfig, DataConfig, LoraConfig), besides
# TrainingArguments'; the script asks bakery's venv for the live list before it times anything
BAKERY_OWN = {"system_prompt", "system_prompt_file", "num_trajectories", "trajectory_length", "temperature",
              "sampling_temperature", "max_seq_length", "sequential_eval", "model_name_or_path", "torch_dtype",
              "trust_remote_code", "load_in_4bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant",
              "attn_implementation", "auto_install_optional_deps", "use_unsloth", "dataset", "dataset_split",
              "training_prompts", "eval_dataset_split", "eval_dataset", "eval_file", "heldout_file", "corpus_file",
              "corpus_format", "system_prompt_template", "r", "lora_alpha", "target_modules", "lora_dropout", "bias"}
PAIRS = [{"prompt": "Who are you?", "response": "Arr! A pirate.", "complete": True},
         {"prompt": "Tell me a \"story\"\nplease", "response": "Arr! Once upon a tide", "complete": False}]


def bench_args(**kw):
    base = dict(epochs=3, batch_size=4, learning_rate=5e-4, lora_r=16, bf16=1, bakery_dtype="float32",
                bakery_python=Path("/venv/bin/python"), cuda=False)
    return Namespace(**{**base, **kw})


def test_ours_jsonl_reads_back_as_the_same_rows_with_the_cut_answer_marked(tmp_path):
    path = tmp_path / "bench.jsonl"
    path.write_bytes(bench.ours_jsonl(PAIRS))
    rows = load_rows(str(path))
    assert [(r.context, r.response, r.complete) for r in rows] == [
        ([{"role": "user", "content": p["prompt"]}], p["response"], p["complete"]) for p in PAIRS]
    assert bench.paired_rows(path, 2) == PAIRS  # and the conversion back is exact


def test_bakery_json_is_its_paired_format():
    assert json.loads(bench.bakery_json(PAIRS)) == [{"prompt": p["prompt"], "response": p["response"]} for p in PAIRS]


def test_paired_rows_refuses_too_few_rows_and_multi_turn_rows(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(bench.ours_jsonl(PAIRS))
    with pytest.raises(UserError, match="fewer than --rows 3"):
        bench.paired_rows(path, 3)
    multi = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                          {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}
    path.write_text(json.dumps(multi) + "\n")
    with pytest.raises(UserError, match=r"d\.jsonl:1: 3 turns"):
        bench.paired_rows(path, 1)


def test_both_tools_get_the_same_training_settings(tmp_path):
    args = bench_args(epochs=2, batch_size=3, learning_rate=2e-4, lora_r=8)
    commands = bench.write_work(tmp_path, PAIRS, args, "/models/smol", ROOT / "prompt.md")
    config = yaml.safe_load((tmp_path / "bakery" / "config.yaml").read_text())
    ours, _ = parse_args(commands["ours"][2:])
    assert (config["num_train_epochs"], ours.num_epochs) == (2, 2)
    assert (config["per_device_train_batch_size"], ours.batch_size) == (3, 3)
    assert config["gradient_accumulation_steps"] == ours.grad_accum == 1
    assert config["learning_rate"] == ours.learning_rate == 2e-4
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (ours.lora_r, ours.lora_alpha, 0) == (8, 32, 0)
    assert config["target_modules"] == [ours.target_modules] == ["all-linear"]
    assert config["warmup_steps"] == ours.warmup_ratio and config["max_grad_norm"] == ours.max_grad_norm
    assert config["lr_scheduler_type"] == "linear" and config["weight_decay"] == ours.weight_decay == 0
    assert config["bf16"] == 1 and ours.bf16 == "on" and config["use_cpu"] is True
    assert config["model_name_or_path"] == ours.model_name_or_path == "/models/smol"
    # every row trained by both, nothing extra answered by ours
    assert ours.eval_fraction == 0 and ours.verify_queries == 0
    # the same rows and the same system prompt
    assert load_rows(str(Path(ours.data_dir) / "bench.jsonl"))[1].response == PAIRS[1]["response"]
    assert json.loads(Path(config["dataset"]).read_text())[0]["prompt"] == "Who are you?"
    prompt = Path(config["system_prompt_file"]).read_text()
    assert prompt.startswith("You are a pirate.") and "checks:" not in prompt  # the body, not the front matter
    assert commands["bakery"][-2:] == ["--config", str(tmp_path / "bakery" / "config.yaml")]


def test_bakery_config_holds_only_keys_bakery_reads():
    config = bench.bakery_config(bench_args(), "m", Path("d.json"), Path("p.txt"), Path("out"))
    known = {f.name for f in dataclasses.fields(TrainingArguments)} | BAKERY_OWN
    bench.check_config_keys(config, known, "test")
    with pytest.raises(UserError, match="no setting lr_schedule "):
        bench.check_config_keys({**config, "lr_schedule": "linear"}, known, "test")


def test_a_git_dir_is_unpacked_and_anything_else_refused(tmp_path):
    work = tmp_path / "clone"
    work.mkdir()
    (work / "pyproject.toml").write_text("[project]\nname = 'bakery'\n")
    git = ["git", "-C", str(work), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(work)], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    assert bench.unpack_source(work, tmp_path / "unused") == work  # a checkout is used as it is
    unpacked = bench.unpack_source(work / ".git", tmp_path / "out")
    assert (unpacked / "pyproject.toml").read_text().startswith("[project]")
    assert len(bench.source_commit(work / ".git")) == 40
    with pytest.raises(UserError, match="neither a bakery checkout"):
        bench.unpack_source(tmp_path / "out" / "..", tmp_path / "x")


def test_table_gives_each_run_and_the_ratio_of_medians():
    result = bench.summary({"ours": [70.0, 80.0, 75.0], "bakery": [150.0, 140.0, 160.0]})
    assert result["ratio_ours_over_bakery"] == pytest.approx(75 / 150)
    text = bench.table(result)
    assert "| 2 | 80.0 | 140.0 | 0.57 |" in text and "| median | 75.0 | 150.0 | **0.50** |" in text


def test_generated_data_is_reused_only_once_the_generator_marked_it_complete(tmp_path):
    data = tmp_path / "bench.jsonl"
    data.write_bytes(bench.ours_jsonl(PAIRS))
    assert not bench.generation_complete(data)  # no meta: never finished, the generator must run (and resume)
    meta = tmp_path / "bench.meta.json"
    meta.write_text(json.dumps({"status": "running"}))
    assert not bench.generation_complete(data)
    meta.write_text(json.dumps({"status": "complete"}))
    assert bench.generation_complete(data)


def test_a_failed_run_is_one_line_with_its_last_output_and_log(tmp_path):
    log = tmp_path / "ours_1.log"
    cmd = [sys.executable, "-c", "import sys; print('step 1'); print('ValueError: boom'); sys.exit(3)"]
    with pytest.raises(UserError, match=r"ours failed \(exit 3\) after \d+s: ValueError: boom; its log is .*ours_1"):
        bench.timed_run("ours", cmd, tmp_path, log, bench.run_env(1))
    assert bench.timed_run("ours", [sys.executable, "-c", "pass"], tmp_path, log, bench.run_env(1)) > 0
