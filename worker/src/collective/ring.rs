//! The CPU collective backend: ranks form a ring of TCP connections (rank r sends to r+1 and
//! receives from r−1) and run chunked, pipelined ring algorithms over it.
//!
//! Not here: accepting connections, the handshake and generation fencing (`listener.rs`), and
//! same-host shared-memory reduction.
//!
//! Each operation starts with a fixed 32-byte header that every rank sends to its successor
//! before reading its predecessor's, so ranks that disagree on the operation or the buffer length
//! fail with `OpMismatch` / `ShapeMismatch` instead of exchanging garbage:
//!
//! ```text
//! magic "RMOP" | op u8 | 3 zero bytes | root u32 | seq u64 | elements u64 | chunk elements u32
//! ```
//!
//! Raw little-endian f32 chunks follow, in an order both ends derive from the header alone. Each
//! operation spawns one scoped sender thread that writes to the successor while the calling thread
//! reads from the predecessor, so blocking sockets cannot deadlock and chunk i+1 travels while
//! chunk i is reduced. Chunks move between the two threads as `&mut [f32]` through channels: the
//! thread holding a chunk is the only one that can touch it.

use super::listener::{self, DataPlaneListener, Hello, MAX_JOB_ID_LEN};
use super::{AbortHandle, CollectiveError, lock_ignoring_poison};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

#[cfg(not(target_endian = "little"))]
compile_error!("the ring backend writes f32 in native order and assumes a little-endian host");

/// Default chunk size, tuned with `scripts/bench allreduce` on loopback: each chunk costs a
/// hand-off between the two threads of an operation and the thread wake-ups that follow, about
/// 30 µs on a 2-core VM, so 4 MiB chunks beat 256 KiB–2 MiB ones by 10–40% at 2–4 ranks. On
/// links much slower than loopback, smaller chunks overlap the reduction better; see
/// [`RingConfig::chunk_bytes`].
pub const DEFAULT_CHUNK_BYTES: usize = 4 << 20;
/// Largest accepted chunk size; bounds the per-communicator scratch buffer.
pub const MAX_CHUNK_BYTES: usize = 64 << 20;
const OP_MAGIC: [u8; 4] = *b"RMOP";
const OP_HEADER_LEN: usize = 32;

/// Everything a rank needs to join one generation of a job's ring.
#[derive(Debug, Clone)]
pub struct RingConfig {
    /// Job id, at most [`MAX_JOB_ID_LEN`] bytes.
    pub job_id: String,
    /// Generation of the group; older generations are fenced off by the listeners.
    pub generation: u64,
    /// This rank, in `0..peers.len()`.
    pub rank: u32,
    /// Data-plane addresses (`host:port`) of all ranks, indexed by rank; `peers.len()` is the
    /// world size. This rank's own entry is not used.
    pub peers: Vec<String>,
    /// How long to keep dialling the successor and waiting for the predecessor.
    pub connect_timeout: Duration,
    /// A peer silent for this long during an operation fails it with `Timeout`; `None` waits
    /// forever (a dead peer is still noticed by EOF or reset, and `abort` always works).
    pub io_timeout: Option<Duration>,
    /// Pipelining unit in bytes (a multiple of 4, at most [`MAX_CHUNK_BYTES`]); all ranks must
    /// agree.
    pub chunk_bytes: usize,
}

impl RingConfig {
    /// A config with a 30 s connect timeout, no io timeout and [`DEFAULT_CHUNK_BYTES`].
    pub fn new(job_id: impl Into<String>, generation: u64, rank: u32, peers: Vec<String>) -> Self {
        RingConfig {
            job_id: job_id.into(),
            generation,
            rank,
            peers,
            connect_timeout: Duration::from_secs(30),
            io_timeout: None,
            chunk_bytes: DEFAULT_CHUNK_BYTES,
        }
    }

    fn validate(&self) -> Result<(), CollectiveError> {
        let bad = |m: String| Err(CollectiveError::InvalidConfig(m));
        if self.job_id.is_empty() || self.job_id.len() > MAX_JOB_ID_LEN {
            return bad(format!(
                "job id must be 1 to {MAX_JOB_ID_LEN} bytes, got {}",
                self.job_id.len()
            ));
        }
        if self.peers.is_empty() || u32::try_from(self.peers.len()).is_err() {
            return bad(format!("peer list has {} entries", self.peers.len()));
        }
        if self.rank as usize >= self.peers.len() {
            return bad(format!(
                "rank {} is outside a world of {}",
                self.rank,
                self.peers.len()
            ));
        }
        if self.chunk_bytes < 4
            || self.chunk_bytes > MAX_CHUNK_BYTES
            || !self.chunk_bytes.is_multiple_of(4)
        {
            return bad(format!(
                "chunk size {} is not a multiple of 4 in 4..={MAX_CHUNK_BYTES}",
                self.chunk_bytes
            ));
        }
        if self.io_timeout == Some(Duration::ZERO) {
            return bad("io timeout must be positive".into());
        }
        Ok(())
    }
}

/// The operation a header announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    AllReduceSum,
    Broadcast { root: u32 },
    Barrier,
}

impl Op {
    fn code(self) -> u8 {
        match self {
            Op::AllReduceSum => 1,
            Op::Broadcast { .. } => 2,
            Op::Barrier => 3,
        }
    }

    fn root(self) -> u32 {
        match self {
            Op::Broadcast { root } => root,
            Op::AllReduceSum | Op::Barrier => 0,
        }
    }
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Op::AllReduceSum => f.write_str("all_reduce_sum"),
            Op::Broadcast { root } => write!(f, "broadcast from rank {root}"),
            Op::Barrier => f.write_str("barrier"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct OpHeader {
    op: Op,
    seq: u64,
    len: u64,
    chunk_elems: u32,
}

impl OpHeader {
    fn encode(&self) -> [u8; OP_HEADER_LEN] {
        let mut b = [0u8; OP_HEADER_LEN];
        b[0..4].copy_from_slice(&OP_MAGIC);
        b[4] = self.op.code();
        b[8..12].copy_from_slice(&self.op.root().to_le_bytes());
        b[12..20].copy_from_slice(&self.seq.to_le_bytes());
        b[20..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..32].copy_from_slice(&self.chunk_elems.to_le_bytes());
        b
    }

    fn decode(b: &[u8; OP_HEADER_LEN], from: u32) -> Result<OpHeader, CollectiveError> {
        let protocol = |detail: String| CollectiveError::Protocol { rank: from, detail };
        if b[0..4] != OP_MAGIC || b[5..8] != [0, 0, 0] {
            return Err(protocol("bad operation header".into()));
        }
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(a)
        };
        let root = u32_at(8);
        let op = match (b[4], root) {
            (1, 0) => Op::AllReduceSum,
            (2, root) => Op::Broadcast { root },
            (3, 0) => Op::Barrier,
            (code, root) => {
                return Err(protocol(format!("unknown operation {code} (root {root})")));
            }
        };
        Ok(OpHeader {
            op,
            seq: u64_at(12),
            len: u64_at(20),
            chunk_elems: u32_at(28),
        })
    }

    /// Checks that the predecessor's header describes the same operation as ours.
    fn check_matches(&self, theirs: &OpHeader, peer: u32) -> Result<(), CollectiveError> {
        if theirs.seq != self.seq {
            return Err(CollectiveError::Protocol {
                rank: peer,
                detail: format!(
                    "operation {} arrived while expecting {}",
                    theirs.seq, self.seq
                ),
            });
        }
        if theirs.op != self.op {
            return Err(CollectiveError::OpMismatch {
                peer,
                seq: self.seq,
                expected: self.op.to_string(),
                got: theirs.op.to_string(),
            });
        }
        if theirs.chunk_elems != self.chunk_elems {
            return Err(CollectiveError::OpMismatch {
                peer,
                seq: self.seq,
                expected: format!("{} in chunks of {} elements", self.op, self.chunk_elems),
                got: format!("{} in chunks of {} elements", theirs.op, theirs.chunk_elems),
            });
        }
        if theirs.len != self.len {
            return Err(CollectiveError::ShapeMismatch {
                peer,
                expected: self.len,
                got: theirs.len,
            });
        }
        Ok(())
    }
}

/// The two connections of a rank; shared with the abort hook, which shuts them down.
struct Links {
    /// To the successor; written only.
    next: TcpStream,
    next_rank: u32,
    /// From the predecessor; read only.
    prev: TcpStream,
    prev_rank: u32,
}

impl Links {
    /// Unblocks both threads of an operation and tells the neighbours this ring is finished.
    fn shutdown(&self) {
        let _ = self.next.shutdown(Shutdown::Both);
        let _ = self.prev.shutdown(Shutdown::Both);
    }
}

/// A rank's membership in one generation of a job's TCP ring.
pub struct RingCollective {
    rank: u32,
    world_size: u32,
    generation: u64,
    /// `None` for a single-rank world, which needs no sockets.
    links: Option<Arc<Links>>,
    chunk_elems: usize,
    io_timeout: Option<Duration>,
    /// Operations issued so far; checked against the peers' headers.
    seq: u64,
    abort: AbortHandle,
    /// Set by the first failed operation; later ones fail with `Poisoned`.
    failure: Option<String>,
    /// Receives a chunk before it is added into the caller's buffer; as long as the widest
    /// piece seen so far.
    scratch: Vec<f32>,
}

impl std::fmt::Debug for RingCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingCollective")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("generation", &self.generation)
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

impl RingCollective {
    /// Joins the ring: registers the generation with `listener` (which fences off older ones),
    /// dials the successor and waits for the predecessor, both within `cfg.connect_timeout`.
    /// Every rank of the generation must call this; with one rank it returns at once.
    pub fn connect(
        listener: &DataPlaneListener,
        cfg: RingConfig,
    ) -> Result<RingCollective, CollectiveError> {
        cfg.validate()?;
        let world_size = cfg.peers.len() as u32;
        let rank = cfg.rank;
        let deadline = Instant::now() + cfg.connect_timeout;
        let mut ring = RingCollective {
            rank,
            world_size,
            generation: cfg.generation,
            links: None,
            chunk_elems: cfg.chunk_bytes / 4,
            io_timeout: cfg.io_timeout,
            seq: 0,
            abort: AbortHandle::new(),
            failure: None,
            scratch: Vec::new(),
        };
        if world_size == 1 {
            listener.register(&cfg.job_id, cfg.generation, 1, None)?;
            return Ok(ring);
        }
        let next_rank = (rank + 1) % world_size;
        let prev_rank = (rank + world_size - 1) % world_size;
        listener.register(&cfg.job_id, cfg.generation, world_size, Some(prev_rank))?;
        let hello = Hello {
            job: cfg.job_id.clone(),
            generation: cfg.generation,
            rank,
            world_size,
        };
        let connected = listener::dial(
            &cfg.peers[next_rank as usize],
            next_rank,
            &hello,
            deadline,
            cfg.connect_timeout,
        )
        .and_then(|next| {
            let prev = listener.take_accepted(
                &cfg.job_id,
                cfg.generation,
                prev_rank,
                deadline,
                cfg.connect_timeout,
            )?;
            Ok((next, prev))
        })
        .and_then(|(next, prev)| {
            let setup = (|| {
                next.set_nodelay(true)?;
                prev.set_nodelay(true)?;
                next.set_write_timeout(cfg.io_timeout)?;
                prev.set_read_timeout(cfg.io_timeout)
            })();
            setup.map_err(|source| CollectiveError::Local { source })?;
            Ok((next, prev))
        });
        let (next, prev) = match connected {
            Ok(pair) => pair,
            Err(e) => {
                listener.withdraw(&cfg.job_id, cfg.generation);
                return Err(e);
            }
        };
        let links = Arc::new(Links {
            next,
            next_rank,
            prev,
            prev_rank,
        });
        let weak = Arc::downgrade(&links);
        ring.abort.on_abort(Box::new(move || {
            if let Some(links) = weak.upgrade() {
                links.shutdown();
            }
        }));
        ring.links = Some(links);
        tracing::debug!(job = %cfg.job_id, generation = cfg.generation, rank, world_size,
            "joined the data-plane ring");
        Ok(ring)
    }

    /// The generation this ring belongs to.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// A handle that aborts this ring from any thread (see [`AbortHandle`]).
    pub fn abort_handle(&self) -> AbortHandle {
        self.abort.clone()
    }

    /// Runs one operation: header exchange, then the pipelined data plan. Any failure poisons the
    /// ring and shuts its sockets so the neighbours fail promptly too.
    fn run(&mut self, op: Op, buf: &mut [f32]) -> Result<(), CollectiveError> {
        if self.abort.is_aborted() {
            return Err(CollectiveError::Aborted);
        }
        if let Some(cause) = &self.failure {
            return Err(CollectiveError::Poisoned {
                cause: cause.clone(),
            });
        }
        let Some(links) = self.links.clone() else {
            return Ok(());
        };
        let header = OpHeader {
            op,
            seq: self.seq,
            len: buf.len() as u64,
            chunk_elems: self.chunk_elems as u32,
        };
        self.seq += 1;
        let failures = Failures {
            abort: &self.abort,
            io_timeout: self.io_timeout,
            links: &links,
            first: Mutex::new(None),
        };
        let result = exchange_headers(&links, &failures, &header).and_then(|()| {
            let plan = match op {
                Op::AllReduceSum | Op::Barrier => Plan::all_reduce(
                    buf.len(),
                    self.world_size as usize,
                    self.rank as usize,
                    self.chunk_elems,
                ),
                Op::Broadcast { root } => Plan::broadcast(
                    buf.len(),
                    self.chunk_elems,
                    self.rank == root,
                    links.next_rank != root,
                ),
            };
            // Grown on demand: small operations should not pay for a full chunk.
            let widest = plan.piece_lens.iter().copied().max().unwrap_or(0);
            if self.scratch.len() < widest {
                self.scratch.resize(widest, 0.0);
            }
            pipeline(&links, &failures, buf, &plan, &mut self.scratch)
        });
        if let Err(e) = &result {
            self.failure = Some(e.to_string());
            links.shutdown();
        }
        result
    }
}

impl Drop for RingCollective {
    fn drop(&mut self) {
        // The abort hook only holds a weak reference, so the sockets close with us; shutting
        // them explicitly also covers an abort hook that is running right now.
        if let Some(links) = &self.links {
            links.shutdown();
        }
    }
}

/// The host transport's operations on fp32 slices; [`RingBackend`](super::RingBackend) puts the
/// tensor-level [`Collective`](super::Collective) on top.
impl RingCollective {
    /// This rank, in `0..world_size()`.
    pub fn rank(&self) -> u32 {
        self.rank
    }

    /// Number of ranks in the ring.
    pub fn world_size(&self) -> u32 {
        self.world_size
    }

    /// Replaces `buf` on every rank with the element-wise sum over all ranks.
    pub fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        self.run(Op::AllReduceSum, buf)
    }

    /// Copies `buf` of rank `root` into `buf` on every other rank.
    pub fn broadcast(&mut self, buf: &mut [f32], root: u32) -> Result<(), CollectiveError> {
        if root >= self.world_size {
            return Err(CollectiveError::InvalidArgument(format!(
                "broadcast root {root} is outside a world of {}",
                self.world_size
            )));
        }
        self.run(Op::Broadcast { root }, buf)
    }

    /// Returns once every rank has entered the barrier.
    pub fn barrier(&mut self) -> Result<(), CollectiveError> {
        // The reduced value reaches a rank only after passing through every other rank, so
        // completing this all-reduce means everybody has entered.
        let mut token = [1.0f32];
        self.run(Op::Barrier, &mut token)?;
        if token[0] != self.world_size as f32 {
            let rank = self.links.as_ref().map_or(self.rank, |l| l.prev_rank);
            return Err(CollectiveError::Protocol {
                rank,
                detail: format!(
                    "barrier counted {} ranks in a world of {}",
                    token[0], self.world_size
                ),
            });
        }
        Ok(())
    }
}

/// Turns socket errors into contract errors and keeps the first failure of an operation: once
/// one thread fails it shuts the links, and the other thread's resulting error is only an echo.
struct Failures<'a> {
    abort: &'a AbortHandle,
    io_timeout: Option<Duration>,
    links: &'a Links,
    first: Mutex<Option<CollectiveError>>,
}

impl Failures<'_> {
    fn io(&self, rank: u32, e: io::Error) -> CollectiveError {
        if self.abort.is_aborted() {
            CollectiveError::Aborted
        } else if matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            CollectiveError::Timeout {
                rank,
                after: self.io_timeout.unwrap_or_default(),
            }
        } else {
            CollectiveError::PeerLost { rank, source: e }
        }
    }

    fn record(&self, e: CollectiveError) {
        let mut first = lock_ignoring_poison(&self.first);
        if first.is_none() {
            *first = Some(e);
        }
        drop(first);
        self.links.shutdown();
    }

    fn take(&self) -> Option<CollectiveError> {
        lock_ignoring_poison(&self.first).take()
    }
}

fn exchange_headers(
    links: &Links,
    failures: &Failures<'_>,
    mine: &OpHeader,
) -> Result<(), CollectiveError> {
    // Written before reading: 32 bytes always fit the socket buffer, so no rank waits for
    // another to read first, and both ends of a disagreement see the other's header.
    (&links.next)
        .write_all(&mine.encode())
        .map_err(|e| failures.io(links.next_rank, e))?;
    let mut theirs = [0u8; OP_HEADER_LEN];
    (&links.prev)
        .read_exact(&mut theirs)
        .map_err(|e| failures.io(links.prev_rank, e))?;
    let theirs = OpHeader::decode(&theirs, links.prev_rank)?;
    mine.check_matches(&theirs, links.prev_rank)
}

/// One receive of an operation's plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Step {
    piece: usize,
    /// Add the received chunk into the piece (reduce-scatter) instead of overwriting it.
    reduce: bool,
    /// Send the piece on to the successor once received.
    forward: bool,
}

/// The data movement of one operation on one rank. The buffer is cut into consecutive pieces of
/// at most one chunk each; `initial` pieces are sent before anything is received, then `steps`
/// run in order. Both ends of a link derive the same order from the same header.
#[derive(Debug, Default, PartialEq, Eq)]
struct Plan {
    piece_lens: Vec<usize>,
    initial: Vec<usize>,
    steps: Vec<Step>,
}

impl Plan {
    /// Reduce-scatter then all-gather: 2(W−1) ring steps over W segments. At step t rank r sends
    /// segment r−t and receives segment r−t−1, which it sends at step t+1; the first W−1 steps
    /// add what they receive, the rest overwrite with finished sums.
    fn all_reduce(len: usize, world: usize, rank: usize, chunk: usize) -> Plan {
        let mut plan = Plan::default();
        let mut segment_pieces = Vec::with_capacity(world);
        let (base, extra) = (len / world, len % world);
        for s in 0..world {
            let first = plan.piece_lens.len();
            plan.push_chunks(base + usize::from(s < extra), chunk);
            segment_pieces.push(first..plan.piece_lens.len());
        }
        let steps = 2 * (world - 1);
        if steps == 0 {
            return plan;
        }
        plan.initial = segment_pieces[rank].clone().collect();
        for t in 0..steps {
            let segment = (rank + 2 * world - t - 1) % world;
            for piece in segment_pieces[segment].clone() {
                plan.steps.push(Step {
                    piece,
                    reduce: t < world - 1,
                    forward: t + 1 < steps,
                });
            }
        }
        plan
    }

    /// A chain from the root around the ring; the root's predecessor does not forward.
    fn broadcast(len: usize, chunk: usize, is_root: bool, forward: bool) -> Plan {
        let mut plan = Plan::default();
        plan.push_chunks(len, chunk);
        let pieces = 0..plan.piece_lens.len();
        if is_root {
            plan.initial = pieces.collect();
        } else {
            plan.steps = pieces
                .map(|piece| Step {
                    piece,
                    reduce: false,
                    forward,
                })
                .collect();
        }
        plan
    }

    fn push_chunks(&mut self, mut len: usize, chunk: usize) {
        while len > 0 {
            let n = len.min(chunk);
            self.piece_lens.push(n);
            len -= n;
        }
    }
}

/// Executes `plan` on `buf`: a scoped sender thread writes pieces to the successor as they are
/// handed to it, while this thread receives from the predecessor.
fn pipeline(
    links: &Links,
    failures: &Failures<'_>,
    buf: &mut [f32],
    plan: &Plan,
    scratch: &mut [f32],
) -> Result<(), CollectiveError> {
    let mut slots: Vec<Option<&mut [f32]>> = Vec::with_capacity(plan.piece_lens.len());
    let mut rest = buf;
    for &n in &plan.piece_lens {
        let (piece, tail) = rest.split_at_mut(n);
        slots.push(Some(piece));
        rest = tail;
    }
    let completed = thread::scope(|scope| {
        let (to_sender, sender_rx) = mpsc::channel::<(usize, &mut [f32])>();
        let (sender_tx, from_sender) = mpsc::channel::<(usize, &mut [f32])>();
        let sender = thread::Builder::new()
            .name("rm-ring-send".into())
            .spawn_scoped(scope, move || {
                let mut next = &links.next;
                for (id, piece) in sender_rx {
                    if let Err(e) = next.write_all(bytemuck::cast_slice(piece)) {
                        failures.record(failures.io(links.next_rank, e));
                        return;
                    }
                    if sender_tx.send((id, piece)).is_err() {
                        return;
                    }
                }
            });
        let sender = match sender {
            Ok(s) => s,
            Err(source) => {
                failures.record(CollectiveError::Local { source });
                return false;
            }
        };
        let received = receive(
            links,
            failures,
            plan,
            &mut slots,
            scratch,
            &to_sender,
            &from_sender,
        );
        drop(to_sender);
        if sender.join().is_err() {
            // The sender only writes and sends on channels; a panic there is a bug, not input.
            failures.record(CollectiveError::Poisoned {
                cause: "ring sender thread panicked".into(),
            });
            return false;
        }
        received
    });
    match failures.take() {
        Some(e) => Err(e),
        None if completed => Ok(()),
        None => Err(CollectiveError::Poisoned {
            cause: "ring sender stopped without an error".into(),
        }),
    }
}

/// The receiving half of [`pipeline`]; returns false after a failure (recorded in `failures`).
fn receive<'b>(
    links: &Links,
    failures: &Failures<'_>,
    plan: &Plan,
    slots: &mut [Option<&'b mut [f32]>],
    scratch: &mut [f32],
    to_sender: &mpsc::Sender<(usize, &'b mut [f32])>,
    from_sender: &mpsc::Receiver<(usize, &'b mut [f32])>,
) -> bool {
    for &id in &plan.initial {
        if let Some(piece) = slots[id].take()
            && to_sender.send((id, piece)).is_err()
        {
            return false;
        }
    }
    let mut prev = &links.prev;
    for step in &plan.steps {
        // The piece may still be on its way out from an earlier step.
        let piece = loop {
            if let Some(piece) = slots[step.piece].take() {
                break piece;
            }
            match from_sender.recv() {
                Ok((id, piece)) => slots[id] = Some(piece),
                Err(_) => return false,
            }
        };
        let read = if step.reduce {
            let incoming = &mut scratch[..piece.len()];
            prev.read_exact(bytemuck::cast_slice_mut(incoming))
                .map(|()| add_into(piece, incoming))
        } else {
            prev.read_exact(bytemuck::cast_slice_mut(piece))
        };
        if let Err(e) = read {
            failures.record(failures.io(links.prev_rank, e));
            return false;
        }
        if step.forward && to_sender.send((step.piece, piece)).is_err() {
            return false;
        }
    }
    true
}

fn add_into(acc: &mut [f32], incoming: &[f32]) {
    for (a, b) in acc.iter_mut().zip(incoming) {
        *a += *b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn op_header_round_trips_and_rejects_garbage() {
        let h = OpHeader {
            op: Op::Broadcast { root: 3 },
            seq: 41,
            len: 1_000_003,
            chunk_elems: 65536,
        };
        assert_eq!(OpHeader::decode(&h.encode(), 1).unwrap(), h);
        let mut bad = h.encode();
        bad[4] = 9;
        assert!(matches!(
            OpHeader::decode(&bad, 1),
            Err(CollectiveError::Protocol { rank: 1, .. })
        ));
        let mut bad = h.encode();
        bad[0] = 0;
        assert!(OpHeader::decode(&bad, 1).is_err());
    }

    #[test]
    fn header_checks_name_the_broken_contract() {
        let mine = OpHeader {
            op: Op::AllReduceSum,
            seq: 2,
            len: 10,
            chunk_elems: 4,
        };
        let other = |f: fn(&mut OpHeader)| {
            let mut h = mine;
            f(&mut h);
            mine.check_matches(&h, 7)
        };
        assert!(other(|_| {}).is_ok());
        assert!(matches!(
            other(|h| h.len = 11),
            Err(CollectiveError::ShapeMismatch {
                peer: 7,
                expected: 10,
                got: 11
            })
        ));
        assert!(matches!(
            other(|h| h.op = Op::Barrier),
            Err(CollectiveError::OpMismatch {
                peer: 7,
                seq: 2,
                ..
            })
        ));
        assert!(matches!(
            other(|h| h.chunk_elems = 8),
            Err(CollectiveError::OpMismatch { .. })
        ));
        assert!(matches!(
            other(|h| h.seq = 3),
            Err(CollectiveError::Protocol { rank: 7, .. })
        ));
    }

    /// Simulates the plans of all ranks with in-memory "links" and checks that every rank ends
    /// with the sum, which also proves that neighbours agree on the order of pieces.
    #[track_caller]
    fn check_all_reduce_plan(len: usize, world: usize, chunk: usize) {
        let plans: Vec<Plan> = (0..world)
            .map(|r| Plan::all_reduce(len, world, r, chunk))
            .collect();
        for p in &plans {
            assert_eq!(p.piece_lens.iter().sum::<usize>(), len);
            assert!(p.piece_lens.iter().all(|&n| (1..=chunk).contains(&n)));
        }
        let mut bufs: Vec<Vec<f64>> = (0..world)
            .map(|r| (0..len).map(|i| (i * world + r) as f64).collect())
            .collect();
        let offsets = |p: &Plan| {
            let mut o = vec![0];
            for n in &p.piece_lens {
                o.push(o.last().unwrap() + n);
            }
            o
        };
        let offs = offsets(&plans[0]);
        // What each rank sends, in order: initial pieces, then forwarded steps.
        let mut sent: Vec<std::collections::VecDeque<Vec<f64>>> = vec![Default::default(); world];
        let mut cursor = vec![0usize; world];
        for r in 0..world {
            for &id in &plans[r].initial {
                sent[r].push_back(bufs[r][offs[id]..offs[id + 1]].to_vec());
            }
        }
        // Run ranks round-robin until all plans are done; each step consumes the predecessor's
        // next piece.
        loop {
            let mut progressed = false;
            for r in 0..world {
                let prev = (r + world - 1) % world;
                if cursor[r] < plans[r].steps.len() {
                    let Some(data) = sent[prev].pop_front() else {
                        continue;
                    };
                    let step = plans[r].steps[cursor[r]];
                    let range = offs[step.piece]..offs[step.piece + 1];
                    assert_eq!(data.len(), range.len());
                    for (a, b) in bufs[r][range.clone()].iter_mut().zip(&data) {
                        if step.reduce {
                            *a += b;
                        } else {
                            *a = *b;
                        }
                    }
                    if step.forward {
                        sent[r].push_back(bufs[r][range].to_vec());
                    }
                    cursor[r] += 1;
                    progressed = true;
                }
            }
            if !progressed {
                break;
            }
        }
        for r in 0..world {
            assert_eq!(cursor[r], plans[r].steps.len(), "rank {r} stalled");
            assert!(sent[r].is_empty(), "rank {r} sent pieces nobody read");
            for (i, &got) in bufs[r].iter().enumerate() {
                let want: f64 = (0..world).map(|q| (i * world + q) as f64).sum();
                assert_eq!(got, want, "rank {r} element {i}");
            }
        }
    }

    #[test]
    fn all_reduce_plans_sum_on_every_rank() {
        for world in 1..=5 {
            for len in [0, 1, 2, 3, 4, 5, 7, 16, 33] {
                for chunk in [1, 2, 3, 8] {
                    check_all_reduce_plan(len, world, chunk);
                }
            }
        }
    }

    #[test]
    fn broadcast_plan_chains_from_the_root() {
        let root = Plan::broadcast(10, 4, true, true);
        assert_eq!(root.piece_lens, vec![4, 4, 2]);
        assert_eq!(root.initial, vec![0, 1, 2]);
        assert!(root.steps.is_empty());
        let last = Plan::broadcast(10, 4, false, false);
        assert!(last.initial.is_empty());
        assert_eq!(last.steps.len(), 3);
        assert!(last.steps.iter().all(|s| !s.reduce && !s.forward));
        assert_eq!(Plan::broadcast(0, 4, false, true), Plan::default());
    }
}
