//! Finding checkpoints on disk: listing a job's `step-<N>` directories and
//! picking the newest candidate that verifies, with the reasons the newer ones
//! were skipped. Which steps are committed is the store's business, not this
//! module's: callers pass the candidates.

use std::path::{Path, PathBuf};

use super::{
    CheckpointError, CheckpointManifest, MANIFEST_FILE, job_dir, parse_step_dir_name, step_dir,
    verify_checkpoint,
};

/// One `step-<N>` directory of a job, as found on disk (not verified).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointEntry {
    pub step: u64,
    pub dir: PathBuf,
    /// Whether `MANIFEST.json` exists; without it the checkpoint is incomplete.
    pub has_manifest: bool,
    /// Total size of the regular files directly inside the directory.
    pub bytes: u64,
}

/// The `step-<N>` directories of `job_id` under `root`, by step ascending.
/// Temporary (`.tmp-…`) and trash (`.trash-…`) directories, and anything else
/// whose name is not exactly `step-<N>`, are not listed. A job without a
/// directory has no checkpoints.
pub fn list_checkpoints(
    root: &Path,
    job_id: &str,
) -> Result<Vec<CheckpointEntry>, CheckpointError> {
    let job_dir = job_dir(root, job_id)?;
    let read_dir = match std::fs::read_dir(&job_dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(CheckpointError::io("list", &job_dir, e)),
    };
    let mut entries = Vec::new();
    for dirent in read_dir {
        let dirent = dirent.map_err(|e| CheckpointError::io("list", &job_dir, e))?;
        let Some(step) = dirent.file_name().to_str().and_then(parse_step_dir_name) else {
            continue;
        };
        let dir = dirent.path();
        // A symlink or a file named like a checkpoint is not one.
        if !std::fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir()) {
            continue;
        }
        let (has_manifest, bytes) = scan_step_dir(&dir)?;
        entries.push(CheckpointEntry {
            step,
            dir,
            has_manifest,
            bytes,
        });
    }
    entries.sort_by_key(|e| e.step);
    Ok(entries)
}

fn scan_step_dir(dir: &Path) -> Result<(bool, u64), CheckpointError> {
    let mut has_manifest = false;
    let mut bytes = 0u64;
    let read_dir = std::fs::read_dir(dir).map_err(|e| CheckpointError::io("list", dir, e))?;
    for dirent in read_dir {
        let dirent = dirent.map_err(|e| CheckpointError::io("list", dir, e))?;
        let Ok(meta) = std::fs::symlink_metadata(dirent.path()) else {
            continue;
        };
        if !meta.is_file() {
            continue;
        }
        if dirent.file_name() == MANIFEST_FILE {
            has_manifest = true;
        }
        bytes = bytes.saturating_add(meta.len());
    }
    Ok((has_manifest, bytes))
}

/// Candidate steps passed over by [`latest_valid`], each with the reason.
pub type Skipped = Vec<(u64, CheckpointError)>;

/// The first of `candidates_desc` (steps, newest first, e.g. the committed
/// ones from the store) whose checkpoint verifies and belongs to `job_id`,
/// with its manifest; plus every candidate tried before it and why it was
/// skipped, so that resume can fall back and say so. `(None, all)` when none
/// verifies.
pub fn latest_valid(
    root: &Path,
    job_id: &str,
    candidates_desc: &[u64],
) -> (Option<(u64, CheckpointManifest)>, Skipped) {
    let mut skipped = Vec::new();
    for &step in candidates_desc {
        match verify_for_job(root, job_id, step) {
            Ok(manifest) => return (Some((step, manifest)), skipped),
            Err(e) => skipped.push((step, e)),
        }
    }
    (None, skipped)
}

fn verify_for_job(
    root: &Path,
    job_id: &str,
    step: u64,
) -> Result<CheckpointManifest, CheckpointError> {
    job_dir(root, job_id)?;
    let dir = step_dir(root, job_id, step);
    let manifest = verify_checkpoint(&dir)?;
    if manifest.job_id != job_id {
        return Err(CheckpointError::JobMismatch {
            dir,
            expected_job: job_id.to_string(),
            manifest_job: manifest.job_id,
        });
    }
    Ok(manifest)
}
