"""`AstraQuantizationConfig`: how an ASTRA model is described in ``config.json`` (``quantization_config``).

transformers stores a quantized model's settings as ``config.quantization_config`` and picks the quantizer
that loads it from ``quant_method`` (its quantization registry; `transformers_astra.hf_quantizer` registers
``"astra"``). The saved block is::

    "quantization_config": {
      "quant_method": "astra",
      "num_devices": 4, "groups": 32, "codebook_size": 1024, ...   # every AstraConfig field
      "fine_tuned_num_devices": [2, 3, 4, 6, 8],                   # or null: not recorded
      "codebooks": [{"layer": "transformer.h.0.attn", "shape": [32, 1024, 24], "dtype": "float32",
                     "blake2b": {"float32": "...", "float16": "...", "bfloat16": "..."}}, ...]
    }

``codebooks`` is written at save time (one entry per layer, in layer order) and checked at load time: the
codebook shapes the settings imply, and a digest of each codebook as it was saved (and as it reads after a
cast to each common float dtype, so that ``from_pretrained(..., dtype=torch.float16)`` is checked too).

``fine_tuned_num_devices`` records the device counts the checkpoint's fine-tuning ran at (sorted): one N for a
fine-tuning with `AstraNAQCallback`, the N drawn from for `RandomShardsCallback`; null (or absent, as in
checkpoints saved before it existed) when unknown. Like ``codebooks`` it describes the saved weights, not how to
run them, so it is no `AstraConfig` field: it changes no forward, no config equality and no override of
`astra.from_pretrained`; `astra.from_pretrained` reads it to decide whether another ``num_devices`` warns.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from .config import AstraConfig

QUANT_METHOD = "astra"
ASTRA_FIELDS = tuple(field.name for field in dataclasses.fields(AstraConfig))
CODEBOOK_RECORD_KEYS = {"layer", "shape", "dtype", "blake2b"}
FINE_TUNED_FIELD = "fine_tuned_num_devices"


class AstraQuantizationConfig(QuantizationConfigMixin):
    """An `AstraConfig` in transformers' quantization-config form (``quant_method="astra"``).

    Pass it to ``from_pretrained`` of a plain checkpoint to patch it while it loads (the codebooks start
    uninitialised: run `astra.calibrate`). A checkpoint saved from a patched model carries it in ``config.json``
    and needs nothing passed. Invalid fields raise the `AstraConfig` error naming the field.
    """

    def __init__(
        self,
        codebooks: list[dict[str, Any]] | None = None,
        quant_method: str = QUANT_METHOD,
        fine_tuned_num_devices: list[int] | None = None,
        **fields: Any,
    ):
        if quant_method != QUANT_METHOD:
            raise ValueError(f"AstraQuantizationConfig.quant_method must be {QUANT_METHOD!r}, got {quant_method!r}")
        self.quant_method = QUANT_METHOD
        self.set_astra_config(AstraConfig.from_dict(fields))
        self.codebooks = _checked_records(codebooks)
        self.fine_tuned_num_devices = checked_fine_tuned_num_devices(fine_tuned_num_devices)

    @classmethod
    def from_astra_config(cls, config: AstraConfig) -> "AstraQuantizationConfig":
        return cls(**config.to_dict())

    @property
    def astra_config(self) -> AstraConfig:
        return AstraConfig.from_dict({name: getattr(self, name) for name in ASTRA_FIELDS})

    def set_astra_config(self, config: AstraConfig) -> None:
        """Replace the settings (a validated AstraConfig); the recorded codebooks stay."""
        for name, value in config.to_dict().items():
            setattr(self, name, value)

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": QUANT_METHOD,
            **self.astra_config.to_dict(),
            "codebooks": [dict(record) for record in self.codebooks] if self.codebooks else None,
            FINE_TUNED_FIELD: checked_fine_tuned_num_devices(self.fine_tuned_num_devices),
        }


def checked_fine_tuned_num_devices(values: Any) -> list[int] | None:
    """None (unknown), or the device counts as a sorted list without repeats; ValueError naming the field."""
    if values is None:
        return None
    ok = isinstance(values, (list, tuple)) and len(values) > 0
    ok = ok and all(not isinstance(n, bool) and isinstance(n, int) and n >= 1 for n in values)
    if not ok:
        raise ValueError(
            f"AstraQuantizationConfig.{FINE_TUNED_FIELD} must be None (unknown) or a non-empty list of integers >= 1 "
            f"(the num_devices the checkpoint was fine-tuned at), got {values!r:.200}"
        )
    return sorted(set(values))


def _checked_records(records: Any) -> list[dict[str, Any]] | None:
    if records is None:
        return None
    ok = isinstance(records, list) and all(isinstance(r, dict) and set(r) == CODEBOOK_RECORD_KEYS for r in records)
    if not ok:
        raise ValueError(
            "AstraQuantizationConfig.codebooks must be a list of records with keys "
            f"{sorted(CODEBOOK_RECORD_KEYS)} (one per layer, written by save_pretrained); got {records!r:.200}"
        )
    return records
