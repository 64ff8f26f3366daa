"""Peer for `scripts/bench recovery`: PyTorch DDP (gloo) under torchrun's own
fault tolerance (`--max-restarts`), one rank killed mid-job.

Run under `torchrun --nnodes 1 --nproc-per-node 2 --max-restarts N
--rdzv-backend c10d --rdzv-endpoint 127.0.0.1:PORT`. Same model (MLP
784-1024-1024-10), global batch (128, so 64 per rank), optimizer (SGD with
momentum, lr 0.01) and synthetic data as scripts/bench-train-ddp.py (both from
scripts/bench_ddp_common.py), one thread per rank.

What a torchrun user must do to survive a restart, done the ordinary way:
torchrun restarts the whole worker group (every rank is a new process), so rank
0 saves model and optimizer state every --ckpt-every steps (torch.save to a
temporary file, then rename) and every rank resumes from the newest one.

Each rank
- writes its PID to <pid-dir>/restart-<R>-rank-<r>.pid at start, R being
  TORCHELASTIC_RESTART_COUNT (0 for the first start), for the bench to kill;
- appends `STEP <R> <rank> <step> <epoch ms> <resumed-from step>` to --step-log
  after each completed step (one short O_APPEND write per line, so the ranks'
  lines do not interleave).
"""

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn

from bench_ddp_common import data, mlp, rank_batch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--global-batch", type=int, default=128)
    parser.add_argument("--samples", type=int, default=25600)
    parser.add_argument("--ckpt-every", type=int, default=50)
    parser.add_argument("--ckpt-dir", required=True)
    parser.add_argument("--pid-dir", required=True)
    parser.add_argument("--step-log", required=True)
    args = parser.parse_args()

    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    rank_env = os.environ.get("RANK", "0")
    pid_file = os.path.join(args.pid_dir, f"restart-{restart}-rank-{rank_env}.pid")
    with open(pid_file + ".tmp", "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(pid_file + ".tmp", pid_file)

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    x, y = data(args.samples)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    ckpt = os.path.join(args.ckpt_dir, "ckpt.pt")
    start = 0
    if os.path.exists(ckpt):
        state = torch.load(ckpt, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = int(state["step"])
    ddp = nn.parallel.DistributedDataParallel(model)
    loss_fn = nn.CrossEntropyLoss()

    log = os.open(args.step_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    for step in range(start, args.steps):
        xb, yb = rank_batch(x, y, step, args.global_batch, rank, world)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(ddp(xb), yb)
        loss.backward()
        opt.step()
        done = step + 1
        os.write(log, f"STEP {restart} {rank} {done} {time.time() * 1000:.1f} {start}\n".encode())
        if rank == 0 and done % args.ckpt_every == 0:
            tmp = ckpt + ".tmp"
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": done}, tmp)
            os.replace(tmp, ckpt)
    os.close(log)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
