"""Loads a Ringmaster `lstm` or `gru` model.safetensors into the equivalent PyTorch module
(`nn.LSTM` / `nn.GRU` with batch_first=True as `rnn`, `nn.Linear` as `out`) with a strict
`load_state_dict` and runs it on a Ringmaster dataset directory. Prints one JSON line: for
class labels {"samples", "correct", "accuracy"}, for regression targets {"samples", "mse", "mae"}.

Usage: rnn_reference.py MODEL.safetensors DATASET_DIR lstm|gru STEPS INPUT_SIZE HIDDEN LAYERS
"""

import json
import sys

import torch
from safetensors.torch import load_file
from torch import nn


class Recurrent(nn.Module):
    def __init__(self, cell, input_size, hidden, layers, outputs):
        super().__init__()
        kind = nn.LSTM if cell == "lstm" else nn.GRU
        self.rnn = kind(input_size, hidden, layers, batch_first=True)
        self.out = nn.Linear(hidden, outputs)

    def forward(self, x):
        seq, _ = self.rnn(x)
        return self.out(seq[:, -1])


def main():
    model_path, data_dir, cell, steps, input_size, hidden, layers = sys.argv[1:]
    steps, input_size, hidden, layers = map(int, (steps, input_size, hidden, layers))
    manifest = json.load(open(f"{data_dir}/MANIFEST.json"))
    xs, ys = [], []
    for shard in manifest["shards"]:
        t = load_file(f"{data_dir}/{shard['file']}")
        xs.append(t["x"])
        ys.append(t["y"])
    x = torch.cat(xs).view(-1, steps, input_size)
    y = torch.cat(ys)
    classes = manifest["schema"].get("num_classes")
    outputs = classes if classes else manifest["schema"]["labels"]["shape"][0]
    model = Recurrent(cell, input_size, hidden, layers, outputs)
    model.load_state_dict(load_file(model_path), strict=True)
    model.eval()
    with torch.no_grad():
        out = model(x)
    if classes:
        correct = int((out.argmax(dim=1) == y).sum())
        print(json.dumps({"samples": len(y), "correct": correct, "accuracy": correct / len(y)}))
    else:
        err = out - y
        print(json.dumps({"samples": len(y), "mse": float((err**2).mean()), "mae": float(err.abs().mean())}))


if __name__ == "__main__":
    main()
