"""Every common model family through the whole pipeline: tiny random-weight models built from configs (no
download), each with its family's chat template and special tokens on SmolLM2's tokenizer.

Per family: local generation, the teacher cache (shared-prefix path or the fallback and its reason), the
alignment check, a few training steps, save, and a reload with equal logits. Sliding windows are made small
(16-24 tokens) so that every row crosses them; Gemma 2 keeps its attention and final-logit soft-caps.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import make_cfg
from tokenizers import AddedToken
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

from promptbake import train
from promptbake.baked import load_baked
from promptbake.chat import end_of_turn_id, render_prompt_ids, response_ids_from_text, stop_ids
from promptbake.errors import UserError
from promptbake.forward import backbone_and_head, enable_shared_prefix, response_logits, shared_prefix
from promptbake.generate import generate
from promptbake.io import read_jsonl
from promptbake.model import load_model, load_tokenizer
from promptbake.teacher import build_examples, teacher_topk_rows

# ---------------------------------------------------------------- the families' chat templates (as they ship)
LLAMA3 = (  # Meta-Llama-3-8B-Instruct
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
QWEN2 = (  # Qwen2-7B-Instruct: a default system turn when none is sent
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
QWEN3 = (  # Qwen3 (tools left out): history drops reasoning; enable_thinking=false writes an empty think block
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}"
    "{%- endif %}{%- for message in messages %}{%- if message.role == 'user' or (message.role == 'system' and not "
    "loop.first) %}{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}{%- elif "
    "message.role == 'assistant' %}{%- set content = message.content %}{%- if '</think>' in content %}{%- set "
    "content = content.split('</think>')[-1].lstrip('\n') %}{%- endif %}{{- '<|im_start|>assistant\n' + content + "
    "'<|im_end|>\n' }}{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}"
    "{%- endif %}")
GEMMA2 = (  # gemma-2-9b-it: refuses a system turn
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")
GEMMA3 = (  # gemma-3-1b-it (text only): the system prompt opens the first user turn
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}{%- set first_user_prefix = messages[0]['content'] + "
    "'\n\n' -%}{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set first_user_prefix = '' -%}{%- set "
    "loop_messages = messages -%}{%- endif -%}{%- for message in loop_messages -%}{%- if (message['role'] == 'user') "
    "!= (loop.index0 % 2 == 0) -%}{{ raise_exception('Conversation roles must alternate user/assistant/user/"
    "assistant/...') }}{%- endif -%}{%- if (message['role'] == 'assistant') -%}{%- set role = 'model' -%}{%- else -%}"
    "{%- set role = message['role'] -%}{%- endif -%}{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if "
    "loop.first else '') }}{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}")
MISTRAL = (  # Mistral-7B-Instruct-v0.3: the system prompt joins the last user turn; answers end with </s>
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}{%- set loop_messages "
    "= messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}{{- bos_token }}{%- for message in "
    "loop_messages %}{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{- raise_exception('After the "
    "optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}"
    "{%- if message['role'] == 'user' %}{%- if loop.last and system_message is defined %}{{- '[INST] ' + "
    "system_message + '\n\n' + message['content'] + '[/INST]' }}{%- else %}{{- '[INST] ' + message['content'] + "
    "'[/INST]' }}{%- endif %}{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token}}"
    "{%- else %}{{- raise_exception('Only user and assistant roles are supported, with the exception of an initial "
    "optional system message!') }}{%- endif %}{%- endfor %}")
PHI3 = (  # Phi-3-mini-4k-instruct
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif "
    "message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")

SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=2048, initializer_range=0.2)  # large enough that the system prompt matters


@dataclasses.dataclass
class Family:
    name: str
    config_cls: type
    template: str
    specials: list[str]  # added to SmolLM2's tokenizer (which has <|im_start|>, <|im_end|>, <|endoftext|>)
    bos: str | None
    eos: str  # the tokenizer's eos as the family's first release shipped it
    end_of_turn: str  # what the template closes an assistant turn with
    config: dict
    shared_prefix: str  # "on", or the start of the fallback reason
    plain: list[str] = dataclasses.field(default_factory=list)  # added non-special tokens


FAMILIES = [
    Family("llama3", LlamaConfig, LLAMA3, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                           "<|end_header_id|>", "<|eot_id|>"],
           "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", dict(rope_theta=500000.0), "on"),
    Family("qwen2", Qwen2Config, QWEN2, [], None, "<|im_end|>", "<|im_end|>", dict(tie_word_embeddings=True), "on"),
    Family("qwen3", Qwen3Config, QWEN3, [], None, "<|im_end|>", "<|im_end|>", dict(head_dim=8, tie_word_embeddings=True),
           "on", plain=["<think>", "</think>"]),
    Family("gemma2", Gemma2Config, GEMMA2, ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>",
           "<end_of_turn>", dict(head_dim=8, query_pre_attn_scalar=8, sliding_window=16, attn_logit_softcapping=50.0,
                                 final_logit_softcapping=30.0),
           "attention implementation is eager (attention logits soft-capped at 50.0, which sdpa cannot do)"),
    Family("gemma3", Gemma3TextConfig, GEMMA3, ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>",
           "<end_of_turn>", dict(head_dim=8, query_pre_attn_scalar=8, sliding_window=16,
                                 layer_types=["sliding_attention", "full_attention"]), "on"),
    Family("mistral", MistralConfig, MISTRAL, ["<s>", "</s>", "[INST]", "[/INST]"], "<s>", "</s>", "</s>",
           dict(head_dim=8, sliding_window=None), "on"),
    Family("phi3", Phi3Config, PHI3, ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], None, "<|endoftext|>",
           "<|end|>", dict(sliding_window=24), "on"),
]
BY_NAME = {f.name: f for f in FAMILIES}
PROMPT = "You are a pirate. Always begin every reply with \"Arr!\" and talk like a pirate."


def build(family: Family, embedded_dir: str, path) -> str:
    """A random-weight model of the family and its tokenizer, saved as a local folder (what a user would pass)."""
    tok = AutoTokenizer.from_pretrained(embedded_dir)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in family.specials], special_tokens=True)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in family.plain])
    tok.bos_token, tok.eos_token = family.bos, family.eos
    tok.pad_token = family.eos
    tok.chat_template = family.template
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in (("bos", family.bos), ("eos", family.eos)) if v}
    torch.manual_seed(0)
    config = family.config_cls(vocab_size=len(tok), bos_token_id=ids.get("bos"), eos_token_id=ids["eos"],
                               pad_token_id=ids["eos"], **SIZES, **family.config)
    model = AutoModelForCausalLM.from_config(config)
    # generation_config names only the tokenizer's eos, as some checkpoints ship: the turn end comes from the template
    model.generation_config.eos_token_id = ids["eos"]
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, embedded_dir):
    made = {}

    def get(name):
        if name not in made:
            made[name] = build(BY_NAME[name], embedded_dir, tmp_path_factory.mktemp(name))
        return made[name]

    return get


NAMES = [f.name for f in FAMILIES]
CONTEXT = [{"role": "user", "content": "Who are you?"}]


# ---------------------------------------------------------------- templates and turn ends
@pytest.mark.parametrize("name", NAMES)
def test_template_renders_both_sides_and_ends_turns_with_the_family_token(name, family_dirs):
    family = BY_NAME[name]
    tok = load_tokenizer(family_dirs(name))
    eot = end_of_turn_id(tok)
    assert tok.convert_ids_to_tokens(eot) == family.end_of_turn
    assert eot in stop_ids(tok, load_model(family_dirs(name)))  # though generation_config names only the eos
    assert response_ids_from_text(tok, "Arr!", complete=True)[-1] == eot
    assert response_ids_from_text(tok, "Arr!", complete=False)[-1] != eot
    teacher = tok.decode(render_prompt_ids(tok, CONTEXT, PROMPT))
    student = tok.decode(render_prompt_ids(tok, CONTEXT, None))
    assert "pirate" in teacher and "pirate" not in student and "Who are you?" in student
    if name == "qwen3":  # thinking off: an empty think block closes the generation prompt
        assert student.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    if name == "qwen2":  # the template's own default system turn, which every user without one gets
        assert "You are a helpful assistant." in student and "You are a helpful assistant." not in teacher


def test_a_template_that_refuses_a_system_turn_gets_the_prompt_in_the_first_user_turn(family_dirs, capsys):
    tok = load_tokenizer(family_dirs("gemma2"))
    teacher = tok.decode(render_prompt_ids(tok, CONTEXT, PROMPT))
    assert teacher == f"<bos><start_of_turn>user\n{PROMPT}\n\nWho are you?<end_of_turn>\n<start_of_turn>model\n"
    assert "System role not supported" in capsys.readouterr().out  # said, once per tokenizer
    render_prompt_ids(tok, CONTEXT, PROMPT)
    assert capsys.readouterr().out == ""


def test_a_template_that_cannot_render_a_conversation_names_its_reason(family_dirs):
    tok = load_tokenizer(family_dirs("mistral"))
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(UserError, match="chat template refuses this conversation: After the optional system "
                                        "message, conversation roles must alternate"):
        render_prompt_ids(tok, bad, None)


# ---------------------------------------------------------------- the shared prefix, per family
@pytest.mark.parametrize("name", NAMES)
def test_teacher_rows_over_the_system_prefix_equal_full_rows(name, family_dirs, capsys):
    """The cache's shared-prefix path where the family allows it (windows crossed), the reason where it does not."""
    family = BY_NAME[name]
    model, tok = load_model(family_dirs(name)), load_tokenizer(family_dirs(name))
    decision = enable_shared_prefix(model)
    assert (decision.enabled and family.shared_prefix == "on") or decision.reason.startswith(family.shared_prefix)
    from promptbake.data import Row

    rows = [Row(i, [{"role": "user", "content": q}], a) for i, (q, a) in enumerate(
        [("Who are you?", "Arr! A pirate, the scourge of the seas."), ("Tell me a joke about ships.", "Arr, no."),
         ("What is rain, and why does it fall on the sea?", "Arr! Water from the sky, matey, fallin' fer the fish.")])]
    examples, _ = build_examples(rows, tok, PROMPT, "", 256, False, "rows")
    window = family.config.get("sliding_window") or 0
    assert not window or min(len(e.teacher_ids) for e in examples) > window + 8  # every row crosses its window
    plain = teacher_topk_rows(model, examples, None, 5, 3, tok.pad_token_id, torch.int32)
    if decision.enabled:
        n = min(len(e.teacher_ids) - e.n_response - 1 for e in examples)
        common = next(i for i in range(n) if len({e.teacher_ids[i] for e in examples}) > 1)
        with torch.inference_mode():
            prefix = shared_prefix(model, examples[0].teacher_ids[:common])
        shared = teacher_topk_rows(model, examples, prefix, 5, 3, tok.pad_token_id, torch.int32)
        assert torch.equal(shared["ids"][:, 0], plain["ids"][:, 0])
        torch.testing.assert_close(shared["logprobs"].float(), plain["logprobs"].float(), atol=2e-3, rtol=0)


# ---------------------------------------------------------------- the whole pipeline
@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_pipeline(name, family_dirs, workdir, capsys, monkeypatch):
    family = BY_NAME[name]
    path = family_dirs(name)
    cfg = make_cfg(model_name_or_path=path, training_prompts=["Who are you?", "Tell me a joke.", "What is rain?",
                                                              "Where is Paris, matey?"],
                   temperatures=[1.0], samples_per_query=1, max_new_tokens=6, gen_batch_size=4, num_epochs=1,
                   batch_size=2, eval_fraction=0.25, learning_rate=1e-2, top_k=4, teacher_batch_size=4)
    # local generation: the family's template, its stop tokens, token ids kept
    data = generate(cfg)
    rows = [r for _, r in read_jsonl(data)]
    assert len(rows) == 4 and all(1 <= len(r["response_token_ids"]) <= 6 for r in rows)
    tok = load_tokenizer(path)
    stops = stop_ids(tok)
    for r in rows:
        ends = r["response_token_ids"][-1] in stops
        assert ends == (r["generation"]["finish_reason"] == "stop")

    trained = {}
    real_finish = train.finish
    monkeypatch.setattr(train, "finish", lambda tr: trained.setdefault("tr", tr) and real_finish(tr))
    final = train.bake(cfg)
    out = capsys.readouterr().out
    # the generator's top-K, checked against a teacher pass, stand in for the teacher cache
    assert "free teacher logits: reused the generator's top-4 for 4/4 rows" in out and "teacher cache: built" not in out

    # the teacher pass (shared-prefix path, or the family's reason for the fallback) gives the numbers reused above
    base = load_model(path)
    spec = train.check_inputs(cfg, tok)[0]
    free = train.prepare_target(cfg, spec, base, tok, path).teacher
    capsys.readouterr()
    built = train.prepare_target(dataclasses.replace(cfg, free_teacher_logits=False), spec, base, tok, path).teacher
    out = capsys.readouterr().out
    assert "teacher cache: built" in out
    if family.shared_prefix == "on":
        assert "computed once" in out
    else:
        assert f"no shared prefix: {family.shared_prefix}" in out
    assert torch.equal(free.ids[:, 0], built.ids[:, 0])
    torch.testing.assert_close(free.logprobs.float(), built.logprobs.float(), atol=2e-3, rtol=0)
    train_rows = [r for _, r in read_jsonl(final.parent / "metrics.jsonl") if "train/kl" in r]
    n_train = 4 - len(list(read_jsonl(final.parent / "held_out.jsonl")))  # the split is by a hash of each query
    assert len(train_rows) == (n_train + 1) // 2 and all(torch.isfinite(torch.tensor(r["train/kl"])) for r in train_rows)

    # reload: the saved adapter gives the logits the trained model gave, through the model's own forward too
    model = trained["tr"].model.eval()
    reloaded, tok, _ = load_baked(final, device="cpu")
    seqs = [render_prompt_ids(tok, CONTEXT, None) + [5, 6, 7]]
    with torch.inference_mode():
        want = response_logits(model, seqs, [3], tok.pad_token_id)
        got = response_logits(reloaded, seqs, [3], tok.pad_token_id)
        own = reloaded(torch.tensor(seqs)).logits[0, -4:-1]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, own.float(), atol=1e-4, rtol=1e-4)  # the head applies the model's final cap
    if family.config.get("final_logit_softcapping"):
        assert own.abs().max() <= family.config["final_logit_softcapping"]
        head = backbone_and_head(reloaded)[1]
        assert head.softcap == family.config["final_logit_softcapping"]
