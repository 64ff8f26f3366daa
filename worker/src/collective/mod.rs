//! Collective operations among the ranks of one training job: the [`Collective`] trait the trainer
//! calls, the [`CollectiveError`] every backend reports, and the [`AbortHandle`] the agent uses to
//! unblock a rank when the coordinator abandons a generation.
//!
//! The trait works on tensors: a caller hands over a whole bucket (one flat f32 tensor on the
//! model's device) and the backend decides how it travels. Backends own their staging: the
//! [`RingBackend`] reduces CPU tensors in place and stages device tensors through one pinned host
//! buffer (one bulk copy each way per bucket); a device-native backend (NCCL) reduces device
//! memory where it lies. [`ring`] is the host transport under the ring backend (a chunked,
//! pipelined ring over TCP) and [`listener`] is the data-plane port it accepts connections on. No
//! backend talks to the coordinator or the store: ranks, peers and generations are handed in by
//! the agent, which picks the backend.

pub mod listener;
pub mod nccl;
pub mod ring;
mod ring_backend;

pub use listener::DataPlaneListener;
pub use nccl::{NcclBackend, NcclOptions, WireDtype};
pub use ring::{RingCollective, RingConfig};
pub use ring_backend::RingBackend;

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tch::Tensor;

/// Collective operations among the `world_size` ranks of one generation of a job, on tensors.
///
/// Every rank must issue the same operations in the same order with tensors of the same length;
/// backends check this and report [`CollectiveError::ShapeMismatch`] or
/// [`CollectiveError::OpMismatch`] instead of producing garbage. After any error the communicator
/// is unusable ([`CollectiveError::Poisoned`]): the agent re-forms the group under a new generation.
///
/// Tensors are one-dimensional, contiguous and fp32, on any device the backend supports; they are
/// reduced in place, so a gradient bucket whose parameters' `.grad` are views into it needs no
/// copy on the caller's side.
pub trait Collective: Send {
    /// This rank, in `0..world_size()`.
    fn rank(&self) -> u32;
    /// Number of ranks in the group.
    fn world_size(&self) -> u32;
    /// The generation of the job this group belongs to.
    fn generation(&self) -> u64;
    /// Replaces `flat` on every rank with the element-wise sum over all ranks. Averaging is the
    /// caller's business: the trainer divides by the global sample count, which it alone knows.
    fn all_reduce_sum(&mut self, flat: &mut Tensor) -> Result<(), CollectiveError>;
    /// Copies `flat` of rank `root` into `flat` on every other rank.
    fn broadcast(&mut self, flat: &mut Tensor, root: u32) -> Result<(), CollectiveError>;
    /// Replaces `bytes` on every rank with those of rank `root` (any length up to `max_len`; a
    /// longer announcement is refused on every receiving rank). For small structured messages
    /// such as the header of a state transfer, not for bulk data.
    fn broadcast_bytes(
        &mut self,
        bytes: &mut Vec<u8>,
        root: u32,
        max_len: usize,
    ) -> Result<(), CollectiveError>;
    /// Returns once every rank has entered the barrier.
    fn barrier(&mut self) -> Result<(), CollectiveError>;
    /// A handle another thread can use to abort operations in flight, now or later.
    fn abort_handle(&self) -> AbortHandle;
}

/// Why the accepting side refused a data-plane handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefuseReason {
    /// The two ranks disagree on the number of ranks in the generation.
    WorldSizeMismatch,
    /// The peer does not expect a connection from this rank (not its ring predecessor, or it is
    /// already connected).
    UnexpectedRank,
    /// The peer speaks another version of the data-plane protocol.
    VersionMismatch,
}

impl std::fmt::Display for RefuseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RefuseReason::WorldSizeMismatch => "world size mismatch",
            RefuseReason::UnexpectedRank => "connection from this rank not expected",
            RefuseReason::VersionMismatch => "data-plane protocol version mismatch",
        })
    }
}

/// Errors of collective operations; each variant names the contract that was broken.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    /// Ranks called the same operation with buffers of different lengths.
    #[error(
        "buffer length mismatch with rank {peer}: this rank has {expected} elements, the peer has {got}"
    )]
    ShapeMismatch {
        /// The rank whose operation header disagreed.
        peer: u32,
        /// Elements in this rank's buffer.
        expected: u64,
        /// Elements in the peer's buffer.
        got: u64,
    },
    /// Ranks called different operations (or broadcast from different roots, or use different
    /// chunk sizes) at the same point of the sequence.
    #[error(
        "operation mismatch with rank {peer} at op {seq}: this rank runs {expected}, the peer runs {got}"
    )]
    OpMismatch {
        /// The rank whose operation header disagreed.
        peer: u32,
        /// Sequence number of the operation, counted from 0 per communicator.
        seq: u64,
        /// This rank's operation.
        expected: String,
        /// The peer's operation.
        got: String,
    },
    /// The generation is older than one this process, or a peer's, has already been asked to join.
    #[error("generation {generation} of job {job} is stale")]
    StaleGeneration {
        /// Job id.
        job: String,
        /// The refused generation.
        generation: u64,
    },
    /// A peer refused the data-plane handshake.
    #[error("handshake refused by rank {rank}: {reason}")]
    Refused {
        /// The refusing rank.
        rank: u32,
        /// Why it refused.
        reason: RefuseReason,
    },
    /// A peer closed or reset its connection: it died, or gave up on the operation.
    #[error("lost peer rank {rank}")]
    PeerLost {
        /// The lost rank.
        rank: u32,
        /// What the socket reported.
        #[source]
        source: io::Error,
    },
    /// A peer stayed silent for longer than the configured timeout.
    #[error("timed out after {after:?} waiting for rank {rank}")]
    Timeout {
        /// The silent rank.
        rank: u32,
        /// How long this rank waited.
        after: Duration,
    },
    /// A device-side collective (NCCL) did not finish in time; its communicator was aborted.
    #[error("{op} did not finish within {after:?}; the communicator was aborted")]
    DeviceTimeout {
        /// The NCCL call.
        op: &'static str,
        /// The configured limit (`[fault] collective_timeout_secs`).
        after: Duration,
    },
    /// The peer could not be dialled before the connect timeout ran out.
    #[error("could not reach rank {rank} at {addr} within {after:?}")]
    Unreachable {
        /// The rank dialled.
        rank: u32,
        /// Its data-plane address.
        addr: String,
        /// The connect timeout.
        after: Duration,
        /// The last failure.
        #[source]
        source: io::Error,
    },
    /// [`AbortHandle::abort`] was called.
    #[error("collective aborted")]
    Aborted,
    /// A peer sent bytes that do not follow the data-plane protocol.
    #[error("protocol violation by rank {rank}: {detail}")]
    Protocol {
        /// The offending rank.
        rank: u32,
        /// What was wrong.
        detail: String,
    },
    /// The communicator's configuration is inconsistent.
    #[error("invalid collective config: {0}")]
    InvalidConfig(String),
    /// An argument of the call is out of range.
    #[error("invalid collective argument: {0}")]
    InvalidArgument(String),
    /// A local resource ran out (a thread could not be spawned, a socket option not set).
    #[error("local resource failure in the collective backend")]
    Local {
        /// What the operating system reported.
        #[source]
        source: io::Error,
    },
    /// libtorch refused a tensor operation of the backend (staging allocation, a device copy, a
    /// tensor that is not flat fp32): this rank's device is at fault, not the group.
    #[error("{0}")]
    Device(String),
    /// An earlier operation failed, leaving the peers' streams in an unknown state.
    #[error("communicator unusable after an earlier failure: {cause}")]
    Poisoned {
        /// The earlier failure.
        cause: String,
    },
}

impl CollectiveError {
    /// Whether re-forming the group under a new generation may cure the failure. False for
    /// errors that would recur on any group: programming errors (mismatched ops, bad arguments)
    /// and decisions taken elsewhere (abort, a newer generation).
    pub fn retryable(&self) -> bool {
        match self {
            CollectiveError::PeerLost { .. }
            | CollectiveError::Timeout { .. }
            | CollectiveError::DeviceTimeout { .. }
            | CollectiveError::Unreachable { .. }
            | CollectiveError::Local { .. }
            | CollectiveError::Poisoned { .. } => true,
            CollectiveError::ShapeMismatch { .. }
            | CollectiveError::OpMismatch { .. }
            | CollectiveError::StaleGeneration { .. }
            | CollectiveError::Refused { .. }
            | CollectiveError::Aborted
            | CollectiveError::Protocol { .. }
            | CollectiveError::InvalidConfig(_)
            | CollectiveError::InvalidArgument(_)
            | CollectiveError::Device(_) => false,
        }
    }
}

type AbortHook = Box<dyn Fn() + Send + Sync>;

/// Aborts a communicator from any thread: operations blocked in it return
/// [`CollectiveError::Aborted`] promptly, and so does every later one.
///
/// Cheap to clone; all clones abort the same communicator. Aborting is idempotent.
#[derive(Clone)]
pub struct AbortHandle {
    inner: Arc<AbortInner>,
}

struct AbortInner {
    aborted: AtomicBool,
    /// Backend actions that unblock waiting threads (shutting sockets, aborting an NCCL comm).
    hooks: Mutex<Vec<AbortHook>>,
}

impl AbortHandle {
    pub(crate) fn new() -> Self {
        AbortHandle {
            inner: Arc::new(AbortInner {
                aborted: AtomicBool::new(false),
                hooks: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Marks the communicator aborted and runs the backend's unblocking actions once.
    pub fn abort(&self) {
        self.inner.aborted.store(true, Ordering::SeqCst);
        let hooks = std::mem::take(&mut *lock_ignoring_poison(&self.inner.hooks));
        for hook in hooks {
            hook();
        }
    }

    /// Whether [`abort`](Self::abort) has been called.
    pub fn is_aborted(&self) -> bool {
        self.inner.aborted.load(Ordering::SeqCst)
    }

    /// Registers an action to run on abort; runs it at once if the handle is already aborted.
    pub(crate) fn on_abort(&self, hook: AbortHook) {
        let mut hooks = lock_ignoring_poison(&self.inner.hooks);
        // Checked under the lock: `abort` sets the flag before taking the hooks, so a hook
        // registered after that point would otherwise never run.
        if self.is_aborted() {
            drop(hooks);
            hook();
        } else {
            hooks.push(hook);
        }
    }
}

impl std::fmt::Debug for AbortHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AbortHandle")
            .field("aborted", &self.is_aborted())
            .finish()
    }
}

/// The data guarded by our mutexes stays consistent across a panic (plain maps and lists), so a
/// poisoned lock is still usable.
pub(crate) fn lock_ignoring_poison<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
