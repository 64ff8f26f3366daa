//! A job's lifecycle in the control loop: the in-memory `Job` and its
//! `Member`s, and submit, cancel, resume, fail and finish (persisted before
//! any command goes out), with the events noted on its status. Placement and
//! launch are in `rendezvous.rs`, deadlines in `timers.rs`.

use super::membership::Release;
use super::recovery::Recovery;
use super::reports::PeerReport;
use super::timers::{Timer, TimerKind};
use super::{Cluster, ControlError};
use ringmaster_common::ids::{Generation, JobId, Rank, WorkerId};
use ringmaster_common::jobspec::JobSpec;
use ringmaster_common::now_ms;
use ringmaster_common::records::{self, CheckpointRecord, JobRecord, JobState, JobStatusRecord};
use ringmaster_proto::{AbortTraining, Command, JobView, RunId};
use ringmaster_store::keys;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Instant;
use tokio::sync::watch;
use tracing::{info, warn};

/// One rank of a job's current group.
#[derive(Clone, Debug)]
pub(super) struct Member {
    /// The worker's name, kept even while no session holds the rank (after
    /// a coordinator restart, until the worker rejoins).
    pub(super) name: String,
    /// The worker's session id; `None` until the worker rejoins after a
    /// coordinator restart.
    pub(super) worker: Option<WorkerId>,
}

pub(super) struct Job {
    pub(super) record: JobRecord,
    pub(super) status: JobStatusRecord,
    pub(super) watch: watch::Sender<JobView>,
    /// The current generation's members, by rank.
    pub(super) members: Vec<Member>,
    /// Ranks that finished the current generation successfully.
    pub(super) finished: BTreeSet<Rank>,
    /// Committed checkpoints by step, as recorded in the store.
    pub(super) checkpoints: BTreeMap<u64, CheckpointRecord>,
    /// Deadlines of the current generation.
    pub(super) timers: Vec<Timer>,
    /// Data-plane failures reported in the current generation, awaiting the
    /// decision of who is to blame.
    pub(super) peer_reports: Vec<PeerReport>,
    /// While queued: why the job cannot start yet.
    pub(super) waiting: Option<String>,
    /// The job ended while its final state could not be written: its
    /// members are told to stop once it is (persist before acting).
    pub(super) aborts_unsent: bool,
    /// While `recovering`: what is known of the broken generation.
    pub(super) recovery: Option<Recovery>,
    /// The members are stopping after a checkpoint so that the job moves
    /// off a draining worker: it is queued again, not cancelled, once they
    /// have.
    pub(super) handover: bool,
    /// Members of the current generation whose session broke, by rank, with
    /// why: they may reconnect and take their rank back until the
    /// `Reconnect` timer fires.
    pub(super) broken: BTreeMap<Rank, String>,
}

impl Job {
    pub(super) fn new(record: JobRecord, status: JobStatusRecord) -> Job {
        let view = JobView::new(&record, &status, None);
        Job {
            record,
            status,
            watch: watch::channel(view).0,
            members: Vec::new(),
            finished: BTreeSet::new(),
            checkpoints: BTreeMap::new(),
            timers: Vec::new(),
            peer_reports: Vec::new(),
            waiting: None,
            aborts_unsent: false,
            recovery: None,
            handover: false,
            broken: BTreeMap::new(),
        }
    }

    pub(super) fn view(&self) -> JobView {
        JobView::new(&self.record, &self.status, self.waiting.clone())
    }

    /// The generation the job is in (or last ran).
    pub(super) fn generation(&self) -> Generation {
        Generation(self.status.generation)
    }

    /// The job's current run, as job-scoped messages name it.
    pub(super) fn run(&self) -> RunId {
        RunId {
            job: self.record.id.clone(),
            generation: self.generation(),
        }
    }

    pub(super) fn publish(&self) {
        self.watch.send_replace(self.view());
    }

    /// `name (rank r)` of a member, for messages.
    pub(super) fn member_label(&self, rank: Rank) -> String {
        match self.members.get(rank.index()) {
            Some(m) => format!("{} (rank {rank})", m.name),
            None => format!("rank {rank}"),
        }
    }
}

impl Cluster {
    pub(super) fn job(&self, id: &str) -> Result<&Job, ControlError> {
        self.jobs
            .get(&JobId(id.to_string()))
            .ok_or_else(|| ControlError::JobNotFound(id.to_string()))
    }

    pub(super) async fn submit(
        &mut self,
        spec: JobSpec,
        resume_from: Option<PathBuf>,
    ) -> Result<JobId, ControlError> {
        spec.check().map_err(ControlError::Invalid)?;
        self.writable()?;
        // The sequence lives in the store so ids stay unique across restarts.
        let seq_key = keys::job_seq();
        let seq = match self.store.get(&seq_key).await? {
            Some(v) => records::decode::<u64>(&seq_key, &v.value)? + 1,
            None => 1,
        };
        self.put_settled(&seq_key, records::encode(&seq_key, &seq)?)
            .await?;
        let id = JobId::parse(&format!("{}-{seq}", spec.name))
            .map_err(|e| ControlError::Invalid(e.to_string()))?;
        let record = JobRecord {
            id: id.clone(),
            spec: spec.clone(),
            submitted_at_ms: now_ms(),
            resume_from,
        };
        let status = JobStatusRecord {
            state: JobState::Queued,
            generation: 0,
            step: 0,
            total_steps: 0,
            metrics: BTreeMap::new(),
            members: Vec::new(),
            reason: None,
            output_dir: spec.output.job_dir(id.as_str()).display().to_string(),
            updated_at_ms: now_ms(),
            events: Vec::new(),
            restarts: 0,
            incidents: Vec::new(),
        };
        let key = keys::job_spec(&id)?;
        self.put_settled(&key, records::encode(&key, &record)?)
            .await?;
        self.persist_status(&id, &status).await?;
        info!(job = %id, "queued");
        self.jobs.insert(id.clone(), Job::new(record, status));
        self.queue.push(id.clone());
        Ok(id)
    }

    /// Applies a final state: persisted first, then members are told to stop
    /// and watchers see it.
    pub(super) async fn finish(&mut self, id: &JobId, state: JobState, reason: Option<String>) {
        let Some(job) = self.jobs.get_mut(id) else {
            return;
        };
        if job.status.state.is_final() {
            return;
        }
        job.status.state = state;
        job.status.reason = reason.clone();
        job.status.updated_at_ms = now_ms();
        job.peer_reports.clear();
        job.timers.clear();
        job.recovery = None;
        // Members that never report how their run ended are freed anyway.
        let at = Instant::now() + self.cfg.release_grace;
        let run = job.run();
        for (rank, m) in job.members.iter().enumerate() {
            if let Some(w) = &m.worker
                && !job.finished.contains(&Rank(rank as u32))
            {
                self.releases.push(Release {
                    at,
                    worker: w.clone(),
                    run: run.clone(),
                });
            }
        }
        let status = job.status.clone();
        info!(job = %id, state = state.as_str(), reason = reason.as_deref().unwrap_or(""), "job ended");
        match self.persist_status(id, &status).await {
            Ok(()) => self.send_aborts(id),
            Err(e) => {
                // Persist before acting: the members are told once the final
                // state is written (`Msg::NewLease`). Meanwhile the job is
                // over here, so nothing schedules it again.
                warn!(job = %id, "could not persist the final state: {e}; members are told once it is");
                if let Some(job) = self.jobs.get_mut(id) {
                    job.aborts_unsent = true;
                }
            }
        }
        if let Some(job) = self.jobs.get(id) {
            job.publish();
        }
        self.queue.retain(|q| q != id);
    }

    /// Tells the members of an ended job that have not finished to stop.
    pub(super) fn send_aborts(&mut self, id: &JobId) {
        let Some(job) = self.jobs.get_mut(id) else {
            return;
        };
        job.aborts_unsent = false;
        let reason = job
            .status
            .reason
            .clone()
            .unwrap_or_else(|| job.status.state.as_str().to_string());
        let run = job.run();
        for (rank, m) in job.members.iter().enumerate() {
            if job.finished.contains(&Rank(rank as u32)) {
                continue;
            }
            if let Some(worker) = m.worker.as_ref().and_then(|w| self.workers.get(w)) {
                let _ = worker.tx.try_send(Command::Abort(AbortTraining {
                    run: run.clone(),
                    reason: reason.clone(),
                    keep_state: false,
                }));
            }
        }
    }

    pub(super) async fn fail(&mut self, id: &JobId, generation: Generation, reason: String) {
        // Only a running generation can fail: after a resume the job is
        // queued at its old generation number until it launches again, and a
        // late report from that old generation must not fail it twice.
        let live = self
            .jobs
            .get(id)
            .is_some_and(|j| j.generation() == generation && j.status.state == JobState::Running);
        if live {
            self.finish(id, JobState::Failed, Some(reason)).await;
        }
    }

    pub(super) async fn cancel(&mut self, id: &str, now: bool) -> Result<JobView, ControlError> {
        let job = self.job(id)?;
        if job.status.state.is_final() {
            return Err(ControlError::JobFinished {
                id: id.to_string(),
                state: job.status.state.as_str(),
            });
        }
        let id = job.record.id.clone();
        let job_running = job.status.state == JobState::Running;
        if let Some(job) = self.jobs.get_mut(&id) {
            // The user's cancel wins over a drain's move.
            job.handover = false;
        }
        if job_running && !now {
            // Stop at the next step boundary after a final checkpoint; the
            // job becomes `cancelled` when every rank has stopped.
            self.request_checkpoint(id.as_str(), true)?;
            let grace = self.cfg.stop_grace;
            if let Some(job) = self.jobs.get_mut(&id) {
                job.set_timer(TimerKind::StopGrace, grace);
                job.status
                    .note("cancel requested: taking a final checkpoint");
                job.publish();
            }
        } else {
            self.finish(&id, JobState::Cancelled, Some("cancelled by user".into()))
                .await;
        }
        self.job(id.as_str()).map(Job::view)
    }

    /// Queues a failed or cancelled job again; its next generation starts
    /// from the newest committed checkpoint that verifies.
    pub(super) async fn resume(&mut self, id: &str) -> Result<JobView, ControlError> {
        let job = self.job(id)?;
        if !matches!(job.status.state, JobState::Failed | JobState::Cancelled) {
            return Err(ControlError::WrongState {
                id: id.to_string(),
                state: job.status.state.as_str(),
                what: "only a failed or cancelled job can be resumed",
            });
        }
        if job.checkpoints.is_empty() && job.record.resume_from.is_none() {
            return Err(ControlError::Invalid(format!(
                "job `{id}` has no committed checkpoint to resume from"
            )));
        }
        let id = job.record.id.clone();
        let mut status = job.status.clone();
        status.state = JobState::Queued;
        status.reason = None;
        status.note(match job.checkpoints.keys().next_back() {
            Some(step) => format!("resume requested from the checkpoint at step {step}"),
            None => "resume requested from the fork point".to_string(),
        });
        status.updated_at_ms = now_ms();
        self.persist_status(&id, &status).await?;
        if let Some(job) = self.jobs.get_mut(&id) {
            job.status = status;
            job.timers.clear();
            job.publish();
        }
        self.queue.push(id.clone());
        self.job(id.as_str()).map(Job::view)
    }

    pub(super) async fn note(&mut self, id: &JobId, text: String) {
        let Some(job) = self.jobs.get_mut(id) else {
            return;
        };
        info!(job = %id, "{text}");
        job.status.note(text);
        job.publish();
        let status = job.status.clone();
        if let Err(e) = self.persist_status(id, &status).await {
            warn!(job = %id, "could not persist an event: {e}");
        }
    }
}
