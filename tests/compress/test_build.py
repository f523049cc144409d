"""The --compressor spec: names and chains, wrapper keys, argument routing, seeds per rank, errors."""

import pytest

from polytrain.compress import COMPRESSORS, NoCompression
from polytrain.compress.build import build_compressor, check_compressor
from polytrain.compress.quantize import RANK_SEED_STRIDE, KBit, QSGD
from polytrain.compress.wrappers import Chain, ErrorFeedback, Masked


def test_a_single_name_with_arguments():
    compressor = build_compressor("kbit", {"bits": 4})
    assert isinstance(compressor, KBit) and compressor.bits == 4 and compressor.seed == 0
    assert isinstance(build_compressor("none", {}), NoCompression)


def test_a_chain_routes_each_argument_to_the_member_that_takes_it():
    compressor = build_compressor("topk+kbit", {"ratio": 0.05, "bits": 2})
    assert isinstance(compressor, Chain) and compressor.name == "topk+kbit"
    assert compressor.first.ratio == 0.05 and compressor.second.bits == 2


def test_wrappers_nest_ef_inside_masked():
    compressor = build_compressor("topk+fp16", {"ratio": 0.1, "ef": True, "exclude_biases": True,
                                                "min_numel": 10, "exclude": "bn", "min_rate": 2})
    assert isinstance(compressor, Masked)
    assert compressor.exclude_biases and compressor.min_numel == 10 and compressor.exclude == "bn"
    assert compressor.min_rate == 2.0
    assert isinstance(compressor.inner, ErrorFeedback) and isinstance(compressor.inner.inner, Chain)
    assert isinstance(build_compressor("kbit", {"ef": False}), KBit)


def test_seeds_are_offset_per_rank_only_where_draws_must_differ():
    assert build_compressor("kbit", {"seed": 7}, rank=3).seed == 7 + 3 * RANK_SEED_STRIDE
    assert build_compressor("qsgd", {}, rank=2).seed == 2 * RANK_SEED_STRIDE
    assert build_compressor("randomk", {"seed": 7}, rank=3).seed == 7  # indices shared by all ranks
    chain = build_compressor("randomk+kbit", {"seed": 5}, rank=1)  # seed goes to every member
    assert chain.first.seed == 5 and chain.second.seed == 5 + RANK_SEED_STRIDE
    wrapped = build_compressor("qsgd", {"ef": True, "min_numel": 1}, rank=1)
    assert isinstance(wrapped.inner.inner, QSGD) and wrapped.inner.inner.seed == RANK_SEED_STRIDE


@pytest.mark.parametrize("name, args, message", [
    ("kbitz", {}, "unknown compressor 'kbitz'; available: bf16, "),
    ("topk+nope", {}, "unknown compressor 'nope'; available: "),
    ("topk+fp16+kbit", {}, "expected NAME or FIRST\\+SECOND"),
    ("topk+", {}, "expected NAME or FIRST\\+SECOND"),
    ("kbit", {"level": 3}, "compressor kbit takes no argument 'level'; valid: bits, seed, ef, min_numel, "
                           "exclude_biases, exclude, min_rate$"),
    ("none", {"ratio": 0.1}, "compressor none takes no argument 'ratio'; valid: ef, min_numel, "),
    ("topk+kbit", {"levels": 3}, "compressor topk\\+kbit takes no argument 'levels'; valid: bits, ratio, seed, ef, "),
    ("topk+randomk", {"ratio": 0.1}, "both topk and randomk take argument 'ratio'"),
    ("onebit", {"ef": True}, "compressor onebit has error feedback built in; drop ef=true"),
    ("topk+efsignsgd", {"ef": True}, "efsignsgd keeps a residual"),
    ("dgc", {"ef": True}, "compressor dgc has error feedback built in"),
    ("powersgd", {"ef": True}, "compressor powersgd has error feedback built in"),
    ("kbit", {"ef": "yes"}, "compressor kbit ef must be true or false"),
    ("kbit", {"bits": 9}, "kbit bits must be an integer in 1..8"),
    ("kbit", {"seed": "x"}, "kbit seed must be an integer"),
    ("kbit", {"min_numel": -3}, "min_numel must be an integer >= 0"),
    ("kbit", {"exclude": "(bias"}, "not a valid regular expression"),
    ("qsgd+fp16", {"levels": 200}, "qsgd levels must be an integer in 1..127"),
])
def test_each_error_is_one_line_and_raised_by_check(name, args, message):
    with pytest.raises(ValueError, match=message) as raised:
        check_compressor(name, args)
    assert "\n" not in str(raised.value)
    with pytest.raises(ValueError, match=message):
        build_compressor(name, args)


def test_check_accepts_every_registered_name_with_defaults():
    for name in COMPRESSORS.names():
        assert check_compressor(name, {}) is None
