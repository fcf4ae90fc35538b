"""`AstraConfig`: every knob of ASTRA in one validated, JSON-serialisable object."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

QUANTIZE_MODES = ("hidden", "kv")
NOISE_GRANULARITIES = ("dimension", "group")
# AstraConfig.shard_sizes: sizes from the cost model of `balance` (causal families; even elsewhere).
BALANCED = "balanced"

# Codes are packed at ceil(log2 K) bits, 1 to 16 (`packing`): K = 2**16 is the largest codebook.
MAX_CODEBOOK_SIZE = 1 << 16
# lambda and beta: the paper uses lambda around 1 and beta <= 0.25. 100 is far past any useful value and
# keeps the NAQ noise (lambda * residual RMS * N(0, 1)) and the commitment term finite in fp16 (max 65504)
# for residuals up to ~100 RMS; larger values only overflow or drown the signal.
MAX_NOISE_SCALE = 100.0
MAX_COMMITMENT_WEIGHT = 100.0
# A shard size is a token count or a proportion; 2**31 tokens is beyond any position index, and the
# bound keeps the sum of N sizes (and the split arithmetic) finite.
MAX_SHARD_SIZE = float(1 << 31)
# `DistributedRuntime`'s timeout: a week. It becomes a `datetime.timedelta` and the process group's
# millisecond timeouts, which overflow long before 1e308 (inf, nan and 1e308 are refused by name).
MAX_TIMEOUT_S = 7 * 24 * 3600.0


@dataclass
class AstraConfig:
    """How a model is split over devices and how the non-local tokens are compressed.

    Attributes:
        num_devices: N, the number of devices (contiguous sequence shards).
        codebook_size: K, entries per codebook, 2 to 2**16; each code costs ceil(log2 K) bits.
        groups: G, each vector of width D is cut into G groups of D/G, one code per group.
        quantize: "hidden" sends the pre-attention LayerNorm output (the receiver projects K/V itself);
            "kv" sends keys and values (two codes per group, no projection on the receiver).
        noise_scale: NAQ's lambda, in [0, 100]. Training only: decoded vectors get lambda * sigma * N(0, 1)
            noise, sigma being the spread of the quantization residual.
        noise_granularity: sigma per "dimension" of the vector or per "group".
        commitment_weight: beta of the commitment loss beta * ||x - sg(x_hat)||^2 (training only), in [0, 100].
        distributed_cls: ViT only; every shard gets its own CLS copy and the copies are mean-pooled.
        shard_sizes: None (the default) splits tokens evenly (the first T mod N shards get one more).
            "balanced": causal families (GPT2, Llama) get the sizes that equalise every rank's modelled
            per-layer compute, computed per call from the sequence length (`balance`: later ranks attend to
            more keys and rebuild more received K/V, so they get fewer tokens; the last rank, which encodes
            nothing, may get more); bidirectional families (ViT) split evenly. Not the default: on the GPU
            host's links it was slower than even shards (docs/benchmarks.md, "Balanced shards": the model
            ignores that a larger early shard also sends more codes). A list of N positive finite
            numbers (each at most 2**31) splits the tokens in proportion to them; a list summing to the
            sequence length gives exactly those sizes. ViT with distributed_cls: sizes count patches,
            each shard also holding its CLS copy.
    """

    num_devices: int = 2
    codebook_size: int = 1024
    groups: int = 32
    quantize: str = "hidden"
    noise_scale: float = 1.0
    noise_granularity: str = "dimension"
    commitment_weight: float = 1e-4
    distributed_cls: bool = True
    shard_sizes: list[int] | str | None = None

    def __post_init__(self) -> None:
        self._check_int("num_devices", minimum=1)
        self._check_int("codebook_size", minimum=2, maximum=MAX_CODEBOOK_SIZE)
        self._check_int("groups", minimum=1)
        self._check_choice("quantize", QUANTIZE_MODES)
        self._check_choice("noise_granularity", NOISE_GRANULARITIES)
        self._check_number("noise_scale", MAX_NOISE_SCALE)
        self._check_number("commitment_weight", MAX_COMMITMENT_WEIGHT)
        if not isinstance(self.distributed_cls, bool):
            raise ValueError(f"AstraConfig.distributed_cls must be True or False, got {self.distributed_cls!r}")
        if self.shard_sizes is not None and self.shard_sizes != BALANCED:
            self._check_shard_sizes()

    def _check_int(self, name: str, minimum: int, maximum: int | None = None) -> None:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"AstraConfig.{name} must be an integer >= {minimum}, got {value!r}")
        if maximum is not None and value > maximum:
            raise ValueError(f"AstraConfig.{name} must be at most {maximum}, got {value!r}")

    def _check_choice(self, name: str, allowed: tuple[str, ...]) -> None:
        value = getattr(self, name)
        if value not in allowed:
            raise ValueError(f"AstraConfig.{name} must be one of {list(allowed)}, got {value!r}")

    def _check_number(self, name: str, maximum: float) -> None:
        value = getattr(self, name)
        if not _is_real(value) or not 0 <= value <= maximum:
            raise ValueError(f"AstraConfig.{name} must be a number in [0, {maximum:g}], got {value!r}")

    def _check_shard_sizes(self) -> None:
        sizes = self.shard_sizes
        ok = isinstance(sizes, (list, tuple)) and all(_is_real(s) and 0 < s <= MAX_SHARD_SIZE for s in sizes)
        if not ok or len(sizes) != self.num_devices:
            raise ValueError(
                f"AstraConfig.shard_sizes must be {BALANCED!r}, None or a list of {self.num_devices} positive finite "
                f"numbers of at most 2**31 (one per device), got {sizes!r}"
            )
        self.shard_sizes = list(sizes)

    @property
    def bits_per_code(self) -> int:
        return math.ceil(math.log2(self.codebook_size))

    @property
    def codes_per_token(self) -> int:
        """Codes sent per token: G, or 2G when keys and values are quantized separately."""
        return self.groups * (2 if self.quantize == "kv" else 1)

    def projection_table_bytes(self, key_value_width: int, element_size: int) -> int:
        """Bytes of one layer's pair of hidden-mode K/V projection tables (`kernels.projection_tables`):
        every codeword of every group (codes_per_token x K rows) projected to K and to V (key_value_width each)."""
        return 2 * self.codes_per_token * self.codebook_size * key_value_width * element_size

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


def _is_real(value: Any) -> bool:
    """An int or float (not bool) that is finite; huge ints that overflow a float are not."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def validate_timeout(timeout: Any, name: str = "timeout") -> float:
    """A wait in seconds as a float: a finite number > 0 and at most a week, else ValueError naming ``name``."""
    if not _is_real(timeout) or not 0 < timeout <= MAX_TIMEOUT_S:
        raise ValueError(f"{name} must be a number of seconds in (0, {MAX_TIMEOUT_S:g}], got {timeout!r}")
    return float(timeout)
