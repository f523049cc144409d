"""polytrain: parallel and distributed training of deep neural networks on PyTorch, measured honestly."""

__version__ = "0.1.0"
