"""Progress reporting: a rich progress bar on a terminal, plain lines otherwise, or nothing."""

from __future__ import annotations

import sys
from typing import Protocol, TextIO


class Reporter(Protocol):
    """Receives the progress of a training run."""

    def start(self, description: str, epochs: int, first_epoch: int) -> None:
        """Training of `epochs` epochs starts (or resumes) at epoch `first_epoch` (0-based)."""

    def step(self, epoch: int, step: int, steps: int, loss: float) -> None:
        """Step `step` of `steps` in `epoch` finished with this training loss."""

    def epoch(self, row: dict) -> None:
        """An epoch finished; `row` is its metrics.jsonl line."""

    def close(self) -> None:
        """Training ended (successfully or not)."""


class SilentReporter:
    """Reports nothing: the library default."""

    def start(self, description: str, epochs: int, first_epoch: int) -> None:
        pass

    def step(self, epoch: int, step: int, steps: int, loss: float) -> None:
        pass

    def epoch(self, row: dict) -> None:
        pass

    def close(self) -> None:
        pass


def _epoch_line(row: dict) -> str:
    # The task's test metric is the row's one test_* key besides the loss.
    name = next(key[len("test_"):] for key in row if key.startswith("test_") and key != "test_loss")
    shown = f"acc {100 * row['test_accuracy']:6.2f}%" if name == "accuracy" else f"{name} {row['test_' + name]:.4g}"
    return (f"epoch {row['epoch']:>3}  loss {row['train_loss']:.4f} (test {row['test_loss']:.4f})  "
            f"test {shown}  {row['samples_per_s']:6.0f} samples/s  {row['wall_s']:6.1f} s")


class PlainReporter(SilentReporter):
    """One line per epoch, for logs and pipes."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def start(self, description: str, epochs: int, first_epoch: int) -> None:
        print(f"{description}: epochs {first_epoch + 1}..{epochs}", file=self.stream, flush=True)

    def epoch(self, row: dict) -> None:
        print(_epoch_line(row), file=self.stream, flush=True)


class RichReporter(PlainReporter):
    """A rich progress bar over all steps, with the epoch lines printed above it."""

    def __init__(self, stream: TextIO) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        super().__init__(stream)
        self.console = Console(file=stream)
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn(),
                                 console=self.console, transient=True)
        self.task = None

    def start(self, description: str, epochs: int, first_epoch: int) -> None:
        self.console.print(f"{description}: epochs {first_epoch + 1}..{epochs}", highlight=False)
        self.progress.start()
        self.task = self.progress.add_task("epoch", total=None, loss=float("nan"))

    def step(self, epoch: int, step: int, steps: int, loss: float) -> None:
        self.progress.update(self.task, description=f"epoch {epoch + 1}", completed=step + 1, total=steps,
                             loss=loss)

    def epoch(self, row: dict) -> None:
        self.progress.console.print(_epoch_line(row), highlight=False)

    def close(self) -> None:
        self.progress.stop()


def console_reporter(stream: TextIO = sys.stdout) -> Reporter:
    """A progress bar when `stream` is a terminal, plain lines otherwise."""
    return RichReporter(stream) if stream.isatty() else PlainReporter(stream)
