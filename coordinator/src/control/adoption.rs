//! Adoption, run by the control loop when a registration reports a run: the
//! worker takes its rank back when that run is the job's current generation
//! (after a coordinator restart, or a reconnect); a run that is not current
//! here is told to stop.

use super::Cluster;
use super::jobs::Member;
use super::membership::Assignment;
use super::timers::TimerKind;
use ringmaster_common::ids::Rank;
use ringmaster_common::ids::WorkerId;
use ringmaster_common::records::JobState;
use ringmaster_proto::{AbortTraining, Command, CurrentRun, Parked, RunId};
use tracing::info;

impl Cluster {
    /// A worker rejoined reporting the run it is part of. If that run is the
    /// job's current generation, the worker takes its rank back (adoption
    /// after a coordinator restart, or a reconnect); a stale run is told to
    /// stop.
    pub(super) async fn adopt(&mut self, worker: &WorkerId, current: CurrentRun) {
        let name = self
            .workers
            .get(worker)
            .map(|w| w.info.name.clone())
            .unwrap_or_default();
        let CurrentRun {
            run,
            rank,
            step,
            parked,
        } = current;
        let adoptable = self.jobs.get(&run.job).is_some_and(|j| {
            (j.status.state == JobState::Running
                || (j.status.state == JobState::Recovering && j.recovery.is_some()))
                && j.generation() == run.generation
                && j.members.get(rank.index()).is_some_and(|m| {
                    m.worker
                        .as_ref()
                        .is_none_or(|w| !self.workers.contains_key(w))
                })
        });
        if !adoptable {
            let running_here = self.jobs.get(&run.job).is_some_and(|j| {
                matches!(j.status.state, JobState::Running | JobState::Recovering)
                    && j.generation() == run.generation
            });
            if !running_here && let Some(w) = self.workers.get(worker) {
                // Whatever it is still running is not ours any more.
                let _ = w.tx.try_send(Command::Abort(AbortTraining {
                    run,
                    reason: "the run is not current on this coordinator".into(),
                    keep_state: false,
                }));
            }
            return;
        }
        let job_id = run.job.clone();
        if let Some(w) = self.workers.get_mut(worker) {
            w.assignment = Some(Assignment {
                run: run.clone(),
                rank,
            });
        }
        // A rank of a running job that parked while no coordinator listened
        // still has its `Parked` report buffered (the old coordinator would
        // have persisted `recovering` on receiving it): that report, with the
        // peer it lost, starts the recovery here.
        if self
            .jobs
            .get(&job_id)
            .is_some_and(|j| j.status.state == JobState::Recovering)
        {
            self.rejoin_recovery(worker, &name, run, rank, step, parked)
                .await;
            return;
        }
        let Some(job) = self.jobs.get_mut(&job_id) else {
            return;
        };
        job.members[rank.index()] = Member {
            name: name.clone(),
            worker: Some(worker.clone()),
        };
        job.status.step = job.status.step.max(step);
        info!(job = %job_id, rank = rank.0, worker = %name, step, "rank rejoined");
        let all_back = job.members.iter().all(|m| {
            m.worker
                .as_ref()
                .is_some_and(|w| self.workers.contains_key(w))
        });
        if job.broken.remove(&rank).is_some() {
            let text = format!("worker {name} reconnected and took rank {rank} back");
            if all_back {
                job.timers.retain(|t| t.kind != TimerKind::Reconnect);
            }
            self.note(&job_id, text).await;
        } else if job.has_timer(TimerKind::Adopt) && all_back {
            job.timers.retain(|t| t.kind != TimerKind::Adopt);
            let text = format!(
                "adopted after a coordinator restart at step {}",
                job.status.step
            );
            self.note(&job_id, text).await;
        } else {
            job.publish();
        }
    }

    /// A member of a job that was re-forming when the coordinator restarted
    /// rejoined: holding its state, it counts as parked; still in the old
    /// group, it is told to leave it keeping its state (and parks).
    async fn rejoin_recovery(
        &mut self,
        worker: &WorkerId,
        name: &str,
        run: RunId,
        rank: Rank,
        step: u64,
        parked: bool,
    ) {
        if let Some(job) = self.jobs.get_mut(&run.job) {
            job.members[rank.index()] = Member {
                name: name.to_string(),
                worker: Some(worker.clone()),
            };
            job.publish();
        }
        info!(job = %run.job, rank = rank.0, worker = %name, step, parked, "rank rejoined a re-forming job");
        if parked {
            let p = Parked {
                run,
                step,
                lost_peer: None,
                reason: "rejoined holding its state".into(),
            };
            self.member_parked(worker, rank, p).await;
        } else if let Some(w) = self.workers.get(worker) {
            let _ = w.tx.try_send(Command::Abort(AbortTraining {
                run,
                reason: "the job is re-forming".into(),
                keep_state: true,
            }));
        }
    }
}
