//! Newtype ids so that a job id, a worker id, a rank and a generation can not
//! be mixed up in signatures, and the one rule for what a job or worker id may
//! contain (`JobId::parse`, `WorkerId::parse`). Store keys built from ids live
//! in `store::keys`, not here.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A job's id: `<name>-<sequence>`, unique within one store.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct JobId(pub String);

/// A worker's id, assigned by the coordinator when the worker registers.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct WorkerId(pub String);

/// A rank within one generation of a job's group, `0..world_size`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Rank(pub u32);

/// A job's generation: bumped every time its group is (re)formed. Messages from
/// an older generation are refused (fencing).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub struct Generation(pub u64);

impl Rank {
    /// The rank as an index into its group's members.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl Generation {
    /// The generation after this one.
    pub fn next(self) -> Self {
        Generation(self.0 + 1)
    }
}

macro_rules! display_inner {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }
    )*};
}
display_inner!(JobId, WorkerId, Rank, Generation);

/// The longest job or worker id accepted, in bytes.
pub const MAX_ID_LEN: usize = 80;

/// Why a string is not a valid job or worker id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{kind} id is empty")]
    Empty { kind: &'static str },
    #[error("{kind} id is {len} bytes long, the limit is {MAX_ID_LEN}")]
    TooLong { kind: &'static str, len: usize },
    #[error("{kind} id {id:?} contains {ch:?}; only a-z, 0-9 and '-' are allowed")]
    InvalidChar {
        kind: &'static str,
        id: String,
        ch: char,
    },
}

/// Checks the id rule shared by jobs and workers: `[a-z0-9-]`, 1 to
/// [`MAX_ID_LEN`] bytes. The rule keeps ids safe as one segment of a store key
/// (no `/`) and of a file name.
pub fn validate_id(kind: &'static str, id: &str) -> Result<(), IdError> {
    if id.is_empty() {
        return Err(IdError::Empty { kind });
    }
    if id.len() > MAX_ID_LEN {
        return Err(IdError::TooLong {
            kind,
            len: id.len(),
        });
    }
    if let Some(ch) = id
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(IdError::InvalidChar {
            kind,
            id: id.to_owned(),
            ch,
        });
    }
    Ok(())
}

impl JobId {
    /// Parses untrusted input (RPCs, CLI arguments, store keys) into a job id.
    pub fn parse(s: &str) -> Result<JobId, IdError> {
        validate_id("job", s)?;
        Ok(JobId(s.to_owned()))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl WorkerId {
    /// Parses untrusted input (RPCs, CLI arguments, store keys) into a worker
    /// id; the rule is the same as for job ids.
    pub fn parse(s: &str) -> Result<WorkerId, IdError> {
        validate_id("worker", s)?;
        Ok(WorkerId(s.to_owned()))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}
