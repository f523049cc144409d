"""Faults injected on purpose, reproducibly (`--fault KIND:k=v,...`, repeatable; Experiment.faults).

Kinds:
- `kill:rank=R,step=S`: worker rank R kills itself (SIGKILL) as it is about to compute global step S (0-based:
  after S steps), in the run's first attempt only, so that a restarted run gets past it.
- `hang:rank=R,step=S`: the same rank stops making progress instead, sleeping until it is killed; the others
  notice within the collective timeout (`timeout_s`).
- `slow:rank=R,factor=F`: rank R's forward and backward passes take F times as long, for the whole run (the
  run's straggler, polytrain.train.straggler: `resolve` turns it into Experiment.straggler).
- `corrupt-checkpoint`: when the first kill or hang is detected, one byte in the middle of the newest
  checkpoint is flipped, so the restart must fall back to the one before (keep_checkpoints >= 2).
- `byzantine:ranks=R[+R...],attack=A[,scale=x]`: those data-parallel replicas send gradients of attack A where
XX, `scaled`
  (scale g, scale 10), `gaussian` (noise of standard deviation scale per coordinate, scale 1), `alie` ("a
  little is enough": the honest mean minus z times their coordinate-wise standard deviation, z = scale or
  Baruch et al. 2019's z_max for n and f), `ipm` (inner-product manipulation: -scale times the honest mean,
  scale 0.1; Xie et al. 2020) or `labelflip` (the rank trains on labels C - 1 - y: a data attack, through
  any policy). Gradient attacks are omniscient (ALIE and IPM need the honest gradients): every combining
  rank replaces the Byzantine rows of the gathered gradients by the attack's, identically, so the bytes
  sent are those an attacker would send and the noise is the same on every rank.

Kill and hang faults record what happened in `faults.jsonl` of the run directory (the time, rank and step),
from which the launching process derives how long detection and recovery took (result.json's `faults`).
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

FAULT_KINDS = {"kill": ("rank", "step"), "hang": ("rank", "step"), "slow": ("rank", "factor"),
               "corrupt-checkpoint": (), "byzantine": ("ranks", "attack", "scale")}
REQUIRED = {"kill": ("rank", "step"), "hang": ("rank", "step"), "slow": ("rank", "factor"),
            "corrupt-checkpoint": (), "byzantine": ("ranks", "attack")}
ATTACK_SCALES = {"signflip": 4.0, "scaled": 10.0, "gaussian": 1.0, "alie": None, "ipm": 0.1, "labelflip": None}
GRADIENT_ATTACKS = ("signflip", "scaled", "gaussian", "alie", "ipm")
EVENTS_NAME = "faults.jsonl"


def parse_fault(spec: str) -> dict:
    """`kill:rank=2,step=30` -> {"kind": "kill", "rank": 2, "step": 30} (checked by `check_faults`)."""
    from polytrain.config import parse_named

    kind, args = parse_named(spec, "--fault")
    if "kind" in args:
        raise ValueError(f"--fault {spec!r}: the kind comes before the colon, e.g. kill:rank=1,step=10")
    return {"kind": kind, **args}


def is_whole(value: Any) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def byzantine_ranks(value: Any) -> tuple[int, ...]:
    """`ranks=1`, `ranks=1+3` or a TOML list [1, 3] as a sorted tuple; ValueError in one line otherwise."""
    if is_whole(value):
        items = [value]
    elif isinstance(value, str) and value:
        try:
            items = [int(part) for part in value.split("+")]
        except ValueError:
            items = None
    elif isinstance(value, list) and value and all(is_whole(v) for v in value):
        items = value
    else:
        items = None
    if items is None or len(set(items)) != len(items):
        raise ValueError(f"byzantine ranks must be distinct replica numbers, e.g. ranks=1 or ranks=1+3; got {value!r}")
    return tuple(sorted(items))


def check_faults(faults: list, workers: int, replicas: int) -> None:
    """Raises ValueError (one line) for the first fault that is malformed or names a rank the run lacks."""
    if not isinstance(faults, list):
        raise ValueError(f"faults must be a list of fault tables (kind = \"kill\", rank = 1, step = 10); got {faults!r}")
    kinds = [fault.get("kind") if isinstance(fault, Mapping) else None for fault in faults]
    for fault, kind in zip(faults, kinds):
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r}; expected {', '.join(FAULT_KINDS)} (e.g. --fault kill:rank=1,step=10)")
        given = set(fault) - {"kind"}
        unknown = sorted(given - set(FAULT_KINDS[kind]))
        missing = [key for key in REQUIRED[kind] if key not in given]
        if unknown or missing:
            usage = ",".join(f"{key}=.." for key in FAULT_KINDS[kind])
            what = f"takes no argument '{unknown[0]}'" if unknown else f"needs {missing[0]}"
            raise ValueError(f"fault {kind} {what}; expected {kind}{':' + usage if usage else ''}")
        if kind in ("kill", "hang", "slow"):
            rank = fault["rank"]
            if not is_whole(rank) or not 0 <= rank < workers:
                raise ValueError(f"fault {kind} rank must be a worker rank in 0..{workers - 1}; got {rank!r}")
        if kind in ("kill", "hang") and not (is_whole(fault["step"]) and fault["step"] >= 0):
            raise ValueError(f"fault {kind} step must be a global step >= 0; got {fault['step']!r}")
        if kind == "slow" and (isinstance(fault["factor"], bool) or not isinstance(fault["factor"], (int, float))
                               or fault["factor"] < 1):
            raise ValueError(f"fault slow factor must be a number >= 1; got {fault['factor']!r}")
        if kind == "byzantine":
            ranks = byzantine_ranks(fault["ranks"])
            if ranks[-1] >= replicas or ranks[0] < 0:
                raise ValueError(f"byzantine ranks must be data-parallel replicas in 0..{replicas - 1}; got {fault['ranks']!r}")
            if len(ranks) * 2 >= replicas:
                raise ValueError(f"byzantine ranks {fault['ranks']!r} are {len(ranks)} of {replicas} replicas; an "
                                 f"honest majority needs fewer than half")
            if fault["attack"] not in ATTACK_SCALES:
                raise ValueError(f"unknown byzantine attack {fault['attack']!r}; expected {', '.join(ATTACK_SCALES)}")
            scale = fault.get("scale", 1.0)
            if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
                raise ValueError(f"byzantine scale must be a finite number; got {scale!r}")
    for kind in ("slow", "corrupt-checkpoint", "byzantine"):
        if kinds.count(kind) > 1:
            raise ValueError(f"at most one {kind} fault per run; got {kinds.count(kind)}")
    if "corrupt-checkpoint" in kinds and not {"kill", "hang"} & set(kinds):
        raise ValueError("fault corrupt-checkpoint corrupts the newest checkpoint when a kill or hang is detected; "
                         "add one (e.g. --fault kill:rank=1,step=10)")


@dataclass(frozen=True)
class Byzantine:
    """The Byzantine replicas of a run and their attack."""

    ranks: tuple[int, ...]
    attack: str
    scale: float | None
    seed: int = 0

    @classmethod
    def of(cls, faults: list, seed: int = 0) -> "Byzantine | None":
        fault = next((f for f in faults if f["kind"] == "byzantine"), None)
        if fault is None:
            return None
        return cls(byzantine_ranks(fault["ranks"]), fault["attack"], fault.get("scale", ATTACK_SCALES[fault["attack"]]),
                   seed)

    @property
    def attacks_gradients(self) -> bool:
        return self.attack in GRADIENT_ATTACKS

    def corrupt(self, rows: torch.Tensor, step: int) -> torch.Tensor:
        """`rows` (n, d), one gradient per replica, with the Byzantine replicas' rows replaced by the attack's."""
        if not self.attacks_gradients:
            return rows
        n = rows.shape[0]
        bad = list(self.ranks)
        honest = rows[[i for i in range(n) if i not in self.ranks]]
        if self.attack == "signflip":
            row = -self.scale * rows[bad]
        elif self.attack == "scaled":
            row = self.scale * rows[bad]
        elif self.attack == "gaussian":
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
            row = self.scale * torch.randn(len(bad), rows.shape[1], generator=generator, dtype=torch.float64)
        elif self.attack == "alie":
            z = self.scale if self.scale is not None else alie_z(n, len(bad))
            row = (honest.mean(dim=0) - z * honest.std(dim=0, unbiased=honest.shape[0] > 1)).expand(len(bad), -1)
        else:  # ipm
            row = (-self.scale * honest.mean(dim=0)).expand(len(bad), -1)
        corrupted = rows.clone()
        corrupted[bad] = row.to(rows.dtype)
        return corrupted

    def flips_labels(self, replica: int) -> bool:
        return self.attack == "labelflip" and replica in self.ranks


def alie_z(n: int, f: int) -> float:
    """Baruch et al. 2019's z_max: with s = floor(n/2 + 1) - f replicas needed for a majority, the
    standard normal quantile of (n - s) / n."""
    s = n // 2 + 1 - f
    return float(torch.special.ndtri(torch.tensor((n - s) / n, dtype=torch.float64)))


def flip_labels(y: torch.Tensor, classes: int) -> torch.Tensor:
    """Label flipping: class c becomes C - 1 - c."""
    return classes - 1 - y


def record_event(out: str | Path | None, **fields: Any) -> None:
    """Appends one event (with the wall time) to the run's faults.jsonl; a no-op without a run directory."""
    if out is None:
        return
    Path(out).mkdir(parents=True, exist_ok=True)
    line = json.dumps({**fields, "time": time.time()}) + "\n"
    with open(Path(out) / EVENTS_NAME, "a") as file:  # one short O_APPEND write: lines do not interleave
        file.write(line)
        file.flush()
        os.fsync(file.fileno())


def read_events(out: str | Path) -> list[dict]:
    path = Path(out) / EVENTS_NAME
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class FaultInjector:
    """The kill and hang faults of one worker rank, in one attempt of a run (faults fire in attempt 0)."""

    def __init__(self, faults: list, rank: int, attempt: int, out: str | None) -> None:
        self.mine = {f["step"]: f["kind"] for f in faults
                     if f["kind"] in ("kill", "hang") and f["rank"] == rank} if attempt == 0 else {}
        self.rank, self.out = rank, out

    def before_step(self, global_step: int) -> None:
        kind = self.mine.get(global_step)
        if kind is None:
            return
        record_event(self.out, event="fault", attempt=0, kind=kind, rank=self.rank, step=global_step)
        if kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        while True:  # hang: no progress, no exit, until the launcher stops this process
            time.sleep(3600)


def flip_byte(path: str | Path) -> None:
    """Flips every bit of the byte in the middle of `path` (a corrupted file of the same size)."""
    with open(path, "r+b") as file:
        size = file.seek(0, os.SEEK_END)
        file.seek(size // 2)
        value = file.read(1)[0]
        file.seek(size // 2)
        file.write(bytes([value ^ 0xFF]))
