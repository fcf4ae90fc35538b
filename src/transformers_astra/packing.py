"""Bit packing of integer codes: n codes of ``bits`` bits each in exactly ceil(n * bits / 8) bytes.

ASTRA sends codebook indices, e.g. 10-bit codes for K = 1024. Sending them as int16 would waste 6 bits
of every 16 (int64: 54 of 64). ``pack`` lays the codes out as one little-endian bit stream (bit ``j`` of
code ``i`` is stream bit ``i * bits + j``; stream bit ``s`` is bit ``s % 8`` of byte ``s // 8``) and
``unpack`` reverses it. Both are vectorised tensor ops (no Python loop over codes) and run on the
codes' device, so packed codes can go straight into a collective on CPU (gloo) or GPU (NCCL).

Where a whole number of codes fills a whole number of bytes in at most 64 bits (``bits`` in 1-8, 10, 12, 14,
16: e.g. 4 codes of 10 bits in 5 bytes), codes are packed word by word (`_pack_words`: one int64 per such
chunk, then its bytes), 3-6x faster on CPU than the bit stream (`_pack_bits`, one entry per bit), which the
other widths use; both give the same bytes (tests/test_packing.py).
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
    if _chunk(bits) is not None:
        return _pack_words(flat, bits)
    return _pack_bits(flat, bits)


def _chunk(bits: int) -> tuple[int, int] | None:
    """(codes, bytes) of the smallest chunk where codes end on a byte boundary, if it fits an int64; else None."""
    total = math.lcm(bits, 8)
    return (total // bits, total // 8) if total <= 56 else None


def _pack_words(flat: torch.Tensor, bits: int) -> torch.Tensor:
    """`pack` by chunks of `_chunk` codes: each chunk's codes summed into one int64 at their stream offsets, then its bytes."""
    per, num_bytes = _chunk(bits)
    words = torch.nn.functional.pad(flat.to(torch.int64), (0, -flat.numel() % per)).reshape(-1, per)
    words = (words << torch.arange(0, per * bits, bits, device=flat.device)).sum(dim=1, keepdim=True)
    stream = ((words >> torch.arange(0, 8 * num_bytes, 8, device=flat.device)) & 255).to(torch.uint8).reshape(-1)
    return stream[: packed_size(flat.numel(), bits)]


def _pack_bits(flat: torch.Tensor, bits: int) -> torch.Tensor:
    """`pack` the obvious way: one uint8 per stream bit, then eight of them per byte."""
    shifts = torch.arange(bits, device=flat.device, dtype=torch.int32)
    stream = ((flat[:, None] >> shifts) & 1).reshape(-1).to(torch.uint8)  # one entry per bit
    num_bytes = packed_size(flat.numel(), bits)
    stream = torch.nn.functional.pad(stream, (0, num_bytes * 8 - stream.numel()))
    byte_weights = (1 << torch.arange(8, device=flat.device, dtype=torch.int32)).to(torch.uint8)
    return (stream.reshape(num_bytes, 8) * byte_weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, num_codes: int) -> torch.Tensor:
    """The first ``num_codes`` codes of a packed stream, as int64 of shape (num_codes,)."""
    if packed.dtype != torch.uint8 or packed.ndim != 1:
        raise ValueError(f"unpack expects a 1-D uint8 tensor, got dtype {packed.dtype} and shape {tuple(packed.shape)}")
    return unpack_rows(packed[None], bits, num_codes)[0]


def unpack_rows(packed: torch.Tensor, bits: int, num_codes: int) -> torch.Tensor:
    """`unpack` of every row of a (S, bytes) uint8 tensor (S streams of the same length) at once: int64 (S, num_codes).

    Row s gives exactly ``unpack(packed[s], bits, num_codes)``: a receiver unpacks its sources' payloads of a layer
    in one call instead of one per source (tests/test_packing.py)."""
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.ndim != 2:
        raise ValueError(f"unpack_rows expects a 2-D uint8 tensor, got dtype {packed.dtype} and shape {tuple(packed.shape)}")
    if packed.shape[1] < packed_size(num_codes, bits):
        raise ValueError(
            f"{num_codes} codes of {bits} bits need {packed_size(num_codes, bits)} bytes, got {packed.shape[1]}"
        )
    if _chunk(bits) is not None:
        return _unpack_words(packed, bits, num_codes)
    return _unpack_bits(packed, bits, num_codes)


def _unpack_words(packed: torch.Tensor, bits: int, num_codes: int) -> torch.Tensor:
    """`unpack_rows` by chunks of `_chunk` bytes: each chunk's bytes into one int64, then its codes."""
    per, num_bytes = _chunk(bits)
    chunks, rows = -(-num_codes // per), packed.shape[:-1]  # any leading dimensions (the rows)
    used = packed[..., : packed_size(num_codes, bits)].to(torch.int64)
    words = torch.nn.functional.pad(used, (0, chunks * num_bytes - used.shape[-1])).reshape(*rows, chunks, num_bytes)
    words = (words << torch.arange(0, 8 * num_bytes, 8, device=packed.device)).sum(dim=-1, keepdim=True)
    codes = (words >> torch.arange(0, per * bits, bits, device=packed.device)) & ((1 << bits) - 1)
    return codes.reshape(*rows, -1)[..., :num_codes]


def _unpack_bits(packed: torch.Tensor, bits: int, num_codes: int) -> torch.Tensor:
    """`unpack_rows` the obvious way: one entry per stream bit, then ``bits`` of them per code."""
    rows = packed.shape[:-1]  # any leading dimensions (the rows)
    bit_index = torch.arange(8, device=packed.device, dtype=torch.int32)
    stream = ((packed.to(torch.int32)[..., None] >> bit_index) & 1).reshape(*rows, -1)[..., : num_codes * bits]
    code_weights = 1 << torch.arange(bits, device=packed.device, dtype=torch.int32)
    return (stream.reshape(*rows, num_codes, bits) * code_weights).sum(dim=-1).to(torch.int64)


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in [1, {MAX_BITS}], got {bits!r}")
