"""Speed and memory of every stage, against a naive baseline and the machine's matmul limit, in one run.

    python benchmarks/bench_bake.py                 # all figures, incl. a default `make bake` run (~10 min on 2 cores)
    python benchmarks/bench_bake.py --skip_make_bake
    python benchmarks/bench_bake.py --only_levers   # each speed lever: old | new | ratio (start-up, generation, training)
    make bench

Every figure is a median over --repeats, measured in this process, side by side. Writes benchmarks/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from promptbake.data import Row
from promptbake.forward import MIN_SHARED, backbone_and_head, common_prefix_len, pad_left, shared_prefix
from promptbake.loss import full_kl, head_topk_kl_with_tail
from promptbake.model import load_model, load_tokenizer, pick_device, resolve_model_path
from promptbake.precision import use_bf16
from promptbake.sampling import answer_locally
from promptbake.seeds import seed_queries
from promptbake.teacher import TeacherTopK, build_examples, save_checked, teacher_topk_rows, topk_id_dtype
from promptbake.train import Target, batch_loss, length_batches

ROOT = Path(__file__).resolve().parent.parent

PARAGRAPH = ("The sea is wide and the wind is strong, and every sailor knows the stars that guide the ship home. "
             "We keep the deck clean, the sails mended and the rum locked away until the harbour lights appear. ")


# ---------------------------------------------------------------- helpers
def median_time(fn, repeats: int, sync=lambda: None) -> float:
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def system_prompt(tokenizer, n_tokens: int) -> str:
    head = "You are a pirate. Always begin every reply with \"Arr!\" and talk like a pirate. "
    ids = tokenizer(head + PARAGRAPH * (n_tokens // 30 + 2), add_special_tokens=False)["input_ids"][:n_tokens]
    return tokenizer.decode(ids)


def synthetic_rows(tokenizer, n_rows: int, seed: int = 0, lengths=(32, 128)) -> list[Row]:
    """Real queries; responses of lengths drawn from U(lengths) tokens (default 32-128) with a fixed seed."""
    rng = random.Random(seed)
    text_ids = tokenizer(PARAGRAPH * 20, add_special_tokens=False)["input_ids"]
    queries = seed_queries()
    rows = []
    for i in range(n_rows):
        n = rng.randint(*lengths)
        start = rng.randint(0, len(text_ids) - n - 1)
        rows.append(Row(i + 1, [{"role": "user", "content": queries[i % len(queries)]}], None,
                        text_ids[start:start + n] + [tokenizer.eos_token_id], True))
    return rows


def matmul_limit(repeats: int, device: str, dtype) -> float:
    """GFLOP/s of plain GEMMs of this model's shapes, same threads: the machine's practical limit."""
    best = 0.0
    for m, k, n in [(1024, 576, 1536), (1024, 1536, 576), (1024, 576, 576), (512, 576, 49152)]:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        a @ b
        t = median_time(lambda: [a @ b for _ in range(5)], repeats, sync(device))
        best = max(best, 5 * 2 * m * k * n / t / 1e9)
    return best


def sync(device):
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def linear_params(model) -> tuple[int, int, int, int]:
    """(parameters in the transformer's linear layers, hidden size, vocabulary, layers)."""
    c = model.config
    n = sum(m.weight.numel() for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and "lm_head" not in name and "lora" not in name)
    return n, c.hidden_size, c.vocab_size, c.num_hidden_layers


def forward_flops(shape, seq_len: int, n_logits: int, context: int = 0) -> float:
    """One forward pass: linear layers, causal attention (QK and AV over the context), and lm_head rows."""
    n_lin, hidden, vocab, layers = shape
    attention = 4 * layers * hidden * seq_len * (context + seq_len / 2)
    return 2 * n_lin * seq_len + attention + 2 * hidden * vocab * n_logits


def batch_flops(shape, examples) -> float:
    """Forward + backward through activations of one student micro-batch as it is run: the common prefix
    once, then every row's own tokens attending to it."""
    seqs, n = [e.student_ids for e in examples], [e.n_response for e in examples]
    head = common_prefix_len(seqs, n) if len(seqs) > 1 else 0
    head = head if head >= MIN_SHARED else 0
    return 2 * (forward_flops(shape, head, 0) + sum(forward_flops(shape, len(s) - head, k, head) for s, k in zip(seqs, n)))


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


# ---------------------------------------------------------------- the figures
def bench_teacher(model, tokenizer, rows, k, batch, repeats, device):
    out = {}
    for label, n_sys in [("sys50", 50), ("sys2000", 2000)]:
        system = system_prompt(tokenizer, n_sys)
        examples, _ = build_examples(rows, tokenizer, system, "", 4096, True, "bench")
        n_tok = sum(e.n_response for e in examples)
        prefix = examples[0].teacher_ids[:common_prefix_len([e.teacher_ids for e in examples], [e.n_response for e in examples])]

        def with_reuse():
            teacher_topk_rows(model, examples, shared_prefix(model, prefix), k, batch, tokenizer.pad_token_id,
                              torch.int32)

        def without_reuse():
            teacher_topk_rows(model, examples, None, k, batch, tokenizer.pad_token_id, torch.int32)

        t_reuse = median_time(with_reuse, repeats, sync(device))
        t_plain = median_time(without_reuse, repeats, sync(device))
        shape = linear_params(model)
        suffix = [len(e.teacher_ids) - len(prefix) for e in examples]
        flops = sum(forward_flops(shape, s, e.n_response, len(prefix)) for s, e in zip(suffix, examples)) \
            + forward_flops(shape, len(prefix), 0)
        out[label] = {"system_tokens": len(prefix), "response_tokens": n_tok, "reuse_s": t_reuse, "recompute_s": t_plain,
                      "reuse_tok_per_s": n_tok / t_reuse, "recompute_tok_per_s": n_tok / t_plain,
                      "reuse_gflop_per_s": flops / t_reuse / 1e9, "reuse_gflop": flops / 1e9}
    return out


def cache_bytes(model, tokenizer, rows, k):
    examples, _ = build_examples(rows, tokenizer, system_prompt(tokenizer, 50), "", 4096, True, "bench")
    tensors = teacher_topk_rows(model, examples, None, k, 8, tokenizer.pad_token_id, topk_id_dtype(len(tokenizer)))
    n_tok = sum(e.n_response for e in examples)
    with tempfile.TemporaryDirectory() as d:
        save_checked(Path(d) / "s.safetensors", tensors)
        on_disk = (Path(d) / "s.safetensors").stat().st_size
    teacher = TeacherTopK(tensors["offsets"], tensors["response_ids"], tensors["ids"], tensors["logprobs"])
    return examples, teacher, {"in_memory": teacher.bytes_per_token, "on_disk": on_disk / n_tok}


def bench_training(model, tokenizer, examples, teacher, k, batch, steps, repeats, device, bf16):
    """Ours (cached teacher, response-only logits, top-K+tail, length buckets; bf16 autocast where the default
    uses it) against the naive way (teacher recomputed each step, full-vocab KL, logits at every position, random
    batches, fp32), equal steps; and ours in fp32 beside ours in bf16."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    target = Target("bench", "", "", Path("."), 1.0, examples, teacher, list(range(len(examples))), [])
    pad = tokenizer.pad_token_id
    rng = random.Random(0)
    ours_batches = length_batches(target.train, [len(e.student_ids) for e in examples], batch, rng)[:steps]
    naive_batches = [target.train[i:i + batch] for i in range(0, len(target.train), batch)][:steps]

    def ours(use_bf16=bf16):
        for rows in ours_batches:
            loss, _ = batch_loss(peft_model, target, rows, pad, use_bf16)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    def naive_logits(seqs):
        ids, mask = pad_left(seqs, pad, device)
        return peft_model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits

    def naive():
        for rows in naive_batches:
            ex = [examples[r] for r in rows]
            with torch.no_grad(), peft_model.disable_adapter():
                t_logits = naive_logits([e.teacher_ids for e in ex])
            s_logits = naive_logits([e.student_ids for e in ex])
            n = max(e.n_response for e in ex)
            valid = torch.arange(n, device=device)[None] >= torch.tensor([n - e.n_response for e in ex], device=device)[:, None]
            loss = full_kl(t_logits[:, -n - 1:-1], s_logits[:, -n - 1:-1], valid)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    t_ours = median_time(ours, repeats, sync(device))
    t_naive = median_time(naive, repeats, sync(device))
    t_fp32 = median_time(lambda: ours(False), repeats, sync(device)) if bf16 else t_ours
    shape = linear_params(peft_model)
    tokens = sum(examples[r].n_response for b in ours_batches for r in b)
    flops = sum(batch_flops(shape, [examples[r] for r in b]) for b in ours_batches)
    padded = sum(len(b) * max(len(examples[r].student_ids) for r in b) for b in ours_batches)
    padded_naive = sum(len(b) * max(len(examples[r].student_ids) for r in b) for b in naive_batches)
    return {"steps": len(ours_batches), "ours_s": t_ours, "naive_s": t_naive, "ratio": t_ours / t_naive,
            "bf16": bf16, "ours_fp32_s": t_fp32, "bf16_speedup": t_fp32 / t_ours,
            "response_tok_per_s": tokens / t_ours, "steps_per_s": len(ours_batches) / t_ours,
            "gflop_per_s": flops / t_ours / 1e9, "padding_ours": 1 - sum(len(examples[r].student_ids) for b in
                                                                          ours_batches for r in b) / padded,
            "padding_naive": 1 - sum(len(examples[r].student_ids) for b in naive_batches for r in b) / padded_naive}


def bench_student_kernels(model, repeats) -> dict:
    """The two kernels the bf16 student keeps out of plain autocast, at a training step's shapes (8 rows of 64
    response tokens after a 30-token shared prefix): attention forward + backward with bf16 inputs in the CPU's
    bf16 flash kernel against the same inputs upcast to fp32 (forward.py), and the head's chunked loss with its
    two matmuls in bf16 against fp32 (loss.head_loss)."""
    cfg = model.config
    heads, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    g = torch.Generator().manual_seed(0)
    q = torch.randn(8, heads, 64, d, generator=g).bfloat16()
    k, v = (torch.randn(8, kv, 94, d, generator=g).bfloat16() for _ in range(2))
    mask = torch.cat([torch.ones(8, 1, 64, 30, dtype=torch.bool), torch.ones(64, 64, dtype=torch.bool).tril()
                      .expand(8, 1, 64, 64)], -1)

    def attention(upcast):
        q_, k_, v_ = (t.clone().requires_grad_() for t in (q, k, v))
        a, b, c = (t.float() for t in (q_, k_, v_)) if upcast else (q_, k_, v_)
        torch.nn.functional.scaled_dot_product_attention(a, b, c, attn_mask=mask, enable_gqa=True).float().sum().backward()

    head = backbone_and_head(model)[1]
    hidden = torch.randn(512, cfg.hidden_size, generator=g, requires_grad=True)
    ids = torch.randint(0, head.weight.shape[0], (512, 20), generator=g)
    lps = torch.log_softmax(torch.randn(512, 20, generator=g), -1) - 0.1

    def head_loss(dtype):
        head_topk_kl_with_tail(hidden, head, ids, lps, matmul_dtype=dtype).backward()

    times = {"attention_bf16_s": median_time(lambda: attention(False), repeats),
             "attention_fp32_s": median_time(lambda: attention(True), repeats),
             "head_fp32_s": median_time(lambda: head_loss(None), repeats),
             "head_bf16_s": median_time(lambda: head_loss(torch.bfloat16), repeats)}
    times["attention_upcast_speedup"] = times["attention_bf16_s"] / times["attention_fp32_s"]
    times["head_bf16_speedup"] = times["head_fp32_s"] / times["head_bf16_s"]
    return times


def bench_generation(model, tokenizer, batch, repeats):
    rows = [Row(i, [{"role": "user", "content": q}]) for i, q in enumerate(seed_queries()[:batch])]
    system = system_prompt(tokenizer, 50)
    out = {}
    for b in (1, batch):
        def run():
            for _ in answer_locally(model, tokenizer, rows, system, temperature=0.7, max_new_tokens=48, batch_size=b,
                                    progress=False):
                pass
        out[f"batch_{b}_rows_per_s"] = len(rows) / median_time(run, repeats)
    out["speedup"] = out[f"batch_{batch}_rows_per_s"] / out["batch_1_rows_per_s"]
    return out


# ---------------------------------------------------------------- levers, each beside the path it replaced
def print_lever(label: str, unit: str, old: float, new: float) -> dict:
    """One `old | new | ratio` line (rates: new / old; seconds: old / new, so > 1 is faster either way)."""
    ratio = old / new if unit == "s" else new / old
    print(f"| {label} | {old:.3g} {unit} | {new:.3g} {unit} | {ratio:.2f}x |", flush=True)
    return {"old": old, "new": new, "unit": unit, "speedup": ratio}


def lever_startup(repeats: int) -> dict:
    """`python bake.py --num_epochs 0` (one bad setting) until its error line: the old path imported promptbake.train
    (torch, transformers, peft) before the settings were parsed, which the old script did at its top."""
    def run(pre: str) -> float:
        code = f"{pre}import runpy, sys\nsys.argv = ['bake.py', '--num_epochs', '0']\n" \
               f"runpy.run_path({str(ROOT / 'bake.py')!r}, run_name='__main__')"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        return median_time(lambda: subprocess.run([sys.executable, "-c", code], env=env, capture_output=True), repeats)

    return print_lever("start-up: bad setting to its error line", "s", run("import promptbake.train\n"), run(""))


def lever_training(path, tokenizer, rows, k, batch, steps, repeats) -> dict:
    """Training steps at the default settings (bf16 autocast on a bf16 CPU, 4-row micro-batches, the CPU's
    768-token pieces): the old path, where autocast cast every frozen base and head weight to bf16 at every use,
    beside the new one (cast once, forward.cast_once), alternating step by step on the same batches."""
    import contextlib

    from peft import LoraConfig, get_peft_model

    import promptbake.loss as loss_module
    import promptbake.train as train_module
    from promptbake.forward import token_pieces

    model = load_model(path, "cpu")  # a fresh one: the LoRA goes into it
    examples, _ = build_examples(rows, tokenizer, system_prompt(tokenizer, 50), "", 4096, True, "bench")
    with torch.inference_mode():
        t = teacher_topk_rows(model, examples, None, k, 8, tokenizer.pad_token_id, torch.int32)
    target = Target("bench", "", "", Path("."), 1.0, examples, TeacherTopK(t["offsets"], t["response_ids"], t["ids"],
                                                                          t["logprobs"]), list(range(len(examples))), [])
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    lengths = [len(e.student_ids) for e in examples]
    batches = length_batches(target.train, lengths, batch, random.Random(0))[:steps]
    new_paths = train_module.frozen_linears_as, loss_module.cast_once
    old_paths = (lambda m, d: contextlib.nullcontext()), (lambda w, d: w.to(d))
    bf16 = use_bf16("auto", "cpu")

    def step(rows_, old):
        train_module.frozen_linears_as, loss_module.cast_once = old_paths if old else new_paths
        try:
            total = sum(examples[r].n_response for r in rows_)
            for piece in token_pieces(rows_, lengths, 768):
                loss, n = batch_loss(peft_model, target, piece, tokenizer.pad_token_id, bf16)
                (loss * n / total).backward()
            peft_model.zero_grad(set_to_none=True)
        finally:
            train_module.frozen_linears_as, loss_module.cast_once = new_paths

    step(batches[0], True)
    step(batches[0], False)
    seconds = {True: 0.0, False: 0.0}
    for _ in range(repeats):
        for b in batches:
            for old in (True, False):
                t0 = time.perf_counter()
                step(b, old)
                seconds[old] += time.perf_counter() - t0
    tokens = repeats * sum(examples[r].n_response for b in batches for r in b)
    return print_lever(f"training tok/s, {batch}-row steps, bf16={bf16}", "tok/s", tokens / seconds[True],
                       tokens / seconds[False])


def lever_generation(model, tokenizer, batch, max_new_tokens, k, repeats) -> dict:
    """Rows/s of a generation batch answering with the free teacher logits kept (top-k), at 160-token answers: HF
    generate (the old path) beside our decode loop (sampling._generate), alternating, the same prompts and seeds."""
    from promptbake.chat import render_prompt_ids
    from promptbake.sampling import _generate, _generate_hf

    system = system_prompt(tokenizer, 50)
    prompts = [render_prompt_ids(tokenizer, [{"role": "user", "content": q}], system) for q in seed_queries()[:batch]]
    seconds = {"old": 0.0, "new": 0.0}
    for r in range(repeats):
        for name, fn in (("old", _generate_hf), ("new", _generate)):
            t0 = time.perf_counter()
            fn(model, tokenizer, prompts, temperature=1.0, max_new_tokens=max_new_tokens, seed=r, keep_topk=k)
            seconds[name] += time.perf_counter() - t0
    return print_lever(f"generation rows/s, batch {batch}, up to {max_new_tokens} tokens, top-{k} kept", "rows/s",
                       repeats * batch / seconds["old"], repeats * batch / seconds["new"])


def run_peak_rss(cmd, cwd, env) -> tuple[float, float]:
    """Runs cmd; returns (seconds, peak RSS in GB of it and its children), polled every 50 ms. (getrusage's
    RUSAGE_CHILDREN would count this benchmark's own memory: a forked child inherits the parent's high-water mark.)"""
    import psutil

    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ps, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.05)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd} failed:\n{proc.stderr.read().decode()[-2000:]}")
    return time.time() - t0, peak / 1e9


def bench_make_bake():
    """The default pipeline as `make bake` runs it after its install step (generate, bake, demo), in a scratch
    folder: wall time of each script, the bake's own phase times, and peak RSS."""
    with tempfile.TemporaryDirectory() as d:
        Path(d, "prompt.md").write_text((ROOT / "prompt.md").read_text())
        env = dict(os.environ)
        gen_s, gen_rss = run_peak_rss([sys.executable, str(ROOT / "generate_data.py")], d, env)
        bake_s, bake_rss = run_peak_rss([sys.executable, str(ROOT / "bake.py"), "--wandb_mode", "disabled"], d, env)
        demo_s, demo_rss = run_peak_rss([sys.executable, str(ROOT / "demo.py"), "--compare", "Who are you?"], d, env)
        timings = json.loads(Path(d, "checkpoints", "default", "timings.json").read_text())
        meta = json.loads(Path(d, "data", "default.meta.json").read_text())
    return {"total_s": gen_s + bake_s + demo_s, "generate_s": gen_s, "generate_rows_per_s": meta.get("rows_per_s"),
            "bake_s": bake_s, "demo_s": demo_s, "phases": timings, "peak_rss_gb": max(gen_rss, bake_rss, demo_rss),
            "generate_peak_rss_gb": gen_rss, "bake_peak_rss_gb": bake_rss, "demo_peak_rss_gb": demo_rss}


def levers(args, model=None, tokenizer=None) -> dict:
    """Each speed lever beside the path it replaced, in this process (benchmarks/README.md has the figures)."""
    path = resolve_model_path("embedded")
    tokenizer = tokenizer or load_tokenizer(path)
    model = model or load_model(path, "cpu")
    print(f"\nspeed levers, {torch.get_num_threads()} thread(s), median or sum over {args.repeats} repeats\n"
          f"| lever | old | new | ratio |\n|---|---|---|---|")
    out = {"threads": torch.get_num_threads(), "startup": lever_startup(args.repeats)}
    with torch.inference_mode():
        out["generation"] = lever_generation(model, tokenizer, args.lever_gen_batch, args.gen_tokens, args.top_k,
                                             args.repeats)
    rows = synthetic_rows(tokenizer, args.lever_rows, lengths=(120, 200))
    out["training"] = lever_training(path, tokenizer, rows, args.top_k, 4, args.lever_steps, args.repeats)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--gen_batch_size", type=int, default=16)
    p.add_argument("--top_k", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip_make_bake", action="store_true")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results.json"))
    p.add_argument("--only_make_bake", action="store_true", help="re-measure only the make bake figures into --out")
    p.add_argument("--only_levers", action="store_true", help="only the old | new | ratio figures of the speed levers")
    p.add_argument("--lever_rows", type=int, default=16, help="rows of 120-200 response tokens for the training lever")
    p.add_argument("--lever_steps", type=int, default=3, help="4-row steps per path per repeat (training lever)")
    p.add_argument("--gen_tokens", type=int, default=160, help="answer cap of the generation lever")
    p.add_argument("--lever_gen_batch", type=int, default=32, help="rows of the generation lever (the default gen_batch_size)")
    args = p.parse_args()
    if args.only_make_bake:
        results = json.loads(Path(args.out).read_text())
        results["make_bake"] = bench_make_bake()
        mb = results["make_bake"]
        results["targets"] = [t for t in results["targets"] if "make bake" not in t["figure"]] + [
            {"figure": "default make bake peak RSS (GB)", "value": mb["peak_rss_gb"], "target": "<= 3.0",
             "met": mb["peak_rss_gb"] <= 3.0},
            {"figure": "default make bake after install, wall time (min)", "value": mb["total_s"] / 60,
             "target": "<= 5.0", "met": mb["total_s"] / 60 <= 5.0}]
        Path(args.out).write_text(json.dumps(results, indent=2))
        print(json.dumps(results["make_bake"], indent=2))
        return

    if args.only_levers:
        Path(args.out).write_text(json.dumps(levers(args), indent=2))
        print(f"wrote {args.out}")
        return
    device = pick_device("auto")
    bf16 = use_bf16("auto", device)  # what the default bake trains in (promptbake/precision.py)
    dtype = torch.bfloat16 if bf16 or device != "cpu" else torch.float32
    path = resolve_model_path("embedded")
    tokenizer = load_tokenizer(path)
    model = load_model(path, device)
    rows = synthetic_rows(tokenizer, args.rows)
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({os.cpu_count()} cores)",
               "threads": torch.get_num_threads(), "torch": torch.__version__, "args": vars(args)}
    print(f"device: {results['device']} | threads {results['threads']} | rows {args.rows} | repeats {args.repeats}")

    results["matmul_gflop_per_s"] = matmul_limit(args.repeats, device, dtype)
    results["matmul_dtype"] = str(dtype).removeprefix("torch.")
    if dtype != torch.float32:
        results["matmul_gflop_per_s_fp32"] = matmul_limit(args.repeats, device, torch.float32)
    print(f"matmul limit: {results['matmul_gflop_per_s']:.1f} GFLOP/s in {results['matmul_dtype']} (what training "
          f"multiplies in)" + (f", {results['matmul_gflop_per_s_fp32']:.1f} in fp32" if dtype != torch.float32 else ""))
    with torch.inference_mode():
        results["teacher"] = bench_teacher(model, tokenizer, rows, args.top_k, args.batch_size, args.repeats, device)
        examples, teacher, results["cache_bytes_per_token"] = cache_bytes(model, tokenizer, rows, args.top_k)
        results["generation"] = bench_generation(model, tokenizer, args.gen_batch_size, args.repeats)
    results["training"] = bench_training(model, tokenizer, examples, teacher, args.top_k, args.batch_size, args.steps,
                                         args.repeats, device, bf16)
    if bf16 and device == "cpu":
        results["student_kernels"] = bench_student_kernels(model, args.repeats)
    results["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else rss_gb()
    results["levers"] = levers(args, tokenizer=tokenizer)  # a fresh model: bench_training put a LoRA into this one
    if not args.skip_make_bake:
        print("running the default make bake (generate + bake) in a scratch folder...")
        results["make_bake"] = bench_make_bake()

    t, tr, limit = results["teacher"], results["training"], results["matmul_gflop_per_s"]
    # the teacher runs in the model's dtype (fp32 on CPU), so its fraction is of the fp32 limit
    teacher_limit = results.get("matmul_gflop_per_s_fp32", limit) if device == "cpu" else limit
    figures = [
        ("our epoch / naive epoch, equal steps", tr["ratio"], "<=", 0.4),
        ("teacher time, 2000-token / 50-token system prompt", t["sys2000"]["reuse_s"] / t["sys50"]["reuse_s"], "<=", 1.3),
        ("student training, fraction of matmul limit", tr["gflop_per_s"] / limit, ">=", 0.5),
        ("teacher cache, fraction of matmul limit", t["sys50"]["reuse_gflop_per_s"] / teacher_limit, ">=", 0.5),
        ("teacher cache bytes per response token (disk)", results["cache_bytes_per_token"]["on_disk"], "<=", 130),
        ("local generation, default batch / batch 1", results["generation"]["speedup"], ">=", 4.0),
    ]
    if "make_bake" in results:
        figures.append(("default make bake peak RSS (GB)", results["make_bake"]["peak_rss_gb"], "<=", 3.0))
        figures.append(("default make bake after install, wall time (min)", results["make_bake"]["total_s"] / 60, "<=", 5.0))
    results["targets"] = [{"figure": f, "value": v, "target": f"{op} {goal}",
                           "met": v <= goal if op == "<=" else v >= goal} for f, v, op, goal in figures]

    print("\n| figure | measured | target | met |\n|---|---|---|---|")
    for r in results["targets"]:
        print(f"| {r['figure']} | {r['value']:.3f} | {r['target']} | {'yes' if r['met'] else 'NO'} |")
    print("\n| detail | value |\n|---|---|")
    for label, key in [("sys50", "sys50"), ("sys2000", "sys2000")]:
        print(f"| teacher {label}: tok/s with KV reuse / recomputed | {t[key]['reuse_tok_per_s']:.0f} / "
              f"{t[key]['recompute_tok_per_s']:.0f} |")
    print(f"| teacher FLOPs, 2000-token / 50-token system prompt (the arithmetic's floor for the time ratio) | "
          f"{t['sys2000']['reuse_gflop'] / t['sys50']['reuse_gflop']:.2f} |")
    print(f"| student training: response tok/s, steps/s | {tr['response_tok_per_s']:.0f}, {tr['steps_per_s']:.3f} |")
    print(f"| student training: bf16 autocast | {'on' if tr['bf16'] else 'off'}; step {tr['bf16_speedup']:.2f}x the fp32 one |")
    if "student_kernels" in results:
        sk = results["student_kernels"]
        print(f"| bf16 student, attention fwd+bwd per layer: bf16 flash / upcast to fp32 (ms) | "
              f"{1000 * sk['attention_bf16_s']:.1f} / {1000 * sk['attention_fp32_s']:.1f} "
              f"({sk['attention_upcast_speedup']:.2f}x) |")
        print(f"| bf16 student, head loss fwd+bwd on 512 tokens: fp32 / bf16 matmuls (ms) | "
              f"{1000 * sk['head_fp32_s']:.0f} / {1000 * sk['head_bf16_s']:.0f} ({sk['head_bf16_speedup']:.2f}x) |")
    print(f"| padding: ours / naive batches | {tr['padding_ours']:.1%} / {tr['padding_naive']:.1%} |")
    gen = results["generation"]
    print(f"| generation rows/s: batch 1 / batch {args.gen_batch_size} | "
          f"{gen['batch_1_rows_per_s']:.2f} / {gen[f'batch_{args.gen_batch_size}_rows_per_s']:.2f} |")
    print(f"| cache bytes per token: in memory / on disk | {results['cache_bytes_per_token']['in_memory']:.1f} / "
          f"{results['cache_bytes_per_token']['on_disk']:.1f} |")
    print(f"| peak memory of this benchmark (GB) | {results['peak_memory_gb']:.2f} |")
    if "make_bake" in results:
        mb = results["make_bake"]
        phases = ", ".join(f"{k} {v:.1f}" for k, v in mb["phases"].items())
        print(f"| make bake: {mb['total_s']:.0f}s = generate {mb['generate_s']:.0f}s + bake {mb['bake_s']:.0f}s + demo "
              f"{mb['demo_s']:.0f}s | {phases} |")
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
