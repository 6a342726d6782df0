"""Reliability, round three: what is refused before any work, and what is never written wrong (issue 28)."""

import importlib
import json

import pytest
import torch
from conftest import make_cfg
from safetensors.torch import load_file
from test_train import write_data

from promptbake import train
from promptbake.errors import UserError


def cfg_for(model_dir, **kw):
    base = dict(model_name_or_path=model_dir, num_epochs=1, batch_size=4, save_steps=100, eval_fraction=0.25,
                learning_rate=1e-2, top_k=8, teacher_batch_size=4, eval_max_new_tokens=4, max_new_tokens=4)
    return make_cfg(**{**base, **kw})


@pytest.fixture
def baked(workdir, tiny_model_dir):
    """checkpoints/a/final, a one-epoch tiny bake (3 steps: step-3 is kept at the epoch's end)."""
    write_data(workdir / "data" / "a.jsonl")
    return train.bake(cfg_for(tiny_model_dir, name="a"))


def edit_json(path, change):
    info = json.loads(path.read_text())
    change(info)
    path.write_text(json.dumps(info))


def untouched(final):
    """The run folder of `final` as it is now: any later move, rewrite or deletion changes it."""
    return sorted((p.name, p.stat().st_mtime_ns) for p in final.parent.parent.iterdir()), \
        sorted((p.name, p.stat().st_mtime_ns) for p in final.iterdir())


# ---------------------------------------------------------------- 4: a parent inside the run being written
@pytest.mark.parametrize("parent", ["final", "step"])
def test_a_bake_on_a_checkpoint_of_its_own_run_is_refused_before_any_work(baked, tiny_model_dir, monkeypatch, parent):
    if parent == "step":  # the run's first saved step, whatever its number
        parent = min((p.name for p in baked.parent.glob("step-*")), key=lambda n: int(n.split("-")[1]))
    before = untouched(baked)
    monkeypatch.setattr(train, "prepare", lambda *a: pytest.fail("the model was loaded before the refusal"))
    with pytest.raises(UserError, match=rf"--init_from: \S*checkpoints/a/{parent} lies in checkpoints/a, the run this "
                                        r"bake writes .*pick another --name"):
        train.bake(cfg_for(tiny_model_dir, name="a", init_from=str(baked.parent / parent)))
    assert untouched(baked) == before  # nothing moved aside


def test_a_bake_whose_parent_stands_on_the_run_being_written_is_refused(baked, workdir, tiny_model_dir, monkeypatch):
    write_data(workdir / "data" / "b.jsonl")
    b = train.bake(cfg_for(tiny_model_dir, name="b", init_from=str(baked)))
    monkeypatch.setattr(train, "prepare", lambda *a: pytest.fail("the model was loaded before the refusal"))
    with pytest.raises(UserError, match=r"checkpoints/a/final, an ancestor of \S*b/final, lies in checkpoints/a"):
        train.bake(cfg_for(tiny_model_dir, name="a", init_from=str(b)))
    assert (baked / "adapter_model.safetensors").exists() and not list((workdir / "checkpoints").glob("a-*"))


# ---------------------------------------------------------------- 8: the first step trains
def test_a_one_step_bake_changes_the_adapter(workdir, tiny_model_dir):
    write_data(workdir / "data" / "default.jsonl")
    final = train.bake(cfg_for(tiny_model_dir, batch_size=16))  # 9 training rows: one optimizer step
    rows = [json.loads(line) for line in (final.parent / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/kl" in r] == [1]
    assert next(r["train/lr"] for r in rows if "train/kl" in r) > 0
    lora_b = [w for k, w in load_file(final / "adapter_model.safetensors").items() if "lora_B" in k]
    assert lora_b and any(w.abs().max() > 0 for w in lora_b)  # peft starts B at 0: a step of lr 0 leaves it there


def test_the_schedule_warms_up_from_the_first_step_and_decays_to_zero():
    from promptbake.schedule import warmup_then_decay

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = warmup_then_decay(opt, 2, 6)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])  # the rate the next optimizer step uses
        opt.step()
        schedule.step()
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25])
    assert opt.param_groups[0]["lr"] == 0.0
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    warmup_then_decay(opt, 0, 1)
    assert opt.param_groups[0]["lr"] == 1.0  # a one-step run without warmup: the full rate


# ---------------------------------------------------------------- 9: the parent's base model, and its chain
def test_an_explicit_base_model_other_than_the_parent_s_is_refused(baked, tiny_model_dir):
    from promptbake.baked import with_parent_model
    from promptbake.config import parse_args

    cfg, _ = parse_args(["--init_from", str(baked), "--model_name_or_path", "embedded", "--name", "b"])
    with pytest.raises(UserError, match=rf"--init_from \S+ was baked on '{tiny_model_dir}', not 'embedded'; drop "
                                        r"--model_name_or_path"):
        train.bake(cfg)
    (baked.parent / "x.yaml").write_text("model_name_or_path: embedded\n")  # a YAML file's choice is explicit too
    from_yaml, _ = parse_args(["--config", str(baked.parent / "x.yaml"), "--init_from", str(baked)])
    with pytest.raises(UserError, match="not 'embedded'; drop --model_name_or_path"):
        with_parent_model(from_yaml)
    same, _ = parse_args(["--init_from", str(baked), "--model_name_or_path", tiny_model_dir])
    assert with_parent_model(same).model_name_or_path == tiny_model_dir
    unset, _ = parse_args(["--init_from", str(baked)])  # not given: the parent's base, as before
    assert with_parent_model(unset).model_name_or_path == tiny_model_dir


@pytest.fixture
def two(baked, workdir, tiny_model_dir):
    """a, and b baked on it."""
    write_data(workdir / "data" / "b.jsonl")
    return baked, train.bake(cfg_for(tiny_model_dir, name="b", init_from=str(baked)))


@pytest.mark.parametrize("damage,expect", [
    ("self", r"lineage entry 2 \(checkpoints/b/final\) is the checkpoint itself"),
    ("twice", r"lineage entry 2 \(checkpoints/a/final\) is entry 1's adapter again")])
def test_a_lineage_that_lists_an_adapter_twice_is_refused(two, workdir, tiny_model_dir, damage, expect):
    from promptbake.baked import load_baked
    from promptbake.lineage import ancestor_entry

    a, b = two
    own = ancestor_entry(b, json.loads((b / "bake_config.json").read_text()))
    edit_json(b / "bake_config.json", lambda info: info["lineage"].append(own if damage == "self" else info["lineage"][0]))
    with pytest.raises(UserError, match=rf"b/final/bake_config.json: {expect}; a chain applies each ancestor once"):
        load_baked(b)
    write_data(workdir / "data" / "c.jsonl")
    with pytest.raises(UserError, match="a chain applies each ancestor once"):
        train.bake(cfg_for(tiny_model_dir, name="c", init_from=str(b)))
    assert not (workdir / "checkpoints" / "c").exists()


# ---------------------------------------------------------------- 15: a device the machine lacks
@pytest.mark.parametrize("device", ["cuda", "mps"])
def test_a_missing_device_is_one_line_before_any_model_is_loaded(workdir, monkeypatch, device):
    from promptbake import model as models

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(models, "resolve_model_path", lambda *a: pytest.fail("the model was loaded first"))
    with pytest.raises(UserError, match=rf"--device {device}: .*available on this machine.*; pass --device cpu"):
        models.load(make_cfg(device=device))
    assert models.pick_device("cpu") == "cpu"


# ---------------------------------------------------------------- 6: evaluate while the run is baked again
def test_evaluate_writes_nothing_when_the_adapter_changed_meanwhile(baked, monkeypatch):
    ev = importlib.import_module("promptbake.evaluate")  # the package exports the function under that name

    (baked / "eval.json").write_text('{"old": true}')
    real = ev.retention

    def rebaked_meanwhile(*a, **k):
        (baked / "adapter_model.safetensors").write_bytes(b"another bake's adapter")
        return real(*a, **k)

    monkeypatch.setattr(ev, "retention", rebaked_meanwhile)
    with pytest.raises(UserError, match=r"a/final/adapter_model.safetensors changed while it was evaluated .*no "
                                        r"evaluation was written"):
        ev.evaluate(cfg_for(""), str(baked), samples=1)
    assert json.loads((baked / "eval.json").read_text()) == {"old": True}


# ---------------------------------------------------------------- 7 and 13: A/B
def test_ab_of_runs_that_share_a_folder_name_keeps_both(baked, workdir, tiny_model_dir):
    import shutil

    from promptbake.evaluate import compare_checkpoints

    other = workdir / "other" / "a" / "final"
    shutil.copytree(baked, other)
    with pytest.raises(UserError, match="missing/final: not a baked adapter"):  # checked before any evaluation
        compare_checkpoints(cfg_for(""), [str(baked), "missing/final"], samples=1)
    results = compare_checkpoints(cfg_for(""), [str(baked), str(other)], samples=1)
    assert list(results) == ["checkpoints/a/final", "other/a/final"]
    assert [r["checkpoint"] for r in results.values()] == [str(baked), str(other)]
    assert (workdir / "checkpoints" / "ab-checkpoints_a_final-vs-other_a_final.json").exists()


def test_ab_labels_are_distinct_whatever_the_paths(tmp_path):
    from promptbake.evaluate import ab_file, checkpoint_labels

    a, b = tmp_path / "checkpoints" / "a" / "final", tmp_path / "checkpoints" / "b" / "final"
    assert checkpoint_labels([a, b]) == ["a/final", "b/final"]
    assert checkpoint_labels([a, tmp_path / "other" / "a" / "final"]) == ["checkpoints/a/final", "other/a/final"]
    assert checkpoint_labels([a, a]) == [f"{str(a).lstrip('/')} #1", f"{str(a).lstrip('/')} #2"]
    assert len(ab_file("checkpoints", [f"{c * 64}/final" for c in "wxyz"]).name) <= 160


def test_ab_checks_every_checkpoint_before_evaluating_any(baked, monkeypatch):
    ev = importlib.import_module("promptbake.evaluate")  # the package exports the function under that name

    monkeypatch.setattr(ev, "evaluate_target", lambda *a, **k: pytest.fail("evaluated before the check"))
    step = sorted(baked.parent.glob("step-*"))[0]  # the run's first saved step, whatever its number
    (step / "bake_config.json").write_text("{broken")
    with pytest.raises(UserError, match=rf"{step.name}/bake_config.json is not valid JSON"):
        ev.compare_checkpoints(cfg_for(""), [str(baked), str(step)], samples=1)


def test_ab_of_four_runs_with_64_character_names_writes_its_file(baked, workdir):
    import shutil

    from promptbake.evaluate import compare_checkpoints

    runs = []
    for letter in "wxyz":
        run = workdir / "checkpoints" / (letter * 64)
        shutil.copytree(baked.parent, run)
        runs.append(str(run / "final"))
    compare_checkpoints(cfg_for("", eval_max_new_tokens=2), runs, samples=1)
    (out,) = (workdir / "checkpoints").glob("ab-*.json")
    assert len(out.name) < 255 and out.name.startswith("ab-" + "w" * 64)
    assert list(json.loads(out.read_text())["checkpoints"]) == [f"{c * 64}/final" for c in "wxyz"]


# ---------------------------------------------------------------- 12: a query longer than the model reads
LONG = "Tell me about the sea. " * 4500  # 100k characters, about 22k tokens; the tiny model reads 2048


def test_evaluate_refuses_a_long_query_before_sampling(baked, workdir, monkeypatch):
    ev = importlib.import_module("promptbake.evaluate")  # the package exports the function under that name

    (workdir / "q.txt").write_text(f"Who are you?\n{LONG}\n")
    monkeypatch.setattr(ev, "sample", lambda *a, **k: pytest.fail("sampled before the length check"))
    with pytest.raises(UserError, match=r"q.txt: query 2 \('Tell me about the sea. Tell me...'\) is \d+ tokens as the "
                                        r"model reads it, over max_seq_len=512"):
        ev.evaluate(cfg_for(""), str(baked), queries="q.txt", samples=1)
    with pytest.raises(UserError, match=r"query 2 .* over the model's context of 2048 tokens less "
                                        r"--eval_max_new_tokens 4 with the prompt"):
        ev.evaluate(cfg_for("", max_seq_len=100_000), str(baked), queries="q.txt", samples=1)
    assert not list(baked.glob("eval*.json"))


def test_demo_refuses_a_long_question_before_answering(baked, monkeypatch, capsys):
    from test_cli_errors import run_script

    demo = importlib.import_module("promptbake.demo")

    monkeypatch.setattr(demo, "stream_answer", lambda *a, **k: pytest.fail("answered before the length check"))
    line = run_script("demo.py", "--checkpoint", baked, "--compare", "Hi", LONG, monkeypatch=monkeypatch, capsys=capsys)
    assert "the command line: query 2 ('Tell me about the sea. Tell me...') is" in line
    assert "over the model's context of 2048 tokens less --max_new_tokens 160; shorten it" in line  # -1: 160 on CPU


def test_an_interactive_turn_too_long_is_one_line_and_the_chat_goes_on(baked, monkeypatch, capsys):
    demo = importlib.import_module("promptbake.demo")

    model, tokenizer, info, _ = demo.load_for_demo(make_cfg(), str(baked), 1.0)
    lines = iter([LONG, "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    monkeypatch.setattr(demo, "stream_answer", lambda *a, **k: pytest.fail("answered a turn over the context"))
    demo.chat(model, tokenizer, info, [], make_cfg(), 0.0)
    assert "error: this conversation: query 1 ('Tell me about the sea. Tell me...') is" in capsys.readouterr().out


def test_generate_refuses_a_prompt_over_the_model_s_context_whatever_max_prompt_tokens(workdir, tiny_model_dir):
    from promptbake.generate import generate

    (workdir / "prompt.md").write_text("Speak like a pirate. " * 500)  # about 2500 tokens
    with pytest.raises(UserError, match=r"prompt.md: the system prompt is \d+ tokens; with --max_new_tokens 4 that is "
                                        r"over the model's context of 2048 tokens"):
        generate(cfg_for(tiny_model_dir, max_prompt_tokens=100_000, num_queries=2))
    assert not (workdir / "data" / "default.jsonl").exists()


# ---------------------------------------------------------------- 5 and 13: Prompt Pursuit
def pursuit_cfg(model_dir, **kw):
    return cfg_for(model_dir, name="p", **kw)


@pytest.fixture
def first_iteration(workdir, tiny_model_dir):
    """checkpoints/p-pursuit-1/final, as a finished first iteration of `pursue.py --name p` leaves it."""
    write_data(workdir / "data" / "p-pursuit-1.jsonl")
    return train.bake(cfg_for(tiny_model_dir, name="p-pursuit-1"))


def test_pursuit_with_another_prompt_is_refused_before_any_work(first_iteration, workdir, tiny_model_dir, monkeypatch):
    from promptbake import pursuit

    pursuit.check_inputs(pursuit_cfg(tiny_model_dir), 2, None)  # the same prompt: the pursuit resumes
    monkeypatch.setattr(pursuit, "bake_iteration", lambda *a: pytest.fail("an iteration started before the check"))
    (workdir / "cowboy.md").write_text("You are a cowboy.\n")
    with pytest.raises(UserError, match=r"p-pursuit-1/final baked another prompt than cowboy.md holds now; pass a new "
                                        r"--name for this pursuit"):
        pursuit.pursue(pursuit_cfg(tiny_model_dir, prompt_file="cowboy.md"), 2, samples=1)
    (workdir / "prompt.md").write_text("You are a pirate, and you say so twice.\n")  # the same file, other text
    with pytest.raises(UserError, match="baked another prompt than prompt.md holds now"):
        pursuit.pursue(pursuit_cfg(tiny_model_dir), 2, samples=1)
    assert not (workdir / "checkpoints" / "p-pursuit").exists()


def test_pursuit_on_another_parent_is_refused(first_iteration, baked, tiny_model_dir):
    from promptbake import pursuit

    with pytest.raises(UserError, match=r"p-pursuit-1/final was baked on the base model, not on checkpoints/a/final"):
        pursuit.check_inputs(pursuit_cfg(tiny_model_dir, init_from=str(baked)), 2, None)


def test_pursuit_checks_its_queries_file_before_iteration_1(workdir, tiny_model_dir, monkeypatch):
    from promptbake import pursuit

    monkeypatch.setattr(pursuit, "bake_iteration", lambda *a: pytest.fail("an iteration started before the check"))
    with pytest.raises(UserError, match="--queries nope.txt: file not found"):
        pursuit.pursue(pursuit_cfg(tiny_model_dir), 2, queries="nope.txt", samples=1)


def test_a_rebaked_iteration_is_measured_again(first_iteration, workdir, tiny_model_dir, monkeypatch):
    """pursuit.json kept a measurement of an iteration whose checkpoint is gone: the new bake is measured anew."""
    import shutil

    from promptbake import pursuit

    group = workdir / "checkpoints" / "p-pursuit"
    group.mkdir()
    (group / "pursuit.json").write_text(json.dumps({"reference": {"prompted": 1.0}, "iterations": [
        {"iteration": 1, "adherence": 0.99, "adherence_reprompted": 1.0, "kl_to_prompted_base": 9.0}]}))
    kept = workdir / "kept"
    shutil.move(first_iteration.parent, kept)

    def bake_again(cfg, i, parent):
        shutil.copytree(kept, first_iteration.parent)
        return first_iteration

    monkeypatch.setattr(pursuit, "bake_iteration", bake_again)
    monkeypatch.setattr(pursuit, "reference", lambda *a: pursuit.Reference(None, None, [], [], {"prompted": 1.0}))
    monkeypatch.setattr(pursuit, "measure", lambda *a: {"adherence": 0.1, "adherence_reprompted": 0.2,
                                                        "kl_to_prompted_base": 0.5})
    state = pursuit.pursue(pursuit_cfg(tiny_model_dir), 1, samples=1)
    assert state["iterations"][0]["adherence"] == 0.1


# ---------------------------------------------------------------- 14: damaged and hand-edited files
@pytest.mark.parametrize("damage,file", [
    ("bake_config", "d/final/bake_config.json: not as bake.py writes it (`lineage` is not a list)"),
    ("metrics", "d/metrics.jsonl: not as promptbake writes it (TypeError"),
    ("eval", "d/final/eval.json: not as promptbake writes it (AttributeError"),
    ("broken", "d/final/bake_config.json is not valid JSON")])
def test_history_lists_the_others_and_flags_a_damaged_run(tmp_path, capsys, damage, file):
    from test_report import fake_run

    from promptbake.history import history, print_history
    from promptbake.report import write_report

    fake_run(tmp_path, "good")
    run = fake_run(tmp_path, "d")
    if damage == "bake_config":
        edit_json(run / "final" / "bake_config.json", lambda info: info.update(lineage={"a": 1}))
    elif damage == "metrics":
        (run / "metrics.jsonl").write_text('{"step": 0, "eval/kl_full_before": "high"}\n{"step": 1, "eval/kl_full": 1}\n')
    elif damage == "eval":
        edit_json(run / "final" / "eval.json", lambda result: result.update(targets=[1, 2]))
    else:
        (run / "final" / "bake_config.json").write_text("{broken")
    entries = {e["name"]: e for e in history(str(tmp_path / "checkpoints"))}
    assert entries["good"]["adherence"] == 0.8 and "damaged" not in entries["good"]
    assert file in entries["d"]["damaged"]
    print_history(list(entries.values()))
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("d ")]
    assert "DAMAGED: " in line and file in line
    with pytest.raises(UserError, match=file.replace("(", r"\(").replace(")", r"\)")):
        write_report(run)


def test_a_damaged_pursuit_json_is_one_line(workdir, tiny_model_dir):
    from promptbake import pursuit

    (workdir / "checkpoints" / "p-pursuit").mkdir()
    (workdir / "checkpoints" / "p-pursuit" / "pursuit.json").write_text('{"iterations": [{"iter": 1}]}')
    with pytest.raises(UserError, match=r"p-pursuit/pursuit.json: not as promptbake writes it \(KeyError"):
        pursuit.pursue(pursuit_cfg(tiny_model_dir), 1, samples=1)


def test_a_hand_edited_lineage_is_one_line_in_demo(baked, monkeypatch, capsys):
    from test_cli_errors import run_script

    edit_json(baked / "bake_config.json", lambda info: info.update(lineage=[{"name": "x"}]))
    line = run_script("demo.py", "--checkpoint", baked, "Hi", monkeypatch=monkeypatch, capsys=capsys)
    assert line.startswith("error: checkpoints/a/final/bake_config.json: not as bake.py writes it (`lineage` entry 1 is")
