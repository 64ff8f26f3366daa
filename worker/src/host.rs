//! The trainer thread of one job on this worker. It owns the job's [`Run`]
//! across generations: when its group breaks (a peer lost, or the
//! coordinator asks it to keep its state), it leaves the ring, keeps model
//! and optimizer state in memory, reports [`Parked`], and waits for the
//! job's next generation, which it joins by rebinding the same run.
//!
//! It speaks to the agent in domain reports ([`WorkerReport`]) over a
//! channel, and takes the next assignment (or the order to drop its state)
//! over another. It knows nothing of gRPC.

use crate::collective::{
    Collective, CollectiveError, DataPlaneListener, NcclBackend, NcclOptions, RingBackend,
    RingConfig, WireDtype,
};
use crate::trainer::{
    self, Assignment, Outcome, Run, StateSource, TrainError, TrainerControl, TrainerOptions,
};
use ringmaster_common::ids::{Generation, JobId, Rank};
use ringmaster_common::jobspec::{CollectiveBackend, FloatFormat};
use ringmaster_proto::{
    CheckpointReport, FailureCause, Metrics, Note, Parked, Progress, Rebound, RunId, RunOutcome,
    TrainingEnded, WorkerReport, WrittenCheckpoint,
};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::Duration;
use tokio::sync::mpsc::UnboundedSender;
use tracing::{error, info, info_span, warn};

/// What the agent tells a parked trainer.
pub enum Next {
    /// Join this later generation of the same job, with the run held.
    Start(Box<Assignment>, Arc<TrainerControl>),
    /// The job will not re-form with this worker: drop the state.
    Drop(String),
    /// Write the held state as a checkpoint (the job goes back to the queue
    /// and should resume from it), then keep waiting.
    Checkpoint,
}

/// The agent's handle on a trainer thread.
pub struct Host {
    pub next: Sender<Next>,
    pub thread: std::thread::JoinHandle<()>,
}

/// Starts the thread for `first`. A parked run waits at most `patience` for
/// its next generation before it drops its state and reports a failed run.
pub fn spawn(
    first: Assignment,
    control: Arc<TrainerControl>,
    opts: TrainerOptions,
    listener: Arc<DataPlaneListener>,
    tx: UnboundedSender<WorkerReport>,
    patience: Duration,
) -> std::io::Result<Host> {
    let (next_tx, next_rx) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name(format!("trainer-{}", first.job_id))
        .spawn(move || host(first, control, opts, &listener, &tx, &next_rx, patience))?;
    Ok(Host {
        next: next_tx,
        thread,
    })
}

fn run_id(a: &Assignment) -> RunId {
    RunId {
        // The id came from a parsed command.
        job: JobId(a.job_id.clone()),
        generation: Generation(a.generation),
    }
}

#[allow(clippy::too_many_arguments)]
fn host(
    mut a: Assignment,
    mut control: Arc<TrainerControl>,
    opts: TrainerOptions,
    listener: &DataPlaneListener,
    tx: &UnboundedSender<WorkerReport>,
    next: &Receiver<Next>,
    patience: Duration,
) {
    let mut run: Option<Run> = None;
    loop {
        let id = run_id(&a);
        let span =
            info_span!("generation", job = %a.job_id, generation = a.generation, rank = a.rank);
        let _entered = span.enter();
        info!(
            world = a.peers.len(),
            holds_state = run.is_some(),
            "training"
        );
        // The session may be gone; the trainer keeps going and its reports
        // are buffered by the agent.
        let mut report = |event: trainer::Event| {
            let _ = tx.send(report_of(&id, event));
        };
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            one_generation(&mut run, &a, &opts, listener, &control, &mut report)
        }));
        let e = match result {
            Ok(Ok(outcome)) => {
                let _ = tx.send(ended(&id, Ok(outcome)));
                return;
            }
            Ok(Err(e)) => e,
            // A bug, not a libtorch error (those are `TrainError`s): the
            // state cannot be trusted, so it is not kept.
            Err(panic) => {
                let what = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown panic".into());
                error!("trainer panicked: {what}");
                let _ = tx.send(failed(&id, format!("trainer panicked: {what}"), None));
                return;
            }
        };
        // An abort that ends the run (not one that parks it) may race the
        // failure it caused: it wins.
        let ended_by_abort = control.is_aborted() && !control.keeps_state();
        let keep =
            !ended_by_abort && run.as_ref().is_some_and(Run::state_intact) && parks(&e, &control);
        if !keep {
            warn!("training failed: {e}");
            let _ = tx.send(ended(&id, Err(e)));
            return;
        }
        let step = run.as_ref().map_or(0, Run::step_count);
        info!(
            step,
            "group broke ({e}); holding the state for the next generation"
        );
        let _ = tx.send(WorkerReport::Parked(Parked {
            run: id.clone(),
            step,
            lost_peer: e.lost_peer().map(Rank),
            reason: e.to_string(),
        }));
        let deadline = std::time::Instant::now() + patience;
        let waited = loop {
            match next.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now())) {
                Ok(Next::Checkpoint) => {
                    if let Some(r) = run.as_mut() {
                        let mut report = |event: trainer::Event| {
                            let _ = tx.send(report_of(&id, event));
                        };
                        r.checkpoint_held(&mut report);
                    }
                }
                other => break other,
            }
        };
        match waited {
            Ok(Next::Start(na, nc)) if na.job_id == a.job_id => {
                a = *na;
                control = nc;
            }
            Ok(Next::Start(na, _)) => {
                // The agent only routes this job's starts here.
                error!(other = %na.job_id, "a parked trainer got another job's start");
                return;
            }
            Ok(Next::Drop(why)) => {
                info!("dropping the held state: {why}");
                // Says so, so the coordinator frees this worker at once.
                let _ = tx.send(failed(&id, format!("aborted: {why}"), None));
                return;
            }
            Err(RecvTimeoutError::Timeout) => {
                let why = format!(
                    "held the state of step {step} for {}s without a new generation",
                    patience.as_secs()
                );
                warn!("{why}");
                let _ = tx.send(failed(&id, why, None));
                return;
            }
            Err(RecvTimeoutError::Disconnected) | Ok(Next::Checkpoint) => return,
        }
    }
}

/// One generation: build the run unless this thread holds it, join the
/// group, make its state one, train to the end.
fn one_generation(
    run: &mut Option<Run>,
    a: &Assignment,
    opts: &TrainerOptions,
    listener: &DataPlaneListener,
    control: &Arc<TrainerControl>,
    report: &mut dyn FnMut(trainer::Event),
) -> Result<Outcome, TrainError> {
    if run.is_none() {
        *run = Some(Run::start(a, opts, control, report)?);
    }
    let r = run.as_mut().expect("built above");
    let group = join_group(listener, a, opts)?;
    control.install(group.abort_handle())?;
    let source = match a.state_source {
        Some(rank) => StateSource::Rank(rank),
        None => r.initial_source(),
    };
    let rank = group.rank();
    let moved = r.rebind(group, source)?;
    // The coordinator decided where the group picks up (the source's step);
    // a rank whose state says otherwise must not train a diverging run.
    if let Some(cursor) = a.cursor
        && r.step_count() != cursor
    {
        return Err(TrainError::Invalid(format!(
            "the group's state is at step {} but the coordinator re-formed it at step {cursor}",
            r.step_count()
        )));
    }
    if rank == 0 {
        report(trainer::Event::Rebound {
            step: r.step_count(),
            transfer: moved.map(|t| (t.bytes, t.seconds)),
        });
    }
    let hang = Duration::from_secs(r.spec().fault.hang_timeout_secs);
    let _watchdog = Watchdog::start(control.clone(), hang);
    r.run_to_end(control, report)
}

/// Leaves the group when the run completes no step (nor evaluation, nor
/// checkpoint) for `timeout`: a hung collective, or a peer that stopped
/// stepping while its process and heartbeats live on. The rank parks with
/// its state; a rank stuck outside the collective cannot answer, and the
/// coordinator takes it as lost when the others have parked.
struct Watchdog {
    stop: Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    fn start(control: Arc<TrainerControl>, timeout: Duration) -> Watchdog {
        control.beat();
        let stop = Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("hang-watchdog".into())
            .spawn(move || {
                let (lock, cv) = &*flag;
                let mut stopped = lock.lock().unwrap_or_else(|e| e.into_inner());
                loop {
                    let idle = control.since_progress();
                    if idle >= timeout {
                        let why = format!("no step completed in {} s", idle.as_secs());
                        warn!("{why}: leaving the group");
                        control.park(&why);
                        return;
                    }
                    let wait = (timeout - idle).min(Duration::from_secs(1));
                    let (guard, _) = cv
                        .wait_timeout(stopped, wait)
                        .unwrap_or_else(|e| e.into_inner());
                    stopped = guard;
                    if *stopped {
                        return;
                    }
                }
            })
            .ok();
        Watchdog { stop, thread }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        let (lock, cv) = &*self.stop;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Whether a failure leaves this rank's state worth holding for the next
/// generation: the group broke (a peer or the connection to it), or the
/// coordinator asked the rank to leave and keep its state. A rank's own
/// error (bad data, a libtorch failure) or a contract break among ranks
/// would recur, so it ends the run.
fn parks(e: &TrainError, control: &TrainerControl) -> bool {
    match e {
        TrainError::Collective(CollectiveError::Aborted) | TrainError::Aborted(_) => {
            control.keeps_state()
        }
        TrainError::Collective(c) => c.retryable() || control.keeps_state(),
        _ => false,
    }
}

/// Joins the data plane of the assignment's generation with the backend the
/// job's spec resolves to, the same on every rank: NCCL on CUDA workers
/// (device memory, one communicator per generation), else the ring, which
/// reduces CPU tensors in place and stages device tensors through pinned host
/// memory.
fn join_group(
    listener: &DataPlaneListener,
    a: &Assignment,
    opts: &TrainerOptions,
) -> Result<Box<dyn Collective>, CollectiveError> {
    let mut cfg = RingConfig::new(a.job_id.clone(), a.generation, a.rank, a.peers.clone());
    cfg.connect_timeout = opts.connect_timeout;
    match (a.spec.workers.backend(), opts.device) {
        (CollectiveBackend::Ring, _) => Ok(Box::new(RingBackend::connect(listener, cfg)?)),
        (CollectiveBackend::Nccl, tch::Device::Cuda(ordinal)) => {
            let nccl = NcclOptions {
                device: ordinal as i32,
                timeout: Duration::from_secs(a.spec.fault.collective_timeout_secs),
                wire: match a.spec.train.allreduce_dtype {
                    FloatFormat::Fp32 => WireDtype::F32,
                    FloatFormat::Bf16 => WireDtype::Bf16,
                },
            };
            Ok(Box::new(NcclBackend::connect(listener, cfg, nccl)?))
        }
        (CollectiveBackend::Nccl, device) => Err(CollectiveError::InvalidConfig(format!(
            "the job reduces through NCCL, and this worker trains on {device:?}, not a CUDA device"
        ))),
    }
}

fn report_of(id: &RunId, event: trainer::Event) -> WorkerReport {
    match event {
        trainer::Event::Progress(p) => WorkerReport::Progress(Progress {
            run: id.clone(),
            step: p.step,
            epoch: p.epoch,
            total_steps: p.total_steps,
            metrics: p.metrics.into_iter().collect(),
        }),
        trainer::Event::Checkpoint {
            step,
            outcome,
            metrics,
        } => WorkerReport::Checkpoint(CheckpointReport {
            run: id.clone(),
            step,
            metrics: metrics.into_iter().collect(),
            outcome: outcome.map(|w| WrittenCheckpoint {
                dir: w.dir,
                bytes: w.bytes,
                write_seconds: w.write_seconds,
                blocked_seconds: w.blocked_seconds,
            }),
        }),
        trainer::Event::Rebound { step, transfer } => WorkerReport::Rebound(Rebound {
            run: id.clone(),
            step,
            transfer,
        }),
        trainer::Event::Note(text) => WorkerReport::Note(Note {
            run: id.clone(),
            text,
        }),
    }
}

fn ended(id: &RunId, result: Result<Outcome, TrainError>) -> WorkerReport {
    match result {
        Ok(o) => WorkerReport::Ended(TrainingEnded {
            run: id.clone(),
            step: o.step,
            metrics: o.metrics.into_iter().collect(),
            outcome: RunOutcome::Succeeded { stopped: o.stopped },
        }),
        Err(e) => {
            let lost = e.lost_peer().map(Rank);
            let cause = match e {
                TrainError::Collective(_) => FailureCause::DataPlane { lost_peer: lost },
                _ => FailureCause::OwnWork,
            };
            failed(id, e.to_string(), Some(cause))
        }
    }
}

fn failed(id: &RunId, reason: String, cause: Option<FailureCause>) -> WorkerReport {
    WorkerReport::Ended(TrainingEnded {
        run: id.clone(),
        step: 0,
        metrics: Metrics::new(),
        outcome: RunOutcome::Failed {
            reason,
            cause: cause.unwrap_or(FailureCause::OwnWork),
        },
    })
}
