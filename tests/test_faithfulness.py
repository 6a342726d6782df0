"""The faithfulness benchmark (benchmarks/faithfulness.py): its prompts declare checks that score the questions they
were written for, its questions are never training queries, and its table reads eval.json's shape."""

import importlib.util

import pytest
from helpers import ROOT

from promptbake.checks import front_matter_checks, score_answer
from promptbake.data import load_prompts
from promptbake.seeds import seed_queries

spec = importlib.util.spec_from_file_location("faithfulness", ROOT / "benchmarks" / "faithfulness.py")
faith = importlib.util.module_from_spec(spec)
spec.loader.exec_module(faith)


def questions(kind: str) -> list[str]:
    return [r.context[-1]["content"] for r in load_prompts(str(faith.KINDS_DIR / f"{kind}.txt"))]


@pytest.mark.parametrize("kind", faith.KINDS)
def test_each_kind_declares_checks_and_has_40_questions_never_trained_on(kind):
    checks = front_matter_checks(str(faith.KINDS_DIR / f"{kind}.md"))
    qs = questions(kind)
    assert checks and len(qs) >= 40 and len(set(qs)) == len(qs)
    norm = {q.strip().lower() for q in qs}
    others = [*seed_queries(), *(r.context[-1]["content"] for f in ("unseen_questions.txt", "sealed_questions.txt")
                                 for r in load_prompts(str(ROOT / "examples" / f)))]
    assert not norm & {q.strip().lower() for q in others}  # the built-in training queries, the tuning and sealed sets
    for q in qs:  # every question is scored by at least one check
        assert any(v is not None for v in score_answer(q, "An answer.", checks).values()), q


def test_fact_and_policy_questions_each_meet_exactly_one_check():
    """A `when` that caught two facts would demand both in one answer: each question is about one fact, and each
    policy question is either on topic (never the refusal) or off (the refusal)."""
    for kind in ("facts", "policy"):
        checks = front_matter_checks(str(faith.KINDS_DIR / f"{kind}.md"))
        for q in questions(kind):
            applied = [name for name, v in score_answer(q, "x", checks).items() if v is not None]
            assert len(applied) == 1, (kind, q, applied)


def rate(k, n):
    from promptbake.metrics import rate as wilson_rate

    return wilson_rate([True] * k + [False] * (n - k))


def test_summary_and_table_read_eval_json():
    def adherence(k, loops):
        return {"non_degenerate": rate(k, 100 - loops), "all": rate(k, 100), "loop": rate(loops, 100),
                "llr": {"mean": k / 100, "ci": [0, 1], "n": 100}}

    own = {"n_queries": 40, "answers_per_model": 120, "kl_before": 0.5, "kl_after": 0.1,
           "adherence": {"base": adherence(0, 0), "prompted": adherence(60, 10), "baked": adherence(45, 20),
                         "baked_reprompted": adherence(70, 5)},
           "retention": {"retention_vs_reference": 0.95, "retention_vs_prompted": 1.02}}
    row = faith.summarise(own, {"kl_before": 0.4, "kl_after": 0.04})
    assert row["kl_cut_own"] == pytest.approx(0.8) and row["kl_cut_generic"] == pytest.approx(0.9)
    assert row["baked_over_prompted"] == pytest.approx((45 / 80) / (60 / 90))
    assert row["retention_vs_base"] == 0.95 and row["retention_vs_prompted"] == 1.02
    lines = []
    faith.print_table({"defaults": {"_commit": "abc", "facts": row}}, out=lines.append)
    line = next(x for x in lines if x.startswith("| facts |"))
    assert "0.67 [" in line and "0.56 [" in line and "| 0.84 |" in line and "80% / 90%" in line and "0.95 / 1.02" in line


def test_a_kind_whose_questions_include_training_queries_shows_the_unseen_ratio_beside():
    def adherence(k):
        return {"non_degenerate": rate(k, 100), "all": rate(k, 100), "loop": rate(0, 100)}

    own = {"n_queries": 40, "kl_before": 0.5, "kl_after": 0.1,
           "adherence": {"prompted": adherence(60), "baked": adherence(30)},
           "adherence_unseen": {"n_queries": 35, "prompted": adherence(50), "baked": adherence(20)}}
    row = faith.summarise(own, {})
    assert row["baked_over_prompted"] == pytest.approx(0.5) and row["baked_over_prompted_unseen"] == pytest.approx(0.4)
    lines = []
    faith.print_table({"t": {"facts": row}}, out=lines.append)
    assert "| 0.50 (0.40 on the 35 never trained on) |" in next(x for x in lines if x.startswith("| facts |"))
