"""Runs a model once on the meta device and records each layer call with the shapes its formula needs.

A module with a cost formula (`polytrain.cost.layers`) becomes one node and whatever runs inside it is not
looked at. So does a leaf module with parameters but no formula, marked not counted: its arithmetic is
unknown. Every other module (containers, residual blocks, Fire and Inception modules, shortcuts) is
transparent: the functions its forward() calls outside counted modules (residual additions, torch.cat,
F.relu, F.pad, ...) are caught with a `TorchFunctionMode` and become nodes of their own, so additions and
concatenations written in forward() code are counted, not lost as module hooks alone would lose them. A
function that only views or reshapes its input makes no node unless it had to copy; any other function
without a formula becomes a node marked not counted.

Tensors are identified by their storage (an in-place update or a view shares its input's), which is what
the memory model needs; each node output is a new *value*, so an in-place ReLU's output is a value of its
own on its input's storage.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from polytrain.cost.layers import FUNCTION_FORMULAS, Call, LayerCost, TensorSpec, layout_copy, module_formula

# Functions that return a view of their input when they can (and a copy when they must): no node for a view,
# a zero-arithmetic "copy" node for a copy.
LAYOUT_FUNCTIONS = frozenset({
    torch.Tensor.__getitem__, torch.Tensor.view, torch.Tensor.view_as, torch.Tensor.reshape,
    torch.Tensor.reshape_as, torch.reshape, torch.Tensor.flatten, torch.flatten, torch.Tensor.unflatten,
    torch.Tensor.permute, torch.permute, torch.Tensor.transpose, torch.transpose, torch.Tensor.t, torch.t,
    torch.Tensor.unsqueeze, torch.unsqueeze, torch.Tensor.squeeze, torch.squeeze, torch.Tensor.unbind,
    torch.unbind, torch.Tensor.chunk, torch.chunk, torch.Tensor.split, torch.split, torch.Tensor.narrow,
    torch.narrow, torch.Tensor.select, torch.select, torch.Tensor.expand, torch.Tensor.expand_as,
    torch.Tensor.contiguous, torch.Tensor.detach, torch.Tensor.__setitem__,
})


@dataclass(frozen=True)
class Value:
    """One tensor value of the forward pass.

    Attributes:
        storage: index of its storage in `Trace.storage_bytes`.
        spec: its shape, element size and whether it requires a gradient.
        producer: the node that produced it, or None (the model input, tensors made by uncounted code).
    """

    storage: int
    spec: TensorSpec
    producer: int | None


@dataclass(frozen=True)
class ParameterRef:
    """A parameter as the memory model needs it: its storage, size and whether it gets a gradient."""

    storage: int
    numel: int
    nbytes: int
    requires_grad: bool


@dataclass(frozen=True)
class Node:
    """One counted (or uncountable) layer call.

    Attributes:
        name: qualified module name, or the enclosing module's name and the function (`layer1.0.add`).
        kind: module class name or function kind ("Conv2d", "add", "cat").
        module: the module called, None for a function.
        formula: computes the node's `LayerCost` from a `Call`; None if the node is not counted.
        call: shapes of the activation inputs and outputs as the layer saw them.
        inputs: value ids of the activation inputs (parameters and buffers excluded).
        outputs: value ids of the outputs.
        parameters: the parameters the node owns.
        note: why the node is not counted, or "".
    """

    name: str
    kind: str
    module: nn.Module | None
    formula: Callable[[Call], LayerCost] | None
    call: Call
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    parameters: tuple[ParameterRef, ...]
    note: str

    @property
    def num_params(self) -> int:
        """Elements of the parameters the node owns."""
        return sum(p.numel for p in self.parameters)


@dataclass(frozen=True)
class Trace:
    """The recorded forward pass.

    Attributes:
        nodes: layer calls in execution order.
        values: every tensor value; value 0 is the model input.
        storage_bytes: bytes of each storage.
        storage_creator: the node whose outputs first used each storage, None for storages that existed
            before (input, parameters, buffers) or were made by uncounted code.
        parameter_storages: storages of parameters and buffers.
        outputs: value ids of the model's outputs.
    """

    nodes: tuple[Node, ...]
    values: tuple[Value, ...]
    storage_bytes: tuple[int, ...]
    storage_creator: tuple[int | None, ...]
    parameter_storages: frozenset[int]
    outputs: tuple[int, ...]


def _tensors(obj: Any) -> list[torch.Tensor]:
    """The tensors in a nest of tuples, lists and dicts, in order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for item in obj for t in _tensors(item)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in _tensors(item)]
    return []


def _spec(tensor: torch.Tensor) -> TensorSpec:
    return TensorSpec(tuple(tensor.shape), tensor.element_size(), tensor.requires_grad)


def _function_name(func: Callable) -> str:
    return getattr(func, "__name__", type(func).__name__).strip("_")


class _Recorder(TorchFunctionMode):
    """Builds a `Trace` from module hooks and the torch functions called outside counted modules."""

    def __init__(self, names: dict[nn.Module, str], parameters: list[torch.Tensor]) -> None:
        super().__init__()
        self._names = names
        self._storage_index: dict[int, int] = {}
        self._storage_refs: list[torch.UntypedStorage] = []  # keeps ids unique while tracing
        self._current: dict[int, int] = {}  # storage -> its latest value
        self._stack: list[tuple[nn.Module, bool, bool]] = []  # (module, hides its inside, is a node)
        self._opaque_depth = 0
        self._busy = False
        self._name_counts: Counter[str] = Counter()
        self.nodes: list[Node] = []
        self.values: list[Value] = []
        self.storage_bytes: list[int] = []
        self.storage_creator: list[int | None] = []
        self.parameter_storages = frozenset(self._storage(p)[0] for p in parameters)

    # --- storages and values ---

    def _storage(self, tensor: torch.Tensor) -> tuple[int, bool]:
        """(storage index, whether it is new) of `tensor`."""
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._storage_index:
            return self._storage_index[key], False
        self._storage_index[key] = len(self._storage_refs)
        self._storage_refs.append(storage)
        self.storage_bytes.append(storage.nbytes())
        self.storage_creator.append(None)
        return self._storage_index[key], True

    def _value(self, tensor: torch.Tensor, storage: int, producer: int | None) -> int:
        self.values.append(Value(storage, _spec(tensor), producer))
        self._current[storage] = len(self.values) - 1
        return len(self.values) - 1

    def input_value(self, tensor: torch.Tensor) -> int:
        """The value of an input `tensor`, creating one (with no producer) for a tensor not seen before."""
        storage, _ = self._storage(tensor)
        if storage not in self._current:
            return self._value(tensor, storage, None)
        return self._current[storage]

    def _activations(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        return [t for t in tensors if self._storage(t)[0] not in self.parameter_storages]

    # --- nodes ---

    def _unique_name(self, name: str) -> str:
        self._name_counts[name] += 1
        count = self._name_counts[name]
        return name if count == 1 else f"{name}_{count - 1}"

    def _add_node(self, name: str, kind: str, module: nn.Module | None,
                  formula: Callable[[Call], LayerCost] | None, training: bool,
                  inputs: list[torch.Tensor], outputs: list[torch.Tensor],
                  parameters: list[torch.Tensor], note: str = "") -> None:
        index = len(self.nodes)
        input_values = tuple(self.input_value(t) for t in inputs)
        output_values = []
        for tensor in outputs:
            storage, new = self._storage(tensor)
            if new:
                self.storage_creator[storage] = index
            output_values.append(self._value(tensor, storage, index))
        params = tuple(ParameterRef(self._storage(p)[0], p.numel(), p.numel() * p.element_size(), p.requires_grad)
                       for p in parameters)
        call = Call(tuple(_spec(t) for t in inputs), tuple(_spec(t) for t in outputs), training)
        self.nodes.append(Node(self._unique_name(name), kind, module, formula, call, input_values, tuple(output_values),
                               params, note))

    # --- module hooks ---

    def pre_hook(self, module: nn.Module, args: tuple) -> None:
        """Pushes `module`; a module with a formula, or a parameterised leaf without one, hides its inside."""
        has_own_parameters = next(module.parameters(recurse=False), None) is not None
        is_leaf = next(module.children(), None) is None
        opaque = module_formula(module) is not None or (is_leaf and has_own_parameters)
        self._stack.append((module, opaque, opaque and self._opaque_depth == 0))
        self._opaque_depth += int(opaque)

    def post_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        """Pops `module` and records it if it is counted as one node."""
        _, opaque, counted_here = self._stack.pop()
        self._opaque_depth -= int(opaque)
        if not counted_here:
            return
        self._busy = True
        try:
            formula = module_formula(module)
            note = "" if formula else f"no cost formula for module type {type(module).__name__}"
            bound = (lambda call, m=module, f=formula: f(m, call)) if formula else None
            self._add_node(self._names.get(module, type(module).__name__), type(module).__name__, module, bound,
                           module.training, self._activations(_tensors(args)), _tensors(output),
                           list(module.parameters()), note)
        finally:
            self._busy = False

    # --- functions ---

    def __torch_function__(self, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if not self._busy and self._opaque_depth == 0 and self._stack:
            self._busy = True
            try:
                self._function_called(func, args, kwargs, result)
            finally:
                self._busy = False
        return result

    def _function_called(self, func: Callable, args: tuple, kwargs: dict, result: Any) -> None:
        outputs = [args[0]] if func is torch.Tensor.__setitem__ else _tensors(result)
        if not outputs:
            return  # sizes, dims, dtypes
        inputs = self._activations(_tensors((args, kwargs)))
        module = self._stack[-1][0]
        prefix = self._names.get(module, "")
        if func in FUNCTION_FORMULAS:
            kind, formula = FUNCTION_FORMULAS[func]
        elif func in LAYOUT_FUNCTIONS:
            input_storages = {id(t.untyped_storage()) for t in inputs}
            if func is not torch.Tensor.__setitem__ and all(id(t.untyped_storage()) in input_storages for t in outputs):
                return  # a view
            kind, formula = "copy", layout_copy
        else:
            kind, formula = _function_name(func), None
        note = "" if formula else f"no cost formula for function {_function_name(func)}"
        self._add_node(f"{prefix}.{kind}" if prefix else kind, kind, None, formula, module.training, inputs,
                       outputs, [], note)


def _meta_state(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Meta-device stand-ins for `model`'s parameters and buffers, floating ones in `dtype`."""
    state = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        kind = dtype if tensor.is_floating_point() else tensor.dtype
        state[name] = torch.empty(tensor.shape, dtype=kind, device="meta").requires_grad_(tensor.requires_grad)
    return state


def trace_model(model: nn.Module, input_shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Trace:
    """Runs `model` in training mode on a meta-device input of `input_shape` (batch first) and records it.

    The model itself is left as it was: its parameters and buffers are replaced for the call by meta
    stand-ins (`torch.func.functional_call`), so nothing is computed or allocated.
    """
    state = _meta_state(model, dtype)
    recorder = _Recorder({module: name for name, module in model.named_modules()}, list(state.values()))
    data = torch.empty(input_shape, dtype=dtype, device="meta")
    recorder.input_value(data)
    modes = {module: module.training for module in model.modules()}
    handles = [h for m in model.modules()
               for h in (m.register_forward_pre_hook(recorder.pre_hook), m.register_forward_hook(recorder.post_hook))]
    model.train()
    try:
        with torch.enable_grad(), recorder:
            result = torch.func.functional_call(model, state, (data,))
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    return Trace(tuple(recorder.nodes), tuple(recorder.values), tuple(recorder.storage_bytes),
                 tuple(recorder.storage_creator), recorder.parameter_storages,
                 tuple(recorder.input_value(t) for t in _tensors(result)))
