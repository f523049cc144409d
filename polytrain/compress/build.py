"""Builds a compressor from the `--compressor NAME[:k=v,...]` spec: a name or chain and its arguments.

    build_compressor("topk+fp16", {"ratio": 0.01, "ef": True, "exclude_biases": True}, rank=r)
        == Masked(ErrorFeedback(Chain(TopK(ratio=0.01), Float16())), exclude_biases=True)

`name` is one registered compressor or a chain `first+second` (polytrain.compress.wrappers.Chain). The
wrapper keys `ef` (wrap in ErrorFeedback) and `min_numel`, `exclude_biases`, `exclude`, `min_rate` (wrap
in Masked, outermost) are taken out first; every other key goes to the chain member whose constructor
accepts it, and `seed` to every member that accepts one. Members whose draws must differ between ranks
(`per_rank_seed`) get seed + 1000003 * rank. `check_compressor` raises the same one-line ValueError
`build_compressor` would, so a bad spec fails before any worker starts.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping

from polytrain.compress.base import COMPRESSORS, Compressor
from polytrain.compress.quantize import RANK_SEED_STRIDE
from polytrain.compress.wrappers import Chain, ErrorFeedback, Masked

MASK_KEYS = ("min_numel", "exclude_biases", "exclude", "min_rate")
WRAPPER_KEYS = ("ef", *MASK_KEYS)


def _parameters(name: str) -> list[str]:
    """The constructor keywords of compressor `name`."""
    return [p for p in inspect.signature(COMPRESSORS.get(name)).parameters if p != "self"]


def _members(name: str) -> list[str]:
    members = name.split("+")
    if len(members) > 2 or not all(members):
        raise ValueError(f"compressor {name!r}: expected NAME or FIRST+SECOND")
    for member in members:
        COMPRESSORS.get(member)  # an unknown name lists the available ones
    return members


def _member_arguments(name: str, members: list[str], args: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Splits the non-wrapper `args` between the chain members (ValueError if a key has no taker).

    The messages follow polytrain.registry.Registry.check_arguments, listing the wrapper keys too.
    """
    split: list[dict[str, Any]] = [{} for _ in members]
    for key, value in args.items():
        takers = [i for i, member in enumerate(members) if key in _parameters(member)]
        if not takers:
            own = sorted({p for member in members for p in _parameters(member)})
            raise ValueError(f"compressor {name} takes no argument '{key}'; "
                             f"valid: {', '.join([*own, *WRAPPER_KEYS])}")
        if len(takers) == 2 and key != "seed":
            raise ValueError(f"compressor {name}: both {members[0]} and {members[1]} take argument "
                             f"'{key}'; a chain cannot tell which one it is for")
        for i in takers:
            split[i][key] = value
    return split


def _build_member(member: str, args: dict[str, Any], rank: int) -> Compressor:
    factory = COMPRESSORS.get(member)
    if factory.per_rank_seed and "seed" in _parameters(member):
        default = inspect.signature(factory).parameters["seed"].default
        seed = args.get("seed", default)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"{member} seed must be an integer; got {seed!r}")
        args = {**args, "seed": seed + RANK_SEED_STRIDE * rank}
    try:
        return factory(**args)
    except TypeError as error:  # a wrong type the constructor did not check
        raise ValueError(f"compressor {member}: {error}") from None


def build_compressor(name: str, args: Mapping[str, Any], rank: int = 0) -> Compressor:
    """The compressor `name` (a registered name or `first+second`) with `args`; see the module docstring.

    Args:
        name: a registered compressor name, or two joined by '+'.
        args: constructor arguments of the members and the wrapper keys ef, min_numel, exclude_biases,
            exclude, min_rate.
        rank: this process's rank, which offsets the seed of members with `per_rank_seed`.
    """
    members = _members(name)
    member_args = _member_arguments(name, members, {k: v for k, v in args.items() if k not in WRAPPER_KEYS})
    built = [_build_member(member, a, rank) for member, a in zip(members, member_args)]
    compressor: Compressor = built[0] if len(built) == 1 else Chain(*built)
    ef = args.get("ef", False)
    if not isinstance(ef, bool):
        raise ValueError(f"compressor {name} ef must be true or false; got {ef!r}")
    if ef:
        builtin = [c.name for c in built if c.error_feedback_builtin]
        if builtin:
            raise ValueError(f"compressor {builtin[0]} has error feedback built in; drop ef=true")
        compressor = ErrorFeedback(compressor)
    masking = {key: args[key] for key in MASK_KEYS if key in args}
    if masking:
        compressor = Masked(compressor, **masking)
    return compressor


def check_compressor(name: str, args: Mapping[str, Any]) -> None:
    """Raises the one-line ValueError that build_compressor(name, args) would raise; else returns None."""
    build_compressor(name, args)
