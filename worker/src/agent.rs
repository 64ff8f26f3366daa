//! The agent: the worker's one session with the coordinator. It registers,
//! heartbeats, turns `StartTraining` commands into a trainer on a dedicated
//! OS thread ([`host`](crate::host)), relays the trainer's progress, and
//! aborts it on command. A trainer whose group broke holds its state
//! (parked): the next start of the same job goes to it. The
//! coordinator is off the step path: when the session breaks, training goes
//! on, reports are buffered, and the agent reconnects and re-registers with
//! the run it is part of so a restarted coordinator can adopt it.
//!
//! This is the only part of the worker that knows gRPC; the trainer only sees
//! an [`Assignment`] and a progress callback. The session speaks the domain
//! types of `ringmaster-proto` ([`WorkerReport`] up, [`Command`] down),
//! converted at the stream's edges.

use crate::collective::DataPlaneListener;
use crate::host::{self, Host, Next};
use crate::trainer::{Assignment, TrainerControl, TrainerOptions};
use anyhow::{Context, bail};
use ringmaster_common::ids::{Generation, JobId, Rank};
use ringmaster_common::worker::Device;
use ringmaster_proto::pb::{self, WorkerMessage, agent_client::AgentClient};
use ringmaster_proto::{
    Command, CurrentRun, FailureCause, Metrics, Parked, Registration, RunId, RunOutcome,
    StartTraining, TrainingEnded, WorkerReport,
};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{error, info, warn};

/// Wire protocol version this worker speaks.
pub const PROTOCOL_VERSION: u32 = ringmaster_proto::PROTOCOL_VERSION;

/// Everything the agent needs to join a cluster.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub coordinator: String,
    pub name: String,
    /// As the user wrote it: `cpu` or `cuda:N`.
    pub device_label: String,
    pub device: tch::Device,
    pub threads: usize,
    /// Where the data-plane listener binds, e.g. `127.0.0.1:0`.
    pub data_listen: String,
    /// The data-plane address peers should dial; defaults to the bound address.
    pub data_advertise: Option<String>,
    /// How long to keep trying to reach the coordinator at start.
    pub connect_timeout: Duration,
}

/// The coordinator refused this worker's name: another live worker has it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct NameTaken(String);

/// How long a refused name is retried before the worker gives up: long
/// enough for the coordinator to notice that a previous process of this
/// name (killed and restarted) is gone, short enough that a real duplicate
/// hears about it at once.
const NAME_TAKEN_PATIENCE: Duration = Duration::from_secs(5);

/// A random id for this process, sent with every registration so that the
/// coordinator can tell a reconnect of this process from another process
/// that uses the same name.
fn instance_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    format!("{:016x}", h.finish())
}

/// The run this worker was last assigned, kept until a new assignment
/// replaces it so that a restarted coordinator can adopt it (and learn how it
/// ended, if it ended while no coordinator was listening).
struct Running {
    job_id: String,
    generation: u64,
    rank: u32,
    step: u64,
    control: Arc<TrainerControl>,
    /// The trainer thread; `None` when it never started.
    host: Option<Host>,
    /// The trainer holds the job's state and waits for its next generation.
    parked: bool,
    ended: Option<TrainingEnded>,
}

impl Running {
    /// The job generation this run belongs to.
    fn run(&self) -> RunId {
        RunId {
            // The id came from a parsed command.
            job: JobId(self.job_id.clone()),
            generation: Generation(self.generation),
        }
    }

    fn as_current(&self) -> CurrentRun {
        CurrentRun {
            run: self.run(),
            rank: Rank(self.rank),
            step: self.step,
            parked: self.parked,
        }
    }
}

/// Messages produced while no session is up, sent after the next
/// registration. Progress is only kept as the latest one.
const MAX_PENDING: usize = 1024;

/// Runs the worker until it is stopped. Losing the coordinator does not stop
/// training: the agent reconnects with backoff and registers again, telling
/// the coordinator which run it is part of.
pub async fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    let listener = Arc::new(
        DataPlaneListener::bind(&cfg.data_listen)
            .with_context(|| format!("failed to bind the data plane on {}", cfg.data_listen))?,
    );
    let data_addr = match &cfg.data_advertise {
        Some(a) => a.clone(),
        None => listener.local_addr().to_string(),
    };
    let device: Device = cfg.device_label.parse()?;
    // Every session registers with this, plus the run the worker is part of.
    let hello = Registration {
        name: cfg.name.clone(),
        host: hostname(),
        device,
        data_addr,
        threads: cfg.threads as u32,
        current: None,
        instance: Some(instance_id()),
    };
    // Trainer threads report here; the agent forwards to whichever session
    // is up.
    let (events_tx, mut events_rx) = mpsc::unbounded_channel::<WorkerReport>();
    let mut current: Option<Running> = None;
    let mut pending: std::collections::VecDeque<WorkerReport> = Default::default();
    // Several URLs: a leader and its standbys. A standby's refusal names the
    // leader, which is tried next.
    let mut urls: Vec<String> = cfg
        .coordinator
        .split(',')
        .map(|u| u.trim().to_string())
        .filter(|u| !u.is_empty())
        .collect();
    if urls.is_empty() {
        bail!("no coordinator URL given");
    }
    let mut idx = 0;
    let started = std::time::Instant::now();
    let mut name_refused_since: Option<std::time::Instant> = None;
    let mut reached = false;
    let mut backoff = Duration::from_millis(100);
    loop {
        let url = urls[idx].clone();
        match AgentClient::connect(url.clone()).await {
            Ok(client) => {
                reached = true;
                let result = session(
                    cfg_with(&cfg, &url),
                    client,
                    &hello,
                    &listener,
                    &events_tx,
                    &mut events_rx,
                    &mut current,
                    &mut pending,
                )
                .await;
                match result {
                    Ok(()) => backoff = Duration::from_millis(100),
                    Err(e) if e.downcast_ref::<NameTaken>().is_some() => {
                        let since = *name_refused_since.get_or_insert_with(std::time::Instant::now);
                        if since.elapsed() >= NAME_TAKEN_PATIENCE {
                            return Err(e.context("the coordinator refused this worker"));
                        }
                        warn!("{e:#}; retrying in case the previous holder of the name is gone");
                    }
                    Err(e) => {
                        let text = format!("{e:#}");
                        warn!("session with {url} ended: {text}; reconnecting");
                        idx = next_url(&mut urls, idx, &text);
                    }
                }
            }
            Err(e) => {
                if !reached && started.elapsed() >= cfg.connect_timeout {
                    return Err(anyhow::Error::new(e).context(format!(
                        "failed to reach the coordinator at {}",
                        cfg.coordinator
                    )));
                }
                warn!("coordinator {url} unreachable ({e}); retrying");
                idx = (idx + 1) % urls.len();
            }
        }
        // Keep the trainer's messages while waiting.
        let deadline = tokio::time::sleep(backoff);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = &mut deadline => break,
                Some(m) = events_rx.recv() => {
                    if let Some(m) = from_trainer(m) {
                        buffer(&mut pending, &mut current, m);
                    }
                }
            }
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// The URL to try after a failed session: the leader a standby named, else
/// the next one in the list.
fn next_url(urls: &mut Vec<String>, idx: usize, error: &str) -> usize {
    const HINT: &str = "the leader is at ";
    if let Some(pos) = error.find(HINT) {
        let leader: String = error[pos + HINT.len()..]
            .chars()
            .take_while(|c| !c.is_whitespace() && *c != '"' && *c != ',' && *c != ';')
            .collect();
        if !leader.is_empty() {
            return match urls.iter().position(|u| *u == leader) {
                Some(i) => i,
                None => {
                    urls.push(leader);
                    urls.len() - 1
                }
            };
        }
    }
    (idx + 1) % urls.len()
}

fn cfg_with(cfg: &AgentConfig, url: &str) -> AgentConfig {
    AgentConfig {
        coordinator: url.to_string(),
        ..cfg.clone()
    }
}

/// Keeps a message for the next session, updating what the agent knows of
/// its run on the way.
fn buffer(
    pending: &mut std::collections::VecDeque<WorkerReport>,
    current: &mut Option<Running>,
    m: WorkerReport,
) {
    observe(current, &m);
    if matches!(m, WorkerReport::Progress(_)) {
        pending.retain(|p| !matches!(p, WorkerReport::Progress(_)));
    }
    if pending.len() >= MAX_PENDING {
        pending.pop_front();
    }
    pending.push_back(m);
}

fn observe(current: &mut Option<Running>, m: &WorkerReport) {
    let Some(r) = current.as_mut() else {
        return;
    };
    match m {
        WorkerReport::Progress(p) if p.run.job.as_str() == r.job_id => r.step = p.step,
        WorkerReport::Ended(e) if e.run.job.as_str() == r.job_id => {
            r.step = r.step.max(e.step);
            r.ended = Some(e.clone());
            r.parked = false;
        }
        WorkerReport::Parked(p) if p.run.job.as_str() == r.job_id => {
            r.step = p.step;
            r.parked = true;
        }
        _ => {}
    }
}

/// A trainer report, checked through the same bounded conversion the
/// coordinator applies, so the agent never sends a report the coordinator
/// would refuse (a note longer than the wire allows, say).
fn from_trainer(m: WorkerReport) -> Option<WorkerReport> {
    match WorkerReport::try_from(WorkerMessage::from(m)) {
        Ok(r) => Some(r),
        Err(e) => {
            error!("dropping a trainer report the coordinator would refuse: {e}");
            None
        }
    }
}

/// One session: register, then relay commands and reports until it breaks.
#[allow(clippy::too_many_arguments)]
async fn session(
    cfg: AgentConfig,
    mut client: AgentClient<tonic::transport::Channel>,
    hello: &Registration,
    listener: &Arc<DataPlaneListener>,
    events_tx: &mpsc::UnboundedSender<WorkerReport>,
    events_rx: &mut mpsc::UnboundedReceiver<WorkerReport>,
    current: &mut Option<Running>,
    pending: &mut std::collections::VecDeque<WorkerReport>,
) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::channel::<WorkerReport>(256);
    tx.send(WorkerReport::Register(Registration {
        current: current.as_ref().map(Running::as_current),
        ..hello.clone()
    }))
    .await?;
    let outbound = ReceiverStream::new(rx).map(WorkerMessage::from);
    let mut inbound = match client.session(outbound).await {
        Ok(r) => r.into_inner(),
        Err(status) if status.code() == tonic::Code::AlreadyExists => {
            return Err(NameTaken(status.message().to_string()).into());
        }
        Err(status) => {
            return Err(anyhow::Error::new(status).context("coordinator refused the session"));
        }
    };
    let registered = match inbound.message().await?.map(Command::try_from) {
        Some(Ok(Command::Registered(r))) => r,
        other => bail!("expected a registration reply, got {other:?}"),
    };
    info!(
        worker = %registered.worker,
        data_addr = %hello.data_addr,
        "registered with {}",
        cfg.coordinator
    );
    // What happened while no coordinator listened, then how the last run
    // ended (a duplicate is ignored by the coordinator's fencing).
    while let Some(m) = pending.pop_front() {
        tx.send(m).await?;
    }
    if let Some(ended) = current.as_ref().and_then(|r| r.ended.clone()) {
        tx.send(WorkerReport::Ended(ended)).await?;
    }
    let beat = registered
        .heartbeat_interval
        .clamp(Duration::from_millis(50), Duration::from_secs(60));
    let mut tick = tokio::time::interval(beat);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                tx.send(WorkerReport::Heartbeat).await?;
            }
            Some(m) = events_rx.recv() => {
                let Some(m) = from_trainer(m) else {
                    continue;
                };
                observe(current, &m);
                if let Err(e) = tx.send(m).await {
                    buffer(pending, current, e.0);
                    bail!("session closed");
                }
            }
            next = inbound.message() => {
                let next = match next {
                    Ok(Some(m)) => m,
                    Ok(None) => bail!("coordinator closed the session"),
                    Err(status) => bail!("coordinator session lost: {status}"),
                };
                handle_command(&cfg, next, listener, events_tx, current).await;
            }
        }
    }
}

async fn handle_command(
    cfg: &AgentConfig,
    next: pb::CoordinatorMessage,
    listener: &Arc<DataPlaneListener>,
    events_tx: &mpsc::UnboundedSender<WorkerReport>,
    current: &mut Option<Running>,
) {
    let start_of = next.start_of();
    match Command::try_from(next) {
        Ok(Command::Start(start)) => {
            let (run, rank) = (start.run.clone(), start.rank);
            let assignment = match resume_parked(Box::new(assignment_of(*start)), current) {
                Ok(()) => return,
                Err(a) => *a,
            };
            supersede(current).await;
            match start_trainer(cfg, assignment, listener, events_tx) {
                Ok(r) => *current = Some(r),
                Err(e) => could_not_start(run, rank, format!("{e:#}"), events_tx, current),
            }
        }
        // A start this worker cannot use (a spec it cannot read, say) is a
        // failed run like any other.
        Err(e) => match start_of {
            Some((run, rank)) => {
                supersede(current).await;
                could_not_start(run, rank, e.to_string(), events_tx, current);
            }
            None => warn!("ignoring a malformed message from the coordinator: {e}"),
        },
        Ok(Command::Abort(abort)) => {
            if let Some(r) = current.as_mut()
                && r.run() == abort.run
            {
                if abort.keep_state {
                    info!(job = %abort.run.job, "leaving the group, keeping the state: {}", abort.reason);
                    r.control.park(&abort.reason);
                    if r.parked {
                        // Already out of the group: say so again, for a
                        // coordinator that did not hear it (a restarted one).
                        let _ = events_tx.send(WorkerReport::Parked(Parked {
                            run: r.run(),
                            step: r.step,
                            lost_peer: None,
                            reason: abort.reason.clone(),
                        }));
                    }
                } else {
                    info!(job = %abort.run.job, "aborting: {}", abort.reason);
                    r.control.abort(&abort.reason);
                    // Also for a trainer not (yet) seen parked: it may be
                    // about to park, and then takes this at once.
                    if let Some(h) = &r.host {
                        let _ = h.next.send(Next::Drop(abort.reason.clone()));
                    }
                    // Whatever it held is gone: no later start goes to it.
                    r.parked = false;
                }
            }
        }
        Ok(Command::Checkpoint(req)) => {
            if let Some(r) = current.as_ref()
                && r.run() == req.run
            {
                info!(job = %req.run.job, stop = req.stop, parked = r.parked, "checkpoint requested");
                match &r.host {
                    // Held between generations: the trainer writes it as is.
                    Some(h) if r.parked => {
                        let _ = h.next.send(Next::Checkpoint);
                    }
                    _ => r.control.request_checkpoint(req.stop),
                }
            }
        }
        Ok(Command::Prepare(p)) => {
            // Only while free: a training run keeps the memory and the cores.
            if current
                .as_ref()
                .is_none_or(|r| r.ended.is_some() && !r.parked)
            {
                info!(job = %p.job, "preparing the data of a job this worker may join");
                crate::trainer::prepare(&p.spec, cfg.device);
            }
        }
        Ok(Command::Registered(_)) => {
            warn!("ignoring an unexpected message from the coordinator")
        }
    }
}

/// Hands a start of the job whose state this worker holds (parked) to that
/// trainer, which rebinds the run to the new generation. Gives the start
/// back when there is no such trainer.
fn resume_parked(a: Box<Assignment>, current: &mut Option<Running>) -> Result<(), Box<Assignment>> {
    let Some(r) = current.as_mut() else {
        return Err(a);
    };
    if !r.parked || r.job_id != a.job_id || a.generation <= r.generation {
        return Err(a);
    }
    let Some(h) = &r.host else {
        return Err(a);
    };
    let control = Arc::new(TrainerControl::default());
    let (generation, rank) = (a.generation, a.rank);
    if let Err(back) = h.next.send(Next::Start(a, control.clone())) {
        // The thread gave up waiting a moment ago: start afresh.
        return match back.0 {
            Next::Start(a, _) => Err(a),
            Next::Drop(_) | Next::Checkpoint => unreachable!("sent a start"),
        };
    }
    info!(job = %r.job_id, generation, rank, "rejoining with the held state");
    r.generation = generation;
    r.rank = rank;
    r.control = control;
    r.parked = false;
    r.ended = None;
    Ok(())
}

/// Stops the run a new assignment replaces, waiting for its thread.
async fn supersede(current: &mut Option<Running>) {
    if let Some(mut prev) = current.take() {
        prev.control.abort("superseded by a new assignment");
        if let Some(h) = prev.host.take() {
            let _ = h
                .next
                .send(Next::Drop("superseded by a new assignment".into()));
            let _ = tokio::task::spawn_blocking(move || h.thread.join()).await;
        }
    }
}

/// Says a start failed as a failed run, so the coordinator frees this
/// worker and fails the job naming the real cause rather than waiting for
/// the peers to time out.
fn could_not_start(
    run: RunId,
    rank: Rank,
    why: String,
    events_tx: &mpsc::UnboundedSender<WorkerReport>,
    current: &mut Option<Running>,
) {
    error!(job = %run.job, "could not start training: {why}");
    *current = Some(Running {
        job_id: run.job.0.clone(),
        generation: run.generation.0,
        rank: rank.0,
        step: 0,
        control: Arc::new(TrainerControl::default()),
        host: None,
        parked: false,
        ended: None,
    });
    let ended = TrainingEnded {
        run,
        step: 0,
        metrics: Metrics::new(),
        outcome: RunOutcome::Failed {
            reason: format!("could not start training: {why}"),
            cause: FailureCause::OwnWork,
        },
    };
    // Through the trainer's channel, so it queues behind nothing it should
    // follow and is buffered while no session is up.
    let _ = events_tx.send(WorkerReport::Ended(ended));
}

/// What the trainer needs of a start command.
fn assignment_of(start: StartTraining) -> Assignment {
    let output_dir = start.spec.output.job_dir(start.run.job.as_str());
    Assignment {
        job_id: start.run.job.0,
        generation: start.run.generation.0,
        rank: start.rank.0,
        peers: start.peers,
        spec: start.spec,
        progress_every: start.progress_every_steps.max(1),
        resume_candidates: start.resume_candidates,
        output_dir,
        state_source: start.state_source.map(|r| r.0),
        cursor: start.cursor,
    }
}

/// How long a trainer holds a broken group's state for the job's next
/// generation before it drops it: the coordinator decides much sooner (it
/// re-forms the job or tells the rank to drop it), so this only frees the
/// memory of a worker the coordinator forgot (it lost its store, say).
const PARK_PATIENCE: Duration = Duration::from_secs(3600);

fn start_trainer(
    cfg: &AgentConfig,
    assignment: Assignment,
    listener: &Arc<DataPlaneListener>,
    tx: &mpsc::UnboundedSender<WorkerReport>,
) -> anyhow::Result<Running> {
    if start_failpoint() {
        bail!("fail point agent-start=error");
    }
    let opts = TrainerOptions {
        device: cfg.device,
        threads: cfg.threads,
        connect_timeout: Duration::from_secs(30),
    };
    let control = Arc::new(TrainerControl::default());
    let (job_id, generation, rank) = (
        assignment.job_id.clone(),
        assignment.generation,
        assignment.rank,
    );
    let host = host::spawn(
        assignment,
        control.clone(),
        opts,
        listener.clone(),
        tx.clone(),
        PARK_PATIENCE,
    )
    .context("failed to spawn the trainer thread")?;
    Ok(Running {
        job_id,
        generation,
        rank,
        step: 0,
        control,
        host: Some(host),
        parked: false,
        ended: None,
    })
}

/// `RINGMASTER_FAILPOINT=agent-start=error` makes every start fail, as a
/// spec the worker cannot use or a thread it cannot spawn would (tests; only
/// in builds with fail points, see `FAILPOINTS_BUILT_IN`).
fn start_failpoint() -> bool {
    use ringmaster_checkpoint::{FAILPOINT_ENV, FAILPOINTS_BUILT_IN};
    FAILPOINTS_BUILT_IN
        && std::env::var(FAILPOINT_ENV)
            .is_ok_and(|v| v.split(',').any(|e| e.trim() == "agent-start=error"))
}

/// This machine's host name, for registration and default worker names.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}
