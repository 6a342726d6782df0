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
    from promptbake.train import check_answered

    with pytest.raises(UserError, match=r"d.jsonl:2: the row has no assistant turn, but others do"):
        check_answered({"rows": load_rows(f), "data": str(f)})


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


# ---------------------------------------------------------------- encodings, folders, JSON shapes
def test_prompt_file_encodings(tmp_path):
    (tmp_path / "latin1.md").write_bytes("Tu es un pirate.\nRéponds toujours.\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1.md:2: not UTF-8 text \(byte 0xe9\); save it as UTF-8"):
        read_prompt(str(tmp_path / "latin1.md"))
    (tmp_path / "bom.md").write_bytes(b"\xef\xbb\xbfBe a pirate.\r\nSay Arr!\r\n")
    assert read_prompt(str(tmp_path / "bom.md")) == "Be a pirate.\nSay Arr!"
    with pytest.raises(UserError, match=r"is a folder; --prompt_file must name the file"):
        read_prompt(str(tmp_path))


def test_prompt_txt_encodings_and_folders(tmp_path):
    (tmp_path / "q.txt").write_bytes(b"one\r\n\xef\xbb\xbf\r\ncaf\xe9\r\n")
    with pytest.raises(UserError, match=r"q.txt:3: not UTF-8 text .*save it as UTF-8"):
        load_prompts(str(tmp_path / "q.txt"))
    (tmp_path / "ok.txt").write_bytes(b"\xef\xbb\xbfone\r\ntwo\r\n")
    assert [r.context[0]["content"] for r in load_prompts(str(tmp_path / "ok.txt"))] == ["one", "two"]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("not a prompt file")
    with pytest.raises(UserError, match=r"empty: the folder holds no .txt, .json or .jsonl files and is not a saved"):
        load_prompts(str(tmp_path / "empty"))


@pytest.mark.parametrize("content, got", [('"just one prompt"', "a string"), ('{"prompt": "x"}', "an object")])
def test_json_file_must_hold_a_list(tmp_path, content, got):
    (tmp_path / "p.json").write_text(content)
    with pytest.raises(UserError, match=rf"p.json: expected a JSON list of prompts or rows, got {got}$"):
        load_prompts(str(tmp_path / "p.json"))


def test_jsonl_not_utf8(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_bytes(orjson.dumps(pair()) + b"\n" + orjson.dumps(pair("caf")).replace(b"caf", b"caf\xe9") + b"\n")
    with pytest.raises(UserError, match=r"d.jsonl:2: not UTF-8 text \(byte 0xe9\); save it as UTF-8"):
        load_rows(str(f))


def test_torn_last_line_mid_character_is_a_cut_not_an_encoding_error(tmp_path):
    f = tmp_path / "d.jsonl"
    cut = '{"messages": [{"role": "user", "content": "é'.encode()[:-1]  # the writer died inside "é"'s two bytes
    f.write_bytes(orjson.dumps(pair()) + b"\n" + cut)
    assert len(load_rows(str(f))) == 1


# ---------------------------------------------------------------- field types
def gen_row(**fields):
    return {**pair(), "generation": {"index": 0, "temperature": 0.7, "finish_reason": "stop"}, **fields}


@pytest.mark.parametrize("row, message", [
    (gen_row(generation=[0, 0.7]), r"`generation` must be an object like \{\"index\": 0.*got a list"),
    (gen_row(generation={"index": "0"}), r"`generation.index` must be an integer, got a string"),
    (gen_row(generation={"index": 1.5}), r"`generation.index` must be an integer, got a number"),
    (gen_row(generation={"temperature": "hot"}), r"`generation.temperature` must be a number, got a string"),
    (gen_row(generation={"temperature": True}), r"`generation.temperature` must be a number, got a boolean"),
    (gen_row(generation={"finish_reason": 1}), r"`generation.finish_reason` must be a string, got a number"),
    (gen_row(response_token_ids="1 2 3"), r"`response_token_ids` must be a list of integer token ids"),
    (gen_row(response_token_ids=[1, "2"]), r"`response_token_ids` must be a list of integer token ids"),
    ({"messages": [{"role": "user", "content": ["hi"]}]}, r"each message needs a role .* and a string content"),
    ({"prompt": 7}, r"`prompt` must be a string, got a number"),
    ({"prompt": "q", "response": ["a"]}, r"`response` must be a string, got a list"),
    ({"messages": [{"role": "assistant", "content": "Arr!"}]}, r"the row has no user turn; add the user message"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                   {"role": "assistant", "content": "b"}]}, r"the row has no user turn before the assistant's"),
])
def test_fields_of_the_wrong_type_are_named(tmp_path, row, message):
    f = write_lines(tmp_path / "d.jsonl", [pair(), row])
    with pytest.raises(UserError, match=r"^\S*d.jsonl:2: " + message):
        load_rows(f)


def test_only_system_message_left_after_stripping_has_no_user_turn(tmp_path):
    f = write_lines(tmp_path / "d.jsonl", [{"messages": [{"role": "system", "content": "s"}]}])
    with pytest.raises(UserError, match=r"d.jsonl:1: the row has no user turn"):
        load_rows(f, strip_system=True)


@pytest.mark.parametrize("row", ['"  "', {"prompt": ""}, {"messages": [{"role": "user", "content": ""}]},
                                 pair(q=" \n")])
def test_empty_user_turn_refused(tmp_path, row):
    f = write_lines(tmp_path / "d.jsonl", [pair(), row])
    with pytest.raises(UserError, match=r"d.jsonl:2: the user turn is empty; write the prompt, or delete the row"):
        load_rows(f)


def test_empty_answers_are_skipped_and_reported(tmp_path, capsys):
    f = write_lines(tmp_path / "d.jsonl", [pair(), pair(a=""), {"prompt": "q", "response": " "}, pair("q2", "Arr")])
    rows = load_rows(f)
    assert [r.response for r in rows] == ["Arr!", "Arr"]
    assert [s.where for s in rows.skipped] == [f"{f}:2", f"{f}:3"]
    out = capsys.readouterr().out
    assert f"skipped 2 rows: the assistant's answer is empty (it would train a bare end-of-turn): {f}:2, {f}:3" in out
    write_lines(tmp_path / "all.jsonl", [pair(a="")])
    with pytest.raises(UserError, match=r"all.jsonl: no rows left \(1 skipped\)"):
        load_rows(str(tmp_path / "all.jsonl"))


def test_torn_last_line_is_reported(tmp_path, capsys):
    f = tmp_path / "d.jsonl"
    f.write_text(orjson.dumps(pair()).decode() + "\n\n" + '{"messages": [{"ro')
    rows = load_rows(str(f))
    assert len(rows) == 1 and rows.skipped == [(f"{f}:3", "the last line is cut off (a write was interrupted)")]
    assert f"{f}:3: the last line is cut off (a write was interrupted); it was skipped" in capsys.readouterr().out
    f.write_text(orjson.dumps(pair()).decode())  # complete, only the final newline missing: nothing skipped
    assert len(load_rows(str(f))) == 1 and not load_rows(str(f)).skipped


def test_response_ids_outside_the_vocabulary(tokenizer):
    from promptbake.data import Row
    from promptbake.teacher import build_examples

    for bad in (len(tokenizer), -1):
        row = Row(4, [{"role": "user", "content": "hi"}], "x", [1, bad, 2])
        with pytest.raises(UserError, match=rf"^d.jsonl:4: response_token_ids holds id {bad}, outside this "
                                            r"tokenizer's \d+ ids; regenerate the data with this model \(the ids "
                                            r"belong to another tokenizer\)$"):
            build_examples([row], tokenizer, "sys", "", 512, True, "d.jsonl")
    (ex,), _ = build_examples([row], tokenizer, "sys", "", 512, False, "d.jsonl")  # ids unused: text is tokenized
    assert ex.n_response > 0


def test_alpaca_input_is_part_of_the_prompt(tmp_path):
    f = write_lines(tmp_path / "a.jsonl", [
        {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
        {"instruction": "Name a colour.", "input": "", "output": "Red"}])
    rows = load_rows(f)
    assert [r.context[0]["content"] for r in rows] == ["Translate to French.\n\nGood morning", "Name a colour."]
    assert [r.response for r in rows] == ["Bonjour", "Red"]
