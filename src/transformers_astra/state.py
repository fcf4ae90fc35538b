"""Run-time state that `astra.patch` attaches to a model and to each of its attention modules."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch

from .config import AstraConfig
from .sharding import ShardLayout

if TYPE_CHECKING:
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
    # Set by `DistributedRuntime` during a distributed forward: attention and CLS pooling go through it.
    runtime: Any = None

    @property
    def cls_per_shard(self) -> int:
        return self.adapter.cls_per_shard(self.config)

    def layout(self, seq_len: int) -> ShardLayout:
        return ShardLayout.for_sequence(
            seq_len, self.config.num_devices, self.config.shard_sizes, cls_per_shard=self.cls_per_shard
        )


@dataclass
class LayerState:
    """Per-attention-module state. ``pending_input`` and ``cache`` live for one forward call only."""

    model_state: AstraState
    layer_idx: int
    pending_input: torch.Tensor | None = None
    cache: Any = None
