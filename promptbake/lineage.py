"""Baking on a baked model: the chain of ancestors a checkpoint stands on, recorded and rebuilt.

A bake with `--init_from checkpoints/a/final` starts from the base model with a's adapter merged in (and a's
own ancestors before it). Its bake_config.json records the chain as `lineage`, oldest first: for each ancestor
its checkpoint folder, prompts and their hashes, data hash, config hash and the hash of its adapter file.
Whatever loads the checkpoint rebuilds the chain from that record alone (base, then each ancestor's adapter
merged in order) and refuses when an ancestor is missing or no longer the one that was baked on.
"""

from __future__ import annotations

from pathlib import Path

from peft import PeftModel
from safetensors import SafetensorError

from .errors import UserError
from .io import read_json, sha256_file, sha256_text

ADAPTER_FILE = "adapter_model.safetensors"
BAKE_CONFIG = "bake_config.json"
HELD_OUT = "held_out.jsonl"  # beside a run's checkpoints: the queries it never trained on, by target


def stored_path(path: Path) -> str:
    """A checkpoint path as recorded: relative to the working folder when inside it, so a project folder can move."""
    path = path.resolve()
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def ancestor_entry(checkpoint: Path, info: dict) -> dict:
    """What the chain records of one ancestor: enough to find it again and to tell it has not changed."""
    return {"checkpoint": stored_path(checkpoint), "name": info["config"].get("name", checkpoint.parent.name),
            "adapter_sha256": sha256_file(checkpoint / ADAPTER_FILE), "config_sha256": info.get("config_sha256"),
            "targets": [{**{k: t.get(k) for k in ("name", "system_prompt", "system_prompt_sha256", "student_prompt",
                                                   "data_sha256", "checks")},
                         # the regex its adherence was measured with: its own, else its bake's setting
                         "marker_regex": t.get("marker_regex") or info["config"].get("marker_regex", "")}
                        for t in info["targets"]]}


def lineage_of(checkpoint: Path, info: dict) -> list[dict]:
    """The chain a bake on top of `checkpoint` stands on: its ancestors, then itself."""
    return [*info.get("lineage", []), ancestor_entry(checkpoint, info)]


def _shape_error(info) -> str | None:
    """What in a bake_config.json is not as bake.py writes it (a hand edit), or None: every reader relies on these."""
    if not isinstance(info, dict):
        return "the file is not a JSON object"
    if not isinstance(info.get("config"), dict) or not isinstance(info["config"].get("model_name_or_path"), str):
        return "`config.model_name_or_path` is missing"
    targets = info.get("targets")
    if not isinstance(targets, list) or not targets or not all(
            isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("system_prompt"), str)
            for t in targets):
        return "`targets` is not a list of {name, system_prompt, ...}"
    lineage = info.get("lineage", [])
    if not isinstance(lineage, list):
        return "`lineage` is not a list"
    for i, a in enumerate(lineage, 1):
        if not (isinstance(a, dict) and all(isinstance(a.get(k), str) for k in ("checkpoint", "name", "adapter_sha256"))
                and isinstance(a.get("targets"), list) and all(isinstance(t, dict) for t in a["targets"])):
            return f"`lineage` entry {i} is not {{checkpoint, name, adapter_sha256, targets}}"
    return None


def check_info(info, path: Path) -> dict:
    """Returns a bake_config.json's contents (read from `path`) if every reader can use them; else one line."""
    problem = _shape_error(info)
    if problem:
        raise UserError(f"{path}: not as bake.py writes it ({problem}); restore the file, or bake that run again")
    return info


def check_each_once(lineage: list[dict], where: Path | str, own_adapter: Path | None = None) -> None:
    """A chain merges each ancestor once: a lineage that lists one twice (or the checkpoint itself, whose own
    adapter goes on top) would apply that adapter twice."""
    seen: dict[str, int] = {}
    if own_adapter is not None and own_adapter.exists():
        seen[sha256_file(own_adapter)] = 0
        seen[str(own_adapter.parent.resolve())] = 0
    for i, entry in enumerate(lineage, 1):
        for key in (entry["adapter_sha256"], str(Path(entry["checkpoint"]).resolve())):
            if key in seen:
                twice = "the checkpoint itself" if seen[key] == 0 else f"entry {seen[key]}'s adapter again"
                raise UserError(f"{where}: lineage entry {i} ({entry['checkpoint']}) is {twice}; a chain applies "
                                f"each ancestor once: restore the file, or bake again")
            seen[key] = i


def lineage_id(lineage: list[dict]) -> str:
    """A short fingerprint of a chain, for model identities (cache keys, data settings)."""
    return sha256_text("|".join(a["adapter_sha256"] for a in lineage))[:16] if lineage else ""


def find_ancestor(entry: dict, child: Path | None) -> Path:
    """The ancestor's folder: as recorded, else at the same place relative to the child's project folder
    (checkpoints/<run>/final sits two levels below it)."""
    recorded = Path(entry["checkpoint"])
    candidates = [recorded]
    if child is not None and not recorded.is_absolute() and len(child.resolve().parents) > 2:
        candidates.append(child.resolve().parents[2] / recorded)
    for c in candidates:
        if (c / ADAPTER_FILE).exists():
            return c
    who = f"{child} was baked on" if child else "the chain needs"
    raise UserError(f"{who} {entry['checkpoint']} ({entry['name']!r}), which is missing; restore that folder, "
                    f"or bake again without it")


def check_ancestor(entry: dict, folder: Path, child: Path | None) -> None:
    if sha256_file(folder / ADAPTER_FILE) != entry["adapter_sha256"]:
        who = f"{child} was baked on" if child else "the chain needs"
        raise UserError(f"{who} {folder}, whose adapter has changed since (its hash no longer matches); "
                        f"restore the original, or bake {child or 'this'} again on the new one")
    info = check_info(read_json(folder / BAKE_CONFIG), folder / BAKE_CONFIG) if (folder / BAKE_CONFIG).exists() else {}
    now = [t.get("system_prompt_sha256") for t in info.get("targets", [])]
    if now != [t.get("system_prompt_sha256") for t in entry["targets"]]:
        raise UserError(f"{folder}: its prompt is not the one recorded in the chain of {child}; restore it")


def merge_chain(model, lineage: list[dict], child: Path | None = None):
    """Merges each ancestor's adapter into `model` in order; returns the plain merged model."""
    if child is not None:
        check_each_once(lineage, child / BAKE_CONFIG, child / ADAPTER_FILE)
    elif lineage:  # a bake on a parent: the chain ends with the parent itself
        check_each_once(lineage, Path(lineage[-1]["checkpoint"]) / BAKE_CONFIG)
    for entry in lineage:
        folder = find_ancestor(entry, child)
        check_ancestor(entry, folder, child)
        try:
            model = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
        except (OSError, ValueError, RuntimeError, SafetensorError) as e:
            raise UserError(f"{folder}: the ancestor's adapter does not load ({(str(e).splitlines() or [''])[0]})") \
                from None
    model.eval()
    return model


def lineage_prompts(info: dict, marker_regex: str = "") -> list[dict]:
    """Every target of the chain, oldest first, this checkpoint's own last: bake, name, prompt, checks and marker
    regex (an ancestor's as recorded; this checkpoint's own, else `marker_regex`)."""
    own = [{**t, "marker_regex": t.get("marker_regex") or marker_regex} for t in info["targets"]]
    entries = [*info.get("lineage", []), {"name": info["config"].get("name"), "targets": own}]
    return [{"bake": e["name"], **{k: t.get(k) for k in ("name", "system_prompt", "marker_regex")},
             "checks": t.get("checks") or []} for e in entries for t in e["targets"]]
