"""Loading a baked checkpoint: the base model plus its LoRA adapter, checked to belong together."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from peft import PeftModel
from safetensors import SafetensorError

from . import model as models
from .config import given_settings
from .data import read_prompt
from .errors import UserError
from .io import read_json, sha256_text
from .lineage import BAKE_CONFIG, check_info, lineage_id, lineage_of, lineage_prompts, merge_chain


def latest_checkpoint(checkpoint_dir: str, name: str | None = None) -> Path:
    """checkpoints/<name>/final, else the newest final or step-N under checkpoints/."""
    root = Path(checkpoint_dir)
    runs = [root / name] if name and (root / name).is_dir() else [p for p in root.iterdir() if p.is_dir()] \
        if root.is_dir() else []
    found = [c for run in runs for c in [run / "final", *sorted(run.glob("step-*"))] if (c / BAKE_CONFIG).exists()]
    if not found:
        raise UserError(f"no baked checkpoint under {root}/; run `python bake.py` first, or pass --checkpoint PATH")
    finals = [c for c in found if c.name == "final"]
    return max(finals or found, key=lambda c: c.stat().st_mtime)


def read_bake_config(path: str | Path) -> dict:
    path = Path(path)
    if not (path / "adapter_config.json").exists() or not (path / BAKE_CONFIG).exists():
        raise UserError(f"{path}: not a baked adapter (it needs adapter_config.json and {BAKE_CONFIG}); "
                        f"pass a checkpoints/<run>/final or step-N folder")
    return check_info(read_json(path / BAKE_CONFIG), path / BAKE_CONFIG)


def set_strength(model, strength: float) -> None:
    """Scales every LoRA update: 0 = base, 1 = baked, between = half-baked, > 1 = over-baked."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name in module.scaling:
                # peft's own initial scale times `strength`: alpha / r, or alpha / sqrt(r) for rsLoRA
                module.set_scale(name, strength)


def load_baked(path: str | Path, model_name_or_path: str | None = None, device: str = "auto",
               strength: float = 1.0, model_cache_dir: str = ""):
    """Returns (peft model, tokenizer, bake config) for a baked checkpoint folder."""
    info = read_bake_config(path)
    baked_on = info["config"]["model_name_or_path"]
    if model_name_or_path and model_name_or_path != baked_on:
        raise UserError(f"{path} was baked on {baked_on!r}, not {model_name_or_path!r}; load it with "
                        f"--model_name_or_path {baked_on}")
    device = models.pick_device(device)
    base_path = models.resolve_model_path(baked_on, model_cache_dir or info["config"].get("model_cache_dir", ""))
    tokenizer = models.load_tokenizer(base_path, info["config"].get("trust_remote_code", False))
    base = models.load_model(base_path, device, info["config"].get("trust_remote_code", False))
    want = info.get("base_config_sha256")
    if want and want != model_config_sha256(base):
        raise UserError(f"{path} was baked on a base model with another architecture than {base_path}")
    if info.get("lineage"):
        base = merge_chain(base, info["lineage"], Path(path))
    try:
        model = PeftModel.from_pretrained(base, str(path))
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        raise UserError(f"{path}: the adapter does not load onto {base_path} ({(str(e).splitlines() or [''])[0]}); "
                        f"bake it again, or use another step-N folder") from None
    model.eval()
    if strength != 1.0:
        set_strength(model, strength)
    return model, tokenizer, info


def with_parent_model(cfg):
    """With --init_from, the base model is the parent checkpoint's: the config says so before anything is saved."""
    if not cfg.init_from:
        return cfg
    info = read_bake_config(cfg.init_from)
    baked_on = info["config"]["model_name_or_path"]
    default = next(f.default for f in dataclasses.fields(cfg) if f.name == "model_name_or_path")
    chosen = cfg.model_name_or_path != default or "model_name_or_path" in given_settings(cfg)
    if chosen and cfg.model_name_or_path != baked_on:  # an explicit `embedded` too: never silently replaced
        raise UserError(f"--init_from {cfg.init_from} was baked on {baked_on!r}, not {cfg.model_name_or_path!r}; "
                        f"drop --model_name_or_path, or set it to {baked_on}")
    return dataclasses.replace(cfg, model_name_or_path=baked_on,
                               trust_remote_code=info["config"].get("trust_remote_code", cfg.trust_remote_code))


def check_parent_outside_run(cfg) -> None:
    """A fresh bake moves checkpoints/<name> aside: a parent (or an ancestor of it) inside that folder would be moved
    from under the new checkpoint, which would then name itself as its own parent. Refused before any work."""
    if not cfg.init_from:
        return
    run = (Path(cfg.checkpoint_dir) / cfg.name).resolve()
    lineage = read_bake_config(cfg.init_from).get("lineage", [])
    for ckpt in [cfg.init_from, *(a["checkpoint"] for a in lineage)]:
        where = Path(ckpt).resolve()
        if where == run or run in where.parents:
            whose = "" if ckpt == cfg.init_from else f", an ancestor of {cfg.init_from},"
            raise UserError(f"--init_from: {ckpt}{whose} lies in {Path(cfg.checkpoint_dir) / cfg.name}, the run this "
                            f"bake writes (and moves aside first); pick another --name")


def teacher_system(cfg, prompt_file: str) -> str:
    """The system prompt the teacher reads for `prompt_file`: the prompt itself, or on a baked model (--init_from)
    with chain_teacher = lineage, every prompt of the chain, oldest first, then the new one. A baked model learnt
    its behaviour in contexts with no system prompt, and a new system prompt takes the place of the template's
    default one there, so the earlier behaviour can fade from the teacher's answers; with its own prompts again the
    parent shows it more strongly, at the cost of the new behaviour when the prompts compete (README: knight on
    pirate, measured both ways)."""
    new = read_prompt(prompt_file)
    if not cfg.init_from or cfg.chain_teacher == "new":
        return new
    earlier = [t["system_prompt"] for t in lineage_prompts(read_bake_config(cfg.init_from)) if t.get("system_prompt")]
    return "\n\n".join(dict.fromkeys([*earlier, new]))  # a prompt baked again (Prompt Pursuit) is read once


def load_start(cfg, place: bool = True):
    """The model a bake or a generation starts from: the base model, or with --init_from the parent
    checkpoint's whole chain merged in (its teacher is that model with the new prompt).
    Returns (model, tokenizer, model identity, device, lineage); the identity names the chain too.
    place=False leaves the model in CPU memory (models.load_model): for FSDP, which places the shards itself."""
    model, tokenizer, path, device = models.load(cfg, place)
    if not cfg.init_from:
        return model, tokenizer, model_identity(path, []), device, []
    parent = Path(cfg.init_from)
    info = read_bake_config(parent)
    if info.get("base_config_sha256") not in (None, model_config_sha256(model)):
        raise UserError(f"--init_from {parent} was baked on a base model with another architecture than {path}")
    lineage = lineage_of(parent, info)
    model = merge_chain(model, lineage, None)
    print(f"starting from {parent}: the base model with {len(lineage)} baked adapter(s) merged in "
          f"({' -> '.join(a['name'] for a in lineage)})")
    return model, tokenizer, model_identity(path, lineage), device, lineage


def model_identity(path: str, lineage: list[dict]) -> str:
    """Names the model a teacher runs: the base model's folder, plus the hash of a baked chain merged into it.
    The generator (data/<name>.meta.json, stored top-K) and the teacher cache compare exactly this."""
    return f"{path}+lineage:{lineage_id(lineage)}" if lineage else path


def model_config_sha256(model) -> str:
    cfg = model.config.to_dict()
    keep = {k: cfg.get(k) for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size",
                                    "num_attention_heads", "num_key_value_heads", "intermediate_size")}
    return sha256_text(repr(sorted(keep.items())))
