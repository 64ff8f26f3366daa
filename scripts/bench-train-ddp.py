"""Peer for `scripts/bench train`: PyTorch DDP (gloo) training throughput.

Run under `torchrun --standalone --nproc-per-node 2`. Same model (MLP
784-1024-1024-10, or with `--model cnn` the convolutional network of
`bench_ddp_common.Cnn`), global batch (128, so 64 per rank), optimizer (SGD with
momentum) and synthetic data shape as the Ringmaster side, one thread per rank.
Prints `RESULT ddp samples_per_sec <value>` from rank 0.
"""

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn

from bench_ddp_common import data, model as build_model, rank_batch, tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--global-batch", type=int, default=128)
    parser.add_argument("--samples", type=int, default=25600)
    parser.add_argument("--model", choices=["mlp", "cnn", "transformer"], default="mlp")
    args = parser.parse_args()

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    lm = args.model == "transformer"
    x, y = tokens(args.samples) if lm else data(args.samples)
    model = build_model(args.model)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    start = None
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            dist.barrier()
            start = time.perf_counter()
        xb, yb = rank_batch(x, y, step, args.global_batch, rank, world)
        opt.zero_grad(set_to_none=True)
        out = ddp(xb)
        # Next-token cross entropy over every position, as the language_model task's loss.
        loss = loss_fn(out.reshape(-1, out.shape[-1]), yb.reshape(-1)) if lm else loss_fn(out, yb)
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
