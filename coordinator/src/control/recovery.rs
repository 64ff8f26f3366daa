//! In-place recovery: when a member of a running generation is lost, the job
//! goes `recovering` (persisted first, one restart spent), the other members
//! are told to leave their ring but keep their state (they report `Parked`
//! with the step they hold), and once every member is accounted for (parked,
//! or lost, or silent past the regroup window) the next generation forms from
//! the survivors plus free workers, the survivor with the newest state as the
//! source every other rank copies. Nothing is reloaded from disk unless no
//! survivor holds state; too few workers keep the job waiting for
//! `[fault] rejoin_timeout_secs`, after which it goes back to the queue and
//! resumes from its newest committed checkpoint.

use super::Cluster;
use super::timers::TimerKind;
use crate::scheduler::{self, Demand, Survivor};
use ringmaster_common::ids::{Generation, JobId, Rank, WorkerId};
use ringmaster_common::now_ms;
use ringmaster_common::records::{IncidentKind, IncidentRecord, JobState};
use ringmaster_proto::{AbortTraining, CheckpointRequest, Command, Parked};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// What the coordinator knows while a job re-forms.
#[derive(Debug)]
pub(super) struct Recovery {
    /// When the loss was detected, for the timeline.
    pub(super) since: Instant,
    /// Members of the broken generation known gone, by rank, with why.
    pub(super) lost: BTreeMap<Rank, String>,
    /// Members that left the ring holding their state: rank -> step held.
    pub(super) parked: BTreeMap<Rank, u64>,
    /// The regroup window passed: members that have not parked are lost.
    pub(super) window_closed: bool,
    /// The job re-forms by plan (to grow, or to leave a draining worker
    /// out), not after a loss: no restart is spent.
    pub(super) growing: bool,
    /// Gave up waiting for workers: a survivor is writing its state as a
    /// checkpoint (of this step), then the job goes back to the queue.
    pub(super) saving: Option<u64>,
}

impl Recovery {
    /// A re-forming that starts now (`growing`: by plan, not after a loss).
    pub(super) fn new(growing: bool) -> Recovery {
        Recovery {
            since: Instant::now(),
            lost: BTreeMap::new(),
            parked: BTreeMap::new(),
            window_closed: false,
            growing,
            saving: None,
        }
    }
}

impl Cluster {
    /// Member `rank` of generation `generation` is gone (its session closed,
    /// it went silent, it did not rejoin after a coordinator restart).
    pub(super) async fn member_lost(
        &mut self,
        id: &JobId,
        generation: Generation,
        rank: Rank,
        why: String,
    ) {
        let Some(job) = self.jobs.get(id) else {
            return;
        };
        if job.generation() != generation {
            return;
        }
        let incident = format!("worker {} lost: {why}", job.member_label(rank));
        let newly = match (&job.status.state, &job.recovery) {
            (JobState::Running, _) => true,
            (JobState::Recovering, Some(r)) => !r.lost.contains_key(&rank),
            _ => false,
        };
        if newly {
            self.blame(id, rank).await;
        }
        let Some(job) = self.jobs.get(id) else {
            return;
        };
        match job.status.state {
            JobState::Running => {
                if !self.begin_recovery(id, incident).await {
                    return;
                }
            }
            JobState::Recovering => {}
            _ => return,
        }
        if let Some(rec) = self.jobs.get_mut(id).and_then(|j| j.recovery.as_mut()) {
            rec.parked.remove(&rank);
            rec.lost.insert(rank, why);
        }
        self.try_regroup(id).await;
    }

    /// Counts an incident against the worker that held `rank`, which may
    /// quarantine it (noted in the job's events).
    async fn blame(&mut self, id: &JobId, rank: Rank) {
        let Some(job) = self.jobs.get(id) else {
            return;
        };
        let Some(name) = job.members.get(rank.index()).map(|m| m.name.clone()) else {
            return;
        };
        let fault = job.record.spec.fault.clone();
        if let Some(note) = self.note_incident(&name, &fault).await
            && let Some(job) = self.jobs.get_mut(id)
        {
            job.status.note(note);
            job.publish();
        }
    }

    /// Member `rank` of worker `worker` left its ring holding the state of
    /// `p.step` (the caller checked `p.run` against its assignment).
    pub(super) async fn member_parked(&mut self, worker: &WorkerId, rank: Rank, p: Parked) {
        let Parked {
            run,
            step,
            lost_peer,
            reason,
        } = p;
        let (id, generation) = (&run.job, run.generation);
        let Some(job) = self.jobs.get(id) else {
            return;
        };
        if job.generation() != generation {
            // Parked too late: the job re-formed without it (taken as lost).
            // Its report proves its trainer answers, so it may drop the
            // state and be free again.
            self.drop_state(worker, id, generation, "the job re-formed without it");
            if let Some(w) = self.workers.get_mut(worker) {
                w.assignment = None;
            }
            return;
        }
        match job.status.state {
            JobState::Running => {
                let incident = match lost_peer {
                    Some(peer) => format!(
                        "worker {} lost: ring connection closed (reported by rank {rank})",
                        job.member_label(peer)
                    ),
                    None => format!("{} left its group: {reason}", job.member_label(rank)),
                };
                if !self.begin_recovery(id, incident).await {
                    return;
                }
            }
            JobState::Recovering => {}
            // The job is over or queued again: the state is not needed.
            _ => {
                self.drop_state(worker, id, generation, "the job is not re-forming");
                return;
            }
        }
        if let Some(rec) = self.jobs.get_mut(id).and_then(|j| j.recovery.as_mut()) {
            rec.lost.remove(&rank);
            rec.parked.insert(rank, step);
        }
        self.try_regroup(id).await;
    }

    /// Puts a running job into recovery: persisted first, one restart spent,
    /// then every member is told to leave its ring keeping its state. Fails
    /// the job instead when its restart budget is spent; returns whether the
    /// job is recovering.
    async fn begin_recovery(&mut self, id: &JobId, incident: String) -> bool {
        let Some(job) = self.jobs.get_mut(id) else {
            return false;
        };
        let budget = job.record.spec.fault.max_restarts;
        if job.status.restarts >= budget {
            let reason = if budget == 0 {
                incident.clone()
            } else {
                let earlier: Vec<&str> = job
                    .status
                    .events
                    .iter()
                    .filter(|e| e.contains("; recovering"))
                    .map(String::as_str)
                    .collect();
                format!(
                    "{incident}; the restart budget of {budget} is spent (earlier incidents: {})",
                    earlier.join(" | ")
                )
            };
            let generation = job.generation();
            job.status.incident(IncidentRecord {
                kind: Some(IncidentKind::Loss),
                detected: incident.clone(),
                detected_at_ms: now_ms(),
                from_generation: generation.0,
                outcome: Some(if budget == 0 {
                    "failed: the job may not restart".to_string()
                } else {
                    format!("failed: the restart budget of {budget} is spent")
                }),
                ..IncidentRecord::default()
            });
            self.fail(id, generation, reason).await;
            return false;
        }
        job.status.state = JobState::Recovering;
        job.status.restarts += 1;
        job.status.reason = None;
        job.status.updated_at_ms = now_ms();
        job.status.note(format!(
            "{incident}; recovering (restart {} of {budget})",
            job.status.restarts
        ));
        self.leave_rings(id, incident, IncidentKind::Loss).await
    }

    /// Re-forms a running job that lost no one (growth, a drain): no
    /// restart is spent.
    pub(super) async fn re_form_by_plan(
        &mut self,
        id: &JobId,
        incident: String,
        kind: IncidentKind,
    ) {
        let Some(job) = self.jobs.get_mut(id) else {
            return;
        };
        job.status.state = JobState::Recovering;
        job.status.updated_at_ms = now_ms();
        job.status.note(incident.clone());
        self.leave_rings(id, incident, kind).await;
    }

    /// Starts re-forming: every member is told to leave its ring keeping its
    /// state (persisted first), then `try_regroup` forms the next
    /// generation once they have.
    pub(super) async fn leave_rings(
        &mut self,
        id: &JobId,
        incident: String,
        kind: IncidentKind,
    ) -> bool {
        let Some(job) = self.jobs.get_mut(id) else {
            return false;
        };
        job.recovery = Some(Recovery::new(kind != IncidentKind::Loss));
        let from_generation = job.generation().0;
        job.status.incident(IncidentRecord {
            kind: Some(kind),
            detected: incident.clone(),
            detected_at_ms: now_ms(),
            from_generation,
            ..IncidentRecord::default()
        });
        job.peer_reports.clear();
        // A member whose session broke cannot be told to leave its ring:
        // the group re-forms without it (it drops its state if it comes
        // back).
        let broken = std::mem::take(&mut job.broken);
        let gone: Vec<Rank> = broken.keys().copied().collect();
        if let Some(rec) = job.recovery.as_mut() {
            for (rank, why) in broken {
                rec.lost.insert(rank, why);
            }
        }
        let window = self.cfg.blame_window();
        job.set_timer(TimerKind::Regroup, window);
        job.publish();
        let status = job.status.clone();
        info!(job = %id, restarts = status.restarts, "re-forming: {incident}");
        // Persist before acting; if the store does not answer, the members
        // are told anyway: leaving a ring with the state kept loses nothing,
        // and the status is written once the store is back.
        if let Err(e) = self.persist_status(id, &status).await {
            warn!(job = %id, "could not persist the recovery: {e}");
        }
        let Some(job) = self.jobs.get(id) else {
            return false;
        };
        let run = job.run();
        for m in &job.members {
            if let Some(w) = m.worker.as_ref().and_then(|w| self.workers.get(w)) {
                let _ = w.tx.try_send(Command::Abort(AbortTraining {
                    run: run.clone(),
                    reason: incident.clone(),
                    keep_state: true,
                }));
            }
        }
        for rank in gone {
            self.blame(id, rank).await;
        }
        true
    }

    /// The regroup window passed: members that neither parked nor were seen
    /// to go are taken as lost (a hung or partitioned worker).
    pub(super) async fn regroup_window_closed(&mut self, id: &JobId) {
        let Some(job) = self.jobs.get_mut(id) else {
            return;
        };
        let ranks = job.members.len();
        let Some(rec) = job.recovery.as_mut() else {
            return;
        };
        rec.window_closed = true;
        let secs = self.cfg.blame_window().as_secs_f64();
        let mut silent = Vec::new();
        for rank in (0..ranks).map(|r| Rank(r as u32)) {
            if !rec.parked.contains_key(&rank) && !rec.lost.contains_key(&rank) {
                rec.lost
                    .insert(rank, format!("did not leave its ring within {secs:.1} s"));
                silent.push(rank);
            }
        }
        for rank in &silent {
            let label = job.member_label(*rank);
            job.status.note(format!(
                "worker {label} did not leave its ring within {secs:.1} s (hung?): taken as lost"
            ));
        }
        job.publish();
        for rank in silent {
            self.blame(id, rank).await;
        }
        self.try_regroup(id).await;
    }

    /// Forms the next generation once every member of the broken one is
    /// accounted for and enough workers are there; otherwise waits (at most
    /// `rejoin_timeout_secs`).
    pub(super) async fn try_regroup(&mut self, id: &JobId) {
        let Some(job) = self.jobs.get(id) else {
            return;
        };
        let Some(rec) = &job.recovery else {
            return;
        };
        let accounted = (0..job.members.len())
            .map(|r| Rank(r as u32))
            .all(|r| rec.parked.contains_key(&r) || rec.lost.contains_key(&r));
        if !accounted && !rec.window_closed {
            return;
        }
        let run = job.run();
        let survivors: Vec<Survivor> = rec
            .parked
            .iter()
            .filter_map(|(rank, step)| {
                let w = job.members.get(rank.0 as usize)?.worker.clone()?;
                let live = self
                    .workers
                    .get(&w)
                    .is_some_and(|x| x.assignment.as_ref().is_some_and(|a| a.run == run));
                live.then_some(Survivor { id: w, step: *step })
            })
            .collect();
        if survivors.is_empty() {
            let why = "no survivor holds the training state";
            self.requeue(id, why).await;
            return;
        }
        let spec = &job.record.spec;
        let demand = Demand::of(id, spec);
        let free = self.free_workers();
        // Draining workers are left out where others hold the state; where
        // they alone do, they source this group and leave it at the next.
        let staying: Vec<Survivor> = survivors
            .iter()
            .filter(|s| !self.draining(&s.id))
            .cloned()
            .collect();
        let candidates = if staying.is_empty() {
            &survivors
        } else {
            &staying
        };
        let Some(group) = scheduler::regroup(&demand, candidates, &free) else {
            let rejoin = Duration::from_secs(spec.fault.rejoin_timeout_secs);
            let waiting = format!(
                "re-forming: needs {} worker{}, {} survivor{} and {} free",
                demand.min,
                if demand.min == 1 { "" } else { "s" },
                survivors.len(),
                if survivors.len() == 1 { "" } else { "s" },
                free.iter().filter(|w| w.device == demand.device).count()
            );
            if let Some(job) = self.jobs.get_mut(id) {
                if !job.has_timer(TimerKind::Rejoin) {
                    job.set_timer(TimerKind::Rejoin, rejoin);
                }
                if job.waiting.as_deref() != Some(waiting.as_str()) {
                    job.waiting = Some(waiting);
                    job.publish();
                }
            }
            return;
        };
        let source = &group.workers[0];
        let step = survivors
            .iter()
            .find(|s| &s.id == source)
            .map_or(0, |s| s.step);
        // Survivors left out (the new size did not need them, or they are
        // draining) drop their state.
        let mut left_out = Vec::new();
        for s in &survivors {
            if !group.workers.contains(&s.id) {
                let (name, why) = match self.workers.get(&s.id) {
                    Some(w) if self.draining(&s.id) => (w.info.name.clone(), "drained"),
                    Some(w) => (w.info.name.clone(), "not needed by the re-formed group"),
                    None => (s.id.to_string(), "not needed by the re-formed group"),
                };
                left_out.push(format!("{name}: {why}"));
                self.drop_state(&s.id, id, run.generation, why);
                if let Some(w) = self.workers.get_mut(&s.id) {
                    w.assignment = None;
                }
            }
        }
        let (took, growing) = self
            .jobs
            .get(id)
            .and_then(|j| j.recovery.as_ref())
            .map_or((0.0, false), |r| {
                (r.since.elapsed().as_secs_f64(), r.growing)
            });
        let source_name = self
            .workers
            .get(source)
            .map(|w| w.info.name.clone())
            .unwrap_or_default();
        let members: Vec<String> = group
            .workers
            .iter()
            .map(|w| {
                self.workers
                    .get(w)
                    .map_or_else(|| w.to_string(), |x| x.info.name.clone())
            })
            .collect();
        if let Some(job) = self.jobs.get_mut(id) {
            let evicted: Vec<String> = job
                .recovery
                .as_ref()
                .map(|r| {
                    r.lost
                        .iter()
                        .map(|(rank, why)| format!("{}: {why}", job.member_label(*rank)))
                        .collect()
                })
                .unwrap_or_default();
            let generation = job.generation().next().0;
            if let Some(open) = job.status.open_incident() {
                open.evicted = evicted.into_iter().chain(left_out).collect();
                open.generation = Some(generation);
                open.formed_at_ms = Some(now_ms());
                open.members = members;
                open.state_source = Some(source_name.clone());
                open.state_step = Some(step);
            }
            job.status.step = step;
            let after = if growing { "the request" } else { "the loss" };
            job.status.note(format!(
                "re-forming with {} workers {took:.2} s after {after}; state of step {step} from \
                 {source_name}",
                group.workers.len(),
            ));
        }
        if let Err(e) = self.launch(id, group.workers, Some(Rank(0))).await {
            warn!(job = %id, "could not re-form: {e}");
        }
    }

    /// Too few workers came within `rejoin_timeout_secs`: the survivor with
    /// the newest state writes it as a checkpoint (so nothing trained since
    /// the last one is lost), and the job goes back to the queue once it is
    /// committed, or when the write does not finish within the stop grace.
    pub(super) async fn rejoin_timed_out(&mut self, id: &JobId) {
        let Some(job) = self.jobs.get(id) else {
            return;
        };
        let why = format!(
            "too few workers to re-form within {} s",
            job.record.spec.fault.rejoin_timeout_secs
        );
        let Some(rec) = &job.recovery else {
            return;
        };
        if rec.saving.is_some() {
            let why = format!("{why}; the survivor's checkpoint did not arrive in time");
            return self.requeue(id, &why).await;
        }
        let run = job.run();
        let newest = rec
            .parked
            .iter()
            .filter_map(|(rank, step)| {
                let w = job.members.get(rank.index())?.worker.clone()?;
                let live = self
                    .workers
                    .get(&w)
                    .is_some_and(|x| x.assignment.as_ref().is_some_and(|a| a.run == run));
                live.then_some((*step, w))
            })
            .max_by_key(|(step, _)| *step);
        let newest_committed = job.checkpoints.keys().next_back().copied();
        let Some((step, worker)) = newest.filter(|(s, _)| Some(*s) > newest_committed) else {
            return self.requeue(id, &why).await;
        };
        let name = self
            .workers
            .get(&worker)
            .map(|w| w.info.name.clone())
            .unwrap_or_default();
        if let Some(w) = self.workers.get(&worker) {
            let _ = w.tx.try_send(Command::Checkpoint(CheckpointRequest {
                run: run.clone(),
                stop: false,
            }));
        }
        let grace = self.cfg.stop_grace;
        if let Some(job) = self.jobs.get_mut(id) {
            if let Some(rec) = job.recovery.as_mut() {
                rec.saving = Some(step);
            }
            job.set_timer(TimerKind::Rejoin, grace);
            job.status.note(format!(
                "{why}: saving the state of step {step} from {name} as a checkpoint before \
                 queueing again"
            ));
            job.publish();
        }
    }

    /// A survivor's checkpoint of its held state was committed (or failed):
    /// the job goes back to the queue, to resume from it.
    pub(super) async fn saved_for_requeue(&mut self, id: &JobId, committed: bool) {
        let Some(step) = self
            .jobs
            .get(id)
            .and_then(|j| j.recovery.as_ref())
            .and_then(|r| r.saving)
        else {
            return;
        };
        let why = if committed {
            format!("too few workers to re-form; the survivors' state of step {step} is saved")
        } else {
            format!("too few workers to re-form; saving the survivors' state of step {step} failed")
        };
        self.requeue(id, &why).await;
    }

    /// Gives up re-forming in place: the survivors drop their state and the
    /// job goes back to the queue, to start again from its newest committed
    /// checkpoint (or from the beginning) when workers allow.
    pub(super) async fn requeue(&mut self, id: &JobId, why: &str) {
        let Some(job) = self.jobs.get_mut(id) else {
            return;
        };
        let run = job.run();
        let from = match job.checkpoints.keys().next_back() {
            Some(step) => format!("its checkpoint at step {step}"),
            None if job.record.resume_from.is_some() => "its fork point".to_string(),
            None => "the beginning".to_string(),
        };
        job.recovery = None;
        job.timers.clear();
        if let Some(open) = job.status.open_incident() {
            open.outcome = Some(format!("queued again: {why}"));
        }
        job.status.state = JobState::Queued;
        job.status.updated_at_ms = now_ms();
        job.status
            .note(format!("{why}: queued again, to resume from {from}"));
        job.waiting = None;
        job.publish();
        let status = job.status.clone();
        let holders: Vec<WorkerId> = job
            .members
            .iter()
            .filter_map(|m| m.worker.clone())
            .collect();
        info!(job = %id, "{why}; queued again");
        if let Err(e) = self.persist_status(id, &status).await {
            warn!(job = %id, "could not persist the requeue: {e}");
        }
        for w in holders {
            if self
                .workers
                .get(&w)
                .is_some_and(|x| x.assignment.as_ref().is_some_and(|a| a.run == run))
            {
                self.drop_state(&w, id, run.generation, why);
                if let Some(x) = self.workers.get_mut(&w) {
                    x.assignment = None;
                }
            }
        }
        if !self.queue.contains(id) {
            self.queue.push(id.clone());
        }
        Box::pin(self.schedule()).await;
    }

    /// Tells a worker holding a job's parked state to drop it.
    fn drop_state(&self, worker: &WorkerId, id: &JobId, generation: Generation, why: &str) {
        if let Some(w) = self.workers.get(worker) {
            let _ = w.tx.try_send(Command::Abort(AbortTraining {
                run: ringmaster_proto::RunId {
                    job: id.clone(),
                    generation,
                },
                reason: why.to_string(),
                keep_state: false,
            }));
        }
    }

    /// Grows one running job that has fewer than `workers.max` members when
    /// free workers allow a larger size that divides its batch (called after
    /// the queue is placed: waiting jobs come first). The job re-forms in
    /// place through the recovery path, spending no restart.
    pub(super) async fn grow_running(&mut self) {
        let growable: Vec<JobId> = self
            .jobs
            .iter()
            .filter(|(_, j)| {
                j.status.state == JobState::Running
                    && j.recovery.is_none()
                    && j.record.spec.workers.grow
                    && (j.members.len() as u32) < j.record.spec.workers.max
                    && j.members.iter().all(|m| m.worker.is_some())
            })
            .map(|(id, _)| id.clone())
            .collect();
        if growable.is_empty() {
            return;
        }
        let free = self.free_workers();
        for id in growable {
            let Some(job) = self.jobs.get(&id) else {
                continue;
            };
            let spec = &job.record.spec.workers;
            let batch = job.record.spec.train.global_batch;
            let now = job.members.len() as u32;
            let idle = free.iter().filter(|w| w.device == spec.device).count() as u32;
            let target = ((now + 1)..=spec.max.min(now + idle))
                .rev()
                .find(|w| batch.is_multiple_of(*w));
            let Some(target) = target else {
                continue;
            };
            let incident = format!("growing from {now} to {target} workers");
            self.re_form_by_plan(&id, incident, IncidentKind::Growth)
                .await;
            // One job at a time: the free workers it re-forms with are not
            // taken until its members have left their rings.
            return;
        }
    }

    /// Re-forms every recovering job the workers now allow (called before
    /// the queue is placed: survivors are held busy while their job waits).
    pub(super) async fn regroup_waiting(&mut self) {
        let waiting: Vec<JobId> = self
            .jobs
            .iter()
            .filter(|(_, j)| j.recovery.is_some())
            .map(|(id, _)| id.clone())
            .collect();
        for id in waiting {
            self.try_regroup(&id).await;
        }
    }
}
