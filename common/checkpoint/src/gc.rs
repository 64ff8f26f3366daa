//! Deleting checkpoints from disk (the IO half of retention) and cleaning up
//! what crashed writes and deletes left behind. Deciding what to delete is
//! `retention.rs`'s job; recording it in the store is the coordinator's.
//!
//! A checkpoint is deleted by renaming `step-<N>` to `.trash-step-<N>-…`
//! (atomic), fsyncing the job directory, then removing the trash directory.
//! So a crash mid-delete leaves either the whole checkpoint or a trash
//! directory that is never listed, never a `step-<N>` with a manifest but
//! missing files; the next [`gc`] finishes the job.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use super::{
    CheckpointError, LeftoverKind, TRASH_PREFIX, job_dir, leftover_step, list_checkpoints,
    remove_tree, step_dir, sync_dir, tree_bytes, unique_sibling_name,
};

/// What one [`gc`] pass removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Steps from the delete set whose directory this pass removed, ascending.
    pub removed_steps: Vec<u64>,
    /// Steps from the delete set that had no directory (already deleted).
    pub already_missing: Vec<u64>,
    /// Stale `.tmp-…` and `.trash-…` directories removed, by path.
    pub removed_leftovers: Vec<PathBuf>,
    /// Bytes of the regular files removed, checkpoints and leftovers together.
    pub bytes_freed: u64,
}

/// Removes the `step-<N>` directories of `job_id` for every step in `delete`,
/// then the leftovers of crashed writes and deletes. Idempotent: steps that
/// are already gone are reported in `already_missing`, and running it again
/// after a crash completes the previous pass.
///
/// Leftovers removed: every `.trash-…` directory, and every
/// `.tmp-step-<M>-…` directory whose step `M` is in `delete` or not newer than
/// the newest `step-<N>` that has a manifest (one writer per step directory:
/// once step N is in place, no write of a step up to N is still running). A
/// temporary directory for a newer step may be a write in flight (checkpoints
/// are written in the background while the coordinator applies retention), so
/// it is left for a later pass.
pub fn gc(root: &Path, job_id: &str, delete: &BTreeSet<u64>) -> Result<GcReport, CheckpointError> {
    let job_dir = job_dir(root, job_id)?;
    let mut report = GcReport::default();
    if !job_dir.is_dir() {
        report.already_missing = delete.iter().copied().collect();
        return Ok(report);
    }

    let mut trashed = Vec::new();
    for &step in delete {
        let dir = step_dir(root, job_id, step);
        let trash = job_dir.join(unique_sibling_name(TRASH_PREFIX, step));
        match std::fs::rename(&dir, &trash) {
            Ok(()) => trashed.push((step, trash)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                report.already_missing.push(step);
            }
            Err(e) => return Err(CheckpointError::io("rename", &dir, e)),
        }
    }
    if !trashed.is_empty() {
        // The renames must be durable before the files go, or a crash could
        // bring back a step-<N> with files missing.
        sync_dir(&job_dir)?;
    }
    for (step, trash) in trashed {
        let bytes = tree_bytes(&trash);
        remove_tree(&trash)?;
        report.removed_steps.push(step);
        report.bytes_freed = report.bytes_freed.saturating_add(bytes);
    }

    let newest_complete = list_checkpoints(root, job_id)?
        .iter()
        .filter(|e| e.has_manifest)
        .map(|e| e.step)
        .max();
    let read_dir =
        std::fs::read_dir(&job_dir).map_err(|e| CheckpointError::io("list", &job_dir, e))?;
    let mut leftovers = Vec::new();
    for dirent in read_dir {
        let dirent = dirent.map_err(|e| CheckpointError::io("list", &job_dir, e))?;
        let Some(name) = dirent.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        let stale = match leftover_step(&name) {
            None => false,
            Some((LeftoverKind::Trash, _)) => true,
            // Not a name this module makes, yet under its prefix: nobody's
            // write in flight.
            Some((LeftoverKind::Tmp, None)) => true,
            Some((LeftoverKind::Tmp, Some(m))) => {
                delete.contains(&m) || newest_complete.is_some_and(|newest| m <= newest)
            }
        };
        if stale {
            leftovers.push(dirent.path());
        }
    }
    leftovers.sort();
    for path in leftovers {
        let bytes = tree_bytes(&path);
        remove_tree(&path)?;
        report.bytes_freed = report.bytes_freed.saturating_add(bytes);
        report.removed_leftovers.push(path);
    }
    Ok(report)
}
