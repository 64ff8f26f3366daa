"""Exports a small convolutional network for scikit-learn's digits (1x8x8 images, 10 classes)
as TorchScript, for `job.toml` beside this file to train with Ringmaster.

    .venv/bin/python examples/torchscript/export.py run/torchscript/model.pt
    coordinator submit examples/torchscript/job.toml --follow
    .venv/bin/python examples/torchscript/check.py run/out/torchscript/latest/model.safetensors \
        run/data/digits/val

Any module works the same way, scripted (`torch.jit.script`) or traced (`torch.jit.trace`),
if its forward takes one float tensor (a batch of samples, reshaped to `model.input_shape`)
and returns one logit per class. Its buffers (BatchNorm's running statistics, registered
masks) are carried like its parameters: checkpointed, rank 0's on every worker after each step
(as PyTorch DDP broadcasts them), and saved, so a strict `load_state_dict` works. BatchNorm
normalizes each worker's slice of the batch with that slice's statistics, as under DDP, so a
run with it depends on the number of workers; per-sample normalizations (GroupNorm, LayerNorm)
do not. `--batch-norm` exports the same network with BatchNorm2d:

    .venv/bin/python examples/torchscript/export.py --batch-norm run/torchscript/model-bn.pt
"""

import pathlib
import sys

import torch
from torch import nn


class DigitsCnn(nn.Module):
    """Two 3x3 convolution blocks (GroupNorm, ReLU, 2x2 max pooling), global average pooling
    and a linear head: the same layers as Ringmaster's built-in `cnn` with channels [32, 64]."""

    def __init__(self, classes: int = 10, batch_norm: bool = False):
        super().__init__()
        self.conv0 = nn.Conv2d(1, 32, 3, padding=1)
        self.norm0 = nn.BatchNorm2d(32) if batch_norm else nn.GroupNorm(8, 32)
        self.conv1 = nn.Conv2d(32, 64, 3, padding=1)
        self.norm1 = nn.BatchNorm2d(64) if batch_norm else nn.GroupNorm(8, 64)
        self.out = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.norm0(self.conv0(x))), 2)
        x = nn.functional.max_pool2d(torch.relu(self.norm1(self.conv1(x))), 2)
        return self.out(x.mean(dim=(2, 3)))


def main() -> None:
    args = sys.argv[1:]
    batch_norm = "--batch-norm" in args
    args = [a for a in args if a != "--batch-norm"]
    out = pathlib.Path(args[0] if args else "run/torchscript/model.pt")
    torch.manual_seed(0)
    module = torch.jit.script(DigitsCnn(batch_norm=batch_norm))
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(module, str(out))
    params = sum(p.numel() for p in module.parameters())
    print(f"wrote {out}: {params} parameters")


if __name__ == "__main__":
    main()
