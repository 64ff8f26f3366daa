//! Rendezvous, run by the control loop whenever jobs or workers change:
//! placing queued jobs on free workers (the pure decision is in
//! `scheduler.rs`) and forming a generation, persisted as running before each
//! member receives its rank, the peers' addresses and the spec.

use super::jobs::Member;
use super::membership::Assignment;
use super::{Cluster, ControlError};
use crate::scheduler::{self, Demand, FreeWorker};
use ringmaster_common::ids::{JobId, Rank, WorkerId};
use ringmaster_common::jobspec::DeviceKind;
use ringmaster_common::now_ms;
use ringmaster_common::records::JobState;
use ringmaster_proto::{Command, PrepareJob, StartTraining};
use std::path::PathBuf;
use tracing::{info, warn};

impl Cluster {
    /// Starts every queued job that the free workers allow.
    pub(super) async fn schedule(&mut self) {
        Box::pin(self.settle_drains()).await;
        // Jobs re-forming after a loss go first: their survivors are held.
        if self.jobs.values().any(|j| j.recovery.is_some()) {
            Box::pin(self.regroup_waiting()).await;
        }
        // Registrations and departures call this; with nothing queued it
        // must not cost O(workers) each (measured: half the coordinator's
        // CPU while 10k workers registered).
        if self.queue.is_empty() {
            Box::pin(self.grow_running()).await;
            return;
        }
        let queue: Vec<Demand> = self
            .queue
            .iter()
            .filter_map(|id| self.jobs.get(id))
            .map(|j| Demand::of(&j.record.id, &j.record.spec))
            .collect();
        let free = self.free_workers();
        let placements = scheduler::place(&queue, &free);
        let registered = |kind: DeviceKind| {
            self.workers
                .values()
                .filter(|w| w.info.device.kind() == kind)
                .count()
        };
        for (id, why) in scheduler::explain(&queue, &free, &registered, &placements) {
            if let Some(job) = self.jobs.get_mut(&id)
                && job.waiting.as_deref() != Some(why.as_str())
            {
                job.waiting = Some(why);
                job.publish();
            }
        }
        for placement in placements {
            if let Err(e) = self.launch(&placement.job, placement.workers, None).await {
                warn!(job = %placement.job, "could not start: {e}");
            }
        }
        Box::pin(self.grow_running()).await;
    }

    /// Workers with nothing to do, in registration order.
    pub(super) fn free_workers(&self) -> Vec<FreeWorker> {
        self.workers
            .iter()
            .filter(|(_, w)| w.assignment.is_none() && self.schedulable(&w.info.name))
            .map(|(id, w)| FreeWorker {
                id: id.clone(),
                device: w.info.device.kind(),
            })
            .collect()
    }

    /// Forms a new generation of the job's group: persisted as running first,
    /// then each member receives its rank and the peers' addresses. With
    /// `state_source`, the group re-forms around live state: that rank's is
    /// copied to the others (no checkpoint is read); otherwise every rank
    /// starts from the newest committed checkpoint, or afresh.
    pub(super) async fn launch(
        &mut self,
        id: &JobId,
        members: Vec<WorkerId>,
        state_source: Option<Rank>,
    ) -> Result<(), ControlError> {
        let Some(job) = self.jobs.get_mut(id) else {
            return Ok(());
        };
        let generation = job.generation().next();
        let mut status = job.status.clone();
        status.state = JobState::Running;
        status.generation = generation.0;
        status.members = members
            .iter()
            .map(|w| {
                self.workers
                    .get(w)
                    .map(|x| x.info.name.clone())
                    .unwrap_or_default()
            })
            .collect();
        status.updated_at_ms = now_ms();
        self.persist_status(id, &status).await?;
        let job = self.jobs.get_mut(id).ok_or(ControlError::ShuttingDown)?;
        job.members = members
            .iter()
            .zip(&status.members)
            .map(|(w, name)| Member {
                name: name.clone(),
                worker: Some(w.clone()),
            })
            .collect();
        job.status = status;
        job.finished.clear();
        // Deadlines and reports of the previous generation die with it.
        job.timers.clear();
        job.peer_reports.clear();
        job.recovery = None;
        job.handover = false;
        job.broken.clear();
        job.waiting = None;
        job.publish();
        let run = job.run();
        let spec = job.record.spec.clone();
        // Re-forming around live state: the source's step, recorded above
        // by the caller, is where the group picks up.
        let cursor = state_source.map(|_| job.status.step);
        let resume_candidates: Vec<PathBuf> = if state_source.is_some() {
            Vec::new()
        } else if job.checkpoints.is_empty() {
            job.record.resume_from.iter().cloned().collect()
        } else {
            job.checkpoints
                .values()
                .rev()
                .map(|c| c.dir.clone())
                .collect()
        };
        self.queue.retain(|q| q != id);
        let peers: Vec<String> = members
            .iter()
            .map(|w| {
                self.workers
                    .get(w)
                    .map(|x| x.info.data_addr.clone())
                    .unwrap_or_default()
            })
            .collect();
        info!(job = %id, generation = generation.0, world = members.len(), "starting");
        for (rank, w) in members.iter().enumerate() {
            let Some(worker) = self.workers.get_mut(w) else {
                continue;
            };
            let rank = Rank(rank as u32);
            worker.assignment = Some(Assignment {
                run: run.clone(),
                rank,
            });
            let start = Command::Start(Box::new(StartTraining {
                run: run.clone(),
                rank,
                peers: peers.clone(),
                spec: spec.clone(),
                progress_every_steps: self.cfg.progress_every_steps,
                resume_candidates: resume_candidates.clone(),
                state_source,
                cursor,
            }));
            if worker.tx.send(start).await.is_err() {
                warn!(worker = %w, "session closed before the start command");
            }
        }
        // After the members are assigned: only the others are spares.
        self.prepare_spares(id);
        Ok(())
    }

    /// Tells the free workers of a running job's device kind to load its
    /// data now (`PrepareJob`), so that one replacing a lost member (or
    /// growing the group) joins without loading it. Only jobs that may
    /// re-form; a worker prepares for one job at a time.
    pub(super) fn prepare_spares(&mut self, id: &JobId) {
        let Some(job) = self.jobs.get(id) else {
            return;
        };
        let spec = &job.record.spec;
        if spec.fault.max_restarts == 0 && !spec.workers.grow {
            return;
        }
        let free: Vec<WorkerId> = self
            .free_workers()
            .into_iter()
            .filter(|w| w.device == spec.workers.device)
            .map(|w| w.id)
            .collect();
        for w in free {
            self.send_prepare(&w, id);
        }
    }

    /// Offers a worker that just became free the first running job of its
    /// device kind that may re-form, to prepare for.
    pub(super) fn offer_running_job(&mut self, worker: &WorkerId) {
        let Some(w) = self.workers.get(worker) else {
            return;
        };
        if w.assignment.is_some() || !self.schedulable(&w.info.name) {
            return;
        }
        let kind = w.info.device.kind();
        let job = self
            .jobs
            .iter()
            .find(|(_, j)| {
                j.status.state == JobState::Running
                    && j.record.spec.workers.device == kind
                    && (j.record.spec.fault.max_restarts > 0 || j.record.spec.workers.grow)
            })
            .map(|(id, _)| id.clone());
        if let Some(job) = job {
            self.send_prepare(worker, &job);
        }
    }

    fn send_prepare(&mut self, worker: &WorkerId, id: &JobId) {
        let Some(spec) = self.jobs.get(id).map(|j| j.record.spec.clone()) else {
            return;
        };
        let Some(w) = self.workers.get_mut(worker) else {
            return;
        };
        if w.prepared.as_ref() == Some(id) {
            return;
        }
        let prepare = Command::Prepare(Box::new(PrepareJob {
            job: id.clone(),
            spec,
        }));
        if w.tx.try_send(prepare).is_ok() {
            w.prepared = Some(id.clone());
        }
    }
}
