//! The control loop: the single owner of the cluster model (jobs, workers,
//! assignments). gRPC handlers never touch state; they send [`Msg`]s here and
//! await the reply. Every job transition is written to the store *before* any
//! command for it goes out (persist before acting).
//!
//! Heartbeats only refresh an in-memory timestamp; the store sees membership
//! and job-state changes alone.
//!
//! The loop speaks domain types only: it receives [`WorkerReport`]s, sends
//! [`Command`]s and answers with views ([`JobView`], [`WorkerView`],
//! [`HealthView`]); `server.rs` converts them to and from the wire.
//!
//! The loop's work is split by concern, each file adding an `impl Cluster`
//! block to the one owner of state: `jobs.rs` (a job's lifecycle),
//! `rendezvous.rs` (placing queued jobs and forming a generation),
//! `membership.rs` (registrations, disconnects, the membership lease),
//! `reports.rs` (worker reports and blame), `checkpoints.rs` (commit and
//! retention), `adoption.rs` (rejoining ranks after a restart), `timers.rs`
//! (per-generation deadlines and the tick) and `store_io.rs` (how the loop
//! writes the store). This file holds the public API, the model, its loading
//! from the store and the dispatch of messages.

mod adoption;
mod checkpoints;
mod cordons;
mod jobs;
mod membership;
mod recovery;
mod rendezvous;
mod reports;
mod store_io;
mod timers;

pub use checkpoints::{CommittedCheckpoints, with_uncommitted};
pub use cordons::CordonAction;

use jobs::{Job, Member};
use membership::{LEASE_TTL, Release, Worker, keep_lease};
use ringmaster_common::ids::{JobId, WorkerId};
use ringmaster_common::jobspec::JobSpec;
use ringmaster_common::records::{self, CheckpointRecord, JobRecord, JobState, JobStatusRecord};
use ringmaster_proto::{
    Command, HealthView, JobView, Registration, Role, WireError, WorkerReport, WorkerView,
};
use ringmaster_store::{LeaseId, StateStore, StoreError, keys};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;
use timers::TimerKind;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

/// Why a control request was refused; mapped to gRPC codes in `server.rs`.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("job `{0}` not found")]
    JobNotFound(String),
    #[error(
        "no worker `{0}` is registered (give its id, as `coordinator workers` lists it, or its name)"
    )]
    WorkerNotFound(String),
    #[error("job `{id}` is already {state}")]
    JobFinished { id: String, state: &'static str },
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("job `{id}` is {state}: {what}")]
    WrongState {
        id: String,
        state: &'static str,
        what: &'static str,
    },
    #[error("state store: {0}")]
    Store(#[from] StoreError),
    #[error("invalid id: {0}")]
    Id(#[from] ringmaster_common::ids::IdError),
    /// A message that does not make a domain value (malformed, out of
    /// bounds, or of another protocol version).
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("the coordinator is shutting down")]
    ShuttingDown,
    #[error(
        "a worker named `{name}` is already registered ({id} on {host}, data plane {data_addr}); \
         give this one another --name"
    )]
    DuplicateName {
        name: String,
        id: String,
        host: String,
        data_addr: String,
    },
}

impl From<ringmaster_common::records::RecordError> for ControlError {
    fn from(e: ringmaster_common::records::RecordError) -> Self {
        ControlError::Store(e.into())
    }
}

impl ControlError {
    /// Whether the same request may succeed later without any change (the
    /// store did not answer, or a write's fate is unknown).
    pub fn retryable(&self) -> bool {
        match self {
            ControlError::Store(e) => e.retryable() || matches!(e, StoreError::Ambiguous(_)),
            ControlError::ShuttingDown => true,
            ControlError::JobNotFound(_)
            | ControlError::WorkerNotFound(_)
            | ControlError::JobFinished { .. }
            | ControlError::Invalid(_)
            | ControlError::WrongState { .. }
            | ControlError::Id(_)
            | ControlError::Wire(_)
            | ControlError::DuplicateName { .. } => false,
        }
    }
}

/// Timing knobs; tests shorten them through configuration, never sleeps.
#[derive(Clone, Copy, Debug)]
pub struct ControlConfig {
    pub heartbeat_interval: Duration,
    /// A worker silent for this long is declared lost.
    pub heartbeat_timeout: Duration,
    /// Workers report progress every this many steps.
    pub progress_every_steps: u64,
    /// How long a cancelled job may take to write its final checkpoint
    /// before it is stopped without one.
    pub stop_grace: Duration,
    /// After a restart, how long a running job's workers have to rejoin
    /// before the job is declared failed.
    pub adopt_grace: Duration,
    /// How long a member whose session broke (its process may live on, still
    /// training) has to reconnect and take its rank back before it is taken
    /// as lost. A dead member's ring peers usually say so sooner.
    pub reconnect_grace: Duration,
    /// After a job ends, how long its members may take to report how their
    /// run ended before they are freed anyway (a worker that never reports
    /// must not stay busy forever).
    pub release_grace: Duration,
}

impl ControlConfig {
    /// How long a peer's "connection closed" report waits for a more direct
    /// sign of which worker died (its session closing, or its heartbeats
    /// stopping) before the job fails with what the reports say.
    fn blame_window(&self) -> Duration {
        self.heartbeat_timeout + self.heartbeat_interval
    }
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            heartbeat_interval: Duration::from_secs(1),
            heartbeat_timeout: Duration::from_secs(5),
            progress_every_steps: 10,
            stop_grace: Duration::from_secs(60),
            adopt_grace: Duration::from_secs(30),
            reconnect_grace: Duration::from_millis(1500),
            release_grace: Duration::from_secs(15),
        }
    }
}

/// Where the control loop answers a request.
pub type Reply<T> = oneshot::Sender<Result<T, ControlError>>;
/// Outbound half of a worker's session; the session's gRPC stream turns
/// each command into its wire form.
pub type SessionTx = mpsc::Sender<Command>;

/// Requests to the control loop.
#[allow(
    clippy::large_enum_variant,
    reason = "a Submit carries its job spec; boxing it would change every caller for one \
              allocation per submission"
)]
pub enum Msg {
    Submit(JobSpec, Option<PathBuf>, Reply<JobId>),
    GetJob(String, Reply<JobView>),
    ListJobs(Reply<Vec<JobView>>),
    /// Cancel a job; `true` stops at once without a final checkpoint.
    Cancel(String, bool, Reply<JobView>),
    Resume(String, Reply<JobView>),
    RequestCheckpoint(String, Reply<JobView>),
    /// A job's committed checkpoints; the caller adds what is on disk
    /// ([`with_uncommitted`]) off the loop.
    ListCheckpoints(String, Reply<CommittedCheckpoints>),
    ListWorkers(Reply<Vec<WorkerView>>),
    /// An admin's drain, cordon or uncordon of a worker (id or name), with
    /// an optional reason.
    Cordon(String, CordonAction, String, Reply<WorkerView>),
    Watch(String, Reply<watch::Receiver<JobView>>),
    /// A worker's first message; the loop sends `Registered` on the session
    /// before any other command.
    Register(Registration, SessionTx, Arc<AtomicU64>, Reply<WorkerId>),
    Health(Reply<HealthView>),
    /// The membership lease expired (e.g. the store was unreachable for
    /// longer than its TTL) and was replaced: registrations are written again.
    NewLease(LeaseId),
    /// A worker's report after its registration (heartbeats stop in the
    /// session task).
    FromWorker(WorkerId, WorkerReport),
    Disconnected(WorkerId, String),
    /// Stop the loop: this coordinator no longer leads. Dropping the cluster
    /// model closes every worker session, so workers look for the leader.
    Shutdown(Reply<()>),
}

/// A cheap, cloneable handle for sending requests to the loop.
#[derive(Clone)]
pub struct ControlHandle {
    tx: mpsc::Sender<Msg>,
    /// Signalled when a write was refused because another coordinator
    /// leads now (the fence on the leader key).
    deposed: Arc<tokio::sync::Notify>,
    /// Worker sessions report here. Unbounded so a session task never stops
    /// reading its stream (and so never misses heartbeats) while the loop
    /// is busy; each worker's report rate bounds what can queue.
    sessions: mpsc::UnboundedSender<Msg>,
}

impl ControlHandle {
    /// Sends a request and waits for its reply.
    pub async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Msg) -> Result<T, ControlError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| ControlError::ShuttingDown)?;
        rx.await.map_err(|_| ControlError::ShuttingDown)?
    }

    /// Sends a notification that needs no reply.
    pub async fn notify(&self, msg: Msg) {
        let _ = self.tx.send(msg).await;
    }

    /// Passes on what a worker session received, without ever waiting.
    pub fn from_session(&self, msg: Msg) {
        let _ = self.sessions.send(msg);
    }

    /// Resolves when a store write was refused because another coordinator
    /// leads: this one must step down at once.
    pub async fn deposed(&self) {
        self.deposed.notified().await
    }

    /// Stops the control loop and waits until it has (its sessions closed).
    pub async fn shutdown(&self) {
        let _ = self.call(Msg::Shutdown).await;
        self.tx.closed().await;
    }
}

struct Cluster {
    store: Arc<dyn StateStore>,
    cfg: ControlConfig,
    jobs: BTreeMap<JobId, Job>,
    releases: Vec<Release>,
    /// Queued jobs in submission order.
    queue: Vec<JobId>,
    workers: BTreeMap<WorkerId, Worker>,
    /// Workers that take no new work, by name (see `cordons.rs`).
    cordons: BTreeMap<String, records::CordonRecord>,
    /// Recent incidents each worker was blamed for, by name (quarantine).
    incidents: BTreeMap<String, Vec<std::time::Instant>>,
    next_worker: u64,
    /// Worker registrations in the store are bound to this lease, which a
    /// background task keeps alive: if this coordinator dies, they expire.
    lease: LeaseId,
    health: Health,
    store_name: String,
    deposed: Arc<tokio::sync::Notify>,
}

/// Whether the store can be written, shared by the control loop and the
/// lease keeper. `None` is healthy.
#[derive(Clone, Default)]
pub struct Health(Arc<std::sync::Mutex<Option<String>>>);

impl Health {
    fn set(&self, problem: Option<String>) {
        let mut h = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if *h != problem {
            match &problem {
                Some(p) => warn!("degraded: {p}"),
                None => info!("store reachable again: no longer degraded"),
            }
            *h = problem;
        }
    }

    fn get(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Loads the cluster model from the store and starts the loop.
pub async fn start(
    store: Arc<dyn StateStore>,
    store_name: String,
    cfg: ControlConfig,
) -> Result<ControlHandle, ControlError> {
    let lease = store.grant_lease(LEASE_TTL).await?;
    let health = Health::default();
    let mut cluster = Cluster {
        store: store.clone(),
        cfg,
        jobs: BTreeMap::new(),
        releases: Vec::new(),
        queue: Vec::new(),
        workers: BTreeMap::new(),
        cordons: BTreeMap::new(),
        incidents: BTreeMap::new(),
        next_worker: 1,
        lease,
        health: health.clone(),
        store_name: String::new(),
        deposed: Arc::new(tokio::sync::Notify::new()),
    };
    cluster.load().await?;
    cluster.load_cordons().await?;
    let (tx, rx) = mpsc::channel(1024);
    let (sessions, session_rx) = mpsc::unbounded_channel();
    let handle = ControlHandle {
        tx,
        sessions,
        deposed: cluster.deposed.clone(),
    };
    tokio::spawn(keep_lease(store, lease, health, handle.clone()));
    tokio::spawn(cluster.run(rx, session_rx, store_name));
    Ok(handle)
}

impl Cluster {
    /// Rebuilds the job table from the store. Jobs that were running when the
    /// previous coordinator stopped stay running, awaiting adoption.
    async fn load(&mut self) -> Result<(), ControlError> {
        let mut specs = BTreeMap::new();
        let mut statuses = BTreeMap::new();
        let mut checkpoints: BTreeMap<JobId, BTreeMap<u64, CheckpointRecord>> = BTreeMap::new();
        for (key, v) in self.store.range(&keys::jobs_prefix()).await? {
            match keys::parse_job_key(&key) {
                Some((id, keys::JobKeyKind::Spec)) => {
                    specs.insert(id, records::decode::<JobRecord>(&key, &v.value)?);
                }
                Some((id, keys::JobKeyKind::Status)) => {
                    statuses.insert(id, records::decode::<JobStatusRecord>(&key, &v.value)?);
                }
                Some((id, keys::JobKeyKind::Checkpoint(step))) => {
                    let record = records::decode::<CheckpointRecord>(&key, &v.value)?;
                    checkpoints.entry(id).or_default().insert(step, record);
                }
                _ => {}
            }
        }
        let mut queued = Vec::new();
        for (id, record) in specs {
            let Some(mut status) = statuses.remove(&id) else {
                warn!(job = %id, "job has a spec but no status; skipping");
                continue;
            };
            let running = status.state == JobState::Running;
            if running {
                // The group trains on without us: wait for its workers to
                // rejoin and report their run, then adopt it.
                status.note(format!(
                    "coordinator restarted: waiting up to {} s for the {} workers to rejoin",
                    self.cfg.adopt_grace.as_secs(),
                    status.members.len()
                ));
            }
            let recovering = status.state == JobState::Recovering;
            if recovering {
                // The survivors hold their state in memory: wait for them to
                // rejoin, then re-form as the old coordinator would have.
                status.note(format!(
                    "coordinator restarted while the job re-formed: waiting up to {} s for its \
                     workers to rejoin with their state",
                    self.cfg.adopt_grace.as_secs(),
                ));
            }
            if status.state == JobState::Queued {
                queued.push((record.submitted_at_ms, id.clone()));
            }
            let growing = status
                .incidents
                .last()
                .is_some_and(|i| i.kind != Some(records::IncidentKind::Loss));
            let mut job = Job::new(record, status);
            job.checkpoints = checkpoints.remove(&id).unwrap_or_default();
            if recovering {
                job.recovery = Some(recovery::Recovery::new(growing));
                // Members that rejoin but neither park nor drop out are
                // taken as lost after the adoption grace and a regroup
                // window, as at any re-forming.
                job.set_timer(
                    TimerKind::Regroup,
                    self.cfg.adopt_grace + self.cfg.blame_window(),
                );
            }
            if running || recovering {
                // Each rank keeps its worker's name until the worker rejoins.
                job.members = job
                    .status
                    .members
                    .iter()
                    .map(|name| Member {
                        name: name.clone(),
                        worker: None,
                    })
                    .collect();
                job.set_timer(TimerKind::Adopt, self.cfg.adopt_grace);
            }
            self.jobs.insert(id, job);
        }
        queued.sort();
        self.queue = queued.into_iter().map(|(_, id)| id).collect();
        info!(
            jobs = self.jobs.len(),
            queued = self.queue.len(),
            "loaded the job table"
        );
        Ok(())
    }

    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Msg>,
        mut session_rx: mpsc::UnboundedReceiver<Msg>,
        store_name: String,
    ) {
        self.store_name = store_name;
        let mut tick = tokio::time::interval(self.cfg.heartbeat_interval / 2);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                msg = rx.recv() => match msg {
                    Some(Msg::Shutdown(reply)) => {
                        info!("control loop stopping; closing {} worker sessions", self.workers.len());
                        let _ = reply.send(Ok(()));
                        break;
                    }
                    Some(msg) => self.handle(msg).await,
                    None => break,
                },
                Some(msg) = session_rx.recv() => self.handle(msg).await,
                _ = tick.tick() => self.tick().await,
            }
        }
    }

    async fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Submit(spec, resume_from, reply) => {
                let r = self.submit(spec, resume_from).await;
                let _ = reply.send(r);
                self.schedule().await;
            }
            Msg::GetJob(id, reply) => {
                let _ = reply.send(self.job(&id).map(Job::view));
            }
            Msg::ListJobs(reply) => {
                let _ = reply.send(Ok(self.jobs.values().map(Job::view).collect()));
            }
            Msg::Cancel(id, now, reply) => {
                let r = self.cancel(&id, now).await;
                let _ = reply.send(r);
            }
            Msg::Resume(id, reply) => {
                let r = self.resume(&id).await;
                let _ = reply.send(r);
                self.schedule().await;
            }
            Msg::RequestCheckpoint(id, reply) => {
                let r = self.request_checkpoint(&id, false);
                let _ = reply.send(r.and_then(|()| self.job(&id).map(Job::view)));
            }
            Msg::ListCheckpoints(id, reply) => {
                let _ = reply.send(self.list_checkpoints(&id));
            }
            Msg::ListWorkers(reply) => {
                let _ = reply.send(Ok(self.worker_views()));
            }
            Msg::Cordon(target, action, reason, reply) => {
                let r = self.set_cordon(&target, action, reason).await;
                let _ = reply.send(r);
            }
            Msg::Watch(id, reply) => {
                let _ = reply.send(self.job(&id).map(|j| j.watch.subscribe()));
            }
            Msg::Register(info, tx, last_seen, reply) => {
                self.register(info, tx, last_seen, reply).await
            }
            Msg::FromWorker(id, report) => self.on_worker_report(id, report).await,
            Msg::Shutdown(reply) => {
                let _ = reply.send(Ok(()));
            }
            Msg::Health(reply) => {
                let _ = reply.send(Ok(HealthView {
                    role: Role::Leader {
                        store: self.store_name.clone(),
                        jobs: self.jobs.len() as u32,
                        running_jobs: self
                            .jobs
                            .values()
                            .filter(|j| j.status.state == JobState::Running)
                            .count() as u32,
                        workers: self.workers.len() as u32,
                    },
                    degraded: self.health.get(),
                    version: env!("CARGO_PKG_VERSION").to_string(),
                }));
            }
            Msg::NewLease(lease) => {
                self.lease = lease;
                let ids: Vec<WorkerId> = self.workers.keys().cloned().collect();
                for id in ids {
                    self.put_worker_record(&id).await;
                }
                // Transitions made while degraded live only in memory so far.
                let statuses: Vec<(JobId, JobStatusRecord)> = self
                    .jobs
                    .iter()
                    .map(|(id, j)| (id.clone(), j.status.clone()))
                    .collect();
                for (id, status) in statuses {
                    if let Err(e) = self.persist_status(&id, &status).await {
                        warn!(job = %id, "could not persist after recovery: {e}");
                        break;
                    }
                    // Its final state is written now: the members may stop.
                    if self.jobs.get(&id).is_some_and(|j| j.aborts_unsent) {
                        self.send_aborts(&id);
                    }
                }
            }
            Msg::Disconnected(id, reason) => self.disconnected(id, reason, true).await,
        }
    }
}
