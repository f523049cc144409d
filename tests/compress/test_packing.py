"""Bit packing: exact round trips and byte counts for every width, odd lengths and the base-3 trits."""

import pytest
import torch

from polytrain.compress.packing import pack, pack_trits, packed_bytes, trit_bytes, unpack, unpack_trits

LENGTHS = [0, 1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 63, 1001]


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("numel", LENGTHS)
def test_round_trip_and_byte_count(bits, numel):
    generator = torch.Generator().manual_seed(bits * 1000 + numel)
    codes = torch.randint(0, 1 << bits, (numel,), generator=generator, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == packed_bytes(numel, bits) == (numel * bits + 7) // 8
    assert torch.equal(unpack(packed, numel, bits), codes)


@pytest.mark.parametrize("bits", range(1, 9))
def test_extreme_codes_survive(bits):
    """All-ones codes fill every bit; the largest code next to zeros must not leak into its neighbours."""
    top = (1 << bits) - 1
    codes = torch.tensor([top, 0, top, top, 0, 0, top, 0, top, 1, top], dtype=torch.uint8)
    assert torch.equal(unpack(pack(codes, bits), codes.numel(), bits), codes)
    ones = torch.full((24,), top, dtype=torch.uint8)
    assert torch.equal(pack(ones, bits), torch.full((3 * bits,), 255, dtype=torch.uint8))


def test_layout_is_little_endian_in_bits():
    """Code i sits at bits [i * bits, (i + 1) * bits) of the byte string, low bit of a byte first."""
    assert pack(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1], dtype=torch.uint8), 1).tolist() == [0b10000001]
    assert pack(torch.tensor([3, 1], dtype=torch.uint8), 4).tolist() == [0x13]
    # 3-bit codes 5, 6, 7: 5 + (6 << 3) + (7 << 6) = 501 = 0x1F5 -> bytes 0xF5, 0x01
    assert pack(torch.tensor([5, 6, 7], dtype=torch.uint8), 3).tolist() == [0xF5, 0x01]


def test_accepts_any_shape_and_integer_dtype():
    codes = torch.randint(0, 32, (3, 4, 5), generator=torch.Generator().manual_seed(0))  # int64
    assert torch.equal(unpack(pack(codes, 5), 60, 5), codes.reshape(-1).to(torch.uint8))
    flags = torch.tensor([True, False, True])
    assert torch.equal(unpack(pack(flags, 1), 3, 1).bool(), flags)


@pytest.mark.parametrize("bits", [0, 9, 2.0, True])
def test_rejects_bad_widths(bits):
    with pytest.raises(ValueError, match="bit width"):
        pack(torch.zeros(3, dtype=torch.uint8), bits)


def test_unpack_rejects_wrong_byte_count():
    with pytest.raises(ValueError, match="expected 2"):
        unpack(torch.zeros(3, dtype=torch.uint8), 5, 3)
    with pytest.raises(ValueError, match="expected 1"):
        unpack_trits(torch.zeros(2, dtype=torch.uint8), 5)


@pytest.mark.parametrize("numel", LENGTHS)
def test_trits_round_trip_five_per_byte(numel):
    codes = torch.randint(0, 3, (numel,), generator=torch.Generator().manual_seed(numel), dtype=torch.uint8)
    packed = pack_trits(codes)
    assert packed.dtype == torch.uint8
    assert packed.numel() == trit_bytes(numel) == (numel + 4) // 5
    assert torch.equal(unpack_trits(packed, numel), codes)


def test_trits_base_three_layout_and_extremes():
    assert pack_trits(torch.tensor([1, 2, 0, 0, 1], dtype=torch.uint8)).tolist() == [1 + 2 * 3 + 81]
    twos = torch.full((10,), 2, dtype=torch.uint8)
    assert pack_trits(twos).tolist() == [242, 242]  # 3^5 - 1: the largest byte used
    assert torch.equal(unpack_trits(pack_trits(twos), 10), twos)
