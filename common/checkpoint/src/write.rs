//! Writing a checkpoint atomically: files and manifest into a temporary
//! sibling directory, fsync, one rename into place, and the fault-injection
//! hook (and `RINGMASTER_FAILPOINT`) that lets tests break it at every phase.
//! Serializing tensors into safetensors bytes happens in the worker.

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::manifest::check_file_names;
use super::{
    CheckpointError, CheckpointManifest, FORMAT_VERSION, FileEntry, MANIFEST_FILE, TMP_PREFIX,
    TRASH_PREFIX, job_dir, remove_tree, sync_dir, unique_sibling_name, verify_checkpoint,
};

/// Environment variable read by [`write_checkpoint`] to inject faults.
pub const FAILPOINT_ENV: &str = "RINGMASTER_FAILPOINT";
/// Whether this build honours [`FAILPOINT_ENV`]: debug builds (tests) and
/// builds with the `failpoints` feature do; a release build ignores the
/// variable, so a stray environment cannot break production checkpoints.
pub const FAILPOINTS_BUILT_IN: bool = cfg!(any(debug_assertions, feature = "failpoints"));
/// Exit status of a process stopped by an `=exit` fail point.
pub const FAILPOINT_EXIT_CODE: i32 = 86;
/// Message of the error an `=error` fail point injects.
const INJECTED_MESSAGE: &str = "no space left on device (injected)";

/// The moments of [`write_checkpoint_with`] at which its hook is called; an
/// error returned by the hook fails the write exactly as a real IO error at
/// that point would.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WritePhase<'a> {
    /// Before creating the named data file (files already written are on disk
    /// in the temporary directory, fsynced).
    BeforeFile(&'a str),
    /// After every data file is written and fsynced, before `MANIFEST.json`.
    BeforeManifest,
    /// With the temporary directory complete and fsynced, before it is
    /// renamed to `step-<N>`.
    BeforeRename,
}

/// Writes a checkpoint of `files` (name, contents) for `job_id` at `step`
/// under `root` atomically, and returns its manifest. See the module docs
/// of [`crate::checkpoint`] for the layout and the protocol. If `step-<N>`
/// already holds a valid checkpoint with the same files it is kept and its
/// manifest returned; if it holds anything else it is replaced.
///
/// Reads the fail-point variable [`FAILPOINT_ENV`] (only where
/// [`FAILPOINTS_BUILT_IN`]): a comma-separated list of
/// `<point>=<action>`, where the point is `checkpoint-before-file`,
/// `checkpoint-before-manifest` or `checkpoint-before-rename` (the
/// [`WritePhase`]s; `before-file` fires at the first file) and the action is
/// `error` (fail the write with the IO error "no space left on device
/// (injected)") or `exit` (end the process at once with status
/// [`FAILPOINT_EXIT_CODE`], as a crash at that point would). Entries not
/// starting with `checkpoint-` belong to other subsystems and are ignored; a
/// malformed `checkpoint-…` entry fails the write rather than being silently
/// ignored. Example: `RINGMASTER_FAILPOINT=checkpoint-before-manifest=exit`.
pub fn write_checkpoint(
    root: &Path,
    job_id: &str,
    step: u64,
    files: &[(&str, &[u8])],
) -> Result<CheckpointManifest, CheckpointError> {
    let failpoints = match std::env::var(FAILPOINT_ENV) {
        // Release builds leave fault injection out unless asked for.
        _ if !FAILPOINTS_BUILT_IN => Failpoints::default(),
        Ok(spec) => Failpoints::parse(&spec)?,
        Err(std::env::VarError::NotPresent) => Failpoints::default(),
        Err(std::env::VarError::NotUnicode(raw)) => {
            return Err(CheckpointError::InvalidFailpoint {
                entry: raw.to_string_lossy().into_owned(),
                reason: "not valid unicode".into(),
            });
        }
    };
    write_checkpoint_with(root, job_id, step, files, &mut |phase| {
        failpoints.fire(phase)
    })
}

/// [`write_checkpoint`] with a hook called at each [`WritePhase`] instead of
/// the fail-point variable. On any error, the hook's included, the temporary
/// directory is removed and nothing else under `root` has changed.
pub fn write_checkpoint_with(
    root: &Path,
    job_id: &str,
    step: u64,
    files: &[(&str, &[u8])],
    hook: &mut dyn FnMut(WritePhase<'_>) -> std::io::Result<()>,
) -> Result<CheckpointManifest, CheckpointError> {
    let job_dir = job_dir(root, job_id)?;
    check_file_names(files.iter().map(|(name, _)| *name))?;
    let entries: Vec<FileEntry> = files
        .iter()
        .map(|(name, data)| FileEntry {
            name: name.to_string(),
            bytes: data.len() as u64,
            sha256: hex::encode(Sha256::digest(data)),
        })
        .collect();
    let final_dir = super::step_dir(root, job_id, step);
    ensure_job_dir(root, &job_dir)?;

    let replace = match std::fs::symlink_metadata(&final_dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(CheckpointError::io("read", &final_dir, e)),
        Ok(_) => match verify_checkpoint(&final_dir) {
            Ok(existing) if existing.job_id == job_id && existing.files == entries => {
                return Ok(existing);
            }
            Ok(_) => {
                tracing::warn!(dir = %final_dir.display(), "replacing a checkpoint with different contents");
                true
            }
            Err(e) => {
                tracing::warn!(dir = %final_dir.display(), error = %e, "replacing an invalid checkpoint");
                true
            }
        },
    };

    let manifest = CheckpointManifest {
        format_version: FORMAT_VERSION,
        job_id: job_id.to_string(),
        step,
        created_at_ms: ringmaster_common::now_ms(),
        files: entries,
    };
    let tmp = job_dir.join(unique_sibling_name(TMP_PREFIX, step));
    std::fs::create_dir(&tmp).map_err(|e| CheckpointError::io("create", &tmp, e))?;
    let mut guard = RemoveOnDrop(Some(tmp.clone()));

    for (name, data) in files {
        let path = tmp.join(name);
        hook(WritePhase::BeforeFile(name)).map_err(|e| CheckpointError::io("write", &path, e))?;
        write_synced(&path, data)?;
    }
    let manifest_path = tmp.join(MANIFEST_FILE);
    hook(WritePhase::BeforeManifest)
        .map_err(|e| CheckpointError::io("write", &manifest_path, e))?;
    write_synced(&manifest_path, &manifest.to_json_bytes())?;
    sync_dir(&tmp)?;
    hook(WritePhase::BeforeRename).map_err(|e| CheckpointError::io("rename", &tmp, e))?;

    // rename(2) will not replace a non-empty directory, so an old step-<N>
    // is moved aside first and only deleted once the new one is in place.
    let trash = if replace {
        let trash = job_dir.join(unique_sibling_name(TRASH_PREFIX, step));
        match std::fs::rename(&final_dir, &trash) {
            Ok(()) => Some(trash),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(CheckpointError::io("rename", &final_dir, e)),
        }
    } else {
        None
    };
    if let Err(e) = std::fs::rename(&tmp, &final_dir) {
        if let Some(trash) = &trash {
            // Put the old one back: a failed write must leave things as they were.
            if let Err(back) = std::fs::rename(trash, &final_dir) {
                tracing::warn!(trash = %trash.display(), error = %back, "cannot restore the replaced checkpoint");
            }
        }
        return Err(CheckpointError::io("rename", &tmp, e));
    }
    guard.0 = None;
    sync_dir(&job_dir)?;
    if let Some(trash) = trash
        && let Err(e) = remove_tree(&trash)
    {
        // The new checkpoint is in place; the next gc removes the leftover.
        tracing::warn!(error = %e, "cannot remove a replaced checkpoint");
    }
    Ok(manifest)
}

/// Creates `<root>/<job>` if needed, making its creation durable.
fn ensure_job_dir(root: &Path, job_dir: &Path) -> Result<(), CheckpointError> {
    if job_dir.is_dir() {
        return Ok(());
    }
    std::fs::create_dir_all(job_dir).map_err(|e| CheckpointError::io("create", job_dir, e))?;
    sync_dir(root)
}

/// Creates `path` (which must not exist), writes `data` and fsyncs it.
fn write_synced(path: &Path, data: &[u8]) -> Result<(), CheckpointError> {
    let mut file =
        std::fs::File::create_new(path).map_err(|e| CheckpointError::io("create", path, e))?;
    file.write_all(data)
        .map_err(|e| CheckpointError::io("write", path, e))?;
    file.sync_all()
        .map_err(|e| CheckpointError::io("sync", path, e))
}

/// Removes the temporary directory unless the write got it into place; also
/// on a panic in the hook.
struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(path) = self.0.take()
            && let Err(e) = remove_tree(&path)
        {
            tracing::warn!(error = %e, "cannot remove a failed checkpoint write");
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FailAction {
    Error,
    Exit,
}

/// The parsed `checkpoint-…` entries of [`FAILPOINT_ENV`].
#[derive(Debug, Default, PartialEq, Eq)]
struct Failpoints {
    before_file: Option<FailAction>,
    before_manifest: Option<FailAction>,
    before_rename: Option<FailAction>,
}

impl Failpoints {
    fn parse(spec: &str) -> Result<Self, CheckpointError> {
        let mut points = Failpoints::default();
        for entry in spec.split(',').map(str::trim) {
            if !entry.starts_with("checkpoint-") {
                continue;
            }
            let bad = |reason: &str| CheckpointError::InvalidFailpoint {
                entry: entry.to_string(),
                reason: reason.to_string(),
            };
            let (point, action) = entry
                .split_once('=')
                .ok_or_else(|| bad("expected <point>=<action>"))?;
            let action = match action {
                "error" => FailAction::Error,
                "exit" => FailAction::Exit,
                _ => return Err(bad("the action must be error or exit")),
            };
            let slot = match point {
                "checkpoint-before-file" => &mut points.before_file,
                "checkpoint-before-manifest" => &mut points.before_manifest,
                "checkpoint-before-rename" => &mut points.before_rename,
                _ => {
                    return Err(bad(
                        "unknown point, expected checkpoint-before-file, checkpoint-before-manifest or checkpoint-before-rename",
                    ));
                }
            };
            *slot = Some(action);
        }
        Ok(points)
    }

    fn fire(&self, phase: WritePhase<'_>) -> std::io::Result<()> {
        let action = match phase {
            WritePhase::BeforeFile(_) => self.before_file,
            WritePhase::BeforeManifest => self.before_manifest,
            WritePhase::BeforeRename => self.before_rename,
        };
        match action {
            None => Ok(()),
            Some(FailAction::Error) => Err(std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                INJECTED_MESSAGE,
            )),
            Some(FailAction::Exit) => {
                tracing::warn!(?phase, "fail point: exiting");
                std::process::exit(FAILPOINT_EXIT_CODE)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failpoints_parse_known_entries_and_skip_others() {
        let points = Failpoints::parse(
            "store-put=error, checkpoint-before-manifest=exit,checkpoint-before-file=error,",
        )
        .unwrap();
        assert_eq!(
            points,
            Failpoints {
                before_file: Some(FailAction::Error),
                before_manifest: Some(FailAction::Exit),
                before_rename: None,
            }
        );
        assert_eq!(Failpoints::parse("").unwrap(), Failpoints::default());
    }

    #[test]
    fn failpoints_reject_malformed_checkpoint_entries() {
        let err = |spec: &str| Failpoints::parse(spec).unwrap_err().to_string();
        assert_eq!(
            err("checkpoint-before-manifest=crash"),
            "invalid RINGMASTER_FAILPOINT entry \"checkpoint-before-manifest=crash\": \
             the action must be error or exit"
        );
        assert_eq!(
            err("checkpoint-before-manifest"),
            "invalid RINGMASTER_FAILPOINT entry \"checkpoint-before-manifest\": \
             expected <point>=<action>"
        );
        assert!(err("checkpoint-after-rename=error").contains("unknown point"));
    }

    #[test]
    fn error_action_injects_storage_full() {
        let points = Failpoints::parse("checkpoint-before-rename=error").unwrap();
        assert!(points.fire(WritePhase::BeforeManifest).is_ok());
        let e = points.fire(WritePhase::BeforeRename).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::StorageFull);
        assert_eq!(e.to_string(), "no space left on device (injected)");
    }
}
