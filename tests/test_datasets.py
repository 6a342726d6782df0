"""Hugging Face datasets as prompt sources: read exactly like JSONL files, offline (save_to_disk folders)."""

import orjson
import pytest

from promptbake.data import load_prompts
from promptbake.errors import UserError

datasets = pytest.importorskip("datasets")


def chat(q, a=None, system=None):
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": q}]
    return {"messages": msgs + ([{"role": "assistant", "content": a}] if a is not None else [])}


CHAT_ROWS = [chat("hi", "Arr!"), chat("who are you?", "A pirate, arr.")]
PROMPT_ROWS = [{"question": "What is rice?"}, {"question": "Why is the sea salty?"}]
FLAT_PAIRS = [{"prompt": "hi", "response": "Arr!"}, {"prompt": "bye", "response": "Fair winds."}]


def save(tmp_path, rows, as_dict: bool, name="ds") -> str:
    ds = datasets.Dataset.from_list(rows)
    folder = tmp_path / name
    (datasets.DatasetDict({"train": ds}) if as_dict else ds).save_to_disk(str(folder))
    return str(folder)


def as_jsonl(tmp_path, rows) -> str:
    f = tmp_path / "same.jsonl"
    f.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return str(f)


@pytest.mark.parametrize("as_dict", [True, False])
@pytest.mark.parametrize("rows", [CHAT_ROWS, FLAT_PAIRS], ids=["messages", "prompt_response"])
def test_paired_dataset_reads_like_the_same_jsonl(tmp_path, rows, as_dict):
    got = load_prompts(save(tmp_path, rows, as_dict))
    want = load_prompts(as_jsonl(tmp_path, rows))
    assert [(r.line, r.context, r.response, r.complete) for r in got] == \
           [(r.line, r.context, r.response, r.complete) for r in want]
    assert all(r.response for r in got)


@pytest.mark.parametrize("as_dict", [True, False])
@pytest.mark.parametrize("rows", [PROMPT_ROWS, [chat("What is rice?"), chat("Why is the sea salty?")]],
                         ids=["question", "messages"])
def test_prompt_only_dataset_gives_prompt_rows(tmp_path, rows, as_dict):
    got = load_prompts(save(tmp_path, rows, as_dict))
    questions = ("What is rice?", "Why is the sea salty?")
    assert [r.context for r in got] == [[{"role": "user", "content": q}] for q in questions]
    assert all(r.response is None for r in got)


def test_system_messages_refused_unless_stripped(tmp_path):
    folder = save(tmp_path, [CHAT_ROWS[0], chat("q", "Arr!", system="secret")], as_dict=True)
    with pytest.raises(UserError, match=r"dataset .*ds: row 2: the row has a system message.*--strip_system"):
        load_prompts(folder)
    rows = load_prompts(folder, strip_system=True)
    assert rows[1].context == [{"role": "user", "content": "q"}] and rows[1].response == "Arr!"


def test_empty_answers_in_a_dataset_are_skipped(tmp_path):
    rows = load_prompts(save(tmp_path, [*CHAT_ROWS, chat("q", "")], as_dict=False))
    assert len(rows) == 2 and [s.where.rsplit(": ", 1)[1] for s in rows.skipped] == ["row 3"]


def test_dataset_id_without_a_slash(monkeypatch, tmp_path):
    asked = []

    def fake_load_dataset(name, split=None):
        asked.append((name, split))
        return datasets.Dataset.from_list(FLAT_PAIRS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.chdir(tmp_path)
    rows = load_prompts("squad")
    assert asked == [("squad", "train")] and [r.response for r in rows] == ["Arr!", "Fair winds."]


def test_unloadable_dataset_id_is_one_line(monkeypatch, tmp_path):
    def offline(name, split=None):
        raise ConnectionError("Couldn't reach the Hub\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"^'squad' is not a file here, and loading it as a Hugging Face dataset failed "
                                        r"\(Couldn't reach the Hub\); without a network, save the dataset") as e:
        load_prompts("squad")
    assert "\n" not in str(e.value)
