"""polytrain: parallel and distributed training of deep neural networks on PyTorch, measured honestly.

Three ways in: the `polytrain` command; `polytrain.train(Experiment(...), model=..., data=..., task=...)
-> Result` with registered names or the user's own model factory, datasets and task; and, for a user's
own training loop, `session = polytrain.setup(strategy=...)` (polytrain.train.session).
"""

__version__ = "0.1.0"

from polytrain.config import Experiment  # noqa: E402
from polytrain.tasks import Metric, Task  # noqa: E402
from polytrain.train import Result, train  # noqa: E402  (the function shadows the subpackage's name here)
from polytrain.train.session import Session, setup  # noqa: E402

__all__ = ["Experiment", "Result", "train", "setup", "Session", "Task", "Metric", "__version__"]
