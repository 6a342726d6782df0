"""set_strength scales the LoRA update through peft's own scale, right for rsLoRA (alpha / sqrt(r)) too."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from promptbake.baked import set_strength

IDS = torch.tensor([[5, 9, 2, 33, 17, 8, 41]])


@pytest.fixture(params=[True, False], ids=["rslora", "lora"])
def lora_model(request):
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2))
    # init_lora_weights=False: B is random too, so the update is not zero before any training
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=request.param,
                        init_lora_weights=False)
    return get_peft_model(base, config).eval()


def logits(model):
    with torch.inference_mode():
        return model(IDS).logits


def test_strength_one_is_the_adapter_as_loaded_and_zero_is_the_base(lora_model):
    baked = logits(lora_model)
    with lora_model.disable_adapter():
        base = logits(lora_model)
    assert not torch.allclose(baked, base, atol=1e-3)  # else the test shows nothing
    set_strength(lora_model, 0.0)
    torch.testing.assert_close(logits(lora_model), base)
    set_strength(lora_model, 1.0)
    torch.testing.assert_close(logits(lora_model), baked)


def test_half_strength_halves_a_layers_lora_delta(lora_model):
    layer = lora_model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        full = layer(x) - layer.base_layer(x)
        set_strength(lora_model, 0.5)
        half = layer(x) - layer.base_layer(x)
    torch.testing.assert_close(half, 0.5 * full)
