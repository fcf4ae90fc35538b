"""`AstraConfig`: every knob of ASTRA in one validated, JSON-serialisable object."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

QUANTIZE_MODES = ("hidden", "kv")
NOISE_GRANULARITIES = ("dimension", "group")


@dataclass
class AstraConfig:
    """How a model is split over devices and how the non-local tokens are compressed.

    Attributes:
        num_devices: N, the number of devices (contiguous sequence shards).
        codebook_size: K, entries per codebook; each code costs ceil(log2 K) bits.
        groups: G, each vector of width D is cut into G groups of D/G, one code per group.
        quantize: "hidden" sends the pre-attention LayerNorm output (the receiver projects K/V itself);
            "kv" sends keys and values (two codes per group, no projection on the receiver).
        noise_scale: NAQ's lambda. Training only: decoded vectors get lambda * sigma * N(0, 1) noise,
            sigma being the spread of the quantization residual.
        noise_granularity: sigma per "dimension" of the vector or per "group".
        commitment_weight: beta of the commitment loss beta * ||x - sg(x_hat)||^2 (training only).
        distributed_cls: ViT only; every shard gets its own CLS copy and the copies are mean-pooled.
        shard_sizes: None splits tokens evenly (the first T mod N shards get one more). A list of N
            positive numbers splits the tokens in proportion to them; a list summing to the sequence
            length gives exactly those sizes. ViT with distributed_cls: sizes count patches, each shard
            also holding its CLS copy.
    """

    num_devices: int = 2
    codebook_size: int = 1024
    groups: int = 32
    quantize: str = "hidden"
    noise_scale: float = 1.0
    noise_granularity: str = "dimension"
    commitment_weight: float = 1e-4
    distributed_cls: bool = True
    shard_sizes: list[int] | None = field(default=None)

    def __post_init__(self) -> None:
        self._check_int("num_devices", minimum=1)
        self._check_int("codebook_size", minimum=2)
        self._check_int("groups", minimum=1)
        self._check_choice("quantize", QUANTIZE_MODES)
        self._check_choice("noise_granularity", NOISE_GRANULARITIES)
        self._check_number("noise_scale")
        self._check_number("commitment_weight")
        if not isinstance(self.distributed_cls, bool):
            raise ValueError(f"AstraConfig.distributed_cls must be True or False, got {self.distributed_cls!r}")
        if self.shard_sizes is not None:
            self._check_shard_sizes()

    def _check_int(self, name: str, minimum: int) -> None:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"AstraConfig.{name} must be an integer >= {minimum}, got {value!r}")

    def _check_choice(self, name: str, allowed: tuple[str, ...]) -> None:
        value = getattr(self, name)
        if value not in allowed:
            raise ValueError(f"AstraConfig.{name} must be one of {list(allowed)}, got {value!r}")

    def _check_number(self, name: str) -> None:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"AstraConfig.{name} must be a finite number >= 0, got {value!r}")

    def _check_shard_sizes(self) -> None:
        sizes = self.shard_sizes
        ok = isinstance(sizes, (list, tuple)) and all(
            isinstance(s, (int, float)) and not isinstance(s, bool) and s > 0 for s in sizes
        )
        if not ok or len(sizes) != self.num_devices:
            raise ValueError(
                f"AstraConfig.shard_sizes must be None or a list of {self.num_devices} positive numbers "
                f"(one per device), got {sizes!r}"
            )
        self.shard_sizes = list(sizes)

    @property
    def bits_per_code(self) -> int:
        return math.ceil(math.log2(self.codebook_size))

    @property
    def codes_per_token(self) -> int:
        """Codes sent per token: G, or 2G when keys and values are quantized separately."""
        return self.groups * (2 if self.quantize == "kv" else 1)

    @property
    def bits_per_token(self) -> int:
        return self.codes_per_token * self.bits_per_code

    def compression_ratio(self, hidden_size: int, full_precision_bits: int = 32) -> float:
        """Bytes full-precision sequence parallelism sends per token and layer over ASTRA's bytes."""
        vectors = 2 if self.quantize == "kv" else 1
        return vectors * hidden_size * full_precision_bits / self.bits_per_token

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "AstraConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown AstraConfig field(s) {unknown}; allowed: {sorted(known)}")
        return cls(**values)

    def replace(self, **overrides: Any) -> "AstraConfig":
        """A copy with some fields changed (validated like a new config)."""
        return self.from_dict({**self.to_dict(), **overrides})
