//! How the control loop handles a worker's reports after its registration
//! (progress, checkpoints, notes and run ends, each fenced by its `RunId`): a
//! rank's success, and who is to blame when only peers' reports of closed
//! connections arrive.

use super::Cluster;
use super::jobs::Job;
use super::membership::Assignment;
use super::timers::TimerKind;
use ringmaster_common::ids::{JobId, Rank, WorkerId};
use ringmaster_common::now_ms;
use ringmaster_common::records::JobState;
use ringmaster_proto::{CheckpointReport, FailureCause, Metrics, RunOutcome, WorkerReport};
use std::collections::BTreeSet;
use tracing::{info, warn};

/// A rank's report that its run failed on the data plane.
#[derive(Clone, Debug)]
pub(super) struct PeerReport {
    rank: Rank,
    /// The peer whose connection closed, when the rank could tell.
    lost: Option<Rank>,
    text: String,
}

impl Cluster {
    pub(super) async fn on_worker_report(&mut self, id: WorkerId, report: WorkerReport) {
        let Some(worker) = self.workers.get_mut(&id) else {
            return;
        };
        let assignment = worker.assignment.clone();
        match report {
            WorkerReport::Heartbeat | WorkerReport::Register(_) => {}
            // Recovery is not built yet: a parked rank is a lost group, as a
            // data-plane failure was before.
            WorkerReport::Parked(p) => {
                let Some(Assignment { run, rank }) = assignment else {
                    return;
                };
                if p.run != run {
                    return; // fenced
                }
                self.member_parked(&id, rank, p).await;
            }
            WorkerReport::Rebound(r) => {
                let Some(Assignment { run, rank }) = assignment else {
                    return;
                };
                if r.run != run || rank != Rank(0) {
                    return; // fenced
                }
                if let Some(job) = self.jobs.get_mut(&run.job)
                    && let Some(open) = job.status.open_incident()
                    && open.generation == Some(run.generation.0)
                    && let Some((bytes, seconds)) = r.transfer
                {
                    open.transfer_bytes = Some(bytes);
                    open.transfer_seconds = Some(seconds);
                    job.publish();
                }
            }
            WorkerReport::Progress(p) => {
                let Some(Assignment { run, rank }) = assignment else {
                    return;
                };
                if p.run != run || rank != Rank(0) {
                    return; // fenced: stale generation, or not the reporting rank
                }
                // The first step of a re-formed group closes its incident
                // (written once, so the timeline outlives a restart).
                if let Some(job) = self.jobs.get_mut(&run.job)
                    && let Some(open) = job.status.open_incident()
                    && open.generation == Some(run.generation.0)
                {
                    open.first_step_at_ms = Some(now_ms());
                    if let Some(ms) = open.recovery_ms() {
                        info!(job = %run.job, generation = run.generation.0,
                            "first step {ms} ms after the incident was detected");
                    }
                    let status = job.status.clone();
                    if let Err(e) = self.persist_status(&run.job, &status).await {
                        warn!(job = %run.job, "could not persist the incident: {e}");
                    }
                }
                if self.draining_any() {
                    // A drain waiting for the state to be handed on.
                    Box::pin(self.settle_drains()).await;
                }
                if let Some(job) = self.jobs.get_mut(&run.job)
                    && job.status.state == JobState::Running
                {
                    // The length of the run is written once per generation
                    // (not per report), so that a restarted coordinator shows
                    // where the job was rather than `0/0`.
                    let learned_total = job.status.total_steps != p.total_steps;
                    job.status.step = p.step;
                    job.status.total_steps = p.total_steps;
                    job.status.metrics.extend(p.metrics);
                    job.status.updated_at_ms = now_ms();
                    job.publish();
                    if learned_total {
                        let status = job.status.clone();
                        if let Err(e) = self.persist_status(&run.job, &status).await {
                            warn!(job = %run.job, "could not persist the run length: {e}");
                        }
                    }
                }
            }
            WorkerReport::Checkpoint(r) => {
                let Some(Assignment { run, .. }) = assignment else {
                    return;
                };
                if r.run != run {
                    return; // fenced
                }
                let CheckpointReport {
                    step,
                    metrics,
                    outcome,
                    ..
                } = r;
                let committed = match outcome {
                    Ok(written) => {
                        self.commit_checkpoint(&run, step, metrics, written).await;
                        self.jobs
                            .get(&run.job)
                            .is_some_and(|j| j.checkpoints.contains_key(&step))
                    }
                    Err(error) => {
                        let text = format!("checkpoint at step {step} failed: {error}");
                        self.note(&run.job, text).await;
                        false
                    }
                };
                if self
                    .jobs
                    .get(&run.job)
                    .is_some_and(|j| j.status.state == JobState::Recovering)
                {
                    self.saved_for_requeue(&run.job, committed).await;
                }
            }
            WorkerReport::Note(n) => {
                let Some(Assignment { run, .. }) = assignment else {
                    return;
                };
                if n.run == run {
                    self.note(&run.job, n.text).await;
                }
            }
            WorkerReport::Ended(e) => {
                let Some(Assignment { run, rank }) = assignment else {
                    return;
                };
                if e.run != run {
                    warn!(worker = %id, job = %e.run.job, "ignoring a report for a stale generation");
                    return;
                }
                if let Some(w) = self.workers.get_mut(&id) {
                    w.assignment = None;
                }
                // A member of a re-forming job that ends instead of parking
                // holds no state to bring (a transfer into it broke, say).
                if self
                    .jobs
                    .get(&run.job)
                    .is_some_and(|j| j.status.state == JobState::Recovering)
                {
                    let why = match e.outcome {
                        RunOutcome::Failed { reason, .. } => reason,
                        RunOutcome::Succeeded { .. } => "ended instead of holding its state".into(),
                    };
                    self.member_lost(&run.job, run.generation, rank, why).await;
                    return;
                }
                match e.outcome {
                    RunOutcome::Succeeded { stopped } => {
                        self.rank_succeeded(&run.job, rank, e.step, e.metrics, stopped)
                            .await
                    }
                    RunOutcome::Failed {
                        reason,
                        cause: FailureCause::DataPlane { lost_peer },
                    } => {
                        // A closed connection says a peer is gone, not which
                        // one died first: a dead worker's own session break
                        // (or its silence) outranks this, so wait briefly for
                        // it.
                        let window = self.cfg.blame_window();
                        if let Some(job) = self.jobs.get_mut(&run.job)
                            && job.status.state == JobState::Running
                            && job.generation() == run.generation
                        {
                            job.peer_reports.push(PeerReport {
                                rank,
                                lost: lost_peer,
                                text: reason,
                            });
                            if !job.has_timer(TimerKind::Blame) {
                                job.set_timer(TimerKind::Blame, window);
                            }
                        }
                    }
                    RunOutcome::Failed {
                        reason,
                        cause: FailureCause::OwnWork,
                    } => {
                        let name = self.workers.get(&id).map(|w| w.info.name.clone());
                        let reason = format!(
                            "rank {rank} on worker {} failed: {reason}",
                            name.unwrap_or_default(),
                        );
                        self.fail(&run.job, run.generation, reason).await;
                    }
                }
                self.schedule().await;
            }
        }
    }

    /// The reason a job fails with when only peers' reports of closed
    /// connections arrived and no member's session broke within the blame
    /// window: the one rank every report names, if they agree and it did
    /// not report itself; otherwise what each rank reported.
    pub(super) fn blame_from_reports(&self, job: &Job) -> String {
        let reporters: BTreeSet<Rank> = job.peer_reports.iter().map(|r| r.rank).collect();
        let blamed: BTreeSet<Rank> = job.peer_reports.iter().filter_map(|r| r.lost).collect();
        if blamed.len() == 1
            && let Some(&lost) = blamed.iter().next()
            && !reporters.contains(&lost)
            && job.peer_reports.iter().all(|r| r.lost == Some(lost))
        {
            let by: Vec<String> = reporters.iter().map(|r| r.to_string()).collect();
            return format!(
                "worker {} lost: ring connection closed (reported by rank {}); its session to the \
                 coordinator stayed open",
                job.member_label(lost),
                by.join(", ")
            );
        }
        let what: Vec<String> = job
            .peer_reports
            .iter()
            .map(|r| format!("{} reported: {}", job.member_label(r.rank), r.text))
            .collect();
        format!(
            "the data plane failed while every worker stayed connected; {}",
            what.join("; ")
        )
    }

    /// A rank finished its run (`stopped`: early, on request, after its
    /// final checkpoint); the job ends when every rank has.
    async fn rank_succeeded(
        &mut self,
        id: &JobId,
        rank: Rank,
        step: u64,
        metrics: Metrics,
        stopped: bool,
    ) {
        let Some(job) = self.jobs.get_mut(id) else {
            return;
        };
        job.finished.insert(rank);
        if rank == Rank(0) {
            job.status.step = step;
            job.status.metrics.extend(metrics);
        }
        if job.finished.len() == job.members.len() {
            if stopped && job.handover {
                job.handover = false;
                self.requeue(id, "moved off its draining workers").await;
            } else if stopped {
                let reason = format!("cancelled by user at step {step}");
                self.finish(id, JobState::Cancelled, Some(reason)).await;
            } else {
                // Only early stopping ends a run that was not asked to stop
                // before its last step.
                if step < job.status.total_steps {
                    let total = job.status.total_steps;
                    job.status.note(format!(
                        "stopped early at step {step} of {total}: the \
                                       validation score stopped improving"
                    ));
                }
                self.finish(id, JobState::Succeeded, None).await;
            }
        }
    }
}
