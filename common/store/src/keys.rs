//! The state store's key layout, version 1. This doc is the one place it is
//! written down; the functions below are the only code that builds or parses
//! these keys.
//!
//! ```text
//! /ringmaster/v1/jobs/<job>/spec                 JobRecord: immutable validated spec
//! /ringmaster/v1/jobs/<job>/status               JobStatusRecord: state, generation, step, members, updated_at
//! /ringmaster/v1/jobs/<job>/checkpoints/<step>   manifest summary + committed flag
//! /ringmaster/v1/workers/<worker>                WorkerRecord (bound to the coordinator's lease with etcd)
//! /ringmaster/v1/leader                          election key (HA coordinators)
//! /ringmaster/v1/meta/job_seq                    job id counter (decimal u64)
//! ```
//!
//! - `<job>` and `<worker>` are ids following [`ringmaster_common::ids::validate_id`]
//!   (`[a-z0-9-]`, 1 to 80 bytes), so an id is always exactly one segment:
//!   builders refuse anything else, which keeps `job_prefix(a)` from ever
//!   matching keys of a job `a/x`.
//! - `<step>` is zero-padded to 20 digits (the width of `u64::MAX`) so that a
//!   range over a job's checkpoints comes back in numeric step order.
//! - Prefixes end with `/`, so that a job `a` never lists the keys of a job `ab`.
//! - A change of layout bumps `v1`; a coordinator reads only its own version.
//!
//! What is stored under each key (the JSON records) lives in
//! [`ringmaster_common::records`], not here.

use ringmaster_common::ids::{IdError, JobId, WorkerId, validate_id};

/// The root of every key this version of the layout writes.
pub const ROOT: &str = "/ringmaster/v1/";

/// Digits of a zero-padded checkpoint step: `u64::MAX` has 20.
pub const STEP_DIGITS: usize = 20;

/// Which of a job's keys a key is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobKeyKind {
    Spec,
    Status,
    Checkpoint(u64),
}

/// `/ringmaster/v1/jobs/`: every job's keys.
pub fn jobs_prefix() -> String {
    format!("{ROOT}jobs/")
}

/// `/ringmaster/v1/jobs/<job>/`: all keys of one job.
pub fn job_prefix(job: &JobId) -> Result<String, IdError> {
    validate_id("job", job.as_str())?;
    Ok(format!("{ROOT}jobs/{job}/"))
}

/// `/ringmaster/v1/jobs/<job>/spec`
pub fn job_spec(job: &JobId) -> Result<String, IdError> {
    Ok(format!("{}spec", job_prefix(job)?))
}

/// `/ringmaster/v1/jobs/<job>/status`
pub fn job_status(job: &JobId) -> Result<String, IdError> {
    Ok(format!("{}status", job_prefix(job)?))
}

/// `/ringmaster/v1/jobs/<job>/checkpoints/`: one job's checkpoints, which a
/// range returns in step order.
pub fn job_checkpoints_prefix(job: &JobId) -> Result<String, IdError> {
    Ok(format!("{}checkpoints/", job_prefix(job)?))
}

/// `/ringmaster/v1/jobs/<job>/checkpoints/<step>`, step zero-padded to 20
/// digits.
pub fn job_checkpoint(job: &JobId, step: u64) -> Result<String, IdError> {
    Ok(format!(
        "{}{step:0width$}",
        job_checkpoints_prefix(job)?,
        width = STEP_DIGITS
    ))
}

/// `/ringmaster/v1/workers/`: every worker's registration.
pub fn workers_prefix() -> String {
    format!("{ROOT}workers/")
}

/// `/ringmaster/v1/workers/<worker>`
pub fn worker(worker: &WorkerId) -> Result<String, IdError> {
    validate_id("worker", worker.as_str())?;
    Ok(format!("{ROOT}workers/{worker}"))
}

/// `/ringmaster/v1/leader`
pub fn leader() -> String {
    format!("{ROOT}leader")
}

/// `/ringmaster/v1/meta/cordons`: the cordoned workers, by name.
pub fn cordons() -> String {
    format!("{ROOT}meta/cordons")
}

/// `/ringmaster/v1/meta/job_seq`
pub fn job_seq() -> String {
    format!("{ROOT}meta/job_seq")
}

/// Reads a job key back into its job id and kind; `None` for any key that is
/// not exactly one of the job keys above (other layout versions included).
pub fn parse_job_key(key: &str) -> Option<(JobId, JobKeyKind)> {
    let rest = key.strip_prefix(ROOT)?.strip_prefix("jobs/")?;
    let (job, rest) = rest.split_once('/')?;
    let job = JobId::parse(job).ok()?;
    let kind = match rest {
        "spec" => JobKeyKind::Spec,
        "status" => JobKeyKind::Status,
        _ => {
            let step = rest.strip_prefix("checkpoints/")?;
            if step.len() != STEP_DIGITS || !step.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            JobKeyKind::Checkpoint(step.parse().ok()?)
        }
    };
    Some((job, kind))
}

/// Reads a worker key back into its worker id; `None` for anything else.
pub fn parse_worker_key(key: &str) -> Option<WorkerId> {
    let id = key.strip_prefix(ROOT)?.strip_prefix("workers/")?;
    WorkerId::parse(id).ok()
}
