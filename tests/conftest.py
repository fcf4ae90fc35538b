"""Tiny random models shared by the tests (CPU, fp32)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    GPT2Model,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)

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
