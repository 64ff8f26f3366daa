"""Loads Ringmaster's trained `model.safetensors` back into the PyTorch module of `export.py`
with a strict `load_state_dict` and scores a Ringmaster dataset folder with it. Prints one JSON
line: {"samples": n, "correct": k, "accuracy": k / n}.

    .venv/bin/python examples/torchscript/check.py [--batch-norm] MODEL.safetensors DATASET_DIR

`--batch-norm`: the module was exported with `export.py --batch-norm` (its running statistics
must then be in the file).
"""

import json
import pathlib
import sys

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from export import DigitsCnn  # noqa: E402


def main() -> None:
    args = sys.argv[1:]
    batch_norm = "--batch-norm" in args
    args = [a for a in args if a != "--batch-norm"]
    model_path, data_dir = args[0], pathlib.Path(args[1])
    manifest = json.loads((data_dir / "MANIFEST.json").read_text())
    xs, ys = [], []
    for shard in manifest["shards"]:
        t = load_file(str(data_dir / shard["file"]))
        xs.append(t["x"])
        ys.append(t["y"])
    x = torch.cat(xs).view(-1, 1, 8, 8)
    y = torch.cat(ys)
    model = DigitsCnn(manifest["schema"]["num_classes"], batch_norm=batch_norm)
    model.load_state_dict(load_file(model_path), strict=True)
    model.eval()
    with torch.no_grad():
        correct = int((model(x).argmax(dim=1) == y).sum())
    print(json.dumps({"samples": len(y), "correct": correct, "accuracy": correct / len(y)}))


if __name__ == "__main__":
    main()
