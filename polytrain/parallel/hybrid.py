"""Krizhevsky's hybrid of data and model parallelism ("One weird trick for parallelizing convolutional neural
networks", Krizhevsky 2014, arXiv:1404.5997), the model side of `--strategy krizhevsky`.

Convolutional layers hold few parameters and most of the computation, fully connected layers the reverse.
So the K ranks of the dp axis run the convolutional part data-parallel (each its own batch; the policy sums
its gradients) and the fully connected part model-parallel: its linear layers are split in Megatron pairs
over the same K ranks (polytrain.parallel.tensor, plan `linear`, on a communicator over the dp group
labelled `tp`), and no fully connected gradient is ever sent.

The boundary: the top-level modules of an nn.Sequential before the first one holding a linear layer (the
convolutions, pools and the flatten) are the data-parallel part; a dropout directly in front of that layer
belongs to the fully connected part, so that its masks are drawn the way one worker draws them (below).

A step is Krizhevsky's scheme (a), every worker sends its last-conv activations to every other worker:

1. rank r computes the convolutional part on its own batch x_r: activations A_r (b_r rows);
2. an all-gather of A_0 .. A_{K-1} over the dp ranks (counted, `krizhevsky:activation` on axis dp);
3. every rank runs its shards of the fully connected layers on each of the K batches, in rank order; after
   each pair's g allreduce the outputs Y_0 .. Y_{K-1} are the same on every rank;
4. rank r returns Y_r, the predictions of its own samples: the step schedule computes the loss and metric of
   its own (x, y) as in data parallelism, and the replica sums count every sample once.

Backward. Rank r's loss depends on Y_r alone, but its shards took part in all K batches. The whole batch's
loss is the sum of the ranks' losses, so its gradient with respect to Y_0 .. Y_{K-1} is the K ranks' own
gradients side by side (each already divided by the global batch by the schedule): they are all-gathered
(`krizhevsky:gradient` on axis dp, b_k x outputs values per batch), which gives every rank the gradient of
the whole gathered batch's loss. (The labels stay where they are: gathering them instead would compute the
loss and metric of all K batches on every rank, counted K times by the replica sums and by own loops.) Every
rank then backpropagates that same gradient through its shards on every batch.

Backward through the all-gather needs no communication: the gradient reaching each gathered batch A_k is the
same on every rank, because the outputs and their gradient are replicated and the column layer's f sums the
input gradient of the K shards (an allreduce), so rank r keeps the gradient of its own A_r and
backpropagates it through its convolutional part.

Random state and batch norm. One worker with K microbatches (the reference, DESIGN.md section 8) runs
microbatch k = rank k's batch through the whole model, k in order. Running the fully connected part once per
gathered batch, in rank order, draws its dropout masks in the same sequence from the random state every
rank holds alike (the run's seed; SplitDropout draws the unsplit mask), and normalises batch norm there per
batch, so the run equals the reference. (K forwards of b rows instead of one of K b rows: the f/g allreduces
carry the same bytes in K messages each.) Two cases draw in another order and equal the reference in
distribution only: dropout inside the convolutional part (each rank draws for its own batch from the shared
state, as in plain data parallelism), and dropout in the fully connected part with --microbatches m > 1
(one worker runs rank r's microbatch j as microbatch r m + j; here every rank's microbatch j comes before
anyone's j + 1).

Evaluation (no gradients): the exchanges and the g allreduces count as bookkeeping. Replicas evaluate shares
that may take different numbers of batches, so `drain` (called by the policy's evaluation_model) answers the
other ranks' exchanges with empty batches until a round in which no rank sent a sample.

`state_dict` / `load_state_dict` are those of the unsplit model (collective; parallel.tensor's
full_state_dict / load_full_state_dict), so model.pt and checkpoints hold it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from polytrain.comm import BOOKKEEPING, Communicator
from polytrain.comm.gather import all_gather, ring_all_gather_into
from polytrain.parallel.tensor import Pair, check_plan, full_state_dict, load_full_state_dict, plan, split_model

ACTIVATION, GRADIENT = "krizhevsky:activation", "krizhevsky:gradient"
FC_AXIS = "tp"  # the fully connected part's f/g allreduces: model parallelism, over the dp group


def boundary(model: nn.Module) -> int:
    """The index of the first top-level module of the fully connected part (see the module docstring)."""
    if not isinstance(model, nn.Sequential):
        raise ValueError(f"strategy krizhevsky cuts an nn.Sequential at its top-level modules; the model is a "
                         f"{type(model).__name__}")
    children = list(model.children())
    first = next((i for i, child in enumerate(children) if any(isinstance(m, nn.Linear) for m in child.modules())),
                 None)
    if first is None:
        raise ValueError("strategy krizhevsky splits the fully connected layers over the workers, but the model has "
                         "no linear layer (nn.Linear); use allreduce")
    while first > 0 and isinstance(children[first - 1], nn.Dropout):
        first -= 1
    return first


def hybrid_plan(model: nn.Module, parts: int) -> tuple[int, list[Pair]]:
    """(The boundary, the Megatron pairs of the fully connected part) for `parts` ranks; a one-line ValueError
    for a model the hybrid cannot split."""
    start = boundary(model)
    if not plan(model, "linear"):
        raise ValueError("strategy krizhevsky splits the fully connected layers in Megatron pairs of linear layers, "
                         "but the model has none with only element-wise modules between them; use allreduce")
    try:
        pairs = check_plan(model, parts, "linear")
    except ValueError as error:
        raise ValueError(f"strategy krizhevsky splits the fully connected layers over its {parts} workers as tp "
                         f"{parts} does: {error}") from None
    return start, pairs


class _GatherBatches(torch.autograd.Function):
    """Forward: every rank's activations in rank order (an all-gather). Backward: the gradient of this rank's
    own batch only, without communication: the gradient of every gathered batch is the same on every rank (the
    module docstring's "Backward through the all-gather"), so the other ranks' slices are theirs to use."""

    @staticmethod
    def forward(ctx, activations: torch.Tensor, comm: Communicator):
        ctx.rank = comm.rank
        shape = activations.shape[1:]
        return tuple(block.view(-1, *shape) for block in all_gather(comm, activations, operation=ACTIVATION))

    @staticmethod
    def backward(ctx, *gradients: torch.Tensor):
        return gradients[ctx.rank], None


class _OwnPredictions(torch.autograd.Function):
    """Forward: this rank's outputs among the K batches' (the same on every rank). Backward: every rank's
    gradient of its own outputs, all-gathered: the gradient of the whole gathered batch's loss."""

    @staticmethod
    def forward(ctx, comm: Communicator, rank: int, *outputs: torch.Tensor) -> torch.Tensor:
        ctx.comm, ctx.rank, ctx.shapes = comm, rank, [output.shape for output in outputs]
        return outputs[rank].view_as(outputs[rank])

    @staticmethod
    def backward(ctx, gradient: torch.Tensor):
        blocks = [gradient.contiguous().view(-1) if k == ctx.rank else gradient.new_empty(shape.numel())
                  for k, shape in enumerate(ctx.shapes)]
        ring_all_gather_into(ctx.comm, blocks, GRADIENT)
        wanted = ctx.needs_input_grad[2:]
        return (None, None, *[block.view(shape) if need else None
                              for block, shape, need in zip(blocks, ctx.shapes, wanted)])


class HybridModel(nn.Module):
    """`model` (an nn.Sequential) with its fully connected part split over `comm`'s ranks (in place: the same
    Parameter objects keep their shards, so an optimizer built before still steps them) and the batch
    exchanged at the boundary; forward returns this rank's predictions (see the module docstring)."""

    def __init__(self, model: nn.Module, comm: Communicator) -> None:
        super().__init__()
        self.start, _ = hybrid_plan(model, comm.world_size)
        self.fc_comm = comm.sibling(FC_AXIS)
        self.pairs = split_model(model, self.fc_comm, "linear")
        self.model, self.comm, self.books = model, comm, comm.sibling(BOOKKEEPING)
        # Views of the model's modules, not registered again (parameters, modes and devices follow `model`).
        self.parts = (model[:self.start], model[self.start:])
        self.sample_shape: tuple[int, ...] | None = None
        self.sizes: list[int] = []

    @property
    def conv(self) -> nn.Sequential:
        """The data-parallel part: the top-level modules before the boundary."""
        return self.parts[0]

    @property
    def fc(self) -> nn.Sequential:
        """The model-parallel part: the top-level modules from the boundary on."""
        return self.parts[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        training = torch.is_grad_enabled()
        comm = self.comm if training else self.books
        self.sample_shape = tuple(x.shape[1:])
        batches = _GatherBatches.apply(self.conv(x), comm)
        self.sizes = [len(batch) for batch in batches]
        # Every rank skips the same empty batches (the sizes are gathered): an f/g allreduce of nothing.
        outputs = [self.fc(batch) if len(batch) else None for batch in batches]
        done = [output for output in outputs if output is not None]
        if not done:
            return x.new_empty(0)
        outputs = [output if output is not None else done[0].new_empty((0, *done[0].shape[1:])) for output in outputs]
        mine = outputs[self.comm.rank]
        if not (training and any(output.requires_grad for output in outputs)):
            return mine
        return _OwnPredictions.apply(comm, self.comm.rank, *outputs)

    def drain(self) -> None:
        """Evaluation's exchanges after this rank's last batch (collective, no gradients): empty batches until a
        round in which no rank sent a sample, so ranks whose shares took more batches are answered."""
        if self.sample_shape is None:
            raise RuntimeError("strategy krizhevsky evaluated before any forward pass; the shape of its empty "
                               "batches is unknown")
        was_training = self.training
        self.eval()
        with torch.no_grad():
            while True:
                self(torch.empty(0, *self.sample_shape, device=next(self.model.parameters()).device))
                if not any(self.sizes):
                    break
        self.train(was_training)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:  # type: ignore[override]
        """The unsplit model's state (collective: the fully connected shards are gathered, as bookkeeping)."""
        if args or kwargs:
            raise TypeError("HybridModel.state_dict gathers the unsplit model's state and takes no arguments")
        return full_state_dict(self.model, self.fc_comm)

    def load_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True, assign: bool = False):
        """Loads the unsplit model's `state`: each split layer takes its shard."""
        load_full_state_dict(self.model, state)

    def extra_repr(self) -> str:
        return f"boundary at module {self.start}, fully connected part over {self.comm.world_size} ranks"


__all__ = ["HybridModel", "boundary", "hybrid_plan", "ACTIVATION", "GRADIENT", "FC_AXIS"]
