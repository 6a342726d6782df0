"""Export: the merged model equals the adapter model, the adapter is portable and checked for vLLM, bad input is
refused, a chained checkpoint exports as one model, and nothing half-written is left under the final name."""

import errno
import shutil

import orjson
import pytest
import torch
from conftest import make_cfg
from safetensors.torch import load_file, save_file
from test_lineage import POLITE, cfg_for
from test_train import write_data

from promptbake import export as ex
from promptbake import train
from promptbake.baked import load_baked
from promptbake.errors import UserError
from promptbake.export import export, go_template, public_id, vllm_problems

QUESTION = [{"role": "user", "content": "Tell me about the sea, please."}]


@pytest.fixture(scope="module")
def baked(tmp_path_factory, tiny_model_dir):
    """A project folder with a (pirate, on the tiny model) and b (polite, baked on a): a real 2-link chain."""
    root = tmp_path_factory.mktemp("export-project")
    (root / "prompt.md").write_text("You are a pirate. Always begin every reply with \"Arr!\" and talk like a pirate.\n")
    (root / "polite.md").write_text("You are unfailingly polite. Begin every reply with 'Certainly, dear friend.'\n")
    (root / "data").mkdir()
    write_data(root / "data" / "a.jsonl")
    write_data(root / "data" / "b.jsonl", POLITE)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        a = train.bake(cfg_for(tiny_model_dir, name="a")).resolve()
        b = train.bake(cfg_for(tiny_model_dir, name="b", init_from=str(a), prompt_file="polite.md")).resolve()
    return {"root": root, "a": a, "b": b}


@pytest.fixture
def no_converters(monkeypatch, tmp_path):
    monkeypatch.setenv("PROMPTBAKE_LLAMACPP_CONVERT", str(tmp_path / "none"))


def ids_of(tokenizer):
    return tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt",
                                         return_dict=True)["input_ids"]


def logits_and_greedy(model, ids, pad_id):
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0]
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                             pad_token_id=pad_id)
    return logits, out[0, ids.shape[1]:].tolist()


def assert_same_model(merged_dir, checkpoint):
    """The merged folder, loaded by plain transformers, against the adapter on its base (fp32: 1e-5 absolute)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    peft_model, tokenizer, _ = load_baked(checkpoint)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(merged_dir)
    assert tok.chat_template == tokenizer.chat_template
    ids = ids_of(tok)
    want_logits, want_tokens = logits_and_greedy(peft_model, ids, tokenizer.pad_token_id)
    got_logits, got_tokens = logits_and_greedy(merged, ids, tokenizer.pad_token_id)
    assert (got_logits - want_logits).abs().max().item() < 1e-5
    assert got_tokens == want_tokens
    with peft_model.disable_adapter():  # and the adapter does change the model: the test can fail
        base_logits, _ = logits_and_greedy(peft_model, ids, tokenizer.pad_token_id)
    assert (base_logits - want_logits).abs().max().item() > 1e-3


def test_merged_equals_the_adapter_model_and_the_adapter_is_portable(baked, tmp_path, no_converters, capsys):
    out = export(make_cfg(), str(baked["a"]), "merged,adapter", str(tmp_path / "exp"),
                 base_model_id="example-org/tiny-llama")
    printed = capsys.readouterr().out
    files = {p.name for p in (out / "merged").iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "README.md"} <= files
    assert_same_model(out / "merged", baked["a"])

    cfg = orjson.loads((out / "adapter" / "adapter_config.json").read_bytes())
    assert cfg["base_model_name_or_path"] == "example-org/tiny-llama"
    assert sorted(p.name for p in (out / "adapter").iterdir()) == ["README.md", "adapter_config.json",
                                                                   "adapter_model.safetensors"]
    assert vllm_problems(out / "adapter", chained=False) == []
    assert "vllm: vllm serve example-org/tiny-llama --enable-lora --max-lora-rank 16 --lora-modules " \
           f"a={out}/adapter" in printed
    manifest = orjson.loads((out / "export.json").read_bytes())
    assert set(manifest["formats"]) == {"merged", "adapter"} and manifest["lineage"] == ["a"]
    card = (out / "README.md").read_text()
    assert "Arr!" in card and "AutoModelForCausalLM" in card and "--enable-lora" in card
    assert (out / "merged" / "README.md").read_text() == card
    assert [p.name for p in tmp_path.glob(".exp.*")] == [".exp.lock"]  # no temp folder beside it, only the (empty) lock


def test_vllm_check_names_each_problem(baked, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(baked["a"], adapter)
    cfg = orjson.loads((adapter / "adapter_config.json").read_bytes())
    assert vllm_problems(adapter, chained=False) == []
    (adapter / "adapter_config.json").write_bytes(orjson.dumps({**cfg, "r": 12, "modules_to_save": ["lm_head"],
                                                                "use_dora": True}))
    tensors = load_file(adapter / "adapter_model.safetensors")
    save_file({**tensors, "base_model.model.lm_head.weight": torch.zeros(2, 2)}, adapter / "adapter_model.safetensors")
    problems = " | ".join(vllm_problems(adapter, chained=True))
    for why in ("chain", "rank 12", "modules_to_save", "DoRA", "lm_head.weight"):
        assert why in problems
    assert public_id("embedded") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert public_id(str(tmp_path)) is None and public_id("Qwen/Qwen3-0.6B") == "Qwen/Qwen3-0.6B"


def test_a_chained_checkpoint_exports_as_one_merged_model(baked, tmp_path, no_converters, capsys):
    out = export(make_cfg(), str(baked["b"]), "", str(tmp_path / "chain"))
    printed = capsys.readouterr().out
    assert_same_model(out / "merged", baked["b"])  # base + a + b: exactly what load_baked rebuilds
    assert not (out / "adapter").exists()
    assert "skipped | adapter | a chained checkpoint can't be one adapter" in printed and "merged" in printed
    assert "skipped | gguf | llama.cpp's converters are not installed" in printed  # one line, and the rest is made
    manifest = orjson.loads((out / "export.json").read_bytes())
    assert manifest["lineage"] == ["a", "b"] and list(manifest["formats"]) == ["merged"]
    card = (out / "README.md").read_text()
    assert "1. `a`" in card and "2. `b`" in card and "Certainly, dear friend" in card
    assert "vllm: vllm serve" in printed and "/merged" in printed


def test_private_prompt_leaves_no_trace_of_the_prompt(baked, tmp_path, no_converters):
    out = export(make_cfg(), str(baked["b"]), "merged", str(tmp_path / "private"), private_prompt=True)
    for f in out.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            assert b"unfailingly polite" not in data and b"You are a pirate" not in data, f
    assert "sha256" in (out / "README.md").read_text()


def test_bad_input_is_refused_and_nothing_half_written_is_left(baked, tmp_path, no_converters, monkeypatch):
    cfg = make_cfg()
    with pytest.raises(UserError, match="not a baked adapter"):
        export(cfg, str(baked["root"] / "data"), "merged", str(tmp_path / "x"))
    with pytest.raises(UserError, match="no such checkpoint folder"):
        export(cfg, str(tmp_path / "nope"), "merged", str(tmp_path / "x"))
    with pytest.raises(UserError, match="unknown format 'onnx'"):
        export(cfg, str(baked["a"]), "merged,onnx", str(tmp_path / "x"))
    with pytest.raises(UserError, match="nothing to export: llama.cpp's converters are not installed"):
        export(cfg, str(baked["a"]), "gguf", str(tmp_path / "x"))
    out = tmp_path / "exists"
    export(cfg, str(baked["a"]), "adapter", str(out))
    with pytest.raises(UserError, match="exists; pass --overwrite"):
        export(cfg, str(baked["a"]), "adapter", str(out))
    before = (out / "export.json").read_bytes()

    def disk_full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ex, "write_adapter", disk_full)  # the last format fails, after merged/ was written
    with pytest.raises(UserError, match="No space left on device"):
        export(cfg, str(baked["a"]), "merged,adapter", str(out), overwrite=True)
    assert (out / "export.json").read_bytes() == before and not (out / "merged").exists()  # the old export is intact
    with pytest.raises(UserError, match="No space left on device"):
        export(cfg, str(baked["a"]), "merged,adapter", str(tmp_path / "fresh"))
    # nothing half-written, no temp folder (the lock files beside the destinations are empty and harmless)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["exists"]
    monkeypatch.undo()
    monkeypatch.setenv("PROMPTBAKE_LLAMACPP_CONVERT", str(tmp_path / "none"))
    export(cfg, str(baked["a"]), "merged,adapter", str(out), overwrite=True)
    assert (out / "merged").is_dir() and (out / "adapter" / "adapter_config.json").exists()


@pytest.fixture
def project_copy(baked, tmp_path, monkeypatch):
    """A temporary copy of the baked project, as the working folder: the destructive cases run here."""
    root = tmp_path / "project"
    shutil.copytree(baked["root"], root)
    (root / ".git").mkdir()  # the project is a repository, as a user's clone is
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(root)
    return root


def tree(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_overwrite_never_deletes_a_run_the_project_or_a_home_folder(project_copy, no_converters):
    """--overwrite (or `overwrite: true` in a YAML file) replaces only an earlier export (issue #28)."""
    cfg = make_cfg()
    checkpoint = project_copy / "checkpoints" / "a" / "final"
    kept = tree(project_copy)
    cases = {"checkpoints/a": "is the run folder of the checkpoint", "checkpoints/a/final": "is the checkpoint",
             "checkpoints": "is the checkpoints folder", "data": "is the data folder", ".": "is the working folder",
             str(project_copy): "is the working folder", "..": "holds the working folder",
             str(project_copy.parent / "home"): "is your home folder", "/": "the filesystem root",
             "checkpoints/a/final/exp": "lies inside the checkpoint"}
    for out, why in cases.items():
        with pytest.raises(UserError, match=why):
            export(cfg, str(checkpoint), "merged,adapter", out, overwrite=True)
    assert tree(project_copy) == kept  # nothing deleted, no temporary folder left

    mine = project_copy / "notes"
    mine.mkdir()
    (mine / "todo.txt").write_text("keep me")
    with pytest.raises(UserError, match="is not an export"):
        export(cfg, str(checkpoint), "adapter", "notes", overwrite=True)
    (mine / "export.json").write_text('{"checkpoint": "x", "formats": {}}')  # a manifest, but other files beside it
    with pytest.raises(UserError, match="is not an export"):
        export(cfg, str(checkpoint), "adapter", "notes", overwrite=True)
    repo = project_copy / "other-repo"
    (repo / ".git").mkdir(parents=True)
    with pytest.raises(UserError, match="is a git repository"):
        export(cfg, str(checkpoint), "adapter", str(repo), overwrite=True)
    assert (mine / "todo.txt").read_text() == "keep me" and (repo / ".git").is_dir()

    out = export(cfg, str(checkpoint), "adapter", "exports/a")  # an earlier export is replaced, as asked
    export(cfg, str(checkpoint), "adapter", str(out), overwrite=True)
    assert (out / "adapter" / "adapter_config.json").exists()


def test_a_second_export_to_the_same_folder_stops_at_once(project_copy, no_converters):
    import fcntl
    import os

    from promptbake.locks import lock_path

    dest = project_copy / "exports" / "a"
    lock = lock_path(dest)
    lock.parent.mkdir(parents=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    os.write(fd, b"4242\nexport.py --out exports/a\nexport\n")
    fcntl.flock(fd, fcntl.LOCK_EX)  # another export holds the destination
    try:
        with pytest.raises(UserError, match="in use by process 4242"):
            export(make_cfg(), "checkpoints/a/final", "adapter", "exports/a")
    finally:
        os.close(fd)
    assert not dest.exists()


def test_bad_destinations_and_damaged_adapters_get_one_line(project_copy, no_converters):
    cfg = make_cfg()
    checkpoint = project_copy / "checkpoints" / "a" / "final"
    with pytest.raises(UserError, match="over 255 bytes; use a shorter name"):
        export(cfg, str(checkpoint), "adapter", "x" * 300)
    export(cfg, str(checkpoint), "adapter", "y" * 250)  # a legal long name: its lock and temp names stay legal
    damaged = project_copy / "checkpoints" / "a" / "damaged"
    shutil.copytree(checkpoint, damaged)
    (damaged / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="adapter weights do not read"):
        export(cfg, str(damaged), "adapter", "exports/d")
    (damaged / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="not a PEFT adapter config"):
        export(cfg, str(damaged), "adapter", "exports/d")
    assert not (project_copy / "exports" / "d").exists()


def test_the_card_says_which_weights_an_embedded_bake_fits(baked, tmp_path, no_converters):
    info = ex.read_bake_config(baked["a"])
    assert ex.embedded_note(info) == ""  # the tiny model is a local folder: nothing to say
    info["config"]["model_name_or_path"] = "embedded"
    assert "dequantised from the Q4_1 GGUF" in ex.embedded_note(info)


def test_the_ollama_template_renders_like_the_chat_template(tokenizer):
    template, stops = go_template(tokenizer)
    assert template.startswith("{{ if .System }}") and "{{ .Response }}" in template
    assert "<|im_end|>" in stops
    plain = template.split("{{ else }}")[1].split("{{ end }}")[0]
    with_system = template.split("{{ if .System }}")[1].split("{{ else }}")[0]
    q = "Who are you?"
    assert plain.replace("{{ .Prompt }}", q) == tokenizer.apply_chat_template(
        [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
    assert "You are a helpful AI assistant named SmolLM" in plain  # the default system line the model was baked with
    assert with_system.replace("{{ .System }}", "S").replace("{{ .Prompt }}", q) == tokenizer.apply_chat_template(
        [{"role": "system", "content": "S"}, {"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)


def test_the_script_refuses_bad_input_in_one_line(baked, tmp_path):
    from helpers import script

    p = script("export.py", "--checkpoint", baked["root"] / "data", cwd=tmp_path, check=False)
    assert p.returncode == 1 and p.stderr.startswith("error: ") and "not a baked adapter" in p.stderr
    assert "Traceback" not in p.stderr
    (tmp_path / "out").mkdir()
    p = script("export.py", "--checkpoint", baked["a"], "--out", tmp_path / "out", "--formats", "adapter", cwd=tmp_path,
               check=False)
    assert p.returncode == 1 and "exists; pass --overwrite" in p.stderr
    p = script("export.py", "--checkpoint", baked["a"], "--out", tmp_path / "out", "--formats", "adapter", "--overwrite",
               "--base_model_id", "org/tiny", cwd=tmp_path)
    assert "vllm: vllm serve org/tiny --enable-lora" in p.stdout and (tmp_path / "out" / "adapter").is_dir()
    p = script("export.py", "--checkpoint", baked["a"], "--out", baked["a"].parent, "--overwrite", cwd=tmp_path,
               check=False)  # the run folder itself: refused in one line, before any work
    assert p.returncode == 1 and "is the run folder of the checkpoint" in p.stderr and "Traceback" not in p.stderr
    assert (baked["a"] / "adapter_config.json").exists()


def test_the_converters_are_unpacked_from_the_sdist_and_found(tmp_path, monkeypatch):
    import io
    import tarfile

    from promptbake import llamacpp

    sdist = tmp_path / "llama_cpp_python-9.9.9.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        for name in ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/llama.py", "gguf-py/gguf/__init__.py",
                     "ggml/src/big.c", "gguf-py/../../evil.py"):
            data = f"# {name}\n".encode()
            info = tarfile.TarInfo(f"llama_cpp_python-9.9.9/vendor/llama.cpp/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    dest = tmp_path / "venv" / "llama.cpp-convert"
    monkeypatch.setenv("PROMPTBAKE_LLAMACPP_CONVERT", str(dest))
    assert llamacpp.find_converters()[0] is None and "python -m promptbake.llamacpp install" in llamacpp.find_converters()[1]
    dest.parent.mkdir()
    llamacpp.unpack(sdist, dest, "9.9.9")
    got = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert got == ["VERSION", "conversion/llama.py", "convert_hf_to_gguf.py", "convert_lora_to_gguf.py",
                   "gguf-py/gguf/__init__.py"]  # only the converters; nothing outside the folder
    assert not (tmp_path / "evil.py").exists() and not list(dest.parent.glob(".*.tmp"))
    assert llamacpp.find_converters() == (dest, "")
    assert llamacpp.pinned_version() == llamacpp.pinned_version(llamacpp.ROOT / "requirements-server.txt")
    req = tmp_path / "r.txt"
    req.write_text("# x\nllama-cpp-python[server]==0.3.36\n")
    assert llamacpp.pinned_version(req) == "0.3.36"


def test_a_model_family_llama_cpp_lacks_is_skipped_and_the_rest_written(baked, tmp_path, monkeypatch, capsys):
    from promptbake import llamacpp

    def unsupported(script, args):
        raise UserError(f"llama.cpp's {script} failed (exit 1): NotImplementedError: Architecture 'TinyLM' not supported!")

    monkeypatch.setattr(llamacpp, "find_converters", lambda: (tmp_path, ""))
    monkeypatch.setattr(llamacpp, "run_converter", unsupported)
    out = export(make_cfg(), str(baked["a"]), "", str(tmp_path / "e"))
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter", "export.json", "merged"]
    assert "skipped | gguf | llama.cpp's convert_hf_to_gguf.py failed (exit 1): NotImplementedError" in capsys.readouterr().out
    assert set(orjson.loads((out / "export.json").read_bytes())["skipped"]) == {"gguf", "ollama"}
    with pytest.raises(UserError, match="nothing exported: .*not supported"):
        export(make_cfg(), str(baked["a"]), "gguf", str(tmp_path / "g"))
    assert not (tmp_path / "g").exists()

    def disk_full(script, args):
        raise UserError(f"llama.cpp's {script} failed (exit 1): OSError: [Errno 28] No space left on device")

    monkeypatch.setattr(llamacpp, "run_converter", disk_full)  # any other failure stops the export
    with pytest.raises(UserError, match="No space left"):
        export(make_cfg(), str(baked["a"]), "merged,gguf", str(tmp_path / "h"))
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["e"]


def test_model_card_figures_read_the_new_eval_shape_and_the_old(tmp_path):
    from promptbake.export import eval_lines
    from promptbake.metrics import rate

    def adh(k, n, loops, llr):
        return {"answers": n, "loop": rate([True] * loops + [False] * (n - loops)),
                "non_degenerate": rate([True] * k + [False] * (n - loops - k)), "llr": {"mean": llr, "ci": [0, 1], "n": n}}

    new = {"target": "pirate", "kl_before": 0.5, "kl_after": 0.1, "n_queries": 10, "samples_per_query": 3,
           "answers_per_model": 40, "checks": [{"starts_with": "Arr!", "name": "begins with Arr!"}],
           "adherence": {"base": adh(0, 40, 0, -0.8), "prompted": adh(27, 40, 10, 0.5), "baked": adh(24, 40, 10, 0.3),
                         "baked_reprompted": adh(38, 40, 0, 0.6)}}
    (tmp_path / "eval.json").write_bytes(orjson.dumps(new))
    text = "\n".join(eval_lines(tmp_path))
    assert "| pirate | 0.5000 -> 0.1000 | 0.00 [0.00-0.09] / 0.90 [0.74-0.97] / 0.80 [0.63-0.90] / 0.95 [0.83-0.99] |" \
           " 0.00 [0.00-0.09] / 0.25 [0.14-0.40] / 0.25 [0.14-0.40] / 0.00 [0.00-0.09] | -0.800 / +0.500 / +0.300 / " \
           "+0.600 |" in text
    assert "40 answers per model (10 queries x (1 greedy + 3 sampled)); checks: begins with Arr!." in text
    old = {"target": "pirate", "kl_before": 0.5, "kl_after": 0.1,
           "adherence": {"base": {"marker_rate": 0.0}, "prompted": {"marker_rate": 0.9}, "baked": {"marker_rate": 0.8}}}
    (tmp_path / "eval.json").write_bytes(orjson.dumps(old))
    assert "| pirate | 0.5000 -> 0.1000 | 0.00 / 0.90 / 0.80 | - / - / - | - / - / - |" in eval_lines(tmp_path)


def test_the_card_shows_an_evaluation_on_other_queries_when_there_is_no_eval_json(tmp_path):
    """evaluate.py --queries writes eval_<queries>.json; the card shows it, as report.html does (issue #28, item 10)."""
    from promptbake.export import eval_lines

    assert "Not evaluated" in eval_lines(tmp_path)[0]
    ev = {"target": "pirate", "kl_before": 0.5, "kl_after": 0.1, "queries": "examples/sealed_questions.txt",
          "adherence": {"base": {"marker_rate": 0.0}, "prompted": {"marker_rate": 0.9}, "baked": {"marker_rate": 0.8}}}
    (tmp_path / "eval_sealed_questions.json").write_bytes(orjson.dumps(ev))
    text = "\n".join(eval_lines(tmp_path))
    assert "From `eval_sealed_questions.json`, on the queries of `examples/sealed_questions.txt`" in text
    assert "| pirate | 0.5000 -> 0.1000 | 0.00 / 0.90 / 0.80 |" in text


def test_model_card_figures_survive_a_bare_number_for_a_model_or_for_adherence(tmp_path):
    """A hand-edited eval.json with a bare rate where a model's entry (or the whole adherence block) was: the card
    shows what it can, never an AttributeError."""
    from promptbake.export import eval_lines

    bare = {"target": "pirate", "kl_before": 0.5, "kl_after": 0.1, "adherence": {"base": 0.0, "prompted": 0.9, "baked": 0.8}}
    (tmp_path / "eval.json").write_bytes(orjson.dumps(bare))
    assert "| pirate | 0.5000 -> 0.1000 | 0.00 / 0.90 / 0.80 | - / - / - | - / - / - |" in eval_lines(tmp_path)
    (tmp_path / "eval.json").write_bytes(orjson.dumps({**bare, "adherence": 0.8}))
    assert "| pirate | 0.5000 -> 0.1000 |  |  |  |" in eval_lines(tmp_path)
