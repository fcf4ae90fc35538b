"""Bit packing of integer codes: n codes of ``bits`` bits each in exactly ceil(n * bits / 8) bytes.

ASTRA sends codebook indices, e.g. 10-bit codes for K = 1024. Sending them as int16 would waste 6 bits
of every 16 (int64: 54 of 64). ``pack`` lays the codes out as one little-endian bit stream (bit ``j`` of
code ``i`` is stream bit ``i * bits + j``; stream bit ``s`` is bit ``s % 8`` of byte ``s // 8``) and
``unpack`` reverses it. Both are vectorised tensor ops (no Python loop over codes) and run on the
codes' device, so packed codes can go straight into a collective on CPU (gloo) or GPU (NCCL).
"""

from __future__ import annotations

import math

import torch

MAX_BITS = 16


def packed_size(num_codes: int, bits: int) -> int:
    """Bytes that ``num_codes`` codes of ``bits`` bits take once packed."""
    _check_bits(bits)
    if num_codes < 0:
        raise ValueError(f"num_codes must be >= 0, got {num_codes}")
    return math.ceil(num_codes * bits / 8)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Flatten ``codes`` (any integer tensor, values in [0, 2**bits)) into a uint8 tensor of packed_size bytes."""
    _check_bits(bits)
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise ValueError(f"pack expects an integer tensor of codes, got dtype {codes.dtype}")
    flat = codes.reshape(-1).to(torch.int32)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {1 << bits}) to fit {bits} bits, got range [{int(flat.min())}, {int(flat.max())}]")
    shifts = torch.arange(bits, device=flat.device, dtype=torch.int32)
    stream = ((flat[:, None] >> shifts) & 1).reshape(-1).to(torch.uint8)  # one entry per bit
    num_bytes = packed_size(flat.numel(), bits)
    stream = torch.nn.functional.pad(stream, (0, num_bytes * 8 - stream.numel()))
    byte_weights = (1 << torch.arange(8, device=flat.device, dtype=torch.int32)).to(torch.uint8)
    return (stream.reshape(num_bytes, 8) * byte_weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, num_codes: int) -> torch.Tensor:
    """The first ``num_codes`` codes of a packed stream, as int64 of shape (num_codes,)."""
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.ndim != 1:
        raise ValueError(f"unpack expects a 1-D uint8 tensor, got dtype {packed.dtype} and shape {tuple(packed.shape)}")
    if packed.numel() < packed_size(num_codes, bits):
        raise ValueError(
            f"{num_codes} codes of {bits} bits need {packed_size(num_codes, bits)} bytes, got {packed.numel()}"
        )
    bit_index = torch.arange(8, device=packed.device, dtype=torch.int32)
    stream = ((packed.to(torch.int32)[:, None] >> bit_index) & 1).reshape(-1)[: num_codes * bits]
    code_weights = 1 << torch.arange(bits, device=packed.device, dtype=torch.int32)
    return (stream.reshape(num_codes, bits) * code_weights).sum(dim=1).to(torch.int64)


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in [1, {MAX_BITS}], got {bits!r}")
