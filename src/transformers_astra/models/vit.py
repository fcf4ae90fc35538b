"""ViT: bidirectional attention and Distributed Class Tokens (one CLS copy per shard, mean-pooled).

A rank of the distributed runtime embeds only the rows of the patch grid that hold its patches
(`rank_hooks`), and pools its CLS copy with the other ranks' through the exchange. With
``distributed_cls=False`` the one CLS is the first token of shard 0; after the last layer every rank gets rank
0's (`Exchange.with_first_token`), so that every rank returns the same classification.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..config import AstraConfig
from ..exchange import split_heads
from ..sharding import ShardLayout
from .base import ModelAdapter, RankView, TensorParallelPlan


class ViTAdapter(ModelAdapter):
    model_type = "vit"
    causal = False

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        return [layer.attention for layer in model.base_model.layers]

    def key_value_heads(self, module: nn.Module) -> int:
        return module.num_attention_heads

    def project_kv(self, module: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        heads = module.num_attention_heads
        return split_heads(module.k_proj(hidden), heads), split_heads(module.v_proj(hidden), heads)

    def tensor_parallel_plan(self, model: nn.Module) -> TensorParallelPlan:
        config = model.config
        return TensorParallelPlan(
            blocks=list(model.base_model.layers),
            column=("attention.q_proj", "attention.k_proj", "attention.v_proj", "mlp.fc1"),
            row=("attention.o_proj", "mlp.fc2"),
            divisible={"num_attention_heads": config.num_attention_heads, "intermediate_size": config.intermediate_size},
            per_rank_counts=("attention.num_attention_heads",),
        )

    def cls_per_shard(self, config: AstraConfig) -> int:
        return 1 if config.distributed_cls else 0

    def install(self, model: nn.Module, state) -> list:
        vit = model.base_model
        if not state.config.distributed_cls:
            return [vit.layernorm.register_forward_hook(_share_class_token(state))]
        return [
            vit.register_forward_pre_hook(_spread_attention_mask(state), with_kwargs=True),
            vit.embeddings.register_forward_hook(_spread_class_token(state)),
            vit.layernorm.register_forward_hook(_pool_class_tokens(state)),
        ]

    # ------------------------------------------------------------------------------------ the runtime
    def rank_layout(self, model: nn.Module, state, inputs: Mapping[str, Any]) -> ShardLayout:
        num_patches = model.base_model.embeddings.patch_embeddings.num_patches
        if not state.config.distributed_cls:
            return state.layout(num_patches + 1)  # [CLS, patches] cut as the simulation cuts them
        return distributed_cls_layout(state, num_patches)

    def key_padding(self, inputs: Mapping[str, Any], layout: ShardLayout) -> torch.Tensor | None:
        mask = inputs.get("attention_mask")
        if mask is None:
            return None
        if not layout.class_tokens_per_shard:  # one class token: the layout's order is [CLS, patches]
            return mask.bool()
        return mask[:, spread_index(layout, mask.device)].bool()  # [CLS, patches] -> the spread order of the layout

    def rank_inputs(self, inputs: Mapping[str, Any], view: RankView) -> dict[str, Any]:
        return {name: value for name, value in inputs.items() if name != "attention_mask"}  # the exchange masks keys

    def rank_hooks(self, model: nn.Module, view: RankView) -> list:
        embeddings = model.base_model.embeddings
        projection = embeddings.patch_embeddings.projection
        rows = _PatchRows(view)
        return [
            projection.register_forward_pre_hook(rows.crop),
            projection.register_forward_hook(rows.pad),
            # Registered after `install`'s hook, so it sees [CLS, shard 0, CLS, shard 1, ...] and keeps this rank's part.
            embeddings.register_forward_hook(rows.keep_own_tokens),
        ]


class _PatchRows:
    """Each rank embeds only the rows of patches it holds: the patch convolution sees just those pixels."""

    def __init__(self, view: RankView):
        self.view = view
        self.grid: tuple[int, int, int] | None = None

    def own_rows(self, grid_width: int, num_patches: int) -> tuple[int, int]:
        """Rows of the patch grid that hold this rank's patches (its first and last row may be partial)."""
        start, end = self.view.bounds
        rank = self.view.rank
        if not self.view.layout.class_tokens_per_shard:  # one class token, before shard 0's patches
            first_patch, last_patch = max(start - 1, 0), end - 2
        else:
            first_patch, last_patch = start - rank, end - rank - 2  # minus one CLS copy per earlier shard
        if last_patch < first_patch:
            raise ValueError(f"rank {rank}'s shard {self.view.bounds} holds no patch: use fewer devices for {num_patches} patches")
        return first_patch // grid_width, last_patch // grid_width + 1

    def crop(self, module, args):
        pixel_values = args[0]
        patch = module.stride[0]
        grid = (pixel_values.shape[-2] // patch, pixel_values.shape[-1] // module.stride[1])
        first_row, end_row = self.own_rows(grid[1], grid[0] * grid[1])
        self.grid = (first_row, end_row, grid[0])
        return (pixel_values[..., first_row * patch : end_row * patch, :],)

    def pad(self, module, args, output: torch.Tensor) -> torch.Tensor:
        # Zeros where other ranks' patches would be, so that transformers' embeddings keep their shapes;
        # `keep_own_tokens` drops those positions right after.
        first_row, end_row, grid_rows = self.grid
        return torch.nn.functional.pad(output, (0, 0, first_row, grid_rows - end_row))

    def keep_own_tokens(self, module, args, embeddings: torch.Tensor) -> torch.Tensor:
        layout = self.view.layout
        if embeddings.shape[1] != layout.total:
            raise ValueError(f"expected {layout.total} tokens after the embeddings, got {embeddings.shape[1]}")
        start, end = self.view.bounds
        return embeddings[:, start:end]


def distributed_cls_layout(state, num_patches: int) -> ShardLayout:
    config = state.config
    return ShardLayout.for_sequence(num_patches + config.num_devices, config.num_devices, state.shard_weights(num_patches), 1)


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


def _share_class_token(state):
    def hook(module, args, output: torch.Tensor) -> torch.Tensor:
        return state.exchange.with_first_token(output)  # the classifier reads token 0 on every rank

    return hook


def _pool_class_tokens(state):
    def hook(module, args, output: torch.Tensor) -> torch.Tensor:
        # The first token of every shard held here is its CLS copy: all N in the simulation, one on a rank.
        exchange = state.exchange
        starts = exchange.shard_starts(output.shape[1])
        is_patch = torch.ones(output.shape[1], dtype=torch.bool, device=output.device)
        is_patch[starts] = False
        pooled = exchange.mean_across_shards(output[:, starts])
        return torch.cat([pooled, output[:, is_patch]], dim=1)

    return hook
