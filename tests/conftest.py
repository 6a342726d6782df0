import os

import pytest
import torch

os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network here; a test must never wait on the hub
# In-process tests run small tensors: one thread is several times faster than torch's default on a busy
# 2-core machine (24 s against over 5 min). Scripts run by the slow tests keep the default.
torch.set_num_threads(int(os.environ.get("PROMPTBAKE_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def embedded_dir():
    """The embedded SmolLM2 converted to a plain HF folder (converted once per machine, then cached)."""
    from promptbake.model import resolve_model_path

    return resolve_model_path("embedded")


@pytest.fixture(scope="session")
def tokenizer(embedded_dir):
    from promptbake.model import load_tokenizer

    return load_tokenizer(embedded_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, embedded_dir, tokenizer):
    """A 2-layer random Llama with SmolLM2's real tokenizer and template: fast, and exercises every code path."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                         initializer_range=0.2)  # large enough that the system prompt changes the outputs
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A scratch project folder with prompt.md, as a user would have."""
    (tmp_path / "prompt.md").write_text("You are a pirate. Always begin every reply with \"Arr!\" and talk like a pirate.\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "checkpoints").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


def make_cfg(**kw):
    from promptbake.config import Config

    kw.setdefault("wandb_mode", "disabled")
    kw.setdefault("verify_queries", 0)
    # In-process tests pin exact numbers, which must not depend on whether the machine's CPU has native bf16
    # (bf16 = auto). tests/test_precision.py runs the bf16 path on purpose; the scripts' tests run the default.
    kw.setdefault("bf16", "off")
    return Config(**kw)
