//! Adoption, run by the control loop when a registration reports a run: the
//! worker takes its rank back when that run is the job's current generation
//! (after a coordinator restart, or a reconnect); a run that is not current
//! here is told to stop.

use super::Cluster;
use super::jobs::Member;
use super::membership::Assignment;
use super::timers::TimerKind;
use ringmaster_common::ids::WorkerId;
use ringmaster_common::records::JobState;
use ringmaster_proto::{AbortTraining, Command, CurrentRun};
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
        let CurrentRun { run, rank, step } = current;
        let adoptable = self.jobs.get(&run.job).is_some_and(|j| {
            j.status.state == JobState::Running
                && j.generation() == run.generation
                && j.members.get(rank.index()).is_some_and(|m| {
                    m.worker
                        .as_ref()
                        .is_none_or(|w| !self.workers.contains_key(w))
                })
        });
        if !adoptable {
            let running_here = self.jobs.get(&run.job).is_some_and(|j| {
                j.status.state == JobState::Running && j.generation() == run.generation
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
            w.assignment = Some(Assignment { run, rank });
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
}
