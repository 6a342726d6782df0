"""What a prompt demands, stated beside it and scored on every answer (the checks contract, notes in README).

A prompt file may open with YAML front matter; its `checks:` list is what the prompt demands. The front matter is
never part of the baked prompt (data.read_prompt returns the body). A config's `checks:` (top level, or per target)
wins over the front matter.

    ---
    checks:
      - starts_with: "Arr!"
      - matches: "\\b(arr+|matey|aye)\\b"
        name: "pirate words"
      - contains: "1987"
        when: "\\b(founded|year)\\b"      # applies only to questions matching this regex
    ---
    You are a pirate. ...
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

# kind -> what its value must be: a text, a regex, or a positive whole number
KINDS = {"starts_with": "text", "ends_with": "text", "contains": "text", "refusal": "text",
         "matches": "regex", "never_matches": "regex", "max_words": "count", "max_sentences": "count"}
OPTIONAL_KEYS = {"when", "name"}
# what an answer may open with before its first word: whitespace, quotes, markdown emphasis/headings/bullets
LEADING_NOISE = re.compile(r"^[\s\"'“”‘’`*_#>\-]+")
SENTENCE_END = re.compile(r"[.!?…]+(?=\s|$)")


@dataclass(frozen=True)
class Check:
    kind: str
    value: object
    name: str
    when: str = ""  # a question regex; "" = every question

    def applies(self, question: str) -> bool:
        return not self.when or re.search(self.when, question, flags=re.I) is not None

    def passes(self, answer: str) -> bool:
        return PASSES[self.kind](answer, self.value)

    def as_dict(self) -> dict:
        """The contract's own form ({kind: value, name, when?}): parse_check reads it back."""
        return {self.kind: self.value, "name": self.name, **({"when": self.when} if self.when else {})}


def _norm(text: str) -> str:
    return " ".join(text.split()).lower()


def count_sentences(text: str) -> int:
    """Sentence ends (. ! ? …) followed by a space or the end; a last sentence with no end mark counts too."""
    text = text.strip()
    if not text:
        return 0
    ends = list(SENTENCE_END.finditer(text))
    return len(ends) + (0 if ends and ends[-1].end() == len(text) else 1)


PASSES = {
    "starts_with": lambda a, v: _norm(LEADING_NOISE.sub("", a)).startswith(_norm(v)),
    "ends_with": lambda a, v: _norm(a.rstrip()).endswith(_norm(v)),
    "contains": lambda a, v: _norm(v) in _norm(a),
    "refusal": lambda a, v: _norm(LEADING_NOISE.sub("", a)).startswith(_norm(v)),
    "matches": lambda a, v: re.search(v, a, flags=re.I) is not None,
    "never_matches": lambda a, v: re.search(v, a, flags=re.I) is None,
    "max_words": lambda a, v: len(a.split()) <= v,
    "max_sentences": lambda a, v: count_sentences(a) <= v,
}


def _short(value, n: int = 30) -> str:
    text = str(value)
    return text if len(text) <= n else text[:n - 3] + "..."


def parse_check(item, where: str) -> Check:
    """One check from its dict form; a mistake is one line naming `where` and the fix."""
    if not isinstance(item, dict):
        raise UserError(f"{where}: a check is a mapping like `- starts_with: \"Arr!\"`, got {_short(repr(item), 60)}")
    kind = _check_kind(item, where)
    value = _check_value(kind, item[kind], where)
    when = item.get("when") or ""
    if not isinstance(when, str):
        raise UserError(f"{where}: `when` must be a regular expression (text), got {when!r}")
    _check_regex(when, f"{where}: `when`")
    name = item.get("name")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise UserError(f"{where}: `name` must be a non-empty text, got {name!r}")
    return Check(kind, value, name.strip() if name else f"{kind} {_short(value)}", when)


def _check_kind(item: dict, where: str) -> str:
    """The one KINDS key of a check; unknown keys are reported before a missing or second kind."""
    kinds = [k for k in item if k in KINDS]
    unknown = sorted(set(item) - set(KINDS) - OPTIONAL_KEYS)
    if unknown:
        raise UserError(f"{where}: unknown check key(s) {unknown}; a check has one of {', '.join(KINDS)} "
                        f"and optionally `when` (a question regex) and `name`")
    if len(kinds) != 1:
        raise UserError(f"{where}: a check needs exactly one of {', '.join(KINDS)}, got {kinds or 'none'}")
    return kinds[0]


def _check_value(kind: str, value, where: str):
    """A count stays a whole number (>= 1, not a bool); a text or regex becomes text (YAML reads `1987` as a number),
    and a regex must compile."""
    if KINDS[kind] == "count":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{where}: `{kind}` must be a whole number of at least 1, got {value!r}")
        return value
    if not isinstance(value, (str, int, float)) or isinstance(value, bool) or not str(value).strip():
        raise UserError(f"{where}: `{kind}` needs a non-empty text, got {value!r}")
    if KINDS[kind] == "regex":
        _check_regex(str(value), f"{where}: `{kind}`")
    return str(value)


def _check_regex(regex: str, what: str) -> None:
    try:
        re.compile(regex)
    except re.error as e:
        raise UserError(f"{what} {regex!r} is not a valid regular expression ({e}); fix it (in YAML, write "
                        f"backslashes twice inside double quotes)") from None


def parse_checks(items, where: str) -> list[Check]:
    if not isinstance(items, list):
        raise UserError(f"{where}: `checks` must be a list of checks (`- starts_with: ...` lines), got "
                        f"{_short(repr(items), 60)}")
    checks = [parse_check(item, f"{where}: checks[{i}]") for i, item in enumerate(items)]
    names = [c.name for c in checks]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise UserError(f"{where}: two checks are named {dup!r}; give each a distinct `name`")
    return checks


def split_front_matter(text: str, path: str) -> tuple[dict, str]:
    """(front matter, body) of a prompt file's text. Front matter opens with a `---` line and closes with the next;
    text without it is all body."""
    lines = text.split("\n")
    if not lines or lines[0].strip() != "---":
        return {}, text
    end = next((i for i in range(1, len(lines)) if lines[i].strip() == "---"), None)
    if end is None:
        raise UserError(f"{path}:1: the front matter opened by `---` is never closed; add a `---` line after it")
    import yaml

    try:
        meta = yaml.safe_load("\n".join(lines[1:end])) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f":{mark.line + 2}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{path}{at}: the front matter is not valid YAML ({problem}); fix that line") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path}:2: the front matter must be a mapping, e.g. `checks:` then `- starts_with: ...`")
    return meta, "\n".join(lines[end + 1:])


def front_matter_checks(prompt_file: str) -> list[Check]:
    """The checks of a prompt file's front matter ([] when the file or its front matter is missing)."""
    from .io import read_text

    if not prompt_file or not Path(prompt_file).is_file():
        return []
    meta, _ = split_front_matter(read_text(prompt_file), prompt_file)
    unknown = sorted(set(meta) - {"checks"})
    if unknown:
        raise UserError(f"{prompt_file}: unknown front matter key(s) {unknown}; the front matter holds `checks:`")
    return parse_checks(meta.get("checks", []), prompt_file)


def marker_checks(markers: list[str], regex: str) -> list[Check]:
    """The older `marker_regex` / `markers` settings, as checks, when a user or a target set them."""
    if regex:
        return [Check("matches", regex, "marker_regex")]
    if markers:
        return [Check("matches", "|".join(re.escape(m) for m in markers), "markers")]
    return []


def load_checks(cfg, target: dict) -> list[Check]:
    """A target's checks: its own `checks` (config targets[] or recorded at bake time), else the config's `checks`,
    else the front matter of its prompt file. A `marker_regex` the target declares (or the user set) comes after."""
    name = target.get("name") or "default"
    if target.get("checks"):
        checks = parse_checks(target["checks"], f"target {name!r} `checks`")
    elif getattr(cfg, "checks", None):
        checks = parse_checks(cfg.checks, "config `checks`")
    else:
        checks = front_matter_checks(target.get("prompt_file") or "")
    markers = marker_checks(cfg.markers, target.get("marker_regex") or cfg.marker_regex)
    return checks + [m for m in markers if m.name not in {c.name for c in checks}]


def score_answer(question: str, answer: str, checks: list[Check]) -> dict[str, bool | None]:
    """Per check name: passes, or None when its `when` does not match the question."""
    return {c.name: (c.passes(answer) if c.applies(question) else None) for c in checks}


def follows_all(scores: dict[str, bool | None]) -> bool | None:
    """Every applicable check passes; None when none applies."""
    applied = [v for v in scores.values() if v is not None]
    return all(applied) if applied else None
