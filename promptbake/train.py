"""The baking stage: cached teacher top-K -> LoRA student trained without the prompt -> checkpoints.

bake() reads as its phases: check the inputs and build the teacher cache (nothing on disk is touched
until every input is good), claim the run folder, build or restore the trainer, then one loop of
train_step() with an evaluation at each epoch end, then finish(). Each phase is a function of its own.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

from . import distributed, fsdp, precision
from .baked import BAKE_CONFIG, check_parent_outside_run, load_start, model_config_sha256, teacher_system, with_parent_model
from .checks import load_checks
from .config import Config, to_dict
from .data import load_rows, normalise_query, read_prompt
from .distributed import SINGLE, World
from .errors import UserError
from .forward import backbone_and_head, frozen_linears_as, response_hidden, token_pieces
from .freelogits import free_teacher
from .generate import check_data_dir
from .io import atomic_write_bytes, folder_written_atomically, read_json, sha256_file, sha256_text, write_json
from .lineage import HELD_OUT
from .locks import run_lock
from .loss import head_topk_kl_with_tail
from .metrics import kl_and_agreement
from .model import pick_device
from .onpolicy import onpolicy_stage
from .sampling import answer_in_batches, decode_response
from .schedule import warmup_then_decay
from .teacher import Example, TeacherTopK, build_examples, cache_complete, cache_key, check_alignment, teacher_cache
from .tracking import Logger

TRAINER_STATE = "trainer_state.pt"
CPU_MAX_BATCH_TOKENS = 768  # keeps the default make bake under 3 GB on CPU
# Settings a resumed run may change: they don't change the numbers the run computes.
RESUME_MAY_CHANGE = {"resume", "log_every", "save_steps", "verify_queries", "wandb_mode", "wandb_project", "device",
                     "teacher_batch_size", "max_batch_tokens", "markers", "marker_regex", "checks", "eval_max_new_tokens",
                     "model_cache_dir", "overwrite", "dist_timeout", "retention_items", "retention_tasks",
                     "bf16",  # like `device`: the rounding of the student's matmuls, not what is computed
                     "fsdp",  # like the number of processes: the checkpoints are the same either way
                     "free_teacher_logits"}  # the stored top-K are checked to match a teacher pass within fp tolerance
# Settings of the data stage: what they change is in the data, whose hash a resumed run compares instead.
DATA_SETTINGS = {"backend", "api_base_url", "api_model", "concurrency", "request_timeout", "max_retries", "prompts",
                 "training_prompts", "generate_queries", "num_queries", "samples_per_query", "temperatures",
                 "max_new_tokens", "top_p", "gen_batch_size", "max_prompt_tokens", "query_mix", "query_writer", "min_p",
                 "drop_loops"}


@dataclass
class Target:
    name: str
    system: str
    student_prompt: str
    data: Path
    weight: float
    examples: list[Example]
    teacher: TeacherTopK
    train: list[int]
    held_out: list[int]
    marker_regex: str = ""
    prompt: str = ""  # the prompt file's own text; `system` is what the teacher read (teacher_system)
    prompt_file: str = ""
    checks: list[dict] = field(default_factory=list)  # what the prompt demands (promptbake/checks.py), as dicts


# ---------------------------------------------------------------- data and teacher
def target_specs(cfg) -> list[dict]:
    """One spec per target: its prompt file, data file, weight, name and optional student prompt and markers."""
    specs = cfg.targets or [{"prompt_file": cfg.prompt_file, "data": ""}]
    out = []
    for t in specs:
        data = t.get("data") or str(Path(cfg.data_dir) / f"{cfg.name}.jsonl")
        name = t.get("name") or (Path(data).stem if cfg.targets else cfg.name)
        out.append({"prompt_file": t.get("prompt_file", cfg.prompt_file), "student_prompt": t.get("student_prompt", ""),
                    "data": data, "weight": float(t.get("weight", 1.0)), "name": name,
                    "marker_regex": t.get("marker_regex", ""), "checks": t.get("checks")})
    names = [s["name"] for s in out]
    if len(set(names)) != len(names):
        raise UserError(f"targets: two targets are named {sorted(n for n in names if names.count(n) > 1)[0]!r}; "
                        f"give each a distinct `name`")
    return out


def is_prompts_only(rows) -> bool:
    """Data with no assistant turn at all: the local teacher answers it before a bake (promptbake/stages.py)."""
    return all(r.response is None for r in rows)


def check_answered(spec: dict) -> None:
    """The bake trains on paired rows only; prompts-only data is answered first by the caller (stages.bake, which
    bake.py runs), or by `generate_data.py --prompts` under several processes."""
    rows = spec["rows"]
    if is_prompts_only(rows):
        how = ("with several processes, answer them first with" if distributed.world().enabled else
               "answer them first (bake.py and promptbake.bake do), or with")
        raise UserError(f"{spec['data']} holds prompts only; {how} `python generate_data.py --prompts {spec['data']}` "
                        f"(one process), then bake")
    bad = next((r for r in rows if r.response is None), None)
    if bad is not None:
        raise UserError(f"{spec['data']}:{bad.line}: the row has no assistant turn, but others do; paired data "
                        f"needs one in every row")


def held_out_score(group: str, seed: int) -> float:
    """Where a query falls in [0, 1): a hash of its normalised text (data.normalise_query) and the seed. It depends
    on nothing else, so a query stays on its side of the split when other queries are added or dropped."""
    digest = hashlib.sha256(f"{seed}\0{normalise_query(orjson.loads(group))}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_held_out(examples: list[Example], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Splits by query, not by row: samples of a held-out query are never trained on. A query is held out when its
    hash score is under `fraction` (about that share of the queries, each decided on its own: stable under added or
    dropped queries, and the same query written twice lands on one side). With 4 queries or more and none under
    `fraction`, the lowest-scored one is held out, so a small set is still measured."""
    groups = sorted({e.group for e in examples})
    score = {g: held_out_score(g, seed) for g in groups}
    held = {g for g in groups if score[g] < fraction}
    if fraction > 0 and not held and len(groups) >= 4:
        held = {min(groups, key=score.__getitem__)}
    train = [i for i, e in enumerate(examples) if e.group not in held]
    if not train:
        raise UserError(f"eval_fraction={fraction} leaves no training rows; lower it or add data")
    return train, [i for i, e in enumerate(examples) if e.group in held]


def prepare_target(cfg, spec: dict, model, tokenizer, model_path: str) -> Target:
    """Tokenizes one target's rows, loads or builds its teacher cache, and checks the alignment."""
    system, own = teacher_system(cfg, spec["prompt_file"]), read_prompt(spec["prompt_file"])
    rows, data_file = spec["rows"], spec["data_file"]
    meta_path = Path(data_file).parent / (Path(data_file).name.removesuffix(".jsonl") + ".meta.json")
    meta = read_json(meta_path) if meta_path.exists() else {}
    settings = meta.get("settings", {}) if isinstance(meta, dict) else {}
    use_ids = settings.get("model") == model_path
    if settings.get("prompt_sha256") not in (None, sha256_text(system)):
        print(f"warning: {data_file} was generated with another system prompt than {spec['prompt_file']}")
    examples, cut = build_examples(rows, tokenizer, system, spec["student_prompt"], cfg.max_seq_len, use_ids,
                                   data_file, getattr(model.config, "max_position_embeddings", None))
    if cut:
        print(f"warning: {cut} response(s) in {data_file} were cut to max_seq_len={cfg.max_seq_len}; "
              f"their turn end is not trained")
    key = cache_key(model_path, system, sha256_file(data_file), cfg.top_k,
                    tokenizer.chat_template or "", cfg.max_seq_len, spec["student_prompt"])
    cache_dir = Path(cfg.data_dir) / "cache" / key
    teacher = None
    # every rank decides the same way (the same files, the same check), so the fallback's collectives still meet
    if cfg.free_teacher_logits and not cache_complete(cache_dir, len(examples)):  # a built cache costs nothing
        teacher = free_teacher(model, tokenizer, examples, rows, system, model_path, cfg.top_k, data_file,
                               cfg.teacher_batch_size)
    if teacher is None:
        teacher = teacher_cache(model, tokenizer, examples, cfg.top_k, cache_dir, cfg.teacher_batch_size,
                                distributed.world())
    check_alignment(examples, teacher, tokenizer, data_file)
    train, held_out = split_held_out(examples, cfg.eval_fraction, cfg.seed)
    print(f"target {spec['name']}: {len(train)} train rows, {len(held_out)} held-out rows, "
          f"{sum(e.n_response for e in examples)} response tokens, cache {teacher.bytes_per_token:.0f} B/token")
    return Target(spec["name"], system, spec["student_prompt"], Path(data_file), spec["weight"], examples, teacher,
                  train, held_out, spec["marker_regex"], own, spec["prompt_file"],
                  [c.as_dict() for c in load_checks(cfg, spec)])


def check_top_k(cfg, tokenizer) -> None:
    if cfg.top_k > len(tokenizer):
        raise UserError(f"`top_k` is {cfg.top_k}, over the vocabulary of {len(tokenizer)} tokens; lower --top_k")


def read_targets(cfg) -> list[dict]:
    """target_specs with each target's rows: its prompt, checks and data read (a mistake refused here). The rows
    come from spec["data_file"]: the data file, or the file of its answers when stages.bake answered it."""
    specs = target_specs(cfg)
    for spec in specs:
        read_prompt(spec["prompt_file"])
        load_checks(cfg, spec)  # a mistake in the checks stops the bake before it starts, not at evaluate
        spec["data_file"] = spec["data"]
        spec["rows"] = load_rows(spec["data"], strip_system=cfg.strip_system)
    return specs


def check_inputs(cfg, tokenizer, specs: list[dict] | None = None) -> list[dict]:
    """Every input a bake reads, checked before anything on disk is touched. `specs`: read_targets' answer, when
    the caller has read the targets already."""
    check_data_dir(cfg.data_dir)
    check_top_k(cfg, tokenizer)
    specs = read_targets(cfg) if specs is None else specs
    for spec in specs:
        check_answered(spec)
    return specs


# ---------------------------------------------------------------- batches
def length_batches(indices: list[int], lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffled batches of similar length: shuffle, sort within windows of 32 batches, then shuffle batches."""
    idx = list(indices)
    rng.shuffle(idx)
    window = batch_size * 32
    batches = []
    for w in range(0, len(idx), window):
        chunk = sorted(idx[w:w + window], key=lambda i: lengths[i])
        batches += [chunk[b:b + batch_size] for b in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def epoch_plan(targets: list[Target], batch_size: int, seed: int, epoch: int) -> list[tuple[int, list[int]]]:
    """The epoch's micro-batches as (target, rows). Each micro-batch draws its target by weight."""
    rng = random.Random(seed * 100_003 + epoch)
    per_target = [length_batches(t.train, [len(e.student_ids) for e in t.examples], batch_size, rng) for t in targets]
    if len(targets) == 1:
        return [(0, b) for b in per_target[0]]
    total = sum(map(len, per_target))
    cursors = [0] * len(targets)
    plan = []
    for _ in range(total):
        ti = rng.choices(range(len(targets)), weights=[t.weight for t in targets])[0]
        plan.append((ti, per_target[ti][cursors[ti] % len(per_target[ti])]))
        cursors[ti] += 1
    return plan


def batch_loss(model, target: Target, rows: list[int], pad_id: int, bf16: bool = False) -> tuple[torch.Tensor, int]:
    """Mean top-K+tail KL of the student on these rows, and their number of response tokens. `bf16`: the
    transformer and the head's matmuls run in bf16; the softmax and the loss stay fp32 (see precision.py)."""
    ex = [target.examples[r] for r in rows]
    head = backbone_and_head(model)[1]
    frozen = precision.head_dtype(bf16) if not fsdp.on() else None  # FSDP's shards are not plain weights
    with precision.autocast(bf16, head.weight.device), frozen_linears_as(model, frozen):
        hidden = response_hidden(model, [e.student_ids for e in ex], [e.n_response for e in ex], pad_id)
    hidden = hidden.float()
    t_ids = torch.cat([target.teacher.row(r)[1] for r in rows]).to(hidden.device)
    t_lp = torch.cat([target.teacher.row(r)[2] for r in rows]).to(hidden.device)
    return head_topk_kl_with_tail(hidden, head, t_ids, t_lp, matmul_dtype=precision.head_dtype(bf16)), len(hidden)


# ---------------------------------------------------------------- evaluation
@torch.inference_mode()
def eval_topk_kl(model, targets: list[Target], pad_id: int, batch_size: int) -> float | None:
    total, n = 0.0, 0
    for t in targets:
        for b in range(0, len(t.held_out), batch_size):
            loss, count = batch_loss(model, t, t.held_out[b:b + batch_size], pad_id)
            total, n = total + loss.item() * count, n + count
    return total / n if n else None


def eval_full_kl(model, targets: list[Target], pad_id: int, batch_size: int, adapter: bool = True) -> dict:
    """Full-vocabulary KL(prompted base || model without prompt) and top-1 agreement on held-out rows.
    The teacher is recomputed (adapter disabled), so the number does not depend on the cache."""
    held_out = [t.examples[r] for t in targets for r in t.held_out]
    if not held_out:
        return {}
    kl, agree = kl_and_agreement(model, held_out, pad_id, batch_size, adapter)
    return {"kl_full": kl, "top1_agreement": agree}


# ---------------------------------------------------------------- checkpoints
def bake_info(cfg, targets: list[Target], model_path: str, base_model, lineage: list[dict]) -> dict:
    config = to_dict(cfg)
    return {"config": config, "base_model_path": model_path.split("+lineage:")[0],
            "base_config_sha256": model_config_sha256(base_model), "lineage": lineage,
            "config_sha256": sha256_text(repr(sorted(config.items()))),
            "targets": [{"name": t.name, "system_prompt": t.prompt, "system_prompt_sha256": sha256_text(t.prompt),
                         **({"teacher_prompt": t.system} if t.system != t.prompt else {}),
                         "student_prompt": t.student_prompt, "data": str(t.data), "data_sha256": sha256_file(t.data),
                         "weight": t.weight, "marker_regex": t.marker_regex, "prompt_file": t.prompt_file,
                         "checks": t.checks, "train_rows": len(t.train),
                         "held_out_rows": len(t.held_out)} for t in targets]}


def save_checkpoint(model, path: Path, info: dict, state: dict | None) -> None:
    """Writes the adapter, bake_config.json and (for step-N) the trainer state, then renames: atomic.
    Under FSDP every rank calls it (they gather the adapter together); rank 0 writes."""
    whole = fsdp.adapter_state(model)
    if not distributed.world().main:
        return
    with folder_written_atomically(path) as tmp:
        model.save_pretrained(tmp, **({"state_dict": whole} if whole is not None else {}))
        write_json(tmp / BAKE_CONFIG, info)
        if state is not None:
            torch.save(state, tmp / TRAINER_STATE)


def last_step_checkpoint(run_dir: Path) -> Path | None:
    steps = [p for p in run_dir.glob("step-*") if (p / TRAINER_STATE).exists() and p.name[5:].isdigit()]
    return max(steps, key=lambda p: int(p.name.split("-")[1])) if steps else None


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_held_out(path: Path, targets: list[Target]) -> None:
    """Each target's held-out queries (never trained on), for evaluate.py: {"messages", "target"} rows."""
    rows = []
    for t in targets:
        groups = dict.fromkeys(t.examples[r].group for r in t.held_out)
        rows += [orjson.dumps({"messages": orjson.loads(g), "target": t.name}) + b"\n" for g in groups]
    atomic_write_bytes(path, b"".join(rows))


def changed_settings(saved: dict, info: dict) -> list[str]:
    """What differs from a checkpoint's bake_config and would change what the resumed run computes:
    settings, and each target's prompt and data."""
    now, was = info["config"], saved.get("config", {})
    changed = [k for k in now if k not in RESUME_MAY_CHANGE | DATA_SETTINGS and was.get(k, now[k]) != now[k]]
    for t, old in zip(info["targets"], saved.get("targets", [])):
        changed += [f"{t['name']}: {what}" for what, key in (("the system prompt", "system_prompt_sha256"),
                                                             ("the data", "data_sha256")) if old.get(key) != t[key]]
    return sorted(changed)


# ---------------------------------------------------------------- the trainer
@dataclass
class Trainer:
    """Everything one bake carries from phase to phase."""
    cfg: Config
    run_dir: Path
    model: object
    tokenizer: object
    targets: list[Target]
    info: dict
    device: str
    logger: Logger | None = None
    optimizer: torch.optim.Optimizer | None = None
    schedule: object = None
    params: list = field(default_factory=list)
    step: int = 0
    steps_per_epoch: int = 0
    total_steps: int = 0
    last_good: Path | None = None
    timings: dict = field(default_factory=dict)
    world: World = SINGLE  # this process's rank among the launcher's processes
    bf16: bool = False  # the student's forward and backward under bf16 autocast (precision.py)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def max_batch_tokens(self) -> int:
        if self.cfg.max_batch_tokens >= 0:
            return self.cfg.max_batch_tokens
        return CPU_MAX_BATCH_TOKENS if self.device == "cpu" else 0


def prepare(cfg, run_dir: Path, specs: list[dict] | None = None) -> Trainer:
    """Loads the model, checks every input and builds the teacher caches. Writes nothing under run_dir."""
    t0 = time.time()
    sharded = fsdp.will_shard(cfg)
    base, tokenizer, model_path, device, lineage = load_start(cfg, place=not sharded)
    if sharded:  # the adapter first, then the shards: the teacher pass below runs sharded
        base = fsdp.shard(add_adapter(base, cfg), device)
    timings = {"model_load_s": time.time() - t0}
    print(f"model: {model_path} on {device}")
    specs = check_inputs(cfg, tokenizer, specs)
    t0 = time.time()
    targets = [prepare_target(cfg, spec, base, tokenizer, model_path) for spec in specs]
    timings["teacher_cache_s"] = time.time() - t0
    info = bake_info(cfg, targets, model_path, base, lineage)
    bf16 = precision.use_bf16(cfg.bf16, device)
    print(precision.describe(bf16, cfg.bf16, device))
    return Trainer(cfg, run_dir, base, tokenizer, targets, info, device, timings=timings, world=distributed.world(),
                   bf16=bf16)


def claim_run_dir(run_dir: Path, resume_from: Path | None) -> None:
    """A fresh bake moves an earlier run aside (nothing is deleted); a resumed one keeps it."""
    if resume_from is None and run_dir.exists() and any(run_dir.iterdir()):
        old = run_dir.with_name(f"{run_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(run_dir, old)
        print(f"moved the earlier run to {old} (nothing is deleted)")
    run_dir.mkdir(parents=True, exist_ok=True)


def add_adapter(model, cfg):
    """The base model wrapped in a fresh LoRA adapter."""
    modules = cfg.target_modules if cfg.target_modules == "all-linear" else \
        [m.strip() for m in cfg.target_modules.split(",") if m.strip()]
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=modules, modules_to_save=None, task_type="CAUSAL_LM")
    try:
        model = get_peft_model(model, lora)
    except ValueError as e:
        raise UserError(f"`target_modules` {cfg.target_modules!r}: {str(e).splitlines()[0]}") from None
    model.print_trainable_parameters()
    return model


def build_optimizer(tr: Trainer) -> None:
    """Wraps the base model in a LoRA adapter (done already under FSDP) and sets up AdamW with linear warmup
    and decay (promptbake/schedule.py)."""
    cfg = tr.cfg
    if not fsdp.on():
        tr.model = add_adapter(tr.model, cfg)
    tr.params = [p for p in tr.model.parameters() if p.requires_grad]
    tr.optimizer = torch.optim.AdamW(tr.params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    # Every micro-batch is trained: the last step of an epoch takes what is left.
    tr.steps_per_epoch = math.ceil(len(epoch_plan(tr.targets, cfg.batch_size, cfg.seed, 0)) / cfg.grad_accum)
    tr.total_steps = tr.steps_per_epoch * cfg.num_epochs
    warmup = max(1, int(cfg.warmup_ratio * tr.total_steps)) if cfg.warmup_ratio > 0 else 0
    tr.schedule = warmup_then_decay(tr.optimizer, warmup, tr.total_steps)  # step 1 already trains


def restore(tr: Trainer, resume_from: Path) -> None:
    """Continues from a step-N checkpoint: adapter, optimizer, scheduler and RNG, if the settings still match."""
    changed = changed_settings(read_json(resume_from / BAKE_CONFIG), tr.info)
    if changed:
        raise UserError(f"--resume: {', '.join(changed)} differ from {resume_from}'s settings, and would change "
                        f"the result; rerun with the same values, or without --resume to start over")
    try:
        state = torch.load(resume_from / TRAINER_STATE, weights_only=False)
        fsdp.load_adapter(tr.model, load_file(resume_from / "adapter_model.safetensors"))
        tr.optimizer.load_state_dict(fsdp.sharded_optimizer_state(tr.optimizer, state["optimizer"]))
        tr.schedule.load_state_dict(state["scheduler"])
    except Exception as e:  # noqa: BLE001 - torch/safetensors raise many kinds for a damaged file
        raise UserError(f"{resume_from}: the checkpoint is damaged ({type(e).__name__}: {str(e)[:120]}); delete "
                        f"that folder to resume from the one before, or rerun without --resume") from None
    set_rng_state(state["rng"])
    tr.step = state["step"]
    tr.last_good = resume_from
    print(f"resumed from {resume_from} at step {tr.step}/{tr.total_steps}")


def train_step(tr: Trainer, micro: list[tuple[int, list[int]]]) -> dict:
    """One optimizer step over these micro-batches: token-weighted mean loss, clipped gradient.
    Under several processes each rank runs its share of every micro-batch, weighted by the global token count,
    and the gradients and the loss are summed over ranks: the same step as one process would take."""
    lengths = {ti: [len(e.student_ids) for e in tr.targets[ti].examples] for ti, _ in micro}
    total_tokens = sum(tr.targets[ti].examples[r].n_response for ti, rows in micro for r in rows)
    step_loss = 0.0
    for ti, rows in micro:
        mine = tr.world.share(rows)
        for piece in token_pieces(mine, lengths[ti], tr.max_batch_tokens) if mine else []:
            loss, n = batch_loss(tr.model, tr.targets[ti], piece, tr.pad_id, tr.bf16)
            (loss * n / total_tokens).backward()
            step_loss += loss.item() * n / total_tokens
    fsdp.pad_passes(tr, micro)  # under FSDP every rank runs as many passes as the busiest
    (step_loss,) = distributed.all_reduce_grads(tr.params, step_loss)
    if not math.isfinite(step_loss):
        raise UserError(f"the loss is {step_loss} at step {tr.step + 1}; stopped without saving it. The last good "
                        f"checkpoint is {tr.last_good or 'none (no step saved yet)'}; lower --learning_rate")
    grad_norm = torch.nn.utils.clip_grad_norm_(tr.params, tr.cfg.max_grad_norm).item()
    lr = tr.schedule.get_last_lr()[0]  # the rate this step trains with (after it, the schedule's is the next step's)
    tr.optimizer.step()
    tr.schedule.step()
    tr.optimizer.zero_grad(set_to_none=True)
    tr.step += 1
    return {"train/kl": step_loss, "train/lr": lr, "train/grad_norm": grad_norm,
            "train/tokens": total_tokens}


def save_step(tr: Trainer) -> None:
    state = {"optimizer": fsdp.optimizer_state(tr.optimizer), "scheduler": tr.schedule.state_dict(), "rng": rng_state(),
             "step": tr.step, "total_steps": tr.total_steps}
    tr.last_good = tr.run_dir / f"step-{tr.step}"
    save_checkpoint(tr.model, tr.last_good, tr.info, state)


def run_epoch(tr: Trainer, epoch: int) -> None:
    cfg = tr.cfg
    plan = epoch_plan(tr.targets, cfg.batch_size, cfg.seed, epoch)
    for s in range(tr.step - epoch * tr.steps_per_epoch, tr.steps_per_epoch):
        t0 = time.time()
        row = train_step(tr, plan[s * cfg.grad_accum:(s + 1) * cfg.grad_accum])
        dt = time.time() - t0
        row.update({"train/tokens_per_s": row.pop("train/tokens") / dt, "train/epoch": epoch + (s + 1) / tr.steps_per_epoch})
        tr.logger.log(tr.step, row)
        if tr.step % cfg.log_every == 0 or tr.step == tr.total_steps:
            print(f"step {tr.step:4d}/{tr.total_steps} | train/kl {row['train/kl']:.4f} | train/lr {row['train/lr']:.2e} | "
                  f"train/grad_norm {row['train/grad_norm']:.3f} | train/tokens_per_s {row['train/tokens_per_s']:.0f} | "
                  f"{dt * 1000:.0f} ms", flush=True)
        if (tr.world.main or fsdp.on()) and (tr.step % cfg.save_steps == 0 or s == tr.steps_per_epoch - 1):
            save_step(tr)


def evaluate_epoch(tr: Trainer, epoch: int) -> None:
    if not (tr.world.main or fsdp.on()):  # the others wait for it at the next step's all-reduce
        return
    tr.model.eval()
    kl = eval_topk_kl(tr.model, tr.targets, tr.pad_id, tr.cfg.teacher_batch_size)
    tr.model.train()
    if kl is not None:
        tr.logger.log(tr.step, {"eval/kl": kl})
        print(f"epoch {epoch + 1}/{tr.cfg.num_epochs} | eval/kl {kl:.4f} (top-{tr.cfg.top_k} + tail, held-out)")


def evaluate_before(tr: Trainer) -> None:
    before = eval_full_kl(tr.model, tr.targets, tr.pad_id, tr.cfg.teacher_batch_size, adapter=False)
    if before:
        tr.logger.log(0, {f"eval/{k}_before": v for k, v in before.items()})
        print(f"held-out before baking | eval/kl_full {before['kl_full']:.4f} | "
              f"eval/top1_agreement {before['top1_agreement']:.3f}")


def finish(tr: Trainer) -> Path:
    """Saves final/, measures the held-out KL against the one before baking, and answers a few queries."""
    tr.model.eval()
    final = tr.run_dir / "final"
    t0 = time.time()
    save_checkpoint(tr.model, final, tr.info, None)
    tr.timings["save_s"] = time.time() - t0
    after = eval_full_kl(tr.model, tr.targets, tr.pad_id, tr.cfg.teacher_batch_size)
    if after:
        tr.logger.log(tr.step, {f"eval/{k}": v for k, v in after.items()})
        before = next((r for r in tr.logger.rows() if "eval/kl_full_before" in r), None)
        if before:
            b = before["eval/kl_full_before"]
            print(f"held-out full-vocabulary KL to the prompted teacher: {b:.4f} -> {after['kl_full']:.4f} "
                  f"({100 * (1 - after['kl_full'] / b):.0f}% lower) | top-1 agreement "
                  f"{before['eval/top1_agreement_before']:.3f} -> {after['top1_agreement']:.3f}")
    if tr.cfg.verify_queries > 0:
        for target in tr.targets:
            verify(tr.model, tr.tokenizer, target, tr.cfg)
    return final


class NullLogger:
    """What ranks other than 0 log to: nothing."""

    def log(self, step: int, values: dict) -> None:
        pass

    def close(self) -> None:
        pass

    def rows(self) -> list[dict]:
        return []


def checked_settings(cfg):
    """The settings a bake refuses before any work (stages.bake checks them before it answers prompts-only data
    too); returns cfg with --init_from's base model (baked.with_parent_model)."""
    cfg = with_parent_model(cfg)
    check_parent_outside_run(cfg)
    fsdp.check(cfg)
    return cfg


def bake(cfg, specs: list[dict] | None = None) -> Path:
    """Trains checkpoints/<name>/final from paired data; returns its path. Under torchrun / accelerate launch every
    rank calls it: they train together, rank 0 writes (see promptbake/distributed.py). The training stage alone:
    answering prompts-only data before it and the report after it are the caller's (promptbake/stages.py, which
    bake.py runs); `specs`: the targets as the caller read and answered them (read_targets), else read here."""
    t_start = time.time()
    cfg = checked_settings(cfg)
    world = distributed.setup(pick_device(cfg.device), cfg.dist_timeout)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    run_dir = Path(cfg.checkpoint_dir) / cfg.name
    with ExitStack() as stack:
        if world.main:
            stack.enter_context(run_lock(run_dir, "bake"))
        resume_from = distributed.broadcast_object(last_step_checkpoint(run_dir) if cfg.resume and world.main else None)
        if cfg.resume and resume_from is None:
            print(f"--resume: no step checkpoint in {run_dir}; starting fresh")
        tr = prepare(cfg, run_dir, specs)
        build_optimizer(tr)
        if resume_from is not None:
            restore(tr, resume_from)
        distributed.broadcast_params(tr.params)  # identical adapters on every rank, whatever their RNG did
        tr.logger = NullLogger()
        if world.main:
            claim_run_dir(run_dir, resume_from)
            write_json(run_dir / BAKE_CONFIG, tr.info)
            write_held_out(run_dir / HELD_OUT, tr.targets)
            tr.logger = Logger(cfg, run_dir, to_dict(cfg), resume_step=tr.step if resume_from else None)
            stack.callback(tr.logger.close)
        if tr.step == 0 and (world.main or fsdp.on()):  # under FSDP every rank runs every forward
            evaluate_before(tr)
        ranks = f" over {world.size} processes" if world.enabled else ""
        print(f"training: {tr.total_steps} steps ({cfg.num_epochs} epochs x {tr.steps_per_epoch}), "
              f"{cfg.batch_size * cfg.grad_accum} rows per step{ranks}")
        tr.model.train()
        while tr.step < tr.total_steps:
            epoch = tr.step // tr.steps_per_epoch
            t0 = time.time()
            run_epoch(tr, epoch)
            tr.timings[f"epoch_{epoch + 1}_s"] = time.time() - t0
            evaluate_epoch(tr, epoch)
        if not (world.main or fsdp.on()):  # rank 0 alone finishes: on-policy stage, final/, evaluation
            distributed.shutdown()
            return run_dir / "final"
        if world.enabled and cfg.onpolicy_steps:
            print(f"note: the on-policy stage runs on rank 0 alone ({world.size - 1} other rank(s) have finished)")
        tr.timings.update(onpolicy_stage(tr.model, tr.tokenizer, tr.targets, cfg, tr.logger.log, tr.step,
                                         tr.max_batch_tokens, tr.bf16))
        final = finish(tr)
        tr.timings["total_s"] = time.time() - t_start
        if world.main:
            write_json(run_dir / "timings.json", tr.timings)
    distributed.shutdown()
    if not world.main:
        return final
    print(f"saved {final} in {tr.timings['total_s']:.0f}s")
    return final


def verify(model, tokenizer, target: Target, cfg) -> None:
    """Answers a few held-out queries with the baked model (no prompt) beside the prompted teacher (the base
    model, or the --init_from checkpoint it was baked on)."""
    teacher = "prompted parent:  " if cfg.init_from else "prompted base:    "
    groups = dict.fromkeys(target.examples[r].group for r in (target.held_out or target.train))
    contexts = [orjson.loads(g) for g in list(groups)[:cfg.verify_queries]]
    print(f"\nverification of target {target.name!r} on {len(contexts)} held-out queries (greedy):")
    def greedy(system):  # the queries batched: on a CPU the decode steps, not the rows, are what cost
        return answer_in_batches(model, tokenizer, contexts, system, batch_size=cfg.gen_batch_size, temperature=0,
                                 max_new_tokens=cfg.eval_max_new_tokens)

    baked = greedy(target.student_prompt or None)
    with model.disable_adapter():
        prompted = greedy(target.system)
    for ctx, (base_ids, _), (baked_ids, _) in zip(contexts, prompted, baked):
        print(f"  user:             {ctx[-1]['content']}")
        print(f"  {teacher}{decode_response(tokenizer, base_ids)[:200]!r}")
        print(f"  baked, no prompt: {decode_response(tokenizer, baked_ids)[:200]!r}\n")
