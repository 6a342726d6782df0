"""Prompt baking: turn a system prompt into LoRA weights.

The stages as a Python API (each script is a thin wrapper around one of these):

    from config import Config
    from promptbake import generate, bake, load_baked, evaluate

    cfg = Config(name="pirate", num_epochs=3)
    generate(cfg)                       # data/pirate.jsonl
    path = bake(cfg)                    # checkpoints/pirate/final
    model, tokenizer, info = load_baked(path)
    evaluate(cfg, str(path))            # eval.json
"""

import warnings

# peft calls a transformers method deprecated in v5; the warning is noise for users of this tool.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def generate(cfg, model=None, tokenizer=None):
    from .generate import generate as _generate

    return _generate(cfg, model, tokenizer)


def bake(cfg):
    from .train import bake as _bake

    return _bake(cfg)


def load_baked(path, model_name_or_path=None, device="auto", strength=1.0):
    from .baked import load_baked as _load_baked

    return _load_baked(path, model_name_or_path, device, strength)


def evaluate(cfg, checkpoint=None, queries=None, strengths=None, steps=False):
    from .evaluate import evaluate as _evaluate

    return _evaluate(cfg, checkpoint, queries, strengths, steps)


__all__ = ["generate", "bake", "load_baked", "evaluate"]
