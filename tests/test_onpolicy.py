"""The on-policy stage on a tiny random Llama with SmolLM2's tokenizer and template."""

from types import SimpleNamespace

import orjson
import pytest
import torch
from conftest import make_cfg

from promptbake import onpolicy
from promptbake.chat import render_prompt_ids
from promptbake.forward import enable_shared_prefix
from promptbake.loss import teacher_topk

SYSTEM = "You are a pirate. Always begin every reply with \"Arr!\" and talk like a pirate."
QUERIES = ["Who are you?", "Tell me a joke.", "What is rain?", "How do I cook rice?", "Where is Paris?",
           "Why is the sky blue?"]


def fake_target(queries=QUERIES, held_out=(), weight=1.0, system=SYSTEM):
    """What the stage reads of a train.Target: its rows' queries, which are trained, the prompts and weight."""
    groups = [orjson.dumps([{"role": "user", "content": q}]).decode() for q in queries]
    examples = [SimpleNamespace(group=g) for g in groups for _ in range(2)]  # two samples per query, as generated
    train = [i for i, e in enumerate(examples) if orjson.loads(e.group)[0]["content"] not in held_out]
    return SimpleNamespace(system=system, student_prompt="", weight=weight, examples=examples, train=train)


@pytest.fixture(scope="module")
def peft_model(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():  # a nonzero adapter, so "adapter disabled" is distinguishable from "adapter on"
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return model.eval()


def test_query_stream_cycles_training_queries_and_never_a_held_out_one():
    stream = onpolicy.QueryStream([fake_target(held_out=("What is rain?",))], seed=0)
    seen = [c[0]["content"] for _ in range(5) for c in stream.next_batch(2)[1]]
    assert "What is rain?" not in seen
    assert sorted(seen[:5]) == sorted(q for q in QUERIES if q != "What is rain?")  # all once before any repeat
    assert len(seen) == 10


def test_query_stream_draws_targets_by_weight():
    stream = onpolicy.QueryStream([fake_target(weight=1.0), fake_target(system="Be a poet.", weight=3.0)], seed=1)
    picks = [stream.next_batch(1)[0] for _ in range(400)]
    assert 0.68 < sum(picks) / 400 < 0.82


def test_settings_come_from_config_fields():
    s = onpolicy.settings_from(make_cfg(top_k=20, onpolicy_steps=5, onpolicy_beta=0.5))
    assert (s.steps, s.beta, s.top_k, s.batch_size) == (5, 0.5, 20, 8)
    assert onpolicy.settings_from(make_cfg(onpolicy_top_k=4)).top_k == 4
    assert onpolicy.settings_from(make_cfg()).steps == 0  # the default Config: stage off


def test_every_onpolicy_config_field_reaches_the_stage():
    """The on-policy settings are defined once, as the Config's onpolicy_<name> fields: each one, set away from
    its default, arrives as the stage's <name>, with the Config's default when unset."""
    from dataclasses import fields

    from promptbake.config import Config, from_dict

    config_fields = {f.name: f.default for f in fields(Config) if f.name.startswith("onpolicy_")}
    assert len(config_fields) >= 8
    assert {f.name: f.default for f in fields(onpolicy.OnPolicySettings)} == {
        k.removeprefix("onpolicy_"): v for k, v in config_fields.items()}
    moved = {k: type(v)(v / 2) if v else 3 for k, v in config_fields.items()}  # in every field's range
    s = onpolicy.settings_from(from_dict(moved, "test"))
    assert {k: getattr(s, k.removeprefix("onpolicy_")) for k in moved} == moved


def test_rollouts_share_the_sampled_answer_and_only_the_teacher_sees_the_prompt(peft_model, tokenizer):
    target = fake_target()
    s = onpolicy.OnPolicySettings(max_new_tokens=6, top_k=5)
    contexts = [[{"role": "user", "content": q}] for q in QUERIES[:3]]
    rollouts = onpolicy.sample_rollouts(peft_model, tokenizer, target, contexts, s, seed=0)
    for c, r in zip(contexts, rollouts):
        student_prompt = render_prompt_ids(tokenizer, c, None)
        assert r.student_ids[:len(student_prompt)] == student_prompt
        assert r.student_ids[-r.n_response:] == r.teacher_ids[-r.n_response:]
        assert r.teacher_ids[:-r.n_response] == render_prompt_ids(tokenizer, c, SYSTEM)
        assert 1 <= r.n_response <= 6
        assert "pirate" not in tokenizer.decode(r.student_ids[:len(student_prompt)])


def plain_teacher_topk(model, rollouts, k):
    """Reference: a plain full forward of each prompted row on the base model (adapter off), one row at a time."""
    ids, lps = [], []
    with torch.inference_mode(), model.disable_adapter():
        for r in rollouts:
            logits = model(input_ids=torch.tensor([r.teacher_ids])).logits[0]
            i, lp = teacher_topk(logits[-r.n_response - 1:-1], k)
            ids.append(i)
            lps.append(lp)
    return torch.cat(ids), torch.cat(lps)


def test_teacher_scores_are_the_prompted_base_with_a_shared_system_turn(peft_model, tokenizer):
    target = fake_target()
    contexts = [[{"role": "user", "content": q}] for q in QUERIES[:4]]
    s = onpolicy.OnPolicySettings(max_new_tokens=7, top_k=5, temperature=1.0)
    rollouts = onpolicy.sample_rollouts(peft_model, tokenizer, target, contexts, s, seed=3)
    assert enable_shared_prefix(peft_model).enabled  # the shared system turn is what this test checks
    got_ids, got_lp = onpolicy.teacher_scores(peft_model, rollouts, 5, tokenizer.pad_token_id)
    want_ids, want_lp = plain_teacher_topk(peft_model, rollouts, 5)
    assert torch.equal(got_ids, want_ids)
    torch.testing.assert_close(got_lp, want_lp, atol=1e-4, rtol=1e-4)
    # and not the adapted model: with the adapter on, the scores differ
    with torch.inference_mode():
        adapted = peft_model(input_ids=torch.tensor([rollouts[0].teacher_ids])).logits[0, -rollouts[0].n_response - 1]
    assert not torch.allclose(torch.log_softmax(adapted, -1).topk(5).values, want_lp[0], atol=1e-3)


def test_split_backward_gives_the_same_gradient(peft_model, tokenizer):
    """Pieces of at most max_batch_tokens give the gradient of one whole batch."""
    target = fake_target()
    contexts = [[{"role": "user", "content": q}] for q in QUERIES]
    s = onpolicy.OnPolicySettings(max_new_tokens=8, top_k=5)
    rollouts = onpolicy.sample_rollouts(peft_model, tokenizer, target, contexts, s, seed=1)
    t_ids, t_lp = onpolicy.teacher_scores(peft_model, rollouts, 5, tokenizer.pad_token_id)
    grads = []
    for max_tokens in (0, 40):
        peft_model.zero_grad()
        loss = onpolicy.train_on_rollouts(peft_model, rollouts, t_ids, t_lp, tokenizer.pad_token_id, s, max_tokens)
        grads.append([p.grad.clone() for p in peft_model.parameters() if p.requires_grad])
    peft_model.zero_grad()
    assert loss > 0
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_stage_off_by_default_and_moves_the_student_toward_the_teacher(tiny_model_dir, tokenizer):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    targets = [fake_target()]
    assert onpolicy.onpolicy_stage(model, tokenizer, targets, make_cfg()) == {}

    # a fixed set of the student's own answers, scored before and after the stage
    s = onpolicy.OnPolicySettings(max_new_tokens=8, top_k=8)
    contexts = [[{"role": "user", "content": q}] for q in QUERIES]
    fixed = onpolicy.sample_rollouts(model, tokenizer, targets[0], contexts, s, seed=5)
    t_ids, t_lp = onpolicy.teacher_scores(model, fixed, 8, tokenizer.pad_token_id)

    def divergence():
        value = onpolicy.train_on_rollouts(model, fixed, t_ids, t_lp, tokenizer.pad_token_id, s, 0)
        model.zero_grad()
        return value

    before = divergence()
    cfg = make_cfg(top_k=8, learning_rate=1e-2)
    cfg.onpolicy_steps, cfg.onpolicy_batch_size, cfg.onpolicy_max_new_tokens = 12, 6, 8
    cfg.onpolicy_learning_rate = 1e-2
    logged = []
    timings = onpolicy.onpolicy_stage(model, tokenizer, targets, cfg, log=lambda step, row: logged.append(step),
                                      first_step=30)
    assert logged == list(range(31, 43))
    assert timings["onpolicy_s"] > 0 and set(timings) >= {"onpolicy_sample_s", "onpolicy_teacher_s", "onpolicy_train_s"}
    assert divergence() < 0.5 * before


def test_bake_runs_the_stage_after_the_offpolicy_epochs(workdir, tiny_model_dir):
    from test_train import cfg_for, write_data

    from promptbake import train
    from promptbake.io import read_json, read_jsonl

    write_data(workdir / "data" / "default.jsonl")
    cfg = cfg_for(tiny_model_dir)
    cfg.onpolicy_steps, cfg.onpolicy_batch_size, cfg.onpolicy_max_new_tokens = 3, 4, 6
    final = train.bake(cfg)
    rows = [r for _, r in read_jsonl(workdir / "checkpoints" / "default" / "metrics.jsonl")]
    offpolicy = [r["step"] for r in rows if "train/kl" in r]
    assert [r["step"] for r in rows if "onpolicy/divergence" in r] == [max(offpolicy) + i for i in (1, 2, 3)]
    assert read_json(final.parent / "timings.json")["onpolicy_s"] > 0


def test_the_schedule_is_transformers_linear_warmup_a_step_earlier():
    """Why the stage keeps schedule.warmup_then_decay rather than transformers' get_linear_schedule_with_warmup:
    the same decay, but theirs gives the first step a learning rate of 0, so the stage's default warmup of one step
    would train nothing at its first step. With no warmup the two are equal."""
    from transformers import get_linear_schedule_with_warmup

    from promptbake.schedule import warmup_then_decay

    def rates(make, warmup, total):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        schedule, out = make(opt, warmup, total), []
        for _ in range(total):
            out.append(schedule.get_last_lr()[0])
            opt.step()
            schedule.step()
        return out

    for warmup, total in ((1, 5), (3, 10), (0, 4)):
        ours, theirs = rates(warmup_then_decay, warmup, total), rates(get_linear_schedule_with_warmup, warmup, total)
        assert ours[warmup:] == pytest.approx(theirs[warmup:])  # the decay: the same
        assert ours[:warmup] == pytest.approx(theirs[1:warmup + 1])  # the warmup: theirs one step later...
        assert theirs[0] == (0.0 if warmup else 1.0)  # ...from 0 at the first step
