"""What the PyTorch peers of `scripts/bench train` and `scripts/bench recovery`
share, so both train exactly the Ringmaster side's workload: the synthetic data
(784 features, 10 classes), the models (the MLP 784-1024-1024-10, and the `cnn`
of `scripts/bench train --model cnn`) and each rank's slice of a step's global
batch.
"""

import torch
import torch.nn as nn


def data(samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and labels, the same on every rank (seeded)."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(samples, 784, generator=gen)
    y = torch.randint(0, 10, (samples,), generator=gen)
    return x, y


def mlp() -> nn.Module:
    """The benchmark's model, initialised the same on every rank."""
    torch.manual_seed(7)
    return nn.Sequential(
        nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
    )


class Cnn(nn.Module):
    """Ringmaster's `cnn` with input_shape [1, 28, 28], channels [32, 64],
    kernel 3, pool 2, norm "group" (8 groups), ReLU: the same layers, names
    and shapes (worker/src/model/cnn.rs)."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(1, 32, 3, padding=1)
        self.norm0 = nn.GroupNorm(8, 32)
        self.conv1 = nn.Conv2d(32, 64, 3, padding=1)
        self.norm1 = nn.GroupNorm(8, 64)
        self.out = nn.Linear(64, 10)

    def forward(self, x):
        x = x.view(-1, 1, 28, 28)
        x = nn.functional.max_pool2d(torch.relu(self.norm0(self.conv0(x))), 2)
        x = nn.functional.max_pool2d(torch.relu(self.norm1(self.conv1(x))), 2)
        return self.out(x.mean(dim=(2, 3)))


def model(kind: str) -> nn.Module:
    """`mlp()` or the `Cnn`, initialised the same on every rank."""
    if kind == "mlp":
        return mlp()
    torch.manual_seed(7)
    return Cnn()


def rank_batch(x, y, step: int, global_batch: int, rank: int, world: int):
    """Rank `rank`'s slice of step `step`'s global batch (data order by step)."""
    per_rank = global_batch // world
    k = step % (x.shape[0] // global_batch)
    lo = k * global_batch + rank * per_rank
    return x[lo : lo + per_rank], y[lo : lo + per_rank]
