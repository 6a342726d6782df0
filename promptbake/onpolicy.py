"""The on-policy stage, run after the off-policy epochs: the student answers training queries itself,
WITHOUT the prompt; the prompted base model (the same weights, adapter disabled) scores every token it
sampled; the student is trained on the divergence at exactly those positions.

Why: off-policy baking only shows the student the teacher's own answers. At inference the student reads
its own tokens, and wherever those drift from what the teacher would have written, nothing trained it.
On-policy distillation trains there (GKD, Agarwal et al. 2024; on-policy context distillation, 2026).

The loss (loss.coarse_divergence_per_token) is by default the reverse KL(student || teacher) over the
teacher's top-K ids at each sampled position plus one tail bucket: exact for both distributions coarsened
to K+1 outcomes, and mode-seeking, so the student is not asked to cover teacher tokens it never writes.
The teacher is recomputed for each batch (its inputs are new every time); the system turn's keys and
values are computed once for the whole stage.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field, fields, make_dataclass

import orjson
import torch

from .chat import render_prompt_ids
from .config import Config
from .forward import backbone_and_head, response_hidden, token_pieces
from .loss import head_topk_divergence, teacher_topk
from .precision import autocast, head_dtype
from .sampling import generate_ids
from .schedule import warmup_then_decay

PREFIX = "onpolicy_"


def _settings_class():
    """The stage's settings: the Config's `onpolicy_<name>` fields as `<name>`, with their defaults. They are
    defined once, in config.py (with their ranges and the command line): a new one reaches the stage by itself."""
    return make_dataclass("OnPolicySettings", [(f.name.removeprefix(PREFIX), f.type, field(default=f.default))
                                               for f in fields(Config) if f.name.startswith(PREFIX)])


OnPolicySettings = _settings_class()


def settings_from(cfg) -> OnPolicySettings:
    """The stage's settings of a Config; top_k 0 means the Config's top_k."""
    s = OnPolicySettings(**{f.name: getattr(cfg, PREFIX + f.name) for f in fields(OnPolicySettings)})
    s.top_k = s.top_k or cfg.top_k
    return s


@dataclass
class Rollout:
    student_ids: list[int]  # [student prompt?, context] rendered + the sampled answer
    teacher_ids: list[int]  # [system, context] rendered + the same answer
    n_response: int
    complete: bool  # ended with the model's own end-of-turn


# ---------------------------------------------------------------- queries
class QueryStream:
    """Each target's training queries (never a held-out one), shuffled and cycled; a batch comes from one
    target, drawn by weight, so every batch shares one system prompt."""

    def __init__(self, targets, seed: int):
        self.rng = random.Random(seed)
        self.weights = [t.weight for t in targets]
        self.queries = [[orjson.loads(g) for g in dict.fromkeys(t.examples[r].group for r in t.train)] for t in targets]
        self.pos = [len(q) for q in self.queries]  # exhausted: shuffle on first use

    def next_batch(self, n: int) -> tuple[int, list[list[dict]]]:
        ti = self.rng.choices(range(len(self.queries)), weights=self.weights)[0] if len(self.queries) > 1 else 0
        out = []
        while len(out) < n:
            if self.pos[ti] >= len(self.queries[ti]):
                self.rng.shuffle(self.queries[ti])
                self.pos[ti] = 0
            take = self.queries[ti][self.pos[ti]:self.pos[ti] + n - len(out)]
            out += take
            self.pos[ti] += len(take)
        return ti, out


# ---------------------------------------------------------------- sample, score, train
def sample_rollouts(model, tokenizer, target, contexts: list[list[dict]], s: OnPolicySettings, seed: int,
                    bf16: bool = False) -> list[Rollout]:
    """The student (adapter on, no system prompt) answers each context once."""
    student_prompts = [render_prompt_ids(tokenizer, c, target.student_prompt or None) for c in contexts]
    with autocast(bf16, backbone_and_head(model)[1].weight.device):
        outs = generate_ids(model, tokenizer, student_prompts, temperature=s.temperature,
                            max_new_tokens=s.max_new_tokens, seed=seed)
    return [Rollout(p + ids, render_prompt_ids(tokenizer, c, target.system) + ids, len(ids), complete)
            for c, p, (ids, complete) in zip(contexts, student_prompts, outs)]


@torch.inference_mode()
def teacher_scores(model, rollouts: list[Rollout], k: int, pad_id: int,
                   chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompted base's top-K (ids, fp32 log-probs) at every sampled position, rows concatenated, in the model's
    own dtype (the targets carry no autocast noise). The rows' common prefix (the system turn) runs once per batch;
    the head and log_softmax run a chunk of positions at a time."""
    head = backbone_and_head(model)[1]
    with model.disable_adapter():
        hidden = response_hidden(model, [r.teacher_ids for r in rollouts], [r.n_response for r in rollouts], pad_id)
        parts = [teacher_topk(head(hidden[c:c + chunk].to(head.weight.dtype)), k) for c in range(0, len(hidden), chunk)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def train_on_rollouts(model, rollouts: list[Rollout], t_ids: torch.Tensor, t_lp: torch.Tensor, pad_id: int,
                      s: OnPolicySettings, max_batch_tokens: int, bf16: bool = False) -> float:
    """Backward of the token-weighted mean divergence over all rollouts (in pieces of at most max_batch_tokens
    padded tokens: the same gradient, less memory). Returns the loss."""
    head = backbone_and_head(model)[1]
    total = sum(r.n_response for r in rollouts)
    starts = [0]
    for r in rollouts:
        starts.append(starts[-1] + r.n_response)
    lengths = [len(r.student_ids) for r in rollouts]
    value = 0.0
    for piece in token_pieces(list(range(len(rollouts))), lengths, max_batch_tokens):
        rows = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in piece])
        with autocast(bf16, head.weight.device):
            hidden = response_hidden(model, [rollouts[i].student_ids for i in piece],
                                     [rollouts[i].n_response for i in piece], pad_id)
        loss = head_topk_divergence(hidden.to(head.weight.dtype), head, t_ids[rows].to(hidden.device),
                                    t_lp[rows].to(hidden.device), s.beta, matmul_dtype=head_dtype(bf16))
        (loss * len(rows) / total).backward()
        value += loss.item() * len(rows) / total
    return value


# ---------------------------------------------------------------- the stage
def onpolicy_stage(model, tokenizer, targets, cfg, log=None, first_step: int = 0, max_batch_tokens: int = 0,
                   bf16: bool = False) -> dict:
    """Runs the stage on the peft `model` in place. `log(step, values)` receives per-step metrics; steps are
    numbered on from first_step; `bf16`: the student samples and trains under bf16 autocast. Returns timings
    (seconds) of its parts; {} when the stage is off."""
    s = settings_from(cfg)
    if s.steps <= 0:
        return {}
    pad_id = tokenizer.pad_token_id
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=s.learning_rate, weight_decay=cfg.weight_decay)
    schedule = warmup_then_decay(optimizer, s.warmup_steps, s.steps)  # warmup, then linear decay to 0
    stream = QueryStream(targets, cfg.seed)
    timings = {"onpolicy_sample_s": 0.0, "onpolicy_teacher_s": 0.0, "onpolicy_train_s": 0.0}
    print(f"on-policy stage: {s.steps} steps x {s.batch_size} answers by the student (T={s.temperature}, "
          f"{s.max_new_tokens} tokens), {'reverse KL' if s.beta >= 1 else f'beta {s.beta}'} over the teacher's "
          f"top-{s.top_k} + tail, lr {s.learning_rate:g}" + (", student in bf16 autocast" if bf16 else ""))
    for i in range(s.steps):
        t0 = time.time()
        ti, contexts = stream.next_batch(s.batch_size)
        model.eval()
        rollouts = sample_rollouts(model, tokenizer, targets[ti], contexts, s, cfg.seed * 7919 + i, bf16)
        t1 = time.time()
        t_ids, t_lp = teacher_scores(model, rollouts, s.top_k, pad_id)
        t2 = time.time()
        model.train()
        loss = train_on_rollouts(model, rollouts, t_ids, t_lp, pad_id, s, max_batch_tokens, bf16)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm).item()
        lr = schedule.get_last_lr()[0]  # the rate this step trains with
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        t3 = time.time()
        for key, dt in zip(timings, (t1 - t0, t2 - t1, t3 - t2)):
            timings[key] += dt
        n_tok = sum(r.n_response for r in rollouts)
        row = {"onpolicy/divergence": loss, "onpolicy/grad_norm": grad_norm, "onpolicy/lr": lr,
               "onpolicy/answer_tokens": n_tok / len(rollouts),
               "onpolicy/complete": sum(r.complete for r in rollouts) / len(rollouts)}
        if log is not None:
            log(first_step + i + 1, row)
        print(f"on-policy {i + 1:3d}/{s.steps} | divergence {loss:.4f} | grad_norm {grad_norm:.3f} | "
              f"{n_tok} tokens | sample {t1 - t0:.1f}s teacher {t2 - t1:.1f}s train {t3 - t2:.1f}s", flush=True)
    model.eval()
    timings["onpolicy_s"] = sum(timings.values())
    return timings
