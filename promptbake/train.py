"""The baking stage: cached teacher top-K -> LoRA student trained without the prompt -> checkpoints."""

from __future__ import annotations

import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
import torch

from . import model as models
from .baked import BAKE_CONFIG, model_config_sha256
from .data import load_rows, read_prompt
from .errors import UserError
from .forward import backbone_and_head, response_hidden
from .io import JsonlAppender, atomic_dir, commit_dir, read_json, sha256_file, sha256_text, write_json
from .loss import head_topk_kl_with_tail
from .teacher import Example, TeacherTopK, build_examples, cache_key, check_alignment, teacher_cache


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


# ---------------------------------------------------------------- data and teacher
def target_specs(cfg) -> list[dict]:
    specs = cfg.targets or [{"prompt_file": cfg.prompt_file, "data": ""}]
    out = []
    for i, t in enumerate(specs):
        data = t.get("data") or str(Path(cfg.data_dir) / f"{cfg.name}.jsonl")
        out.append({"prompt_file": t.get("prompt_file", cfg.prompt_file), "student_prompt": t.get("student_prompt", ""),
                    "data": data, "weight": float(t.get("weight", 1.0)), "name": Path(data).stem if cfg.targets else cfg.name})
        if out[-1]["weight"] <= 0:
            raise UserError(f"targets[{i}]: weight must be > 0")
    return out


def _answered_rows(cfg, spec, model, tokenizer):
    """The target's rows; prompts-only data is first answered by the local teacher (same code as generate_data)."""
    rows = load_rows(spec["data"], strip_system=cfg.strip_system)
    if all(r.response is not None for r in rows):
        return rows, spec["data"]
    if any(r.response is not None for r in rows):
        bad = next(r for r in rows if r.response is None)
        raise UserError(f"{spec['data']}:{bad.line}: the row has no assistant turn, but others do; paired data "
                        f"needs one in every row")
    from dataclasses import replace

    from .generate import generate

    print(f"{spec['data']} holds prompts only: the local teacher answers them first")
    gen_cfg = replace(cfg, prompts=spec["data"], prompt_file=spec["prompt_file"], training_prompts=[],
                      generate_queries=0, backend="local", name=f"{Path(spec['data']).stem}.answered")
    out = generate(gen_cfg, model, tokenizer)
    return load_rows(str(out)), str(out)


def split_held_out(examples: list[Example], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Splits by query, not by row: samples of a held-out query are never trained on."""
    groups = sorted({e.group for e in examples})
    random.Random(seed).shuffle(groups)
    n_eval = int(round(len(groups) * fraction)) if fraction > 0 else 0
    if fraction > 0 and len(groups) >= 4:
        n_eval = max(n_eval, 1)
    held = set(groups[:n_eval])
    train = [i for i, e in enumerate(examples) if e.group not in held]
    if not train:
        raise UserError(f"eval_fraction={fraction} leaves no training rows; lower it or add data")
    return train, [i for i, e in enumerate(examples) if e.group in held]


def prepare_targets(cfg, model, tokenizer, model_path: str) -> list[Target]:
    targets = []
    for spec in target_specs(cfg):
        system = read_prompt(spec["prompt_file"])
        rows, data_file = _answered_rows(cfg, spec, model, tokenizer)
        meta_path = Path(data_file).parent / (Path(data_file).name.removesuffix(".jsonl") + ".meta.json")
        meta = read_json(meta_path) if meta_path.exists() else {}
        use_ids = meta.get("settings", {}).get("model") == model_path
        if meta.get("settings", {}).get("prompt_sha256") not in (None, sha256_text(system)):
            print(f"warning: {data_file} was generated with another system prompt than {spec['prompt_file']}")
        examples, cut = build_examples(rows, tokenizer, system, spec["student_prompt"], cfg.max_seq_len, use_ids,
                                       data_file, getattr(model.config, "max_position_embeddings", None))
        if cut:
            print(f"warning: {cut} response(s) in {data_file} were cut to max_seq_len={cfg.max_seq_len}; "
                  f"their turn end is not trained")
        key = cache_key(model_path, system, sha256_file(data_file), cfg.top_k,
                        tokenizer.chat_template or "", cfg.max_seq_len, spec["student_prompt"])
        teacher = teacher_cache(model, tokenizer, examples, cfg.top_k, Path(cfg.data_dir) / "cache" / key,
                                cfg.teacher_batch_size)
        check_alignment(examples, teacher, tokenizer, data_file)
        train, held_out = split_held_out(examples, cfg.eval_fraction, cfg.seed)
        targets.append(Target(spec["name"], system, spec["student_prompt"], Path(data_file), spec["weight"],
                              examples, teacher, train, held_out))
        print(f"target {spec['name']}: {len(train)} train rows, {len(held_out)} held-out rows, "
              f"{sum(e.n_response for e in examples)} response tokens, cache {teacher.bytes_per_token:.0f} B/token")
    return targets


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


def token_pieces(rows: list[int], lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Splits a micro-batch (in order) into pieces of at most max_tokens padded tokens, one row at least."""
    pieces, width = [[]], 0
    for r in rows:
        w = max(width, lengths[r])
        if pieces[-1] and max_tokens > 0 and w * (len(pieces[-1]) + 1) > max_tokens:
            pieces.append([])
            w = lengths[r]
        pieces[-1].append(r)
        width = w
    return pieces


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


def batch_loss(model, target: Target, rows: list[int], pad_id: int) -> tuple[torch.Tensor, int]:
    """Mean top-K+tail KL of the student on these rows, and their number of response tokens."""
    ex = [target.examples[r] for r in rows]
    hidden = response_hidden(model, [e.student_ids for e in ex], [e.n_response for e in ex], pad_id)
    t_ids = torch.cat([target.teacher.row(r)[1] for r in rows]).to(hidden.device)
    t_lp = torch.cat([target.teacher.row(r)[2] for r in rows]).to(hidden.device)
    return head_topk_kl_with_tail(hidden, backbone_and_head(model)[1], t_ids, t_lp), len(hidden)


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
    from .evaluate import kl_and_agreement

    held_out = [t.examples[r] for t in targets for r in t.held_out]
    if not held_out:
        return {}
    kl, agree = kl_and_agreement(model, held_out, pad_id, batch_size, adapter)
    return {"kl_full": kl, "top1_agreement": agree}


# ---------------------------------------------------------------- checkpoints
def bake_info(cfg, targets: list[Target], model_path: str, base_model) -> dict:
    from config import to_dict

    return {"config": to_dict(cfg), "base_model_path": model_path, "base_config_sha256": model_config_sha256(base_model),
            "config_sha256": sha256_text(repr(sorted(to_dict(cfg).items()))),
            "targets": [{"name": t.name, "system_prompt": t.system, "system_prompt_sha256": sha256_text(t.system),
                         "student_prompt": t.student_prompt, "data": str(t.data), "data_sha256": sha256_file(t.data),
                         "weight": t.weight, "train_rows": len(t.train), "held_out_rows": len(t.held_out)}
                        for t in targets]}


def save_checkpoint(model, path: Path, info: dict, state: dict | None) -> None:
    """Writes the adapter, bake_config.json and (for step-N) the trainer state, then renames: atomic."""
    tmp = atomic_dir(path)
    try:
        model.save_pretrained(tmp)
        write_json(tmp / BAKE_CONFIG, info)
        if state is not None:
            torch.save(state, tmp / "trainer_state.pt")
        commit_dir(tmp, path)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"could not save {path}: {e.strerror or e}; earlier checkpoints are intact") from None


def last_step_checkpoint(run_dir: Path) -> Path | None:
    steps = [p for p in run_dir.glob("step-*") if (p / "trainer_state.pt").exists()]
    return max(steps, key=lambda p: int(p.name.split("-")[1])) if steps else None


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def open_wandb(cfg, run_dir: Path, config: dict, name: str):
    """A W&B run, or None when disabled. Offline without WANDB_API_KEY; `wandb_mode` overrides."""
    mode = cfg.wandb_mode or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    if mode == "disabled":
        return None
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(project=cfg.wandb_project, name=name, dir=str(run_dir), mode=mode, config=config,
                      reinit="finish_previous")


class Logger:
    """metrics.jsonl always; W&B when enabled (offline without WANDB_API_KEY)."""

    def __init__(self, cfg, run_dir: Path, config: dict):
        self.metrics = JsonlAppender(run_dir / "metrics.jsonl")
        self.wandb = open_wandb(cfg, run_dir, config, cfg.name)

    def log(self, step: int, values: dict) -> None:
        self.metrics.write({"step": step, **values})
        if self.wandb:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        self.metrics.close()
        if self.wandb:
            self.wandb.finish()


# ---------------------------------------------------------------- the stage
def bake(cfg) -> Path:
    """Trains checkpoints/<name>/final from the data; returns its path."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    from config import to_dict

    t_start = time.time()
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    run_dir = Path(cfg.checkpoint_dir) / cfg.name
    resume_from = last_step_checkpoint(run_dir) if cfg.resume else None
    if cfg.resume and resume_from is None:
        print(f"--resume: no step checkpoint in {run_dir}; starting fresh")
    if resume_from is None and run_dir.exists() and any(run_dir.iterdir()):
        old = run_dir.with_name(f"{run_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(run_dir, old)
        print(f"moved the earlier run to {old} (nothing is deleted)")
    run_dir.mkdir(parents=True, exist_ok=True)

    timings, t_phase = {}, time.time()
    base, tokenizer, model_path, device = models.load(cfg)
    timings["model_load_s"], t_phase = time.time() - t_phase, time.time()
    print(f"model: {model_path} on {device}")
    pad_id = tokenizer.pad_token_id
    targets = prepare_targets(cfg, base, tokenizer, model_path)
    timings["teacher_cache_s"], t_phase = time.time() - t_phase, time.time()
    info = bake_info(cfg, targets, model_path, base)
    write_json(run_dir / BAKE_CONFIG, info)
    write_held_out(run_dir / "held_out.jsonl", targets[0])

    target_modules = cfg.target_modules if cfg.target_modules == "all-linear" else \
        [m.strip() for m in cfg.target_modules.split(",")]
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=target_modules, modules_to_save=None, task_type="CAUSAL_LM")
    model = get_peft_model(base, lora)
    model.print_trainable_parameters()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    micro_per_epoch = len(epoch_plan(targets, cfg.batch_size, cfg.seed, 0))
    steps_per_epoch = max(1, micro_per_epoch // cfg.grad_accum)
    total_steps = steps_per_epoch * cfg.num_epochs
    warmup = max(1, int(cfg.warmup_ratio * total_steps)) if cfg.warmup_ratio > 0 else 0
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (total_steps - s) / max(1, total_steps - warmup)))
    logger = Logger(cfg, run_dir, {k: v for k, v in to_dict(cfg).items()})

    step = 0
    if resume_from is not None:
        state = torch.load(resume_from / "trainer_state.pt", weights_only=False)
        set_peft_model_state_dict(model, load_file(resume_from / "adapter_model.safetensors"))
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        step = state["step"]
        print(f"resumed from {resume_from} at step {step}/{total_steps}")

    eval_bs = cfg.teacher_batch_size
    if step == 0:
        before = eval_full_kl(model, targets, pad_id, eval_bs, adapter=False)
        if before:
            logger.log(0, {f"eval/{k}_before": v for k, v in before.items()})
            print(f"held-out before baking | eval/kl_full {before['kl_full']:.4f} | "
                  f"eval/top1_agreement {before['top1_agreement']:.3f}")
    print(f"training: {total_steps} steps ({cfg.num_epochs} epochs x {steps_per_epoch}), "
          f"{cfg.batch_size * cfg.grad_accum} rows per step")
    last_good = resume_from
    student_lengths = [[len(e.student_ids) for e in t.examples] for t in targets]
    max_batch_tokens = cfg.max_batch_tokens if cfg.max_batch_tokens >= 0 else (768 if device == "cpu" else 0)
    model.train()
    while step < total_steps:
        epoch, in_epoch = divmod(step, steps_per_epoch)
        t_epoch = time.time()
        plan = epoch_plan(targets, cfg.batch_size, cfg.seed, epoch)
        for s in range(in_epoch, steps_per_epoch):
            t0 = time.time()
            micro = plan[s * cfg.grad_accum:(s + 1) * cfg.grad_accum]
            total_tokens = sum(targets[ti].examples[r].n_response for ti, rows in micro for r in rows)
            step_loss = 0.0
            for ti, rows in micro:
                for piece in token_pieces(rows, student_lengths[ti], max_batch_tokens):
                    loss, n = batch_loss(model, targets[ti], piece, pad_id)
                    (loss * n / total_tokens).backward()
                    step_loss += loss.item() * n / total_tokens
            if not math.isfinite(step_loss):
                logger.close()
                raise UserError(f"the loss is {step_loss} at step {step + 1}; stopped without saving it. The last good "
                                f"checkpoint is {last_good or 'none (no step saved yet)'}; lower --learning_rate")
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm).item()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            dt = time.time() - t0
            row = {"train/kl": step_loss, "train/lr": schedule.get_last_lr()[0], "train/grad_norm": grad_norm,
                   "train/tokens_per_s": total_tokens / dt, "train/epoch": epoch + (s + 1) / steps_per_epoch}
            logger.log(step, row)
            if step % cfg.log_every == 0 or step == total_steps:
                print(f"step {step:4d}/{total_steps} | train/kl {step_loss:.4f} | train/lr {row['train/lr']:.2e} | "
                      f"train/grad_norm {grad_norm:.3f} | train/tokens_per_s {row['train/tokens_per_s']:.0f} | "
                      f"{dt * 1000:.0f} ms", flush=True)
            if step % cfg.save_steps == 0 or s == steps_per_epoch - 1:
                state = {"optimizer": optimizer.state_dict(), "scheduler": schedule.state_dict(), "rng": rng_state(),
                         "step": step, "total_steps": total_steps}
                last_good = run_dir / f"step-{step}"
                save_checkpoint(model, last_good, info, state)
        timings[f"epoch_{epoch + 1}_s"] = time.time() - t_epoch
        model.eval()
        kl = eval_topk_kl(model, targets, pad_id, eval_bs)
        model.train()
        if kl is not None:
            logger.log(step, {"eval/kl": kl})
            print(f"epoch {epoch + 1}/{cfg.num_epochs} | eval/kl {kl:.4f} (top-{cfg.top_k} + tail, held-out)")

    # ---- on-policy stage (promptbake/onpolicy.py), off unless cfg.onpolicy_steps > 0
    from .onpolicy import onpolicy_stage
    timings.update(onpolicy_stage(model, tokenizer, targets, cfg, logger.log, step, max_batch_tokens))
    model.eval()
    final = run_dir / "final"
    t_phase = time.time()
    save_checkpoint(model, final, info, None)
    timings["save_s"] = time.time() - t_phase
    after = eval_full_kl(model, targets, pad_id, eval_bs)
    if after:
        logger.log(step, {f"eval/{k}": v for k, v in after.items()})
        before = next((r for r in _read_metrics(run_dir) if "eval/kl_full_before" in r), None)
        if before:
            b = before["eval/kl_full_before"]
            print(f"held-out full-vocabulary KL to the prompted teacher: {b:.4f} -> {after['kl_full']:.4f} "
                  f"({100 * (1 - after['kl_full'] / b):.0f}% lower) | top-1 agreement "
                  f"{before['eval/top1_agreement_before']:.3f} -> {after['top1_agreement']:.3f}")
    logger.close()
    if cfg.verify_queries > 0:
        verify(model, tokenizer, targets, cfg)
    timings["total_s"] = time.time() - t_start
    write_json(run_dir / "timings.json", timings)
    print(f"saved {final} in {timings['total_s']:.0f}s")
    return final


def write_held_out(path: Path, target: Target) -> None:
    """The held-out queries (never trained on), for evaluate.py."""
    groups = dict.fromkeys(target.examples[r].group for r in target.held_out)
    data = b"".join(orjson.dumps({"messages": orjson.loads(g)}) + b"\n" for g in groups)
    from .io import atomic_write_bytes

    atomic_write_bytes(path, data)


def _read_metrics(run_dir: Path) -> list[dict]:
    from .io import read_jsonl

    return [r for _, r in read_jsonl(run_dir / "metrics.jsonl")]


def verify(model, tokenizer, targets: list[Target], cfg) -> None:
    """Answers a few held-out queries with the baked model (no prompt) beside the prompted base."""
    from .chat import render_prompt_ids
    from .generate import decode_response, generate_ids

    t = targets[0]
    rows = t.held_out or t.train
    contexts, seen = [], set()
    for r in rows:
        if t.examples[r].group not in seen:
            seen.add(t.examples[r].group)
            contexts.append(orjson.loads(t.examples[r].group))
    contexts = contexts[:cfg.verify_queries]
    print(f"\nverification on {len(contexts)} held-out queries (greedy):")
    for ctx in contexts:
        baked_ids = generate_ids(model, tokenizer, [render_prompt_ids(tokenizer, ctx, t.student_prompt or None)],
                                 temperature=0, max_new_tokens=cfg.eval_max_new_tokens)[0][0]
        with model.disable_adapter():
            base_ids = generate_ids(model, tokenizer, [render_prompt_ids(tokenizer, ctx, t.system)], temperature=0,
                                    max_new_tokens=cfg.eval_max_new_tokens)[0][0]
        print(f"  user:             {ctx[-1]['content']}")
        print(f"  prompted base:    {decode_response(tokenizer, base_ids)[:200]!r}")
        print(f"  baked, no prompt: {decode_response(tokenizer, baked_ids)[:200]!r}\n")
