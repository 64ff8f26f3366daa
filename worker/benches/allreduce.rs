//! All-reduce throughput of the TCP ring: ranks are threads of this process, each with its own
//! data-plane listener on loopback, as separate worker processes would be. Prints time per
//! operation, algorithm bandwidth and bus bandwidth (busbw = algbw · 2(n−1)/n, as nccl-tests
//! defines it) per buffer size. `scripts/bench allreduce` runs it next to gloo and compares.
//!
//! Usage: `cargo bench -p ringmaster-worker --bench allreduce -- [--ranks N] [--sizes-mib 4,64]
//! [--iters N] [--warmup N] [--chunk-kib K]`. Lines starting with `RESULT` are for scripts:
//! `RESULT <impl> <bytes> <iters> <seconds per op> <algbw GB/s> <busbw GB/s>`.

use ringmaster_worker::collective::{DataPlaneListener, RingCollective, RingConfig, ring};
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

struct Args {
    ranks: usize,
    sizes_mib: Vec<usize>,
    /// Fixed iteration count; by default `default_iters` picks one per size.
    iters: Option<usize>,
    warmup: usize,
    chunk_bytes: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        ranks: 2,
        sizes_mib: vec![4, 64],
        iters: None,
        warmup: 3,
        chunk_bytes: ring::DEFAULT_CHUNK_BYTES,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        // `cargo bench` passes `--bench` to every bench binary.
        if flag == "--bench" {
            continue;
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number = |v: &str| {
            v.parse::<usize>()
                .map_err(|e| format!("bad value {v:?} for {flag}: {e}"))
        };
        match flag.as_str() {
            "--ranks" => args.ranks = number(&value)?,
            "--iters" => args.iters = Some(number(&value)?),
            "--warmup" => args.warmup = number(&value)?,
            "--chunk-kib" => args.chunk_bytes = number(&value)? * 1024,
            "--sizes-mib" => {
                args.sizes_mib = value.split(',').map(number).collect::<Result<_, _>>()?
            }
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if args.ranks < 2 {
        return Err("--ranks must be at least 2".into());
    }
    Ok(args)
}

/// About 1 GiB of traffic per size, between 10 and 100 operations; `bench-allreduce-gloo.py`
/// uses the same rule so both sides time the same work.
fn default_iters(bytes: usize) -> usize {
    ((1usize << 30) / bytes).clamp(10, 100)
}

/// Times `iters` all-reduces of `elems` floats on `ranks` ranks; returns the slowest rank's
/// seconds per operation.
fn run(
    listeners: &[DataPlaneListener],
    generation: u64,
    elems: usize,
    warmup: usize,
    iters: usize,
    chunk_bytes: usize,
) -> Result<f64, String> {
    let peers: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().to_string())
        .collect();
    let world = listeners.len();
    let per_rank: Vec<Result<Duration, String>> = thread::scope(|s| {
        let handles: Vec<_> = listeners
            .iter()
            .enumerate()
            .map(|(rank, listener)| {
                let cfg = RingConfig {
                    chunk_bytes,
                    ..RingConfig::new("bench", generation, rank as u32, peers.clone())
                };
                s.spawn(move || -> Result<Duration, String> {
                    let mut ring =
                        RingCollective::connect(listener, cfg).map_err(|e| e.to_string())?;
                    // Doubling 1.0 per op (two ranks) stays exact and far from overflow for the
                    // few warm-up rounds checked below.
                    let mut buf = vec![1.0f32; elems];
                    for _ in 0..warmup {
                        ring.all_reduce_sum(&mut buf).map_err(|e| e.to_string())?;
                    }
                    let want = (world as f32).powi(warmup as i32);
                    if let Some(bad) = buf.iter().position(|&x| x != want) {
                        return Err(format!(
                            "element {bad} is {} after warm-up, want {want}",
                            buf[bad]
                        ));
                    }
                    buf.fill(1.0);
                    ring.barrier().map_err(|e| e.to_string())?;
                    let start = Instant::now();
                    for _ in 0..iters {
                        ring.all_reduce_sum(&mut buf).map_err(|e| e.to_string())?;
                    }
                    Ok(start.elapsed())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("rank panicked".into())))
            .collect()
    });
    let mut slowest = Duration::ZERO;
    for r in per_rank {
        slowest = slowest.max(r?);
    }
    Ok(slowest.as_secs_f64() / iters as f64)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("allreduce bench: {e}");
            return ExitCode::from(2);
        }
    };
    let listeners: Vec<DataPlaneListener> = match (0..args.ranks)
        .map(|_| DataPlaneListener::bind("127.0.0.1:0"))
        .collect()
    {
        Ok(l) => l,
        Err(e) => {
            eprintln!("allreduce bench: cannot bind a listener: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "ringmaster ring all-reduce: {} ranks (threads), loopback TCP, chunk {} KiB",
        args.ranks,
        args.chunk_bytes / 1024
    );
    println!(
        "{:>10} {:>6} {:>12} {:>12} {:>12}",
        "size", "iters", "time/op", "algbw GB/s", "busbw GB/s"
    );
    let n = args.ranks as f64;
    for (i, &mib) in args.sizes_mib.iter().enumerate() {
        let bytes = mib << 20;
        let iters = args.iters.unwrap_or_else(|| default_iters(bytes));
        let secs = match run(
            &listeners,
            i as u64,
            bytes / 4,
            args.warmup,
            iters,
            args.chunk_bytes,
        ) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("allreduce bench: {mib} MiB failed: {e}");
                return ExitCode::FAILURE;
            }
        };
        let algbw = bytes as f64 / secs / 1e9;
        let busbw = algbw * 2.0 * (n - 1.0) / n;
        println!(
            "{:>7} MiB {iters:>6} {:>9.3} ms {algbw:>12.3} {busbw:>12.3}",
            mib,
            secs * 1e3
        );
        println!("RESULT ringmaster {bytes} {iters} {secs:.6} {algbw:.4} {busbw:.4}");
    }
    ExitCode::SUCCESS
}
