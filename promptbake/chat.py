"""Chat rendering, in one place.

The teacher sees [system: the prompt, *context]; the student sees the context exactly as a user would send
it at inference, through the model's own template (SmolLM2's then adds its default system prompt, as it
does for every user who sends none). Both end with the generation prompt; the response's token ids are
appended unchanged, so the response sits at the end of both sequences.
"""

from __future__ import annotations


def render_prompt_ids(tokenizer, context: list[dict], system: str | None) -> list[int]:
    messages = ([{"role": "system", "content": system}] if system else []) + list(context)
    # enable_thinking=False: Qwen3-style templates emit an empty think block; others ignore the flag.
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def end_of_turn_id(tokenizer) -> int:
    """The token the model emits to end its turn (<|im_end|> for ChatML models)."""
    return tokenizer.eos_token_id


def stop_ids(tokenizer, model=None) -> list[int]:
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
    return sorted(i for i in ids if i is not None)


def response_ids_from_text(tokenizer, text: str, complete: bool = True) -> list[int]:
    """For responses that arrive as text (API, paired files). A complete turn ends with the end-of-turn
    token; a truncated one does not, so the student is never taught to stop where the teacher didn't."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids + [end_of_turn_id(tokenizer)] if complete else ids

