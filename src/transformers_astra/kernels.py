"""Receiver-side kernels of the distributed runtime: codeword projection tables and mergeable partial attention."""

from __future__ import annotations

import torch
from torch import nn

from .attention import repeat_key_value_heads
from .exchange import merge_heads

# Largest pair of K/V codeword-projection tables (one layer) the runtime precomputes in hidden mode.
PROJECTION_TABLE_MAX_BYTES = 64 * 2**20


@torch.no_grad()
def projection_tables(module: nn.Module, adapter, quantizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every codeword's contribution to K and to V, (G*K, D_kv) each, and the K/V biases, (D_kv,) each.

    The receiver's K/V projection (`ModelAdapter.project_kv`) is affine, so projecting a decoded vector
    equals summing the projections of its G codewords (each placed in its own group's columns) plus the
    bias once: decode + project becomes a gather and a sum over groups. What follows the projection
    (key norm, positions) is applied afterwards, per token, by `exchange.rebuild_keys_values`. Built
    once per layer, from the current codebook and weights.
    """
    groups, size, group_width = quantizer.codebook.shape
    width = groups * group_width
    placed = quantizer.codebook.new_zeros(groups, size, width)
    for group in range(groups):  # set-up only: each group's codewords in its own columns, zeros elsewhere
        placed[group, :, group * group_width : (group + 1) * group_width] = quantizer.codebook[group]
    bias_key, bias_value = (merge_heads(t).reshape(-1) for t in adapter.project_kv(module, placed[:1, :1] * 0))
    table_key, table_value = (merge_heads(t) for t in adapter.project_kv(module, placed))
    out_width = bias_key.numel()
    return (
        (table_key - bias_key).reshape(groups * size, out_width),
        (table_value - bias_value).reshape(groups * size, out_width),
        bias_key,
        bias_value,
    )


def projected_from_codes(tables, codes: torch.Tensor, codebook_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V, (B, n, D_kv) each, of (B, n, G) codes through `projection_tables`."""
    table_key, table_value, bias_key, bias_value = tables
    index = codes + torch.arange(codes.shape[-1], device=codes.device) * codebook_size
    key = torch.nn.functional.embedding(index, table_key).sum(dim=-2) + bias_key
    value = torch.nn.functional.embedding(index, table_value).sum(dim=-2) + bias_value
    return key, value


# The CPU flash kernel behind SDPA, which also returns the log-sum-exp (torch's own op, private name).
_FUSED_CPU_ATTENTION = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def partial_attention(query, key, value, allowed, scale):
    """Attention over a subset of the keys: (output, log-sum-exp), mergeable with `merge_partials`.

    A query with no allowed key in this subset gets output 0 and log-sum-exp -inf. On CPU this is one
    fused kernel (SDPA's flash kernel, which returns the log-sum-exp too); elsewhere explicit scores.
    ``key``/``value`` may have fewer heads than ``query`` (grouped-query attention).
    """
    no_key = ~allowed.any(dim=-1, keepdim=True)
    if key.shape[2] == 0:
        lse = torch.full((*query.shape[:-1], 1), float("-inf"), dtype=torch.float32, device=query.device)
        return query.new_zeros(*query.shape[:-1], value.shape[-1]), lse
    key, value = repeat_key_value_heads(key, query.shape[1]), repeat_key_value_heads(value, query.shape[1])
    if query.device.type == "cpu" and _FUSED_CPU_ATTENTION is not None:
        bias = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device).masked_fill(~allowed, float("-inf"))
        output, lse = _FUSED_CPU_ATTENTION(query, key, value, 0.0, False, attn_mask=bias, scale=scale)
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
