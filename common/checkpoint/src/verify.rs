//! Verifying a checkpoint directory against its manifest: every listed file
//! present, of the recorded size and sha256 (hashed in a stream, never read
//! whole into memory). Choosing which checkpoint to load lives in `list.rs`.

use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::{CheckpointError, CheckpointManifest, parse_step_dir_name};

/// Read buffer for hashing; large enough that syscalls do not dominate.
const HASH_CHUNK: usize = 1 << 20;

/// Checks that `dir` (a `step-<N>` directory) holds a complete, intact
/// checkpoint and returns its manifest. The manifest must exist (otherwise
/// [`CheckpointError::Incomplete`]), be valid, name the same step as the
/// directory, and every file it lists must match its size and sha256. Files
/// the manifest does not list are ignored. The manifest's job id is not
/// compared with the parent directory: a checkpoint may be copied elsewhere
/// to fork from it ([`super::latest_valid`] does compare it).
pub fn verify_checkpoint(dir: &Path) -> Result<CheckpointManifest, CheckpointError> {
    let dir_step = dir
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(parse_step_dir_name)
        .ok_or_else(|| CheckpointError::NotAStepDir {
            dir: dir.to_path_buf(),
        })?;
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => {
            return Err(CheckpointError::NotAStepDir {
                dir: dir.to_path_buf(),
            });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(CheckpointError::Missing {
                dir: dir.to_path_buf(),
            });
        }
        Err(e) => return Err(CheckpointError::io("read", dir, e)),
    }
    let manifest = CheckpointManifest::read(dir)?;
    if manifest.step != dir_step {
        return Err(CheckpointError::StepMismatch {
            dir: dir.to_path_buf(),
            dir_step,
            manifest_step: manifest.step,
        });
    }
    for entry in &manifest.files {
        // The name was validated as a plain name by `read`, so this stays
        // inside `dir`.
        let path = dir.join(&entry.name);
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(CheckpointError::FileMissing {
                    dir: dir.to_path_buf(),
                    name: entry.name.clone(),
                });
            }
            Err(e) => return Err(CheckpointError::io("read", path, e)),
        };
        if !meta.is_file() {
            return Err(CheckpointError::NotAFile {
                dir: dir.to_path_buf(),
                name: entry.name.clone(),
            });
        }
        if meta.len() != entry.bytes {
            return Err(CheckpointError::SizeMismatch {
                dir: dir.to_path_buf(),
                name: entry.name.clone(),
                expected: entry.bytes,
                actual: meta.len(),
            });
        }
        let (bytes, actual) = hash_file(&path)?;
        if bytes != entry.bytes {
            // Changed between the stat and the read.
            return Err(CheckpointError::SizeMismatch {
                dir: dir.to_path_buf(),
                name: entry.name.clone(),
                expected: entry.bytes,
                actual: bytes,
            });
        }
        if actual != entry.sha256 {
            return Err(CheckpointError::HashMismatch {
                dir: dir.to_path_buf(),
                name: entry.name.clone(),
                expected: entry.sha256.clone(),
                actual,
            });
        }
    }
    Ok(manifest)
}

/// Size and lowercase hex sha256 of a file, read in chunks.
fn hash_file(path: &Path) -> Result<(u64, String), CheckpointError> {
    let io_err = |e| CheckpointError::io("read", path, e);
    let mut file = std::fs::File::open(path).map_err(io_err)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; HASH_CHUNK];
    let mut total = 0u64;
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err(e)),
        };
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((total, hex::encode(hasher.finalize())))
}
