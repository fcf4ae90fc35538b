"""Bit packing of codes: exact byte counts, round trips at every width, the documented bit order."""

import math

import pytest
import torch

from transformers_astra.packing import _pack_bits, _unpack_bits, pack, packed_size, unpack, unpack_rows


@pytest.mark.parametrize("bits", range(1, 17))
@pytest.mark.parametrize("num_codes", [0, 1, 7, 8, 13, 1000])
def test_round_trip_and_exact_byte_count(bits, num_codes):
    generator = torch.Generator().manual_seed(bits * 1000 + num_codes)
    codes = torch.randint(0, 1 << bits, (num_codes,), generator=generator)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == math.ceil(num_codes * bits / 8) == packed_size(num_codes, bits)
    assert torch.equal(unpack(packed, bits, num_codes), codes)


@pytest.mark.parametrize("bits", range(1, 17))
def test_word_packing_gives_the_bit_streams_bytes(bits):
    """`pack`/`unpack`'s word path (bits 1-8, 10, 12, 14, 16) against the one-entry-per-bit reference."""
    generator = torch.Generator().manual_seed(bits)
    for num_codes in [0, 1, 3, 5, 7, 8, 9, 16384, 16389]:
        codes = torch.randint(0, 1 << bits, (num_codes,), generator=generator)
        assert torch.equal(pack(codes, bits), _pack_bits(codes.to(torch.int32), bits)), (bits, num_codes)
        noise = torch.randint(0, 256, (packed_size(num_codes, bits) + 2,), dtype=torch.uint8, generator=generator)
        assert torch.equal(unpack(noise, bits, num_codes), _unpack_bits(noise, bits, num_codes)), (bits, num_codes)


@pytest.mark.parametrize("bits", range(1, 17))
def test_unpack_rows_gives_each_rows_unpack(bits):
    """A receiver's sources unpacked at once (`unpack_rows`) against `unpack` row by row, on the word and bit paths."""
    generator = torch.Generator().manual_seed(100 + bits)
    for rows, num_codes in [(1, 0), (1, 5), (3, 7), (7, 128), (3, 16389)]:
        packed = torch.randint(0, 256, (rows, packed_size(num_codes, bits) + 1), dtype=torch.uint8, generator=generator)
        together = unpack_rows(packed, bits, num_codes)
        assert together.shape == (rows, num_codes) and together.dtype == torch.int64
        for row in range(rows):
            assert torch.equal(together[row], unpack(packed[row], bits, num_codes)), (bits, rows, num_codes, row)
            assert torch.equal(together[row], _unpack_bits(packed[row], bits, num_codes)), (bits, rows, num_codes, row)


def test_unpack_rows_refuses_other_shapes_and_short_rows():
    with pytest.raises(ValueError, match="2-D uint8"):
        unpack_rows(torch.zeros(4, dtype=torch.uint8), 10, 2)
    with pytest.raises(ValueError, match="2-D uint8"):
        unpack_rows(torch.zeros(2, 4, dtype=torch.int32), 10, 2)
    with pytest.raises(ValueError, match="need 5 bytes"):
        unpack_rows(torch.zeros(2, 4, dtype=torch.uint8), 10, 4)
    with pytest.raises(ValueError, match="1-D uint8"):
        unpack(torch.zeros(2, 4, dtype=torch.uint8), 10, 2)


def test_extreme_values_and_shapes_survive():
    codes = torch.tensor([[0, 1023, 512], [1, 1022, 7]])  # (tokens, groups) for K = 1024
    packed = pack(codes, 10)
    assert packed.numel() == 8  # 60 bits
    assert torch.equal(unpack(packed, 10, codes.numel()).reshape(codes.shape), codes)


def test_bit_order_is_little_endian_stream():
    # 3-bit codes 5, 3, 1, lowest bit first: stream 1,0,1, 1,1,0, 1,0,0; byte 0 holds stream bits 0..7 (bit 0 lowest)
    assert pack(torch.tensor([5, 3, 1]), 3).tolist() == [0b01011101, 0]


def test_ten_bit_codes_use_five_bytes_per_four_codes():
    codes = torch.arange(0, 1024, 3)
    assert pack(codes, 10).numel() == math.ceil(codes.numel() * 10 / 8)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: pack(torch.tensor([8]), 3), "fit 3 bits"),
        (lambda: pack(torch.tensor([-1]), 3), "fit 3 bits"),
        (lambda: pack(torch.tensor([1.0]), 3), "integer tensor"),
        (lambda: pack(torch.tensor([1]), 17), "bits must be"),
        (lambda: pack(torch.tensor([1]), 0), "bits must be"),
        (lambda: unpack(torch.zeros(1, dtype=torch.uint8), 10, 1), "need 2 bytes"),
        (lambda: unpack(torch.zeros(2, dtype=torch.int64), 10, 1), "uint8"),
    ],
)
def test_bad_input_is_a_clear_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
