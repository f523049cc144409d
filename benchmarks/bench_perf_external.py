"""External checks of the performance model (polytrain.perf): published results on the papers' own hardware.

Three published systems, each described once as a cluster profile in `polytrain.perf.cluster.PUBLISHED`
(their sustained throughputs and links are set once, from the papers' stated hardware and one-GPU times,
never per data point; the comments there and below say where every number comes from):

1. FireCaffe (Iandola et al., CVPR 2016; Iandola's PhD thesis, UCB/EECS-2016-207, chapter 3, in
   /work/shared/seeds/003_81857cfe49dbaaa6.txt) on the Titan supercomputer (`firecaffe-titan`): the cost
   model's weights and FLOPs against thesis Table 3.1, the parameter server's and the reduction tree's
   communication time against the thesis's own equations 3.3 and 3.4, its statement that NiN's
   communication and computation are about equal at 32 GPUs, and the training speedups of Tables 3.2 and 3.3
   (NiN and GoogLeNet at 32 and 128 GPUs; the thesis has no multi-GPU AlexNet run).
2. Krizhevsky 2014, "One weird trick for parallelizing convolutional neural networks" (arXiv:1404.5997),
   on one machine with 8 K20 GPUs (`krizhevsky-8`): the speedups at 2, 4 and 8 GPUs of the paper's Table 1.
   The seeds do not contain that table (the survey, seed 002, has its numbers stripped); the numbers below
   are the paper's Table 1 as commonly quoted, and the thesis's Table 3.2 corroborates its 8-GPU row (16
   hours on 8 K20s, 57.1 % top-1). His scheme is hybrid (data-parallel convolutions, model-parallel fully
   connected layers); polytrain has no performance model for `strategy="krizhevsky"`, so the prediction is
   plain data parallelism (ring allreduce of the whole gradient), which is what is compared.
3. GPipe (Huang et al., NeurIPS 2019) on 8 TPU v3 cores (`gpipe-tpu-v3`): the speedup of K pipeline
   stages against the microbatch count M. The reference is the paper's bubble formula: a balanced pipeline
   idles (K-1)/(M+K-1) of its step, so K stages run K M / (M+K-1) times as fast as one device.

Every table gives the published number, the predicted one, the relative error (predicted - published) /
published and whether it is within the tolerance that TOLERANCES states before anything is compared.
Misses are reported, not tuned away: BENCHMARKS.md (performance model, external checks) says why each misses.

Usage:

    python benchmarks/bench_perf_external.py [--markdown FILE]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass

from polytrain.config import Experiment
from polytrain.perf.cluster import PUBLISHED
from polytrain.perf.predict import Prediction, predict
from polytrain.perf.workload import workload

# -- tolerances, stated before any comparison ------------------------------------------------------------
# rel: |predicted - published| / published at most this; factor: predicted / published within [1/f, f].
TOLERANCES = {
    # The cost model counts the same layer dimensions the thesis's Table 3.1 was computed from.
    "workload": {"rel": 0.10},
    # Predicted communication against the thesis's alpha-beta equations on the same bandwidth: only the
    # latency and reduction terms and the counting convention may differ.
    "comm_equation": {"rel": 0.10},
    # "about equal" (thesis section 3.7.2, footnote 5): a factor of 2 either way.
    "about_equal": {"factor": 2.0},
    # Measured end-to-end training times and speedups (data loading, evaluation and the GPU's efficiency at
    # small per-GPU batches are outside a FLOPs and alpha-beta step model): 20 %.
    "training": {"rel": 0.20},
    # GPipe's bubble formula against the simulated schedule with real stage and transfer times: 10 %.
    "pipeline": {"rel": 0.10},
}

IMAGENET_TRAIN = 1_281_167  # ILSVRC-2012 training images
IMAGENET = {"dataset": "synthetic", "dataset_args": {"shape": "3,224,224", "num_classes": 1000, "num_samples": 16}}
HOURS = 3600.0

# -- published numbers -------------------------------------------------------------------------------------
# Iandola thesis, section 3.4, Table 3.1 (p. 35): |W| in MB and forward+backward TFLOPs per batch of 1024.
THESIS_TABLE_3_1 = {"nin": (30.0, 6.7), "alexnet": (249.0, 7.0), "googlenet": (54.0, 9.7), "vgg19": (575.0, 120.0)}
# Thesis Table 3.2 (p. 44) and Table 3.3 (p. 46): one NVIDIA K20 in Caffe: (epochs, batch, hours).
THESIS_ONE_GPU = {"nin": (47, 256, 5.8 * 24), "alexnet": (100, 256, 6.0 * 24), "googlenet": (64, 32, 21 * 24)}
# Thesis Tables 3.2 and 3.3, FireCaffe rows: (model, GPUs, batch, epochs, hours, speedup as published).
THESIS_RUNS = [
    ("nin", 32, 256, 47, 11.0, 13.0),  # Table 3.2, "FireCaffe (ours)"
    ("nin", 32, 1024, 47, 6.0, 23.0),  # Table 3.2, "FireCaffe-batch1024"
    ("nin", 128, 1024, 47, 3.6, 39.0),  # Table 3.2, "FireCaffe-batch1024"
    ("googlenet", 32, 1024, 72, 23.4, 20.0),  # Table 3.3
    ("googlenet", 128, 1024, 72, 10.5, 47.0),  # Table 3.3
]
# Thesis section 3.6 (pp. 38-40), Figure 3.5: NiN, "each GPU worker contributes 30MB of gradient updates".
THESIS_NIN_GRADIENT_BYTES = 30e6
# Krizhevsky 2014, Table 1 as commonly quoted (not in the seeds; see the module docstring), rows with batch
# (128 K, 128 K) on K GPUs: one GPU 98.05 h; 2 GPUs 50.24 h (1.95x), 4 GPUs 26.20 h (3.74x), 8 GPUs 15.68 h
# (6.25x). The thesis's Table 3.2 (p. 44) quotes the run as 16 hours on 8 K20s, 100 epochs, 57.1 % top-1.
KRIZHEVSKY_ONE_GPU_HOURS = 98.05
KRIZHEVSKY_PER_GPU_BATCH = 128
KRIZHEVSKY_SPEEDUPS = {2: 1.95, 4: 3.74, 8: 6.25}
KRIZHEVSKY_EPOCHS = 100  # thesis Table 3.2, row "Google cuda-convnet2" (the paper's own count is not in the seeds)
# GPipe: partitions K as in its Table 2 (2, 4, 8), microbatches M from 1 to 32; the reference is its section
# 2.3's bubble, (K - 1) / (M + K - 1) of the step, so K M / (M + K - 1) times one device.
GPIPE_STAGES = (2, 4, 8)
GPIPE_MICROBATCHES = (1, 2, 4, 8, 16, 32)
GPIPE_BATCH = 1024
# A stand-in for GPipe's Transformer, whose layers are identical: 16 linear layers of 4096 x 4096 (zoo mlp,
# an nn.Sequential; 2, 4 and 8 stages cut it into equal parts). vgg16 stands in for an uneven network.
# `hidden` is a tuple: a list raises TypeError in polytrain.perf.workload's cache (unhashable model_args).
GPIPE_MODEL = {"model": "mlp", "model_args": {"hidden": (4096,) * 15}, "dataset": "synthetic",
               "dataset_args": {"shape": "4096", "num_classes": 4096, "num_samples": 16}}
GPIPE_UNEVEN = {"model": "vgg16", **IMAGENET}

# FireCaffe: synchronous, no overlap of communication and computation (thesis section 6.2.3: "In our
# FireCaffe results, we did not overlap communication and computation"), one reduction of the whole gradient.
FIRECAFFE_TREE = {"strategy": "allreduce",
                  "strategy_args": {"algorithm": "tree", "bucket_mb": 1024.0, "overlap": False}}
FIRECAFFE_PS = {"strategy": "ps", "strategy_args": {"servers": 1, "mode": "sync"}}


@dataclass
class Row:
    label: str
    published: float
    predicted: float
    tolerance: str
    note: str = ""

    @property
    def error(self) -> float:
        return (self.predicted - self.published) / self.published

    @property
    def within(self) -> bool:
        rule = TOLERANCES[self.tolerance]
        if "factor" in rule:
            return 1 / rule["factor"] <= self.predicted / self.published <= rule["factor"]
        return abs(self.error) <= rule["rel"]


def tolerance_text(name: str) -> str:
    rule = TOLERANCES[name]
    return f"within a factor {rule['factor']:g}" if "factor" in rule else f"|error| <= {100 * rule['rel']:g} %"


def fmt(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"


class Report:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.rows: list[tuple[str, Row]] = []

    def text(self, line: str = "") -> None:
        self.lines.append(line)
        print(line)

    def table(self, title: str, rows: list[Row], unit: str, extra: list[tuple[str, list[str]]] = ()) -> None:
        tolerances = sorted({row.tolerance for row in rows})
        self.text(f"#### {title}")
        self.text()
        self.text("Tolerance: " + "; ".join(f"{tolerance_text(name)} ({name})" for name in tolerances) + ".")
        self.text()
        head = ["case", *[name for name, _ in extra], f"published{unit}", f"predicted{unit}", "relative error",
                "within tolerance"]
        self.text("| " + " | ".join(head) + " |")
        self.text("|" + "|".join("---" for _ in head) + "|")
        for i, row in enumerate(rows):
            cells = [row.label + (f" ({row.note})" if row.note else ""), *[values[i] for _, values in extra],
                     fmt(row.published), fmt(row.predicted), f"{100 * row.error:+.1f} %",
                     "yes" if row.within else "**no**"]
            self.text("| " + " | ".join(cells) + " |")
            self.rows.append((title, row))
        self.text()


def step(exp: Experiment, cluster_name: str, ranks: int) -> Prediction:
    return predict(exp, PUBLISHED[cluster_name].with_ranks(ranks))


def train_hours(prediction: Prediction, batch: int, epochs: float) -> float:
    return epochs * IMAGENET_TRAIN / batch * prediction.step_s / HOURS


def imagenet_run(model: str, workers: int, batch: int, **policy) -> Experiment:
    return Experiment(model=model, workers=workers, batch_size=batch, optimizer="momentum", **IMAGENET, **policy)


# -- 1. FireCaffe ------------------------------------------------------------------------------------------


def firecaffe(report: Report) -> None:
    report.text("### 1. FireCaffe on Titan (Iandola et al. CVPR 2016; Iandola's thesis, chapter 3)")
    report.text()
    cluster = PUBLISHED["firecaffe-titan"]
    report.text(f"Cluster `firecaffe-titan`: {cluster.description}.")
    report.text()

    rows = []
    for model, (weight_mb, tflops) in THESIS_TABLE_3_1.items():
        wl = workload(model, (3, 224, 224), 1000)
        flops = 1024 * sum(b.flops_forward + b.flops_backward for b in wl.blocks) / 1e12
        rows.append(Row(f"{model} weights", weight_mb, wl.gradient_bytes / 1e6, "workload"))
        rows.append(Row(f"{model} fwd+bwd per batch 1024", tflops, flops, "workload"))
    report.table("1a. The cost model's workloads against thesis Table 3.1 (p. 35)", rows, " (MB or TFLOP)")

    rows = []
    for model, (epochs, batch, hours) in THESIS_ONE_GPU.items():
        predicted = train_hours(step(imagenet_run(model, 1, batch), "firecaffe-titan", 1), batch, epochs)
        rows.append(Row(f"{model}, {epochs} epochs at batch {batch}", hours, predicted, "training",
                        "sets the profile's TFLOPS" if model == "nin" else ""))
    report.table("1b. One K20 (Caffe): training hours, thesis Tables 3.2 and 3.3 (pp. 44, 46)", rows, " h")

    # Equations 3.3 and 3.4 (thesis section 3.6, pp. 38-40) on the profile's per-node bandwidth.
    bandwidth = 1.0 / cluster.inter.beta_s_per_byte
    report.text(f"Equations 3.3 and 3.4 are evaluated with |dW| = 30 MB (Figure 3.5's NiN) and BW = "
                f"{bandwidth / 1e9:g} GB/s, the profile's Gemini link; predicted: the communication seconds of one "
                "step (`comm_s`) of NiN with one parameter server beside p workers (`ps`, sync) and with "
                "polytrain's binomial `tree` allreduce.")
    report.text()
    rows, times = [], {}
    for p in (2, 8, 32, 128):
        ps = step(imagenet_run("nin", p, 1024, **FIRECAFFE_PS), "firecaffe-titan", p + 1)
        tree = step(imagenet_run("nin", p, 1024, **FIRECAFFE_TREE), "firecaffe-titan", p)
        times[p] = (ps.comm_s, tree.comm_s)
        rows.append(Row(f"parameter server, p = {p}", THESIS_NIN_GRADIENT_BYTES * p / bandwidth * 1e3,
                        ps.comm_s * 1e3, "comm_equation", "eq. 3.3"))
        rows.append(Row(f"reduction tree, p = {p}", THESIS_NIN_GRADIENT_BYTES * 2 * math.log2(p) / bandwidth * 1e3,
                        tree.comm_s * 1e3, "comm_equation", "eq. 3.4"))
    report.table("1c. Parameter server vs reduction tree: NiN communication per step, ms", rows, " ms")

    rows = []
    for p in (32, 128):
        rows.append(Row(f"parameter server / tree, p = {p}", p / (2 * math.log2(p)), times[p][0] / times[p][1],
                        "comm_equation", "p / (2 log2 p)"))
    rows.append(Row("parameter server, p = 128 / p = 32", 4.0, times[128][0] / times[32][0], "comm_equation",
                    "linear in p"))
    rows.append(Row("reduction tree, p = 128 / p = 32", math.log2(128) / math.log2(32), times[128][1] / times[32][1],
                    "comm_equation", "log2 p"))
    nin32 = step(imagenet_run("nin", 32, 1024, **FIRECAFFE_TREE), "firecaffe-titan", 32)
    ratio = nin32.comm_s / nin32.compute_s
    rows.append(Row("NiN, 32 GPUs, batch 1024: communication / computation", 1.0, ratio, "about_equal",
                    "section 3.7.2, footnote 5: 'approximately equal'"))
    # The same ratio as Table 3.2's 23x at 32 GPUs implies without overlap: 32 / 23 - 1 (a derived number).
    rows.append(Row("NiN, 32 GPUs, batch 1024: communication / computation", 32 / 23 - 1, ratio, "about_equal",
                    "implied by Table 3.2's 23x: 32 / 23 - 1"))
    report.table("1d. Scaling of the two schemes (eqs. 3.3, 3.4) and the thesis's 32-GPU statement", rows, "")

    rows = []
    for model, gpus, batch, epochs, hours, speedup in THESIS_RUNS:
        base_epochs, base_batch, _ = THESIS_ONE_GPU[model]
        one = train_hours(step(imagenet_run(model, 1, base_batch), "firecaffe-titan", 1), base_batch, base_epochs)
        many = train_hours(step(imagenet_run(model, gpus, batch, **FIRECAFFE_TREE), "firecaffe-titan", gpus),
                           batch, epochs)
        rows.append(Row(f"{model}, {gpus} GPUs, batch {batch}, {epochs} epochs", speedup, one / many, "training",
                        f"published {hours:g} h, predicted {many:.1f} h"))
    report.table("1e. Training speedup over one GPU with the reduction tree, thesis Tables 3.2 and 3.3", rows, " x")


# -- 2. Krizhevsky 2014 ------------------------------------------------------------------------------------


def krizhevsky(report: Report) -> None:
    report.text("### 2. Krizhevsky 2014, 'One weird trick' (8 K20 GPUs in one machine)")
    report.text()
    cluster = PUBLISHED["krizhevsky-8"]
    report.text(f"Cluster `krizhevsky-8`: {cluster.description}. Per-GPU batch {KRIZHEVSKY_PER_GPU_BATCH} (global "
                f"{KRIZHEVSKY_PER_GPU_BATCH} K, the paper's (128 K, 128 K) rows), so a fixed number of epochs takes "
                "K times fewer steps: speedup = K x step(1 GPU) / step(K GPUs). Predicted with data parallelism "
                "(`allreduce`, ring) on AlexNet, not his hybrid scheme (no `krizhevsky` performance model); "
                "both overlap settings are shown, each judged on its own.")
    report.text()
    one_exp = imagenet_run("alexnet", 1, KRIZHEVSKY_PER_GPU_BATCH)
    one = step(one_exp, "krizhevsky-8", 1)
    rows = [Row(f"one GPU, {KRIZHEVSKY_EPOCHS} epochs at batch 128", KRIZHEVSKY_ONE_GPU_HOURS,
                train_hours(one, KRIZHEVSKY_PER_GPU_BATCH, KRIZHEVSKY_EPOCHS), "training",
                "sets the profile's TFLOPS")]
    for overlap in (True, False):
        for gpus, speedup in KRIZHEVSKY_SPEEDUPS.items():
            exp = imagenet_run("alexnet", gpus, KRIZHEVSKY_PER_GPU_BATCH * gpus, strategy="allreduce",
                               strategy_args={"algorithm": "ring", "overlap": overlap})
            many = step(exp, "krizhevsky-8", gpus)
            rows.append(Row(f"{gpus} GPUs, ring allreduce, overlap {'on' if overlap else 'off'}", speedup,
                            gpus * one.step_s / many.step_s, "training",
                            f"exposed comm {1e3 * many.exposed_comm_s:.0f} of {1e3 * many.comm_s:.0f} ms"))
    report.table("2. Speedup over one GPU (paper Table 1 as commonly quoted; first row: hours)", rows, "")


# -- 3. GPipe ----------------------------------------------------------------------------------------------


def gpipe_rows(spec: dict, stages: tuple[int, ...], microbatches: tuple[int, ...], batch: int
               ) -> tuple[list[Row], list[str], list[str]]:
    base = Experiment(workers=1, batch_size=batch, optimizer="momentum", **spec)
    one = step(base, "gpipe-tpu-v3", 1)
    rows, formula_bubble, predicted_bubble = [], [], []
    for k in stages:
        for m in microbatches:
            exp = base.replace(workers=k, mesh={"dp": 1, "pp": k}, step_schedule="gpipe", microbatches=m)
            p = step(exp, "gpipe-tpu-v3", k)
            rows.append(Row(f"K = {k}, M = {m}", k * m / (m + k - 1), one.step_s / p.step_s, "pipeline"))
            formula_bubble.append(f"{(k - 1) / (m + k - 1):.3f}")
            # The pipeline's idle share: 1 - the stages' busy seconds (one device's compute) / (K x the span).
            predicted_bubble.append(f"{1 - one.compute_s / (k * (p.compute_s + p.bubble_s)):.3f}")
    return rows, formula_bubble, predicted_bubble


def gpipe(report: Report) -> None:
    report.text("### 3. GPipe (Huang et al. 2019): speedup against the microbatch count")
    report.text()
    cluster = PUBLISHED["gpipe-tpu-v3"]
    report.text(f"Cluster `gpipe-tpu-v3`: {cluster.description}. Global batch {GPIPE_BATCH}, `mesh={{dp: 1, pp: K}}`, "
                "`step_schedule=gpipe`, M microbatches; published: the bubble formula's K M / (M + K - 1) times one "
                "device (idle share (K-1)/(M+K-1)); predicted: step(one device) / step(K stages), optimizer step "
                "included. The bubble columns give the formula's idle share and the predicted one, 1 - (the "
                "stages' busy seconds) / (K x the predicted span).")
    report.text()
    rows, formula_bubble, predicted_bubble = gpipe_rows(GPIPE_MODEL, GPIPE_STAGES, GPIPE_MICROBATCHES, GPIPE_BATCH)
    report.table("3a. Equal layers (mlp, 16 linear layers 4096 x 4096; GPipe's Transformer case)", rows, " x",
                 [("bubble, formula", formula_bubble), ("bubble, predicted", predicted_bubble)])
    rows, formula_bubble, predicted_bubble = gpipe_rows(GPIPE_UNEVEN, (4,), (1, 4, 32), 256)
    report.table("3b. Uneven layers (vgg16 on 3x224x224, batch 256, cut by FLOPs; GPipe's AmoebaNet case)", rows,
                 " x", [("bubble, formula", formula_bubble), ("bubble, predicted", predicted_bubble)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", metavar="FILE", help="also write the tables as markdown to FILE")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    report = Report()
    report.text("Tolerances (stated before comparing): " + "; ".join(
        f"{name} {tolerance_text(name)}" for name in TOLERANCES) + ".")
    report.text()
    firecaffe(report)
    krizhevsky(report)
    gpipe(report)
    within = sum(row.within for _, row in report.rows)
    report.text(f"**{within} of {len(report.rows)} comparisons within tolerance.** Misses: "
                + "; ".join(f"{title.split(' ')[0]} {row.label} ({100 * row.error:+.0f} %)"
                           for title, row in report.rows if not row.within)
                + ".")
    report.text()
    report.text(f"Command: `python benchmarks/bench_perf_external.py`; {time.perf_counter() - started:.1f} s.")
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as out:
            out.write("\n".join(report.lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
