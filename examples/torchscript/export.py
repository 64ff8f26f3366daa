"""Exports a small convolutional network for scikit-learn's digits (1x8x8 images, 10 classes)
as TorchScript, for `job.toml` beside this file to train with Ringmaster.

    .venv/bin/python examples/torchscript/export.py run/torchscript/model.pt
    coordinator submit examples/torchscript/job.toml --follow
    .venv/bin/python examples/torchscript/check.py run/out/torchscript/latest/model.safetensors \
        run/data/digits/val

Any module works the same way, scripted (`torch.jit.script`) or traced (`torch.jit.trace`),
if its forward takes one float tensor (a batch of samples, reshaped to `model.input_shape`)
and returns one logit per class. Keep it deterministic across workers: use per-sample
normalizations (GroupNorm, LayerNorm) rather than BatchNorm, whose running statistics
Ringmaster does not carry.
"""

import pathlib
import sys

import torch
from torch import nn


class DigitsCnn(nn.Module):
    """Two 3x3 convolution blocks (GroupNorm, ReLU, 2x2 max pooling), global average pooling
    and a linear head: the same layers as Ringmaster's built-in `cnn` with channels [32, 64]."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv0 = nn.Conv2d(1, 32, 3, padding=1)
        self.norm0 = nn.GroupNorm(8, 32)
        self.conv1 = nn.Conv2d(32, 64, 3, padding=1)
        self.norm1 = nn.GroupNorm(8, 64)
        self.out = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.norm0(self.conv0(x))), 2)
        x = nn.functional.max_pool2d(torch.relu(self.norm1(self.conv1(x))), 2)
        return self.out(x.mean(dim=(2, 3)))


def main() -> None:
    out = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "run/torchscript/model.pt")
    torch.manual_seed(0)
    module = torch.jit.script(DigitsCnn())
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(module, str(out))
    params = sum(p.numel() for p in module.parameters())
    print(f"wrote {out}: {params} parameters")


if __name__ == "__main__":
    main()
