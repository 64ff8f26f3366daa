//! The worker session (`Agent.Session`) in domain form: what a worker reports
//! ([`WorkerReport`], mirroring `WorkerMessage.kind`) and what the coordinator
//! commands ([`Command`], mirroring `CoordinatorMessage.kind`), with typed ids,
//! a parsed [`Device`] and a parsed, re-checked [`JobSpec`]. Inbound messages
//! become these with `TryFrom`, bounded (see the `MAX_*` constants in the
//! crate root); outbound ones are built here with `From` and nowhere else.
//!
//! Every job-scoped message names its [`RunId`] (job, generation): a receiver
//! compares it with what it is running and ignores an older generation's
//! messages (fencing). That comparison is the receiver's business, not this
//! module's.

use crate::{
    MAX_PEERS, MAX_RESUME_CANDIDATES, PROTOCOL_VERSION, WireError, at_most, label, metrics,
    metrics_out, path, pb, spec_from_json, spec_to_json, text,
};
use pb::{coordinator_message, worker_message};
use ringmaster_common::ids::{Generation, JobId, Rank, WorkerId};
use ringmaster_common::jobspec::JobSpec;
use ringmaster_common::worker::Device;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// Metrics by name, as a trainer reports them.
pub type Metrics = BTreeMap<String, f64>;

/// One generation of one job: what every job-scoped message carries so that
/// its receiver can tell the current run from an older one.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RunId {
    pub job: JobId,
    pub generation: Generation,
}

/// What a worker sends on its session.
#[derive(Clone, Debug, PartialEq)]
pub enum WorkerReport {
    /// The first message of every session, and only the first.
    Register(Registration),
    /// Liveness only; the coordinator's session task stamps it and goes on.
    Heartbeat,
    /// Rank 0's progress, every `progress_every_steps` steps.
    Progress(Progress),
    /// Rank 0 wrote (phase one of the commit) or failed to write a checkpoint.
    Checkpoint(CheckpointReport),
    /// Something the user should know about the run.
    Note(Note),
    /// How this rank's run ended.
    Ended(TrainingEnded),
    /// This rank's group broke and it keeps its state for the next one.
    Parked(Parked),
    Rebound(Rebound),
}

/// A worker joining (or rejoining) the cluster.
#[derive(Clone, Debug, PartialEq)]
pub struct Registration {
    /// The name the worker chose; unique among live workers.
    pub name: String,
    pub host: String,
    pub device: Device,
    /// `host:port` where the worker accepts ring connections from its peers.
    pub data_addr: String,
    pub threads: u32,
    /// The run the worker is part of (running, or ended but possibly not yet
    /// reported), so that a restarted coordinator can adopt it.
    pub current: Option<CurrentRun>,
    /// Random per worker process: a reconnect of the same process replaces
    /// its old session, another process under a name in use is refused.
    /// `None` (a worker that sends none) never matches.
    pub instance: Option<String>,
}

/// The run a registering worker is part of, and how far it got.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CurrentRun {
    pub run: RunId,
    pub rank: Rank,
    pub step: u64,
    /// It left its broken group holding the state of `step`.
    pub parked: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Progress {
    pub run: RunId,
    pub step: u64,
    pub epoch: u64,
    /// The length of the run, once the trainer knows it.
    pub total_steps: u64,
    pub metrics: Metrics,
}

/// A checkpoint written by rank 0, or the reason it could not be.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckpointReport {
    pub run: RunId,
    pub step: u64,
    /// The metrics at that step (retention may keep the best checkpoints).
    pub metrics: Metrics,
    pub outcome: Result<WrittenCheckpoint, String>,
}

/// A complete checkpoint directory on disk, awaiting its commit.
#[derive(Clone, Debug, PartialEq)]
pub struct WrittenCheckpoint {
    pub dir: PathBuf,
    pub bytes: u64,
    pub write_seconds: f64,
    /// Training time the checkpoint blocked the step loop.
    pub blocked_seconds: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Note {
    pub run: RunId,
    pub text: String,
}

/// A rank that left its broken group but holds its training state in
/// memory, ready to rebind to the job's next generation.
#[derive(Clone, Debug, PartialEq)]
pub struct Parked {
    pub run: RunId,
    /// Optimizer steps this rank has completed: the state it holds.
    pub step: u64,
    /// The peer whose ring connection broke, when the data plane knows.
    pub lost_peer: Option<Rank>,
    pub reason: String,
}

/// Rank 0 of a new generation made the group's state one: the step it
/// holds and, when its state was copied to the others, what moved.
#[derive(Clone, Debug, PartialEq)]
pub struct Rebound {
    pub run: RunId,
    pub step: u64,
    /// Bytes and seconds of the state transfer, when there was one.
    pub transfer: Option<(u64, f64)>,
}

/// How one rank's run ended.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainingEnded {
    pub run: RunId,
    /// The last step done (0 when the run failed).
    pub step: u64,
    pub metrics: Metrics,
    pub outcome: RunOutcome,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunOutcome {
    /// Every step ran, or (`stopped`) the run stopped early on request after
    /// its final checkpoint.
    Succeeded {
        stopped: bool,
    },
    Failed {
        reason: String,
        cause: FailureCause,
    },
}

/// Where a failure came from, which decides who the coordinator blames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureCause {
    /// This rank's own work (its data, model, device, ...).
    OwnWork,
    /// The data plane: a peer, or the connection to it. The coordinator
    /// waits briefly for a more direct sign of which worker died.
    DataPlane {
        /// The rank whose ring connection broke, when this rank could tell.
        lost_peer: Option<Rank>,
    },
}

/// What the coordinator sends on a worker's session.
#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    /// The answer to a registration, first on every session.
    Registered(Registered),
    /// Boxed: a job spec is large, and every command of a session's
    /// channel would otherwise be as large as a start.
    Start(Box<StartTraining>),
    Checkpoint(CheckpointRequest),
    Abort(AbortTraining),
    /// Boxed like a start: it carries a job spec.
    Prepare(Box<PrepareJob>),
}

/// A running job a free worker may be asked to join: it loads (and
/// verifies) the job's data ahead of time.
#[derive(Clone, Debug, PartialEq)]
pub struct PrepareJob {
    pub job: JobId,
    pub spec: JobSpec,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registered {
    /// The id this session has; ids restart with each leader.
    pub worker: WorkerId,
    pub heartbeat_interval: Duration,
}

/// One rank of a new generation of a job.
#[derive(Clone, Debug, PartialEq)]
pub struct StartTraining {
    pub run: RunId,
    pub rank: Rank,
    /// Data-plane addresses of every rank, indexed by rank.
    pub peers: Vec<String>,
    /// Re-checked on receipt: inbound data can be malformed.
    pub spec: JobSpec,
    /// Report progress every this many steps (the coordinator is off the
    /// step path).
    pub progress_every_steps: u64,
    /// Checkpoint directories to resume from, newest first; empty: a fresh
    /// start.
    pub resume_candidates: Vec<PathBuf>,
    /// When the group re-forms around live state: the rank whose training
    /// state every other rank takes over (a rank holding the job's parked
    /// state rebinds it). `None`: the state comes from `resume_candidates`
    /// or a fresh start.
    pub state_source: Option<Rank>,
    /// The data cursor (steps completed) the group must start at, when the
    /// coordinator knows it (a re-formation around the source's state).
    pub cursor: Option<u64>,
}

/// A checkpoint at the next step boundary, for rank 0 (the ranks agree on
/// the step through their all-reduce).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointRequest {
    pub run: RunId,
    /// Stop training right after this checkpoint.
    pub stop: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AbortTraining {
    pub run: RunId,
    pub reason: String,
    /// Leave the ring but keep the training state and report [`Parked`]:
    /// the job is re-forming. Otherwise the rank drops its state.
    pub keep_state: bool,
}

// ---- inbound: worker -> coordinator ----------------------------------------

fn run_id(job_id: String, generation: u64) -> Result<RunId, WireError> {
    Ok(RunId {
        job: JobId::parse(&job_id)?,
        generation: Generation(generation),
    })
}

impl TryFrom<pb::WorkerMessage> for WorkerReport {
    type Error = WireError;
    fn try_from(m: pb::WorkerMessage) -> Result<Self, WireError> {
        use worker_message::Kind;
        Ok(match m.kind.ok_or(WireError::NoKind("worker message"))? {
            Kind::Register(r) => WorkerReport::Register(r.try_into()?),
            Kind::Heartbeat(pb::Heartbeat {}) => WorkerReport::Heartbeat,
            Kind::Progress(p) => WorkerReport::Progress(Progress {
                run: run_id(p.job_id, p.generation)?,
                step: p.step,
                epoch: p.epoch,
                total_steps: p.total_steps,
                metrics: metrics("progress.metrics", p.metrics)?,
            }),
            Kind::Checkpoint(c) => WorkerReport::Checkpoint(CheckpointReport {
                run: run_id(c.job_id, c.generation)?,
                step: c.step,
                metrics: metrics("checkpoint.metrics", c.metrics)?,
                outcome: if c.ok {
                    Ok(WrittenCheckpoint {
                        dir: path("checkpoint.dir", c.dir)?,
                        bytes: c.bytes,
                        write_seconds: c.write_seconds,
                        blocked_seconds: c.blocked_seconds,
                    })
                } else {
                    Err(text("checkpoint.error", c.error)?)
                },
            }),
            Kind::Note(n) => WorkerReport::Note(Note {
                run: run_id(n.job_id, n.generation)?,
                text: text("note.text", n.text)?,
            }),
            Kind::Ended(e) => WorkerReport::Ended(e.try_into()?),
            Kind::Parked(p) => WorkerReport::Parked(Parked {
                run: run_id(p.job_id, p.generation)?,
                step: p.step,
                lost_peer: p.lost_peer_rank.map(Rank),
                reason: text("parked.reason", p.reason)?,
            }),
            Kind::Rebound(r) => WorkerReport::Rebound(Rebound {
                run: run_id(r.job_id, r.generation)?,
                step: r.step,
                transfer: match (r.transfer_bytes, r.transfer_seconds) {
                    (Some(b), Some(s)) if s.is_finite() && s >= 0.0 => Some((b, s)),
                    (None, None) => None,
                    _ => return Err(WireError::Malformed("rebound.transfer")),
                },
            }),
        })
    }
}

impl TryFrom<pb::Register> for Registration {
    type Error = WireError;
    fn try_from(r: pb::Register) -> Result<Self, WireError> {
        if r.protocol_version != PROTOCOL_VERSION {
            return Err(WireError::ProtocolVersion(r.protocol_version));
        }
        let current = match r.current {
            Some(c) => Some(CurrentRun {
                run: run_id(c.job_id, c.generation)?,
                rank: Rank(c.rank),
                step: c.step,
                parked: c.parked,
            }),
            None => None,
        };
        Ok(Registration {
            name: label("register.name", r.name)?,
            host: label("register.host", r.host)?,
            device: label("register.device", r.device)?.parse()?,
            data_addr: label("register.data_addr", r.data_addr)?,
            threads: r.threads,
            current,
            instance: match label("register.instance", r.instance)? {
                i if i.is_empty() => None,
                i => Some(i),
            },
        })
    }
}

impl TryFrom<pb::TrainingEnded> for TrainingEnded {
    type Error = WireError;
    fn try_from(e: pb::TrainingEnded) -> Result<Self, WireError> {
        let outcome = if e.success {
            RunOutcome::Succeeded { stopped: e.stopped }
        } else {
            RunOutcome::Failed {
                reason: text("ended.reason", e.reason)?,
                // A lost peer is a data-plane failure even if the sender did
                // not say so in `peer_fault`.
                cause: if e.peer_fault || e.lost_peer_rank.is_some() {
                    FailureCause::DataPlane {
                        lost_peer: e.lost_peer_rank.map(Rank),
                    }
                } else {
                    FailureCause::OwnWork
                },
            }
        };
        Ok(TrainingEnded {
            run: run_id(e.job_id, e.generation)?,
            step: e.step,
            metrics: metrics("ended.metrics", e.metrics)?,
            outcome,
        })
    }
}

// ---- outbound: worker -> coordinator ---------------------------------------

impl From<WorkerReport> for pb::WorkerMessage {
    fn from(r: WorkerReport) -> Self {
        use worker_message::Kind;
        let kind = match r {
            WorkerReport::Register(r) => Kind::Register(pb::Register {
                name: r.name,
                host: r.host,
                device: r.device.to_string(),
                data_addr: r.data_addr,
                threads: r.threads,
                protocol_version: PROTOCOL_VERSION,
                current: r.current.map(|c| pb::CurrentRun {
                    job_id: c.run.job.0,
                    generation: c.run.generation.0,
                    rank: c.rank.0,
                    step: c.step,
                    parked: c.parked,
                }),
                instance: r.instance.unwrap_or_default(),
            }),
            WorkerReport::Heartbeat => Kind::Heartbeat(pb::Heartbeat {}),
            WorkerReport::Progress(p) => Kind::Progress(pb::Progress {
                job_id: p.run.job.0,
                generation: p.run.generation.0,
                step: p.step,
                epoch: p.epoch,
                metrics: metrics_out(p.metrics),
                total_steps: p.total_steps,
            }),
            WorkerReport::Checkpoint(c) => {
                let mut out = pb::CheckpointReport {
                    job_id: c.run.job.0,
                    generation: c.run.generation.0,
                    step: c.step,
                    metrics: metrics_out(c.metrics),
                    ..Default::default()
                };
                match c.outcome {
                    Ok(w) => {
                        out.ok = true;
                        out.dir = w.dir.display().to_string();
                        out.bytes = w.bytes;
                        out.write_seconds = w.write_seconds;
                        out.blocked_seconds = w.blocked_seconds;
                    }
                    Err(e) => out.error = e,
                }
                Kind::Checkpoint(out)
            }
            WorkerReport::Note(n) => Kind::Note(pb::Note {
                job_id: n.run.job.0,
                generation: n.run.generation.0,
                text: n.text,
            }),
            WorkerReport::Ended(e) => Kind::Ended(e.into()),
            WorkerReport::Parked(p) => Kind::Parked(pb::Parked {
                job_id: p.run.job.0,
                generation: p.run.generation.0,
                step: p.step,
                lost_peer_rank: p.lost_peer.map(|r| r.0),
                reason: p.reason,
            }),
            WorkerReport::Rebound(r) => Kind::Rebound(pb::Rebound {
                job_id: r.run.job.0,
                generation: r.run.generation.0,
                step: r.step,
                transfer_bytes: r.transfer.map(|t| t.0),
                transfer_seconds: r.transfer.map(|t| t.1),
            }),
        };
        pb::WorkerMessage { kind: Some(kind) }
    }
}

impl From<TrainingEnded> for pb::TrainingEnded {
    fn from(e: TrainingEnded) -> Self {
        let mut out = pb::TrainingEnded {
            job_id: e.run.job.0,
            generation: e.run.generation.0,
            step: e.step,
            metrics: metrics_out(e.metrics),
            ..Default::default()
        };
        match e.outcome {
            RunOutcome::Succeeded { stopped } => {
                out.success = true;
                out.stopped = stopped;
            }
            RunOutcome::Failed { reason, cause } => {
                out.reason = reason;
                if let FailureCause::DataPlane { lost_peer } = cause {
                    out.peer_fault = true;
                    out.lost_peer_rank = lost_peer.map(|r| r.0);
                }
            }
        }
        out
    }
}

// ---- inbound: coordinator -> worker ----------------------------------------

impl TryFrom<pb::CoordinatorMessage> for Command {
    type Error = WireError;
    fn try_from(m: pb::CoordinatorMessage) -> Result<Self, WireError> {
        use coordinator_message::Kind;
        Ok(
            match m.kind.ok_or(WireError::NoKind("coordinator message"))? {
                Kind::Registered(r) => Command::Registered(Registered {
                    worker: WorkerId::parse(&r.worker_id)?,
                    heartbeat_interval: Duration::from_millis(r.heartbeat_interval_ms),
                }),
                Kind::Start(s) => Command::Start(Box::new(s.try_into()?)),
                Kind::Checkpoint(c) => Command::Checkpoint(CheckpointRequest {
                    run: run_id(c.job_id, c.generation)?,
                    stop: c.stop,
                }),
                Kind::Abort(a) => Command::Abort(AbortTraining {
                    run: run_id(a.job_id, a.generation)?,
                    reason: text("abort.reason", a.reason)?,
                    keep_state: a.keep_state,
                }),
                Kind::Prepare(p) => Command::Prepare(Box::new(PrepareJob {
                    job: JobId::parse(&p.job_id)?,
                    spec: spec_from_json(&p.spec_json)?,
                })),
            },
        )
    }
}

impl TryFrom<pb::StartTraining> for StartTraining {
    type Error = WireError;
    fn try_from(s: pb::StartTraining) -> Result<Self, WireError> {
        let run = run_id(s.job_id, s.generation)?;
        let peers = at_most("start.peers", s.peers, MAX_PEERS)?
            .into_iter()
            .map(|p| label("start.peers", p))
            .collect::<Result<Vec<_>, _>>()?;
        if s.rank as usize >= peers.len() {
            return Err(WireError::RankOutOfRange {
                rank: s.rank,
                world: peers.len(),
            });
        }
        let resume_candidates = at_most(
            "start.resume_candidates",
            s.resume_candidates,
            MAX_RESUME_CANDIDATES,
        )?
        .into_iter()
        .map(|p| path("start.resume_candidates", p))
        .collect::<Result<Vec<_>, _>>()?;
        if let Some(src) = s.state_source_rank
            && src as usize >= peers.len()
        {
            return Err(WireError::RankOutOfRange {
                rank: src,
                world: peers.len(),
            });
        }
        Ok(StartTraining {
            run,
            rank: Rank(s.rank),
            peers,
            // Bounded and re-checked: inbound data can be malformed.
            spec: spec_from_json(&s.spec_json)?,
            progress_every_steps: s.progress_every_steps,
            resume_candidates,
            state_source: s.state_source_rank.map(Rank),
            cursor: s.cursor_step,
        })
    }
}

impl pb::CoordinatorMessage {
    /// The run and rank a start command is for, when its ids parse even if
    /// the rest of it does not: a worker that cannot use a start says so as
    /// a failed run, so the coordinator fails the job naming the cause
    /// rather than waiting for the peers to time out.
    pub fn start_of(&self) -> Option<(RunId, Rank)> {
        match &self.kind {
            Some(coordinator_message::Kind::Start(s)) => {
                let run = run_id(s.job_id.clone(), s.generation).ok()?;
                Some((run, Rank(s.rank)))
            }
            _ => None,
        }
    }
}

// ---- outbound: coordinator -> worker ---------------------------------------

impl From<Command> for pb::CoordinatorMessage {
    fn from(c: Command) -> Self {
        use coordinator_message::Kind;
        let kind = match c {
            Command::Registered(r) => Kind::Registered(pb::Registered {
                worker_id: r.worker.0,
                heartbeat_interval_ms: r.heartbeat_interval.as_millis() as u64,
            }),
            Command::Start(s) => Kind::Start((*s).into()),
            Command::Checkpoint(c) => Kind::Checkpoint(pb::CheckpointRequest {
                job_id: c.run.job.0,
                generation: c.run.generation.0,
                stop: c.stop,
            }),
            Command::Abort(a) => Kind::Abort(pb::AbortTraining {
                job_id: a.run.job.0,
                generation: a.run.generation.0,
                reason: a.reason,
                keep_state: a.keep_state,
            }),
            Command::Prepare(p) => Kind::Prepare(pb::PrepareJob {
                job_id: p.job.0,
                spec_json: spec_to_json(&p.spec),
            }),
        };
        pb::CoordinatorMessage { kind: Some(kind) }
    }
}

impl From<StartTraining> for pb::StartTraining {
    fn from(s: StartTraining) -> Self {
        pb::StartTraining {
            job_id: s.run.job.0,
            generation: s.run.generation.0,
            rank: s.rank.0,
            peers: s.peers,
            spec_json: spec_to_json(&s.spec),
            progress_every_steps: s.progress_every_steps,
            resume_candidates: s
                .resume_candidates
                .iter()
                .map(|p| p.display().to_string())
                .collect(),
            state_source_rank: s.state_source.map(|r| r.0),
            cursor_step: s.cursor,
        }
    }
}
