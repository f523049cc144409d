"""Gradient compressors with explicit state, and the wrappers error feedback, masking and chain.

Importing this package registers every compressor in COMPRESSORS (see polytrain.compress.base).
"""

from polytrain.compress.base import COMPRESSORS, Compressor, CompressorTraits, NoCompression, Payload, index_dtype
# Registers topk, randomk, threshold, dgc, powersgd.
from polytrain.compress import dgc, powersgd, sparsify  # noqa: F401
from polytrain.compress import quantize, sign  # noqa: F401  (registers fp16, bf16, kbit, qsgd, terngrad, onebit, signsgd, efsignsgd)
from polytrain.compress.build import build_compressor, check_compressor
from polytrain.compress.wrappers import Chain, ErrorFeedback, Masked

__all__ = ["COMPRESSORS", "Compressor", "CompressorTraits", "NoCompression", "Payload", "index_dtype"]
__all__ += ["build_compressor", "check_compressor", "Chain", "ErrorFeedback", "Masked"]
