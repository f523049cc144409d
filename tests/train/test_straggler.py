"""The straggler against its definition: the slowed rank waits (slowdown - 1) x its compute, the others never."""

import pytest

from polytrain.config import ConfigError, Experiment
from polytrain.train.defaults import resolve
from polytrain.train.straggler import Straggler


def test_the_slowed_rank_waits_slowdown_minus_one_times_its_compute():
    waits: list[float] = []
    slowed = Straggler({"rank": 1, "slowdown": 3}, rank=1, sleep=waits.append)
    slowed.after_compute(0.5)
    slowed.after_compute(0.25)
    assert waits == [1.0, 0.5] and slowed.waited_s == 1.5
    others = Straggler({"rank": 1, "slowdown": 3}, rank=0, sleep=waits.append)
    others.after_compute(0.5)
    none = Straggler({}, rank=0, sleep=waits.append)
    none.after_compute(0.5)
    assert waits == [1.0, 0.5] and others.waited_s == none.waited_s == 0.0


@pytest.mark.parametrize("straggler, message", [
    ({"rank": 2, "slowdown": 3}, "straggler rank must be a rank in 0..1, got 2"),
    ({"rank": 1, "slowdown": 0.5}, "straggler slowdown must be a number >= 1, got 0.5"),
    ({"rank": 1}, "straggler needs rank=R,slowdown=S"),
])
def test_bad_stragglers_are_one_line_errors(straggler, message):
    with pytest.raises(ConfigError, match=message):
        resolve(Experiment(dataset="digits", workers=2, straggler=straggler))
