"""Megatron-style tensor parallelism: two all-reduces per block.

Attention heads and the MLP's hidden units are split over the N ranks. The input-side projections
(Q/K/V, MLP up) are column-parallel: each rank keeps the output columns of its heads/units. The
output-side projections (attention out, MLP down) are row-parallel: each rank keeps the matching
input rows and produces a partial sum, which one all-reduce (a forward hook) turns into the full
result; the bias is added by rank 0 only. Embeddings, norms and the head are replicated. With
grouped-query attention the K/V heads split like the query heads (each rank keeps the K/V heads its
query heads use). Which layers are which is the family's `TensorParallelPlan` (its adapter's
``tensor_parallel_plan``); this file knows no family.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from transformers_astra.models import adapter_for

from ..workloads import Workload
from .single import last_logits, logits_kwargs


class TensorParallel:
    name = "tp"

    def setup(self, workload: Workload, rank: int, world: int) -> None:
        """Split the model's blocks as its adapter's `TensorParallelPlan` declares (family knowledge lives there)."""
        self.workload, self.rank, self.world = workload, rank, world
        plan = adapter_for(workload.model).tensor_parallel_plan(workload.model)
        for name, value in plan.divisible.items():
            if value % world:
                raise ValueError(f"tensor parallelism needs {name}={value} divisible by N={world}")
        out_dim, in_dim = (1, 0) if plan.weights_in_out else (0, 1)
        for block in plan.blocks:
            for path in plan.column:
                _column_parallel(block.get_submodule(path), plan.fused_parts.get(path, 1), out_dim, rank, world)
            for path in plan.row:
                _row_parallel(block.get_submodule(path), in_dim, rank, world)
            for path in plan.per_rank_counts:
                owner, _, attribute = path.rpartition(".")
                module = block.get_submodule(owner)
                setattr(module, attribute, getattr(module, attribute) // world)

    @torch.inference_mode()
    def forward(self) -> torch.Tensor | None:
        output = self.workload.model(**self.workload.inputs, **logits_kwargs(self.workload))
        return last_logits(self.workload, output) if self.rank == 0 else None


def _slice(tensor: torch.Tensor, dim: int, rank: int, world: int) -> torch.Tensor:
    return tensor.chunk(world, dim=dim)[rank].clone()


def _keep(module: nn.Module, name: str, value: torch.Tensor) -> None:
    setattr(module, name, nn.Parameter(value, requires_grad=False))


def _all_reduce_output(module, args, output):
    dist.all_reduce(output)
    return output


def _column_parallel(module: nn.Module, parts: int, out_dim: int, rank: int, world: int) -> None:
    """Keep this rank's output features (of each of ``parts`` fused outputs, e.g. Q|K|V) and their bias."""

    def split(tensor: torch.Tensor, dim: int) -> torch.Tensor:
        pieces = tensor.split(tensor.shape[dim] // parts, dim=dim)
        return torch.cat([_slice(piece, dim, rank, world) for piece in pieces], dim=dim)

    _keep(module, "weight", split(module.weight, out_dim))
    if module.bias is not None:
        _keep(module, "bias", split(module.bias, 0))


def _row_parallel(module: nn.Module, in_dim: int, rank: int, world: int) -> None:
    """Keep this rank's input features; the partial sums meet in an all-reduce; rank 0 adds the bias."""
    _keep(module, "weight", _slice(module.weight, in_dim, rank, world))
    if rank != 0 and module.bias is not None:
        _keep(module, "bias", torch.zeros_like(module.bias))
    module.register_forward_hook(_all_reduce_output)
