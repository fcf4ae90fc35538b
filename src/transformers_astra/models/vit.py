"""ViT: bidirectional attention and Distributed Class Tokens (one CLS copy per shard, mean-pooled)."""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..attention import split_heads
from ..config import AstraConfig
from ..sharding import ShardLayout
from .base import ModelAdapter


class ViTAdapter(ModelAdapter):
    model_type = "vit"

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        return [layer.attention for layer in model.base_model.layers]

    def project_kv(self, module: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        heads = module.num_attention_heads
        return split_heads(module.k_proj(hidden), heads), split_heads(module.v_proj(hidden), heads)

    def cls_per_shard(self, config: AstraConfig) -> int:
        return 1 if config.distributed_cls else 0

    def install(self, model: nn.Module, state) -> list:
        if not state.config.distributed_cls:
            return []
        vit = model.base_model
        return [
            vit.register_forward_pre_hook(_spread_attention_mask(state), with_kwargs=True),
            vit.embeddings.register_forward_hook(_spread_class_token(state)),
            vit.layernorm.register_forward_hook(_pool_class_tokens(state)),
        ]


def distributed_cls_layout(state, num_patches: int) -> ShardLayout:
    config = state.config
    return ShardLayout.for_sequence(num_patches + config.num_devices, config.num_devices, config.shard_sizes, 1)


@functools.lru_cache(maxsize=64)
def spread_index(layout: ShardLayout, device: torch.device) -> torch.Tensor:
    """Positions in [CLS, patches...] that make [CLS, shard 0 patches, CLS, shard 1 patches, ...]."""
    index = []
    next_patch = 1
    for size in layout.sizes:
        index.append(0)
        index.extend(range(next_patch, next_patch + size - 1))
        next_patch += size - 1
    with torch.inference_mode(False):  # cached: must stay usable by forwards that autograd records
        return torch.tensor(index, device=device)


def _spread_class_token(state):
    def hook(module, args, embeddings: torch.Tensor) -> torch.Tensor:
        layout = distributed_cls_layout(state, embeddings.shape[1] - 1)
        return embeddings[:, spread_index(layout, embeddings.device)]

    return hook


def _spread_attention_mask(state):
    def hook(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is None or mask.ndim != 2:
            return None
        layout = distributed_cls_layout(state, mask.shape[1] - 1)
        kwargs["attention_mask"] = mask[:, spread_index(layout, mask.device)]
        return args, kwargs

    return hook


def _pool_class_tokens(state):
    def hook(module, args, output: torch.Tensor) -> torch.Tensor:
        if state.runtime is not None:  # a real rank holds one CLS copy; the runtime gathers the others
            return state.runtime.pool_class_tokens(output)
        layout = distributed_cls_layout(state, output.shape[1] - state.config.num_devices)
        cls_positions = torch.tensor(layout.offsets[:-1], device=output.device)
        is_patch = torch.ones(output.shape[1], dtype=torch.bool, device=output.device)
        is_patch[cls_positions] = False
        pooled = output[:, cls_positions].mean(dim=1, keepdim=True)
        return torch.cat([pooled, output[:, is_patch]], dim=1)

    return hook
