"""Chatting with a baked model: streamed answers, interactive turns, and side-by-side comparison."""

from __future__ import annotations

import sys

import torch
from transformers import TextStreamer

from .baked import latest_checkpoint, load_baked
from .chat import check_fits, model_context, render_prompt_ids, stop_ids
from .config import STRENGTH, TEMPERATURE, check_range, resolve_max_new_tokens
from .errors import UserError


def load_for_demo(cfg, checkpoint: str | None, strength: float, temperature: float = 0.0):
    check_range("--strength", strength, STRENGTH)
    check_range("--temperature", temperature, TEMPERATURE)
    path = checkpoint or latest_checkpoint(cfg.checkpoint_dir, cfg.name)
    model, tokenizer, info = load_baked(path, device=cfg.device, strength=strength, model_cache_dir=cfg.model_cache_dir)
    info = {**info, "target": info["targets"][0]["name"]}
    chain = "".join(f"{a['name']} -> " for a in info.get("lineage", []))
    print(f"checkpoint: {path}" + (f" (strength {strength:g})" if strength != 1.0 else "")
          + (f" | chain: base -> {chain}{info['config'].get('name')}" if chain else ""), file=sys.stderr)
    return model, tokenizer, info, path


def target_info(info: dict, name: str) -> dict:
    found = [t for t in info["targets"] if t["name"] == name]
    if not found:
        raise UserError(f"--target {name!r}: this checkpoint has targets {[t['name'] for t in info['targets']]}")
    return found[0]

def check_questions(model, tokenizer, info: dict, questions: list[str], cfg, target: str, with_prompt: bool = True,
                    where: str = "the command line") -> None:
    """Every question, with the prompt it will be sent with (the longest of the ways demo sends it) and the answer's
    --max_new_tokens, within the model's context: checked before anything is generated."""
    context = model_context(model)
    if context:
        contexts = [[{"role": "user", "content": q}] for q in questions]
        room = resolve_max_new_tokens(cfg.max_new_tokens, next(model.parameters()).device.type)  # -1: by device
        check_fits(tokenizer, contexts, _baked_system(info, with_prompt, target), context - room,
                   f"the model's context of {context} tokens less --max_new_tokens {room}", where)


@torch.inference_mode()
def stream_answer(model, tokenizer, messages: list[dict], system: str | None, cfg, temperature: float,
                  out=sys.stdout) -> str:
    """Generates one answer, printing tokens as they come; returns the text."""
    class Tee(TextStreamer):
        def __init__(self):
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self.text = ""

        def on_finalized_text(self, text: str, stream_end: bool = False):
            self.text += text
            print(text, end="" if not stream_end else "\n", flush=True, file=out)

    ids = torch.tensor([render_prompt_ids(tokenizer, messages, system)], device=next(model.parameters()).device)
    torch.manual_seed(cfg.seed)
    sampling = dict(do_sample=True, temperature=temperature, top_k=0) if temperature > 0 else \
        dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    streamer = Tee()
    max_new_tokens = resolve_max_new_tokens(cfg.max_new_tokens, ids.device.type)  # -1: by device
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                   pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_ids(tokenizer, model), streamer=streamer,
                   **sampling)
    return streamer.text.strip()

def _baked_system(info: dict, with_prompt: bool, name: str) -> str | None:
    target = target_info(info, name)
    if with_prompt:
        return target.get("teacher_prompt") or target["system_prompt"]
    return target.get("student_prompt") or None

def compare(model, tokenizer, info, question: str, cfg, temperature: float, target: str | None = None) -> dict:
    """The four models side by side: base and prompted base (the parent, for a chained bake), baked, and
    baked re-prompted with its own prompt."""
    target = target or info["targets"][0]["name"]
    system = _baked_system(info, True, target)
    start = "parent" if info.get("lineage") else "base"
    messages = [{"role": "user", "content": question}]
    out = {}
    print(f"\n=== user: {question}")
    with model.disable_adapter():
        print(f"\n--- {start} model, no prompt:")
        out["base"] = stream_answer(model, tokenizer, messages, None, cfg, temperature)
        print(f"\n--- {start} model, WITH the prompt:")
        out["prompted"] = stream_answer(model, tokenizer, messages, system, cfg, temperature)
    print("\n--- baked model, no prompt:")
    out["baked"] = stream_answer(model, tokenizer, messages, _baked_system(info, False, target), cfg, temperature)
    print("\n--- baked model, re-prompted with its prompt:")
    out["baked_reprompted"] = stream_answer(model, tokenizer, messages, system, cfg, temperature)
    return out

def chat(model, tokenizer, info, questions: list[str], cfg, temperature: float, with_prompt: bool = False,
         target: str | None = None) -> None:
    system = _baked_system(info, with_prompt, target or info["targets"][0]["name"])
    if questions:
        for q in questions:
            stream_answer(model, tokenizer, [{"role": "user", "content": q}], system, cfg, temperature)
        return
    print("chat with the baked model (no system prompt). /reset clears the history, /quit ends.")
    history: list[dict] = []
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return
        if line == "/quit":
            return
        if line == "/reset":
            history = []
            print("(history cleared)")
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        try:
            check_conversation(model, tokenizer, history, system, cfg)
        except UserError as e:  # one line, and the chat goes on without that turn
            history.pop()
            print(f"error: {e}")
            continue
        print("bot> ", end="", flush=True)
        history.append({"role": "assistant", "content": stream_answer(model, tokenizer, history, system, cfg, temperature)})


def check_conversation(model, tokenizer, history: list[dict], system: str | None, cfg) -> None:
    context = model_context(model)
    if context:
        room = resolve_max_new_tokens(cfg.max_new_tokens, next(model.parameters()).device.type)  # -1: by device
        check_fits(tokenizer, [history], system, context - room,
                   f"the model's context of {context} tokens less --max_new_tokens {room}",
                   "this conversation", "shorten it, or /reset to clear the history")
