"""Receiver-side kernels of the distributed runtime: codeword projection tables and mergeable partial attention."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import repeat_key_value_heads
from .exchange import merge_heads

# Largest pair of K/V codeword-projection tables (one layer) the runtime precomputes in hidden mode by
# default: 64 MiB holds G <= 8 at K = 1024 and G = 32 at K = 256 for GPT2-small's width (2 * G * K * 768 fp32
# values; 12 layers: at most 768 MiB). G = 32 at K = 1024 needs 201 MB a layer (2.4 GB for 12 layers), more
# than an edge device should spend on a lookup table by default: `DistributedRuntime(projection_table=BYTES)`
# raises the limit (gathering from the tables is faster than decoding and projecting: docs/benchmarks.md).
PROJECTION_TABLE_MAX_BYTES = 64 * 2**20


def table_limit(projection_table: bool | int) -> int:
    """Bytes a layer's pair of projection tables may take: True the default limit, False none, an int that many."""
    if isinstance(projection_table, bool):
        return PROJECTION_TABLE_MAX_BYTES if projection_table else 0
    if not isinstance(projection_table, int) or projection_table < 0:
        raise ValueError(
            f"projection_table must be True, False or a number of bytes per layer >= 0, got {projection_table!r}"
        )
    return projection_table


@torch.no_grad()
def projection_tables(module: nn.Module, adapter, quantizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every codeword's contribution to K and to V, (G*K, D_kv) each, and the K/V biases, (D_kv,) each.

    The receiver's K/V projection (`ModelAdapter.project_kv`) is affine, so projecting a decoded vector
    equals summing the projections of its G codewords (each placed in its own group's columns) plus the
    bias once: decode + project becomes a gather and a sum over groups. What follows the projection
    (key norm, positions) is applied afterwards, per token, by `exchange.rebuild_keys_values`. Built
    once per layer, from the current codebook and weights: the projection's matrix is read off the
    projections of the unit vectors (width x width x D_kv), then each group's codewords are multiplied
    by their own rows of it (K x width x D_kv in all; projecting every placed codeword would take G times that).
    """
    groups, size, group_width = quantizer.codebook.shape
    width = groups * group_width
    basis = torch.eye(width, dtype=quantizer.codebook.dtype, device=quantizer.codebook.device)[None]
    bias_key, bias_value = (merge_heads(t).reshape(-1) for t in adapter.project_kv(module, basis[:, :1] * 0))
    tables = []
    for projected, bias in zip(adapter.project_kv(module, basis), (bias_key, bias_value)):
        matrix = (merge_heads(projected)[0] - bias).reshape(groups, group_width, -1)  # (G, width / G, D_kv)
        tables.append(torch.bmm(quantizer.codebook, matrix).reshape(groups * size, -1))
    return tables[0], tables[1], bias_key, bias_value


def projected_from_codes(tables, codes: torch.Tensor, codebook_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V, (B, n, D_kv) each, of (B, n, G) codes through `projection_tables` (one fused gather-sum each)."""
    table_key, table_value, bias_key, bias_value = tables
    index = (codes + torch.arange(codes.shape[-1], device=codes.device) * codebook_size).reshape(-1, codes.shape[-1])
    key = F.embedding_bag(index, table_key, mode="sum").reshape(*codes.shape[:-1], -1) + bias_key
    value = F.embedding_bag(index, table_value, mode="sum").reshape(*codes.shape[:-1], -1) + bias_value
    return key, value


@dataclass(frozen=True)
class FusedTables:
    """A layer's `projection_tables` laid out for one gather per received token (`fused_tables`).

    ``table``: (G*K, 2*D_kv), each codeword's K projection and V projection side by side. ``bias``: (2*D_kv,) the
    K/V biases, added after the gather-sum; None at G = 1, where they are already added to ``table`` (a token's
    K/V is then one row: the same single addition, made once per codeword instead of once per received token).
    """

    table: torch.Tensor
    bias: torch.Tensor | None
    key_width: int


def fused_tables(tables, groups: int) -> FusedTables:
    """`FusedTables` of a layer's ``tables`` (`projection_tables`) for codes of ``groups`` groups."""
    table_key, table_value, bias_key, bias_value = tables
    table, bias = torch.cat([table_key, table_value], dim=1), torch.cat([bias_key, bias_value])
    if groups == 1:
        return FusedTables(table + bias, None, table_key.shape[1])
    return FusedTables(table, bias, table_key.shape[1])


def projected_from_fused(fused: FusedTables, codes: torch.Tensor, codebook_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`projected_from_codes` through `FusedTables`: the same K and V, (B, n, D_kv) each (views of one tensor), bit for
    bit (tests/test_distributed.py), in one gather for K and V instead of two gather-sums and two bias additions."""
    if fused.bias is None:  # G = 1: each token's K/V is one row of the table, its bias already added
        both = F.embedding(codes[..., 0], fused.table)
    else:
        index = (codes + torch.arange(codes.shape[-1], device=codes.device) * codebook_size).reshape(-1, codes.shape[-1])
        both = F.embedding_bag(index, fused.table, mode="sum").reshape(*codes.shape[:-1], -1) + fused.bias
    return both[..., : fused.key_width], both[..., fused.key_width :]


# The CPU flash kernel behind SDPA, which also returns the log-sum-exp (torch's own op, private name).
_FUSED_CPU_ATTENTION = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


@dataclass(frozen=True)
class KeyMask:
    """A boolean (B or 1, 1, T_q, T_k) mask and what `partial_attention` derives from it, made once per forward.

    ``no_key``: (B or 1, 1, T_q, 1) queries with no allowed key. ``bias``: the additive mask (0 / -inf) in
    the queries' dtype that the CPU fused kernel takes (None off CPU, and where ``pattern`` makes it needless).
    ``pattern``: on CPU, "all" where every key is allowed (a causal rank's received keys, all earlier than its
    queries) and "causal" where the mask is the square lower triangle (its own keys, no padding, no window): the
    fused kernel then runs without a bias (``is_causal`` for the triangle), the same outputs bit for bit
    (tests/test_distributed.py) without reading a T_q x T_k bias per head.
    """

    allowed: torch.Tensor
    no_key: torch.Tensor
    bias: torch.Tensor | None
    pattern: str | None = None

    @classmethod
    def of(cls, allowed: torch.Tensor, dtype: torch.dtype) -> "KeyMask":
        bias, pattern = None, None
        if allowed.device.type == "cpu" and _FUSED_CPU_ATTENTION is not None:
            pattern = _pattern(allowed)
            if pattern is None:
                bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, float("-inf"))
        return cls(allowed, ~allowed.any(dim=-1, keepdim=True), bias, pattern)


def _pattern(allowed: torch.Tensor) -> str | None:
    """"all", "causal" (the square lower triangle, every batch row) or None: what the fused kernel needs no bias for."""
    queries, keys = allowed.shape[-2:]
    if queries == 0 or keys == 0:
        return None
    if bool(allowed.all()):
        return "all"
    if queries == keys and torch.equal(allowed, torch.ones(queries, keys, dtype=torch.bool).tril().expand_as(allowed)):
        return "causal"
    return None


def partial_attention(query, key, value, allowed, scale):
    """Attention over a subset of the keys: (output, log-sum-exp), mergeable with `merge_partials`.

    A query with no allowed key in this subset gets output 0 and log-sum-exp -inf. On CPU this is one
    fused kernel (SDPA's flash kernel, which returns the log-sum-exp too); elsewhere explicit scores.
    ``key``/``value`` may have fewer heads than ``query`` (grouped-query attention). ``allowed``: a
    boolean mask, or a `KeyMask` made once for many calls (the distributed runtime: one per forward).
    """
    mask = allowed if isinstance(allowed, KeyMask) else KeyMask.of(allowed, query.dtype)
    allowed, no_key = mask.allowed, mask.no_key
    if key.shape[2] == 0:
        lse = torch.full((*query.shape[:-1], 1), float("-inf"), dtype=torch.float32, device=query.device)
        return query.new_zeros(*query.shape[:-1], value.shape[-1]), lse
    key, value = repeat_key_value_heads(key, query.shape[1]), repeat_key_value_heads(value, query.shape[1])
    if query.device.type == "cpu" and (mask.pattern is not None or mask.bias is not None and mask.bias.dtype == query.dtype):
        bias = None if mask.pattern is not None else mask.bias
        output, lse = _FUSED_CPU_ATTENTION(query, key, value, 0.0, mask.pattern == "causal", attn_mask=bias, scale=scale)
        return output, lse.unsqueeze(-1).masked_fill(no_key, float("-inf"))
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    finite_lse = lse.masked_fill(torch.isinf(lse), 0.0)
    return torch.matmul(torch.exp(scores - finite_lse), value), lse


def merge_partials(first, second):
    """Softmax over the union of two disjoint key sets from their partial outputs; rows with no key give 0."""
    (out_a, lse_a), (out_b, lse_b) = first, second
    lse = torch.logaddexp(lse_a, lse_b)
    lse = lse.masked_fill(torch.isinf(lse), 0.0)
    merged = out_a * torch.exp(lse_a - lse) + out_b * torch.exp(lse_b - lse)
    return merged.to(out_a.dtype)
