"""The peer for `worker/benches/allreduce.rs`: torch.distributed all-reduce with the gloo backend,
2 processes on loopback, one intra-op thread each, same sizes and iteration rule.

Prints the same table and `RESULT gloo <bytes> <iters> <seconds per op> <algbw GB/s> <busbw GB/s>`
lines, which `scripts/bench allreduce` joins with ours. Run with the project venv:
`.venv/bin/python scripts/bench-allreduce-gloo.py [--ranks N] [--sizes-mib 4,64] [--iters N] [--warmup N]`.
"""

import argparse
import os
import socket
import sys
import time


def default_iters(nbytes: int) -> int:
    """About 1 GiB of traffic per size, between 10 and 100 operations (same rule as the Rust bench)."""
    return max(10, min(100, (1 << 30) // nbytes))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, args, port: int) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.ranks
    )
    n = args.ranks
    if rank == 0:
        print(f"gloo all-reduce: {n} ranks (processes), loopback TCP, torch {torch.__version__}")
        print(f"{'size':>10} {'iters':>6} {'time/op':>12} {'algbw GB/s':>12} {'busbw GB/s':>12}")
    for mib in args.sizes_mib:
        nbytes = mib << 20
        iters = args.iters or default_iters(nbytes)
        buf = torch.ones(nbytes // 4, dtype=torch.float32)
        for _ in range(args.warmup):
            dist.all_reduce(buf)
        want = float(n**args.warmup)
        if not bool((buf == want).all()):
            raise SystemExit(f"gloo rank {rank}: wrong sum after warm-up")
        buf.fill_(1.0)
        dist.barrier()
        start = time.perf_counter()
        for _ in range(iters):
            dist.all_reduce(buf)
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        # The slowest rank's time, as the Rust bench reports.
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        if rank == 0:
            secs = elapsed.item() / iters
            algbw = nbytes / secs / 1e9
            busbw = algbw * 2 * (n - 1) / n
            print(f"{mib:>7} MiB {iters:>6} {secs * 1e3:>9.3f} ms {algbw:>12.3f} {busbw:>12.3f}")
            print(f"RESULT gloo {nbytes} {iters} {secs:.6f} {algbw:.4f} {busbw:.4f}", flush=True)
    dist.destroy_process_group()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument(
        "--sizes-mib", type=lambda s: [int(x) for x in s.split(",")], default=[4, 64]
    )
    p.add_argument("--iters", type=int, default=0, help="0: the default rule per size")
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args()
    if args.ranks < 2:
        p.error("--ranks must be at least 2")
    # gloo's own thread count is fixed; this keeps torch's intra-op pools at one thread.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch.multiprocessing as mp

    mp.spawn(worker, args=(args, free_port()), nprocs=args.ranks, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
