"""Replays a Ringmaster `cnn` run with batch normalization as PyTorch DDP computes it, and
compares the result with what Ringmaster wrote.

DDP semantics, done by hand in one process: before every step each rank's replica holds the
shared parameters and rank 0's buffers (DDP's `broadcast_buffers`); each rank runs its own
slice of the global batch through `nn.BatchNorm2d` in training mode (the slice's own
statistics, folded into its running statistics); the per-sample losses are summed, the
gradients summed over ranks and divided by the global batch, and plain SGD applies them;
rank 0's updated buffers are kept. For contrast it also replays the same steps with the whole
global batch on one replica (one worker, or SyncBatchNorm's statistics).

The slices come from the run's sample audit (`[debug] audit_samples`), the starting state
from a checkpoint's model.safetensors (parameters and buffers), the data from the training
set's shards.

Usage: bn_ddp_replay.py START.safetensors END.safetensors AUDIT_DIR DATASET_DIR FIRST_STEP \
    LAST_STEP LR C H W CH1,CH2,... KERNEL POOL

Prints one JSON line: `ddp` and `whole_batch`, each with `params_rel_l2` (relative L2 over every
parameter) and `buffers_rel_l2` (over the running statistics) against END, and
`num_batches_tracked` (END's values and DDP's).
"""

import copy
import json
import pathlib
import sys
from collections import defaultdict

import torch
from safetensors.torch import load_file
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from cnn_reference import Cnn, load_set  # noqa: E402


def audited_slices(audit_dir, first, last):
    """{step: [ids of rank 0, ids of rank 1, ...]} from the generation that applied each step
    last (see worker/src/trainer/audit.rs)."""
    contributes = defaultdict(dict)
    applied = defaultdict(set)
    for f in sorted(pathlib.Path(audit_dir).glob("*.tsv")):
        for line in f.read_text().splitlines():
            if line.startswith("#") or not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) < 6:
                continue
            gen, rank, _world, _epoch, step, event = parts[:6]
            gen, rank, step = int(gen), int(rank), int(step)
            if event == "contributes":
                ids = parts[6] if len(parts) > 6 else ""
                contributes[(gen, step)][rank] = [int(v) for v in ids.split(",") if v]
            elif event == "applied":
                applied[step].add(gen)
    out = {}
    for step in range(first, last):
        gen = max(applied[step])
        ranks = contributes[(gen, step)]
        out[step] = [ranks[r] for r in sorted(ranks)]
    return out


def replay(model, slices, x, y, lr, steps):
    """Plain SGD over `steps`, each rank's slice through its own replica."""
    for step in steps:
        ranks = slices[step]
        batch = sum(len(ids) for ids in ranks)
        grads = [torch.zeros_like(p) for p in model.parameters()]
        buffers = None
        for rank, ids in enumerate(ranks):
            replica = copy.deepcopy(model)
            replica.train()
            if ids:
                out = replica(x[ids])
                loss = nn.functional.cross_entropy(out, y[ids], reduction="sum")
                loss.backward()
                for g, p in zip(grads, replica.parameters()):
                    g += p.grad
            if rank == 0:
                buffers = {k: v.clone() for k, v in replica.named_buffers()}
        with torch.no_grad():
            for g, p in zip(grads, model.parameters()):
                p -= lr * (g / batch)
            for k, v in model.named_buffers():
                v.copy_(buffers[k])
    return model


def rel_l2(a, b):
    a = torch.cat([t.double().flatten() for t in a])
    b = torch.cat([t.double().flatten() for t in b])
    return float((a - b).norm() / b.norm())


def compare(model, end):
    params = [(k, v) for k, v in model.state_dict().items() if "running" not in k
              and "num_batches" not in k]
    stats = [(k, v) for k, v in model.state_dict().items() if "running" in k]
    return {
        "params_rel_l2": rel_l2([v for _, v in params], [end[k] for k, _ in params]),
        "buffers_rel_l2": rel_l2([v for _, v in stats], [end[k] for k, _ in stats]),
    }


def main():
    (start, end, audit, data, first, last, lr, c, h, w, channels, kernel, pool) = sys.argv[1:]
    first, last, c, h, w, kernel, pool = map(int, (first, last, c, h, w, kernel, pool))
    lr = float(lr)
    channels = [int(v) for v in channels.split(",")]
    x, y, classes = load_set(data, c, h, w)
    slices = audited_slices(audit, first, last)
    end = load_file(end)
    report = {}
    for name, slicing in [
        ("ddp", slices),
        ("whole_batch", {s: [sum(r, [])] for s, r in slices.items()}),
    ]:
        model = Cnn(c, channels, kernel, pool, "batch", classes)
        model.load_state_dict(load_file(start), strict=True)
        replay(model, slicing, x, y, lr, range(first, last))
        report[name] = compare(model, end)
        if name == "ddp":
            report["num_batches_tracked"] = {
                "ringmaster": [int(end[k]) for k in sorted(end) if "num_batches" in k],
                "ddp": [int(v) for k, v in sorted(model.state_dict().items())
                        if "num_batches" in k],
            }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
