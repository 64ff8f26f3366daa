"""Peer for `scripts/bench train`: PyTorch DDP (gloo) training throughput.

Run under `torchrun --standalone --nproc-per-node 2`. Same model (MLP
784-1024-1024-10), global batch (128, so 64 per rank), optimizer (SGD with
momentum) and synthetic data shape as the Ringmaster side, one thread per rank.
Prints `RESULT ddp samples_per_sec <value>` from rank 0.
"""

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--global-batch", type=int, default=128)
    parser.add_argument("--samples", type=int, default=25600)
    args = parser.parse_args()

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    per_rank = args.global_batch // world

    gen = torch.Generator().manual_seed(7)
    x = torch.randn(args.samples, 784, generator=gen)
    y = torch.randint(0, 10, (args.samples,), generator=gen)

    torch.manual_seed(7)
    model = nn.Sequential(
        nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
    )
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    steps_per_epoch = args.samples // args.global_batch
    start = None
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            dist.barrier()
            start = time.perf_counter()
        k = step % steps_per_epoch
        lo = k * args.global_batch + rank * per_rank
        xb, yb = x[lo : lo + per_rank], y[lo : lo + per_rank]
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(ddp(xb), yb)
        loss.backward()
        opt.step()
    dist.barrier()
    elapsed = time.perf_counter() - start
    if rank == 0:
        print(f"RESULT ddp samples_per_sec {args.steps * args.global_batch / elapsed:.1f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
