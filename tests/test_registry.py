import pytest

from polytrain.registry import Registry, UnknownNameError


def test_unknown_name_lists_the_available_ones():
    registry = Registry("strategy")
    registry.register("ring")(lambda: None)
    registry.register("allreduce")(lambda: None)
    with pytest.raises(UnknownNameError, match=r"^unknown strategy 'rign'; available: allreduce, ring$"):
        registry.get("rign")


def test_a_name_registers_once():
    registry = Registry("model")
    registry.register("a")(lambda: None)
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("a")(lambda: None)
