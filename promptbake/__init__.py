"""Prompt baking: turn a system prompt into LoRA weights.

The stages as a Python API (each script is a thin wrapper around one of these):

    from promptbake import Config, generate, bake, load_baked, evaluate

    cfg = Config(name="pirate", num_epochs=3)
    generate(cfg)                       # data/pirate.jsonl
    path = bake(cfg)                    # checkpoints/pirate/final
    model, tokenizer, info = load_baked(path)
    evaluate(cfg, str(path))            # eval.json

A Config built in Python reads no environment; `apply_env_defaults(cfg)` fills api_base_url and api_model from
API_BASE_URL / API_MODEL as the scripts do.
"""

import warnings

# peft calls a transformers method deprecated in v5; the warning is noise for users of this tool.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

# Imported on first use (PEP 562), not here: `import promptbake.config` must not pay for torch, transformers
# and peft (seconds), so that a bad setting prints its one line at once.
_EXPORTS = {"Config": "config", "apply_env_defaults": "config", "generate": "generate", "bake": "stages",
            "load_baked": "baked", "evaluate": "evaluate"}

__all__ = ["Config", "apply_env_defaults", "generate", "bake", "load_baked", "evaluate"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'promptbake' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
