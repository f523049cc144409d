"""polytrain: parallel and distributed training of deep neural networks on PyTorch, measured honestly.

The library API is `polytrain.train(Experiment(...)) -> Result`; the `polytrain` command wraps it.
"""

__version__ = "0.1.0"

from polytrain.config import Experiment  # noqa: E402
from polytrain.train import Result, train  # noqa: E402  (the function shadows the subpackage's name here)

__all__ = ["Experiment", "Result", "train", "__version__"]
