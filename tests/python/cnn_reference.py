"""Loads a Ringmaster `cnn` model.safetensors into the equivalent PyTorch
module with `load_state_dict` (strict: every name and shape must match) and
scores a Ringmaster dataset directory with it. Prints one JSON line:
{"samples": n, "correct": k, "accuracy": k / n}.

Usage: cnn_reference.py MODEL.safetensors DATASET_DIR C H W CH1,CH2,... KERNEL POOL NORM
where NORM is the GroupNorm's number of groups, `batch` (nn.BatchNorm2d, whose running
statistics and batch count must then be in the file) or `none`.
"""

import json
import sys

import torch
from safetensors.torch import load_file
from torch import nn


class Cnn(nn.Module):
    """The module `worker/src/model/cnn.rs` documents, with ReLU."""

    def __init__(self, c_in, channels, kernel, pool, norm, classes):
        super().__init__()
        self.pool = pool
        self.blocks = len(channels)
        for i, c in enumerate(channels):
            setattr(self, f"conv{i}", nn.Conv2d(c_in, c, kernel, padding=kernel // 2))
            if norm == "batch":
                setattr(self, f"norm{i}", nn.BatchNorm2d(c))
            elif norm == "none":
                setattr(self, f"norm{i}", nn.Identity())
            else:
                setattr(self, f"norm{i}", nn.GroupNorm(int(norm), c))
            c_in = c
        self.out = nn.Linear(c_in, classes)

    def forward(self, x):
        for i in range(self.blocks):
            x = getattr(self, f"conv{i}")(x)
            x = getattr(self, f"norm{i}")(x)
            x = torch.relu(x)
            if self.pool > 1:
                x = nn.functional.max_pool2d(x, self.pool)
        return self.out(x.mean(dim=(2, 3)))


def load_set(data_dir, c, h, w):
    """A Ringmaster dataset directory's images `[n, c, h, w]` (sample id order), labels and
    number of classes."""
    manifest = json.load(open(f"{data_dir}/MANIFEST.json"))
    xs, ys = [], []
    for shard in manifest["shards"]:
        t = load_file(f"{data_dir}/{shard['file']}")
        xs.append(t["x"])
        ys.append(t["y"])
    return torch.cat(xs).view(-1, c, h, w), torch.cat(ys), manifest["schema"]["num_classes"]


def main():
    model_path, data_dir, c, h, w, channels, kernel, pool, norm = sys.argv[1:]
    c, h, w, kernel, pool = map(int, (c, h, w, kernel, pool))
    channels = [int(v) for v in channels.split(",")]
    x, y, classes = load_set(data_dir, c, h, w)
    model = Cnn(c, channels, kernel, pool, norm, classes)
    model.load_state_dict(load_file(model_path), strict=True)
    model.eval()
    with torch.no_grad():
        correct = int((model(x).argmax(dim=1) == y).sum())
    print(json.dumps({"samples": len(y), "correct": correct, "accuracy": correct / len(y)}))


if __name__ == "__main__":
    main()
