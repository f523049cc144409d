"""The environment manifest written into every result."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

import polytrain


def _git_sha() -> str | None:
    """The commit of the polytrain checkout in use, or None when it is not a git checkout."""
    source = Path(polytrain.__file__).resolve().parent.parent
    try:
        done = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(seed: int, argv: list[str] | None = None) -> dict:
    """What produced a result: code version, library versions, machine, threads, seed and command line."""
    return {
        "git_sha": _git_sha(),
        "polytrain": polytrain.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "hostname": socket.gethostname(),
        # Set by `polytrain cluster` for runs on its emulated network; otherwise the machine's own.
        "network": os.environ.get("POLYTRAIN_NETWORK", "this machine's own (loopback between local ranks)"),
        "seed": seed,
        "argv": list(sys.argv if argv is None else argv),
    }
