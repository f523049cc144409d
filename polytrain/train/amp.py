"""Mixed precision of a run (`--amp`): autocast forward passes, and loss scaling for fp16."""

from __future__ import annotations

import contextlib
from typing import Iterable

import torch
from torch import nn

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class MixedPrecision:
    """Autocast to bf16 or fp16 around forward passes; fp16 scales the loss with torch's GradScaler.

    bf16 keeps float32's exponent range and needs no loss scaling; fp16 does (Micikevicius et al., ICLR
    2018), so its gradients are unscaled before clipping and the step is skipped when any is infinite.
    Every replica of a synchronous run sees the same reduced gradients, so all skip the same steps.

    Args:
        mode: none, bf16 or fp16.
        device: the device the forward passes run on.
    """

    def __init__(self, mode: str, device: torch.device) -> None:
        self.mode = mode
        self.device = device
        self.dtype = DTYPES.get(mode)
        self.scaler = torch.amp.GradScaler(device.type) if mode == "fp16" else None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def step(self, optimizer: torch.optim.Optimizer, parameters: Iterable[nn.Parameter], grad_clip: float | None) -> None:
        """Unscales (fp16), clips the global gradient norm to `grad_clip` and steps the optimizer."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        if grad_clip is not None:
            nn.utils.clip_grad_norm_(list(parameters), grad_clip)
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict:
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
