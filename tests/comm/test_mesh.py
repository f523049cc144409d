"""The mesh: axis arithmetic, one-line validation, per-axis groups and counters labelled by axis."""

import pytest
import torch

from polytrain.cli import main
from polytrain.comm.algorithms import ALLREDUCE_ALGORITHMS
from polytrain.comm.mesh import Mesh, MeshError, MeshShape
from polytrain.config import ConfigError, Experiment
from polytrain.launch import run_workers
from polytrain.train.defaults import resolve


def test_coordinates_are_row_major_with_tp_fastest():
    shape = MeshShape(dp=2, pp=3, tp=2)
    assert shape.world_size == 12
    assert [shape.coordinates(r) for r in (0, 1, 2, 11)] == [
        {"dp": 0, "pp": 0, "tp": 0}, {"dp": 0, "pp": 0, "tp": 1}, {"dp": 0, "pp": 1, "tp": 0},
        {"dp": 1, "pp": 2, "tp": 1}]
    assert all(shape.rank_at(shape.coordinates(r)) == r for r in range(12))
    assert shape.axis_group("tp", 5) == [4, 5]
    assert shape.axis_group("pp", 5) == [1, 3, 5]
    assert shape.axis_group("dp", 5) == [5, 11]


def test_parse_and_describe():
    assert MeshShape.parse("dp=2,pp=2") == MeshShape(dp=2, pp=2)
    assert MeshShape.parse("tp=4").describe() == "dp 1 x tp 4 = 4 ranks"
    for text, message in [("dp=2,xp=2", "unknown mesh axis 'xp'; available: dp, pp, tp"),
                          ("dp=two", "expected AXIS=SIZE"), ("dp=0", "dp=0: expected a whole number of ranks >= 1")]:
        with pytest.raises(MeshError, match=message):
            MeshShape.parse(text)


def test_workers_are_the_product_of_the_axes_and_a_mismatch_shows_the_arithmetic():
    assert resolve(Experiment(mesh={"dp": 4})).workers == 4
    assert resolve(Experiment(workers=2)).mesh == {"dp": 2, "pp": 1, "tp": 1}
    with pytest.raises(MeshError, match=r"^mesh dp 3 x pp 2 = 6 ranks, but --workers is 4$"):
        resolve(Experiment(workers=4, mesh={"dp": 3, "pp": 2}))
    with pytest.raises(ConfigError, match=r"splits the model over pp, but step schedule accumulate does not split "
                                          r"it over pp \(schedules that do: 1f1b, gpipe, interleaved, pipedream; set pp=1\)"):
        resolve(Experiment(mesh={"dp": 2, "pp": 2}))
    with pytest.raises(ConfigError, match="global batch 128 is not divisible by 3 workers"):
        resolve(Experiment(mesh={"dp": 3}))


def test_cli_mesh_mismatch_is_one_line_with_exit_code_2(capsys):
    assert main(["train", "--mesh", "dp=3,pp=2", "--workers", "4"]) == 2
    err = capsys.readouterr().err
    assert err == "polytrain: error: mesh dp 3 x pp 2 = 6 ranks, but --workers is 4\n"


def axis_groups(comm):
    """Builds a dp 2 x pp 2 mesh; sums each rank's number over each axis and reports what was counted."""
    mesh = Mesh.build(MeshShape(dp=2, pp=2), comm)
    ring = ALLREDUCE_ALGORITHMS.get("ring")
    sums = {}
    for axis, axis_comm in mesh.comms.items():
        value = torch.tensor([float(comm.rank)])
        ring.all_reduce(axis_comm, value)
        sums[axis] = value.item()
    ring.all_reduce(mesh.bookkeeping, torch.zeros(4))
    return mesh.coords, sums, comm.stats.as_dict()


def test_each_axis_has_its_group_and_counts_under_its_label():
    shape = MeshShape(dp=2, pp=2)
    outcomes = run_workers(axis_groups, 4, threads=1, timeout_s=30)
    ring = ALLREDUCE_ALGORITHMS.get("ring")
    for rank, (coords, sums, stats) in enumerate(outcomes):
        assert coords == shape.coordinates(rank)
        assert sums == {axis: float(sum(shape.axis_group(axis, rank))) for axis in ("dp", "pp")}
        # One 4-byte element over 2 ranks per axis; 16 bytes over 4 ranks for the bookkeeping sum.
        # Counted at each axis group's own rank, which is the rank's coordinate on that axis.
        assert stats["by_axis"] == {"dp": {"allreduce:ring": ring.bytes_sent(4, 2, coords["dp"], 4)},
                                    "pp": {"allreduce:ring": ring.bytes_sent(4, 2, coords["pp"], 4)},
                                    "bookkeeping": {"allreduce:ring": ring.bytes_sent(16, 4, rank, 4)}}
        assert stats["bytes_sent"] == sum(stats["by_operation"].values())
        assert stats["bookkeeping"]["bytes_sent"] == ring.bytes_sent(16, 4, rank, 4)
