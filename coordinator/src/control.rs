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

use crate::scheduler::{self, Demand, FreeWorker};
use ringmaster_checkpoint::{self as ckpt, CheckpointInfo, KeepBest, Mode, RetentionPolicy};
use ringmaster_common::ids::{Generation, JobId, Rank, WorkerId};
use ringmaster_common::jobspec::MetricMode;
use ringmaster_common::jobspec::{DeviceKind, JobSpec};
use ringmaster_common::now_ms;
use ringmaster_common::records::{self, CheckpointRecord, JobRecord, JobState, JobStatusRecord};
use ringmaster_proto::{
    AbortTraining, CheckpointReport, CheckpointRequest, Command, CurrentRun, FailureCause,
    HealthView, JobView, Metrics, Registered, Registration, Role, RunId, RunOutcome, StartTraining,
    WireError, WorkerReport, WorkerView, WrittenCheckpoint,
};
use ringmaster_store::{LeaseId, StateStore, StoreError, keys};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

/// Why a control request was refused; mapped to gRPC codes in `server.rs`.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("job `{0}` not found")]
    JobNotFound(String),
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

/// One rank of a job's current group.
#[derive(Clone, Debug)]
struct Member {
    /// The worker's name, kept even while no session holds the rank (after
    /// a coordinator restart, until the worker rejoins).
    name: String,
    /// The worker's session id; `None` until the worker rejoins after a
    /// coordinator restart.
    worker: Option<WorkerId>,
}

/// What a deadline does when it passes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TimerKind {
    /// A cancel asked for a final checkpoint: stop without it if it is late.
    StopGrace,
    /// After a coordinator restart, the group's workers must rejoin by now.
    Adopt,
    /// A peer reported a closed connection: fail the job with what the
    /// reports say unless a member's session broke first.
    Blame,
}

/// A deadline of one generation of a job. A timer of an older generation
/// never fires: a new generation clears the table, and firing checks again.
#[derive(Clone, Copy, Debug)]
struct Timer {
    generation: Generation,
    at: Instant,
    kind: TimerKind,
}

/// A rank's report that its run failed on the data plane.
#[derive(Clone, Debug)]
struct PeerReport {
    rank: Rank,
    /// The peer whose connection closed, when the rank could tell.
    lost: Option<Rank>,
    text: String,
}

struct Job {
    record: JobRecord,
    status: JobStatusRecord,
    watch: watch::Sender<JobView>,
    /// The current generation's members, by rank.
    members: Vec<Member>,
    /// Ranks that finished the current generation successfully.
    finished: BTreeSet<Rank>,
    /// Committed checkpoints by step, as recorded in the store.
    checkpoints: BTreeMap<u64, CheckpointRecord>,
    /// Deadlines of the current generation.
    timers: Vec<Timer>,
    /// Data-plane failures reported in the current generation, awaiting the
    /// decision of who is to blame.
    peer_reports: Vec<PeerReport>,
    /// While queued: why the job cannot start yet.
    waiting: Option<String>,
    /// The job ended while its final state could not be written: its
    /// members are told to stop once it is (persist before acting).
    aborts_unsent: bool,
}

impl Job {
    fn new(record: JobRecord, status: JobStatusRecord) -> Job {
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
        }
    }

    fn view(&self) -> JobView {
        JobView::new(&self.record, &self.status, self.waiting.clone())
    }

    /// The generation the job is in (or last ran).
    fn generation(&self) -> Generation {
        Generation(self.status.generation)
    }

    /// The job's current run, as job-scoped messages name it.
    fn run(&self) -> RunId {
        RunId {
            job: self.record.id.clone(),
            generation: self.generation(),
        }
    }

    fn publish(&self) {
        self.watch.send_replace(self.view());
    }

    fn set_timer(&mut self, kind: TimerKind, after: Duration) {
        self.timers.retain(|t| t.kind != kind);
        self.timers.push(Timer {
            generation: self.generation(),
            at: Instant::now() + after,
            kind,
        });
    }

    fn has_timer(&self, kind: TimerKind) -> bool {
        self.timers
            .iter()
            .any(|t| t.kind == kind && t.generation == self.generation())
    }

    /// `name (rank r)` of a member, for messages.
    fn member_label(&self, rank: Rank) -> String {
        match self.members.get(rank.index()) {
            Some(m) => format!("{} (rank {rank})", m.name),
            None => format!("rank {rank}"),
        }
    }
}

struct Worker {
    /// As registered, less the run it reported (adopted at registration).
    info: Registration,
    tx: SessionTx,
    /// When the session last heard from the worker (ms since the epoch),
    /// updated by the session task itself: heartbeats never queue behind
    /// the control loop's work, so a slow store write cannot make live
    /// workers look dead.
    last_seen: Arc<AtomicU64>,
    /// The run and rank it holds, while assigned.
    assignment: Option<Assignment>,
}

/// A worker's rank in one generation of a job.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Assignment {
    run: RunId,
    rank: Rank,
}

/// A member of an ended job that has not reported its end yet: freed at
/// `at` if it still holds that assignment then.
struct Release {
    at: Instant,
    worker: WorkerId,
    run: RunId,
}

struct Cluster {
    store: Arc<dyn StateStore>,
    cfg: ControlConfig,
    jobs: BTreeMap<JobId, Job>,
    releases: Vec<Release>,
    /// Queued jobs in submission order.
    queue: Vec<JobId>,
    workers: BTreeMap<WorkerId, Worker>,
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

/// TTL of the membership lease.
const LEASE_TTL: Duration = Duration::from_secs(10);

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
        next_worker: 1,
        lease,
        health: health.clone(),
        store_name: String::new(),
        deposed: Arc::new(tokio::sync::Notify::new()),
    };
    cluster.load().await?;
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

/// Keeps the membership lease alive; a failure marks the coordinator
/// degraded (jobs keep training: the coordinator is off the step path) and a
/// lost lease is replaced once the store answers again.
async fn keep_lease(
    store: Arc<dyn StateStore>,
    mut lease: LeaseId,
    health: Health,
    control: ControlHandle,
) {
    let mut tick = tokio::time::interval(LEASE_TTL / 4);
    loop {
        tick.tick().await;
        match store.keep_alive(lease).await {
            Ok(_) => {
                if health.get().is_some() {
                    health.set(None);
                    // Registrations skipped while degraded are written now.
                    control.notify(Msg::NewLease(lease)).await;
                }
            }
            Err(StoreError::LeaseNotFound(_)) => match store.grant_lease(LEASE_TTL).await {
                Ok(new) => {
                    lease = new;
                    health.set(None);
                    control.notify(Msg::NewLease(new)).await;
                }
                Err(e) => health.set(Some(format!("cannot write the store: {e}"))),
            },
            Err(e) => health.set(Some(format!("cannot reach the store: {e}"))),
        }
        if control.tx.is_closed() {
            let _ = store.revoke_lease(lease).await;
            return;
        }
    }
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
            if status.state == JobState::Queued {
                queued.push((record.submitted_at_ms, id.clone()));
            }
            let mut job = Job::new(record, status);
            job.checkpoints = checkpoints.remove(&id).unwrap_or_default();
            if running {
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
            Msg::Watch(id, reply) => {
                let _ = reply.send(self.job(&id).map(|j| j.watch.subscribe()));
            }
            Msg::Register(mut info, tx, last_seen, reply) => {
                if let Some((old, w)) = self.workers.iter().find(|(_, w)| w.info.name == info.name)
                {
                    // A worker that sent no instance can never prove it is
                    // the same process.
                    if w.info.instance.is_none() || w.info.instance != info.instance {
                        let _ = reply.send(Err(ControlError::DuplicateName {
                            name: info.name.clone(),
                            id: old.to_string(),
                            host: w.info.host.clone(),
                            data_addr: w.info.data_addr.clone(),
                        }));
                        return;
                    }
                    // The same process again: its old session broke without
                    // the coordinator noticing yet. The new one replaces it,
                    // and the run it reports is adopted below.
                    let old = old.clone();
                    info!(worker = %old, name = %info.name, "worker reconnected; replacing its old session");
                    self.workers.remove(&old);
                    if let Some(job) = self
                        .jobs
                        .values_mut()
                        .find(|j| j.members.iter().any(|m| m.worker.as_ref() == Some(&old)))
                    {
                        for m in &mut job.members {
                            if m.worker.as_ref() == Some(&old) {
                                m.worker = None;
                            }
                        }
                    }
                }
                let id = WorkerId(format!("w{}", self.next_worker));
                self.next_worker += 1;
                info!(worker = %id, name = %info.name, data = %info.data_addr, "worker joined");
                // Registered goes first on the session, before any command.
                let registered = Command::Registered(Registered {
                    worker: id.clone(),
                    heartbeat_interval: self.cfg.heartbeat_interval,
                });
                if tx.try_send(registered).is_err() {
                    let _ = reply.send(Err(ControlError::ShuttingDown));
                    return;
                }
                let current = info.current.take();
                self.workers.insert(
                    id.clone(),
                    Worker {
                        info,
                        tx,
                        last_seen,
                        assignment: None,
                    },
                );
                let _ = reply.send(Ok(id.clone()));
                self.put_worker_record(&id).await;
                if let Some(run) = current {
                    self.adopt(&id, run).await;
                }
                self.schedule().await;
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
            Msg::Disconnected(id, reason) => {
                if let Some(w) = self.workers.remove(&id) {
                    info!(worker = %id, name = %w.info.name, "worker left: {reason}");
                    if self.writable().is_ok()
                        && let Ok(key) = keys::worker(&id)
                        && let Err(e) = self.store.delete(&key).await
                    {
                        warn!(worker = %id, "could not remove the registration: {e}");
                    }
                    if let Some(Assignment { run, rank }) = w.assignment {
                        let why = format!("worker {} (rank {rank}) lost: {reason}", w.info.name);
                        self.fail(&run.job, run.generation, why).await;
                    }
                    self.schedule().await;
                }
            }
        }
    }

    fn job(&self, id: &str) -> Result<&Job, ControlError> {
        self.jobs
            .get(&JobId(id.to_string()))
            .ok_or_else(|| ControlError::JobNotFound(id.to_string()))
    }

    async fn submit(
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

    /// While degraded the coordinator does not write: a store that does not
    /// answer would stall the control loop on every call. What it skips is
    /// written again on recovery ([`Msg::NewLease`]).
    fn writable(&self) -> Result<(), StoreError> {
        match self.health.get() {
            Some(problem) => Err(StoreError::Unavailable(problem)),
            None => Ok(()),
        }
    }

    /// Writes `key`. A write that may or may not have happened (a timeout
    /// after sending: [`StoreError::Ambiguous`]) is settled by reading the key
    /// back before going on, and written again only if it did not land.
    async fn put_settled(&self, key: &str, bytes: Vec<u8>) -> Result<(), StoreError> {
        let r = self.put_settled_inner(key, bytes).await;
        self.check_fenced(r)
    }

    async fn put_settled_inner(&self, key: &str, bytes: Vec<u8>) -> Result<(), StoreError> {
        match self.store.put(key, bytes.clone()).await {
            Ok(_) => Ok(()),
            Err(StoreError::Ambiguous(why)) => {
                warn!(
                    key,
                    "write may or may not have happened ({why}); reading it back"
                );
                match self.store.get(key).await? {
                    Some(v) if v.value == bytes => Ok(()),
                    _ => self.store.put(key, bytes).await.map(|_| ()),
                }
            }
            Err(e) => Err(e),
        }
    }

    async fn persist_status(&self, id: &JobId, status: &JobStatusRecord) -> Result<(), StoreError> {
        self.writable()?;
        let key = keys::job_status(id)?;
        self.put_settled(&key, records::encode(&key, status)?).await
    }

    /// A write refused by the leader fence means another coordinator leads:
    /// tell the election to step down now rather than at the next keep-alive.
    fn check_fenced<T>(&self, r: Result<T, StoreError>) -> Result<T, StoreError> {
        if let Err(StoreError::NotLeader(why)) = &r {
            warn!("a write was fenced off ({why}): stepping down");
            self.deposed.notify_one();
        }
        r
    }

    /// Applies a final state: persisted first, then members are told to stop
    /// and watchers see it.
    async fn finish(&mut self, id: &JobId, state: JobState, reason: Option<String>) {
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
    fn send_aborts(&mut self, id: &JobId) {
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

    async fn fail(&mut self, id: &JobId, generation: Generation, reason: String) {
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

    async fn cancel(&mut self, id: &str, now: bool) -> Result<JobView, ControlError> {
        let job = self.job(id)?;
        if job.status.state.is_final() {
            return Err(ControlError::JobFinished {
                id: id.to_string(),
                state: job.status.state.as_str(),
            });
        }
        let id = job.record.id.clone();
        if job.status.state == JobState::Running && !now {
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

    /// Asks a running job's ranks for a checkpoint at their next step
    /// boundary (they agree on the step through their all-reduce).
    fn request_checkpoint(&mut self, id: &str, stop: bool) -> Result<(), ControlError> {
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

    /// Queues a failed or cancelled job again; its next generation starts
    /// from the newest committed checkpoint that verifies.
    async fn resume(&mut self, id: &str) -> Result<JobView, ControlError> {
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

    fn list_checkpoints(&self, id: &str) -> Result<CommittedCheckpoints, ControlError> {
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
    async fn commit_checkpoint(
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

    /// Records a registration in the store, bound to the coordinator's lease
    /// (membership changes are the only worker writes; heartbeats never are).
    async fn put_worker_record(&mut self, id: &WorkerId) {
        let Some(w) = self.workers.get(id) else {
            return;
        };
        if self.health.get().is_some() {
            // Written when the store is back (see `keep_lease`), rather than
            // stalling the control loop on a store that does not answer.
            return;
        }
        let record = records::WorkerRecord {
            id: id.clone(),
            name: w.info.name.clone(),
            host: w.info.host.clone(),
            device: w.info.device.to_string(),
            data_addr: w.info.data_addr.clone(),
            registered_at_ms: now_ms(),
        };
        let result = match keys::worker(id) {
            Ok(key) => match records::encode(&key, &record) {
                Ok(bytes) => self
                    .store
                    .put_with_lease(&key, bytes, self.lease)
                    .await
                    .map(|_| ()),
                Err(e) => Err(e.into()),
            },
            Err(e) => Err(e.into()),
        };
        match result {
            Ok(()) => {}
            Err(e) if e.retryable() => self
                .health
                .set(Some(format!("cannot write the store: {e}"))),
            Err(e) => warn!(worker = %id, "could not record the registration: {e}"),
        }
    }

    /// A worker rejoined reporting the run it is part of. If that run is the
    /// job's current generation, the worker takes its rank back (adoption
    /// after a coordinator restart, or a reconnect); a stale run is told to
    /// stop.
    async fn adopt(&mut self, worker: &WorkerId, current: CurrentRun) {
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
        if job.has_timer(TimerKind::Adopt) && all_back {
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

    async fn note(&mut self, id: &JobId, text: String) {
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

    async fn on_worker_report(&mut self, id: WorkerId, report: WorkerReport) {
        let Some(worker) = self.workers.get_mut(&id) else {
            return;
        };
        let assignment = worker.assignment.clone();
        match report {
            WorkerReport::Heartbeat | WorkerReport::Register(_) => {}
            // Recovery is not built yet: a parked rank is a lost group, as a
            // data-plane failure was before.
            WorkerReport::Parked(p) => {
                let ended = ringmaster_proto::TrainingEnded {
                    run: p.run,
                    step: p.step,
                    metrics: Metrics::new(),
                    outcome: RunOutcome::Failed {
                        reason: p.reason,
                        cause: FailureCause::DataPlane {
                            lost_peer: p.lost_peer,
                        },
                    },
                };
                Box::pin(self.on_worker_report(id, WorkerReport::Ended(ended))).await;
            }
            WorkerReport::Progress(p) => {
                let Some(Assignment { run, rank }) = assignment else {
                    return;
                };
                if p.run != run || rank != Rank(0) {
                    return; // fenced: stale generation, or not the reporting rank
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
                match outcome {
                    Ok(written) => self.commit_checkpoint(&run, step, metrics, written).await,
                    Err(error) => {
                        let text = format!("checkpoint at step {step} failed: {error}");
                        self.note(&run.job, text).await;
                    }
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
    fn blame_from_reports(&self, job: &Job) -> String {
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
            if stopped {
                let reason = format!("cancelled by user at step {step}");
                self.finish(id, JobState::Cancelled, Some(reason)).await;
            } else {
                self.finish(id, JobState::Succeeded, None).await;
            }
        }
    }

    /// Fires the deadlines that have passed, then declares silent workers
    /// lost. Runs on a timer tick.
    async fn tick(&mut self) {
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
            Box::pin(self.handle(Msg::Disconnected(id, reason))).await;
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
            TimerKind::Adopt if job.status.state == JobState::Running => {
                let missing: Vec<String> = job
                    .members
                    .iter()
                    .enumerate()
                    .filter(|(_, m)| {
                        m.worker
                            .as_ref()
                            .is_none_or(|w| !self.workers.contains_key(w))
                    })
                    .map(|(rank, _)| job.member_label(Rank(rank as u32)))
                    .collect();
                let reason = format!(
                    "after a coordinator restart, {} did not rejoin within {} s",
                    missing.join(", "),
                    self.cfg.adopt_grace.as_secs()
                );
                self.fail(id, generation, reason).await;
            }
            TimerKind::Blame if job.status.state == JobState::Running => {
                let reason = self.blame_from_reports(job);
                self.fail(id, generation, reason).await;
            }
            TimerKind::StopGrace | TimerKind::Adopt | TimerKind::Blame => {}
        }
    }

    fn worker_views(&self) -> Vec<WorkerView> {
        self.workers
            .iter()
            .map(|(id, w)| WorkerView {
                id: id.clone(),
                name: w.info.name.clone(),
                host: w.info.host.clone(),
                device: w.info.device,
                assignment: w.assignment.as_ref().map(|a| (a.run.job.clone(), a.rank)),
                last_heartbeat_ms_ago: now_ms().saturating_sub(w.last_seen.load(Ordering::Relaxed)),
                data_addr: w.info.data_addr.clone(),
            })
            .collect()
    }

    /// Starts every queued job that the free workers allow.
    async fn schedule(&mut self) {
        // Registrations and departures call this; with nothing queued it
        // must not cost O(workers) each (measured: half the coordinator's
        // CPU while 10k workers registered).
        if self.queue.is_empty() {
            return;
        }
        let queue: Vec<Demand> = self
            .queue
            .iter()
            .filter_map(|id| self.jobs.get(id))
            .map(|j| Demand {
                job: j.record.id.clone(),
                min: j.record.spec.workers.min,
                max: j.record.spec.workers.max,
                device: j.record.spec.workers.device,
                global_batch: j.record.spec.train.global_batch,
            })
            .collect();
        let free: Vec<FreeWorker> = self
            .workers
            .iter()
            .filter(|(_, w)| w.assignment.is_none())
            .map(|(id, w)| FreeWorker {
                id: id.clone(),
                device: w.info.device.kind(),
            })
            .collect();
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
            if let Err(e) = self.launch(&placement.job, placement.workers).await {
                warn!(job = %placement.job, "could not start: {e}");
            }
        }
    }

    /// Forms a new generation of the job's group: persisted as running first,
    /// then each member receives its rank and the peers' addresses.
    async fn launch(&mut self, id: &JobId, members: Vec<WorkerId>) -> Result<(), ControlError> {
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
        job.waiting = None;
        job.publish();
        let run = job.run();
        let spec = job.record.spec.clone();
        let resume_candidates: Vec<PathBuf> = if job.checkpoints.is_empty() {
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
                state_source: None,
            }));
            if worker.tx.send(start).await.is_err() {
                warn!(worker = %w, "session closed before the start command");
            }
        }
        Ok(())
    }
}
