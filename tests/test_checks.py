"""The checks a prompt declares (promptbake/checks.py): front matter, each kind, `when`, errors."""

import pytest

from promptbake.checks import Check, count_sentences, follows_all, load_checks, parse_checks, score_answer, split_front_matter
from promptbake.config import Config, ConfigError, from_dict
from promptbake.data import read_prompt
from promptbake.errors import UserError

PIRATE = '''---
checks:
  - starts_with: "Arr!"
  - matches: "\\\\b(arr+|matey|aye)\\\\b"
    name: pirate words
---
You are a pirate. Always begin every reply with "Arr!".
'''


def test_front_matter_is_split_and_never_part_of_the_prompt(tmp_path):
    p = tmp_path / "prompt.md"
    p.write_text(PIRATE)
    meta, body = split_front_matter(PIRATE, str(p))
    assert [list(c)[0] for c in meta["checks"]] == ["starts_with", "matches"]
    assert body.strip().startswith("You are a pirate.")
    assert read_prompt(str(p)) == 'You are a pirate. Always begin every reply with "Arr!".'


def test_text_without_front_matter_is_all_body(tmp_path):
    assert split_front_matter("You are kind.\n---\nmore", "p.md") == ({}, "You are kind.\n---\nmore")


def test_unclosed_or_bad_front_matter_is_one_line_naming_the_file(tmp_path):
    with pytest.raises(UserError, match=r"p\.md:1: .*never closed"):
        split_front_matter("---\nchecks: []\nYou are kind.", "p.md")
    with pytest.raises(UserError, match=r"p\.md:3: the front matter is not valid YAML"):
        split_front_matter("---\nchecks:\n  - starts_with: [unclosed\n---\nbody", "p.md")


def test_a_prompt_that_is_only_front_matter_is_refused(tmp_path):
    p = tmp_path / "prompt.md"
    p.write_text("---\nchecks: []\n---\n\n")
    with pytest.raises(UserError, match="below the front matter"):
        read_prompt(str(p))


@pytest.mark.parametrize("check, answer, expected", [
    ({"starts_with": "Arr!"}, '  "**Arr!** Ahoy there', True),
    ({"starts_with": "Arr!"}, "Well, arr!", False),
    ({"ends_with": "Cheers, Ada"}, "Done.\nCheers, ada  ", True),
    ({"ends_with": "Cheers, Ada"}, "Cheers, Ada. Bye", False),
    ({"contains": "1987"}, "It was founded in 1987.", True),
    ({"contains": "1987"}, "It was founded in 1988.", False),
    ({"matches": r"\bmatey\b"}, "Ahoy, MATEY!", True),
    ({"matches": r"\bmatey\b"}, "Ahoy, mateys!", False),
    ({"never_matches": r"\bas an ai\b"}, "As an AI, I cannot", False),
    ({"never_matches": r"\bas an ai\b"}, "Sure thing.", True),
    ({"max_words": 3}, "one two three", True),
    ({"max_words": 3}, "one two three four", False),
    ({"max_sentences": 1}, "Paris is the capital of France.", True),
    ({"max_sentences": 1}, "Paris. It is in France.", False),
    ({"max_sentences": 1}, "It is 3.5 km long", True),
    ({"refusal": "I can only help with billing questions."}, "I can only help with  billing questions.", True),
    ({"refusal": "I can only help with billing questions."}, "Sure, here is a poem.", False),
])
def test_each_kind(check, answer, expected):
    (c,) = parse_checks([check], "test")
    assert c.passes(answer) is expected


def test_when_limits_a_check_to_matching_questions():
    checks = parse_checks([{"contains": "1987", "when": r"\b(founded|year)\b"}, {"max_words": 50, "name": "short"}],
                          "test")
    assert score_answer("When was it founded?", "In 1987.", checks) == {"contains 1987": True, "short": True}
    assert score_answer("What colour is it?", "Blue.", checks) == {"contains 1987": None, "short": True}
    assert follows_all({"a": None, "b": None}) is None
    assert follows_all({"a": None, "b": False}) is False


def test_sentence_count():
    assert count_sentences("") == 0
    assert count_sentences("One. Two! Three?") == 3
    assert count_sentences("One. Two") == 2


@pytest.mark.parametrize("bad, message", [
    ({"begins_with": "x"}, r"unknown check key\(s\) \['begins_with'\]"),
    ({"matches": "(unclosed"}, "not a valid regular expression"),
    ({"max_words": 0}, "at least 1"),
    ({"max_words": "ten"}, "whole number"),
    ({"starts_with": "a", "ends_with": "b"}, "exactly one of"),
    ({"contains": "x", "when": "[bad"}, "`when`"),
    ("starts_with: Arr", "a check is a mapping"),
])
def test_bad_checks_are_one_line_naming_the_place(bad, message):
    with pytest.raises(UserError, match=message) as e:
        parse_checks([bad], "prompt.md")
    assert str(e.value).startswith("prompt.md: checks[0]") or "prompt.md" in str(e.value)
    assert "\n" not in str(e.value)


def test_config_checks_are_validated_with_the_setting_named():
    with pytest.raises(ConfigError, match=r"cfg\.yaml: checks\[0\]: `max_words` must be"):
        from_dict({"checks": [{"max_words": -2}]}, "cfg.yaml")
    with pytest.raises(ConfigError, match=r"targets\[0\].*unknown check key"):
        from_dict({"targets": [{"prompt_file": "p.md", "checks": [{"start": "x"}]}]}, "cfg.yaml")
    assert from_dict({"targets": [{"prompt_file": "p.md", "checks": [{"max_words": 5}]}]}, "c").targets[0]["checks"]


def test_load_checks_order_config_then_front_matter(tmp_path):
    p = tmp_path / "prompt.md"
    p.write_text(PIRATE)
    cfg = Config(prompt_file=str(p))
    assert [c.name for c in load_checks(cfg, {"prompt_file": str(p)})] == ["starts_with Arr!", "pirate words"]
    cfg.checks = [{"max_words": 9}]
    assert [c.name for c in load_checks(cfg, {"prompt_file": str(p)})] == ["max_words 9"]
    own = load_checks(cfg, {"prompt_file": str(p), "checks": [{"contains": "x"}]})
    assert [c.kind for c in own] == ["contains"]


def test_the_pirate_marker_regex_is_never_applied_to_another_prompt(tmp_path):
    p = tmp_path / "support.md"
    p.write_text("You are a support agent for Acme.")
    assert Config().marker_regex == ""
    assert load_checks(Config(), {"prompt_file": str(p)}) == []
    # set explicitly, by the user or a target, it becomes one more check
    (c,) = load_checks(Config(marker_regex=r"\bacme\b"), {"prompt_file": str(p)})
    assert c == Check("matches", r"\bacme\b", "marker_regex")
    (c,) = load_checks(Config(markers=["a.b"]), {"prompt_file": str(p)})
    assert c.passes("xa.by") and not c.passes("axb")


def test_check_dicts_round_trip():
    checks = parse_checks([{"contains": "x", "when": "y", "name": "n"}, {"max_words": 3}], "t")
    assert parse_checks([c.as_dict() for c in checks], "t") == checks


def test_the_shipped_prompts_declare_checks():
    cfg = Config()
    for path in ("prompt.md", "examples/personas/knight.md"):
        checks = load_checks(cfg, {"prompt_file": path})
        assert "matches" in {c.kind for c in checks}, path
        assert "---" not in read_prompt(path)
