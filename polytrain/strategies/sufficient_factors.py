"""Sufficient factor broadcasting (SFB) for fully connected layers under synchronous data parallelism.

The gradient of a fully connected layer y = a W^T + b over a batch is a sum of outer products,
grad W = d^T a and grad b = sum of the rows of d, where a (rows x n) are the layer's inputs and
d (rows x m) the gradients of the loss with respect to its outputs: the "sufficient factors" (Xie, Zhang,
Liang, Ho & Xing, "Distributed Machine Learning via Sufficient Factor Broadcasting", arXiv:1511.08486,
2015, sec. 3). Instead of summing the dense m x n gradients over the ranks, every rank broadcasts its
factors and rebuilds the sum of all ranks' gradients from all factors, sum_r d_r^T a_r = D^T A with the
ranks' factors stacked. That sends rows (n + m) values per rank instead of about m n, which is fewer when
the local batch is small against the layer's width. Poseidon (Zhang et al., "Poseidon: An Efficient
Communication Architecture for Distributed Deep Learning on GPU Clusters", USENIX ATC 2017, sec. 3.2,
hybrid communication) picks, per layer, whichever of the dense exchange and SFB moves fewer bytes; mode
"auto" does the same against the allreduce algorithm the strategy uses.

The loss scaling of the training loop (each microbatch's summed loss divided by the global batch,
polytrain.schedules.run_actions) is already inside d, so D^T A is the global-mean gradient, exactly what
the allreduce of the dense gradients gives.

Decisions where the papers are silent:
- Factors are exchanged by a ring allgather (polytrain.comm.gather, fixed size, counted under the operation
  "sufficient_factors") of one packed buffer per step: all factorised layers together, so p - 1 messages
  per rank. Ranks' shards differ by one sample and the last batch of an epoch is smaller, so each layer's
  factors are padded with zero rows to `local_batch` samples; zero rows add nothing to D^T A or to the
  bias sum, and the wire size (hence the byte formula) is the same on every rank and step.
- Every rank rebuilds the gradients with the same matmul on the same stacked factors, so they are bitwise
  equal on all ranks (as the allreduce algorithms guarantee for the dense sums).
- The choice compares bytes summed over all ranks: for some algorithms (central, ring with uneven pieces)
  bytes_sent differs by rank, and every rank must take the same decision or the ranks deadlock.
- A layer the class cannot factorise falls back to the dense allreduce of its gradient with the same
  algorithm, inside `reduce`: a Linear called more than once per forward (weight sharing: its rows per
  sample would multiply and its factors no longer fit the planned size), a weight also held by another
  module (tied weights get gradient that never passes through this layer's output), and a layer whose
  weight receives gradient without its forward running (e.g. nn.MultiheadAttention's out_proj, which its
  parent applies with F.linear). Whether a layer's input requires grad does not matter: a is detached.
- The weight's gradient must come only through the layer's output: a loss term on the weight itself (an
  explicit L2 penalty) would be dropped. The training loop applies weight decay in the optimizer instead.
- Inputs of more than two dimensions are flattened into rows (batch-first: a (b, t, n) input gives b t
  rows, t rows per sample), and the rows per sample are taken from the first forward, so the decision of
  mode "auto" is made there (report() shows "undecided" before).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from polytrain.comm import Communicator
from polytrain.comm.algorithms import ALLREDUCE_ALGORITHMS
from polytrain.comm.gather import ring_all_gather_into

OPERATION = "sufficient_factors"
MODES = ("auto", "always", "never")


def factor_bytes_sent(rows: int, in_features: int, out_features: int, world_size: int,
                      element_bytes: int = 4) -> int:
    """Bytes one rank sends in a ring allgather of its factors: (p - 1) rows (n + m) elements.

    In each of the p - 1 steps of the ring a rank forwards one rank's block of rows (n + m) elements
    (Thakur, Rabenseifner & Gropp, IJHPCA 2005, ring allgather).
    """
    return (world_size - 1) * rows * (in_features + out_features) * element_bytes


def dense_bytes_sent(algorithm, in_features: int, out_features: int, bias: bool, world_size: int, rank: int,
                     element_bytes: int = 4) -> int:
    """Bytes `rank` sends when `algorithm` allreduces the layer's dense gradient, m n (+ m) elements."""
    numel = out_features * in_features + (out_features if bias else 0)
    return algorithm.bytes_sent(numel * element_bytes, world_size, rank, element_bytes)


def prefers_factors(algorithm, rows: int, in_features: int, out_features: int, bias: bool, world_size: int,
                    element_bytes: int = 4) -> bool:
    """Whether the factors send fewer bytes than the dense allreduce, summed over all ranks (ties: dense)."""
    factors = world_size * factor_bytes_sent(rows, in_features, out_features, world_size, element_bytes)
    dense = sum(dense_bytes_sent(algorithm, in_features, out_features, bias, world_size, rank, element_bytes)
                for rank in range(world_size))
    return factors < dense


@dataclass
class _Layer:
    """One nn.Linear handled by SufficientFactors, with the factors captured during the current step."""

    name: str
    module: nn.Linear
    plan: str | None = None  # "factors" or "dense"; None until the first forward shows the rows per sample
    reason: str = ""
    rows_per_sample: int | None = None
    inputs: list[torch.Tensor] = field(default_factory=list)  # a of each call, rows x n
    errors: dict[int, torch.Tensor] = field(default_factory=dict)  # d of call i, rows x m
    last_forward: int = -1  # the model forward in which the layer was last called

    @property
    def params(self) -> list[nn.Parameter]:
        module = self.module
        return [module.weight] if module.bias is None else [module.weight, module.bias]

    def clear(self) -> None:
        self.inputs, self.errors = [], {}


class SufficientFactors:
    """Sums the gradients of a model's nn.Linear layers over the ranks by sufficient factor broadcasting.

    Hooks capture each layer's inputs a (forward hook) and output gradients d (a tensor hook on the output,
    which sees the gradient of the output as it was before an in-place activation) for every
    microbatch of a step; `reduce`, run once the backward passes of the step are done, allgathers every
    rank's factors and writes grad W = D^T A and grad b = sum of D's rows into `.grad`, identically on all
    ranks. Layers for which the dense allreduce is cheaper (or that cannot be factorised, see the module
    docstring) are allreduced densely with `allreduce_algorithm` in the same call; the strategy leaves all
    of `parameters()` out of its own buckets.

    Args:
        comm: this rank's communicator.
        model: the model (after any other wrapping); its nn.Linear layers whose parameters all require
            grad are handled.
        allreduce_algorithm: name in ALLREDUCE_ALGORITHMS (or an algorithm class) for the dense fallback and
            the byte comparison.
        local_batch: the most samples one rank processes in a step, over all its microbatches
            (ceil(global batch / world size)); factors are padded to it.
        mode: "auto" (factors where they send fewer bytes), "always" or "never".
    """

    def __init__(self, comm: Communicator, model: nn.Module, allreduce_algorithm, local_batch: int,
                 mode: str = "auto") -> None:
        if mode not in MODES:
            raise ValueError(f"sufficient factors mode must be one of {', '.join(MODES)}; got {mode!r}")
        self.comm = comm
        self.algorithm = (ALLREDUCE_ALGORITHMS.get(allreduce_algorithm) if isinstance(allreduce_algorithm, str)
                          else allreduce_algorithm)
        self.mode = mode
        self.set_local_batch(local_batch)
        self.forwards = 0  # model forwards with grad enabled, to tell a shared layer from a new microbatch
        self.layers = self._find_layers(model)
        self.hooks = [model.register_forward_pre_hook(self._on_model_forward)]
        for layer in self.layers:
            self.hooks.append(layer.module.register_forward_hook(self._on_forward(layer)))
        self.buffer: torch.Tensor | None = None

    def set_local_batch(self, local_batch: int) -> None:
        """Changes the padded factor size (a batch-size schedule); every rank must call it at the same step."""
        if isinstance(local_batch, bool) or not isinstance(local_batch, int) or local_batch < 1:
            raise ValueError(f"local_batch must be a positive number of samples per rank; got {local_batch!r}")
        self.local_batch = local_batch
        for layer in getattr(self, "layers", []):
            if layer.plan is not None and not layer.reason:  # chosen by cost, not forced by the model
                layer.plan = self._choose(layer)

    def _find_layers(self, model: nn.Module) -> list[_Layer]:
        # A parameter that appears under more than one module (or one module registered twice) is shared.
        owners: dict[int, int] = {}
        for _, module in model.named_modules(remove_duplicate=False):
            for param in module.parameters(recurse=False):
                owners[id(param)] = owners.get(id(param), 0) + 1
        layers = []
        for name, module in model.named_modules():
            if not isinstance(module, nn.Linear) or module.weight.dim() != 2:
                continue
            layer = _Layer(name or "<model>", module)
            if not all(param.requires_grad for param in layer.params):
                continue  # frozen layers: nothing to reduce, and the strategy skips them as well
            if any(owners[id(param)] > 1 for param in layer.params):
                layer.plan, layer.reason = "dense", "cannot factorise: its parameters are shared with another module"
            layers.append(layer)
        return layers

    # -- hooks ---------------------------------------------------------------------------------------------

    def _on_model_forward(self, module: nn.Module, args) -> None:
        if torch.is_grad_enabled():
            self.forwards += 1

    def _on_forward(self, layer: _Layer):
        def capture(module: nn.Linear, args, output: torch.Tensor) -> None:
            if layer.plan == "dense" or not output.requires_grad:
                return  # evaluation under no_grad, or a layer already known to need the dense exchange
            if layer.last_forward == self.forwards:
                layer.plan, layer.reason = "dense", "cannot factorise: called more than once per forward"
                layer.clear()
                return
            layer.last_forward = self.forwards
            a = args[0].detach()
            if layer.plan is None:
                layer.rows_per_sample = math.prod(a.shape[1:-1])
                layer.plan = self._choose(layer)
                if layer.plan == "dense":
                    return
            index = len(layer.inputs)
            layer.inputs.append(a.reshape(-1, a.shape[-1]))
            _output_node(output).register_hook(lambda grad: layer.errors.__setitem__(index, grad.detach()))

        return capture

    # -- the choice ----------------------------------------------------------------------------------------

    def capacity(self, layer: _Layer) -> int:
        """Rows of factors one rank sends for `layer` per step: local_batch x rows per sample."""
        return self.local_batch * (layer.rows_per_sample or 1)

    def _choose(self, layer: _Layer) -> str:
        if self.mode != "auto":
            return "factors" if self.mode == "always" else "dense"
        module = layer.module
        cheaper = prefers_factors(self.algorithm, self.capacity(layer), module.in_features, module.out_features,
                                  module.bias is not None, self.comm.world_size, module.weight.element_size())
        return "factors" if cheaper else "dense"

    def parameters(self) -> set[nn.Parameter]:
        """Every parameter whose gradient `reduce` sums (by factors or densely); the strategy skips them."""
        return {param for layer in self.layers for param in layer.params}

    # -- the exchange --------------------------------------------------------------------------------------

    def _check_used_in_forward(self, layer: _Layer) -> None:
        """A layer that captured nothing this step but got a gradient is applied by someone else (F.linear)."""
        if layer.plan != "dense" and not layer.inputs and layer.module.weight.grad is not None:
            layer.plan, layer.reason = "dense", "cannot factorise: its weight gets gradient outside its forward"

    def _factors(self, layer: _Layer) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's a and d of `layer`, rows in call order; a call whose output got no gradient has d = 0."""
        n, m = layer.module.in_features, layer.module.out_features
        weight = layer.module.weight
        if not layer.inputs:
            return weight.new_zeros(0, n), weight.new_zeros(0, m)
        errors = [layer.errors[index].reshape(-1, m) if index in layer.errors else weight.new_zeros(a.shape[0], m)
                  for index, a in enumerate(layer.inputs)]
        return torch.cat(layer.inputs), torch.cat(errors)

    def _pack(self, factorised: list[_Layer]) -> torch.Tensor:
        """A (p, K) buffer whose row `rank` holds this rank's factors of every factorised layer, each layer's
        a then d padded with zero rows to its capacity; the other rows are filled by the allgather."""
        size = sum(self.capacity(layer) * (layer.module.in_features + layer.module.out_features)
                   for layer in factorised)
        dtype = factorised[0].module.weight.dtype
        if self.buffer is None or self.buffer.shape[1] != size or self.buffer.dtype != dtype:
            self.buffer = torch.empty(self.comm.world_size, size, dtype=dtype)  # reused: no page faults per step
        mine = self.buffer[self.comm.rank]
        mine.zero_()
        offset = 0
        for layer in factorised:
            n, m, capacity = layer.module.in_features, layer.module.out_features, self.capacity(layer)
            inputs, errors = self._factors(layer)
            rows = inputs.shape[0]
            if rows > capacity:
                raise ValueError(f"layer {layer.name}: {rows} rows of sufficient factors this step exceed its "
                                 f"capacity of {capacity} ({self.local_batch} samples x {layer.rows_per_sample} "
                                 f"rows per sample); local_batch must be the most samples a rank sees in a step")
            mine[offset:offset + rows * n].view(rows, n).copy_(inputs)
            mine[offset + capacity * n:offset + capacity * n + rows * m].view(rows, m).copy_(errors)
            offset += capacity * (n + m)
        return self.buffer

    def _rebuild(self, factorised: list[_Layer], gathered: torch.Tensor) -> None:
        """grad W = D^T A and grad b = column sums of D over every rank's rows, written into .grad."""
        p, offset = gathered.shape[0], 0
        for layer in factorised:
            n, m, capacity = layer.module.in_features, layer.module.out_features, self.capacity(layer)
            inputs = gathered[:, offset:offset + capacity * n].reshape(p * capacity, n)
            errors = gathered[:, offset + capacity * n:offset + capacity * (n + m)].reshape(p * capacity, m)
            _write_grad(layer.module.weight, errors.T @ inputs)
            if layer.module.bias is not None:
                _write_grad(layer.module.bias, errors.sum(dim=0))
            offset += capacity * (n + m)

    def _reduce_dense(self, dense: list[_Layer]) -> None:
        params = [param for layer in dense for param in layer.params]
        flat = torch.cat([(param.grad if param.grad is not None else torch.zeros_like(param)).reshape(-1)
                          for param in params])
        self.algorithm.all_reduce(self.comm, flat)
        offset = 0
        for param in params:
            _write_grad(param, flat[offset:offset + param.numel()].view_as(param))
            offset += param.numel()

    def reduce(self) -> None:
        """Sums the handled layers' gradients over all ranks, after the last backward of the step.

        Factorised layers first (one ring allgather of every layer's factors), then one dense allreduce of
        the rest; every rank calls it at the same point, in the same order as its other collectives.
        """
        try:
            for layer in self.layers:
                self._check_used_in_forward(layer)
            factorised = [layer for layer in self.layers if layer.plan == "factors"]
            # Undecided layers did not run a forward with grad this step; their gradients are summed densely.
            dense = [layer for layer in self.layers if layer.plan != "factors"]
            if factorised:
                gathered = self._pack(factorised)
                # Ring allgather (Thakur et al. 2005): (p - 1) K elements sent per rank, p - 1 messages.
                ring_all_gather_into(self.comm, list(gathered.unbind()), OPERATION)
                self._rebuild(factorised, gathered)
            if dense:
                self._reduce_dense(dense)
        finally:
            for layer in self.layers:
                layer.clear()

    # -- reporting -----------------------------------------------------------------------------------------

    def report(self) -> dict:
        """The per-layer choice and byte estimates of one step on this rank (for result.json)."""
        p, rank = self.comm.world_size, self.comm.rank
        rows = []
        for layer in self.layers:
            module = layer.module
            n, m, bias, element = (module.in_features, module.out_features, module.bias is not None,
                                   module.weight.element_size())
            factors = factor_bytes_sent(self.capacity(layer), n, m, p, element)
            dense = dense_bytes_sent(self.algorithm, n, m, bias, p, rank, element)
            rows.append({"name": layer.name, "in_features": n, "out_features": m, "bias": bias,
                         "rows_per_sample": layer.rows_per_sample, "factor_rows": self.capacity(layer),
                         "choice": layer.plan or "undecided", "reason": layer.reason,
                         "factor_bytes_sent": factors, "dense_bytes_sent": dense})
        return {"mode": self.mode, "algorithm": self.algorithm.name, "local_batch": self.local_batch,
                "world_size": p, "rank": rank, "layers": rows,
                "factor_layers": sum(row["choice"] == "factors" for row in rows),
                "factor_bytes_sent_per_step": sum(row["factor_bytes_sent"] for row in rows
                                                  if row["choice"] == "factors"),
                "dense_bytes_sent_instead": sum(row["dense_bytes_sent"] for row in rows
                                                if row["choice"] == "factors")}

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []
        for layer in self.layers:
            layer.clear()


def _output_node(output: torch.Tensor) -> torch.Tensor:
    """The tensor whose gradient is d: for inputs of more than two dimensions F.linear returns a view of a
    2-D product, and a hook on that view is lost when an in-place activation (ReLU(inplace=True)) rewrites
    the view's history, while a hook on the product itself still sees the gradient before the activation."""
    base = output._base
    if base is not None and base.numel() == output.numel() and base.shape[-1] == output.shape[-1]:
        return base
    return output


def _write_grad(param: nn.Parameter, value: torch.Tensor) -> None:
    if param.grad is None:
        param.grad = value.detach().clone().view_as(param)
    else:
        param.grad.copy_(value.view_as(param))
