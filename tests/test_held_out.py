"""The held-out split by query hash (train.split_held_out): stable when queries are added or dropped, disjoint, and
never splitting one query's samples; the sealed test file is apart from every file used to tune."""

from pathlib import Path

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from promptbake.data import load_prompts, normalise_query
from promptbake.errors import UserError
from promptbake.seeds import seed_queries
from promptbake.teacher import Example
from promptbake.train import held_out_score, split_held_out

ROOT = Path(__file__).resolve().parent.parent
queries = st.lists(st.text(min_size=1, max_size=30).filter(lambda q: q.strip()), min_size=0, max_size=60,
                   unique_by=normalise_query)


def group(q: str) -> str:
    return orjson.dumps([{"role": "user", "content": q}]).decode()


def examples(qs: list[str], samples: int = 2) -> list[Example]:
    return [Example(i, [1], [1], 1, group(q)) for i, q in enumerate(q for q in qs for _ in range(samples))]


def held(qs: list[str], fraction: float = 0.3, seed: int = 0) -> set[str] | None:
    """The held-out queries; None when every query is held out (the split refuses: no training rows)."""
    ex = examples(qs)
    try:
        _, out = split_held_out(ex, fraction, seed)
    except UserError:
        return None
    return {orjson.loads(ex[i].group)[0]["content"] for i in out}


@settings(max_examples=60, deadline=None)
@given(queries, queries)
def test_a_query_keeps_its_side_when_others_are_added_or_dropped(kept, other):
    other = [q for q in other if normalise_query(q) not in {normalise_query(k) for k in kept}]
    small, large = held(kept), held(kept + other)
    by_hash = [q for q in kept if held_out_score(group(q), 0) < 0.3]
    if by_hash and small is not None and large is not None:  # (not the fallback of a set with none held by the hash)
        assert small == large & set(kept) == set(by_hash)


@settings(max_examples=60, deadline=None)
@given(queries, st.floats(0.05, 0.9), st.integers(0, 5))
def test_train_and_held_out_are_disjoint_and_cover_every_row(qs, fraction, seed):
    ex = examples(qs)
    if not ex:
        return
    try:
        train, out = split_held_out(ex, fraction, seed)
    except UserError:  # every query held out: refused, nothing to check
        return
    assert not set(train) & set(out) and sorted(train + out) == list(range(len(ex)))
    assert not {ex[i].group for i in train} & {ex[i].group for i in out}  # samples of one query stay together
    if len(qs) >= 4:
        assert out


def test_the_share_held_out_is_about_the_fraction_and_the_seed_changes_it():
    qs = [f"question number {i}" for i in range(2000)]
    share = len(held(qs, 0.1)) / len(qs)
    assert 0.08 < share < 0.12
    assert held(qs, 0.1, seed=1) != held(qs, 0.1, seed=0)


def test_the_same_query_written_twice_lands_on_one_side():
    qs = [f"q{i}" for i in range(200)]
    out = held(qs + [q.upper() + "  " for q in qs], 0.5)
    assert 0 < len(out) < 400
    assert all((q in out) == (q.upper() + "  " in out) for q in qs)


def test_the_sealed_questions_are_new_and_skipped_headers():
    sealed = ROOT / "examples" / "sealed_questions.txt"
    text = sealed.read_text()
    assert "never used to choose a setting" in text.split("\n\n")[0]
    rows = load_prompts(str(sealed))
    asked = [r.context[-1]["content"] for r in rows]
    assert len(asked) >= 60 and not any(q.startswith("#") for q in asked)
    tuned = {normalise_query(q) for q in seed_queries()}
    tuned |= {normalise_query(r.context[-1]["content"]) for f in ("unseen_questions.txt", "unseen_queries.txt")
              for r in load_prompts(str(ROOT / "examples" / f))}
    assert not {normalise_query(q) for q in asked} & tuned
    assert len({normalise_query(q) for q in asked}) == len(asked)
