"""GPT2: causal attention; global positions come for free because the simulation sees the whole sequence."""

from __future__ import annotations

import torch
from torch import nn

from ..attention import split_heads
from ..config import AstraConfig
from .base import ModelAdapter


class GPT2Adapter(ModelAdapter):
    model_type = "gpt2"

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        return [block.attn for block in model.base_model.h]

    def validate(self, model: nn.Module, config: AstraConfig) -> None:
        super().validate(model, config)
        if getattr(model.config, "add_cross_attention", False):
            raise ValueError("ASTRA supports GPT2 self-attention only; this model has add_cross_attention=True")

    def max_positions(self, model: nn.Module) -> int | None:
        return model.config.n_positions  # learned position embeddings: position n_positions has no row

    def project_kv(self, module: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # c_attn is a Conv1D (x @ W + b) producing [Q | K | V]; the receiver needs only the K and V columns.
        width = module.embed_dim
        weight, bias = module.c_attn.weight, module.c_attn.bias
        key = torch.addmm(bias[width : 2 * width], hidden.reshape(-1, width), weight[:, width : 2 * width])
        value = torch.addmm(bias[2 * width :], hidden.reshape(-1, width), weight[:, 2 * width :])
        shape = (*hidden.shape[:-1], width)
        return split_heads(key.reshape(shape), module.num_heads), split_heads(value.reshape(shape), module.num_heads)
