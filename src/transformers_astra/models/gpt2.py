"""GPT2: causal attention; learned absolute positions are added to the input, so keys carry no positions."""

from __future__ import annotations

import torch
from torch import nn

from ..config import AstraConfig
from ..exchange import split_heads
from .base import ModelAdapter, TensorParallelPlan


class GPT2Adapter(ModelAdapter):
    model_type = "gpt2"
    causal = True

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        return [block.attn for block in model.base_model.h]

    def key_value_heads(self, module: nn.Module) -> int:
        return module.num_heads

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

    def tensor_parallel_plan(self, model: nn.Module) -> TensorParallelPlan:
        config = model.config
        return TensorParallelPlan(
            blocks=list(model.base_model.h),
            column=("attn.c_attn", "mlp.c_fc"),
            row=("attn.c_proj", "mlp.c_proj"),
            divisible={"n_head": config.n_head, "n_inner": config.n_inner or 4 * config.n_embd},
            fused_parts={"attn.c_attn": 3},  # [Q | K | V]
            # Conv1D's output width (nf) and the attention's split of c_attn's output into Q, K, V.
            per_rank_counts=("attn.c_attn.nf", "mlp.c_fc.nf", "attn.split_size", "attn.num_heads"),
            weights_in_out=True,  # Conv1D: x @ W + b
        )
