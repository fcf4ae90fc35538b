"""ASTRA as a benchmark method: the patched model run by `transformers_astra.DistributedRuntime`.

The runtime runs with its own defaults (``overlap``, ``projection_table``) unless a setting is given;
`AstraSettings.label` names every setting that deviates from the defaults, and `AstraSettings.record`
is written into each row, so a row always says what it measured.

Codebooks keep their random initialisation (every rank gets the same from the shared seed): the
latency of encode, exchange and decode does not depend on the codewords' values. The runtime's
per-call input check (one small all_gather) is off, as a deployed pipeline would not pay it per request.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from dataclasses import dataclass

import torch

import transformers_astra as astra
from transformers_astra.distributed import DistributedRuntime

from .workloads import Workload


def runtime_default(name: str):
    """The default of one `DistributedRuntime` keyword argument (read from its signature)."""
    return inspect.signature(DistributedRuntime.__init__).parameters[name].default


@dataclass(frozen=True)
class AstraSettings:
    """What one ASTRA row runs. ``None`` means the runtime's / AstraConfig's default."""

    groups: int = 32
    quantize: str = "hidden"
    codebook_size: int | None = None
    overlap: bool | None = None
    projection_table: bool | int | None = None  # an int: bytes per layer
    shard_sizes: tuple[int, ...] | str | None = None  # sizes, or "balanced" (AstraConfig's cost-model sizes)

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in dataclasses.asdict(self).items() if v is not None})

    @classmethod
    def from_json(cls, text: str) -> "AstraSettings":
        values = json.loads(text)
        if isinstance(values.get("shard_sizes"), list):
            values["shard_sizes"] = tuple(values["shard_sizes"])
        return cls(**values)

    def runtime_kwargs(self) -> dict:
        return {
            "overlap": runtime_default("overlap") if self.overlap is None else self.overlap,
            "projection_table": runtime_default("projection_table") if self.projection_table is None else self.projection_table,
        }

    def config(self, world: int) -> astra.AstraConfig:
        extra = {} if self.codebook_size is None else {"codebook_size": self.codebook_size}
        if self.shard_sizes is not None:  # else AstraConfig's default (even)
            extra["shard_sizes"] = self.shard_sizes if isinstance(self.shard_sizes, str) else list(self.shard_sizes)
        return astra.AstraConfig(num_devices=world, groups=self.groups, quantize=self.quantize, **extra)

    @property
    def deviations(self) -> list[str]:
        """Settings that differ from the runtime's defaults, as ``name=value``."""
        out = []
        for name in ("overlap", "projection_table"):
            value = getattr(self, name)
            if value is not None and value != runtime_default(name):
                shown = f"{value // 2**20}MiB" if isinstance(value, int) and not isinstance(value, bool) else value
                out.append(f"{name}={shown}")
        if self.codebook_size is not None and self.codebook_size != astra.AstraConfig().codebook_size:
            out.append(f"K={self.codebook_size}")
        if isinstance(self.shard_sizes, str):
            out.append(f"shards={self.shard_sizes}")
        elif self.shard_sizes is not None:
            out.append("shards=" + "/".join(map(str, self.shard_sizes)))
        return out

    @property
    def label(self) -> str:
        return " ".join([f"astra G={self.groups} {self.quantize}", *self.deviations])

    def record(self, world: int) -> dict:
        """Every setting of the row, defaults written out."""
        return {**self.config(world).to_dict(), **self.runtime_kwargs(), "check_inputs": False}


class AstraMethod:
    name = "astra"

    def __init__(self, settings: AstraSettings | None = None):
        self.settings = settings or AstraSettings()

    def setup(self, workload: Workload, rank: int, world: int) -> None:
        self.workload, self.rank, self.world = workload, rank, world
        astra.patch(workload.model, self.settings.config(world))
        self.runtime = DistributedRuntime(workload.model, check_inputs=False, timeout=1800.0, **self.settings.runtime_kwargs())
        # Prefill: only the last token's logits (the runtime passes extra keyword arguments to the model).
        self.extra = {"logits_to_keep": 1} if workload.causal else {}

    @torch.inference_mode()
    def forward(self) -> torch.Tensor | None:
        output = self.runtime(**self.workload.inputs, **self.extra)
        if self.workload.causal:  # the next token is predicted by the last rank
            return output.logits[:, -1] if self.runtime.is_last else None
        return output.logits if self.rank == 0 else None  # every rank holds the same pooled prediction

    def timings(self) -> dict:
        """The runtime's `Timings` of the latest forward: its wall time and this rank's waits for peers."""
        return self.runtime.timings.to_dict()
