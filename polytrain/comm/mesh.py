"""The mesh of a run's ranks: named axes (dp, pp, tp), one counted Communicator per axis.

A run of dp x pp x tp ranks places rank r at the coordinates of r in row-major order over (dp, pp, tp):
tensor-parallel ranks are neighbours (one host keeps its fast links for the chattiest axis, as in
Megatron-LM), pipeline stages come next, replicas are furthest apart. Each axis has a process group of the
ranks that differ only in that coordinate, built with torch's DeviceMesh, and a Communicator over it
labelled with the axis; all of a rank's communicators, and the bookkeeping one over the whole world,
share one CommStats, so result.json shows every byte by axis and operation.

Server ranks (a parameter server's, polytrain.strategies.ps) sit beside the product, not inside it: a
mesh of W workers (dp, or dp x pp: DistBelief's model-parallel replicas) with k servers spans W + k ranks,
the workers first (rank 0 stays a worker, the one that
reports and writes the results), the servers after them. Workers and servers share a communicator of their
own, axis "ps", so that a server receiving from whichever worker is first never meets the run's other
traffic; the workers' dp communicator leaves the servers out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

from polytrain.comm.communicator import BOOKKEEPING, Communicator

AXES = ("dp", "pp", "tp")


class MeshError(ValueError):
    """An invalid mesh; the message shows the arithmetic."""


@dataclass(frozen=True)
class MeshShape:
    """Sizes of the mesh axes, in AXES order."""

    dp: int = 1
    pp: int = 1
    tp: int = 1

    @classmethod
    def parse(cls, text: str) -> "MeshShape":
        """Parses `dp=2,pp=2` (axes left out have size 1)."""
        sizes: dict[str, int] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            axis, sep, value = part.partition("=")
            if not sep or not value.strip().isdigit():
                raise MeshError(f"--mesh {text!r}: expected AXIS=SIZE,... with axes {', '.join(AXES)}")
            sizes[axis.strip()] = int(value)
        return cls.from_sizes(sizes)

    @classmethod
    def from_sizes(cls, sizes: Mapping[str, object]) -> "MeshShape":
        """The shape with `sizes` ({"dp": 2, "pp": 2}); unknown axes and sizes below 1 are errors."""
        for axis, size in sizes.items():
            if axis not in AXES:
                raise MeshError(f"unknown mesh axis '{axis}'; available: {', '.join(AXES)}")
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise MeshError(f"mesh axis {axis}={size!r}: expected a whole number of ranks >= 1")
        return cls(**dict(sizes))

    def sizes(self) -> dict[str, int]:
        return {axis: getattr(self, axis) for axis in AXES}

    @property
    def world_size(self) -> int:
        return math.prod(self.sizes().values())

    def describe(self) -> str:
        """`dp 3 x pp 2 = 6 ranks` (axes of size 1 left out, dp always shown)."""
        shown = [f"{axis} {size}" for axis, size in self.sizes().items() if size > 1 or axis == "dp"]
        return f"{' x '.join(shown)} = {self.world_size} rank{'s' if self.world_size != 1 else ''}"

    def check_workers(self, workers: int) -> None:
        """Raises MeshError unless the mesh has exactly `workers` ranks."""
        if self.world_size != workers:
            raise MeshError(f"mesh {self.describe()}, but --workers is {workers}")

    def coordinates(self, rank: int) -> dict[str, int]:
        """The (dp, pp, tp) coordinates of `rank` (row-major, tp fastest)."""
        coords = {}
        for axis in reversed(AXES):
            rank, coords[axis] = divmod(rank, getattr(self, axis))
        return {axis: coords[axis] for axis in AXES}

    def rank_at(self, coords: Mapping[str, int]) -> int:
        """The rank at `coords` (the inverse of `coordinates`)."""
        rank = 0
        for axis in AXES:
            rank = rank * getattr(self, axis) + coords.get(axis, 0)
        return rank

    def axis_group(self, axis: str, rank: int) -> list[int]:
        """The ranks that differ from `rank` only in `axis`, in axis order."""
        coords = self.coordinates(rank)
        return [self.rank_at({**coords, axis: i}) for i in range(getattr(self, axis))]


@dataclass
class Mesh:
    """This rank's place in the mesh and its communicators.

    Attributes:
        shape: the axis sizes.
        rank: this rank in the world.
        coords: this rank's coordinate on every axis.
        comms: a Communicator per axis of size > 1 (missing: the axis has one rank and nothing to send).
        bookkeeping: a Communicator over the world for metrics, evaluation and checkpoint gathers,
            counted under BOOKKEEPING (None for a single rank).
        servers: server ranks beside the workers (ranks shape.world_size and up).
    """

    shape: MeshShape
    rank: int
    coords: dict[str, int]
    comms: dict[str, Communicator]
    bookkeeping: Communicator | None
    servers: int = 0

    @classmethod
    def single(cls) -> "Mesh":
        """The mesh of a one-rank run."""
        return cls(MeshShape(), 0, {axis: 0 for axis in AXES}, {}, None)

    @classmethod
    def build(cls, shape: MeshShape, world: Communicator | None, servers: int = 0) -> "Mesh":
        """The mesh over `world` (every rank calls this together; None: a single rank).

        When only dp has more than one rank, the dp communicator is `world` itself (which may be a
        subgroup, as the conformance batteries use). Otherwise torch's DeviceMesh builds one process
        group per axis over the default (world) group. With `servers`, the last `servers` ranks of
        `world` are server ranks (see the module docstring).
        """
        if world is None:
            shape.check_workers(1)
            return cls.single()
        if servers:
            return cls._with_servers(shape, world, servers)
        shape.check_workers(world.world_size)
        coords = shape.coordinates(world.rank)
        bookkeeping = world.sibling(BOOKKEEPING)
        if shape.world_size == shape.dp:
            return cls(shape, world.rank, coords, {"dp": world.sibling("dp")}, bookkeeping)
        from torch.distributed.device_mesh import init_device_mesh

        device_mesh = init_device_mesh(world.device.type, tuple(shape.sizes().values()), mesh_dim_names=AXES)
        comms = {axis: world.sibling(axis, device_mesh.get_group(axis))
                 for axis, size in shape.sizes().items() if size > 1}
        return cls(shape, world.rank, coords, comms, bookkeeping)

    @classmethod
    def _with_servers(cls, shape: MeshShape, world: Communicator, servers: int) -> "Mesh":
        if shape.tp > 1:
            raise MeshError(f"server ranks hold whole parameter tensors, but mesh {shape.describe()} splits them "
                            f"over tp; use dp and pp only")
        workers = shape.world_size
        if world.world_size != workers + servers:
            raise MeshError(f"{workers} workers + {servers} servers = {workers + servers} ranks, but the run "
                            f"has {world.world_size}")
        import torch.distributed as dist

        def global_ranks(ranks) -> list[int]:
            return [r if world.group is None else dist.get_global_rank(world.group, r) for r in ranks]

        # Every rank of the world takes part in creating every group, members or not (torch's rule): one
        # group per axis line of the workers (DeviceMesh would span the servers too), then the ps group.
        comms = {}
        for axis, size in shape.sizes().items():
            if size == 1:
                continue
            for members in sorted({tuple(shape.axis_group(axis, r)) for r in range(workers)}):
                group = dist.new_group(global_ranks(members))
                if world.rank in members:
                    comms[axis] = world.sibling(axis, group)
        comms["ps"] = world.sibling("ps", dist.new_group(global_ranks(range(world.world_size))))
        is_server = world.rank >= workers
        coords = {axis: 0 for axis in AXES} if is_server else shape.coordinates(world.rank)
        return cls(shape, world.rank, coords, comms, world.sibling(BOOKKEEPING), servers)

    @property
    def is_server(self) -> bool:
        """This rank is a server (it holds a shard of the model and trains on no data)."""
        return self.rank >= self.shape.world_size

    @property
    def dp(self) -> Communicator | None:
        """The data-parallel communicator (None with one replica)."""
        return self.comms.get("dp")

    @property
    def dp_rank(self) -> int:
        return self.coords["dp"]

    @property
    def dp_size(self) -> int:
        return self.shape.dp

    @property
    def world_size(self) -> int:
        """Every rank of the run: the mesh's workers and the servers beside them."""
        return self.shape.world_size + self.servers
