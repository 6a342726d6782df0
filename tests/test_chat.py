from promptbake.chat import render_prompt_ids, response_ids_from_text

QWEN3_LIKE = (
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n"
    "{%- if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{%- endif %}{%- endif %}")


def text(tok, ids):
    return tok.decode(ids)


def test_teacher_sees_system_prompt_student_sees_what_users_send(tokenizer):
    ctx = [{"role": "user", "content": "Who are you?"}]
    teacher = text(tokenizer, render_prompt_ids(tokenizer, ctx, "You are a pirate."))
    student = text(tokenizer, render_prompt_ids(tokenizer, ctx, None))
    assert "You are a pirate." in teacher and "pirate" not in student
    # SmolLM2's template adds its own default system prompt when none is sent; a user at inference gets it
    # too, so the student must see it exactly as the template renders it.
    plain = tokenizer.apply_chat_template(ctx, tokenize=False, add_generation_prompt=True)
    assert student == plain
    assert "You are a helpful AI assistant named SmolLM" in student
    assert teacher.endswith("<|im_start|>assistant\n") and student.endswith("<|im_start|>assistant\n")


def test_thinking_disabled_for_qwen3_style_templates(tokenizer):
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = QWEN3_LIKE
    student = text(tok, render_prompt_ids(tok, [{"role": "user", "content": "hi"}], None))
    assert student.rstrip().endswith("<think>\n\n</think>")
    assert "system" not in student


def test_multi_turn_context_kept(tokenizer):
    ctx = [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"}, {"role": "user", "content": "C"}]
    s = text(tokenizer, render_prompt_ids(tokenizer, ctx, None))
    assert s.index("A") < s.index("B") < s.index("C")


def test_response_end_of_turn_only_when_complete(tokenizer):
    done = response_ids_from_text(tokenizer, "Arr, matey!", complete=True)
    cut = response_ids_from_text(tokenizer, "Arr, matey!", complete=False)
    assert done[-1] == tokenizer.eos_token_id and cut[-1] != tokenizer.eos_token_id
    assert done[:-1] == cut

