"""Prompt Pursuit: each iteration bakes on the last, is measured against the original prompted base, and
a killed run resumes. History lists what was baked."""

import json

import pytest
from conftest import make_cfg
from helpers import kill_when, script

from promptbake.history import history
from promptbake.pursuit import pursue, stopped_rising

QUERIES = ["Who are you?", "Tell me a joke.", "What is rain?", "How do I cook rice?", "Where is Paris?",
           "Why is the sky blue?", "What is 2+2?", "Give me advice.", "Name a fruit.", "Sing a song.",
           "What is a ship?", "Say hi."]


def settings(model_dir):
    return dict(model_name_or_path=model_dir, num_epochs=1, batch_size=4, eval_fraction=0.25, learning_rate=1e-2,
                top_k=8, teacher_batch_size=4, max_new_tokens=8, eval_max_new_tokens=8, temperatures=[1.0], samples_per_query=1,
                name="p", marker_regex=r"\bthe\b")


def test_each_iteration_bakes_on_the_last_and_is_measured(workdir, tiny_model_dir):
    cfg = make_cfg(training_prompts=QUERIES, **settings(tiny_model_dir))
    state = pursue(cfg, iterations=2, samples=1, min_gain=-1.0)  # never stop early here
    assert [it["iteration"] for it in state["iterations"]] == [1, 2]
    assert all(it["kl_to_prompted_base"] > 0 and 0 <= it["adherence"] <= 1 for it in state["iterations"])
    second = json.loads((workdir / "checkpoints" / "p-pursuit-2" / "final" / "bake_config.json").read_text())
    assert [a["name"] for a in second["lineage"]] == ["p-pursuit-1"]
    assert (workdir / "checkpoints" / "p-pursuit" / "pursuit.png").stat().st_size > 0
    entries = {e["name"]: e for e in history(str(workdir / "checkpoints"))}
    assert entries["p-pursuit-2"]["parent"] == "p-pursuit-1" and entries["p-pursuit-1"]["parent"] is None
    assert entries["p-pursuit-2"]["rows"] == 12 and entries["p-pursuit-2"]["kl_cut"] is not None


def test_pursuit_stops_when_adherence_stops_rising():
    its = [{"adherence": 0.5}, {"adherence": 0.6}]
    assert not stopped_rising(its, 0.0)
    assert stopped_rising(its, 0.2)
    assert stopped_rising([{"adherence": 0.6}, {"adherence": 0.6}], 0.0)
    assert not stopped_rising(its[:1], 0.0)


@pytest.mark.slow
def test_pursuit_resumes_after_a_kill(workdir, tiny_model_dir):
    args = [f"--{k}={','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in settings(tiny_model_dir).items()]
    args += ["--wandb_mode=disabled", "--verify_queries=0", "--save_steps=1", "--iterations=2", "--samples=1",
             "--min_gain=-1"] + [f"--training_prompts={q}" for q in QUERIES]
    second = workdir / "checkpoints" / "p-pursuit-2"
    kill_when("pursue.py", *args, cwd=workdir, ready=lambda: any(second.glob("step-*")))
    first = workdir / "checkpoints" / "p-pursuit-1" / "final"
    first_mtime = first.stat().st_mtime
    out = script("pursue.py", *args, cwd=workdir).stdout
    assert "pursuit iteration 1: " in out and "exists, kept" in out
    assert "resumed from" in out  # iteration 2 continued from its step checkpoint
    assert first.stat().st_mtime == first_mtime
    state = json.loads((workdir / "checkpoints" / "p-pursuit" / "pursuit.json").read_text())
    assert [it["iteration"] for it in state["iterations"]] == [1, 2]
    table = script("history.py", cwd=workdir).stdout
    assert "p-pursuit-2" in table and "p-pursuit-1" in table


def test_history_reads_the_newest_evaluation(tmp_path):
    import os

    from promptbake.history import adherence
    from promptbake.io import write_json

    assert adherence(tmp_path) == (None, None)
    rates = lambda b, p: {"adherence": {"baked": {"marker_rate": b}, "prompted": {"marker_rate": p}}}  # noqa: E731
    write_json(tmp_path / "eval.json", rates(0.1, 0.2))
    write_json(tmp_path / "eval_unseen.json", rates(0.5, 0.6))  # evaluate.py --queries unseen.txt, later
    os.utime(tmp_path / "eval.json", (1, 1))
    assert adherence(tmp_path) == (0.5, 0.6)
    # the newer shape: the share of non-loop answers passing the checks
    new = {"adherence": {"baked": {"non_degenerate": {"rate": 0.3}}, "prompted": {"non_degenerate": {"rate": 0.4}}}}
    write_json(tmp_path / "eval_sealed.json", new)
    assert adherence(tmp_path) == (0.3, 0.4)
