"""Tiny random models shared by the tests (CPU, fp32)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    GPT2Model,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)

import transformers_astra as astra
from transformers_astra.calibration import collect_activations

GPT2_CLASSES = (GPT2Model, GPT2LMHeadModel, GPT2ForSequenceClassification)
VIT_CLASSES = (ViTModel, ViTForImageClassification)
TOL = 1e-5


def tiny_gpt2_config(**overrides) -> GPT2Config:
    values = dict(
        n_embd=32, n_layer=2, n_head=4, vocab_size=61, n_positions=64, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, num_labels=3, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    values.update(overrides)
    return GPT2Config(**values)


def tiny_vit_config(**overrides) -> ViTConfig:
    values = dict(
        image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, num_labels=5, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    values.update(overrides)
    return ViTConfig(**values)


# The Llama family: tiny configs with grouped-query attention (6 query heads, 2 K/V heads of width 8, so
# the kv mode's 2 * 16 values per token differ from the hidden width 48) and each family's own feature.
LLAMA_FAMILIES = ("llama", "qwen2", "qwen3", "mistral")
LLAMA_FEATURES = {
    # max_position_embeddings 8 < the test lengths: dynamic RoPE changes its frequencies with the length.
    "llama": dict(max_position_embeddings=8, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}),
    "qwen2": dict(use_sliding_window=True, sliding_window=4, max_window_layers=1),  # biases; layer 1 slides
    "qwen3": dict(head_dim=8, use_sliding_window=True, sliding_window=5, max_window_layers=1),  # k_norm
    "mistral": dict(sliding_window=5),  # every layer slides
}


def tiny_llama_config(family: str = "llama", **overrides):
    values = dict(
        hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
        vocab_size=61, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, attention_dropout=0.0,
        rms_norm_eps=1e-6,
    )
    values.update(LLAMA_FEATURES[family])
    values.update(overrides)
    return AutoConfig.for_model(family, **values)


def tiny_llama(family: str = "llama", **overrides):
    """A random causal LM of the family (eval mode) and its untouched copy."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(family, **overrides)).eval()
    return model, copy.deepcopy(model)


def make_lossless(model, batch) -> None:
    """Every vector a layer sends becomes a codeword, so encoding then decoding returns it exactly."""
    for layer_idx, vectors in collect_activations(model, [batch], progress=False).items():
        quantizer = astra.quantizers(model)[layer_idx]
        grouped = vectors.reshape(-1, quantizer.groups, quantizer.group_width).transpose(0, 1)
        assert grouped.shape[1] <= quantizer.codebook_size
        with torch.no_grad():
            quantizer.codebook.fill_(1e6)
            quantizer.codebook[:, : grouped.shape[1]] = grouped


def make_pair(model_class, config):
    """A random model in eval mode and an untouched deep copy of it (the reference)."""
    torch.manual_seed(0)
    model = model_class(config).eval()
    return model, copy.deepcopy(model)


def main_output(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output.last_hidden_state


def gpt2_batch(batch: int = 2, length: int = 12, left_pad: int = 0, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 61, (batch, length), generator=generator)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    if left_pad:
        attention_mask[-1, :left_pad] = 0
        input_ids[-1, :left_pad] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def vit_batch(batch: int = 2, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=generator)}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
