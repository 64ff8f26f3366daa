//! Which workers take no new work, and why: an admin's `cordon` (no new
//! placements, held work continues), `drain` (the worker's job re-forms
//! without it at a step boundary, then it is cordoned) and the automatic
//! quarantine of a worker blamed for `[fault] quarantine_after` incidents
//! within ten minutes.
//!
//! Cordons are kept by worker *name*, not id: a worker gets a new id each
//! time it registers, and a quarantined machine that restarts must stay
//! quarantined. They are persisted (one store key) before they take effect,
//! so a restarted coordinator keeps them.
//!
//! A drain never loses a step: the job re-forms in place (no restart spent)
//! only once a group without the draining worker can be formed from the
//! other members and free workers; until then the worker keeps training and
//! shows `draining`. The re-form goes through the recovery path, so the
//! draining worker's state is dropped only after the others hold theirs.

use super::timers::TimerKind;
use super::{Cluster, ControlError};
use crate::scheduler::{self, Demand, Survivor};
use ringmaster_common::ids::{JobId, WorkerId};
use ringmaster_common::jobspec::{FaultSpec, QUARANTINE_WINDOW};
use ringmaster_common::now_ms;
use ringmaster_common::records::{
    self, CordonKind, CordonRecord, CordonsRecord, IncidentKind, JobState,
};
use ringmaster_proto::{CordonView, WorkerView};
use ringmaster_store::keys;
use std::time::Instant;
use tracing::{info, warn};

/// What an admin asks of a worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CordonAction {
    Drain,
    Cordon,
    Uncordon,
}

impl Cluster {
    /// Reads the cordons a previous coordinator left.
    pub(super) async fn load_cordons(&mut self) -> Result<(), ControlError> {
        let key = keys::cordons();
        if let Some(v) = self.store.get(&key).await? {
            let all: CordonsRecord = records::decode(&key, &v.value)?;
            self.cordons = all.workers;
        }
        Ok(())
    }

    async fn persist_cordons(&self) -> Result<(), ControlError> {
        self.writable()?;
        let key = keys::cordons();
        let record = CordonsRecord {
            workers: self.cordons.clone(),
        };
        self.put_settled(&key, records::encode(&key, &record)?)
            .await?;
        Ok(())
    }

    /// Whether the scheduler may place new work on the worker named `name`.
    pub(super) fn schedulable(&self, name: &str) -> bool {
        !self.cordons.contains_key(name)
    }

    /// The cordon of the worker named `name` as clients see it: a drained
    /// worker that holds no rank any more shows as cordoned.
    pub(super) fn cordon_view(&self, name: &str, busy: bool) -> Option<CordonView> {
        let c = self.cordons.get(name)?;
        let (kind, reason) = match c.kind {
            CordonKind::Draining if !busy => {
                (CordonKind::Cordoned, format!("drained: {}", c.reason))
            }
            kind => (kind, c.reason.clone()),
        };
        Some(CordonView {
            kind,
            reason,
            remaining_secs: c
                .until_ms
                .map(|until| until.saturating_sub(now_ms()).div_ceil(1000).max(1)),
        })
    }

    /// An admin's drain, cordon or uncordon of a registered worker (by name,
    /// else by id): persisted first, then acted on.
    pub(super) async fn set_cordon(
        &mut self,
        target: &str,
        action: CordonAction,
        reason: String,
    ) -> Result<WorkerView, ControlError> {
        // A name wins over an id: names are what admins know, and a name
        // may look like another worker's id.
        let id = self
            .workers
            .iter()
            .find(|(_, w)| w.info.name == target)
            .or_else(|| self.workers.iter().find(|(id, _)| id.as_str() == target))
            .map(|(id, _)| id.clone())
            .ok_or_else(|| ControlError::WorkerNotFound(target.to_string()))?;
        let name = self.workers[&id].info.name.clone();
        let busy = self.workers[&id].assignment.is_some();
        let before = self.cordons.get(&name).cloned();
        match action {
            CordonAction::Uncordon => {
                self.cordons.remove(&name);
            }
            CordonAction::Cordon | CordonAction::Drain => {
                let kind = if action == CordonAction::Drain && busy {
                    CordonKind::Draining
                } else {
                    CordonKind::Cordoned
                };
                let why = match (reason.trim(), action) {
                    ("", CordonAction::Drain) => "drained by admin".to_string(),
                    ("", _) => "cordoned by admin".to_string(),
                    (r, _) => r.to_string(),
                };
                let reason = if action == CordonAction::Drain && !busy {
                    format!("drained: {why}")
                } else {
                    why
                };
                self.cordons.insert(
                    name.clone(),
                    CordonRecord {
                        kind,
                        reason,
                        since_ms: now_ms(),
                        until_ms: None,
                    },
                );
            }
        }
        if let Err(e) = self.persist_cordons().await {
            // Nothing took effect: the admin sees the error and retries.
            match before {
                Some(c) => self.cordons.insert(name, c),
                None => self.cordons.remove(&name),
            };
            return Err(e);
        }
        info!(worker = %id, name = %name, ?action, "cordon changed");
        self.schedule().await;
        self.worker_views()
            .into_iter()
            .find(|w| w.id == id)
            .ok_or(ControlError::WorkerNotFound(target.to_string()))
    }

    /// Moves draining workers out of their jobs where a group without them
    /// can be formed now (one job at a time, as growth does), and turns a
    /// drained worker's cordon into a plain one once it holds no rank.
    pub(super) async fn settle_drains(&mut self) {
        let draining: Vec<String> = self
            .cordons
            .iter()
            .filter(|(_, c)| c.kind == CordonKind::Draining)
            .map(|(name, _)| name.clone())
            .collect();
        if draining.is_empty() {
            return;
        }
        let mut settled = false;
        for name in &draining {
            // A member whose session is away (reconnecting, or rejoining a
            // restarted coordinator) still holds its rank.
            let held = self
                .workers
                .values()
                .any(|w| &w.info.name == name && w.assignment.is_some())
                || self.jobs.values().any(|j| {
                    !j.status.state.is_final()
                        && j.status.state != JobState::Queued
                        && j.members.iter().any(|m| &m.name == name)
                });
            if !held && let Some(c) = self.cordons.get_mut(name) {
                c.kind = CordonKind::Cordoned;
                c.reason = format!("drained: {}", c.reason);
                settled = true;
            }
        }
        if settled && let Err(e) = self.persist_cordons().await {
            warn!("could not persist a finished drain: {e}");
        }
        let jobs: Vec<JobId> = self
            .jobs
            .iter()
            .filter(|(_, j)| j.status.state == JobState::Running && j.recovery.is_none())
            .filter(|(_, j)| j.members.iter().any(|m| draining.contains(&m.name)))
            .map(|(id, _)| id.clone())
            .collect();
        let free = self.free_workers();
        for id in jobs {
            let Some(job) = self.jobs.get(&id) else {
                continue;
            };
            // Every member must be connected: a group re-forms around live
            // state only.
            if job.members.iter().any(|m| m.worker.is_none()) {
                continue;
            }
            let staying: Vec<Survivor> = job
                .members
                .iter()
                .filter(|m| !draining.contains(&m.name))
                .filter_map(|m| m.worker.clone())
                .map(|id| Survivor { id, step: 0 })
                .collect();
            let demand = Demand::of(&id, &job.record.spec);
            let in_place = if staying.is_empty() {
                // The draining workers hold the only state: they source a
                // group that must take in at least one other worker, which
                // then hands the state on at the next re-form.
                let holders: Vec<Survivor> = job
                    .members
                    .iter()
                    .filter_map(|m| m.worker.clone())
                    .map(|id| Survivor { id, step: 0 })
                    .collect();
                scheduler::regroup(&demand, &holders, &free)
                    .is_some_and(|g| g.workers.iter().any(|w| !self.draining(w)))
            } else {
                scheduler::regroup(&demand, &staying, &free).is_some()
            };
            let leaving: Vec<String> = job
                .members
                .iter()
                .filter(|m| draining.contains(&m.name))
                .map(|m| m.name.clone())
                .collect();
            let leaving = leaving.join(", ");
            if in_place {
                let incident = format!("draining {leaving}: re-forming without it");
                self.re_form_by_plan(&id, incident, IncidentKind::Drain)
                    .await;
                return;
            }
            // No group without the draining workers can form in place (too
            // few others, or a size the batch does not divide), but free
            // workers could run the job: move it there through a checkpoint
            // taken at the next step boundary. Nothing already trained is
            // lost; the steps after the checkpoint are recomputed exactly.
            let movable = !scheduler::place(std::slice::from_ref(&demand), &free).is_empty();
            if !movable || job.handover || job.has_timer(TimerKind::StopGrace) {
                continue;
            }
            if self.request_checkpoint(id.as_str(), true).is_ok()
                && let Some(job) = self.jobs.get_mut(&id)
            {
                job.handover = true;
                job.status.note(format!(
                    "draining {leaving}: the job cannot re-form in place; checkpointing to move \
                     to other workers"
                ));
                job.publish();
            }
        }
    }

    /// Whether any worker is being drained.
    pub(super) fn draining_any(&self) -> bool {
        self.cordons
            .values()
            .any(|c| c.kind == CordonKind::Draining)
    }

    /// Whether the worker named `name` is being drained (a re-forming job
    /// leaves it out when it can).
    pub(super) fn draining(&self, worker: &WorkerId) -> bool {
        self.workers.get(worker).is_some_and(|w| {
            self.cordons
                .get(&w.info.name)
                .is_some_and(|c| c.kind == CordonKind::Draining)
        })
    }

    /// The worker named `name` was blamed for an incident of a job with
    /// `fault`: after `quarantine_after` of them within ten minutes it is
    /// quarantined for the cooldown. Returns the note for the job's
    /// events when it is.
    pub(super) async fn note_incident(&mut self, name: &str, fault: &FaultSpec) -> Option<String> {
        let now = Instant::now();
        let seen = self.incidents.entry(name.to_string()).or_default();
        seen.retain(|t| now.duration_since(*t) < QUARANTINE_WINDOW);
        seen.push(now);
        let count = seen.len();
        if fault.quarantine_after == 0
            || count < fault.quarantine_after as usize
            || self.cordons.contains_key(name)
        {
            return None;
        }
        let secs = fault.quarantine_cooldown_secs;
        let reason = format!(
            "{count} incident{} in 10 min",
            if count == 1 { "" } else { "s" }
        );
        self.cordons.insert(
            name.to_string(),
            CordonRecord {
                kind: CordonKind::Quarantined,
                reason: reason.clone(),
                since_ms: now_ms(),
                until_ms: Some(now_ms().saturating_add(secs.saturating_mul(1000))),
            },
        );
        self.incidents.remove(name);
        warn!(name, "quarantined for {secs} s: {reason}");
        if let Err(e) = self.persist_cordons().await {
            // Still in force here; written with the next cordon change.
            warn!(name, "could not persist the quarantine: {e}");
        }
        Some(format!("worker {name} quarantined for {secs} s: {reason}"))
    }

    /// Lifts quarantines whose cooldown has passed (from the tick).
    pub(super) async fn expire_quarantines(&mut self) {
        let now = now_ms();
        let before = self.cordons.len();
        self.cordons
            .retain(|_, c| c.until_ms.is_none_or(|until| until > now));
        if self.cordons.len() != before {
            info!("a quarantine's cooldown passed");
            if let Err(e) = self.persist_cordons().await {
                warn!("could not persist the end of a quarantine: {e}");
            }
            self.schedule().await;
        }
    }
}
