//! Checkpoints on disk: the directory layout, the manifest, the atomic writer,
//! verification, listing, garbage collection and the pure retention plan. No
//! tensors (the worker turns tensors into safetensors bytes), no store records
//! (the coordinator owns the commit flag) and no async here: every function is
//! blocking file IO, to be run on a blocking thread.
//!
//! # Layout (format version 1)
//!
//! ```text
//! <root>/<job-id>/step-<N>/          N in decimal, without padding
//!     model.safetensors
//!     optimizer.safetensors
//!     state.json
//!     MANIFEST.json                  written last
//! <root>/<job-id>/.tmp-step-<N>-<pid>-<nanos>-<seq>/     a write in progress (or a crashed one)
//! <root>/<job-id>/.trash-step-<N>-<pid>-<nanos>-<seq>/   a checkpoint being deleted
//! ```
//!
//! `MANIFEST.json` (JSON, unknown keys rejected, at most [`MAX_MANIFEST_BYTES`]):
//!
//! ```json
//! {
//!   "format_version": 1,
//!   "job_id": "mnist-3",
//!   "step": 200,
//!   "created_at_ms": 1767225600000,
//!   "files": [
//!     { "name": "model.safetensors", "bytes": 1234, "sha256": "9f86d0…" },
//!     { "name": "optimizer.safetensors", "bytes": 2468, "sha256": "60303a…" },
//!     { "name": "state.json", "bytes": 312, "sha256": "fd61a0…" }
//!   ]
//! }
//! ```
//!
//! # Atomicity
//!
//! [`write_checkpoint`] writes every file and then the manifest into a
//! `.tmp-…` sibling, fsyncing each, fsyncs that directory and renames it to
//! `step-<N>` in one step, then fsyncs the job directory. A crash at any moment
//! therefore leaves either no `step-<N>` at all or a complete one; a
//! `step-<N>` without a manifest is never valid ([`CheckpointError::Incomplete`]).
//! On any error the temporary directory is removed and older checkpoints are
//! not touched. Being on disk is not being committed: the coordinator records
//! the commit in the store once every rank has acknowledged.
//!
//! [`gc`] deletes a checkpoint by first renaming it to `.trash-…` (atomic) and
//! then removing that, so a crash mid-delete never leaves something that looks
//! like a checkpoint but lacks files. `.tmp-…` and `.trash-…` directories are
//! never listed and are cleaned up by the next [`gc`].
//!
//! # Fail points
//!
//! `RINGMASTER_FAILPOINT` injects faults into [`write_checkpoint`] so that
//! integration tests can break the real worker binary; see
//! [`write_checkpoint`] for the syntax. Tests in-process use
//! [`write_checkpoint_with`] and its [`WritePhase`] hook instead.

#![forbid(unsafe_code)]

mod gc;
mod list;
mod manifest;
mod retention;
mod verify;
mod write;

use std::path::{Path, PathBuf};

pub use gc::{GcReport, gc};
pub use list::{CheckpointEntry, Skipped, latest_valid, list_checkpoints};
pub use manifest::{
    CheckpointManifest, FORMAT_VERSION, FileEntry, MANIFEST_FILE, MAX_FILE_NAME_BYTES, MAX_FILES,
    MAX_MANIFEST_BYTES, validate_file_name,
};
pub use retention::{
    CheckpointInfo, KeepBest, Mode, RetentionPlan, RetentionPolicy, plan_retention,
};
pub use verify::verify_checkpoint;
pub use write::{
    FAILPOINT_ENV, FAILPOINT_EXIT_CODE, FAILPOINTS_BUILT_IN, WritePhase, write_checkpoint,
    write_checkpoint_with,
};

use ringmaster_common::ids::IdError;

/// Name prefix of a checkpoint being written.
const TMP_PREFIX: &str = ".tmp-step-";
/// Name prefix of a checkpoint being deleted or replaced.
const TRASH_PREFIX: &str = ".trash-step-";
const STEP_PREFIX: &str = "step-";

/// Everything that can go wrong writing, reading, verifying or deleting a
/// checkpoint. Each variant names the broken contract; the checkpoint
/// directory and file are included so that one line says what is wrong where.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("invalid job id: {0}")]
    InvalidJobId(#[from] IdError),
    #[error("invalid checkpoint file name {name:?}: {reason}")]
    InvalidFileName { name: String, reason: String },
    #[error("checkpoint file {name:?} is listed twice")]
    DuplicateFileName { name: String },
    #[error("checkpoint has {count} files, the limit is {MAX_FILES}")]
    TooManyFiles { count: usize },
    #[error("cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("checkpoint {dir}: directory does not exist")]
    Missing { dir: PathBuf },
    #[error("checkpoint {dir}: directory name is not step-<N>")]
    NotAStepDir { dir: PathBuf },
    #[error("checkpoint {dir}: no {MANIFEST_FILE}, the checkpoint is incomplete")]
    Incomplete { dir: PathBuf },
    #[error(
        "checkpoint {dir}: {MANIFEST_FILE} is {bytes} bytes, the limit is {MAX_MANIFEST_BYTES}"
    )]
    ManifestTooLarge { dir: PathBuf, bytes: u64 },
    #[error("checkpoint {dir}: invalid {MANIFEST_FILE}: {reason}")]
    InvalidManifest { dir: PathBuf, reason: String },
    #[error(
        "checkpoint {dir}: unsupported format version {found} (this build reads version {FORMAT_VERSION})"
    )]
    UnsupportedFormatVersion { dir: PathBuf, found: u64 },
    #[error(
        "checkpoint {dir}: manifest is for step {manifest_step}, the directory for step {dir_step}"
    )]
    StepMismatch {
        dir: PathBuf,
        dir_step: u64,
        manifest_step: u64,
    },
    #[error(
        "checkpoint {dir}: manifest is for job {manifest_job:?}, expected job {expected_job:?}"
    )]
    JobMismatch {
        dir: PathBuf,
        expected_job: String,
        manifest_job: String,
    },
    #[error("checkpoint {dir}: {name}: missing")]
    FileMissing { dir: PathBuf, name: String },
    #[error("checkpoint {dir}: {name}: not a regular file")]
    NotAFile { dir: PathBuf, name: String },
    #[error(
        "checkpoint {dir}: {name}: size mismatch (manifest {expected} bytes, file {actual} bytes)"
    )]
    SizeMismatch {
        dir: PathBuf,
        name: String,
        expected: u64,
        actual: u64,
    },
    #[error("checkpoint {dir}: {name}: sha256 mismatch (manifest {expected}, file {actual})")]
    HashMismatch {
        dir: PathBuf,
        name: String,
        expected: String,
        actual: String,
    },
    #[error("invalid {FAILPOINT_ENV} entry {entry:?}: {reason}")]
    InvalidFailpoint { entry: String, reason: String },
}

impl CheckpointError {
    fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        CheckpointError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

/// `<root>/<job_id>/step-<step>`. Pure path arithmetic: callers that take a
/// job id from outside validate it first (every function of this module does).
pub fn step_dir(root: &Path, job_id: &str, step: u64) -> PathBuf {
    root.join(job_id).join(format!("{STEP_PREFIX}{step}"))
}

/// The step of a checkpoint directory name: `"step-12"` is `Some(12)`.
/// Anything else, including padded (`"step-012"`), signed or overflowing
/// numbers and temporary or trash names, is `None`, so that a step has exactly
/// one directory name.
pub fn parse_step_dir_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(STEP_PREFIX)?;
    if digits.is_empty()
        || !digits.bytes().all(|b| b.is_ascii_digit())
        || (digits.len() > 1 && digits.starts_with('0'))
    {
        return None;
    }
    digits.parse().ok()
}

/// `<root>/<job_id>`, after checking that the id is safe as one path segment.
fn job_dir(root: &Path, job_id: &str) -> Result<PathBuf, CheckpointError> {
    ringmaster_common::ids::validate_id("job", job_id)?;
    Ok(root.join(job_id))
}

/// A name for a temporary or trash sibling that no other writer (another
/// process, or this one a moment ago) picks.
fn unique_sibling_name(prefix: &str, step: u64) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let seq = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{step}-{}-{nanos}-{seq}", std::process::id())
}

/// The step a `.tmp-step-<N>-…` or `.trash-step-<N>-…` name is for.
fn leftover_step(name: &str) -> Option<(LeftoverKind, Option<u64>)> {
    let (kind, rest) = if let Some(rest) = name.strip_prefix(TMP_PREFIX) {
        (LeftoverKind::Tmp, rest)
    } else if let Some(rest) = name.strip_prefix(TRASH_PREFIX) {
        (LeftoverKind::Trash, rest)
    } else {
        return None;
    };
    let step = rest.split('-').next().and_then(|s| s.parse().ok());
    Some((kind, step))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LeftoverKind {
    Tmp,
    Trash,
}

/// fsync a directory so that renames and creations inside it are durable.
fn sync_dir(dir: &Path) -> Result<(), CheckpointError> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| CheckpointError::io("sync", dir, e))
}

/// Removes a directory tree (or a stray file or symlink, not followed). One
/// that is already gone, or goes while we remove it (a concurrent [`gc`]), is
/// not an error.
fn remove_tree(path: &Path) -> Result<(), CheckpointError> {
    let removed = match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) => Err(e),
    };
    match removed {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(CheckpointError::io("remove", path, e)),
    }
}

/// Bytes of the regular files under `path`, not following symlinks. Entries
/// that vanish while we count are skipped.
fn tree_bytes(path: &Path) -> u64 {
    let mut total = 0u64;
    let mut stack = vec![path.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if meta.is_file() {
            total = total.saturating_add(meta.len());
        } else if meta.is_dir()
            && let Ok(entries) = std::fs::read_dir(&p)
        {
            stack.extend(entries.flatten().map(|e| e.path()));
        }
    }
    total
}
