"""Cost formulas, one per layer type: arithmetic, gradients and saved tensors from the shapes of one call.

Conventions (every formula follows them; the tests hold the counts to them):

- A MAC is one multiply-accumulate of a weight with an activation: the products of convolutions, fully
  connected layers and the gate matrices of recurrent cells. Published "MACs" (and torchvision's "GFLOPS"
  column) count exactly these, without bias additions. A MAC is 2 FLOPs, as a multiply-add "count[s] as two
  arithmetic operations" (Iandola thesis eq. 4.3).
- Every other arithmetic operation is 1 FLOP per element it produces: additions (biases, residual sums,
  reductions), multiplications, max/compare, and, by convention, one per transcendental (sigmoid, tanh).
  Per-channel scalar work that depends on neither batch nor map size (a batch norm's 1/sqrt(var + eps) per
  channel) is not counted, so every count is linear in the batch size.
- Backward is counted per layer as autograd computes it, not as twice the forward: the gradient of the
  input only where the input requires one (not for the first layer, whose input is data), the gradient of
  each weight that requires one (Iandola thesis Sec. 4.3.3: each costs as much as the forward pass).
- Data movement (concatenation, padding, copies, views) is 0 FLOPs; such rows say so with their output.
- Depth (Ben-Nun & Hoefler 2019, Sec. 2.1 and their table of layer work-depth): the levels of a layer's
  reduction trees (a sum of n terms has depth ceil(log2 n)) plus one level per elementwise stage, so every
  layer that computes something has depth >= 1. Work is the layer's forward FLOPs.

All counts are for the whole call (the traced batch); `polytrain.cost.model` divides by the batch size.
Saved tensors follow PyTorch's autograd formulas (tools/autograd/derivatives.yaml) for the CPU and meta
implementations; tests/cost checks them against `torch.autograd.graph.saved_tensors_hooks` for every zoo
model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from polytrain.cost.workdepth import conv_work_depth

# Bytes of one max-pooling index: PyTorch keeps the argmax positions as int64 for backward.
INDEX_BYTES = 8

# Tensors a recurrent cell keeps per step and hidden unit on the reference (decomposed) implementation:
# LSTM, the 4 gate activations plus h_{t-1}, c_{t-1} and tanh(c_t); GRU, its 3 gate pre-activations plus
# four hidden-sized intermediates. Both come to 7 hidden sizes (measured with saved_tensors_hooks).
RNN_SAVED_PER_STEP = 7
RNN_MEMORY_NOTE = ("saved tensors as PyTorch's reference cell; on the CPU, float32 LSTM runs oneDNN's kernel and GRU "
                   "precomputes its input gates, both keeping more")


@dataclass(frozen=True)
class TensorSpec:
    """What a formula knows of one activation tensor: its shape, element size and whether it needs a gradient."""

    shape: tuple[int, ...]
    itemsize: int
    requires_grad: bool

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the elements."""
        return self.numel * self.itemsize


@dataclass(frozen=True)
class Call:
    """One call of a layer: its activation inputs and outputs (parameters excluded) and the module's mode."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    training: bool


@dataclass(frozen=True)
class LayerCost:
    """Cost of one call of a layer, for the whole batch.

    Attributes:
        macs_forward: weight-activation multiply-accumulates of the forward pass.
        flops_forward: all forward FLOPs (2 per MAC plus the elementwise operations).
        macs_backward: MACs of the input and weight gradients autograd computes.
        flops_backward: all backward FLOPs.
        depth: levels of the layer's longest dependency chain (module docstring).
        saved_inputs: positions in `Call.inputs` of the tensors autograd keeps for backward.
        saved_outputs: positions in `Call.outputs` autograd keeps.
        saved_buffer_bytes: bytes of tensors the layer creates only for backward (pooling indices,
            dropout masks, batch statistics, recurrent gates).
        grad_passthrough: whether backward hands the output gradient (or views of it) to the inputs
            without allocating new gradient tensors (additions, concatenation, views).
        note: a caveat about the counts, or "".
    """

    macs_forward: int = 0
    flops_forward: int = 0
    macs_backward: int = 0
    flops_backward: int = 0
    depth: int = 0
    saved_inputs: tuple[int, ...] = ()
    saved_outputs: tuple[int, ...] = ()
    saved_buffer_bytes: int = 0
    grad_passthrough: bool = False
    note: str = ""


class NotCountable(Exception):
    """Raised by a formula for a configuration it does not model; the layer is reported as not counted."""


ModuleFormula = Callable[[nn.Module, Call], LayerCost]
FunctionFormula = Callable[[Call], LayerCost]

MODULE_FORMULAS: dict[type[nn.Module], ModuleFormula] = {}
FUNCTION_FORMULAS: dict[object, tuple[str, FunctionFormula]] = {}


def for_modules(*types: type[nn.Module]) -> Callable[[ModuleFormula], ModuleFormula]:
    """Registers a formula for modules of `types` (and their subclasses)."""

    def register(formula: ModuleFormula) -> ModuleFormula:
        for kind in types:
            MODULE_FORMULAS[kind] = formula
        return formula

    return register


def for_functions(kind: str, *functions: object) -> Callable[[FunctionFormula], FunctionFormula]:
    """Registers a formula, reported as layer type `kind`, for calls of `functions` outside counted modules."""

    def register(formula: FunctionFormula) -> FunctionFormula:
        for function in functions:
            FUNCTION_FORMULAS[function] = (kind, formula)
        return formula

    return register


def module_formula(module: nn.Module) -> ModuleFormula | None:
    """The formula for `module`'s type or its nearest registered base class, or None."""
    for kind in type(module).__mro__:
        if kind in MODULE_FORMULAS:
            return MODULE_FORMULAS[kind]
    return None


def ceil_log2(n: int) -> int:
    """Depth of a tree reduction over n values: ceil(log2 n), 0 for n <= 1."""
    return (n - 1).bit_length() if n > 1 else 0


def _requires_grad(parameter: torch.Tensor | None) -> bool:
    return parameter is not None and parameter.requires_grad


# --- convolution and fully connected layers --------------------------------------------------------------


def _conv_padding(conv: nn.Conv2d, kernel: tuple[int, ...]) -> tuple[int, ...]:
    """Numeric padding of `conv`; "same" pads (k - 1) * d // 2 per side and "valid" none (torch.nn.Conv2d)."""
    if conv.padding == "valid":
        return (0,) * len(kernel)
    if conv.padding == "same":
        return tuple((k - 1) * d // 2 for k, d in zip(kernel, conv.dilation))
    return tuple(conv.padding)


@for_modules(nn.Conv2d)
def conv2d(conv: nn.Conv2d, call: Call) -> LayerCost:
    """2-D convolution with groups, stride, padding and dilation.

    MACs: every output element is a dot product over C_in / groups channels and the kernel window (Iandola
    thesis eq. 4.3, with C_in / groups for grouped convolutions). The input gradient (a transposed
    convolution) and the weight gradient cost as many MACs each (thesis Sec. 4.3.3); the bias gradient
    sums the output gradient. Depth: the direct algorithm's reduction levels from
    `polytrain.cost.workdepth.conv_work_depth`, plus the product level and the bias addition.
    """
    x, y = call.inputs[0], call.outputs[0]
    kernel = tuple(conv.kernel_size)
    macs = y.numel * (conv.in_channels // conv.groups) * math.prod(kernel)
    has_bias = conv.bias is not None
    gradients = int(x.requires_grad) + int(conv.weight.requires_grad)
    *batch, channels, height, width = x.shape
    _, reduction_depth = conv_work_depth(
        "direct", math.prod(batch), channels, conv.out_channels, height, width, *kernel,
        stride=tuple(conv.stride), padding=_conv_padding(conv, kernel), dilation=tuple(conv.dilation),
        groups=conv.groups,
    )
    return LayerCost(
        macs_forward=macs,
        flops_forward=2 * macs + (y.numel if has_bias else 0),
        macs_backward=gradients * macs,
        flops_backward=2 * gradients * macs + (y.numel if _requires_grad(conv.bias) else 0),
        depth=reduction_depth + 1 + int(has_bias),
        saved_inputs=(0,) if conv.weight.requires_grad else (),  # convolution_backward needs it for dW
    )


@for_modules(nn.Linear)
def linear(fc: nn.Linear, call: Call) -> LayerCost:
    """Fully connected layer, a convolution whose filter covers the whole input (Iandola thesis Sec. 3.3).

    MACs: in_features per output element; input and weight gradients as many each (two matrix products of
    the same size); bias gradient, a sum of the output gradient over the batch. Depth: the reduction over
    in_features, the product level and the bias addition.
    """
    x, y = call.inputs[0], call.outputs[0]
    macs = y.numel * fc.in_features
    has_bias = fc.bias is not None
    gradients = int(x.requires_grad) + int(fc.weight.requires_grad)
    return LayerCost(
        macs_forward=macs,
        flops_forward=2 * macs + (y.numel if has_bias else 0),
        macs_backward=gradients * macs,
        flops_backward=2 * gradients * macs + (y.numel if _requires_grad(fc.bias) else 0),
        depth=ceil_log2(fc.in_features) + 1 + int(has_bias),
        saved_inputs=(0,) if fc.weight.requires_grad else (),  # addmm keeps mat1 for the weight gradient
    )


# --- normalisation, activations, regularisation ----------------------------------------------------------


@for_modules(nn.modules.batchnorm._BatchNorm)
def batch_norm(bn: nn.modules.batchnorm._BatchNorm, call: Call) -> LayerCost:
    """Batch normalisation (Ioffe & Szegedy 2015) over the batch and spatial positions of each channel.

    With batch statistics (training), per element: the mean (1 addition), the variance (subtract, square,
    add: 3) and the normalisation folded with the affine transform into one multiply and one add per
    element (2): 6 FLOPs; depth 2 ceil(log2 m) + 4 for m elements per channel (two reductions, centring,
    squaring, scale, shift). With running statistics (inference) only the folded scale and shift remain:
    2 FLOPs, depth 2. Backward with batch statistics (Ioffe & Szegedy Sec. 3): recompute x_hat (2), the
    sums of g and g * x_hat behind d_gamma and d_beta (3), and d_x = gamma / sigma * (g - mean(g) - x_hat *
    mean(g * x_hat)) (4) when the input needs a gradient. Saved: the input and the per-channel mean and
    inverse standard deviation (kept in at least float32).
    """
    x = call.inputs[0]
    channels = x.shape[1]  # (N, C, ...)
    per_channel = x.numel // channels
    needs_affine = _requires_grad(bn.weight)
    if not (call.training or bn.running_mean is None):
        return LayerCost(
            flops_forward=2 * x.numel, depth=2,
            flops_backward=x.numel * (int(x.requires_grad) + 5 * int(needs_affine)),
            saved_inputs=(0,),
        )
    backward_per_element = 2 + 3 + 4 * int(x.requires_grad) if x.requires_grad or needs_affine else 0
    return LayerCost(
        flops_forward=6 * x.numel,
        flops_backward=backward_per_element * x.numel,
        depth=2 * ceil_log2(per_channel) + 4,
        saved_inputs=(0,),
        saved_buffer_bytes=2 * channels * max(x.itemsize, 4),
    )


def _activation(call: Call, backward_per_element: int) -> LayerCost:
    """An elementwise activation: 1 FLOP per element, depth 1; backward applies the local derivative, which
    every one here computes from the saved output."""
    x, y = call.inputs[0], call.outputs[0]
    return LayerCost(
        flops_forward=y.numel,
        flops_backward=backward_per_element * y.numel if x.requires_grad else 0,
        depth=1,
        saved_outputs=(0,),
    )


@for_modules(nn.ReLU)
def relu_module(module: nn.ReLU, call: Call) -> LayerCost:
    """ReLU: max(0, x); backward masks the gradient where the saved output is 0 (1 FLOP per element)."""
    return _activation(call, 1)


@for_functions("relu", F.relu, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_)
def relu_function(call: Call) -> LayerCost:
    """Functional ReLU, as `relu_module`."""
    return _activation(call, 1)


@for_modules(nn.Sigmoid, nn.Tanh)
def sigmoid_tanh_module(module: nn.Module, call: Call) -> LayerCost:
    """Sigmoid or tanh; backward g * y(1 - y) or g * (1 - y^2) from the saved output y: 3 FLOPs per element."""
    return _activation(call, 3)


@for_functions("sigmoid", torch.sigmoid, torch.Tensor.sigmoid)
def sigmoid_function(call: Call) -> LayerCost:
    """Functional sigmoid, as `sigmoid_tanh_module`."""
    return _activation(call, 3)


@for_functions("tanh", torch.tanh, torch.Tensor.tanh)
def tanh_function(call: Call) -> LayerCost:
    """Functional tanh, as `sigmoid_tanh_module`."""
    return _activation(call, 3)


@for_modules(nn.Dropout)
def dropout(module: nn.Dropout, call: Call) -> LayerCost:
    """Dropout (Srivastava et al. 2014); the identity in inference.

    Training, per element: scale the Bernoulli mask by 1 / (1 - p), multiply it in: 2 FLOPs, as ATen's
    reference implementation (`_dropout_impl`, used on CPU) does; the scaled mask is kept for backward in
    the input's dtype, and backward multiplies the gradient by it (1 FLOP).
    """
    x, y = call.inputs[0], call.outputs[0]
    if not call.training or module.p == 0:
        return LayerCost(grad_passthrough=True)
    return LayerCost(
        flops_forward=2 * y.numel,
        flops_backward=y.numel if x.requires_grad else 0,
        depth=1,
        saved_buffer_bytes=y.nbytes,
    )


# --- pooling ---------------------------------------------------------------------------------------------


def _as_tuple(value: int | tuple[int, ...], dims: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims


def window_counts(size: int, out: int, kernel: int, stride: int, padding: int, dilation: int = 1) -> list[int]:
    """In-bounds elements of each of `out` sliding windows along one axis of length `size`.

    Windows start at o * stride - padding and take `kernel` taps `dilation` apart; taps in the padding
    read nothing. `out` comes from the traced output shape, so ceil_mode's extra window is included.
    """
    return [
        sum(1 for tap in range(kernel) if 0 <= o * stride - padding + tap * dilation < size) for o in range(out)
    ]


def adaptive_window_counts(size: int, out: int) -> list[int]:
    """Elements of each adaptive-pooling window along one axis: [floor(o * size / out), ceil((o+1) * size /
    out)), PyTorch's rule (aten/src/ATen/native/AdaptivePooling.h)."""
    return [-(-(o + 1) * size // out) - (o * size // out) for o in range(out)]


def _pool_totals(call: Call, per_axis: list[list[int]]) -> tuple[int, int]:
    """(sum over all windows of their elements, largest window) for windows separable over the axes."""
    y = call.outputs[0]
    planes = y.numel // math.prod(len(counts) for counts in per_axis)  # N * C
    return planes * math.prod(sum(counts) for counts in per_axis), math.prod(max(c) for c in per_axis)


_POOL_DIMS = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3, nn.AvgPool1d: 1, nn.AvgPool2d: 2,
              nn.AvgPool3d: 3, nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3}


def _sliding_windows(pool: nn.Module, call: Call, dilation: int | tuple[int, ...]) -> tuple[int, int]:
    dims = _POOL_DIMS[type(pool)]
    x, y = call.inputs[0], call.outputs[0]
    kernel = _as_tuple(pool.kernel_size, dims)
    stride = _as_tuple(pool.stride or pool.kernel_size, dims)
    padding = _as_tuple(pool.padding, dims)
    dilation = _as_tuple(dilation, dims)
    per_axis = [
        window_counts(size, out, k, s, p, d)
        for size, out, k, s, p, d in zip(x.shape[-dims:], y.shape[-dims:], kernel, stride, padding, dilation)
    ]
    return _pool_totals(call, per_axis)


@for_modules(nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
def max_pool(pool: nn.modules.pooling._MaxPoolNd, call: Call) -> LayerCost:
    """Max pooling: one operation per window element, as Iandola's Table 4.2 counts NiN's max pools (pool3:
    0.644 GFLOPs = 96 x 27 x 27 x 9 x 1024). Depth: a comparison tree over the largest window. Backward
    adds each output gradient into its argmax (1 per output). Saved: the input and int64 argmax indices.
    """
    x, y = call.inputs[0], call.outputs[0]
    elements, largest = _sliding_windows(pool, call, pool.dilation)
    return LayerCost(
        flops_forward=elements,
        flops_backward=y.numel if x.requires_grad else 0,
        depth=ceil_log2(largest),
        saved_inputs=(0,),
        saved_buffer_bytes=y.numel * INDEX_BYTES,
    )


def _average(call: Call, elements: int, largest: int, saves_input: bool) -> LayerCost:
    """Average pooling as a multiply-add by 1/k per window element: 2 FLOPs each (Iandola Table 4.2: NiN's
    6x6 pool12, 0.073 GFLOPs = 1000 x 36 x 2 x 1024); backward spreads g / k over each window the same
    way. Depth: the sum tree over the largest window and the scaling."""
    x = call.inputs[0]
    return LayerCost(
        flops_forward=2 * elements,
        flops_backward=2 * elements if x.requires_grad else 0,
        depth=ceil_log2(largest) + 1,
        saved_inputs=(0,) if saves_input else (),
    )


@for_modules(nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
def avg_pool(pool: nn.modules.pooling._AvgPoolNd, call: Call) -> LayerCost:
    """Average pooling over sliding windows (padding taps read nothing); saves its input (avg_pool2d_backward)."""
    return _average(call, *_sliding_windows(pool, call, 1), saves_input=True)


@for_modules(nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
def adaptive_avg_pool(pool: nn.Module, call: Call) -> LayerCost:
    """Adaptive average pooling. An all-ones output size is computed by ATen as a mean over the spatial
    axes, whose backward needs only the input's shape; other sizes keep the input."""
    dims = _POOL_DIMS[type(pool)]
    x, y = call.inputs[0], call.outputs[0]
    out = y.shape[-dims:]
    per_axis = [adaptive_window_counts(size, o) for size, o in zip(x.shape[-dims:], out)]
    return _average(call, *_pool_totals(call, per_axis), saves_input=math.prod(out) != 1)


# --- data movement ---------------------------------------------------------------------------------------


@for_modules(nn.Flatten, nn.Unflatten, nn.Identity)
def reshape_module(module: nn.Module, call: Call) -> LayerCost:
    """A view of its input: no arithmetic, no new memory, the gradient is reshaped back."""
    return LayerCost(grad_passthrough=True)


@for_functions("cat", torch.cat, torch.concat, torch.concatenate, torch.stack)
def concatenation(call: Call) -> LayerCost:
    """Concatenation (DenseNet, Inception, Fire): a copy; backward hands each input a slice of the gradient."""
    return LayerCost(grad_passthrough=True)


@for_functions("pad", F.pad)
def pad(call: Call) -> LayerCost:
    """Constant padding (ResNet option-A shortcuts): a copy; backward slices the gradient."""
    return LayerCost(grad_passthrough=True)


def layout_copy(call: Call) -> LayerCost:
    """A reshape or view function that had to copy a non-contiguous input: data movement only."""
    return LayerCost(grad_passthrough=True)


@for_functions("add", torch.add, torch.Tensor.add, torch.Tensor.add_, torch.Tensor.__add__,
               torch.Tensor.__radd__, torch.Tensor.__iadd__)
def add(call: Call) -> LayerCost:
    """Elementwise sum (residual connections, bypasses): 1 FLOP per output element, depth 1.

    Backward hands the output gradient to every input unchanged; an input broadcast to a larger shape
    needs its gradient summed back (one addition per element it was broadcast over).
    """
    y = call.outputs[0]
    reductions = sum(y.numel - x.numel for x in call.inputs if x.requires_grad and x.numel < y.numel)
    return LayerCost(flops_forward=y.numel, flops_backward=reductions, depth=1, grad_passthrough=True)


# --- recurrent layers ------------------------------------------------------------------------------------

# Per step, sample, direction and hidden unit, the elementwise FLOPs of a cell besides its gate products:
# (without biases, per bias set). LSTM: sum of the two gate products (4), gate nonlinearities (4),
# c = f*c + i*g (3), tanh(c) (1), h = o*tanh(c) (1); biases b_ih and b_hh (8). GRU: sums for r and z (2),
# their sigmoids (2), n = tanh(W_in x + r * (W_hn h + b_hn)) (3), h = n + z * (h - n) (3); biases (6).
_CELL_ELEMENTWISE = {nn.LSTM: (13, 8), nn.GRU: (10, 6)}
# Elementwise levels of one step after the gate products: LSTM nonlinearity, i*g, f*c + ., tanh, o*. (5);
# GRU sigmoid, r*h_n, + i_n, tanh, h - n, z*., + n (7).
_CELL_CHAIN = {nn.LSTM: 5, nn.GRU: 7}
_GATES = {nn.LSTM: 4, nn.GRU: 3}


@for_modules(nn.LSTM, nn.GRU)
def recurrent(rnn: nn.LSTM | nn.GRU, call: Call) -> LayerCost:
    """Stacked, optionally bidirectional LSTM (Hochreiter & Schmidhuber 1997) or GRU (Cho et al. 2014).

    MACs: per layer, step, sample and direction, G H (I_l + H) for G gates (LSTM 4, GRU 3), hidden size H
    and layer input I_l (the input size, then H per direction). Backward: the weight gradients as many
    MACs; the gradients of each layer's inputs G H I_l per step where the input needs one; of the hidden
    state G H H per step except the first, whose h_0 is a constant unless passed in with a gradient.
    Elementwise backward is counted as twice the forward's elementwise work (each operation's local
    derivative times the incoming gradient), a convention. Depth: the (T + L - 1) steps of the wavefront
    through T steps and L layers, each a product level, a reduction over I + H products and the two biases,
    and the cell's elementwise chain. Saved: the layer input and `RNN_SAVED_PER_STEP` hidden sizes per
    step, layer and direction, plus each lower layer's output sequence.
    """
    if getattr(rnn, "proj_size", 0):
        raise NotCountable("LSTM with proj_size is not modelled")
    kind = type(rnn) if type(rnn) in _GATES else next(k for k in _GATES if isinstance(rnn, k))
    x = call.inputs[0]
    steps, batch = _steps_and_batch(rnn, x)
    gates, hidden, layers = _GATES[kind], rnn.hidden_size, rnn.num_layers
    directions = 2 if rnn.bidirectional else 1
    layer_inputs = [rnn.input_size] + [directions * hidden] * (layers - 1)
    per_step = batch * directions * gates * hidden  # gate units computed per step
    macs = steps * per_step * sum(i + hidden for i in layer_inputs)
    base, per_bias = _CELL_ELEMENTWISE[kind]
    elementwise = steps * batch * directions * layers * hidden * (base + per_bias * int(rnn.bias))
    weights_need_grad = any(p.requires_grad for p in rnn.parameters())
    input_grads = [x.requires_grad] + [weights_need_grad or x.requires_grad] * (layers - 1)
    h0_needs_grad = len(call.inputs) > 1 and call.inputs[1].requires_grad
    hidden_steps = steps if h0_needs_grad else steps - 1
    macs_backward = (
        (macs if weights_need_grad else 0)
        + steps * per_step * sum(i for i, needed in zip(layer_inputs, input_grads) if needed)
        + hidden_steps * per_step * hidden * layers
    )
    saved_per_step = batch * directions * hidden * (RNN_SAVED_PER_STEP * layers + (layers - 1))
    step_depth = 1 + ceil_log2(max(layer_inputs) + hidden + 2 * int(rnn.bias)) + _CELL_CHAIN[kind]
    return LayerCost(
        macs_forward=macs,
        flops_forward=2 * macs + elementwise,
        macs_backward=macs_backward,
        flops_backward=2 * macs_backward + 2 * elementwise,
        depth=(steps + layers - 1) * step_depth,
        saved_inputs=(0,) if weights_need_grad else (),
        saved_buffer_bytes=steps * saved_per_step * x.itemsize,
        note=RNN_MEMORY_NOTE,
    )


def _steps_and_batch(rnn: nn.RNNBase, x: TensorSpec) -> tuple[int, int]:
    """(T, B) of a recurrent layer's input: (B, T, I) if batch_first, (T, B, I), or unbatched (T, I)."""
    if len(x.shape) == 2:
        return x.shape[0], 1
    return (x.shape[1], x.shape[0]) if rnn.batch_first else (x.shape[0], x.shape[1])
