"""Dense bit packing of small unsigned integer codes into uint8, vectorised (no loop over elements).

`pack(codes, bits)` stores n codes of width `bits` (1..8) in exactly ceil(n * bits / 8) bytes; `unpack`
reverses it given n and bits. Layout (little-endian in bits): code i occupies bits [i * bits, (i + 1) *
bits) of the byte string, the low bit of a byte first. For widths that divide 8 (1, 2, 4) every byte
holds 8 / bits whole codes; other widths straddle bytes, packed bit-exactly 8 codes per `bits` bytes.

`pack_trits(codes)` stores ternary codes (0, 1, 2) five to a byte in base 3 (3^5 = 243 <= 256, so 1.6
bits per code against 2 for `pack(codes, 2)`), the packing TernGrad's ternary gradients need (Wen et
al., "TernGrad", NeurIPS 2017, sec. 3 sends 2 bits per element; base 3 saves a fifth of that).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TRITS_PER_BYTE = 5
_TRIT_WEIGHTS = torch.tensor([1, 3, 9, 27, 81], dtype=torch.uint8)
# Row b holds the five base-3 digits of byte b (rows 243..255 never occur in a packed string).
_TRIT_TABLE = ((torch.arange(256).unsqueeze(1) // _TRIT_WEIGHTS.long()) % 3).to(torch.uint8)


def packed_bytes(numel: int, bits: int) -> int:
    """ceil(numel * bits / 8): the bytes `pack` uses for `numel` codes of width `bits`."""
    return -(-numel * bits // 8)


def trit_bytes(numel: int) -> int:
    """ceil(numel / 5): the bytes `pack_trits` uses for `numel` ternary codes."""
    return -(-numel // TRITS_PER_BYTE)


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
        raise ValueError(f"bit width {bits!r} is not supported; expected an integer in 1..8")


def _padded(flat: torch.Tensor, multiple: int, dtype: torch.dtype) -> torch.Tensor:
    """`flat` in `dtype`, zero-padded to a multiple of `multiple` elements."""
    pad = -flat.numel() % multiple
    flat = flat.to(dtype)
    return F.pad(flat, (0, pad)) if pad else flat


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Packs integer codes in [0, 2^bits) (any shape, read flat) into ceil(n * bits / 8) uint8 bytes.

    Codes must already lie in range; higher bits would spill into the neighbouring code.
    """
    _check_bits(bits)
    flat = codes.reshape(-1)
    if bits == 8:
        return flat.to(torch.uint8)
    if 8 % bits == 0:
        per_byte = 8 // bits
        groups = _padded(flat, per_byte, torch.uint8).view(-1, per_byte)
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=flat.device)
        # The shifted codes occupy disjoint bits, so their sum is their bitwise or.
        return (groups << shifts).sum(dim=1, dtype=torch.uint8)
    # 8 codes of `bits` bits make exactly `bits` bytes: assemble them in one int64 word (<= 56 bits).
    groups = _padded(flat, 8, torch.int64).view(-1, 8)
    words = (groups << torch.arange(0, 8 * bits, bits, dtype=torch.int64, device=flat.device)).sum(dim=1)
    byte_shifts = torch.arange(0, 8 * bits, 8, dtype=torch.int64, device=flat.device)
    out = ((words.unsqueeze(1) >> byte_shifts) & 0xFF).to(torch.uint8).view(-1)
    # The padding codes are zero, so the bytes cut off here hold only zero bits.
    return out[: packed_bytes(flat.numel(), bits)]


def unpack(packed: torch.Tensor, numel: int, bits: int) -> torch.Tensor:
    """The `numel` codes (uint8, 1-D) that `pack(codes, bits)` stored in `packed`."""
    _check_bits(bits)
    expected = packed_bytes(numel, bits)
    if packed.numel() != expected:
        raise ValueError(f"{packed.numel()} packed bytes cannot hold {numel} codes of {bits} bits; "
                         f"expected {expected}")
    flat = packed.reshape(-1)
    if bits == 8:
        return flat.to(torch.uint8)
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=flat.device)
        return ((flat.unsqueeze(1) >> shifts) & mask).view(-1)[:numel]
    groups = _padded(flat, bits, torch.int64).view(-1, bits)
    words = (groups << torch.arange(0, 8 * bits, 8, dtype=torch.int64, device=flat.device)).sum(dim=1)
    code_shifts = torch.arange(0, 8 * bits, bits, dtype=torch.int64, device=flat.device)
    return ((words.unsqueeze(1) >> code_shifts) & mask).to(torch.uint8).view(-1)[:numel]


def pack_trits(codes: torch.Tensor) -> torch.Tensor:
    """Packs codes in {0, 1, 2} (any shape, read flat) five to a byte, base 3: ceil(n / 5) uint8 bytes.

    Code i is digit i % 5 (least significant first) of byte i // 5.
    """
    groups = _padded(codes.reshape(-1), TRITS_PER_BYTE, torch.uint8).view(-1, TRITS_PER_BYTE)
    return (groups * _TRIT_WEIGHTS.to(groups.device)).sum(dim=1, dtype=torch.uint8)  # at most 242: no overflow


def unpack_trits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The `numel` ternary codes (uint8 in {0, 1, 2}, 1-D) that `pack_trits` stored in `packed`."""
    expected = trit_bytes(numel)
    if packed.numel() != expected:
        raise ValueError(f"{packed.numel()} packed bytes cannot hold {numel} ternary codes; "
                         f"expected {expected}")
    return _TRIT_TABLE.to(packed.device)[packed.reshape(-1).long()].view(-1)[:numel]
