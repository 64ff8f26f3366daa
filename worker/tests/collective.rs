//! The TCP ring collective end to end: ranks are threads on loopback, each with its own
//! `DataPlaneListener`, as separate worker processes would be. Covers sums, broadcast and barrier
//! across world sizes and odd buffer lengths, and the failure contracts (shape mismatch, fencing,
//! lost and silent peers, abort). Faults are injected by a small TCP proxy between two ranks.
//!
//! Not here: the wire-format and plan unit tests (next to the code in `collective/`), and
//! throughput (`benches/allreduce.rs`).

use ringmaster_worker::collective::{
    CollectiveError, DataPlaneListener, RefuseReason, RingCollective, RingConfig, ring,
};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Barrier, mpsc};
use std::thread;
use std::time::Duration;

/// Generous guard against hangs; a passing run takes a small fraction of it.
const HANG_GUARD: Duration = Duration::from_secs(120);

/// Runs `f` on its own thread and fails the test if it has not finished within [`HANG_GUARD`].
fn no_hang<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    let worker = thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(HANG_GUARD) {
        Ok(v) => v,
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            // The body panicked: surface its message.
            match worker.join() {
                Err(p) => std::panic::resume_unwind(p),
                Ok(()) => unreachable!("the body returned without sending"),
            }
        }
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("collective test hung"),
    }
}

fn listeners(world: usize) -> Vec<DataPlaneListener> {
    (0..world)
        .map(|_| DataPlaneListener::bind("127.0.0.1:0").unwrap())
        .collect()
}

fn addrs(listeners: &[DataPlaneListener]) -> Vec<String> {
    listeners
        .iter()
        .map(|l| l.local_addr().to_string())
        .collect()
}

fn config(
    job: &str,
    generation: u64,
    rank: usize,
    peers: &[String],
    chunk_bytes: usize,
) -> RingConfig {
    RingConfig {
        connect_timeout: Duration::from_secs(60),
        chunk_bytes,
        ..RingConfig::new(job, generation, rank as u32, peers.to_vec())
    }
}

/// Connects `listeners.len()` ranks (one thread each) into a ring for `generation` of `job` and
/// runs `body(rank, ring)` on each; returns the bodies' results in rank order.
fn on_ring<T: Send>(
    listeners: &[DataPlaneListener],
    job: &str,
    generation: u64,
    chunk_bytes: usize,
    body: impl Fn(usize, RingCollective) -> T + Sync,
) -> Vec<T> {
    let peers = addrs(listeners);
    thread::scope(|s| {
        let handles: Vec<_> = listeners
            .iter()
            .enumerate()
            .map(|(rank, listener)| {
                let cfg = config(job, generation, rank, &peers, chunk_bytes);
                let body = &body;
                s.spawn(move || {
                    let ring = RingCollective::connect(listener, cfg).unwrap();
                    body(rank, ring)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Small integers, so every fp32 sum below is exact whatever the order of additions.
fn value(bucket: usize, rank: usize, i: usize) -> f32 {
    ((i * 31 + rank * 7 + bucket * 3) % 19) as f32 - 9.0
}

/// All-reduces buckets of `sizes` on `world` ranks and checks every element of every rank.
#[track_caller]
fn check_sums(world: usize, chunk_bytes: usize, sizes: &[usize]) {
    let ls = listeners(world);
    let results = on_ring(&ls, "sums", 1, chunk_bytes, |rank, mut ring| {
        assert_eq!(ring.rank() as usize, rank);
        assert_eq!(ring.world_size() as usize, world);
        sizes
            .iter()
            .enumerate()
            .map(|(b, &n)| {
                let mut buf: Vec<f32> = (0..n).map(|i| value(b, rank, i)).collect();
                ring.all_reduce_sum(&mut buf).unwrap();
                buf
            })
            .collect::<Vec<_>>()
    });
    for (rank, buckets) in results.iter().enumerate() {
        for (b, buf) in buckets.iter().enumerate() {
            assert_eq!(buf.len(), sizes[b]);
            for (i, &got) in buf.iter().enumerate() {
                let want: f32 = (0..world).map(|r| value(b, r, i)).sum();
                assert_eq!(
                    got, want,
                    "world {world}, rank {rank}, bucket {b} (len {}), element {i}",
                    sizes[b]
                );
            }
        }
    }
}

#[test]
fn all_reduce_sums_exactly_on_one_to_four_ranks() {
    no_hang(|| {
        for world in 1..=4usize {
            // Consecutive buckets of different sizes, including empty, shorter than the world,
            // not divisible by it, and large enough to need many chunks per segment.
            let sizes = [0, 1, 3, world.saturating_sub(1), 1_000_003, 5, 0, 4097];
            check_sums(world, 64 * 1024, &sizes);
        }
    });
}

#[test]
fn all_reduce_with_one_element_chunks() {
    // One element per chunk makes every piece a separate pipeline stage.
    no_hang(|| check_sums(3, 4, &[0, 1, 2, 3, 10, 257]));
}

#[test]
fn all_reduce_with_default_chunks() {
    no_hang(|| check_sums(2, ring::DEFAULT_CHUNK_BYTES, &[3_000_001, 17]));
}

#[test]
fn broadcast_copies_the_root_buffer_everywhere() {
    no_hang(|| {
        for world in [2, 3, 4] {
            for root in 1..world {
                let sizes = [0usize, 5, 100_003];
                let ls = listeners(world);
                let results = on_ring(&ls, "bcast", 3, 16 * 1024, |rank, mut ring| {
                    let mut out = Vec::new();
                    for (b, &n) in sizes.iter().enumerate() {
                        let mut buf: Vec<f32> = (0..n).map(|i| value(b, rank, i)).collect();
                        ring.broadcast(&mut buf, root as u32).unwrap();
                        out.push(buf);
                        // Interleaving another op checks that broadcast leaves the streams aligned.
                        let mut one = [rank as f32];
                        ring.all_reduce_sum(&mut one).unwrap();
                        assert_eq!(one[0], (0..world).sum::<usize>() as f32);
                    }
                    out
                });
                for (rank, bufs) in results.iter().enumerate() {
                    for (b, buf) in bufs.iter().enumerate() {
                        let want: Vec<f32> = (0..sizes[b]).map(|i| value(b, root, i)).collect();
                        assert!(
                            *buf == want,
                            "world {world}, root {root}, rank {rank}, bucket {b}"
                        );
                    }
                }
            }
        }
    });
}

#[test]
fn barrier_waits_for_every_rank() {
    no_hang(|| {
        let world = 4;
        let entered = AtomicUsize::new(0);
        let ls = listeners(world);
        let seen = on_ring(&ls, "barrier", 1, 1024, |_, mut ring| {
            let mut seen = Vec::new();
            for round in 1..=5 {
                entered.fetch_add(1, Ordering::SeqCst);
                ring.barrier().unwrap();
                // Nobody can have entered the next round before everyone leaves this one, and
                // everybody has entered this one.
                seen.push(entered.load(Ordering::SeqCst) >= round * world);
                ring.barrier().unwrap();
            }
            seen
        });
        assert!(seen.iter().flatten().all(|&ok| ok), "{seen:?}");
    });
}

#[test]
fn single_rank_needs_no_peers() {
    no_hang(|| {
        let l = DataPlaneListener::bind("127.0.0.1:0").unwrap();
        let mut ring =
            RingCollective::connect(&l, RingConfig::new("solo", 1, 0, vec!["unused".into()]))
                .unwrap();
        let mut buf = vec![1.5f32, -2.0, 3.0];
        ring.all_reduce_sum(&mut buf).unwrap();
        ring.broadcast(&mut buf, 0).unwrap();
        ring.barrier().unwrap();
        assert_eq!(buf, vec![1.5, -2.0, 3.0]);
        assert!(matches!(
            ring.broadcast(&mut buf, 1),
            Err(CollectiveError::InvalidArgument(_))
        ));
    });
}

#[test]
fn invalid_configs_are_rejected_before_any_io() {
    let l = DataPlaneListener::bind("127.0.0.1:0").unwrap();
    let peers = vec!["a:1".to_string(), "b:1".to_string()];
    let bad = [
        RingConfig::new("j", 1, 2, peers.clone()),
        RingConfig::new("j", 1, 0, vec![]),
        RingConfig::new("", 1, 0, peers.clone()),
        RingConfig::new("x".repeat(257), 1, 0, peers.clone()),
        RingConfig {
            chunk_bytes: 6,
            ..RingConfig::new("j", 1, 0, peers.clone())
        },
        RingConfig {
            io_timeout: Some(Duration::ZERO),
            ..RingConfig::new("j", 1, 0, peers.clone())
        },
    ];
    for cfg in bad {
        let what = format!("{cfg:?}");
        assert!(
            matches!(
                RingCollective::connect(&l, cfg),
                Err(CollectiveError::InvalidConfig(_))
            ),
            "{what}"
        );
    }
}

#[test]
fn shape_mismatch_is_reported_by_both_neighbours() {
    no_hang(|| {
        let ls = listeners(2);
        let results = on_ring(&ls, "shape", 1, 1024, |rank, mut ring| {
            let mut buf = vec![1.0f32; 10 + rank];
            let first = ring.all_reduce_sum(&mut buf);
            let after = ring.all_reduce_sum(&mut buf);
            (first, after)
        });
        for (rank, (first, after)) in results.into_iter().enumerate() {
            let (expected, got) = (10 + rank as u64, 11 - rank as u64);
            match first {
                Err(CollectiveError::ShapeMismatch {
                    peer,
                    expected: e,
                    got: g,
                }) => {
                    assert_eq!(
                        (peer, e, g),
                        (1 - rank as u32, expected, got),
                        "rank {rank}"
                    );
                }
                other => panic!("rank {rank}: {other:?}"),
            }
            assert!(
                matches!(after, Err(CollectiveError::Poisoned { .. })),
                "rank {rank}: {after:?}"
            );
        }

        // With three ranks only the odd one's neighbours see the headers disagree; the third
        // rank loses its peers instead of hanging.
        let ls = listeners(3);
        let results = on_ring(&ls, "shape3", 1, 1024, |rank, mut ring| {
            let mut buf = vec![1.0f32; if rank == 1 { 1001 } else { 1000 }];
            ring.all_reduce_sum(&mut buf)
        });
        assert!(matches!(
            results[1],
            Err(CollectiveError::ShapeMismatch {
                peer: 0,
                expected: 1001,
                got: 1000
            })
        ));
        assert!(matches!(
            results[2],
            Err(CollectiveError::ShapeMismatch {
                peer: 1,
                expected: 1000,
                got: 1001
            })
        ));
        assert!(
            matches!(results[0], Err(CollectiveError::PeerLost { .. })),
            "{:?}",
            results[0]
        );
    });
}

#[test]
fn different_operations_are_an_op_mismatch() {
    no_hang(|| {
        let ls = listeners(2);
        let results = on_ring(&ls, "ops", 1, 1024, |rank, mut ring| {
            let mut buf = vec![1.0f32; 8];
            if rank == 0 {
                ring.broadcast(&mut buf, 0)
            } else {
                ring.all_reduce_sum(&mut buf)
            }
        });
        for r in &results {
            assert!(
                matches!(r, Err(CollectiveError::OpMismatch { seq: 0, .. })),
                "{r:?}"
            );
        }
    });
}

#[test]
fn stale_generations_are_fenced_off() {
    no_hang(|| {
        let ls = listeners(2);
        let sums = on_ring(&ls, "fence", 5, 1024, |rank, mut ring| {
            let mut buf = vec![rank as f32 + 1.0; 3];
            ring.all_reduce_sum(&mut buf).unwrap();
            buf
        });
        assert_eq!(sums, vec![vec![3.0; 3], vec![3.0; 3]]);
        let peers = addrs(&ls);

        // A rank restarted with a fresh listener that was handed an old generation: rank 0's
        // listener has already joined generation 5, so it refuses the dial.
        let fresh = DataPlaneListener::bind("127.0.0.1:0").unwrap();
        let err = RingCollective::connect(&fresh, config("fence", 4, 1, &peers, 1024)).unwrap_err();
        assert!(
            matches!(&err, CollectiveError::StaleGeneration { job, generation: 4 } if job == "fence"),
            "{err:?}"
        );

        // This process itself was told about generation 5: joining 4 now is refused locally.
        let err = RingCollective::connect(&ls[0], config("fence", 4, 0, &peers, 1024)).unwrap_err();
        assert!(
            matches!(err, CollectiveError::StaleGeneration { generation: 4, .. }),
            "{err:?}"
        );

        // The same listeners serve the next generation.
        let sums = on_ring(&ls, "fence", 6, 1024, |rank, mut ring| {
            assert_eq!(ring.generation(), 6);
            let mut buf = vec![rank as f32 * 10.0; 2];
            ring.all_reduce_sum(&mut buf).unwrap();
            buf
        });
        assert_eq!(sums, vec![vec![10.0; 2], vec![10.0; 2]]);
    });
}

#[test]
fn world_size_mismatch_is_refused() {
    no_hang(|| {
        let ls = listeners(2);
        let peers = addrs(&ls);
        thread::scope(|s| {
            // Rank 0 of a two-rank generation waits for rank 1.
            let rank0 =
                s.spawn(|| RingCollective::connect(&ls[0], config("ws", 1, 0, &peers, 1024)));
            // A rank that believes the world has three ranks dials rank 0 as its successor.
            let stranger = DataPlaneListener::bind("127.0.0.1:0").unwrap();
            let three = vec![peers[0].clone(), "127.0.0.1:9".into(), "127.0.0.1:9".into()];
            let err =
                RingCollective::connect(&stranger, config("ws", 1, 2, &three, 1024)).unwrap_err();
            assert!(
                matches!(
                    err,
                    CollectiveError::Refused {
                        rank: 0,
                        reason: RefuseReason::WorldSizeMismatch
                    }
                ),
                "{err:?}"
            );
            // The refused stranger did not disturb the real group.
            let mut rank1 =
                RingCollective::connect(&ls[1], config("ws", 1, 1, &peers, 1024)).unwrap();
            let mut rank0 = rank0.join().unwrap().unwrap();
            let other = s.spawn(move || {
                let mut b = vec![2.0f32; 4];
                rank0.all_reduce_sum(&mut b).unwrap();
                b
            });
            let mut b = vec![5.0f32; 4];
            rank1.all_reduce_sum(&mut b).unwrap();
            assert_eq!(b, vec![7.0; 4]);
            assert_eq!(other.join().unwrap(), vec![7.0; 4]);
        });
    });
}

#[test]
fn one_listener_serves_two_jobs_at_once() {
    no_hang(|| {
        let ls = listeners(2);
        let (a, b) = thread::scope(|s| {
            let a = s.spawn(|| {
                on_ring(&ls, "job-a", 1, 1024, |rank, mut ring| {
                    let mut buf = vec![rank as f32 + 1.0; 5000];
                    ring.all_reduce_sum(&mut buf).unwrap();
                    buf[4999]
                })
            });
            let b = s.spawn(|| {
                on_ring(&ls, "job-b", 9, 1024, |rank, mut ring| {
                    let mut buf = vec![rank as f32 * 100.0; 7000];
                    ring.all_reduce_sum(&mut buf).unwrap();
                    buf[0]
                })
            });
            (a.join().unwrap(), b.join().unwrap())
        });
        assert_eq!(a, vec![3.0, 3.0]);
        assert_eq!(b, vec![100.0, 100.0]);
    });
}

/// What the proxy does to the bytes a dialer sends once it has forwarded `after` of them.
#[derive(Clone, Copy)]
enum Fault {
    /// Close both sides, as a crashed peer would.
    Close { after: usize },
    /// Keep both sides open and forward nothing more, as a hung peer would.
    Stall { after: usize },
    /// Forward everything.
    Forward,
}

/// A TCP proxy in front of `target`; returns the address to dial instead. Each accepted
/// connection (dial retries included) gets its own upstream connection and byte count; the
/// count of dialer bytes forwarded so far is reported on `progress`.
fn proxy(target: SocketAddr, fault: Fault, progress: Option<mpsc::Sender<usize>>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let Ok(upstream) = TcpStream::connect(target) else {
                return;
            };
            let (mut c_read, mut u_write) =
                (client.try_clone().unwrap(), upstream.try_clone().unwrap());
            let (mut u_read, mut c_write) = (upstream, client);
            let progress = progress.clone();
            thread::spawn(move || {
                let mut forwarded = 0usize;
                let mut buf = vec![0u8; 64 * 1024];
                let limit = match fault {
                    Fault::Close { after } | Fault::Stall { after } => after,
                    Fault::Forward => usize::MAX,
                };
                while forwarded < limit {
                    let want = buf.len().min(limit - forwarded);
                    let n = match c_read.read(&mut buf[..want]) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if u_write.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    forwarded += n;
                    if let Some(p) = &progress {
                        let _ = p.send(forwarded);
                    }
                }
                match fault {
                    Fault::Stall { .. } if forwarded >= limit => {
                        // Hold both sockets open, forwarding nothing, until the dialer gives up.
                        let mut sink = [0u8; 1];
                        let _ = u_write.read(&mut sink);
                    }
                    _ => {}
                }
                let _ = c_read.shutdown(Shutdown::Both);
                let _ = u_write.shutdown(Shutdown::Both);
            });
            thread::spawn(move || {
                let _ = std::io::copy(&mut u_read, &mut c_write);
                let _ = c_write.shutdown(Shutdown::Write);
            });
        }
    });
    addr
}

/// Two ranks where rank 1 reaches rank 0 through a proxy with `fault`; each rank runs `body`.
fn faulty_pair<T: Send>(
    fault: Fault,
    progress: Option<mpsc::Sender<usize>>,
    io_timeout: [Option<Duration>; 2],
    body: impl Fn(usize, RingCollective) -> T + Sync,
) -> Vec<T> {
    let ls = listeners(2);
    let direct = addrs(&ls);
    let via_proxy = vec![
        proxy(ls[0].local_addr(), fault, progress),
        direct[1].clone(),
    ];
    let peers = [direct, via_proxy];
    thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|rank| {
                let cfg = RingConfig {
                    io_timeout: io_timeout[rank],
                    ..config("faults", 1, rank, &peers[rank], 64 * 1024)
                };
                let (listener, body) = (&ls[rank], &body);
                s.spawn(move || body(rank, RingCollective::connect(listener, cfg).unwrap()))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn a_peer_dying_mid_operation_is_peer_lost() {
    no_hang(|| {
        // 16 MiB per rank; the link from rank 1 dies after 1 MiB of it.
        let results = faulty_pair(
            Fault::Close { after: 1 << 20 },
            None,
            [None, None],
            |rank, mut ring| {
                let mut buf = vec![rank as f32; 4 << 20];
                let first = ring.all_reduce_sum(&mut buf);
                (first, ring.all_reduce_sum(&mut buf))
            },
        );
        for (rank, (first, after)) in results.into_iter().enumerate() {
            assert!(
                matches!(first, Err(CollectiveError::PeerLost { rank: r, .. }) if r as usize == 1 - rank),
                "rank {rank}: {first:?}"
            );
            assert!(first.unwrap_err().retryable());
            assert!(
                matches!(after, Err(CollectiveError::Poisoned { .. })),
                "rank {rank}: {after:?}"
            );
        }
    });
}

#[test]
fn a_dropped_ring_is_peer_lost_for_the_survivors() {
    no_hang(|| {
        let ls = listeners(3);
        let results = on_ring(&ls, "drop", 1, 1024, |rank, mut ring| {
            let mut buf = vec![1.0f32; 100_000];
            ring.all_reduce_sum(&mut buf).unwrap();
            assert_eq!(buf[99_999], 3.0);
            if rank == 2 {
                drop(ring);
                return None;
            }
            Some(ring.all_reduce_sum(&mut buf))
        });
        assert!(
            matches!(
                results[0],
                Some(Err(CollectiveError::PeerLost { rank: 2, .. }))
            ),
            "{:?}",
            results[0]
        );
        assert!(
            matches!(results[1], Some(Err(CollectiveError::PeerLost { .. }))),
            "{:?}",
            results[1]
        );
    });
}

#[test]
fn a_silent_peer_times_out() {
    no_hang(|| {
        // Rank 1's bytes stop arriving after 256 KiB, but its connection stays open; only rank 0
        // has an io timeout.
        let results = faulty_pair(
            Fault::Stall { after: 256 << 10 },
            None,
            [Some(Duration::from_millis(300)), None],
            |_, mut ring| {
                let mut buf = vec![1.0f32; 4 << 20];
                ring.all_reduce_sum(&mut buf)
            },
        );
        assert!(
            matches!(results[0], Err(CollectiveError::Timeout { rank: 1, after }) if after == Duration::from_millis(300)),
            "{:?}",
            results[0]
        );
        // Rank 0 gave up and closed the ring, so rank 1 is not left hanging either.
        assert!(
            matches!(results[1], Err(CollectiveError::PeerLost { rank: 0, .. })),
            "{:?}",
            results[1]
        );
    });
}

#[test]
fn abort_unblocks_a_rank_waiting_for_a_silent_peer() {
    no_hang(|| {
        // Rank 1 joins but never issues an operation, so rank 0 waits for its header forever.
        // Rank 0 is the one behind the proxy here, which reports once rank 0 has sent more than
        // its handshake, i.e. it has entered the operation.
        let (progress_tx, progress) = mpsc::channel();
        let ls = listeners(2);
        let direct = addrs(&ls);
        let via_proxy = vec![
            direct[0].clone(),
            proxy(ls[1].local_addr(), Fault::Forward, Some(progress_tx)),
        ];
        let hello_len = 24 + "abort".len();
        let entered = Barrier::new(2);
        thread::scope(|s| {
            let rank1 = s.spawn(|| {
                let ring =
                    RingCollective::connect(&ls[1], config("abort", 1, 1, &direct, 1024)).unwrap();
                entered.wait();
                ring
            });
            let mut rank0 =
                RingCollective::connect(&ls[0], config("abort", 1, 0, &via_proxy, 1024)).unwrap();
            let handle = rank0.abort_handle();
            let waiter = s.spawn(move || {
                let mut buf = vec![1.0f32; 1000];
                let first = rank0.all_reduce_sum(&mut buf);
                (first, rank0.barrier())
            });
            while progress.recv().unwrap() <= hello_len {}
            handle.abort();
            assert!(handle.is_aborted());
            let (first, after) = waiter.join().unwrap();
            assert!(matches!(first, Err(CollectiveError::Aborted)), "{first:?}");
            assert!(!first.unwrap_err().retryable());
            assert!(matches!(after, Err(CollectiveError::Aborted)), "{after:?}");

            // The abort closed rank 0's side of the ring, so its idle peer fails at once too.
            entered.wait();
            let mut rank1 = rank1.join().unwrap();
            let mut buf = vec![1.0f32; 1000];
            let err = rank1.all_reduce_sum(&mut buf).unwrap_err();
            assert!(
                matches!(err, CollectiveError::PeerLost { rank: 0, .. }),
                "{err:?}"
            );
        });
    });
}

/// The tensor-level ring: each rank sums tensors through [`RingBackend`] as the trainer does
/// (reduced in place in the tensor's own memory), and broadcasts reach every rank.
#[test]
fn the_ring_backend_reduces_and_broadcasts_tensors_in_place() {
    use ringmaster_worker::collective::{Collective, RingBackend};
    use tch::{Device, Kind, Tensor};
    let world = 3;
    let ls = listeners(world);
    let results = on_ring(&ls, "tensors", 1, 1024, |rank, ring| {
        let mut c = RingBackend::new(ring);
        let n = 1000;
        let mut t = Tensor::from_slice(&(0..n).map(|i| value(0, rank, i)).collect::<Vec<_>>());
        let before = t.data_ptr();
        c.all_reduce_sum(&mut t).unwrap();
        assert_eq!(t.data_ptr(), before, "reduced in place");
        let mut b = Tensor::full([7], rank as f64, (Kind::Float, Device::Cpu));
        c.broadcast(&mut b, 2).unwrap();
        (
            Vec::<f32>::try_from(&t).unwrap(),
            Vec::<f32>::try_from(&b).unwrap(),
        )
    });
    let expect: Vec<f32> = (0..1000)
        .map(|i| (0..world).map(|r| value(0, r, i)).sum())
        .collect();
    for (sums, bcast) in results {
        assert_eq!(sums, expect);
        assert_eq!(bcast, vec![2.0; 7]);
    }
}
