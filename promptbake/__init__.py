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

from .baked import load_baked  # noqa: E402
from .config import Config, apply_env_defaults  # noqa: E402
from .evaluate import evaluate  # noqa: E402
from .generate import generate  # noqa: E402
from .train import bake  # noqa: E402

__all__ = ["Config", "apply_env_defaults", "generate", "bake", "load_baked", "evaluate"]
