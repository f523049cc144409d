"""What a prediction runs on: ranks on nodes, each rank's compute, and the links between them.

A `Cluster` is nodes x ranks per node with a `Link` inside a node and one between nodes (alpha-beta:
latency per message, seconds per byte), a reduction cost gamma per byte, and a compute model that gives
each top-level module's forward and backward seconds at a batch size:

- `FlopsCompute`: FLOPs / sustained throughput plus activation bytes / memory bandwidth, for the published
  systems polytrain checks itself against (FireCaffe's 128 GPUs, Krizhevsky's 8) and for any cluster
  described by its numbers;
- the calibrated machine (polytrain.perf.profile.CalibratedCompute): what `polytrain calibrate` measured
  here, with alpha and beta fitted per allreduce algorithm and world size at each emulated bandwidth.

`parse_cluster` reads `--cluster`: `local` or `local:BANDWIDTH` (this machine from its profile, ranks on
the emulated cluster at that bandwidth), a published profile's name (`polytrain predict --cluster list`),
a JSON or TOML file of the fields below, or inline `key=value,...` over the `generic` profile.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from polytrain.comm.algorithms import ALLREDUCE_ALGORITHMS


@dataclass(frozen=True)
class Link:
    """alpha (seconds per message) and beta (seconds per byte) of one kind of link."""

    alpha_s: float
    beta_s_per_byte: float

    @classmethod
    def from_rate(cls, gbit_per_s: float, latency_us: float) -> "Link":
        return cls(latency_us * 1e-6, 8.0 / (gbit_per_s * 1e9))

    def transfer_s(self, n_bytes: float, messages: int = 1) -> float:
        return messages * self.alpha_s + n_bytes * self.beta_s_per_byte if n_bytes > 0 else 0.0


class Compute(Protocol):
    """Forward and backward seconds of every top-level module of a workload on one rank."""

    source: str

    def block_times(self, workload, batch: int, ranks_sharing: int) -> list[tuple[float, float]]: ...

    def update_s(self, params: int, optimizer: str, ranks_sharing: int) -> float: ...

    def step_overhead_s(self, workload, batch: int, ranks_sharing: int) -> float: ...

    def compression_s(self, compressor: str, n_bytes: float, ranks_sharing: int) -> float: ...


# Element-wise passes over the parameters an optimizer step makes (read/write of weight, gradient, state).
OPTIMIZER_PASSES = {"sgd": 2, "momentum": 3, "nesterov": 3, "adam": 6, "adamw": 6, "rmsprop": 4, "adagrad": 4,
                    "lars": 4, "lamb": 7}


@dataclass(frozen=True)
class FlopsCompute:
    """Seconds = FLOPs / flops_per_s + activation bytes / memory_bytes_per_s, per module and pass."""

    flops_per_s: float
    memory_bytes_per_s: float
    per_module_s: float = 0.0  # a launch / framework cost per module and pass
    step_overhead: float = 0.0  # data loading and framework time per step
    source: str = "flops"

    def block_times(self, workload, batch: int, ranks_sharing: int) -> list[tuple[float, float]]:
        return [(batch * (b.flops_forward / self.flops_per_s + b.bytes_forward / self.memory_bytes_per_s)
                 + self.per_module_s,
                 batch * (b.flops_backward / self.flops_per_s + 2 * b.bytes_forward / self.memory_bytes_per_s)
                 + self.per_module_s) for b in workload.blocks]

    def update_s(self, params: int, optimizer: str, ranks_sharing: int) -> float:
        return OPTIMIZER_PASSES.get(optimizer, 4) * 4 * params / self.memory_bytes_per_s

    def step_overhead_s(self, workload, batch: int, ranks_sharing: int) -> float:
        return self.step_overhead

    def compression_s(self, compressor: str, n_bytes: float, ranks_sharing: int) -> float:
        return 4 * n_bytes / self.memory_bytes_per_s  # a few memory-bound passes over the gradient


@dataclass(frozen=True)
class Cluster:
    """nodes x ranks_per_node ranks; `intra` links ranks of one node, `inter` links nodes.

    `links` optionally holds fitted (alpha, beta, gamma) per allreduce algorithm and group size (the
    calibrated machine); otherwise every algorithm runs on the link its group crosses, with `gamma`.
    `shared_compute`: the ranks of a node share its processors (this machine's cores), so a rank's compute
    depends on how many ranks the node runs.
    """

    name: str
    nodes: int
    ranks_per_node: int
    compute: Compute
    intra: Link
    inter: Link
    gamma_s_per_byte: float = 0.0
    memory_per_rank_bytes: float | None = None
    links: dict = field(default_factory=dict, compare=False)  # {algorithm: {group size: (alpha, beta, gamma)}}
    shared_compute: bool = False
    overlap: float = 1.0  # the share of backward time that can hide communication (calibrated)
    description: str = ""

    @property
    def ranks(self) -> int:
        return self.nodes * self.ranks_per_node

    def with_ranks(self, ranks: int) -> "Cluster":
        """The same machines with `ranks` ranks: whole nodes filled first."""
        if ranks <= self.ranks_per_node:
            return replace(self, nodes=1, ranks_per_node=ranks)
        nodes = -(-ranks // self.ranks_per_node)
        return replace(self, nodes=nodes)

    def ranks_sharing(self, ranks: int) -> int:
        """How many ranks share one rank's processors: all of a run's on this machine (even on emulated
        hosts, which share its cores), 1 on a cluster of accelerators."""
        return ranks if self.shared_compute else 1

    def link(self, group: int, spans_nodes: bool | None = None) -> Link:
        """The link a group of `group` consecutive ranks communicates over."""
        crosses = group > self.ranks_per_node if spans_nodes is None else spans_nodes
        return self.inter if crosses else self.intra

    def allreduce_terms(self, algorithm: str, group: int) -> tuple[float, float, float]:
        """(alpha, beta, gamma) of `algorithm` over `group` ranks: fitted where calibrated (the nearest
        calibrated group size otherwise), else the link's."""
        fitted = self.links.get(algorithm) or self.links.get("ring")
        if fitted:
            size = min(fitted, key=lambda known: (abs(int(known) - group), -int(known)))
            return tuple(fitted[size])
        link = self.link(group)
        return link.alpha_s, link.beta_s_per_byte, self.gamma_s_per_byte

    def allreduce_s(self, algorithm: str, n_bytes: float, group: int) -> float:
        if group < 2 or n_bytes <= 0:
            return 0.0
        alpha, beta, gamma = self.allreduce_terms(algorithm, group)
        return ALLREDUCE_ALGORITHMS.get(algorithm).cost_s(n_bytes, group, alpha, beta, gamma)

    def p2p_link(self, group: int) -> Link:
        """Point-to-point transfers between ranks of a group: the ring's fitted link where calibrated (a ring
        step is one send and one receive per rank), else the group's link."""
        if self.links.get("ring"):
            alpha, beta, _ = self.allreduce_terms("ring", group)
            return Link(alpha, beta)
        return self.link(group)

    def allgather_s(self, bytes_per_rank: float, group: int) -> float:
        """Ring allgather of `bytes_per_rank` from each of `group` ranks (polytrain.comm.gather)."""
        if group < 2:
            return 0.0
        link = self.p2p_link(group)
        return (group - 1) * (link.alpha_s + bytes_per_rank * link.beta_s_per_byte)


def generic_gpu(name: str, nodes: int, ranks_per_node: int, tflops: float, memory_gbyte_s: float, intra_gbit: float,
                intra_us: float, inter_gbit: float, inter_us: float, memory_gib: float,
                description: str, per_module_us: float = 0.0) -> Cluster:
    return Cluster(name, nodes, ranks_per_node,
                   FlopsCompute(tflops * 1e12, memory_gbyte_s * 1e9, per_module_us * 1e-6),
                   Link.from_rate(intra_gbit, intra_us), Link.from_rate(inter_gbit, inter_us),
                   gamma_s_per_byte=1.0 / (memory_gbyte_s * 1e9 / 3), memory_per_rank_bytes=memory_gib * 2**30,
                   description=description)


# Published systems. Sustained throughputs are what the papers' own single-GPU times imply, not the peaks;
# benchmarks/bench_perf_external.py states where each number comes from.
PUBLISHED: dict[str, Cluster] = {
    # 0.78 TFLOPS: the rate at which the cost model's NiN reproduces its one-GPU Caffe time (47 epochs of
    # ImageNet at batch 256 in 5.8 days, Iandola's thesis Table 3.2) with 180 GB/s, ~72 % of the K20x's
    # 250 GB/s; Gemini at 4 GB/s and 1.5 us per node (the thesis states no number).
    "firecaffe-titan": generic_gpu(
        "firecaffe-titan", 128, 1, 0.78, 180.0, 50.0, 1.5, 32.0, 1.5, 6.0,
        "Titan supercomputer as in FireCaffe (Iandola et al. CVPR 2016): one NVIDIA K20x per node (sustained "
        "0.78 TFLOPS, 180 GB/s: NiN's one-GPU time), Cray Gemini interconnect (~4 GB/s per node, ~1.5 us)"),
    # 1.55 TFLOPS: the rate at which the cost model's AlexNet (the paper's one-tower model) reproduces the
    # paper's one-GPU time, 98.05 h at batch 128, over the 100 epochs Iandola's thesis Table 3.2 lists for
    # it, with 150 GB/s, ~72 % of the K20's 208 GB/s; PCIe 2.0 x16 at ~6 GB/s and 10 us.
    "krizhevsky-8": generic_gpu(
        "krizhevsky-8", 1, 8, 1.55, 150.0, 48.0, 10.0, 48.0, 10.0, 5.0,
        "Krizhevsky 2014 'One weird trick': 8 NVIDIA K20 GPUs in one machine over PCIe (~6 GB/s; sustained "
        "1.55 TFLOPS, 150 GB/s: AlexNet's one-GPU time)"),
    # GPipe (Huang et al. 2019) gives no one-core time: half of a TPU v3 core's 52.5 TFLOPS bf16 peak (420
    # per 8-core board), 450 GB/s (900 per 2-core chip), 16 GiB per core as the paper states; ICI taken as
    # 400 Gbit/s and 5 us. The pipeline check is on ratios, which these set only through transfer / compute.
    "gpipe-tpu-v3": generic_gpu(
        "gpipe-tpu-v3", 1, 8, 26.0, 450.0, 400.0, 5.0, 400.0, 5.0, 16.0,
        "GPipe (Huang et al. NeurIPS 2019): 8 Cloud TPU v3 cores of one board (sustained 26 TFLOPS, 450 GB/s "
        "per core, 16 GiB), inter-core links ~400 Gbit/s"),
    "dgx-a100": generic_gpu(
        "dgx-a100", 16, 8, 100.0, 1500.0, 2400.0, 3.0, 200.0, 5.0, 80.0,
        "DGX A100 nodes: 8 A100 per node over NVLink (300 GB/s), 200 Gbit/s InfiniBand between nodes"),
    "generic": generic_gpu(
        "generic", 1, 8, 10.0, 500.0, 100.0, 5.0, 25.0, 10.0, 16.0,
        "a generic GPU cluster; change any field inline (nodes=4,inter_gbit=100)"),
}

# Inline `key=value` fields (their units in the name) for a cluster over the `generic` profile.
INLINE_FIELDS = ("nodes", "ranks_per_node", "tflops", "memory_gbyte_s", "intra_gbit", "intra_us", "inter_gbit",
                 "inter_us", "memory_gib", "per_module_us")


def _from_fields(name: str, fields: dict) -> Cluster:
    unknown = sorted(set(fields) - set(INLINE_FIELDS) - {"name", "description", "base"})
    if unknown:
        raise ValueError(f"cluster field(s) {', '.join(unknown)} unknown; expected {', '.join(INLINE_FIELDS)}")
    base = PUBLISHED.get(fields.get("base", "generic"))
    if base is None:
        raise ValueError(f"cluster base {fields['base']!r} unknown; expected one of {', '.join(PUBLISHED)}")
    compute = base.compute
    values = {"nodes": base.nodes, "ranks_per_node": base.ranks_per_node, "tflops": compute.flops_per_s / 1e12,
              "memory_gbyte_s": compute.memory_bytes_per_s / 1e9, "intra_gbit": 8 / base.intra.beta_s_per_byte / 1e9,
              "intra_us": base.intra.alpha_s * 1e6, "inter_gbit": 8 / base.inter.beta_s_per_byte / 1e9,
              "inter_us": base.inter.alpha_s * 1e6, "memory_gib": base.memory_per_rank_bytes / 2**30,
              "per_module_us": compute.per_module_s * 1e6}
    for key in INLINE_FIELDS:
        if key in fields:
            value = fields[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 and key != "per_module_us":
                raise ValueError(f"cluster field {key} must be a positive number; got {value!r}")
            values[key] = value
    for key in ("nodes", "ranks_per_node"):
        if values[key] != int(values[key]):
            raise ValueError(f"cluster field {key} must be a whole number; got {values[key]!r}")
        values[key] = int(values[key])
    return generic_gpu(fields.get("name", name), description=fields.get("description", f"{name}: {fields}"),
                       **values)


def parse_cluster(text: str, profile_path: str | Path | None = None, ranks: int | None = None) -> Cluster:
    """`--cluster`: local[:BANDWIDTH], a published profile, a .json/.toml file, or key=value,... (see module)."""
    from polytrain.perf.profile import load_profile

    text = text.strip()
    if text == "local" or text.startswith("local:"):
        bandwidth = text.partition(":")[2] or "none"
        return load_profile(profile_path).cluster(bandwidth, ranks or 2)
    if text in PUBLISHED:
        cluster = PUBLISHED[text]
    elif text.endswith((".json", ".toml")):
        path = Path(text)
        if not path.is_file():
            raise ValueError(f"cluster file {text} does not exist")
        try:
            fields = json.loads(path.read_text()) if text.endswith(".json") else tomllib.loads(path.read_text())
        except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"cluster file {text} is not valid {path.suffix[1:].upper()}: {error}") from None
        if not isinstance(fields, dict):
            raise ValueError(f"cluster file {text} must hold a table of fields")
        cluster = _from_fields(path.stem, fields)
    elif "=" in text:
        from polytrain.config import parse_assignments

        cluster = _from_fields("inline", parse_assignments([part for part in text.split(",") if part], "--cluster"))
    else:
        raise ValueError(f"cluster {text!r} unknown; expected local[:BANDWIDTH], one of {', '.join(PUBLISHED)}, "
                         f"a .json/.toml file or key=value,... with keys {', '.join(INLINE_FIELDS)}")
    return cluster if ranks is None else cluster.with_ranks(ranks)


def describe_clusters() -> list[str]:
    return [f"{name}: {cluster.nodes} x {cluster.ranks_per_node} ranks; {cluster.description}"
            for name, cluster in PUBLISHED.items()]
