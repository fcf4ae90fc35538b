"""The one path from what a shard sends to the keys/values the other shards attend to.

Two implementations of the `Exchange` protocol carry the vectors between shards: the single-process
simulation (`attention.SimulatedExchange`: quantize and decode in place, all shards in one tensor) and
the distributed runtime (`distributed.RankExchange`: encode, pack, send, receive, decode). Both call
`sent_vectors` for what a layer quantizes and `rebuild_keys_values` for what a receiver makes of it, so
the two cannot drift apart. What differs between families comes from the adapter (`models/base.py`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from .models import ModelAdapter
    from .state import LayerState


class Exchange(Protocol):
    """How one process attends across shards and pools across shards. Installed on `AstraState.exchange`."""

    def attention(
        self, module: nn.Module, layer: "LayerState", query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
        allowed: torch.Tensor, scaling: float | None, dropout: float, want_weights: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Mixed-precision attention of the queries held here: (B, T_q, H, d) output and optional weights."""
        ...

    def layer_input(self, module: nn.Module, layer: "LayerState") -> None:
        """Called by the attention module's forward pre-hook once the adapter has kept the layer's input
        (`ModelAdapter.remember`), before the module's own Q/K/V projections: a rank may send from here."""
        ...

    def shard_starts(self, num_tokens: int) -> list[int]:
        """Index of the first token of every shard held here, among the ``num_tokens`` tokens held here."""
        ...

    def mean_across_shards(self, copies: torch.Tensor) -> torch.Tensor:
        """(B, s, D) one vector per shard held here -> (B, 1, D), their mean over all N shards."""
        ...

    def with_first_token(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T_here, D) -> the tokens held here with the whole sequence's first token in front, where this holder
        lacks it (one class token, held by shard 0): the simulation holds it already; rank r > 0 gets rank 0's."""
        ...


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, T, d) -> (B, T, H*d)."""
    batch, heads, tokens, dim = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * dim)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, T, H*d) -> (B, H, T, d)."""
    batch, tokens, width = x.shape
    return x.reshape(batch, tokens, heads, width // heads).transpose(1, 2)


def sent_vectors(adapter: "ModelAdapter", layer: "LayerState", key: torch.Tensor, value: torch.Tensor, quantize: str) -> torch.Tensor:
    """(B, T, width) what a layer quantizes: its input (hidden), or its keys before positions and values (kv)."""
    if quantize == "kv":
        unpositioned, layer.pending_key = adapter.unpositioned_key(layer, key), None
        return torch.cat([unpositioned, merge_heads(value)], dim=-1)
    sent, layer.pending_input = layer.pending_input, None
    if sent is None:
        raise RuntimeError("ASTRA hidden-mode attention ran without its input; was the model patched twice?")
    return sent


def rebuild_keys_values(
    adapter: "ModelAdapter",
    module: nn.Module,
    quantize: str,
    positions: Any,
    decoded: torch.Tensor | None = None,
    projected: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H_kv, n, d) keys and values of n tokens as a receiver rebuilds them.

    ``decoded``: the (B, n, width) vectors decoded from the codes. Hidden mode may give ``projected``
    instead: the K/V projections already made (`kernels.projected_from_codes`). ``positions``: the
    SENDER's positions of the n tokens (`ModelAdapter.select_positions`), applied to the keys.
    """
    if projected is not None:
        key, value = projected
    elif quantize == "kv":
        heads = adapter.key_value_heads(module)
        key, value = (split_heads(part, heads) for part in decoded.chunk(2, dim=-1))
    else:
        key, value = adapter.project_kv(module, decoded)
    if quantize == "hidden":  # kv mode sent the keys after the family's key norm already
        key = adapter.normalize_key(module, key)
    return adapter.position_key(module, key, positions), value
