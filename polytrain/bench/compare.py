"""`polytrain compare`: a matrix of runs (strategies x meshes x compressors x workers x bandwidths x settings x
seeds) with a single-worker baseline, interleaved, resumable, every run kept, summarised honestly.

The rules (DESIGN.md section 6; MLPerf's time-to-train rules; Hoefler & Belli, SC15):
- every run is its own `polytrain train` process with its own directory (config.toml, log.txt, result.json,
  metrics.jsonl); a finished run (result.json present) is never rerun, a failed one is moved aside (kept
  as `seed-S.failed-K`) and run again by the next invocation; until then it counts as never reaching the
  target, as MLPerf counts a run that fails;
- runs go in a seeded random order, so that drift over the session hits every cell alike;
- the single-worker baseline of the same code (the base settings on one worker, without the parallel
  settings) is always part of the matrix, one per combination of `vary` values;
- per cell: medians with nonparametric 95 % CIs over seeds, MLPerf's olympic mean (drop the best and the
  worst, average the rest) from 5 runs, speedups against the baseline of the same seed, summarised per
  seed (never a ratio of averages), and always the test accuracy beside them;
- guardrails: synthetic data, fewer than 5 seeds, failed runs, and a target the baseline does not reach
  are flagged in the summary;
- optionally more seeds until each cell's CI lies within e % of its median.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import itertools
import json
import math
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence, TextIO

from polytrain.bench.stats import median_ci
from polytrain.config import (ConfigError, Experiment, apply_overrides, flatten_toml, load_toml_tables, parse_named,
                              to_toml)
from polytrain.train.io import atomic_write_bytes, atomic_write_json

# MLPerf's olympic mean needs this many runs: the best and the worst are dropped.
OLYMPIC_MIN_RUNS = 5
# A claim needs at least this many seeds per cell (MLPerf's vision benchmarks take 5).
MIN_SEEDS_FOR_CLAIM = 5
# The settings that make a run parallel; the baseline drops them.
PARALLEL_SETTINGS = {"workers": 1, "mesh": {}, "strategy": None, "strategy_args": {}, "compressor": None,
                     "compressor_args": {}, "aggregator": None, "aggregator_args": {}, "straggler": {}, "faults": [],
                     "step_schedule": "accumulate"}
SUMMARY_HEAD = ["cell", "seeds", "test acc (median [95 % CI])", "time to target s", "speed-up to target",
                "samples/s", "speed-up samples/s", "bytes/step", "step ms (predicted)", "flags"]
AXES = ("strategies", "meshes", "compressors", "workers", "bandwidths", "vary", "seeds")


@dataclass(frozen=True)
class Cell:
    """One combination of the matrix: the settings its runs add to the base, and the emulated link."""

    label: str
    settings: dict
    bandwidth: str = "none"
    baseline: bool = False
    vary: dict = field(default_factory=dict)  # the `vary` values this cell has (its baseline has the same)

    @property
    def key(self) -> str:
        """The cell's directory name: readable, and unique by a hash of its settings and link."""
        digest = hashlib.sha256(json.dumps([self.settings, self.bandwidth], sort_keys=True).encode()).hexdigest()
        slug = re.sub(r"[^a-z0-9]+", "-", self.label.lower()).strip("-")[:60]
        return f"{slug}-{digest[:8]}"


@dataclass(frozen=True)
class Matrix:
    """What `compare` runs: the base settings, the cells (baselines included) and the seeds."""

    base: dict
    cells: list[Cell]
    seeds: list[int]
    order_seed: int = 0

    def runs(self, seeds: Sequence[int] | None = None, cells: Sequence[Cell] | None = None) -> list[tuple[Cell, int]]:
        """Every (cell, seed), in the matrix's seeded random order."""
        runs = list(itertools.product(cells or self.cells, seeds or self.seeds))
        random.Random(self.order_seed).shuffle(runs)
        return runs

    def experiment(self, cell: Cell, seed: int, out: Path) -> Experiment:
        return apply_overrides(Experiment(), {**self.base, **cell.settings, "seed": seed, "out": str(out)})


def _spec(name: str, args: dict) -> str:
    return ":".join([name] + [",".join(f"{k}={v}" for k, v in args.items())] * bool(args))


def _mesh_label(mesh: dict) -> str:
    return " x ".join(f"{axis} {size}" for axis, size in mesh.items())


def _listed(table: dict, key: str, kind: type) -> list:
    value = table.get(key, [])
    value = value if isinstance(value, list) else [value]
    if not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
        raise ConfigError(f"compare: {key} must be a list of {kind.__name__}s; got {table[key]!r}")
    return value


def build_matrix(base: dict, axes: dict) -> Matrix:
    """The matrix of `axes` (the [compare] table: strategies, meshes, compressors, workers, bandwidths, vary,
    seeds, order_seed) over the `base` settings, with the baseline of each `vary` combination.

    Each axis multiplies the cells; `meshes` and `workers` together form one axis (a mesh fixes the workers).
    Unknown names and settings fail here, before any run, with the resolver's one-line errors."""
    from polytrain.comm.mesh import MeshShape
    from polytrain.launch.cluster import parse_bandwidth

    unknown = set(axes) - set(AXES) - {"order_seed"}
    if unknown:
        raise ConfigError(f"compare: unknown axis {', '.join(sorted(unknown))}; valid: {', '.join(AXES)}, order_seed")
    seeds = axes.get("seeds", 3)
    seeds = list(range(seeds)) if isinstance(seeds, int) and not isinstance(seeds, bool) else _listed(axes, "seeds", int)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"compare: seeds must be a count >= 1 or distinct integers; got {axes.get('seeds')!r}")
    strategies = [parse_named(s, "strategy") for s in _listed(axes, "strategies", str)] or [None]
    compressors = [None if c == "none" else parse_named(c, "compressor") for c in _listed(axes, "compressors", str)]
    layouts = ([{"workers": w, "mesh": {}} for w in _listed(axes, "workers", int)]
               + [{"mesh": MeshShape.parse(m).sizes(), "workers": None} for m in _listed(axes, "meshes", str)])
    bandwidths = _listed(axes, "bandwidths", str) or ["none"]
    for bandwidth in bandwidths:
        parse_bandwidth(bandwidth)
    vary = axes.get("vary", {})
    if not isinstance(vary, dict) or not all(isinstance(v, list) and v for v in vary.values()):
        raise ConfigError(f"compare: vary must be a table of KEY = [values]; got {vary!r}")
    combos = [dict(zip(vary, values)) for values in itertools.product(*vary.values())]

    cells: dict[str, Cell] = {}
    probe = Matrix(dict(base), [], seeds)
    for combo in combos:
        baseline = baseline_cell(combo)
        cells[baseline.key] = baseline
        baseline_run = _resolved_or_none(probe.experiment(baseline, 0, Path(".")))
        for strategy, compressor, layout, bandwidth in itertools.product(strategies, compressors or [None],
                                                                         layouts or [{}], bandwidths):
            settings = {**layout, **combo}
            if strategy:
                settings["strategy"], settings["strategy_args"] = strategy
            if compressor:
                settings["compressor"], settings["compressor_args"] = compressor
            shown = compressor or (("uncompressed", {}) if compressors else None)
            label = _label(layout, strategy, shown, bandwidth, combo)
            cell = Cell(label, settings, bandwidth, vary=combo)
            if bandwidth == "none" and baseline_run is not None and \
                    _resolved_or_none(probe.experiment(cell, 0, Path("."))) == baseline_run:
                continue  # the same run as the baseline (a matrix of `vary` alone): run once, as the baseline
            cells.setdefault(cell.key, cell)
    matrix = Matrix(dict(base), list(cells.values()), seeds, int(axes.get("order_seed", 0)))
    check_matrix(matrix)
    return matrix


def _resolved_or_none(exp: Experiment) -> Experiment | None:
    """`exp` with its defaults filled, or None where it does not resolve (check_matrix then names the cell)."""
    from polytrain.train.defaults import resolve

    try:
        return resolve(exp)
    except (ConfigError, ValueError):
        return None


def baseline_cell(vary: dict | None = None) -> Cell:
    """The single worker of the same code: the base settings (and `vary` values) without the parallel ones."""
    vary = dict(vary or {})
    return Cell(_label({"workers": 1}, None, None, "none", vary, baseline=True), {**PARALLEL_SETTINGS, **vary},
                baseline=True, vary=vary)


def check_matrix(matrix: Matrix) -> None:
    """Every cell resolves (names, settings, meshes), before any run starts; one line naming the cell if not."""
    from polytrain.train.defaults import resolve

    if not any(cell.baseline for cell in matrix.cells):
        raise ConfigError("compare: a matrix needs its single-worker baseline (baseline_cell())")
    for cell in matrix.cells:
        try:
            exp = resolve(matrix.experiment(cell, matrix.seeds[0], Path(".")))
        except ValueError as error:  # ConfigError, an unknown name
            raise ConfigError(f"compare: cell '{cell.label}': {error}") from None
        if exp.workers == 1 and not cell.baseline and cell.bandwidth != "none":
            raise ConfigError(f"compare: cell '{cell.label}' has one worker: a bandwidth needs several")


def _label(layout: dict, strategy, compressor, bandwidth: str, combo: dict, baseline: bool = False) -> str:
    parts = ["1 worker (baseline)" if baseline else _mesh_label(layout["mesh"]) if layout.get("mesh")
             else f"{layout['workers']} workers" if layout.get("workers") else "base workers"]
    parts += [_spec(*strategy)] if strategy else []
    parts += [_spec(*compressor)] if compressor else []
    parts += [bandwidth] if bandwidth != "none" else []
    parts += [f"{k}={v}" for k, v in combo.items()]
    return ", ".join(parts)


def matrix_from_toml(path: str | Path, extra_base: dict | None = None) -> Matrix:
    """A TOML file: the base settings at the top (as `polytrain train --config` reads them) and the axes in
    a [compare] table."""
    tables = load_toml_tables(path)
    axes = tables.pop("compare", {})
    if not isinstance(axes, dict):
        raise ConfigError(f"{path}: [compare] must be a table of axes")
    return build_matrix({**flatten_toml(tables), **(extra_base or {})}, axes)


# --- running -------------------------------------------------------------------------------------------


@dataclass
class Progress:
    """Which run of how many is going and an estimate of the time left (from the runs finished so far)."""

    total: int
    stream: TextIO = field(default_factory=lambda: sys.stdout)
    done: int = 0
    seconds: list = field(default_factory=list)

    def start(self, cell: Cell, seed: int) -> None:
        left = self.total - self.done
        eta = f", about {_duration(statistics.median(self.seconds) * left)} left" if self.seconds else ""
        print(f"[run {self.done + 1}/{self.total}{eta}] {cell.label}, seed {seed}", file=self.stream, flush=True)

    def line(self, text: str) -> None:
        if text.startswith("epoch"):
            print(f"    {text}", file=self.stream, flush=True)

    def finish(self, seconds: float, outcome: str) -> None:
        self.done += 1
        self.seconds.append(seconds)
        print(f"    {outcome} in {seconds:.1f} s", file=self.stream, flush=True)


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def run_command(exp: Experiment, bandwidth: str, run_timeout_s: float, resume: bool = False) -> list[str]:
    """`polytrain train --config DIR/config.toml --out DIR` (with `--resume DIR --retune`: continuing the run
    there, with the hyper-parameters `exp` gives), on emulated hosts at `bandwidth` unless none."""
    from polytrain.train.defaults import resolve, run_ranks

    train = [sys.executable, "-m", "polytrain", "train", "--config", str(Path(exp.out) / "config.toml"),
             "--out", exp.out, *(["--resume", exp.out, "--retune"] if resume else [])]
    if bandwidth == "none":
        return train
    hosts = run_ranks(resolve(exp))
    return [sys.executable, "-m", "polytrain", "cluster", "--hosts", str(hosts), "--bandwidth", bandwidth,
            "--timeout", str(int(run_timeout_s)), "--", *train]


def train_in_directory(exp: Experiment, bandwidth: str = "none", run_timeout_s: float = 3600.0,
                       on_line: Callable[[str], None] = lambda line: None, resume: bool = False) -> dict | None:
    """Runs `exp` as its own `polytrain train` process in `exp.out` (made afresh: an earlier attempt there is
    kept as DIR.failed-K): config.toml, log.txt, then the run's files. Returns its result.json, or None when
    it failed (DIR/failed.json says how). A watchdog stops it, and its workers, past `run_timeout_s`.

    With `resume`, a run paused there (`stop_at`) continues from its newest checkpoint with `exp`'s settings
    (log.txt grows); a directory without a checkpoint starts afresh."""
    from polytrain.train.checkpoint import checkpoint_path

    directory = Path(exp.out)
    resume = resume and checkpoint_path(directory).exists()
    if directory.exists() and not resume:
        attempt = 1 + sum(1 for _ in directory.parent.glob(f"{directory.name}.failed-*"))
        directory.rename(directory.with_name(f"{directory.name}.failed-{attempt}"))
    directory.mkdir(parents=True, exist_ok=resume)
    (directory / "failed.json").unlink(missing_ok=True)
    settings = {k: v for k, v in exp.to_dict().items() if k != "out"}
    atomic_write_bytes(directory / "config.toml", to_toml(settings).encode())
    started = time.monotonic()
    with open(directory / "log.txt", "a" if resume else "w") as log:
        # Its own process group: the watchdog and an interrupt stop the run's workers with it.
        child = subprocess.Popen(run_command(exp, bandwidth, run_timeout_s, resume), stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                 preexec_fn=_die_with_parent)
        watchdog = threading.Timer(run_timeout_s + 60, _stop, [child])  # no run may hang the caller
        watchdog.start()
        try:
            for line in child.stdout:  # the child's epoch lines, as they come
                log.write(line)
                on_line(line.strip())
            code = child.wait()
        except BaseException:
            _stop(child)
            raise
        finally:
            watchdog.cancel()
    if code == 0 and (directory / "result.json").exists():
        return json.loads((directory / "result.json").read_text())
    atomic_write_json(directory / "failed.json", {"exit": code, "seconds": time.monotonic() - started})
    return None


def run_one(matrix: Matrix, cell: Cell, seed: int, root: Path, progress: Progress, run_timeout_s: float) -> bool:
    """Runs (cell, seed) unless finished; a failed earlier attempt is kept beside it. True when it succeeded."""
    directory = run_dir(root, cell, seed)
    if (directory / "result.json").exists():
        return True
    progress.start(cell, seed)
    started = time.monotonic()
    result = train_in_directory(matrix.experiment(cell, seed, directory), cell.bandwidth, run_timeout_s,
                                progress.line)
    if result is None:
        outcome = f"FAILED (see {directory}/log.txt)"
    elif result["final_test_accuracy"] is not None:
        outcome = f"test accuracy {100 * result['final_test_accuracy']:.2f} %"
    else:
        outcome = f"test {result['metric']} {result['final_test_metric']:.4g}"
    progress.finish(time.monotonic() - started, outcome)
    return result is not None


def _die_with_parent() -> None:
    """In the child, before exec: killed when the process that started it dies (Linux's PR_SET_PDEATHSIG), so a
    killed comparison or study leaves no run writing into a directory it will run again."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def _stop(child: subprocess.Popen) -> None:
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_dir(root: str | Path, cell: Cell, seed: int) -> Path:
    return Path(root) / "runs" / cell.key / f"seed-{seed}"


def compare(matrix: Matrix, root: str | Path, *, ci_within: float | None = None, max_seeds: int | None = None,
            run_timeout_s: float = 3600.0, stream: TextIO | None = None,
            runner: Callable[..., bool] = run_one) -> "Summary":
    """Runs every (cell, seed) not yet finished under `root`, then, with `ci_within` (a fraction), more seeds
    for the cells whose 95 % CI of the median time to target (or wall time without a target) is wider than
    that share of the median, up to `max_seeds`; writes matrix.json and the summary; returns the Summary."""
    root, stream = Path(root), stream or sys.stdout
    root.mkdir(parents=True, exist_ok=True)
    _check_same_matrix(root, matrix)
    seeds = list(matrix.seeds)
    atomic_write_json(root / "matrix.json", _matrix_json(matrix))  # first: an interrupted comparison resumes
    pending = matrix.runs()
    while True:
        pending = [(cell, seed) for cell, seed in pending if not (run_dir(root, cell, seed) / "result.json").exists()]
        progress = Progress(len(pending), stream)
        for cell, seed in pending:
            runner(matrix, cell, seed, root, progress, run_timeout_s)
        summary = summarize(root, dataclasses.replace(matrix, seeds=seeds))
        if ci_within is None or max_seeds is None or len(seeds) >= max_seeds:
            break
        wide = [cell for cell in matrix.cells if not summary.cells[cell.key].within(ci_within)]
        if not wide:
            break
        seeds.append(max(seeds) + 1)
        print(f"{len(wide)} cell(s) with a CI wider than {100 * ci_within:g} % of the median: seed {seeds[-1]}",
              file=stream)
        baselines = [c for c in matrix.cells if c.baseline and c not in wide]
        pending = matrix.runs([seeds[-1]], wide + baselines)
    atomic_write_json(root / "matrix.json", {**_matrix_json(matrix), "seeds": seeds})
    summary.write(root)
    return summary


def _matrix_json(matrix: Matrix) -> dict:
    return {"base": matrix.base, "seeds": matrix.seeds, "order_seed": matrix.order_seed,
            "cells": [dataclasses.asdict(cell) | {"key": cell.key} for cell in matrix.cells]}


def _check_same_matrix(root: Path, matrix: Matrix) -> None:
    """A directory holds one comparison: resuming it with other base settings would mix unlike runs."""
    stored = root / "matrix.json"
    if stored.exists() and json.loads(stored.read_text())["base"] != json.loads(json.dumps(matrix.base)):
        raise ConfigError(f"{root} holds a comparison with other base settings (its matrix.json); "
                          f"choose another --out or give the same settings")


def load_matrix(root: str | Path) -> Matrix:
    """The matrix a compare directory holds (for `polytrain report`)."""
    path = Path(root) / "matrix.json"
    if not path.exists():
        raise ConfigError(f"{root} holds no comparison (no matrix.json); run polytrain compare --out {root} first")
    data = json.loads(path.read_text())
    cells = [Cell(c["label"], c["settings"], c["bandwidth"], c["baseline"], c["vary"]) for c in data["cells"]]
    return Matrix(data["base"], cells, data["seeds"], data["order_seed"])


# --- summarising ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stat:
    """Median and 95 % CI over seeds, and MLPerf's olympic mean where there are enough runs."""

    median: float
    low: float
    high: float
    n: int
    olympic: float | None = None

    @classmethod
    def of(cls, values: Sequence[float]) -> "Stat | None":
        if not values:
            return None
        ci = median_ci(values)
        ordered = sorted(values)
        olympic = statistics.fmean(ordered[1:-1]) if len(values) >= OLYMPIC_MIN_RUNS else None
        return cls(ci.median, ci.low, ci.high, len(values), olympic)

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in dataclasses.asdict(self).items()}


@dataclass
class CellSummary:
    cell: Cell
    runs: list[dict]  # per seed: {"seed", "dir", "ok", "result" (None when failed)}
    stats: dict[str, Stat | None]
    speedup: dict[str, Stat | None]
    staleness: dict[str, int]
    flags: list[str]

    def within(self, share: float) -> bool:
        stat = self.stats["time_to_target_s"] or self.stats["wall_s"]
        if stat is None or not math.isfinite(stat.median) or stat.n < 2:
            return False
        return (stat.high - stat.low) / 2 <= share * stat.median


@dataclass
class Summary:
    cells: dict[str, CellSummary]
    target: float | None
    flags: list[str]

    def rows(self) -> list[dict]:
        """One flat row per cell (the CSV and the tables)."""
        rows = []
        for summary in self.cells.values():
            row = {"cell": summary.cell.label, "baseline": summary.cell.baseline, "seeds": len(summary.runs),
                   "failed": sum(not r["ok"] for r in summary.runs)}
            for name, stat in {**summary.stats, **{f"speedup_{k}": v for k, v in summary.speedup.items()}}.items():
                for part in ("median", "low", "high", "olympic"):
                    value = getattr(stat, part) if stat is not None else None
                    row[f"{name}_{part}"] = None if value is None or math.isinf(value) else value
            row["staleness"] = json.dumps(summary.staleness) if summary.staleness else ""
            row["flags"] = "; ".join(summary.flags)
            rows.append(row)
        return rows

    def to_csv(self) -> str:
        rows = self.rows()
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue()

    def to_markdown(self) -> str:
        head = SUMMARY_HEAD
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for s in self.cells.values():
            lines.append("| " + " | ".join(table_row(s)) + " |")
        lines += [""] + [f"- {flag}" for flag in self.flags]
        return "\n".join(lines) + "\n"

    def write(self, root: Path) -> None:
        atomic_write_json(root / "summary.json", {
            "target": self.target, "flags": self.flags,
            "cells": [{"key": key, "label": s.cell.label, "baseline": s.cell.baseline, "runs": [
                {k: v for k, v in r.items() if k != "result"} for r in s.runs],
                "stats": {k: v.to_dict() if v else None for k, v in s.stats.items()},
                "speedup": {k: v.to_dict() if v else None for k, v in s.speedup.items()},
                "staleness": s.staleness, "flags": s.flags} for key, s in self.cells.items()]})
        atomic_write_bytes(root / "summary.csv", self.to_csv().encode())
        atomic_write_bytes(root / "summary.md", self.to_markdown().encode())


def _fmt(stat: Stat | None, scale: float = 1.0, digits: int = 1, unit: str = "", style: str = "f") -> str:
    """median [low, high] (`style` g: `digits` significant digits); an infinite time is never."""
    if stat is None:
        return "-"
    if math.isinf(stat.median):
        return "never"
    if stat.n == 1:  # one run has no interval
        return f"{scale * stat.median:.{digits}{style}}{unit}"
    high = "never" if math.isinf(stat.high) else f"{scale * stat.high:.{digits}{style}}"
    return f"{scale * stat.median:.{digits}{style}}{unit} [{scale * stat.low:.{digits}{style}}, {high}]"


def table_row(s: CellSummary) -> list[str]:
    """The cell's row: a speed-up is never shown without the test accuracy beside it."""
    failed = sum(not r["ok"] for r in s.runs)
    accuracy = s.stats["final_test_accuracy"] or s.stats["final_test_metric"]
    scale = 100 if s.stats["final_test_accuracy"] else 1
    row = [s.cell.label, f"{len(s.runs)}" + (f" ({failed} failed)" if failed else ""),
           _fmt(accuracy, scale, 2, " %" if scale == 100 else ""), _fmt(s.stats["time_to_target_s"], digits=3, style="g"),
           _fmt(s.speedup["time_to_target"], digits=2) if accuracy else "-",
           _fmt(s.stats["samples_per_s"], digits=0), _fmt(s.speedup["samples_per_s"], digits=2) if accuracy else "-",
           _fmt(s.stats["bytes_sent_per_step"], digits=0), _step(s), "; ".join(_staleness_note(s) + s.flags)]
    return row


def _staleness_note(s: CellSummary) -> list[str]:
    """Where updates were stale: the largest staleness and the mean over every update of every seed."""
    if not s.staleness or max(int(k) for k in s.staleness) == 0:  # a synchronous pipeline: nothing stale
        return []
    total = sum(s.staleness.values())
    mean = sum(int(k) * n for k, n in s.staleness.items()) / total
    return [f"staleness max {max(int(k) for k in s.staleness)}, mean {mean:.2f}"]


def _step(s: CellSummary) -> str:
    """The measured step in ms beside the performance model's prediction, where the machine is calibrated."""
    measured, predicted = s.stats["measured_step_s"], s.stats["predicted_step_s"]
    if measured is None:
        return "-"
    return f"{1e3 * measured.median:.3g}" + (f" ({1e3 * predicted.median:.3g})" if predicted else " (-)")


def load_runs(root: Path, cell: Cell, seeds: Sequence[int]) -> list[dict]:
    runs = []
    for seed in seeds:
        directory = run_dir(root, cell, seed)
        path = directory / "result.json"
        result = json.loads(path.read_text()) if path.exists() else None
        if result is None and not directory.exists():
            continue  # not run yet
        runs.append({"seed": seed, "dir": str(directory.relative_to(root)), "ok": result is not None,
                     "result": result})
    return runs


def summarize(root: str | Path, matrix: Matrix) -> Summary:
    """Every cell's statistics from the run directories under `root` (failed runs never reach the target)."""
    root = Path(root)
    target = matrix.base.get("target")
    loaded = {cell.key: load_runs(root, cell, matrix.seeds) for cell in matrix.cells}
    baselines = {json.dumps(c.vary, sort_keys=True): c for c in matrix.cells if c.baseline}
    flags: list[str] = []
    cells = {}
    for cell in matrix.cells:
        runs = loaded[cell.key]
        ok = [r["result"] for r in runs if r["ok"]]
        stats = {name: Stat.of([value(r) for r in ok if value(r) is not None]) for name, value in METRICS.items()}
        # a failed run, and a run that never reaches the target, take infinitely long to reach it
        stats["time_to_target_s"] = Stat.of([_to_target(r["result"]) for r in runs]) if target is not None else None
        baseline = loaded[baselines[json.dumps(cell.vary, sort_keys=True)].key]
        speedup = {"time_to_target": _per_seed_speedup(runs, baseline, _to_target) if target is not None else None,
                   "samples_per_s": _per_seed_speedup(runs, baseline, _throughput, faster_is_higher=True)}
        cell_flags = []
        if len(runs) < MIN_SEEDS_FOR_CLAIM:
            cell_flags.append(f"{len(runs)} seed(s) < {MIN_SEEDS_FOR_CLAIM}: no claim")
        if any(not r["ok"] for r in runs):
            cell_flags.append(f"{sum(not r['ok'] for r in runs)} run(s) failed (counted as never reaching the target)")
        if target is not None and not cell.baseline and any(_to_target(r["result"]) == math.inf for r in baseline):
            cell_flags.append("the baseline misses the target in some seed: no speed-up to target there")
        cells[cell.key] = CellSummary(cell, runs, stats, speedup, _staleness(ok), cell_flags)
    every = [r["result"] for runs in loaded.values() for r in runs if r["ok"]]
    if any(r["dataset"].get("synthetic") for r in every):
        flags.append("synthetic data: the accuracies say nothing about a real task")
    if target is None:
        flags.append("no target set: no time to target, speed-ups are of throughput only")
    elif any(all(_to_target(r["result"]) == math.inf for r in loaded[b.key]) for b in baselines.values()):
        flags.append(f"the single-worker baseline never reaches the target {target}: choose a reachable one")
    return Summary(cells, target, flags)


def _to_target(result: dict | None) -> float:
    if result is None or result["time_to_target_s"] is None:
        return math.inf
    return result["time_to_target_s"]


def _throughput(result: dict | None) -> float:
    return result["samples_per_s"] if result is not None else 0.0


def _per_seed_speedup(runs: list[dict], baseline: list[dict], value: Callable, faster_is_higher: bool = False):
    """Speed-up per seed against the baseline of that seed: T_baseline / T_run (or rate_run / rate_baseline);
    seeds where the baseline has no finite value are left out, a run that never gets there gives 0."""
    by_seed = {r["seed"]: value(r["result"]) for r in baseline}
    ratios = []
    for run in runs:
        reference = by_seed.get(run["seed"])
        mine = value(run["result"])
        if reference is None or not math.isfinite(reference) or reference <= 0:
            continue
        if faster_is_higher:
            ratios.append(mine / reference)
        else:
            ratios.append(0.0 if math.isinf(mine) else reference / mine if mine > 0 else math.inf)
    return Stat.of(ratios)


def _staleness(results: list[dict]) -> dict[str, int]:
    """Updates by staleness over the cell's runs (parameter servers, asynchronous pipelines)."""
    total: dict[str, int] = {}
    for result in results:
        comm = result["comm"]
        histogram = (comm.get("staleness") or {}).get("histogram") or (comm.get("pipeline") or {}).get(
            "staleness_histogram") or {}
        for key, count in histogram.items():
            total[key] = total.get(key, 0) + count
    return dict(sorted(total.items(), key=lambda item: int(item[0])))


METRICS: dict[str, Callable[[dict], float | None]] = {
    "final_test_accuracy": lambda r: r["final_test_accuracy"],
    "best_test_accuracy": lambda r: r["best_test_accuracy"],
    "final_test_metric": lambda r: r["final_test_metric"],
    "wall_s": lambda r: r["wall_s"],
    "samples_per_s": lambda r: r["samples_per_s"],
    "bytes_sent_per_step": lambda r: r["comm"].get("bytes_sent_per_step"),
    "measured_step_s": lambda r: r.get("performance", {}).get("measured_step_s"),
    "predicted_step_s": lambda r: r.get("performance", {}).get("predicted_step_s"),
}


def print_summary(summary: Summary, stream: TextIO | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    stream = stream or sys.stdout
    console = Console(file=stream, width=max(200, Console(file=stream).width))
    table = Table(title="polytrain compare: medians [95 % CI] over seeds" +
                        (f", target {summary.target}" if summary.target is not None else ""))
    for column in ("cell", "seeds", "test acc", "to target s", "speed-up (target)", "samples/s",
                   "speed-up (rate)", "bytes/step", "step ms (predicted)", "flags"):
        table.add_column(column, justify="left" if column in ("cell", "flags") else "right")
    for s in summary.cells.values():
        table.add_row(*table_row(s))
    console.print(table)
    for flag in summary.flags:
        console.print(f"[bold]note:[/bold] {flag}", highlight=False)
