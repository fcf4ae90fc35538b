"""Consistency checks of the distributed runtime: every rank must run the same model on the same inputs.

Each check is one small all_gather of 8-byte digests; a mismatch is a ValueError naming what differs.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import nn

from .quantization_config import FINE_TUNED_FIELD
from .transport import CodeTransport

# Inputs whose equality across ranks is checked by name; anything else is checked as one "other inputs".
CHECKED_INPUTS = ("input_ids", "attention_mask", "position_ids", "pixel_values", "inputs_embeds")
# Fields compared as plain values (the error shows every rank's value) rather than digests.
READABLE_FIELDS = ("batch size", "sequence length", "check_inputs")


def check_same_model(transport: CodeTransport, model: nn.Module, config, quantizers) -> None:
    """All ranks must run the same AstraConfig, model config, weights and codebooks: compare digests."""
    fields = {
        "AstraConfig": _digest(config.to_json_string().encode()),
        "model config": _digest(_model_config_json(model).encode()),
        "model weights": _digest_tensors(
            (name, tensor) for name, tensor in model.state_dict().items() if "astra_quantizer" not in name
        ),
        "codebooks": _digest_tensors((str(i), quantizer.codebook) for i, quantizer in enumerate(quantizers)),
    }
    compare_across_ranks(transport, fields, "the start-up handshake")


def check_same_call(transport: CodeTransport, inputs: dict[str, Any], layout, check_inputs: bool) -> None:
    """The first exchange of every call, whether or not ``check_inputs`` is on: one fixed-size all_gather.

    Every rank sends the batch size and the shard layout it derived from its own inputs (and, with
    ``check_inputs``, digests of the inputs themselves). Every later exchange of the call has sizes
    derived from this agreed layout, so no rank ever posts a receive of a size its peer does not send.
    """
    fields = {
        "batch size": batch_size(inputs),
        "sequence length": layout.total,
        "sequence layout": _digest(repr((layout.total, tuple(layout.sizes))).encode()),
        "check_inputs": int(bool(check_inputs)),
    }
    if check_inputs:
        fields.update({f"inputs {name!r}": _digest_value(inputs.get(name)) for name in CHECKED_INPUTS})
        others = {name: value for name, value in inputs.items() if name not in CHECKED_INPUTS}
        fields["inputs 'other inputs'"] = _digest(repr(sorted(others)).encode()) ^ _digest_value(list(others.values()))
    else:  # the same number of values either way: a rank with check_inputs off is named, not misread
        fields.update({f"inputs {name!r}": 0 for name in (*CHECKED_INPUTS, "other inputs")})
    compare_across_ranks(transport, fields, "checking that every rank got the same inputs")


def batch_size(inputs: dict[str, Any]) -> int:
    """Rows of the first tensor among the token or pixel inputs (ValueError when there is none)."""
    for name in ("input_ids", "inputs_embeds", "pixel_values"):
        if torch.is_tensor(inputs.get(name)) and inputs[name].ndim >= 2:
            return inputs[name].shape[0]
    raise ValueError("DistributedRuntime needs input_ids, inputs_embeds or pixel_values as a batched tensor")


def compare_across_ranks(transport: CodeTransport, fields: dict[str, int], what: str, prefix: str = "") -> None:
    mine = torch.tensor(list(fields.values()), dtype=torch.int64)
    table = torch.stack(transport.all_gather(mine, what, "control")).cpu()
    mismatches = []
    for column, name in enumerate(fields):
        differing = [rank for rank in range(transport.world_size) if table[rank, column] != table[0, column]]
        if differing:
            shown = name if name.startswith("inputs ") else repr(name)
            values = f": {table[:, column].tolist()}" if name in READABLE_FIELDS else ""
            mismatches.append(f"{prefix}{shown} (ranks {differing} differ from rank 0{values})")
    if mismatches:
        raise ValueError(
            f"ASTRA ranks disagree on {', '.join(mismatches)}, found during {what}; every rank must load "
            "the same patched model and get the same inputs"
        )


def _model_config_json(model: nn.Module) -> str:
    values = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_")}
    quantization = values.get("quantization_config")
    if isinstance(quantization, dict):  # which N fine-tuning ran at changes nothing a rank computes
        values["quantization_config"] = {k: v for k, v in quantization.items() if k != FINE_TUNED_FIELD}
    return json.dumps(values, sort_keys=True, default=str)


def _digest(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


def _digest_tensors(named_tensors) -> int:
    hasher = hashlib.blake2b(digest_size=8)
    for name, tensor in named_tensors:
        flat = tensor.detach().reshape(-1).contiguous().cpu()
        hasher.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        hasher.update(flat.view(torch.uint8).numpy().tobytes())
    return int.from_bytes(hasher.digest(), "little", signed=True)


def _digest_value(value: Any) -> int:
    if value is None:
        return 0
    if torch.is_tensor(value):
        return _digest_tensors([("", value)])
    if isinstance(value, (list, tuple)):
        return _digest_tensors([(repr(type(v)), v) for v in value if torch.is_tensor(v)]) ^ _digest(
            repr([v for v in value if not torch.is_tensor(v)]).encode()
        )
    return _digest(repr(value).encode())
