"""Chat rendering, in one place.

The teacher sees [system: the prompt, *context]; the student sees the context exactly as a user would send
it at inference, through the model's own template (SmolLM2's then adds its default system prompt, as it
does for every user who sends none). Both end with the generation prompt; the response's token ids are
appended unchanged, so the response sits at the end of both sequences.
"""

from __future__ import annotations

import weakref

from jinja2.exceptions import TemplateError

from .errors import UserError

_FOLDED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizers whose template refused a system turn


def render_prompt_ids(tokenizer, context: list[dict], system: str | None) -> list[int]:
    """[system?, *context] through the model's template, with the generation prompt. A template that refuses a
    system turn (Gemma 2: "System role not supported") gets the prompt at the start of the first user turn, as
    Gemma 3's own template puts it; any other refusal stops with the template's reason."""
    messages = ([{"role": "system", "content": system}] if system else []) + list(context)
    try:
        text = _render(tokenizer, messages)
    except TemplateError as e:
        if not system or not context or context[0]["role"] != "user":
            raise _refused(tokenizer, e) from None
        folded = [{"role": "user", "content": f"{system}\n\n{context[0]['content']}"}, *context[1:]]
        try:
            text = _render(tokenizer, folded)
        except TemplateError:
            raise _refused(tokenizer, e) from None
        if tokenizer not in _FOLDED:
            _FOLDED[tokenizer] = True
            print(f"note: the chat template of {tokenizer.name_or_path} refuses a system turn ({e}); the system "
                  f"prompt is put at the start of the first user turn instead", flush=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _render(tokenizer, messages: list[dict]) -> str:
    # enable_thinking=False: Qwen3-style templates emit an empty think block; others ignore the flag.
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)


def _refused(tokenizer, e: Exception) -> UserError:
    return UserError(f"{tokenizer.name_or_path}: the chat template refuses this conversation: {e}; fix the row "
                     f"(most templates need user and assistant turns to alternate) or the template")


_END_OF_TURN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> (template, id), ours not its
_PROBE = "Zq7wPONG"  # an assistant message no template changes


def end_of_turn_id(tokenizer) -> int:
    """The token the model emits to end its turn, read from its chat template: the first special token the
    template writes after an assistant message (<|im_end|> for ChatML, <|eot_id|> for Llama 3, <end_of_turn>
    for Gemma, <|end|> for Phi-3, </s> for Mistral). Often not the tokenizer's eos (Gemma's eos is <eos>).
    The tokenizer's eos when the template writes none."""
    cached = _END_OF_TURN.get(tokenizer)
    if cached is not None and cached[0] == tokenizer.chat_template:
        return cached[1]
    found = _end_of_turn_from_template(tokenizer)
    eot = found if found is not None else tokenizer.eos_token_id
    _END_OF_TURN[tokenizer] = (tokenizer.chat_template, eot)
    return eot


def _end_of_turn_from_template(tokenizer) -> int | None:
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}]
    for extra in ([], [{"role": "user", "content": "Again"}]):  # some templates close a turn only before the next
        try:
            text = tokenizer.apply_chat_template(turns + extra, tokenize=False, enable_thinking=False)
        except Exception:  # noqa: BLE001 - a template may refuse this conversation; then eos it is
            continue
        if _PROBE not in text:
            continue
        after = text.split(_PROBE, 1)[1].split("Again", 1)[0]
        ids = tokenizer(after, add_special_tokens=False)["input_ids"]
        first = next((i for i in ids if i in special), None)
        if first is not None:
            return first
    return None


def stop_ids(tokenizer, model=None) -> list[int]:
    """Every token that ends a generated turn: the template's end-of-turn, the tokenizer's and the model's eos."""
    ids = {tokenizer.eos_token_id, end_of_turn_id(tokenizer)}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
    return sorted(i for i in ids if i is not None)


def response_ids_from_text(tokenizer, text: str, complete: bool = True) -> list[int]:
    """For responses that arrive as text (API, paired files). A complete turn ends with the end-of-turn
    token; a truncated one does not, so the student is never taught to stop where the teacher didn't."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids + [end_of_turn_id(tokenizer)] if complete else ids



def model_context(model) -> int | None:
    """The most tokens the model reads at once (max_position_embeddings), or None when its config does not say."""
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None)


def check_fits(tokenizer, contexts: list[list[dict]], system: str | None, room: int, over: str, where: str,
               fix: str = "shorten it") -> None:
    """Refuses, before anything is sampled, a query whose prompt (rendered with `system`) is over `room` tokens:
    a 100k-character query would otherwise be sampled for minutes before a later step refuses it."""
    for i, context in enumerate(contexts, 1):
        n = len(render_prompt_ids(tokenizer, context, system))
        if n > room:
            text = str(context[-1].get("content", "")) if context else ""
            preview = text[:30] + ("..." if len(text) > 30 else "")
            raise UserError(f"{where}: query {i} ({preview!r}) is {n} tokens as the model reads it, over {over}; {fix}")
