//! Ringmaster's wire protocol: the tonic/prost code generated from
//! `proto/ringmaster.proto` (module [`pb`]) and the conversions between wire
//! and domain types: `From` outbound, `TryFrom` inbound, because inbound data
//! can be malformed. Domain types live in `ringmaster-common`; nothing outside
//! this crate builds wire messages field by field.

use ringmaster_common::jobspec::JobSpec;
use ringmaster_common::store::records::{CheckpointRecord, JobRecord, JobStatusRecord};

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
            state: status.state.as_str().to_string(),
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
