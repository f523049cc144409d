"""Gradient checker: analytic gradients against central differences in float64."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

# Floor of the relative error's denominator, so that two (near-)zero gradients compare as equal.
TINY = 1e-300


def relative_error(analytic: torch.Tensor, numeric: torch.Tensor) -> float:
    """max |analytic - numeric| / max(max |analytic|, max |numeric|, TINY)."""
    scale = max(analytic.abs().max().item(), numeric.abs().max().item(), TINY)
    return (analytic - numeric).abs().max().item() / scale


def _projected(fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor],
               cotangent: torch.Tensor) -> float:
    """<cotangent, fn(*inputs)>, the scalar whose gradient is the vector-Jacobian product with `cotangent`."""
    with torch.no_grad():
        return torch.vdot(fn(*inputs).flatten(), cotangent.flatten()).item()


def numeric_gradient(fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], index: int,
                     cotangent: torch.Tensor, eps: float) -> torch.Tensor:
    """d<cotangent, fn>/d inputs[index] by central differences, one element at a time.

    (f(x + eps e_k) - f(x - eps e_k)) / (2 eps) has error O(eps^2) from truncation and O(u / eps) from
    rounding (u = 2^-53 in float64); eps = 1e-6 balances the two near 1e-10 relative.
    """
    point = [t.detach().clone() for t in inputs]
    flat = point[index].view(-1)
    grad = torch.empty_like(flat)
    for k in range(flat.numel()):
        original = flat[k].item()
        flat[k] = original + eps
        above = _projected(fn, point, cotangent)
        flat[k] = original - eps
        below = _projected(fn, point, cotangent)
        flat[k] = original
        grad[k] = (above - below) / (2 * eps)
    return grad.view_as(point[index])


def gradcheck(fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], eps: float = 1e-6,
              seed: int = 0) -> list[float]:
    """Compares the backward pass of `fn` with central differences; returns the max relative error per input.

    Checks the vector-Jacobian product with a random cotangent v, which is what backward computes: the
    analytic v^T J from autograd against the numeric gradient of <v, fn(x)>. A wrong Jacobian entry goes
    unnoticed only if v happens to be orthogonal to its error, which has probability zero. Costs two
    evaluations of `fn` per input element, so keep the inputs small.

    Args:
        fn: maps the tensors `inputs` to one output tensor.
        inputs: float64 tensors; those with requires_grad are checked.
        eps: finite-difference step.
        seed: seed of the cotangent's generator.

    Returns:
        For each input that requires grad, in order, max |analytic - numeric| / max(|analytic|, |numeric|)
        (the maxima taken over the elements of that input's gradient).

    Raises:
        ValueError: if an input that requires grad is not float64 (central differences in lower precision
            are dominated by rounding), or if none requires grad.
    """
    checked = [i for i, t in enumerate(inputs) if t.requires_grad]
    if not checked:
        raise ValueError("gradcheck needs at least one input with requires_grad=True")
    for i in checked:
        if inputs[i].dtype != torch.float64:
            raise ValueError(f"gradcheck needs float64 inputs; input {i} is {inputs[i].dtype}")
    output = fn(*inputs)
    generator = torch.Generator(device=output.device).manual_seed(seed)
    cotangent = torch.randn(output.shape, dtype=output.dtype, device=output.device, generator=generator)
    analytic = torch.autograd.grad(output, [inputs[i] for i in checked], cotangent, allow_unused=True)
    errors = []
    for i, grad in zip(checked, analytic):
        grad = torch.zeros_like(inputs[i]) if grad is None else grad
        errors.append(relative_error(grad, numeric_gradient(fn, inputs, i, cotangent, eps)))
    return errors
