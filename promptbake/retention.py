"""What baking costs: questions where the system prompt should not change the content (arithmetic, facts).

The baked model should answer them as well as the base model does. `retention()` reports both accuracies,
answered greedily without any prompt, and the full-vocabulary KL from the base to the baked model on the
base's own answers (how far baking moved the model where it had no reason to).
"""

from __future__ import annotations

import re

from .chat import render_prompt_ids
from .data import Row
from .generate import decode_response, generate_ids
from .metrics import kl_and_agreement
from .teacher import build_examples

# (question, regex an answer must match, any case). Chosen so that the embedded SmolLM2-135M answers many, not
# all, of them correctly: a drop in accuracy after baking is visible either way.
QUESTIONS = [
    ("What is 2 + 3?", r"\b5\b|\bfive\b"), ("What is 6 times 7?", r"\b42\b"), ("What is 100 divided by 4?", r"\b25\b"),
    ("What is half of 20?", r"\b10\b|\bten\b"), ("What is 3 times 4?", r"\b12\b|\btwelve\b"),
    ("What is 7 + 8?", r"\b15\b|\bfifteen\b"), ("What is 10 - 4?", r"\b6\b|\bsix\b"), ("What is 5 + 5?", r"\b10\b|\bten\b"),
    ("What is the capital of France?", r"\bparis\b"), ("What is the capital of Japan?", r"\btokyo\b"),
    ("What is the capital of Germany?", r"\bberlin\b"), ("What is the capital of Italy?", r"\brome\b"),
    ("What is the capital of Spain?", r"\bmadrid\b"), ("How many days are in a week?", r"\b7\b|\bseven\b"),
    ("How many hours are in a day?", r"\b24\b"), ("How many months are in a year?", r"\b12\b|\btwelve\b"),
    ("What is the largest ocean on Earth?", r"\bpacific\b"), ("What is the chemical symbol for water?", r"\bh2o\b"),
    ("What is the opposite of hot?", r"\bcold\b"), ("What is the closest star to Earth?", r"\bsun\b|proxima"),
    ("Who wrote Romeo and Juliet?", r"shakespeare"), ("How many legs does a spider have?", r"\b8\b|\beight\b"),
    ("What is the freezing point of water in Celsius?", r"\b0\b|\bzero\b"),
    ("How many continents are there?", r"\b7\b|\bseven\b"),
]
MAX_NEW_TOKENS = 48


def accuracy(texts: list[str]) -> float:
    return sum(re.search(regex, t, flags=re.I) is not None for (_, regex), t in zip(QUESTIONS, texts)) / len(QUESTIONS)


def retention(model, tokenizer, max_seq_len: int) -> dict:
    """Accuracy of base and baked (adapter on, no prompt) on QUESTIONS, and KL(base || baked) on the base's answers."""
    contexts = [[{"role": "user", "content": q}] for q, _ in QUESTIONS]
    prompts = [render_prompt_ids(tokenizer, c, None) for c in contexts]
    with model.disable_adapter():
        base = generate_ids(model, tokenizer, prompts, temperature=0, max_new_tokens=MAX_NEW_TOKENS)
    baked = generate_ids(model, tokenizer, prompts, temperature=0, max_new_tokens=MAX_NEW_TOKENS)
    rows = [Row(i, c, None, ids, complete) for i, (c, (ids, complete)) in enumerate(zip(contexts, base), 1)]
    examples, _ = build_examples(rows, tokenizer, "", "", max_seq_len, True, "retention questions")
    kl, agreement = kl_and_agreement(model, examples, tokenizer.pad_token_id)
    base_texts = [decode_response(tokenizer, ids) for ids, _ in base]
    baked_texts = [decode_response(tokenizer, ids) for ids, _ in baked]
    return {"questions": len(QUESTIONS), "accuracy_base": accuracy(base_texts), "accuracy_baked": accuracy(baked_texts),
            "kl_base_to_baked": kl, "top1_agreement": agreement,
            "examples": [{"question": q, "base": b, "baked": k} for (q, _), b, k in zip(QUESTIONS[:4], base_texts, baked_texts)]}
