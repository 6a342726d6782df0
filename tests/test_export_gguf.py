"""The exported GGUF in the llama.cpp server the tests already build: it answers like the merged model, and baked."""

import re

import httpx
import pytest
import torch
from conftest import make_cfg
from test_llama_server import free_port, start_server, stop
from test_train import QA, write_data

from promptbake import train
from promptbake.export import export
from promptbake.llamacpp import find_converters

pytestmark = pytest.mark.slow
HELD_OUT = "What should I eat for breakfast?"  # not among the training questions
PIRATE = re.compile(r"\b(arr+|aye|matey|ahoy|ye|yer|pirates?|captain|seas?)\b", re.I)
FIRST_TOKENS = 4


def greedy(model, tokenizer, question, n=16):
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_the_gguf_answers_like_the_merged_model_and_shows_the_baked_behaviour(workdir, embedded_dir, tokenizer,
                                                                             capsys):
    pytest.importorskip("llama_cpp.server", reason="llama-cpp-python[server] is installed by `make test`")
    if find_converters()[0] is None:
        pytest.fail(find_converters()[1])  # make test installs them: their absence is a broken install
    from transformers import AutoModelForCausalLM

    # a quick bake on the real embedded model: 12 short pirate answers, 3 epochs at a high learning rate
    write_data(workdir / "data" / "default.jsonl", QA)
    final = train.bake(make_cfg(num_epochs=3, batch_size=4, learning_rate=5e-3, eval_fraction=0.25, save_steps=1000,
                                teacher_batch_size=12, max_new_tokens=32))
    out = export(make_cfg(), str(final), "merged,gguf,ollama", str(workdir / "exports" / "default"),
                 gguf_types="f16,lora")
    printed = capsys.readouterr().out
    gguf_dir = out / "gguf"
    assert sorted(p.name for p in gguf_dir.iterdir()) == ["Modelfile", "README.md", "default-f16.gguf",
                                                          "default-lora-f16.gguf"]
    modelfile = (gguf_dir / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./default-f16.gguf\nTEMPLATE") and "\nSYSTEM" not in modelfile
    assert f"ollama create default -f {out}/gguf/Modelfile" in printed

    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()
    want = greedy(merged, tokenizer, HELD_OUT)
    base = AutoModelForCausalLM.from_pretrained(embedded_dir, dtype=torch.float32).eval()
    before = greedy(base, tokenizer, HELD_OUT)
    del merged, base

    proc, url = start_server(free_port(), workdir / "server.log", gguf_dir / "default-f16.gguf")
    try:
        r = httpx.post(f"{url}/chat/completions", timeout=120, json={
            "messages": [{"role": "user", "content": HELD_OUT}], "temperature": 0, "max_tokens": 16})
        r.raise_for_status()
        got = r.json()["choices"][0]["message"]["content"]
    finally:
        stop(proc)
    print(f"base: {before!r}\nmerged: {want!r}\ngguf: {got!r}")
    first = [tokenizer(a.strip(), add_special_tokens=False)["input_ids"][:FIRST_TOKENS] for a in (want, got)]
    assert first[0] == first[1], (want, got)  # llama.cpp in f16 answers as the merged fp32 model does
    assert PIRATE.search(got), got  # the baked behaviour, with no system prompt sent
    assert not PIRATE.search(before), before  # which the base model does not show
