"""What the PyTorch peers of `scripts/bench train` and `scripts/bench recovery`
share, so both train exactly the Ringmaster side's workload: the synthetic data
(784 features, 10 classes; or byte tokens for the transformer), the models (the
MLP 784-1024-1024-10, the `cnn` of `scripts/bench train --model cnn`, and the
GPT of `--model transformer`, which is tests/python/gpt_reference.py's module)
and each rank's slice of a step's global batch.
"""

import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "python"))
from gpt_reference import Gpt  # noqa: E402

# The transformer of `scripts/bench train --model transformer` (examples/text-gpt.toml's shape).
GPT_LAYERS, GPT_HEADS, GPT_WIDTH, GPT_CONTEXT, GPT_VOCAB = 2, 4, 128, 64, 256


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


def tokens(samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Byte-token inputs and next-token targets `[samples, GPT_CONTEXT]`, the same on every rank."""
    gen = torch.Generator().manual_seed(7)
    stream = torch.randint(0, GPT_VOCAB, (samples, GPT_CONTEXT + 1), generator=gen)
    return stream[:, :-1], stream[:, 1:]


def model(kind: str) -> nn.Module:
    """`mlp()`, the `Cnn` or the GPT, initialised the same on every rank."""
    if kind == "mlp":
        return mlp()
    torch.manual_seed(7)
    if kind == "transformer":
        return Gpt(GPT_VOCAB, GPT_LAYERS, GPT_HEADS, GPT_WIDTH, GPT_CONTEXT, tied=True)
    return Cnn()


def rank_batch(x, y, step: int, global_batch: int, rank: int, world: int):
    """Rank `rank`'s slice of step `step`'s global batch (data order by step)."""
    per_rank = global_batch // world
    k = step % (x.shape[0] // global_batch)
    lo = k * global_batch + rank * per_rank
    return x[lo : lo + per_rank], y[lo : lo + per_rank]
