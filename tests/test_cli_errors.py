"""User errors end with exit 1 and one clear line on stderr: what is wrong, where, and the fix. No traceback."""

import runpy
import sys

import orjson
import pytest
from helpers import ROOT


def run_script(name, *args, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [name, *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / name), run_name="__main__")
    err = capsys.readouterr().err
    assert exit_info.value.code == 1, err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.fixture
def tiny_args(tiny_model_dir):
    return ["--model_name_or_path", tiny_model_dir]


def test_missing_prompt(workdir, monkeypatch, capsys, tiny_args):
    (workdir / "prompt.md").unlink()
    line = run_script("generate_data.py", *tiny_args, monkeypatch=monkeypatch, capsys=capsys)
    assert line == "error: prompt.md: system prompt file not found; write the prompt to bake into it"


def test_empty_prompt(workdir, monkeypatch, capsys, tiny_args):
    (workdir / "prompt.md").write_text("\n")
    line = run_script("bake.py", *tiny_args, monkeypatch=monkeypatch, capsys=capsys)
    assert "prompt.md: the system prompt is empty" in line


def test_a_bad_check_in_the_front_matter_stops_the_bake_in_one_line(workdir, monkeypatch, capsys, tiny_args):
    (workdir / "prompt.md").write_text("---\nchecks:\n  - max_words: 0\n---\nYou are terse.\n")
    line = run_script("bake.py", *tiny_args, monkeypatch=monkeypatch, capsys=capsys)
    assert line == "error: prompt.md: checks[0]: `max_words` must be a whole number of at least 1, got 0"
    (workdir / "prompt.md").write_text("---\nchecks:\n  - matches: \"(arr\"\n---\nYou are a pirate.\n")
    line = run_script("generate_data.py", *tiny_args, monkeypatch=monkeypatch, capsys=capsys)
    assert line.startswith("error: prompt.md: checks[0]: `matches` '(arr' is not a valid regular expression")


def test_missing_data(workdir, monkeypatch, capsys, tiny_args):
    line = run_script("bake.py", *tiny_args, monkeypatch=monkeypatch, capsys=capsys)
    assert "data/default.jsonl: data file not found; run `python generate_data.py` first" in line


def test_malformed_data_line(workdir, monkeypatch, capsys, tiny_args):
    (workdir / "data" / "default.jsonl").write_text('{"messages": []}\n{broken\n{"x": 1}\n')
    line = run_script("bake.py", *tiny_args, monkeypatch=monkeypatch, capsys=capsys)
    assert "data/default.jsonl:2: malformed JSON" in line


def test_system_message_in_data(workdir, monkeypatch, capsys, tiny_args):
    row = {"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "q"},
                        {"role": "assistant", "content": "a"}]}
    (workdir / "data" / "default.jsonl").write_text(orjson.dumps(row).decode() + "\n")
    line = run_script("bake.py", *tiny_args, monkeypatch=monkeypatch, capsys=capsys)
    assert "data/default.jsonl:1: the row has a system message" in line and "--strip_system" in line


def test_unknown_flag(workdir, monkeypatch, capsys):
    line = run_script("bake.py", "--num_epoch", "3", monkeypatch=monkeypatch, capsys=capsys)
    assert line == "error: command line: unknown setting `num_epoch`. Did you mean num_epochs?"


def test_bad_config_file(workdir, monkeypatch, capsys):
    (workdir / "x.yaml").write_text("learning_rate: fast\n")
    line = run_script("bake.py", "--config", "x.yaml", monkeypatch=monkeypatch, capsys=capsys)
    assert line == "error: x.yaml: `learning_rate` must be float, got 'fast'"


def test_model_not_loadable_offline(workdir, monkeypatch, capsys):
    (workdir / "data" / "default.jsonl").write_text("")
    line = run_script("generate_data.py", "--model_name_or_path", "nobody/no-such-model", monkeypatch=monkeypatch,
                      capsys=capsys)
    assert "could not load model 'nobody/no-such-model'" in line and "no network" in line
    assert "--model_name_or_path /path/to/folder" in line


def test_tokenizer_without_chat_template(workdir, monkeypatch, capsys, tiny_model_dir):
    import json
    import shutil

    plain = workdir / "plain-model"
    shutil.copytree(tiny_model_dir, plain)
    for f in plain.glob("*"):
        if f.name == "chat_template.jinja":
            f.unlink()
    cfg_file = plain / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.pop("chat_template", None)
    cfg_file.write_text(json.dumps(cfg))
    line = run_script("generate_data.py", "--model_name_or_path", plain, monkeypatch=monkeypatch, capsys=capsys)
    assert "the tokenizer has no chat template; baking needs a chat (instruct) model" in line


def test_checkpoint_that_is_not_an_adapter(workdir, monkeypatch, capsys):
    line = run_script("demo.py", "--checkpoint", "data", "hi", monkeypatch=monkeypatch, capsys=capsys)
    assert line == ("error: data: not a baked adapter (it needs adapter_config.json and bake_config.json); "
                    "pass a checkpoints/<run>/final or step-N folder")


def test_no_checkpoint_yet(workdir, monkeypatch, capsys):
    line = run_script("evaluate.py", monkeypatch=monkeypatch, capsys=capsys)
    assert "no baked checkpoint under checkpoints/; run `python bake.py` first" in line


@pytest.mark.parametrize("script,args,expect", [
    ("demo.py", ["--strength", "nan", "hi"], "`--strength` is nan; it must be in [0, 10]"),
    ("evaluate.py", ["--strengths", "0,inf"], "`--strengths` is inf; it must be in [0, 10]"),
    ("bake.py", ["--num_epochs", "0"], "`num_epochs` is 0; it must be in [1, 10000]"),
    ("generate_data.py", ["--name", "../../elsewhere"], "`name` is '../../elsewhere'; use 1-64 letters"),
    ("generate_data.py", ["--concurrency", "0"], "`concurrency` is 0; it must be in [1, 1024]"),
])
def test_bad_values_stop_in_one_line(workdir, monkeypatch, capsys, script, args, expect):
    line = run_script(script, *args, monkeypatch=monkeypatch, capsys=capsys)
    assert expect in line
