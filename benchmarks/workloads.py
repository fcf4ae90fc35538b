"""The two benchmark workloads, with random weights (latency does not depend on the weights' values).

- ``gpt2``: GPT2-small shape (12 layers, width 768, 12 heads), prefill of 1024 tokens; only the last
  token's logits are computed (time to first token).
- ``vit``: ViT-Base/16 at 224 px, 197 tokens (196 patches + CLS), 1000 classes.

Every rank builds the same model from the same seed; ``small=True`` gives a 2-layer model of width 64
for tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GPT2Config, GPT2LMHeadModel, ViTConfig, ViTForImageClassification

WORKLOADS = ("gpt2", "vit")


@dataclass
class Workload:
    name: str
    model: torch.nn.Module
    inputs: dict  # keyword arguments of the model's forward
    num_tokens: int
    causal: bool


def build(name: str, small: bool = False, seed: int = 0) -> Workload:
    if name not in WORKLOADS:
        raise ValueError(f"workload must be one of {WORKLOADS}, got {name!r}")
    torch.manual_seed(seed)
    if name == "gpt2":
        config = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=101) if small else GPT2Config()
        model = GPT2LMHeadModel(config)
        length = 48 if small else 1024
        input_ids = torch.randint(0, config.vocab_size, (1, length), generator=torch.Generator().manual_seed(seed + 1))
        workload = Workload(name, model, {"input_ids": input_ids}, length, causal=True)
    else:
        config = (
            ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                      image_size=32, patch_size=8, num_labels=10)
            if small
            else ViTConfig(num_labels=1000)  # ViTConfig's defaults are ViT-Base/16 at 224 px
        )
        model = ViTForImageClassification(config)
        size = config.image_size
        pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))
        workload = Workload(name, model, {"pixel_values": pixels}, (size // config.patch_size) ** 2 + 1, causal=False)
    workload.model.set_attn_implementation("sdpa")
    workload.model.eval()
    return workload
