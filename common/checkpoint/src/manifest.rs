//! The checkpoint manifest (`MANIFEST.json`): its serde types, the rules for
//! file names, and bounded reading plus validation of an untrusted manifest.
//! Checking the files against it lives in `verify.rs`.

use std::collections::HashSet;
use std::io::Read;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::CheckpointError;

/// The only format version this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;
/// The manifest's file name inside a checkpoint directory.
pub const MANIFEST_FILE: &str = "MANIFEST.json";
/// Largest `MANIFEST.json` read; a real one is well under a kilobyte.
pub const MAX_MANIFEST_BYTES: u64 = 1 << 20;
/// Most files one checkpoint may hold (besides the manifest).
pub const MAX_FILES: usize = 1024;
/// Longest file name accepted, in bytes (the usual file-system limit).
pub const MAX_FILE_NAME_BYTES: usize = 255;

/// A checkpoint's manifest, as stored in `MANIFEST.json`. One read from disk
/// is only trustworthy after [`CheckpointManifest::read`] (which validates it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointManifest {
    pub format_version: u32,
    pub job_id: String,
    pub step: u64,
    pub created_at_ms: u64,
    /// In the order the files were written.
    pub files: Vec<FileEntry>,
}

/// One file of a checkpoint: a plain name inside the step directory, its
/// exact size and the lowercase hex sha256 of its contents.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    pub name: String,
    pub bytes: u64,
    pub sha256: String,
}

impl CheckpointManifest {
    /// The entry for `name`, if the checkpoint has such a file.
    pub fn file(&self, name: &str) -> Option<&FileEntry> {
        self.files.iter().find(|f| f.name == name)
    }

    /// Sum of the listed files' sizes (the manifest itself not included).
    pub fn total_bytes(&self) -> u64 {
        self.files
            .iter()
            .fold(0u64, |acc, f| acc.saturating_add(f.bytes))
    }

    /// Reads and validates `<dir>/MANIFEST.json`: bounded size, known format
    /// version, valid job id, plain and unique file names, well-formed hashes.
    /// Does not look at the files themselves nor at the directory's name.
    pub fn read(dir: &Path) -> Result<Self, CheckpointError> {
        let path = dir.join(MANIFEST_FILE);
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(CheckpointError::Incomplete {
                    dir: dir.to_path_buf(),
                });
            }
            Err(e) => return Err(CheckpointError::io("read", path, e)),
        };
        if !meta.is_file() {
            return Err(CheckpointError::NotAFile {
                dir: dir.to_path_buf(),
                name: MANIFEST_FILE.to_string(),
            });
        }
        if meta.len() > MAX_MANIFEST_BYTES {
            return Err(CheckpointError::ManifestTooLarge {
                dir: dir.to_path_buf(),
                bytes: meta.len(),
            });
        }
        let mut bytes = Vec::new();
        std::fs::File::open(&path)
            // The file may grow between the stat and the read.
            .and_then(|f| f.take(MAX_MANIFEST_BYTES + 1).read_to_end(&mut bytes))
            .map_err(|e| CheckpointError::io("read", &path, e))?;
        if bytes.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(CheckpointError::ManifestTooLarge {
                dir: dir.to_path_buf(),
                bytes: bytes.len() as u64,
            });
        }
        Self::parse(dir, &bytes)
    }

    /// Parses and validates manifest bytes; `dir` is only used in errors.
    pub fn parse(dir: &Path, bytes: &[u8]) -> Result<Self, CheckpointError> {
        let invalid = |reason: String| CheckpointError::InvalidManifest {
            dir: dir.to_path_buf(),
            reason,
        };
        // Read the version on its own first, so that a manifest from a newer
        // build says "unsupported version" rather than "unknown field".
        #[derive(Deserialize)]
        struct VersionOnly {
            format_version: u64,
        }
        let version: VersionOnly =
            serde_json::from_slice(bytes).map_err(|e| invalid(e.to_string()))?;
        if version.format_version != u64::from(FORMAT_VERSION) {
            return Err(CheckpointError::UnsupportedFormatVersion {
                dir: dir.to_path_buf(),
                found: version.format_version,
            });
        }
        let manifest: CheckpointManifest =
            serde_json::from_slice(bytes).map_err(|e| invalid(e.to_string()))?;
        ringmaster_common::ids::validate_id("job", &manifest.job_id)
            .map_err(|e| invalid(format!("job_id: {e}")))?;
        check_file_names(manifest.files.iter().map(|f| f.name.as_str())).map_err(|e| {
            invalid(match e {
                CheckpointError::InvalidFileName { name, reason } => {
                    format!("file name {name:?}: {reason}")
                }
                other => other.to_string(),
            })
        })?;
        for f in &manifest.files {
            if !is_sha256_hex(&f.sha256) {
                return Err(invalid(format!(
                    "{}: sha256 {:?} is not 64 lowercase hex digits",
                    f.name, f.sha256
                )));
            }
        }
        Ok(manifest)
    }

    /// The manifest as written to disk (pretty JSON, trailing newline).
    pub fn to_json_bytes(&self) -> Vec<u8> {
        let mut bytes =
            serde_json::to_vec_pretty(self).expect("a manifest of strings and integers serializes");
        bytes.push(b'\n');
        bytes
    }
}

/// Checks that `name` is safe as a checkpoint file name: a plain name of
/// `A-Z a-z 0-9 . _ -`, not starting with `.` (which also rules out `.` and
/// `..`), at most [`MAX_FILE_NAME_BYTES`], and not `MANIFEST.json`.
pub fn validate_file_name(name: &str) -> Result<(), CheckpointError> {
    let reject = |reason: String| {
        Err(CheckpointError::InvalidFileName {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() {
        return reject("is empty".into());
    }
    if name.len() > MAX_FILE_NAME_BYTES {
        return reject(format!(
            "is {} bytes long, the limit is {MAX_FILE_NAME_BYTES}",
            name.len()
        ));
    }
    if let Some(ch) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return reject(format!("contains {ch:?}, it must be a plain file name"));
    }
    if name.starts_with('.') {
        return reject("starts with '.'".into());
    }
    if name == MANIFEST_FILE {
        return reject("is reserved for the manifest".into());
    }
    Ok(())
}

/// Every name valid, none twice, at most [`MAX_FILES`].
pub(super) fn check_file_names<'a>(
    names: impl ExactSizeIterator<Item = &'a str>,
) -> Result<(), CheckpointError> {
    if names.len() > MAX_FILES {
        return Err(CheckpointError::TooManyFiles { count: names.len() });
    }
    let mut seen = HashSet::new();
    for name in names {
        validate_file_name(name)?;
        if !seen.insert(name) {
            return Err(CheckpointError::DuplicateFileName {
                name: name.to_string(),
            });
        }
    }
    Ok(())
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}
