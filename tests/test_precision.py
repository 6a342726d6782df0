"""bf16 autocast of the student's matmuls: when it is on, and that a step under it is the fp32 step within bf16's
rounding, with the trained weights, the head and the loss left in fp32."""

import pytest
import torch
from conftest import make_cfg
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from test_train import write_data

from promptbake import precision, train
from promptbake.config import ConfigError, validate
from promptbake.forward import backbone_and_head, response_hidden
from promptbake.io import read_jsonl
from promptbake.loss import head_topk_kl_with_tail, teacher_topk
from promptbake.model import load_model


def test_the_setting_resolves_per_device(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert precision.use_bf16("auto", "cpu") and precision.use_bf16("on", "cpu") and not precision.use_bf16("off", "cpu")
    assert not precision.use_bf16("auto", "cuda")  # the base is bf16 there already
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert not precision.use_bf16("auto", "cpu") and precision.use_bf16("on", "cpu")
    assert "no native bf16" in precision.describe(False, "auto", "cpu")
    with pytest.raises(ConfigError, match=r"`bf16` is 'yes'; choose one of \['auto', 'on', 'off'\]"):
        validate(make_cfg(bf16="yes"))


def test_autocast_is_a_no_op_when_off():
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with precision.autocast(False, "cpu"):
        assert (a @ b).dtype == torch.float32
    with precision.autocast(True, torch.device("cpu")):
        assert (a @ b).dtype == torch.bfloat16


def test_a_bf16_step_is_the_fp32_step_within_rounding(embedded_dir, tokenizer):
    """The first training step of a real bake, on the real model: the teacher sees the system prompt, the student
    (fresh LoRA) does not. Its loss and LoRA gradient under bf16 autocast against fp32."""
    from promptbake.chat import render_prompt_ids

    model = load_model(embedded_dir, "cpu")
    torch.manual_seed(0)
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    system = "You are a pirate. Always talk like a pirate."
    qa = [("Who are you?", "Arr! I be Captain Redbeard, scourge of the seven seas, matey."),
          ("How do I boil an egg?", "Ahoy! Drop the egg in boilin' water for nine minutes, then cool it in the brine.")]
    answers = [tokenizer(a, add_special_tokens=False).input_ids for _, a in qa]
    contexts = [[{"role": "user", "content": q}] for q, _ in qa]
    student = [render_prompt_ids(tokenizer, c, None) + a for c, a in zip(contexts, answers)]
    teacher = [render_prompt_ids(tokenizer, c, system) + a for c, a in zip(contexts, answers)]
    n_resp, pad = [len(a) for a in answers], tokenizer.pad_token_id
    head = backbone_and_head(peft)[1]
    with torch.no_grad(), peft.disable_adapter():
        t_ids, t_lp = teacher_topk(head(response_hidden(peft, teacher, n_resp, pad)), 20)

    def step(bf16):
        peft.zero_grad()
        with precision.autocast(bf16, "cpu"):
            hidden = response_hidden(peft, student, n_resp, pad)
        loss = head_topk_kl_with_tail(hidden.float(), head, t_ids, t_lp)
        loss.backward()
        grads = torch.cat([p.grad.reshape(-1) for p in peft.parameters() if p.requires_grad])
        return loss, grads

    loss32, g32 = step(False)
    loss16, g16 = step(True)
    assert loss16.dtype == torch.float32 and g16.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in peft.parameters() if p.requires_grad)
    assert loss32.item() > 0.05  # the prompt matters: there is something to learn
    assert abs(loss16.item() - loss32.item()) < 0.02 * loss32.item(), (loss16.item(), loss32.item())
    cosine = torch.nn.functional.cosine_similarity(g16, g32, dim=0).item()
    assert cosine > 0.99, cosine
    assert abs(g16.norm().item() / g32.norm().item() - 1) < 0.03, (g16.norm().item(), g32.norm().item())


def test_a_bake_under_bf16_trains_fp32_weights_as_well_as_fp32(workdir, tiny_model_dir, capsys):
    runs = {}
    for mode in ("off", "on"):
        write_data(workdir / "data" / f"run-{mode}.jsonl")
        cfg = make_cfg(model_name_or_path=tiny_model_dir, num_epochs=3, batch_size=4, eval_fraction=0.25,
                       learning_rate=1e-2, top_k=8, teacher_batch_size=4, bf16=mode, name=f"run-{mode}")
        final = train.bake(cfg)
        adapter = load_file(final / "adapter_model.safetensors")
        assert all(t.dtype == torch.float32 for t in adapter.values())
        kl = [r["eval/kl"] for _, r in read_jsonl(final.parent / "metrics.jsonl") if "eval/kl" in r]
        runs[mode] = kl
    out = capsys.readouterr().out
    assert "student matmuls: bf16 autocast (--bf16 on)" in out and "student matmuls: model dtype (--bf16 off)" in out
    assert runs["on"][-1] < runs["on"][0]  # it learns
    assert abs(runs["on"][-1] - runs["off"][-1]) < 0.1 * runs["off"][-1], runs


def test_frozen_weights_cast_once_give_autocasts_numbers(tiny_model_dir):
    """Under bf16 the frozen base weights are bf16 copies made once (autocast would cast them at every use): the loss
    and the LoRA gradient are bit for bit autocast's, the fp32 weights are back afterwards, and an in-place change of
    a weight remakes its copy."""
    from promptbake.forward import cast_once, frozen_linears_as

    model = load_model(tiny_model_dir, "cpu")
    torch.manual_seed(0)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # a LoRA that changes the output, so its gradient path is exercised
    seqs, n_resp = [[5, 6, 7, 8, 9, 10], [5, 6, 11, 12]], [3, 2]
    head = backbone_and_head(peft)[1]
    t_ids, t_lp = teacher_topk(torch.randn(5, head.weight.shape[0], generator=torch.Generator().manual_seed(1)), 8)
    fp32_weights = {n: p for n, p in peft.named_parameters() if p.dtype == torch.float32}

    def step(cast):
        peft.zero_grad()
        context = frozen_linears_as(peft, torch.bfloat16 if cast else None)
        with precision.autocast(True, "cpu"), context:
            if cast:
                base = peft.base_model.model.model.layers[0].self_attn.q_proj.base_layer
                assert base.weight.dtype == torch.bfloat16
            hidden = response_hidden(peft, seqs, n_resp, 2).float()
        loss = head_topk_kl_with_tail(hidden, head, t_ids, t_lp, matmul_dtype=torch.bfloat16)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in peft.parameters() if p.requires_grad]

    (loss_a, grads_a), (loss_b, grads_b) = step(False), step(True)
    assert loss_a == loss_b and all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
    assert {n: p for n, p in peft.named_parameters() if p.dtype == torch.float32} == fp32_weights  # all restored
    w = torch.randn(3, 4)
    first = cast_once(w, torch.bfloat16)
    assert cast_once(w, torch.bfloat16) is first
    w.mul_(2)
    assert torch.equal(cast_once(w, torch.bfloat16), (w * 1).bfloat16())
