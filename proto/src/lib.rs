//! Ringmaster's wire protocol: the tonic/prost code generated from
//! `proto/ringmaster.proto` (module [`pb`]) and the conversions between wire
//! and domain types: `From` outbound, `TryFrom` inbound, because inbound data
//! can be malformed. Domain types live in `ringmaster-common`; nothing outside
//! this crate builds wire messages field by field.

use ringmaster_common::jobspec::JobSpec;
use ringmaster_common::store::records::{CheckpointRecord, JobRecord, JobState, JobStatusRecord};

/// Generated protobuf and gRPC code (package `ringmaster.v1`).
pub mod pb {
    tonic::include_proto!("ringmaster.v1");
}

/// Largest job spec accepted over the wire, in bytes of JSON.
pub const MAX_SPEC_BYTES: usize = 1 << 20;

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
}

impl From<JobState> for pb::JobState {
    fn from(s: JobState) -> Self {
        match s {
            JobState::Queued => pb::JobState::Queued,
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

impl From<(&JobRecord, &JobStatusRecord)> for pb::JobStatus {
    fn from((job, status): (&JobRecord, &JobStatusRecord)) -> Self {
        pb::JobStatus {
            job_id: job.id.to_string(),
            name: job.spec.name.clone(),
            state: pb::JobState::from(status.state) as i32,
            generation: status.generation,
            step: status.step,
            total_steps: status.total_steps,
            metrics: status
                .metrics
                .iter()
                .map(|(k, v)| (k.clone(), *v))
                .collect(),
            output_dir: status.output_dir.clone(),
            reason: status.reason.clone().unwrap_or_default(),
            members: status.members.clone(),
            submitted_at_ms: job.submitted_at_ms,
            updated_at_ms: status.updated_at_ms,
            events: status.events.clone(),
            waiting: String::new(),
        }
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_job_state_survives_the_wire_and_unknown_ones_are_refused() {
        for state in JobState::ALL {
            let status = pb::JobStatus {
                state: pb::JobState::from(state) as i32,
                ..Default::default()
            };
            assert_eq!(status.job_state(), Ok(state));
        }
        for bad in [0, 6, -1] {
            let status = pb::JobStatus {
                state: bad,
                ..Default::default()
            };
            assert_eq!(status.job_state(), Err(WireError::UnknownJobState(bad)));
        }
    }
}
