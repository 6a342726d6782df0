import orjson
import pytest

from promptbake.data import load_prompts, load_rows, read_prompt
from promptbake.errors import UserError


def write_lines(path, rows):
    path.write_text("".join((r if isinstance(r, str) else orjson.dumps(r).decode()) + "\n" for r in rows))
    return str(path)


def pair(q="hi", a="Arr!"):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def test_prompt_file_missing_or_empty(tmp_path):
    with pytest.raises(UserError, match="prompt.md: system prompt file not found"):
        read_prompt(str(tmp_path / "prompt.md"))
    (tmp_path / "p.md").write_text("  \n")
    with pytest.raises(UserError, match="p.md: the system prompt is empty"):
        read_prompt(str(tmp_path / "p.md"))


def test_malformed_line_named_with_file_and_line(tmp_path):
    f = write_lines(tmp_path / "d.jsonl", [pair(), '{"messages": [oops', pair()])
    with pytest.raises(UserError, match=r"d.jsonl:2: malformed JSON"):
        load_rows(f)


def test_torn_last_line_from_a_crash_is_skipped(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(orjson.dumps(pair()).decode() + "\n" + '{"messages": [{"ro')
    assert len(load_rows(str(f))) == 1


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(UserError, match="nope.jsonl: data file not found; run `python generate_data.py`"):
        load_rows(str(tmp_path / "nope.jsonl"))
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(UserError, match="e.jsonl: no rows"):
        load_rows(str(tmp_path / "e.jsonl"))


def test_system_message_refused_unless_stripped(tmp_path):
    row = {"messages": [{"role": "system", "content": "secret"}, *pair()["messages"]]}
    f = write_lines(tmp_path / "d.jsonl", [pair(), row])
    with pytest.raises(UserError, match=r"d.jsonl:2: the row has a system message.*--strip_system"):
        load_rows(f)
    rows = load_rows(f, strip_system=True)
    assert all(m["role"] != "system" for r in rows for m in r.context)


def test_unknown_role(tmp_path):
    f = write_lines(tmp_path / "d.jsonl", [{"messages": [{"role": "narrator", "content": "x"}]}])
    with pytest.raises(UserError, match=r"d.jsonl:1: each message needs a role in \['system', 'user', 'assistant'\]"):
        load_rows(f)


def test_paired_mode_needs_assistant(tmp_path):
    f = write_lines(tmp_path / "d.jsonl", [pair(), {"messages": [{"role": "user", "content": "q"}]}])
    with pytest.raises(UserError, match=r"d.jsonl:2: the row has no assistant turn"):
        load_rows(f, need_responses=True)


def test_multi_turn_trains_only_last_assistant(tmp_path):
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    (r,) = load_rows(write_lines(tmp_path / "d.jsonl", [{"messages": msgs}]))
    assert r.response == "d" and r.context == msgs[:3]


def test_prompt_sources(tmp_path):
    (tmp_path / "p.txt").write_text("one\n\ntwo\n")
    assert [r.context[0]["content"] for r in load_prompts(str(tmp_path / "p.txt"))] == ["one", "two"]
    (tmp_path / "p.json").write_text('["a", "b", "c"]')
    assert len(load_prompts(str(tmp_path / "p.json"))) == 3
    write_lines(tmp_path / "p.jsonl", [{"prompt": "x"}, {"question": "y", "response": "z"}, pair("q", "a")])
    rows = load_prompts(str(tmp_path / "p.jsonl"))
    assert [r.response for r in rows] == [None, "z", "a"]
    folder = tmp_path / "ds"
    folder.mkdir()
    write_lines(folder / "train.jsonl", [{"prompt": "from a local dataset folder"}])
    assert load_prompts(str(folder))[0].context[0]["content"] == "from a local dataset folder"


def test_builtin_seeds_are_diverse():
    from promptbake.seeds import SEED_QUERIES, seed_queries

    assert len(SEED_QUERIES) >= 10 and len(seed_queries()) >= 50
    assert len(set(seed_queries())) == len(seed_queries())
    first_12 = seed_queries()[:12]
    assert {c for c, qs in SEED_QUERIES.items() for q in qs if q in first_12} == set(SEED_QUERIES)
