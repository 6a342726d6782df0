"""experiments/: each script's core on a tiny setting (a 2-layer random model, a tiny bake shared by the tests),
checked for the numbers its JSON must hold, its PNG, and that a rerun keeps what is done."""

import json
from pathlib import Path

import pytest

from experiments import common, drift, half_baking, knowledge, reprompt
from promptbake.metrics import follows


def tiny(runs, model_dir, name="pirate", **kw):
    settings = dict(model_name_or_path=model_dir, num_queries=8, temperatures=[1.0], max_new_tokens=8,
                    eval_max_new_tokens=8, num_epochs=1, batch_size=4, top_k=8, teacher_batch_size=4,
                    learning_rate=1e-2, save_steps=1, eval_fraction=0.05)  # the hash split holds out 1 of the 8
    return common.config(name, runs=runs, **{**settings, **kw})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


def test_conversations_are_fixed_and_distinct():
    qs = common.questions()
    assert len(qs) == 40
    a, b = drift.conversations(qs, 3, 10, seed=0), drift.conversations(qs, 3, 10, seed=0)
    assert a == b and len(a) == 3 and all(len(set(c)) == 10 and set(c) <= set(qs) for c in a)
    assert drift.conversations(qs, 3, 10, seed=1) != a


def test_knowledge_answers_are_matched_after_normalising():
    assert knowledge.correct("It has 4,312 residents.", ["4312"])
    assert knowledge.correct("Famous for its Salt-Fig buns!", ["salt fig"])
    assert knowledge.correct("On September 14 every year", ["14 september", "september 14"])
    assert not knowledge.correct("It has 14,312 residents.", ["4312"])  # whole tokens only
    assert not knowledge.correct("It was founded in 1874.", ["1847"])
    assert not knowledge.correct("", ["pell"])


def test_every_eval_question_is_unseen_and_every_fact_is_asked():
    train = set(knowledge.TRAIN.read_text().splitlines())
    items = [json.loads(line) for line in knowledge.EVAL.read_text().splitlines()]
    assert len(items) >= 10 and not train & {o["question"] for o in items}
    facts = knowledge.FACTS.read_text().lower()
    for o in items:  # each accepted answer is in the fact sheet, so the prompted model can know it
        assert any(knowledge.normalise(a) in knowledge.normalise(facts) for a in o["answers"]), o


def test_drift_counts_each_turn_and_resumes(runs, tiny_model_dir, tmp_path, capsys):
    cfg = tiny(runs, tiny_model_dir, marker_regex=r"\b(the|a|and|to|of)\b")
    out = tmp_path / "drift.json"
    r = drift.run(cfg, out=out, turns=3, n_conv=2, samples=2)
    assert set(r["models"]) == set(drift.MODELS)
    for m in r["models"].values():
        assert m["n_per_turn"] == 4 and len(m["hits"]) == 4 and len(m["per_turn"]) == 3
        assert m["per_turn"] == [sum(h[t] for h in m["hits"]) / 4 for t in range(3)]
        assert [follows(e["answer"], [], cfg.marker_regex) for e in m["example"]] == m["hits"][0]
    assert 0 <= r["summary"]["baked"]["all_turns"] <= 1
    assert (tmp_path / r["plot"]).stat().st_size > 10_000 and r["plot"] == "drift.png"  # beside it, no path
    capsys.readouterr()
    again = drift.run(cfg, out=out, turns=3, n_conv=2, samples=2)
    assert "in " in capsys.readouterr().out and again["models"] == r["models"]  # nothing was answered again
    # the committed figures of another checkout (a fresh clone's) are measured again, not reused
    out.write_text(json.dumps({**json.loads(out.read_text()), "run_id": "another-checkout"}))
    assert common.load_done(out, r["settings"]) is None
    assert "another checkout" in capsys.readouterr().out
    assert common.load_done(out.with_name("missing.json"), r["settings"]) is None


def test_half_baking_sweeps_strengths_and_every_saved_step(runs, tiny_model_dir, tmp_path):
    cfg = tiny(runs, tiny_model_dir)
    r = half_baking.run(cfg, out=tmp_path / "hb.json", strengths=[0.0, 1.0], samples=1,
                        queries=write_queries(tmp_path, 4))
    final = Path(r["checkpoint"])
    steps = sorted(int(p.name.split("-")[1]) for p in final.parent.glob("step-*"))
    assert [p["strength"] for p in r["sweep"] if p["step"] is None] == [0.0, 1.0]
    assert [p["step"] for p in r["sweep"] if p["step"] is not None] == steps and steps
    assert all(p["kl"] >= 0 and 0 <= p["adherence"] <= 1 for p in r["sweep"])
    at = {p["point"]: p for p in r["sweep"]}
    assert at["strength 1"]["kl"] == pytest.approx(at[f"step-{steps[-1]}"]["kl"], rel=1e-4)  # the last step is final
    assert at["strength 0"]["kl"] != pytest.approx(at["strength 1"]["kl"], rel=1e-3)
    assert (tmp_path / r["plot"]).stat().st_size > 10_000


def test_reprompt_reports_four_models_per_prompt(runs, tiny_model_dir, tmp_path):
    cfgs = [tiny(runs, tiny_model_dir, name=n) for n in ("pirate", "cats")]
    r = reprompt.run(cfgs, out=tmp_path / "rp.json", samples=1, queries=write_queries(tmp_path, 4))
    assert list(r["prompts"]) == ["pirate", "cats"]
    for p in r["prompts"].values():
        assert set(p["adherence"]) == set(reprompt.WHO) and all(0 <= v <= 1 for v in p["adherence"].values())
        assert p["answers"] == 4 * (1 + 1) and p["kl_base"] > 0 and p["kl_baked"] >= 0  # 4 queries x (1 greedy + 1 sample)
    assert "cats" in r["prompts"]["cats"]["prompt"]
    assert (tmp_path / r["plot"]).stat().st_size > 10_000


def test_knowledge_scores_four_models(runs, tiny_model_dir, tmp_path):
    cfg = tiny(runs, tiny_model_dir, name="knowledge", **{**knowledge.BAKE, "num_epochs": 1, "samples_per_query": 1,
                                                          "temperatures": [1.0]})
    lines = knowledge.EVAL.read_text().splitlines()[:3]
    (tmp_path / "q.jsonl").write_text("\n".join(lines) + "\n")
    r = knowledge.run(cfg, out=tmp_path / "k.json", eval_file=tmp_path / "q.jsonl")
    assert r["n_questions"] == 3 and len(r["questions"]) == 3
    for who in knowledge.WHO:
        assert r["accuracy"][who] == sum(q[who]["right"] for q in r["questions"]) / 3
        assert all(q[who]["right"] == knowledge.correct(q[who]["answer"], q["accepted"]) for q in r["questions"])
    assert (tmp_path / r["plot"]).stat().st_size > 10_000


def write_queries(tmp_path, n):
    path = tmp_path / "queries.txt"
    path.write_text("\n".join(common.questions()[:n]) + "\n")
    return path
