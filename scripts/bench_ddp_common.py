"""What the PyTorch peers of `scripts/bench train` and `scripts/bench recovery`
share, so both train exactly the Ringmaster side's workload: the synthetic data
(784 features, 10 classes), the MLP 784-1024-1024-10 and each rank's slice of a
step's global batch.
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


def rank_batch(x, y, step: int, global_batch: int, rank: int, world: int):
    """Rank `rank`'s slice of step `step`'s global batch (data order by step)."""
    per_rank = global_batch // world
    k = step % (x.shape[0] // global_batch)
    lo = k * global_batch + rank * per_rank
    return x[lo : lo + per_rank], y[lo : lo + per_rank]
