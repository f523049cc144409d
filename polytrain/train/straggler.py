"""A reproducible straggler: one rank's forward and backward passes take `slowdown` times as long.

`--straggler rank=1,slowdown=3` (Experiment.straggler). After its step schedule has run, the straggling rank
waits (slowdown - 1) times what the passes took before the policy's step, so it is slower by a factor of
its own compute on any machine, and the waiting time is recorded (result.json's `comm.straggler`). (Buckets
that an overlapping allreduce launched during the backward pass have left already; the rank's next step
then starts late by the same time, so the cycle of a synchronous run stretches alike.) Only time changes:
the arithmetic of the step is the same, so a synchronous run's weights do not depend on it.
"""

from __future__ import annotations

import time
from typing import Callable, Mapping

KEYS = ("rank", "slowdown")


def straggler_error(settings: Mapping, workers: int) -> str | None:
    """Why `settings` is not a valid straggler for `workers` ranks, or None ({} means none)."""
    if not settings:
        return None
    if sorted(settings) != sorted(KEYS):
        return f"straggler needs rank=R,slowdown=S (e.g. rank=1,slowdown=3); got {', '.join(sorted(settings))}"
    rank, slowdown = settings["rank"], settings["slowdown"]
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < workers:
        return f"straggler rank must be a rank in 0..{workers - 1}, got {rank!r}"
    if isinstance(slowdown, bool) or not isinstance(slowdown, (int, float)) or slowdown < 1:
        return f"straggler slowdown must be a number >= 1, got {slowdown!r}"
    return None


class Straggler:
    """This rank's slowdown (1: not the straggler) and the time it has waited so far."""

    def __init__(self, settings: Mapping, rank: int, sleep: Callable[[float], None] = time.sleep) -> None:
        self.slowdown = float(settings["slowdown"]) if settings and settings["rank"] == rank else 1.0
        self.sleep = sleep
        self.waited_s = 0.0

    def after_compute(self, compute_s: float) -> None:
        """Stretches passes that took `compute_s` seconds to slowdown times that."""
        if self.slowdown > 1:
            wait = (self.slowdown - 1) * compute_s
            self.sleep(wait)
            self.waited_s += wait
