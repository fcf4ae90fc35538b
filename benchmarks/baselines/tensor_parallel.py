"""Megatron-style tensor parallelism: two all-reduces per block.

Attention heads and the MLP's hidden units are split over the N ranks. The input-side projections
(Q/K/V, MLP up) are column-parallel: each rank keeps the output columns of its heads/units. The
output-side projections (attention out, MLP down) are row-parallel: each rank keeps the matching
input rows and produces a partial sum, which one all-reduce (a forward hook) turns into the full
result; the bias is added by rank 0 only. Embeddings, LayerNorms and the head are replicated.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..workloads import Workload
from .single import last_logits, logits_kwargs


class TensorParallel:
    name = "tp"

    def setup(self, workload: Workload, rank: int, world: int) -> None:
        self.workload, self.rank, self.world = workload, rank, world
        config = workload.model.config
        if config.num_attention_heads % world:
            raise ValueError(f"tensor parallelism needs num_attention_heads={config.num_attention_heads} divisible by N={world}")
        shard = SHARDERS[config.model_type]
        for block in blocks(workload.model):
            shard(block, rank, world)

    @torch.inference_mode()
    def forward(self) -> torch.Tensor | None:
        output = self.workload.model(**self.workload.inputs, **logits_kwargs(self.workload))
        return last_logits(self.workload, output) if self.rank == 0 else None


def blocks(model: nn.Module) -> list[nn.Module]:
    base = model.base_model
    return list(base.h if model.config.model_type == "gpt2" else base.layers)


def _slice(tensor: torch.Tensor, dim: int, rank: int, world: int) -> torch.Tensor:
    return tensor.chunk(world, dim=dim)[rank].clone()


def _keep(module: nn.Module, name: str, value: torch.Tensor) -> None:
    setattr(module, name, nn.Parameter(value, requires_grad=False))


def _all_reduce_output(module, args, output):
    dist.all_reduce(output)
    return output


def _row_parallel(module: nn.Module, in_dim: int, rank: int, world: int) -> None:
    """Keep this rank's input rows; the partial sums meet in an all-reduce; rank 0 adds the bias."""
    _keep(module, "weight", _slice(module.weight, in_dim, rank, world))
    if rank != 0:
        _keep(module, "bias", torch.zeros_like(module.bias))
    module.register_forward_hook(_all_reduce_output)


def _shard_gpt2_block(block: nn.Module, rank: int, world: int) -> None:
    attn, mlp = block.attn, block.mlp
    width = attn.embed_dim
    # GPT2's Conv1D weights are (in, out); c_attn's out is [Q | K | V], each split by heads.
    q, k, v = attn.c_attn.weight.split(width, dim=1)
    qb, kb, vb = attn.c_attn.bias.split(width, dim=0)
    _keep(attn.c_attn, "weight", torch.cat([_slice(w, 1, rank, world) for w in (q, k, v)], dim=1))
    _keep(attn.c_attn, "bias", torch.cat([_slice(b, 0, rank, world) for b in (qb, kb, vb)]))
    attn.c_attn.nf = attn.c_attn.weight.shape[1]
    attn.split_size = width // world
    attn.num_heads //= world
    _row_parallel(attn.c_proj, 0, rank, world)
    _keep(mlp.c_fc, "weight", _slice(mlp.c_fc.weight, 1, rank, world))
    _keep(mlp.c_fc, "bias", _slice(mlp.c_fc.bias, 0, rank, world))
    mlp.c_fc.nf = mlp.c_fc.weight.shape[1]
    _row_parallel(mlp.c_proj, 0, rank, world)


def _shard_vit_block(block: nn.Module, rank: int, world: int) -> None:
    attn, mlp = block.attention, block.mlp
    # nn.Linear weights are (out, in): column-parallel keeps output rows, row-parallel keeps input columns.
    for linear in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.fc1):
        _keep(linear, "weight", _slice(linear.weight, 0, rank, world))
        if linear.bias is not None:
            _keep(linear, "bias", _slice(linear.bias, 0, rank, world))
    attn.num_attention_heads //= world
    _row_parallel(attn.o_proj, 1, rank, world)
    _row_parallel(mlp.fc2, 1, rank, world)


SHARDERS = {"gpt2": _shard_gpt2_block, "vit": _shard_vit_block}
