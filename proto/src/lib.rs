//! Ringmaster's wire protocol: the tonic/prost code generated from
//! `proto/ringmaster.proto` (module [`pb`]), the domain form of every message
//! the services exchange, and the conversions between the two: `From`
//! outbound, `TryFrom` inbound, because inbound data can be malformed. Every
//! inbound conversion is bounded (string lengths, list and metric-map sizes:
//! the `MAX_*` constants) and refuses what does not make a domain value with a
//! [`WireError`]; nothing outside this crate builds or reads wire messages
//! field by field.
//!
//! - [`session`]: the `Agent` service's worker session, [`WorkerReport`] up
//!   and [`Command`] down.
//! - [`control`]: the `Control` service's replies ([`JobView`],
//!   [`WorkerView`], [`HealthView`]), job and worker states, checkpoints and
//!   submissions.
//!
//! The building blocks (ids, `JobSpec`, `JobState`, `Device`, store records)
//! live in `ringmaster-common`; this crate only adds what exists because two
//! processes talk.

#![forbid(unsafe_code)]

use ringmaster_common::ids::IdError;
use ringmaster_common::jobspec::{self, JobSpec};
use ringmaster_common::worker::DeviceError;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

/// Generated protobuf and gRPC code (package `ringmaster.v1`).
pub mod pb {
    tonic::include_proto!("ringmaster.v1");
}

pub mod control;
pub mod session;
#[cfg(test)]
mod tests;

pub use control::{CordonView, HealthView, JobView, Role, WorkerView};
pub use session::{
    AbortTraining, CheckpointReport, CheckpointRequest, Command, CurrentRun, FailureCause, Metrics,
    Note, Parked, PrepareJob, Progress, Rebound, Registered, Registration, RunId, RunOutcome,
    StartTraining, TrainingEnded, WorkerReport, WrittenCheckpoint,
};

/// Version of the worker session protocol; a registration of another
/// version is refused ([`WireError::ProtocolVersion`]).
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest job spec accepted over the wire, in bytes of JSON.
pub const MAX_SPEC_BYTES: usize = 1 << 20;
/// Longest name, host name, device label, instance or network address
/// (`host:port`) accepted, in bytes. Host names are at most 253.
pub const MAX_LABEL_BYTES: usize = 256;
/// Longest free text accepted (a failure reason, a note, a checkpoint
/// error), in bytes: far above any message Ringmaster writes, far below what
/// would hurt the coordinator, which keeps reasons in its store records.
pub const MAX_TEXT_BYTES: usize = 64 << 10;
/// Longest file path accepted, in bytes (Linux's `PATH_MAX`).
pub const MAX_PATH_BYTES: usize = 4096;
/// Most metrics one report may carry (a trainer reports a handful).
pub const MAX_METRICS: usize = 256;
/// Longest metric name accepted, in bytes.
pub const MAX_METRIC_NAME_BYTES: usize = 128;
/// Most peers a start command may list: the largest world size a job can ask
/// for.
pub const MAX_PEERS: usize = jobspec::MAX_WORKERS as usize;
/// Most checkpoint directories a start command may list to resume from. A
/// job without retention keeps every checkpoint, so the bound is generous;
/// gRPC's 4 MiB message limit is what binds first in practice.
pub const MAX_RESUME_CANDIDATES: usize = 65_536;

/// Inbound wire data that does not make a valid domain value.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum WireError {
    #[error("job spec is {0} bytes, more than the {MAX_SPEC_BYTES} allowed")]
    SpecTooLarge(usize),
    #[error("job spec is not valid JSON for this version: {0}")]
    SpecMalformed(String),
    #[error("job spec is invalid: {0}")]
    SpecInvalid(String),
    #[error("unknown job state {0} on the wire")]
    UnknownJobState(i32),
    #[error("unknown worker state {0} on the wire")]
    UnknownWorkerState(i32),
    #[error("unknown cordon kind {0} on the wire")]
    UnknownCordon(i32),
    /// Checked before anything else in a registration, so a worker of
    /// another version hears about the version, not about a field it fills
    /// differently.
    #[error("worker speaks protocol {0}, this coordinator speaks {PROTOCOL_VERSION}")]
    ProtocolVersion(u32),
    /// A message whose `oneof` is not set (or set to a kind this version
    /// does not know).
    #[error("{0} has no kind")]
    NoKind(&'static str),
    #[error("{field} is {len} bytes, more than the {max} allowed")]
    TooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{field} has {count} entries, more than the {max} allowed")]
    TooMany {
        field: &'static str,
        count: usize,
        max: usize,
    },
    #[error(
        "a metric name in {field} is {len} bytes, more than the {MAX_METRIC_NAME_BYTES} allowed"
    )]
    MetricNameTooLong { field: &'static str, len: usize },
    #[error("rank {rank} is outside a group of {world}")]
    RankOutOfRange { rank: u32, world: usize },
    /// A report whose fields contradict each other or are out of range.
    #[error("{0} is malformed")]
    Malformed(&'static str),
    #[error(transparent)]
    Id(#[from] IdError),
    #[error(transparent)]
    Device(#[from] DeviceError),
}

/// Decodes and re-validates a job spec received as JSON.
pub fn spec_from_json(json: &str) -> Result<JobSpec, WireError> {
    if json.len() > MAX_SPEC_BYTES {
        return Err(WireError::SpecTooLarge(json.len()));
    }
    let spec: JobSpec =
        serde_json::from_str(json).map_err(|e| WireError::SpecMalformed(e.to_string()))?;
    spec.check().map_err(WireError::SpecInvalid)?;
    Ok(spec)
}

/// Encodes a job spec for the wire.
pub fn spec_to_json(spec: &JobSpec) -> String {
    // A JobSpec holds only strings, numbers, paths and enums: it always
    // serialises.
    serde_json::to_string(spec).unwrap_or_default()
}

/// `s` if it is at most `max` bytes long.
fn bounded(field: &'static str, s: String, max: usize) -> Result<String, WireError> {
    if s.len() > max {
        return Err(WireError::TooLong {
            field,
            len: s.len(),
            max,
        });
    }
    Ok(s)
}

/// A name, host, address or other short label.
fn label(field: &'static str, s: String) -> Result<String, WireError> {
    bounded(field, s, MAX_LABEL_BYTES)
}

/// Free text: a reason, a note.
fn text(field: &'static str, s: String) -> Result<String, WireError> {
    bounded(field, s, MAX_TEXT_BYTES)
}

/// A file path.
fn path(field: &'static str, s: String) -> Result<PathBuf, WireError> {
    bounded(field, s, MAX_PATH_BYTES).map(PathBuf::from)
}

/// `items`, if there are at most `max` of them.
fn at_most<T>(field: &'static str, items: Vec<T>, max: usize) -> Result<Vec<T>, WireError> {
    if items.len() > max {
        return Err(WireError::TooMany {
            field,
            count: items.len(),
            max,
        });
    }
    Ok(items)
}

/// A metric map, bounded in entries and name length. Values are taken as
/// they are: a diverged loss is NaN or infinite and still worth showing.
fn metrics(field: &'static str, m: HashMap<String, f64>) -> Result<Metrics, WireError> {
    if m.len() > MAX_METRICS {
        return Err(WireError::TooMany {
            field,
            count: m.len(),
            max: MAX_METRICS,
        });
    }
    m.into_iter()
        .map(|(k, v)| match k.len() {
            len if len > MAX_METRIC_NAME_BYTES => Err(WireError::MetricNameTooLong { field, len }),
            _ => Ok((k, v)),
        })
        .collect::<Result<BTreeMap<_, _>, _>>()
}

/// The wire form of a metric map.
fn metrics_out(m: Metrics) -> HashMap<String, f64> {
    m.into_iter().collect()
}
