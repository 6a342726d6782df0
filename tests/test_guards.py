"""Reliability, round three: what is refused before any work, and what is never written wrong (issue 28)."""

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
@pytest.mark.parametrize("parent", ["final", "step-3"])
def test_a_bake_on_a_checkpoint_of_its_own_run_is_refused_before_any_work(baked, tiny_model_dir, monkeypatch, parent):
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
