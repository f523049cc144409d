"""`polytrain calibrate`: measures this machine once and stores the profile the performance model reads.

What it measures (polytrain.perf.profile describes the stored form):

1. compute, for every number of ranks R sharing the machine (each with cores / R threads, all R timing at
   once, so that they contend for the cores and memory as a run's ranks do): forward and backward seconds
   of every top-level module of the calibration models at each batch, the optimizer step over parameter
   vectors of two sizes, and compress + decompress of every compressor at two sizes; the modules' times
   are kept per model and fitted (seconds = a FLOPs + b bytes + c) for any other model;
2. the rest of a step (data, zeroing gradients, the loop): short real runs per R without communication
   (`local`; on several ranks `local_sgd` that never averages) at each of OVERHEAD_BATCHES per rank,
   their measured step minus the modules' and the optimizer's times;
3. alpha, beta and gamma of every allreduce algorithm per world size (the collectives benchmark's fit), on
   loopback and, with `--bandwidths`, on the emulated cluster at each bandwidth (needs root);
4. communication inside a training step, at each bandwidth: real 2-rank allreduce runs of the MLP without
   overlap (gloo's allreduce, and polytrain's ring for every point-to-point path) scale the benchmark's
   alpha and beta to what a step sees (on loopback the ranks' compute
   threads share the cores with the transfers; on an emulated link the benchmark's small messages
   partly pass in tbf's bucket above the rate, a step's larger buckets do not), and one with overlap is
   placed between the predictions with no overlap and with perfect overlap.
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from polytrain.perf.profile import PROFILE_VERSION, Profile

# Models whose modules are timed (on their natural inputs); they also feed the fit for other models.
DEFAULT_MODELS = ("lenet5", "mlp", "resnet20")
DEFAULT_BATCHES = (16, 64, 256)
CALIBRATION_COMPRESSORS = ("fp16", "topk", "randomk", "qsgd", "signsgd", "powersgd", "terngrad", "onebit",
                           "kbit", "threshold", "dgc", "efsignsgd")
COMPRESSION_SIZES = (1 << 16, 1 << 20)  # elements
UPDATE_SIZES = (1 << 16, 1 << 21)
OVERHEAD_BATCHES = (32, 128, 256)  # per-rank batches of the runs without communication
CALIBRATION_EPOCHS = 4
OVERHEAD_MODELS = ("lenet5", "mlp")  # calibration models that run on mnist5k (its samples are theirs)
COLLECTIVE_SIZES = "4^5..4^11"  # 1 KiB .. 4 MiB: past tbf's bucket at 1 Gbit/s
QUICK = {"models": ("lenet5", "mlp"), "batches": (16, 128), "repeats": 3, "ranks": (1, 2)}


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def _module_times(model: torch.nn.Module, input_shape: tuple[int, ...], batch: int, repeats: int
                  ) -> list[tuple[float, float]]:
    """Median forward and backward seconds of each top-level module (the whole model if not Sequential)."""
    modules = list(model) if isinstance(model, torch.nn.Sequential) else [model]
    value = torch.randn(batch, *input_shape)
    times = []
    for module in modules:
        inputs = value.detach().requires_grad_()

        # A fresh copy per call: in-place modules (ReLU(inplace=True)) may not write into a leaf.
        def forward():
            return module(inputs.clone())

        output = forward()
        grad = torch.ones_like(output)

        def backward():
            out = module(inputs.clone())
            started = time.perf_counter()
            out.backward(grad)
            return time.perf_counter() - started

        forward_s = _median_time(forward, repeats)
        backward()
        backward_s = statistics.median(backward() for _ in range(repeats))
        times.append((forward_s, backward_s))
        value = output.detach()
    return times


def _update_times(repeats: int) -> list[tuple[int, float]]:
    rows = []
    for size in UPDATE_SIZES:
        param = torch.nn.Parameter(torch.randn(size))
        param.grad = torch.randn(size)
        optimizer = torch.optim.SGD([param], lr=0.01, momentum=0.9)
        rows.append((size, _median_time(optimizer.step, repeats)))
    return rows


def _compression_times(repeats: int) -> dict[str, list[tuple[int, float]]]:
    from polytrain.compress import build_compressor

    rows: dict[str, list[tuple[int, float]]] = {}
    for name in CALIBRATION_COMPRESSORS:
        compressor = build_compressor(name, {})
        rows[name] = []
        for size in COMPRESSION_SIZES:
            tensor = torch.randn(size // 256, 256)
            state = compressor.init(tensor)

            def roundtrip():
                payload, kept = compressor.compress(tensor, state)
                for _ in range(compressor.rounds - 1):  # PowerSGD's second round (its sum is the payload here)
                    payload, kept = compressor.refine(payload, kept)
                compressor.decompress(payload)

            rows[name].append((4 * size, _median_time(roundtrip, repeats)))
    return rows


def _compute_rank(comm, models: list[str], batches: list[int], repeats: int) -> dict:
    """One rank's measurements (every rank of a calibration measures at once)."""
    from polytrain.cost.model import NATURAL_INPUTS
    from polytrain.models import build_model

    torch.manual_seed(comm.rank if comm is not None else 0)
    measured = []
    for name in models:
        shape, classes = NATURAL_INPUTS[name]
        model = build_model(name, classes, shape).train()
        for batch in batches:
            measured.append({"model": name, "input_shape": list(shape), "num_classes": classes, "batch": batch,
                             "blocks": _module_times(model, shape, batch, repeats)})
    return {"measured": measured, "update": _update_times(repeats), "compression": _compression_times(repeats)}


def _nnls(matrix: np.ndarray, target: np.ndarray) -> np.ndarray:
    from polytrain.bench.collectives.fit import _nonnegative_least_squares

    return _nonnegative_least_squares(matrix, target)


def fit_compute(measured: list[dict]) -> dict:
    """seconds = a FLOPs + b bytes + c per module and direction, on relative errors (small modules count)."""
    from polytrain.perf.workload import workload

    rows, forward, backward = [], [], []
    for entry in measured:
        wl = workload(entry["model"], tuple(entry["input_shape"]), entry["num_classes"])
        for block, (f, b) in zip(wl.blocks, entry["blocks"]):
            rows.append((entry["batch"] * block.flops_forward, entry["batch"] * block.flops_backward,
                         entry["batch"] * block.bytes_forward))
            forward.append(f)
            backward.append(b)
    fits = {}
    for direction, times, flops in (("forward", forward, 0), ("backward", backward, 1)):
        times = np.maximum(np.asarray(times), 1e-7)
        matrix = np.array([[row[flops], row[2], 1.0] for row in rows])
        coefficients = _nnls(matrix / times[:, None], np.ones(len(times)))
        predicted = matrix @ coefficients
        fits[direction] = [float(c) for c in coefficients]
        fits[f"{direction}_mape"] = float(np.mean(np.abs(predicted - times) / times))
    return fits


def _line(points: list[tuple[float, float]]) -> list[float]:
    """Intercept and slope >= 0 through (x, seconds) points."""
    x = np.array([p[0] for p in points], dtype=float)
    y = np.array([p[1] for p in points], dtype=float)
    slope, intercept = _nnls(np.stack([x, np.ones_like(x)], axis=1), y)
    return [float(intercept), float(slope)]


def _merge_ranks(results: list[dict]) -> dict:
    """The median over ranks of every timing (they ran the same measurements at once)."""
    first = results[0]
    measured = []
    for i, entry in enumerate(first["measured"]):
        blocks = [[statistics.median(r["measured"][i]["blocks"][k][d] for r in results) for d in (0, 1)]
                  for k in range(len(entry["blocks"]))]
        measured.append({**entry, "blocks": blocks})
    update = [(size, statistics.median(r["update"][k][1] for r in results)) for k, (size, _) in enumerate(first["update"])]
    compression = {name: [(n, statistics.median(r["compression"][name][k][1] for r in results))
                          for k, (n, _) in enumerate(rows)] for name, rows in first["compression"].items()}
    return {"measured": measured, "update": update, "compression": compression}


def measure_compute(ranks: int, models: Sequence[str], batches: Sequence[int], repeats: int) -> dict:
    """Every rank measures at once, with its share of the cores; the median over ranks."""
    from polytrain.launch import run_workers

    cores = os.cpu_count() or 1
    threads = max(1, cores // ranks)
    if ranks == 1:
        torch.set_num_threads(threads)
        results = [_compute_rank(None, list(models), list(batches), repeats)]
    else:
        results = run_workers(_compute_rank, ranks, (list(models), list(batches), repeats), threads=threads,
                              backend="gloo")
    merged = _merge_ranks(results)
    from polytrain.perf.cluster import OPTIMIZER_PASSES

    intercept, slope = _line(merged["update"])
    return {"threads": threads, "measured": [{**m, "ranks": ranks} for m in merged["measured"]],
            "fit": fit_compute(merged["measured"]), "update": [intercept, slope / OPTIMIZER_PASSES["momentum"]],
            "compression": {name: _line(rows) for name, rows in merged["compression"].items()}}


def _step_s(epochs: list[dict]) -> float:
    """The median step of the epochs after the first (which pays for warming up)."""
    return statistics.median(epoch["train_s"] / epoch["steps"] for epoch in epochs[1:])


def _calibration_run(workers: int, batch: int, strategy: str, args: dict | None = None, model: str = "mlp",
                     bandwidth: str = "none") -> tuple:
    """(the experiment, its epochs) of a short real run: local worker processes on loopback, otherwise
    `polytrain train` on `workers` emulated hosts at `bandwidth` (one `polytrain cluster` start)."""
    from polytrain.config import Experiment
    from polytrain.train import train

    exp = Experiment(model=model, dataset="mnist5k", workers=workers, epochs=CALIBRATION_EPOCHS, batch_size=batch,
                     strategy=strategy, strategy_args=args or {}, seed=0, augment_shift=0)
    if bandwidth == "none":
        return exp, train(exp).epochs
    spec = ":".join([strategy] + [",".join(f"{k}={str(v).lower()}" for k, v in (args or {}).items())] * bool(args))
    with tempfile.TemporaryDirectory() as scratch:
        subprocess.run([sys.executable, "-m", "polytrain", "cluster", "--hosts", str(workers), "--bandwidth", bandwidth,
                        "--timeout", "900", "--", sys.executable, "-m", "polytrain", "train", "--model", model,
                        "--dataset", "mnist5k", "--epochs", str(CALIBRATION_EPOCHS), "--batch-size", str(batch),
                        "--strategy", spec, "--seed", "0", "--set", "augment_shift=0", "--out", scratch],
                       check=True, stdout=subprocess.DEVNULL)
        return exp, json.loads((Path(scratch) / "result.json").read_text())["epochs"]


def measure_overhead(profile: Profile, ranks: int, models: Sequence[str]) -> tuple[list[float], list[dict]]:
    """What a real step without communication (`local`, or `local_sgd` that never averages) takes beyond
    the modules' and the optimizer's predicted times, for each calibration model at each of OVERHEAD_BATCHES per rank:
    the rows kept per model, and intercept + slope per input byte of the rank's batch for other models."""
    from polytrain.perf.predict import predict, run_workload

    if profile.data["compute"]["overhead"][str(ranks)] != [0.0, 0.0]:
        raise ValueError("measure the overhead before it enters the profile")
    points, rows = [], []
    for model in models:
        for per_rank in OVERHEAD_BATCHES:
            exp, epochs = (_calibration_run(1, per_rank, "local", model=model) if ranks == 1 else
                           _calibration_run(ranks, per_rank * ranks, "local_sgd", {"period": 1 << 30}, model))
            predicted = predict(exp, profile.cluster("none", ranks))
            wl = run_workload(exp)
            residual = _step_s(epochs) - predicted.step_s
            points.append((4 * per_rank * wl.input_elements, residual))
            rows.append({"model": model, "input_shape": list(wl.input_shape), "num_classes": wl.num_classes,
                         "ranks": ranks, "batch": per_rank, "seconds": residual})
    return _line(points), rows


def measure_in_run(profile: Profile, bandwidth: str = "none") -> tuple[dict, float]:
    """(comm_scale, overlap) from real 2-rank allreduce runs of the MLP: without overlap with gloo's
    allreduce (`native`) and with polytrain's `ring` (the point-to-point path every other algorithm,
    server and pipeline takes), then `native` with overlap.

    comm_scale: how much longer the transfers take inside a training step than in the collectives
    benchmark, per path; overlap: the share of the hideable communication overlapping hid, below 0 when it
    cost more than it hid."""
    from dataclasses import replace

    from polytrain.perf.predict import predict

    scales = profile.data.setdefault("comm_scale", {}).setdefault(bandwidth, {})
    for path, algorithm in (("native", "native"), ("p2p", "ring")):
        scales[path] = 1.0
        exp, epochs = _calibration_run(2, 128, "allreduce", {"algorithm": algorithm, "overlap": False},
                                       bandwidth=bandwidth)
        serial = predict(exp, profile.cluster(bandwidth, 2))
        scales[path] = max(0.5, (_step_s(epochs) - serial.step_s + serial.exposed_comm_s) / serial.exposed_comm_s)
    cluster = profile.cluster(bandwidth, 2)
    exp, epochs = _calibration_run(2, 128, "allreduce", bandwidth=bandwidth)
    hidden_none = predict(exp, replace(cluster, overlap=0.0)).step_s
    hidden_all = predict(exp, replace(cluster, overlap=1.0)).step_s
    if hidden_none - hidden_all < 1e-6:
        return scales, 1.0
    return scales, float(min(1.0, max(-1.0, (hidden_none - _step_s(epochs)) / (hidden_none - hidden_all))))


def _fits_of(report: dict) -> dict:
    return {name: [fit["alpha_s"], fit["beta_s_per_byte"], fit["gamma_s_per_byte"]]
            for name, fit in report["fits"].items()}


def measure_links_local(ranks: int, repeats: int) -> dict:
    from polytrain.bench.collectives.measure import collect_report
    from polytrain.bench.collectives.sizes import parse_algorithms, parse_sizes

    report = collect_report(ranks, parse_algorithms("all"), parse_sizes(COLLECTIVE_SIZES), repeats, 2)
    return _fits_of(report)


def measure_links_emulated(ranks: int, bandwidth: str, repeats: int) -> dict:
    """The collectives benchmark on `ranks` emulated hosts at `bandwidth` (one `polytrain cluster` start)."""
    with tempfile.TemporaryDirectory() as scratch:
        target = Path(scratch) / "report"
        command = (f"{sys.executable} -m polytrain bench collectives --json --repeats {repeats} "
                   f"--sizes {COLLECTIVE_SIZES} > {target}.$RANK")
        subprocess.run([sys.executable, "-m", "polytrain", "cluster", "--hosts", str(ranks), "--bandwidth", bandwidth,
                        "--timeout", "900", "--", "sh", "-c", command], check=True, stdout=subprocess.DEVNULL)
        return _fits_of(json.loads(Path(f"{target}.0").read_text()))


def calibrate(ranks: Sequence[int] = (1, 2, 4), models: Sequence[str] = DEFAULT_MODELS,
              batches: Sequence[int] = DEFAULT_BATCHES, bandwidths: Sequence[str] = ("none",), repeats: int = 5,
              path: str | Path | None = None, log=print) -> Profile:
    """Measures everything in the module docstring and saves the profile (atomically) at `path`."""
    from polytrain.train.environment import environment

    if any(r < 1 for r in ranks) or not ranks:
        raise ValueError(f"--ranks must be whole numbers >= 1; got {list(ranks)}")
    if "none" not in bandwidths:
        bandwidths = ("none", *bandwidths)
    started = time.perf_counter()
    data = {"version": PROFILE_VERSION, "cores": os.cpu_count() or 1,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "environment": environment(seed=0), "settings": {"ranks": list(ranks), "models": list(models),
                                                              "batches": list(batches), "repeats": repeats},
            "compute": {"fits": {}, "measured": [], "update": {}, "overhead": {}, "residual": []}, "links": {},
            "compression": {}, "overlap": {}}
    for r in ranks:
        log(f"compute with {r} rank(s) sharing the machine ...")
        measured = measure_compute(r, models, batches, repeats)
        data["compute"]["fits"][str(r)] = {"threads": measured["threads"], **measured["fit"]}
        data["compute"]["measured"] += measured["measured"]
        data["compute"]["update"][str(r)] = measured["update"]
        data["compute"]["overhead"][str(r)] = [0.0, 0.0]
        if r == min(ranks):
            data["compression"] = measured["compression"]
    for bandwidth in bandwidths:
        data["links"][bandwidth] = {}
        for r in sorted({max(2, r) for r in ranks}):
            log(f"collectives on {r} ranks, bandwidth {bandwidth} ...")
            fits = measure_links_local(r, repeats) if bandwidth == "none" else \
                measure_links_emulated(r, bandwidth, repeats)
            for name, terms in fits.items():
                data["links"][bandwidth].setdefault(name, {})[str(r)] = terms
    profile = Profile(data)
    for r in ranks:
        log(f"step overhead with {r} rank(s) ...")
        line, rows = measure_overhead(profile, r, [m for m in models if m in OVERHEAD_MODELS])
        data["compute"]["overhead"][str(r)] = line
        data["compute"]["residual"] += rows
    data["comm_scale"], data["overlap"] = {}, {}
    for bandwidth in bandwidths:
        # On emulated links too: the benchmark's small messages partly pass in tbf's bucket.
        log(f"communication inside training steps, bandwidth {bandwidth} ...")
        data["comm_scale"][bandwidth], data["overlap"][bandwidth] = measure_in_run(profile, bandwidth)
    data["calibration_s"] = time.perf_counter() - started
    profile.save(path)
    return profile
