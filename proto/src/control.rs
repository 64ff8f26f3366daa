//! The `Control` service in domain form: what the coordinator answers about
//! jobs ([`JobView`]), workers ([`WorkerView`]) and itself ([`HealthView`]),
//! the job and worker state enums, checkpoints and submissions, with their
//! conversions. States travel as protobuf enums and are read back with
//! `TryFrom`: an unknown or unspecified value is an error, never a default.
//!
//! The control loop answers with these views; the gRPC handlers turn them
//! into wire messages. Clients (the CLI) read the wire messages and use the
//! accessors here for states.

use crate::{WireError, pb, spec_from_json, spec_to_json};
use ringmaster_common::ids::{JobId, Rank, WorkerId};
use ringmaster_common::jobspec::JobSpec;
use ringmaster_common::records::{
    CheckpointRecord, CordonKind, IncidentKind, IncidentRecord, JobRecord, JobState,
    JobStatusRecord,
};
use ringmaster_common::worker::{Device, WorkerState};

impl From<JobState> for pb::JobState {
    fn from(s: JobState) -> Self {
        match s {
            JobState::Queued => pb::JobState::Queued,
            JobState::Recovering => pb::JobState::Recovering,
            JobState::Running => pb::JobState::Running,
            JobState::Succeeded => pb::JobState::Succeeded,
            JobState::Failed => pb::JobState::Failed,
            JobState::Cancelled => pb::JobState::Cancelled,
        }
    }
}

impl TryFrom<pb::JobState> for JobState {
    type Error = WireError;
    fn try_from(s: pb::JobState) -> Result<Self, Self::Error> {
        Ok(match s {
            pb::JobState::Queued => JobState::Queued,
            pb::JobState::Recovering => JobState::Recovering,
            pb::JobState::Running => JobState::Running,
            pb::JobState::Succeeded => JobState::Succeeded,
            pb::JobState::Failed => JobState::Failed,
            pb::JobState::Cancelled => JobState::Cancelled,
            pb::JobState::Unspecified => return Err(WireError::UnknownJobState(s as i32)),
        })
    }
}

impl pb::JobStatus {
    /// The job's state as the domain type; a value this version does not
    /// know (or none) is an error, never a default.
    pub fn job_state(&self) -> Result<JobState, WireError> {
        let wire = pb::JobState::try_from(self.state)
            .map_err(|_| WireError::UnknownJobState(self.state))?;
        JobState::try_from(wire)
    }
}

impl From<WorkerState> for pb::WorkerState {
    fn from(s: WorkerState) -> Self {
        match s {
            WorkerState::Idle => pb::WorkerState::Idle,
            WorkerState::Busy => pb::WorkerState::Busy,
        }
    }
}

impl TryFrom<pb::WorkerState> for WorkerState {
    type Error = WireError;
    fn try_from(s: pb::WorkerState) -> Result<Self, Self::Error> {
        Ok(match s {
            pb::WorkerState::Idle => WorkerState::Idle,
            pb::WorkerState::Busy => WorkerState::Busy,
            pb::WorkerState::Unspecified => return Err(WireError::UnknownWorkerState(s as i32)),
        })
    }
}

impl pb::WorkerInfo {
    /// The worker's state as the domain type; a value this version does not
    /// know (or none) is an error, never a default.
    pub fn worker_state(&self) -> Result<WorkerState, WireError> {
        let wire = pb::WorkerState::try_from(self.state)
            .map_err(|_| WireError::UnknownWorkerState(self.state))?;
        WorkerState::try_from(wire)
    }

    /// Why the worker takes no new work; `None` when it does. A kind this
    /// version does not know is an error.
    pub fn cordon_view(&self) -> Result<Option<CordonView>, WireError> {
        let kind = match pb::CordonKind::try_from(self.cordon) {
            Ok(pb::CordonKind::None) => return Ok(None),
            Ok(pb::CordonKind::Cordoned) => CordonKind::Cordoned,
            Ok(pb::CordonKind::Draining) => CordonKind::Draining,
            Ok(pb::CordonKind::Quarantined) => CordonKind::Quarantined,
            Err(_) => return Err(WireError::UnknownCordon(self.cordon)),
        };
        Ok(Some(CordonView {
            kind,
            reason: self.cordon_reason.clone(),
            remaining_secs: (self.cordon_remaining_secs > 0).then_some(self.cordon_remaining_secs),
        }))
    }
}

/// Why a worker takes no new work, as `coordinator workers` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CordonView {
    pub kind: CordonKind,
    pub reason: String,
    /// Until a quarantine lifts by itself; `None` lasts until `uncordon`.
    pub remaining_secs: Option<u64>,
}

impl From<CordonKind> for pb::CordonKind {
    fn from(k: CordonKind) -> Self {
        match k {
            CordonKind::Cordoned => pb::CordonKind::Cordoned,
            CordonKind::Draining => pb::CordonKind::Draining,
            CordonKind::Quarantined => pb::CordonKind::Quarantined,
        }
    }
}

/// A job as clients see it: its stored status plus what only the live
/// control loop knows (why a queued job waits). The control loop publishes
/// one to every watcher whenever the job changes.
#[derive(Clone, Debug, PartialEq)]
pub struct JobView {
    pub id: JobId,
    pub name: String,
    pub submitted_at_ms: u64,
    pub status: JobStatusRecord,
    /// While queued: why the job cannot start yet.
    pub waiting: Option<String>,
}

impl JobView {
    /// The view of a stored job; `waiting` is kept only while it is queued
    /// or re-forming.
    pub fn new(job: &JobRecord, status: &JobStatusRecord, waiting: Option<String>) -> JobView {
        JobView {
            id: job.id.clone(),
            name: job.spec.name.clone(),
            submitted_at_ms: job.submitted_at_ms,
            status: status.clone(),
            waiting: waiting
                .filter(|_| matches!(status.state, JobState::Queued | JobState::Recovering)),
        }
    }
}

impl From<JobView> for pb::JobStatus {
    fn from(v: JobView) -> Self {
        let s = v.status;
        pb::JobStatus {
            job_id: v.id.0,
            name: v.name,
            state: pb::JobState::from(s.state) as i32,
            generation: s.generation,
            step: s.step,
            total_steps: s.total_steps,
            metrics: s.metrics.into_iter().collect(),
            output_dir: s.output_dir,
            reason: s.reason.unwrap_or_default(),
            members: s.members,
            submitted_at_ms: v.submitted_at_ms,
            updated_at_ms: s.updated_at_ms,
            events: s.events,
            restarts: s.restarts,
            waiting: v.waiting.unwrap_or_default(),
            incidents: s.incidents.into_iter().map(pb::Incident::from).collect(),
        }
    }
}

impl From<IncidentRecord> for pb::Incident {
    fn from(i: IncidentRecord) -> Self {
        let kind = match i.kind {
            Some(IncidentKind::Loss) => pb::IncidentKind::Loss,
            Some(IncidentKind::Growth) => pb::IncidentKind::Growth,
            Some(IncidentKind::Drain) => pb::IncidentKind::Drain,
            None => pb::IncidentKind::Unspecified,
        };
        pb::Incident {
            kind: kind as i32,
            detected: i.detected,
            detected_at_ms: i.detected_at_ms,
            from_generation: i.from_generation,
            evicted: i.evicted,
            generation: i.generation,
            formed_at_ms: i.formed_at_ms,
            members: i.members,
            state_source: i.state_source,
            state_step: i.state_step,
            transfer_bytes: i.transfer_bytes,
            transfer_seconds: i.transfer_seconds,
            first_step_at_ms: i.first_step_at_ms,
            outcome: i.outcome,
        }
    }
}

impl pb::Incident {
    /// The incident's kind as users read it (`loss`, `growth`, `drain`); a
    /// kind this client does not know shows as `unknown`.
    pub fn kind_name(&self) -> &'static str {
        match pb::IncidentKind::try_from(self.kind) {
            Ok(pb::IncidentKind::Loss) => IncidentKind::Loss.as_str(),
            Ok(pb::IncidentKind::Growth) => IncidentKind::Growth.as_str(),
            Ok(pb::IncidentKind::Drain) => IncidentKind::Drain.as_str(),
            _ => "unknown",
        }
    }

    /// From detection to the first step of the re-formed group.
    pub fn recovery_ms(&self) -> Option<u64> {
        self.first_step_at_ms
            .map(|t| t.saturating_sub(self.detected_at_ms))
    }
}

/// A registered worker as `coordinator workers` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerView {
    pub id: WorkerId,
    pub name: String,
    pub host: String,
    pub device: Device,
    /// The job and rank it holds, while busy.
    pub assignment: Option<(JobId, Rank)>,
    pub last_heartbeat_ms_ago: u64,
    pub data_addr: String,
    /// Why it takes no new work, if it does not.
    pub cordon: Option<CordonView>,
}

impl WorkerView {
    /// Busy exactly while it holds a rank.
    pub fn state(&self) -> WorkerState {
        match self.assignment {
            Some(_) => WorkerState::Busy,
            None => WorkerState::Idle,
        }
    }
}

impl From<WorkerView> for pb::WorkerInfo {
    fn from(w: WorkerView) -> Self {
        let state = pb::WorkerState::from(w.state()) as i32;
        let (job_id, rank) = match w.assignment {
            Some((job, rank)) => (job.0, rank.0),
            None => (String::new(), 0),
        };
        pb::WorkerInfo {
            worker_id: w.id.0,
            name: w.name,
            host: w.host,
            device: w.device.to_string(),
            state,
            job_id,
            rank,
            last_heartbeat_ms_ago: w.last_heartbeat_ms_ago,
            data_addr: w.data_addr,
            cordon: w
                .cordon
                .as_ref()
                .map_or(pb::CordonKind::None, |c| c.kind.into()) as i32,
            cordon_reason: w
                .cordon
                .as_ref()
                .map(|c| c.reason.clone())
                .unwrap_or_default(),
            cordon_remaining_secs: w.cordon.and_then(|c| c.remaining_secs).unwrap_or(0),
        }
    }
}

/// A coordinator's answer about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthView {
    pub role: Role,
    /// Why a leader cannot write its store, or why a standby cannot lead or
    /// find a leader; `None` when healthy.
    pub degraded: Option<String>,
    pub version: String,
}

/// Whether a coordinator leads, with what only a leader knows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    Leader {
        /// The store it writes, as `--store` named it.
        store: String,
        jobs: u32,
        running_jobs: u32,
        workers: u32,
    },
    /// Answers only the health call; everything else it refuses with the
    /// leader's address.
    Standby {
        /// The leader's URL, when known.
        leader: Option<String>,
    },
}

impl From<HealthView> for pb::HealthResponse {
    fn from(h: HealthView) -> Self {
        let mut out = pb::HealthResponse {
            degraded: h.degraded.unwrap_or_default(),
            version: h.version,
            ..Default::default()
        };
        match h.role {
            Role::Leader {
                store,
                jobs,
                running_jobs,
                workers,
            } => {
                out.role = LEADER.into();
                out.store = store;
                out.jobs = jobs;
                out.running_jobs = running_jobs;
                out.workers = workers;
            }
            Role::Standby { leader } => {
                out.role = STANDBY.into();
                out.leader = leader.unwrap_or_default();
            }
        }
        out
    }
}

impl pb::HealthResponse {
    /// Whether the answering coordinator is a standby (it then answers
    /// nothing but this call).
    pub fn is_standby(&self) -> bool {
        self.role == STANDBY
    }
}

/// The roles' names on the wire.
const LEADER: &str = "leader";
const STANDBY: &str = "standby";

impl From<&CheckpointRecord> for pb::CheckpointInfo {
    fn from(c: &CheckpointRecord) -> Self {
        pb::CheckpointInfo {
            step: c.step,
            dir: c.dir.display().to_string(),
            bytes: c.bytes,
            committed: c.committed,
            metrics: c.metrics.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            created_at_ms: c.created_at_ms,
        }
    }
}

impl TryFrom<&pb::SubmitRequest> for JobSpec {
    type Error = WireError;
    fn try_from(req: &pb::SubmitRequest) -> Result<Self, Self::Error> {
        spec_from_json(&req.spec_json)
    }
}

impl From<&JobSpec> for pb::SubmitRequest {
    fn from(spec: &JobSpec) -> Self {
        pb::SubmitRequest {
            spec_json: spec_to_json(spec),
            resume_from: String::new(),
        }
    }
}

// ---- The Control service's requests and replies, so that clients and the
// server never build them field by field.

impl pb::GetJobRequest {
    /// A request about job `id` (get, watch, resume, checkpoint, list its
    /// checkpoints).
    pub fn job(id: &str) -> Self {
        pb::GetJobRequest { job_id: id.into() }
    }
}

impl pb::CancelJobRequest {
    /// Cancels job `id`: after a final checkpoint, or at once with `now`.
    pub fn new(id: &str, now: bool) -> Self {
        pb::CancelJobRequest {
            job_id: id.into(),
            now,
        }
    }
}

impl pb::SubmitRequest {
    /// Submits `spec`, forked from the checkpoint directory `resume_from`
    /// when given (empty: none).
    pub fn new(spec: &JobSpec, resume_from: String) -> Self {
        pb::SubmitRequest {
            resume_from,
            ..pb::SubmitRequest::from(spec)
        }
    }
}

impl From<&JobId> for pb::SubmitResponse {
    fn from(id: &JobId) -> Self {
        pb::SubmitResponse {
            job_id: id.to_string(),
        }
    }
}

impl From<Vec<JobView>> for pb::ListJobsResponse {
    fn from(jobs: Vec<JobView>) -> Self {
        pb::ListJobsResponse {
            jobs: jobs.into_iter().map(pb::JobStatus::from).collect(),
        }
    }
}

impl From<Vec<WorkerView>> for pb::ListWorkersResponse {
    fn from(workers: Vec<WorkerView>) -> Self {
        pb::ListWorkersResponse {
            workers: workers.into_iter().map(pb::WorkerInfo::from).collect(),
        }
    }
}

impl From<&[CheckpointRecord]> for pb::ListCheckpointsResponse {
    fn from(checkpoints: &[CheckpointRecord]) -> Self {
        pb::ListCheckpointsResponse {
            checkpoints: checkpoints.iter().map(pb::CheckpointInfo::from).collect(),
        }
    }
}
