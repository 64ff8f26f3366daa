//! Checkpoints as the control loop sees them: requests to rank 0, the
//! commit of a written checkpoint in the store, retention (records dropped
//! before files; the files are removed off the loop), and the listing, whose
//! on-disk half (`with_uncommitted`) runs off the loop.

use super::{Cluster, ControlError};
use ringmaster_checkpoint::{self as ckpt, CheckpointInfo, KeepBest, Mode, RetentionPolicy};
use ringmaster_common::jobspec::MetricMode;
use ringmaster_common::now_ms;
use ringmaster_common::records::{self, CheckpointRecord, JobState};
use ringmaster_proto::{CheckpointRequest, Command, Metrics, RunId, WrittenCheckpoint};
use ringmaster_store::keys;
use std::collections::BTreeMap;
use std::path::PathBuf;
use tracing::{info, warn};

/// What the control loop knows of a job's checkpoints: the committed ones
/// and where the job's checkpoint directories are.
#[derive(Debug)]
pub struct CommittedCheckpoints {
    pub root: PathBuf,
    pub job: String,
    pub committed: Vec<CheckpointRecord>,
}

/// Adds the checkpoint directories on disk that were never committed (an
/// interrupted write, or one whose commit is in flight), listed as such.
/// Reads the file system, so it runs off the control loop (the gRPC handler
/// calls it on a blocking thread).
pub fn with_uncommitted(c: CommittedCheckpoints) -> Vec<CheckpointRecord> {
    let mut out: BTreeMap<u64, CheckpointRecord> =
        c.committed.into_iter().map(|i| (i.step, i)).collect();
    if let Ok(entries) = ckpt::list_checkpoints(&c.root, &c.job) {
        for e in entries {
            // Not in the store: no generation, metrics or commit time known.
            out.entry(e.step).or_insert_with(|| CheckpointRecord {
                step: e.step,
                dir: e.dir,
                bytes: e.bytes,
                committed: false,
                generation: 0,
                metrics: Default::default(),
                created_at_ms: 0,
            });
        }
    }
    out.into_values().collect()
}

impl Cluster {
    /// Asks a running job's ranks for a checkpoint at their next step
    /// boundary (they agree on the step through their all-reduce).
    pub(super) fn request_checkpoint(&mut self, id: &str, stop: bool) -> Result<(), ControlError> {
        let job = self.job(id)?;
        if job.status.state != JobState::Running {
            return Err(ControlError::WrongState {
                id: id.to_string(),
                state: job.status.state.as_str(),
                what: "only a running job can checkpoint",
            });
        }
        let request = Command::Checkpoint(CheckpointRequest {
            run: job.run(),
            stop,
        });
        // Rank 0 alone: flags from several ranks could land in different
        // steps' all-reduces and take two checkpoints for one request.
        if let Some(worker) = job
            .members
            .first()
            .and_then(|m| m.worker.as_ref())
            .and_then(|w| self.workers.get(w))
        {
            let _ = worker.tx.try_send(request);
        }
        Ok(())
    }

    pub(super) fn list_checkpoints(&self, id: &str) -> Result<CommittedCheckpoints, ControlError> {
        let job = self.job(id)?;
        Ok(CommittedCheckpoints {
            root: job.record.spec.checkpoint.dir.clone(),
            job: id.to_string(),
            committed: job.checkpoints.values().cloned().collect(),
        })
    }

    /// Phase two of a checkpoint: the files are complete on disk (phase one,
    /// by rank 0); recording them in the store commits them. Retention runs
    /// after, deleting store records before files so that a committed
    /// record never points at missing files for long.
    pub(super) async fn commit_checkpoint(
        &mut self,
        run: &RunId,
        step: u64,
        metrics: Metrics,
        w: WrittenCheckpoint,
    ) {
        let id = &run.job;
        if let Err(e) = self.writable() {
            let text = format!("checkpoint at step {step} written but not committed: {e}");
            return self.note(id, text).await;
        }
        let record = CheckpointRecord {
            step,
            dir: w.dir,
            bytes: w.bytes,
            committed: true,
            generation: run.generation.0,
            metrics,
            created_at_ms: now_ms(),
        };
        let key = match keys::job_checkpoint(id, step) {
            Ok(k) => k,
            Err(e) => return warn!(job = %id, "bad checkpoint key: {e}"),
        };
        let written = match records::encode(&key, &record) {
            Ok(bytes) => self.put_settled(&key, bytes).await,
            Err(e) => Err(e.into()),
        };
        if let Err(e) = written {
            warn!(job = %id, step, "could not commit the checkpoint: {e}");
            return;
        }
        info!(job = %id, step, bytes = w.bytes, "checkpoint committed");
        let Some(job) = self.jobs.get_mut(id) else {
            return;
        };
        job.checkpoints.insert(step, record);
        for (k, v) in [
            ("checkpoint_write_seconds", w.write_seconds),
            ("checkpoint_blocked_seconds", w.blocked_seconds),
        ] {
            job.status.metrics.insert(k.to_string(), v);
        }
        // A commit is a store write anyway: the step goes with it, so a
        // restarted coordinator knows how far the job got.
        job.status.step = job.status.step.max(step);
        let status = job.status.clone();
        if let Err(e) = self.persist_status(id, &status).await {
            warn!(job = %id, "could not persist the step of the checkpoint: {e}");
        }
        let Some(job) = self.jobs.get_mut(id) else {
            return;
        };
        let spec = &job.record.spec.checkpoint;
        let policy = RetentionPolicy {
            keep_last: spec.keep_last,
            keep_best: spec.keep_best.as_ref().map(|b| KeepBest {
                metric: b.metric.clone(),
                mode: match b.mode {
                    MetricMode::Min => Mode::Min,
                    MetricMode::Max => Mode::Max,
                },
                count: b.count,
            }),
        };
        let infos: Vec<CheckpointInfo> = job
            .checkpoints
            .values()
            .map(|c| CheckpointInfo {
                step: c.step,
                committed: c.committed,
                metrics: c.metrics.clone(),
            })
            .collect();
        let plan = ckpt::plan_retention(&policy, &infos);
        let root = spec.dir.clone();
        for step in &plan.delete {
            if let Ok(key) = keys::job_checkpoint(id, *step)
                && let Err(e) = self.store.delete(&key).await
            {
                warn!(job = %id, step, "could not drop the checkpoint record: {e}");
                return;
            }
            if let Some(job) = self.jobs.get_mut(id) {
                job.checkpoints.remove(step);
            }
        }
        // File removal is idempotent and also sweeps leftovers of crashed
        // writes; it runs off the control loop.
        let job_id = id.to_string();
        let delete = plan.delete;
        tokio::task::spawn_blocking(move || {
            if let Err(e) = ckpt::gc(&root, &job_id, &delete) {
                warn!(job = %job_id, "checkpoint gc: {e}");
            }
        });
    }
}
