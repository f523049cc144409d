"""The benchmark's settings: message sizes, algorithm names and element types from the command line."""

from __future__ import annotations

import re
from typing import Sequence

import torch

from polytrain.comm.algorithms import ALLREDUCE_ALGORITHMS

# Binary multiples, as nccl-tests' -b/-e flags: 1KB = 1 KiB = 1024 bytes.
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
          "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16}
DEFAULT_SIZES = "4^5..4^12"  # 1 KiB, 4 KiB, ..., 16 MiB


def parse_size(text: str) -> int:
    """"64KB" -> 65536 (binary units: K, KB, KiB = 1024); a plain number is bytes."""
    match = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"--sizes: cannot read {text!r}; write sizes like 1KB, 64KB, 16MB or 4096")
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


def parse_sizes(text: str) -> list[int]:
    """Message sizes in bytes from "1KB,64KB,1MB" or "B^a..B^b" (every power of B from B^a to B^b).

    Items are separated by commas and may mix both forms; the result is sorted and without repeats.
    """
    sizes: set[int] = set()
    for item in text.split(","):
        powers = re.fullmatch(r"\s*(\d+)\^(\d+)\s*\.\.\s*(\d+)\^(\d+)\s*", item)
        if powers:
            base, first, other_base, last = map(int, powers.groups())
            if base < 2 or base != other_base or first > last:
                raise ValueError(f"--sizes: {item.strip()!r} must be B^a..B^b with one base B >= 2 and a <= b")
            sizes.update(base ** exponent for exponent in range(first, last + 1))
        else:
            sizes.add(parse_size(item))
    if min(sizes) < 1:
        raise ValueError("--sizes: every size must be at least 1 byte")
    return sorted(sizes)


def parse_algorithms(text: str) -> list[str]:
    """"ring,tree" -> ["ring", "tree"] (order kept, repeats dropped); "all" -> every registered algorithm."""
    if text.strip() == "all":
        return ALLREDUCE_ALGORITHMS.names()
    names = list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    if not names:
        raise ValueError("--algorithms: name at least one algorithm, or 'all'")
    for name in names:
        ALLREDUCE_ALGORITHMS.get(name)
    return names


def parse_dtype(name: str) -> torch.dtype:
    """"float32" -> torch.float32, for the element types the benchmark reduces."""
    if name not in DTYPES:
        raise ValueError(f"--dtype: unknown type {name!r}; available: {', '.join(DTYPES)}")
    return DTYPES[name]


def bytes_per_element(dtype: torch.dtype) -> int:
    """The size of one element of the floating-point `dtype` in bytes."""
    return torch.finfo(dtype).bits // 8


def check_settings(sizes_bytes: Sequence[int], repeats: int, warmup: int, dtype: torch.dtype) -> None:
    """Raises ValueError unless every size is whole elements of `dtype`, repeats >= 1 and warmup >= 0."""
    element_bytes = bytes_per_element(dtype)
    odd = [size for size in sizes_bytes if size % element_bytes]
    if odd:
        raise ValueError(f"message size {odd[0]} bytes is not a whole number of {element_bytes}-byte "
                         f"{str(dtype).removeprefix('torch.')} elements")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0; got {repeats} and {warmup}")


def format_bytes(n_bytes: float) -> str:
    """1024 -> "1 KiB", 16777216 -> "16 MiB" (3 significant digits)."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.3g} {unit}"
    return f"{n_bytes:.3g} B"
