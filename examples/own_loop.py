"""Your own model, data and training loop, made data-parallel by polytrain.

Real data (scikit-learn's 8x8 digits, as a plain torch Dataset), a plain nn.Module and torch.optim optimizer,
and a loop written by hand; polytrain's Session shards the batches, runs the update policy (any --strategy:
allreduce with any algorithm and compressor, local SGD, DiLoCo, ...), sums metrics over the replicas and
checkpoints the whole distributed state.

    python examples/own_loop.py                                   # one process
    polytrain run examples/own_loop.py --workers 2 -- --strategy allreduce:algorithm=ring
    torchrun --nproc-per-node 2 examples/own_loop.py --strategy local_sgd:period=4
    polytrain run examples/own_loop.py --workers 2 -- --epochs 2 --checkpoint run.pt    # then --resume run.pt
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import Dataset

import polytrain


class Digits(Dataset):
    """scikit-learn's 1,797 handwritten digits, (1, 8, 8) images scaled to [0, 1]; the last fifth is the test split."""

    def __init__(self, train: bool) -> None:
        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16
        labels = torch.tensor(digits.target)
        cut = len(labels) * 4 // 5
        self.x, self.y = (images[:cut], labels[:cut]) if train else (images[cut:], labels[cut:])

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index], self.y[index]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", default=None, help="update policy NAME[:k=v,...] (default: allreduce)")
    parser.add_argument("--compressor", default=None, help="gradient compressor NAME[:k=v,...]")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch over all replicas")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", default=None, help="save the run here after every epoch")
    parser.add_argument("--resume", default=None, help="continue the run saved here")
    parser.add_argument("--out", default=None, help="write the final weights (.pt) and a summary (.json) here")
    args = parser.parse_args()

    session = polytrain.setup(strategy=args.strategy, compressor=args.compressor, seed=args.seed)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    model, optimizer = session.setup(model, optimizer)
    train_set, test_set = Digits(train=True), Digits(train=False)

    first_epoch = session.load(args.resume)["epoch"] if args.resume else 0
    accuracy = None
    for epoch in range(first_epoch, args.epochs):
        model.train()
        loss_sum, samples = 0.0, 0
        for x, y in session.loader(train_set, batch_size=args.batch_size, epoch=epoch):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            session.backward(loss)  # weighted by this replica's share of the global batch
            session.step()  # the policy reduces and steps the optimizer
            loss_sum, samples = loss_sum + loss.item() * len(y), samples + len(y)
        if epoch == args.epochs - 1:
            session.finish()  # e.g. local SGD's last average, before the last evaluation

        share = session.share(len(test_set))  # each replica evaluates its part of the test split
        x_test, y_test = test_set.x[share.start:share.stop], test_set.y[share.start:share.stop]
        with torch.no_grad(), session.evaluation_model() as consensus:
            consensus.eval()
            correct = (consensus(x_test).argmax(dim=1) == y_test).sum().item()
        totals = session.sum({"loss": loss_sum, "samples": samples, "correct": correct})
        accuracy = totals["correct"] / len(test_set)
        if session.rank == 0:
            print(f"epoch {epoch + 1}: train loss {totals['loss'] / totals['samples']:.4f}, "
                  f"test accuracy {100 * accuracy:.2f}%", flush=True)
        if args.checkpoint:
            session.save(args.checkpoint, {"epoch": epoch + 1})

    if args.out and session.rank == 0:
        torch.save(model.state_dict(), f"{args.out}.pt")
        summary = {"test_accuracy": accuracy, "world_size": session.world_size, "steps": session.global_step,
                   "comm": session.comm_stats()}
        with open(f"{args.out}.json", "w") as file:
            json.dump(summary, file, indent=1)
    session.close()


if __name__ == "__main__":
    main()
