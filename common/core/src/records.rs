//! The JSON records the coordinator keeps in the state store ([`JobRecord`],
//! [`JobStatusRecord`], [`WorkerRecord`]) and the bounded [`encode`] /
//! [`decode`] every read and write of them goes through. Which key holds
//! which record is in [`super::keys`].
//!
//! Records accept unknown fields on decode, so that a coordinator can read
//! records written by a newer one of the same layout version.

use crate::ids::{JobId, WorkerId};
use crate::jobspec::JobSpec;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// The largest record [`encode`] writes and [`decode`] reads: a bound on what
/// an untrusted or damaged store can make the coordinator allocate.
pub const MAX_RECORD_BYTES: usize = 16 << 20;

/// A record that could not be parsed, encoded or decoded. The store crate
/// turns the codec errors into the matching `StoreError` (same text), so
/// code that talks to a store sees one error type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error(
        "unknown job state {0:?}; expected queued, running, recovering, succeeded, failed or cancelled"
    )]
    UnknownJobState(String),
    #[error("encoding record for {key:?}: {detail}")]
    Encode { key: String, detail: String },
    #[error("value for {key:?} is {len} bytes, more than the {max} allowed")]
    TooLarge { key: String, len: usize, max: usize },
    #[error("record at {key:?}: {detail}")]
    Corrupt { key: String, detail: String },
}

/// `/ringmaster/v1/jobs/<job>/spec`: written once at submission, never
/// changed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: JobId,
    pub spec: JobSpec,
    pub submitted_at_ms: u64,
    /// A checkpoint directory the job starts from (a fork), used until the
    /// job has committed checkpoints of its own.
    #[serde(default)]
    pub resume_from: Option<std::path::PathBuf>,
}

/// Where a job is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    /// A member was lost: the survivors hold their state in memory while the
    /// coordinator forms the next generation.
    Recovering,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    /// Every state, in lifecycle order.
    pub const ALL: [JobState; 6] = [
        JobState::Queued,
        JobState::Running,
        JobState::Recovering,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ];

    /// Whether the job is over: no state follows a final one.
    pub fn is_final(self) -> bool {
        match self {
            JobState::Queued | JobState::Running | JobState::Recovering => false,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled => true,
        }
    }

    /// The lowercase name, as stored and as shown by the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Recovering => "recovering",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobState {
    type Err = RecordError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| RecordError::UnknownJobState(s.to_owned()))
    }
}

/// `/ringmaster/v1/jobs/<job>/status`: rewritten on every job transition
/// (never on heartbeats).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobStatusRecord {
    pub state: JobState,
    /// The generation of the job's current (or last) group; 0 before the first.
    pub generation: u64,
    /// The last step reported done.
    pub step: u64,
    pub total_steps: u64,
    /// Latest reported metrics by name. Non-finite values (a diverged loss)
    /// are kept: JSON has no NaN, so they are stored as `"NaN"`, `"inf"`,
    /// `"-inf"`.
    #[serde(with = "metrics_json")]
    pub metrics: BTreeMap<String, f64>,
    /// Worker ids of the current group, by rank.
    pub members: Vec<String>,
    /// Why the job failed or was cancelled.
    pub reason: Option<String>,
    pub output_dir: String,
    pub updated_at_ms: u64,
    /// Notable events, oldest first, bounded (see [`JobStatusRecord::note`]).
    #[serde(default)]
    pub events: Vec<String>,
    /// In-place recoveries so far; `[fault] max_restarts` bounds them.
    #[serde(default)]
    pub restarts: u32,
    /// Each time the job's group broke or was re-formed, oldest first,
    /// bounded (see [`JobStatusRecord::incident`]): `coordinator events`.
    #[serde(default)]
    pub incidents: Vec<IncidentRecord>,
}

/// How many events a status record keeps.
pub const MAX_EVENTS: usize = 32;
/// How many incidents a status record keeps.
pub const MAX_INCIDENTS: usize = 64;

/// Why a job's group was re-formed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IncidentKind {
    /// A member was lost (died, went silent, hung): one restart spent.
    Loss,
    /// Free workers let the job grow.
    Growth,
    /// An admin drained a member.
    Drain,
}

impl IncidentKind {
    pub fn as_str(self) -> &'static str {
        match self {
            IncidentKind::Loss => "loss",
            IncidentKind::Growth => "growth",
            IncidentKind::Drain => "drain",
        }
    }
}

/// One re-forming of a job's group, as its timeline shows it. Times are
/// milliseconds since the epoch; what has not happened (yet) is `None`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct IncidentRecord {
    pub kind: Option<IncidentKind>,
    /// How it was detected, e.g. `worker n2 (rank 2) lost: session closed`.
    pub detected: String,
    pub detected_at_ms: u64,
    /// The generation that broke.
    pub from_generation: u64,
    /// Members that did not come along, each with why (`n2 (rank 2): ...`).
    #[serde(default)]
    pub evicted: Vec<String>,
    /// The generation formed, with its members by rank.
    pub generation: Option<u64>,
    pub formed_at_ms: Option<u64>,
    #[serde(default)]
    pub members: Vec<String>,
    /// The member whose state every other rank received, and its step.
    pub state_source: Option<String>,
    pub state_step: Option<u64>,
    /// What the state transfer moved, as the source reported it.
    pub transfer_bytes: Option<u64>,
    pub transfer_seconds: Option<f64>,
    /// When the new generation completed its first step.
    pub first_step_at_ms: Option<u64>,
    /// How it ended when no generation formed (`requeued: ...`, `failed`).
    pub outcome: Option<String>,
}

impl IncidentRecord {
    /// From detection to the first step of the re-formed group, when both
    /// are known.
    pub fn recovery_ms(&self) -> Option<u64> {
        self.first_step_at_ms
            .map(|t| t.saturating_sub(self.detected_at_ms))
    }
}

impl JobStatusRecord {
    /// Appends an event, dropping the oldest beyond [`MAX_EVENTS`].
    pub fn note(&mut self, event: impl Into<String>) {
        self.events.push(event.into());
        if self.events.len() > MAX_EVENTS {
            let extra = self.events.len() - MAX_EVENTS;
            self.events.drain(..extra);
        }
    }

    /// The status of a job just submitted.
    pub fn queued(total_steps: u64, output_dir: String, now_ms: u64) -> Self {
        JobStatusRecord {
            state: JobState::Queued,
            generation: 0,
            step: 0,
            total_steps,
            metrics: BTreeMap::new(),
            members: Vec::new(),
            reason: None,
            output_dir,
            updated_at_ms: now_ms,
            events: Vec::new(),
            restarts: 0,
            incidents: Vec::new(),
        }
    }

    /// Opens an incident, dropping the oldest beyond [`MAX_INCIDENTS`].
    pub fn incident(&mut self, incident: IncidentRecord) {
        self.incidents.push(incident);
        if self.incidents.len() > MAX_INCIDENTS {
            let extra = self.incidents.len() - MAX_INCIDENTS;
            self.incidents.drain(..extra);
        }
    }

    /// The newest incident, while its group has not completed a step.
    pub fn open_incident(&mut self) -> Option<&mut IncidentRecord> {
        self.incidents
            .last_mut()
            .filter(|i| i.first_step_at_ms.is_none() && i.outcome.is_none())
    }
}

/// `/ringmaster/v1/jobs/<job>/checkpoints/<step>`: written when a checkpoint
/// is committed (its files and manifest are complete on disk), deleted by
/// retention before its files are.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointRecord {
    pub step: u64,
    pub dir: std::path::PathBuf,
    pub bytes: u64,
    pub committed: bool,
    pub generation: u64,
    /// The job's latest metrics when the checkpoint was taken.
    #[serde(with = "metrics_json")]
    pub metrics: BTreeMap<String, f64>,
    pub created_at_ms: u64,
}

/// `/ringmaster/v1/workers/<worker>`: a worker's registration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerRecord {
    pub id: WorkerId,
    /// The name the worker chose (defaults to its host name).
    pub name: String,
    pub host: String,
    /// The device it trains on, e.g. `cpu` or `cuda:0`.
    pub device: String,
    /// Where its peers reach its data plane (`host:port`).
    pub data_addr: String,
    pub registered_at_ms: u64,
}

/// Why a worker takes no new work: an admin's `cordon` or `drain`, or an
/// automatic quarantine after repeated incidents.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CordonKind {
    /// No new placements; work it already holds continues.
    Cordoned,
    /// Leaves its job at a step boundary once the job can re-form without
    /// it, then takes no work (shown as cordoned once it is free).
    Draining,
    /// Cordoned automatically until `until_ms`.
    Quarantined,
}

impl CordonKind {
    /// The lowercase name the CLI shows.
    pub fn as_str(self) -> &'static str {
        match self {
            CordonKind::Cordoned => "cordoned",
            CordonKind::Draining => "draining",
            CordonKind::Quarantined => "quarantined",
        }
    }
}

/// One worker's cordon.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CordonRecord {
    pub kind: CordonKind,
    pub reason: String,
    pub since_ms: u64,
    /// When it lifts by itself (a quarantine); `None` lasts until `uncordon`.
    #[serde(default)]
    pub until_ms: Option<u64>,
}

/// `/ringmaster/v1/meta/cordons`: every cordon, by worker *name* (a worker
/// gets a new id each time it registers; its name is what an admin means).
/// One key, since cordons change rarely and are read once at start.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CordonsRecord {
    pub workers: BTreeMap<String, CordonRecord>,
}

/// Serializes a record for `key`, refusing what [`decode`] would refuse.
pub fn encode<T: Serialize>(key: &str, record: &T) -> Result<Vec<u8>, RecordError> {
    let bytes = serde_json::to_vec(record).map_err(|err| RecordError::Encode {
        key: key.to_owned(),
        detail: err.to_string(),
    })?;
    if bytes.len() > MAX_RECORD_BYTES {
        return Err(RecordError::TooLarge {
            key: key.to_owned(),
            len: bytes.len(),
            max: MAX_RECORD_BYTES,
        });
    }
    Ok(bytes)
}

/// Decodes the record stored at `key`; values over [`MAX_RECORD_BYTES`] are
/// refused before parsing, and bytes that are not the expected record are
/// [`StoreError::Corrupt`] naming the key.
pub fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, RecordError> {
    if bytes.len() > MAX_RECORD_BYTES {
        return Err(RecordError::TooLarge {
            key: key.to_owned(),
            len: bytes.len(),
            max: MAX_RECORD_BYTES,
        });
    }
    serde_json::from_slice(bytes).map_err(|err| RecordError::Corrupt {
        key: key.to_owned(),
        detail: err.to_string(),
    })
}

/// JSON for metric maps that keeps NaN and infinities, which `serde_json`
/// would write as `null` and then fail to read back.
mod metrics_json {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use std::collections::BTreeMap;

    #[derive(Serialize, Deserialize)]
    #[serde(untagged)]
    enum Metric {
        Finite(f64),
        Special(String),
    }

    pub fn serialize<S: Serializer>(
        metrics: &BTreeMap<String, f64>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        let out: BTreeMap<&str, Metric> = metrics
            .iter()
            .map(|(name, &value)| {
                let metric = if value.is_nan() {
                    Metric::Special("NaN".to_owned())
                } else if value == f64::INFINITY {
                    Metric::Special("inf".to_owned())
                } else if value == f64::NEG_INFINITY {
                    Metric::Special("-inf".to_owned())
                } else {
                    Metric::Finite(value)
                };
                (name.as_str(), metric)
            })
            .collect();
        out.serialize(serializer)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<BTreeMap<String, f64>, D::Error> {
        let raw = BTreeMap::<String, Metric>::deserialize(deserializer)?;
        raw.into_iter()
            .map(|(name, metric)| {
                let value = match metric {
                    Metric::Finite(value) => value,
                    Metric::Special(text) => match text.as_str() {
                        "NaN" => f64::NAN,
                        "inf" => f64::INFINITY,
                        "-inf" => f64::NEG_INFINITY,
                        _ => {
                            return Err(serde::de::Error::custom(format!(
                                "metric {name:?} is {text:?}, not a number, \"NaN\", \"inf\" or \"-inf\""
                            )));
                        }
                    },
                };
                Ok((name, value))
            })
            .collect()
    }
}
