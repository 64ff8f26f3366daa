//! The trainer: runs one rank of a job on the calling OS thread (the agent
//! gives it a dedicated one). A [`Run`] owns everything that outlives a
//! generation (model, optimizer, data cursor, metrics, checkpoint writer); a
//! generation lends it a [`Collective`], chosen by the agent, through
//! [`Run::rebind`]; the worker's `host` module drives a run across them.
//!
//! It knows nothing of gRPC or the store: progress goes out through a callback,
//! and the agent stops it through [`TrainerControl`].
//!
//! Semantics (DESIGN.md invariants): the global batch `B` is fixed by the job;
//! step `k` of an epoch consumes positions `[kB, (k+1)B)` of the epoch's
//! permutation and rank `r` takes its balanced slice; every rank sums its
//! per-sample losses, gradients are summed across ranks and divided by the
//! number of samples in the global batch, so W workers compute exactly the
//! SGD step of one worker on the whole batch (up to float summation order).

mod audit;
mod buffers;
mod data;
mod evaluation;
mod grads;
mod loss;
mod metrics;
mod precision;
mod run;
mod score;
mod state;
mod stream;
mod transfer;

pub use audit::{AUDIT_DIR, file_name as audit_file_name};
pub use data::{is_prepared, prepare};
pub use evaluation::Evaluation;
pub use run::{Run, StateSource, StepReport};
pub use score::{SPEC_FILE, find_spec, score};
pub use transfer::{StateHeader, Transferred};

use crate::collective::{AbortHandle, CollectiveError};
use crate::model::{self, AllocError};
use ringmaster_common::jobspec::JobSpec;
use ringmaster_dataset::DatasetError;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tch::Device;

/// What the coordinator asked this rank to do.
#[derive(Clone, Debug)]
pub struct Assignment {
    pub job_id: String,
    pub generation: u64,
    pub rank: u32,
    /// Data-plane addresses of every rank, indexed by rank.
    pub peers: Vec<String>,
    pub spec: JobSpec,
    /// Report progress every this many steps.
    pub progress_every: u64,
    /// Checkpoint directories to resume from, newest first: the first that
    /// verifies is used. Empty for a fresh start.
    pub resume_candidates: Vec<PathBuf>,
    /// This job's own output folder, `<output.dir>/<job-id>/`.
    pub output_dir: PathBuf,
    /// When the group re-forms around live state: the rank whose state every
    /// other rank takes over. `None`: the run's own start (a checkpoint
    /// every rank loads, or rank 0's fresh parameters).
    pub state_source: Option<u32>,
    /// The data cursor (steps completed) the coordinator says the group
    /// starts at, when it knows it: checked once the state is made one.
    pub cursor: Option<u64>,
}

/// How this worker runs libtorch.
#[derive(Clone, Copy, Debug)]
pub struct TrainerOptions {
    pub device: Device,
    pub threads: usize,
    /// How long to wait for ring peers to connect.
    pub connect_timeout: Duration,
}

/// Something worth telling the coordinator, sent at most every
/// `progress_every` steps (never per step).
#[derive(Clone, Debug, PartialEq)]
pub struct Progress {
    pub step: u64,
    pub total_steps: u64,
    pub epoch: u64,
    pub metrics: BTreeMap<String, f64>,
}

/// What the trainer reports while it runs.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    Progress(Progress),
    /// A checkpoint finished writing (rank 0 only), or failed to.
    Checkpoint {
        step: u64,
        outcome: Result<CheckpointWritten, String>,
        metrics: BTreeMap<String, f64>,
    },
    /// Something the user should know, e.g. a corrupt checkpoint skipped.
    Note(String),
    /// The run was bound to a new generation's group holding the state of
    /// `step`; `transfer` is what the state copy moved (bytes, seconds),
    /// when there was one (rank 0 only: it is the source).
    Rebound {
        step: u64,
        transfer: Option<(u64, f64)>,
    },
}

/// A complete checkpoint on disk.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckpointWritten {
    pub dir: PathBuf,
    pub bytes: u64,
    pub write_seconds: f64,
    /// Training time this checkpoint blocked the step loop (snapshot, plus
    /// the write itself when synchronous or when waiting for a previous one).
    pub blocked_seconds: f64,
}

/// A finished run.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    pub step: u64,
    pub metrics: BTreeMap<String, f64>,
    /// The run stopped early on request (after its final checkpoint).
    pub stopped: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("dataset: {0}")]
    Data(#[from] DatasetError),
    #[error("collective: {0}")]
    Collective(#[from] CollectiveError),
    /// libtorch's first line only: its C++ backtrace helps nobody reading
    /// a job's failure reason.
    #[error("libtorch: {}", model::torch_message(.0))]
    Torch(#[from] tch::TchError),
    /// Memory for the model, the data or the gradient staging was refused:
    /// the job is too large for this worker's device.
    #[error("{0}")]
    Allocation(#[from] AllocError),
    #[error("writing {path}: {source}")]
    Output {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid assignment: {0}")]
    Invalid(String),
    #[error("cannot resume: {0}")]
    Resume(String),
    /// Another rank's training state could not be taken over.
    #[error("state transfer: {0}")]
    Transfer(String),
    /// The loss over the global batch is NaN or infinite: the run has
    /// diverged, and re-forming or resuming would diverge again.
    #[error(
        "the loss is {loss} at step {step}: training diverged (lower train.learning_rate, or \
         check the data for extreme values)"
    )]
    Diverged { step: u64, loss: f64 },
    #[error("aborted: {0}")]
    Aborted(String),
}

impl TrainError {
    /// The rank whose loss caused this error, when a peer vanished.
    pub fn lost_peer(&self) -> Option<u32> {
        match self {
            TrainError::Collective(CollectiveError::PeerLost { rank, .. }) => Some(*rank),
            _ => None,
        }
    }
}

/// Lets another thread steer a running trainer: abort promptly (the flag is
/// checked at every step boundary and the abort handle unblocks
/// collectives), or ask for a checkpoint / a checkpoint-then-stop, which the
/// ranks agree on through the next gradient all-reduce.
#[derive(Default)]
pub struct TrainerControl {
    aborted: AtomicBool,
    /// The abort asks the rank to keep its state for the next generation.
    keep_state: AtomicBool,
    /// When the run last made progress (a step, an evaluation, a
    /// checkpoint), in ms since the Unix epoch; the hang watchdog reads it.
    progress_at_ms: AtomicU64,
    checkpoint: AtomicBool,
    stop: AtomicBool,
    reason: Mutex<Option<String>>,
    handle: Mutex<Option<AbortHandle>>,
}

impl TrainerControl {
    /// Stops the trainer; safe to call at any time, from any thread.
    pub fn abort(&self, reason: &str) {
        *self.reason.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason.to_string());
        self.aborted.store(true, Ordering::SeqCst);
        if let Some(h) = self
            .handle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            h.abort();
        }
    }

    /// Stops the trainer like [`abort`](Self::abort), asking it to keep its
    /// training state for the job's next generation.
    pub fn park(&self, reason: &str) {
        self.keep_state.store(true, Ordering::SeqCst);
        self.abort(reason);
    }

    /// Whether [`abort`](Self::abort) (or [`park`](Self::park)) was called.
    pub fn is_aborted(&self) -> bool {
        self.aborted.load(Ordering::SeqCst)
    }

    /// Records that the run made progress now.
    pub fn beat(&self) {
        self.progress_at_ms
            .store(ringmaster_common::now_ms(), Ordering::Relaxed);
    }

    /// How long since the last [`beat`](Self::beat).
    pub fn since_progress(&self) -> Duration {
        let last = self.progress_at_ms.load(Ordering::Relaxed);
        Duration::from_millis(ringmaster_common::now_ms().saturating_sub(last))
    }

    /// Whether [`park`](Self::park) was called.
    pub fn keeps_state(&self) -> bool {
        self.keep_state.load(Ordering::SeqCst)
    }

    /// Asks for a checkpoint at the next step boundary; with `stop`, training
    /// ends right after it.
    pub fn request_checkpoint(&self, stop: bool) {
        self.checkpoint.store(true, Ordering::SeqCst);
        if stop {
            self.stop.store(true, Ordering::SeqCst);
        }
    }

    fn check(&self) -> Result<(), TrainError> {
        if self.aborted.load(Ordering::SeqCst) {
            let reason = self
                .reason
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            return Err(TrainError::Aborted(reason.unwrap_or_default()));
        }
        Ok(())
    }

    /// Lets [`abort`](Self::abort) unblock the collective of the group the
    /// run is joining.
    pub fn install(&self, handle: AbortHandle) -> Result<(), TrainError> {
        *self.handle.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle.clone());
        // An abort that raced with the installation must still take effect.
        if self.aborted.load(Ordering::SeqCst) {
            handle.abort();
        }
        self.check()
    }
}
