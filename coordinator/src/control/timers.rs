//! The per-generation timer table: each job's deadlines (stop grace,
//! adoption, blame window), set by the handlers and fired by the loop's
//! `tick`, which also frees members of ended jobs that never reported and
//! declares silent workers lost. A timer of another generation never fires.

use super::Cluster;
use super::jobs::Job;
use super::membership::Release;
use ringmaster_common::ids::{Generation, JobId, Rank, WorkerId};
use ringmaster_common::now_ms;
use ringmaster_common::records::JobState;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tracing::warn;

/// What a deadline does when it passes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum TimerKind {
    /// A cancel asked for a final checkpoint: stop without it if it is late.
    StopGrace,
    /// After a coordinator restart, the group's workers must rejoin by now.
    Adopt,
    /// A peer reported a closed connection: fail the job with what the
    /// reports say unless a member's session broke first.
    Blame,
    /// A re-forming job: members that have not left their ring by now are
    /// taken as lost.
    Regroup,
    /// A re-forming job still short of workers goes back to the queue.
    Rejoin,
    /// Members whose session broke have not reconnected: they are lost.
    Reconnect,
}

/// A deadline of one generation of a job. A timer of an older generation
/// never fires: a new generation clears the table, and firing checks again.
#[derive(Clone, Copy, Debug)]
pub(super) struct Timer {
    generation: Generation,
    at: Instant,
    pub(super) kind: TimerKind,
}

impl Job {
    pub(super) fn set_timer(&mut self, kind: TimerKind, after: Duration) {
        self.timers.retain(|t| t.kind != kind);
        self.timers.push(Timer {
            generation: self.generation(),
            at: Instant::now() + after,
            kind,
        });
    }

    pub(super) fn has_timer(&self, kind: TimerKind) -> bool {
        self.timers
            .iter()
            .any(|t| t.kind == kind && t.generation == self.generation())
    }
}

impl Cluster {
    /// Fires the deadlines that have passed, then declares silent workers
    /// lost. Runs on a timer tick.
    pub(super) async fn tick(&mut self) {
        let now = Instant::now();
        let mut due: Vec<(JobId, TimerKind)> = Vec::new();
        for (id, job) in &mut self.jobs {
            let generation = job.generation();
            job.timers.retain(|t| {
                if t.at > now {
                    return true;
                }
                // A deadline of another generation dies unfired.
                if t.generation == generation {
                    due.push((id.clone(), t.kind));
                }
                false
            });
        }
        for (id, kind) in due {
            self.fire(&id, kind).await;
        }
        let (releases, later): (Vec<Release>, Vec<Release>) = std::mem::take(&mut self.releases)
            .into_iter()
            .partition(|r| r.at <= now);
        self.releases = later;
        let mut freed = false;
        for r in releases {
            if let Some(w) = self.workers.get_mut(&r.worker)
                && w.assignment.as_ref().is_some_and(|a| a.run == r.run)
            {
                warn!(
                    worker = %r.worker,
                    job = %r.run.job,
                    "no end report within {} s of the job's end; freeing the worker",
                    self.cfg.release_grace.as_secs()
                );
                w.assignment = None;
                freed = true;
            }
        }
        if freed {
            self.schedule().await;
        }
        if self.cordons.values().any(|c| c.until_ms.is_some()) {
            self.expire_quarantines().await;
        }
        let timeout = self.cfg.heartbeat_timeout;
        let silent: Vec<WorkerId> = self
            .workers
            .iter()
            .filter(|(_, w)| {
                now_ms().saturating_sub(w.last_seen.load(Ordering::Relaxed))
                    > timeout.as_millis() as u64
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in silent {
            let reason = format!("no heartbeat for {} ms", timeout.as_millis());
            // Silence is no broken session: no grace to reconnect.
            Box::pin(self.disconnected(id, reason, false)).await;
        }
    }

    async fn fire(&mut self, id: &JobId, kind: TimerKind) {
        let Some(job) = self.jobs.get(id) else {
            return;
        };
        let generation = job.generation();
        match kind {
            TimerKind::StopGrace if !job.status.state.is_final() => {
                let reason = format!(
                    "cancelled by user (stopped without a final checkpoint: no stop within {} s)",
                    self.cfg.stop_grace.as_secs()
                );
                self.finish(id, JobState::Cancelled, Some(reason)).await;
            }
            TimerKind::Adopt
                if matches!(job.status.state, JobState::Running | JobState::Recovering) =>
            {
                let missing: Vec<Rank> = job
                    .members
                    .iter()
                    .enumerate()
                    .filter(|(_, m)| {
                        m.worker
                            .as_ref()
                            .is_none_or(|w| !self.workers.contains_key(w))
                    })
                    .map(|(rank, _)| Rank(rank as u32))
                    .collect();
                let grace = self.cfg.adopt_grace.as_secs();
                if job.record.spec.fault.max_restarts == 0 && job.status.state == JobState::Running
                {
                    let names: Vec<String> = missing.iter().map(|r| job.member_label(*r)).collect();
                    let reason = format!(
                        "after a coordinator restart, {} did not rejoin within {grace} s",
                        names.join(", "),
                    );
                    self.fail(id, generation, reason).await;
                } else {
                    for rank in missing {
                        let why =
                            format!("did not rejoin within {grace} s of a coordinator restart");
                        self.member_lost(id, generation, rank, why).await;
                    }
                }
            }
            TimerKind::Reconnect if !job.status.state.is_final() => {
                let grace = self.cfg.reconnect_grace.as_secs_f64();
                let gone: Vec<(Rank, String)> = job
                    .broken
                    .iter()
                    .filter(|(rank, _)| {
                        job.members.get(rank.index()).is_some_and(|m| {
                            m.worker
                                .as_ref()
                                .is_none_or(|w| !self.workers.contains_key(w))
                        })
                    })
                    .map(|(rank, why)| (*rank, why.clone()))
                    .collect();
                for (rank, why) in gone {
                    let why = format!("{why} (no reconnect within {grace:.1} s)");
                    if let Some(job) = self.jobs.get_mut(id) {
                        job.broken.remove(&rank);
                    }
                    self.member_lost(id, generation, rank, why).await;
                }
            }
            TimerKind::Regroup if job.status.state == JobState::Recovering => {
                self.regroup_window_closed(id).await;
            }
            TimerKind::Rejoin if job.status.state == JobState::Recovering => {
                self.rejoin_timed_out(id).await;
            }
            TimerKind::Blame if job.status.state == JobState::Running => {
                let reason = self.blame_from_reports(job);
                self.fail(id, generation, reason).await;
            }
            TimerKind::StopGrace
            | TimerKind::Adopt
            | TimerKind::Blame
            | TimerKind::Regroup
            | TimerKind::Rejoin
            | TimerKind::Reconnect => {}
        }
    }
}
