"""This machine as `polytrain calibrate` measured it: a small JSON profile and the compute model on it.

The profile (`$POLYTRAIN_PROFILE`, default ~/.cache/polytrain/profile.json) holds, per number of ranks
sharing the machine (each with its share of the cores):

- `compute.fits`: seconds = a FLOPs + b activation bytes + c per module, fitted separately for forward and
  backward over the top-level modules of the calibration models (non-negative least squares);
- `compute.measured`: per-module forward and backward seconds of the models calibrated with `--model`,
  at each calibrated batch (prediction interpolates in the batch; these take precedence over the fit);
- `compute.update` and `compute.overhead`: the optimizer step (seconds per parameter element and pass) and
  the rest of a step (data, zeroing, Python), each as intercept + slope; `compute.residual`: that rest
  measured per calibration model and batch (real steps without communication), used for those models;
- `links[bandwidth][algorithm][ranks]`: alpha, beta, gamma of every allreduce algorithm (the collectives
  benchmark's fit), on loopback (`none`) and on the emulated cluster at each bandwidth;
- `compression[name]`: seconds of compress + decompress as intercept + per gradient byte;
- `comm_scale[bandwidth]`: how much longer transfers take inside a training step than in the benchmark,
  for gloo's allreduce (`native`) and for every point-to-point path (`p2p`: the other algorithms, servers,
  pipelines);
- `overlap[bandwidth]`: the share of the hideable communication that overlapping hid in one real run
  (below 0 when overlapping cost more than it hid).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from polytrain.perf.cluster import OPTIMIZER_PASSES, Cluster, Link

PROFILE_VERSION = 1


def default_profile_path() -> Path:
    return Path(os.environ.get("POLYTRAIN_PROFILE") or Path.home() / ".cache" / "polytrain" / "profile.json")


def _nearest(table: dict, ranks: int) -> tuple[int, object]:
    """The entry of the nearest calibrated rank count (ties: the larger) and that count."""
    known = min(table, key=lambda key: (abs(int(key) - ranks), -int(key)))
    return int(known), table[known]


def _interpolate(points: list[tuple[int, np.ndarray]], batch: int) -> np.ndarray:
    """Piecewise linear in the batch through (batch, values) points sorted by batch; outside them, the
    nearest segment continued."""
    right = next((i for i, (b, _) in enumerate(points) if b > batch), len(points) - 1)
    (b0, v0), (b1, v1) = points[max(0, right - 1)], points[max(1, right)]
    return v0 + (v1 - v0) * (batch - b0) / (b1 - b0)


@dataclass
class CalibratedCompute:
    """Compute on this machine from a profile (see the module docstring)."""

    profile: "Profile"
    source: str = "calibrated"

    @property
    def cores(self) -> int:
        return int(self.profile.data["cores"])

    def _scale(self, calibrated: int, ranks: int) -> float:
        """From ranks that were calibrated to ranks that were not: past the cores, the ranks share them."""
        return max(1.0, ranks / self.cores) / max(1.0, calibrated / self.cores)

    def _measured(self, workload, batch: int, ranks: int) -> list[tuple[float, float]] | None:
        rows = [row for row in self.profile.data["compute"].get("measured", [])
                if row["model"] == workload.model and tuple(row["input_shape"]) == workload.input_shape
                and row["num_classes"] == workload.num_classes and len(row["blocks"]) == len(workload.blocks)]
        if not rows:
            return None
        counts = {row["ranks"] for row in rows}
        calibrated = min(counts, key=lambda known: (abs(known - ranks), -known))
        points = sorted((row["batch"], row["blocks"]) for row in rows if row["ranks"] == calibrated)
        scale = self._scale(calibrated, ranks)
        if len(points) == 1:  # one batch: proportional in the batch
            (b0, blocks), = points
            return [(scale * f * batch / b0, scale * g * batch / b0) for f, g in blocks]
        times = _interpolate([(b, np.asarray(blocks, dtype=float)) for b, blocks in points], batch)
        return [(scale * max(0.0, f), scale * max(0.0, g)) for f, g in times]

    def block_times(self, workload, batch: int, ranks_sharing: int) -> list[tuple[float, float]]:
        measured = self._measured(workload, batch, ranks_sharing)
        if measured is not None:
            return measured
        calibrated, fit = _nearest(self.profile.data["compute"]["fits"], ranks_sharing)
        scale = self._scale(calibrated, ranks_sharing)
        forward, backward = fit["forward"], fit["backward"]
        return [(scale * batch * (forward[0] * b.flops_forward + forward[1] * b.bytes_forward) + scale * forward[2],
                 scale * batch * (backward[0] * b.flops_backward + backward[1] * b.bytes_forward) + scale * backward[2])
                for b in workload.blocks]

    def uses_measurements(self, workload) -> bool:
        return any(row["model"] == workload.model and tuple(row["input_shape"]) == workload.input_shape
                   for row in self.profile.data["compute"].get("measured", []))

    def update_s(self, params: int, optimizer: str, ranks_sharing: int) -> float:
        calibrated, (intercept, per_element_pass) = _nearest(self.profile.data["compute"]["update"], ranks_sharing)
        return self._scale(calibrated, ranks_sharing) * (
            intercept + per_element_pass * params * OPTIMIZER_PASSES.get(optimizer, 4))

    def step_overhead_s(self, workload, batch: int, ranks_sharing: int) -> float:
        rows = [row for row in self.profile.data["compute"].get("residual", [])
                if row["model"] == workload.model and tuple(row["input_shape"]) == workload.input_shape
                and row["num_classes"] == workload.num_classes]
        if rows:
            calibrated = min({row["ranks"] for row in rows}, key=lambda known: (abs(known - ranks_sharing), -known))
            points = sorted((row["batch"], row["seconds"]) for row in rows if row["ranks"] == calibrated)
            scale = self._scale(calibrated, ranks_sharing)
            if len(points) == 1:
                return scale * points[0][1]
            return scale * float(_interpolate([(b, np.asarray(seconds)) for b, seconds in points], batch))
        calibrated, (intercept, per_byte) = _nearest(self.profile.data["compute"]["overhead"], ranks_sharing)
        return self._scale(calibrated, ranks_sharing) * (intercept + per_byte * 4 * batch * workload.input_elements)

    def compression_s(self, compressor: str, n_bytes: float, ranks_sharing: int) -> float:
        table = self.profile.data.get("compression", {})
        base = compressor.split("+")[0]
        if base not in table:
            return 0.0
        intercept, per_byte = table[base]
        return max(1.0, ranks_sharing / self.cores) * (intercept + per_byte * n_bytes)


@dataclass
class Profile:
    data: dict
    path: Path | None = None

    def bandwidths(self) -> list[str]:
        return list(self.data["links"])

    def cluster(self, bandwidth: str, ranks: int) -> Cluster:
        """This machine's `ranks` ranks on loopback (`none`) or on emulated hosts at `bandwidth`."""
        links = self.data["links"]
        if bandwidth not in links:
            raise ValueError(f"the profile {self.path} has no links calibrated at bandwidth {bandwidth}; it has "
                             f"{', '.join(links)} (polytrain calibrate --bandwidths {bandwidth})")
        scales = self.data.get("comm_scale", {}).get(bandwidth, {})
        if not isinstance(scales, dict):  # a profile of one scale for every path
            scales = {"native": scales, "p2p": scales}
        scale = {name: float(scales.get("native" if name == "native" else "p2p", 1.0)) for name in links[bandwidth]}
        fitted = {name: {int(k): (scale[name] * v[0], scale[name] * v[1], v[2]) for k, v in table.items()}
                  for name, table in links[bandwidth].items()}
        ring = fitted.get("ring") or next(iter(fitted.values()))
        _, (alpha, beta, gamma) = _nearest(ring, ranks)
        link = Link(alpha, beta)
        return Cluster(f"local:{bandwidth}", 1, ranks, CalibratedCompute(self), link, link, gamma_s_per_byte=gamma,
                       memory_per_rank_bytes=self.data.get("memory_bytes", 0) / max(1, ranks) or None,
                       links=fitted, shared_compute=True,
                       overlap=float(self.data.get("overlap", {}).get(bandwidth, self.data.get("overlap", {})
                                                                      .get("none", 1.0))),
                       description=f"this machine ({self.data['cores']} cores) calibrated {self.data['created']}")

    def save(self, path: str | Path | None = None) -> Path:
        """Writes the profile atomically (a half-written profile never replaces a good one)."""
        from polytrain.train.io import atomic_write_json

        target = Path(path) if path is not None else (self.path or default_profile_path())
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(target, self.data)
        self.path = target
        return target


REQUIRED = ("version", "cores", "created", "compute", "links")


def load_profile(path: str | Path | None = None) -> Profile:
    """The calibration profile at `path` (default: default_profile_path()); ValueError in one line when it
    is missing or not a profile."""
    target = Path(path) if path is not None else default_profile_path()
    if not target.is_file():
        raise ValueError(f"no calibration profile at {target}; run `polytrain calibrate` first "
                         f"(or set POLYTRAIN_PROFILE)")
    try:
        data = json.loads(target.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"calibration profile {target} is not valid JSON: {error}") from None
    missing = [key for key in REQUIRED if not isinstance(data, dict) or key not in data]
    if missing:
        raise ValueError(f"calibration profile {target} lacks {', '.join(missing)}; recalibrate with polytrain calibrate")
    if data["version"] != PROFILE_VERSION:
        raise ValueError(f"calibration profile {target} has version {data['version']}, this polytrain reads "
                         f"version {PROFILE_VERSION}; recalibrate with polytrain calibrate")
    return Profile(data, target)
