"""Run-time state that `astra.patch` attaches to a model and to each of its attention modules."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch

from .balance import ShardCosts, balanced_sizes
from .config import BALANCED, AstraConfig
from .sharding import ShardLayout

if TYPE_CHECKING:
    from .exchange import Exchange
    from .models import ModelAdapter


@dataclass
class AstraState:
    """Per-model state: the config, the model family's adapter and what the current forward collects."""

    config: AstraConfig
    adapter: "ModelAdapter"
    original_attn_implementation: str | None
    full_precision: bool = False
    hooks: list[Any] = field(default_factory=list)
    # Commitment terms of the current forward, already weighted by beta.
    aux_losses: list[torch.Tensor] = field(default_factory=list)
    # Set by `capture_codes`: layer index -> codes of the latest forward.
    code_log: dict[int, torch.Tensor] | None = None
    # Set by `calibrate`: called with (layer index, vectors the quantizer would see).
    collector: Callable[[int, torch.Tensor], None] | None = None
    # How attention and pooling reach the other shards: `attention.SimulatedExchange` (set by `patch`),
    # or a real rank's exchange that `DistributedRuntime` installs for one forward.
    exchange: "Exchange | None" = None
    # The model's per-layer work for ``shard_sizes="balanced"`` (set by `patch`; `balance.ShardCosts`).
    shard_costs: ShardCosts | None = None

    @property
    def cls_per_shard(self) -> int:
        return self.adapter.cls_per_shard(self.config)

    def shard_weights(self, num_tokens: int) -> list[float] | None:
        """AstraConfig.shard_sizes for a sequence of ``num_tokens`` shardable tokens (class copies excluded).

        "balanced" resolves to `balance.balanced_sizes` for causal families and to even shards (None) for
        the others: a function of the length, N and the config only, the same in every process.
        """
        sizes = self.config.shard_sizes
        if sizes != BALANCED:
            return sizes
        if not self.adapter.causal:
            return None
        if self.shard_costs is None:
            raise RuntimeError("AstraConfig.shard_sizes='balanced' needs the model's shard costs, which astra.patch sets")
        return list(balanced_sizes(num_tokens, self.config.num_devices, self.shard_costs))

    def layout(self, seq_len: int) -> ShardLayout:
        weights = self.shard_weights(seq_len - self.cls_per_shard * self.config.num_devices)
        return ShardLayout.for_sequence(seq_len, self.config.num_devices, weights, cls_per_shard=self.cls_per_shard)


@dataclass
class LayerState:
    """Per-attention-module state. Everything but the first two fields lives for one forward call only."""

    model_state: AstraState
    layer_idx: int
    pending_input: torch.Tensor | None = None  # the module's input (hidden mode sends it)
    cache: Any = None  # the KV cache, to leave the last device's view in after a prefill
    positions: Any = None  # the positions the module got for its tokens (RoPE: cos, sin)
    pending_key: torch.Tensor | None = None  # keys before positions were applied (kv mode, RoPE families)
    transfer: Any = None  # a real rank's codes in flight, started and not yet waited for (`distributed.RankExchange`)

    def forget(self) -> None:
        self.pending_input = self.cache = self.positions = self.pending_key = self.transfer = None
