//! The trainer: runs one rank of one job generation on the calling OS thread
//! (the agent gives it a dedicated one). It loads the data, builds the model,
//! joins the ring, and steps in lockstep with its peers.
//!
//! It knows nothing of gRPC or the store: progress goes out through a callback,
//! and the agent stops it through [`TrainerControl`].
//!
//! Semantics (DESIGN.md invariants): the global batch `B` is fixed by the job;
//! step `k` of an epoch consumes positions `[kB, (k+1)B)` of the epoch's
//! permutation and rank `r` takes its balanced slice; every rank sums its
//! per-sample losses, gradients are summed across ranks and divided by the
//! number of samples in the global batch, so W workers compute exactly the
//! SGD step of one worker on the whole batch (up to float summation order).

use crate::checkpoint;
use crate::collective::{
    AbortHandle, Collective, CollectiveError, DataPlaneListener, RingCollective, RingConfig,
};
use crate::model::{self, AllocError, Mlp};
use crate::optim::Optimizer;
use crate::sample_rng::SampleNoise;
use ringmaster_common::dataset::{Dataset, DatasetError, ShardPlan, rank_range};
use ringmaster_common::jobspec::JobSpec;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Reduction, Tensor};

/// Gradients are fused into buckets of about this many bytes per all-reduce.
const BUCKET_BYTES: usize = 25 << 20;
/// Evaluation runs in chunks of this many samples to bound memory.
const EVAL_CHUNK: i64 = 4096;

/// What the coordinator asked this rank to do.
#[derive(Clone, Debug)]
pub struct Assignment {
    pub job_id: String,
    pub generation: u64,
    pub rank: u32,
    /// Data-plane addresses of every rank, indexed by rank.
    pub peers: Vec<String>,
    pub spec: JobSpec,
    /// Report progress every this many steps.
    pub progress_every: u64,
    /// Checkpoint directories to resume from, newest first: the first that
    /// verifies is used. Empty for a fresh start.
    pub resume_candidates: Vec<PathBuf>,
    /// This job's own output folder, `<output.dir>/<job-id>/`.
    pub output_dir: PathBuf,
}

/// How this worker runs libtorch.
#[derive(Clone, Copy, Debug)]
pub struct TrainerOptions {
    pub device: Device,
    pub threads: usize,
    /// How long to wait for ring peers to connect.
    pub connect_timeout: Duration,
}

/// Something worth telling the coordinator, sent at most every
/// `progress_every` steps (never per step).
#[derive(Clone, Debug, PartialEq)]
pub struct Progress {
    pub step: u64,
    pub total_steps: u64,
    pub epoch: u64,
    pub metrics: BTreeMap<String, f64>,
}

/// What the trainer reports while it runs.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    Progress(Progress),
    /// A checkpoint finished writing (rank 0 only), or failed to.
    Checkpoint {
        step: u64,
        outcome: Result<CheckpointWritten, String>,
        metrics: BTreeMap<String, f64>,
    },
    /// Something the user should know, e.g. a corrupt checkpoint skipped.
    Note(String),
}

/// A complete checkpoint on disk.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckpointWritten {
    pub dir: PathBuf,
    pub bytes: u64,
    pub write_seconds: f64,
    /// Training time this checkpoint blocked the step loop (snapshot, plus
    /// the write itself when synchronous or when waiting for a previous one).
    pub blocked_seconds: f64,
}

/// A finished run.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    pub step: u64,
    pub metrics: BTreeMap<String, f64>,
    /// The run stopped early on request (after its final checkpoint).
    pub stopped: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("dataset: {0}")]
    Data(#[from] DatasetError),
    #[error("collective: {0}")]
    Collective(#[from] CollectiveError),
    /// libtorch's first line only: its C++ backtrace helps nobody reading
    /// a job's failure reason.
    #[error("libtorch: {}", model::torch_message(.0))]
    Torch(#[from] tch::TchError),
    /// Memory for the model, the data or the gradient staging was refused:
    /// the job is too large for this worker's device.
    #[error("{0}")]
    Allocation(#[from] AllocError),
    #[error("writing {path}: {source}")]
    Output {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid assignment: {0}")]
    Invalid(String),
    #[error("cannot resume: {0}")]
    Resume(String),
    #[error("aborted: {0}")]
    Aborted(String),
}

impl TrainError {
    /// The rank whose loss caused this error, when a peer vanished.
    pub fn lost_peer(&self) -> Option<u32> {
        match self {
            TrainError::Collective(CollectiveError::PeerLost { rank, .. }) => Some(*rank),
            _ => None,
        }
    }
}

/// Lets another thread steer a running trainer: abort promptly (the flag is
/// checked at every step boundary and the abort handle unblocks
/// collectives), or ask for a checkpoint / a checkpoint-then-stop, which the
/// ranks agree on through the next gradient all-reduce.
#[derive(Default)]
pub struct TrainerControl {
    aborted: AtomicBool,
    checkpoint: AtomicBool,
    stop: AtomicBool,
    reason: Mutex<Option<String>>,
    handle: Mutex<Option<AbortHandle>>,
}

impl TrainerControl {
    /// Stops the trainer; safe to call at any time, from any thread.
    pub fn abort(&self, reason: &str) {
        *self.reason.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason.to_string());
        self.aborted.store(true, Ordering::SeqCst);
        if let Some(h) = self
            .handle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            h.abort();
        }
    }

    /// Asks for a checkpoint at the next step boundary; with `stop`, training
    /// ends right after it.
    pub fn request_checkpoint(&self, stop: bool) {
        self.checkpoint.store(true, Ordering::SeqCst);
        if stop {
            self.stop.store(true, Ordering::SeqCst);
        }
    }

    fn check(&self) -> Result<(), TrainError> {
        if self.aborted.load(Ordering::SeqCst) {
            let reason = self
                .reason
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            return Err(TrainError::Aborted(reason.unwrap_or_default()));
        }
        Ok(())
    }

    fn install(&self, handle: AbortHandle) -> Result<(), TrainError> {
        *self.handle.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle.clone());
        // An abort that raced with the installation must still take effect.
        if self.aborted.load(Ordering::SeqCst) {
            handle.abort();
        }
        self.check()
    }
}

/// Slots appended to the last gradient bucket, summed with it: the batch's
/// loss and the control flags every rank must agree on at this step.
const EXTRA_LOSS: usize = 0;
const EXTRA_CHECKPOINT: usize = 1;
const EXTRA_STOP: usize = 2;
const EXTRAS: usize = 3;

/// Runs the assignment to completion. Panics inside libtorch are caught by
/// the caller (the agent), not here.
pub fn train(
    a: &Assignment,
    opts: &TrainerOptions,
    listener: &DataPlaneListener,
    control: &TrainerControl,
    events: &mut dyn FnMut(Event),
) -> Result<Outcome, TrainError> {
    let world = a.peers.len() as u32;
    if world == 0 || a.rank >= world {
        return Err(TrainError::Invalid(format!(
            "rank {} outside world of {world}",
            a.rank
        )));
    }
    tch::set_num_threads(opts.threads.max(1) as i32);
    let spec = &a.spec;
    let device = opts.device;

    let train_set = Dataset::load(&spec.data.train)?;
    let val_set = match &spec.data.validation {
        Some(dir) => Some(Dataset::load(dir)?),
        None => None,
    };
    control.check()?;
    let inputs = train_set.features as i64;
    let classes = i64::from(train_set.manifest.schema.num_classes);
    if let Some(v) = &val_set
        && v.features != train_set.features
    {
        return Err(TrainError::Invalid(format!(
            "validation set has {} features, training set {}",
            v.features, train_set.features
        )));
    }
    let n = train_set.y.len() as i64;
    let xs = model::from_host("training inputs", &train_set.x, &[n, inputs], device)?;
    let ys = model::from_host("training labels", &train_set.y, &[n], device)?;

    // Same seed on every rank gives the same initial parameters; rank 0's are
    // broadcast anyway so that the group provably starts from one state.
    let (vs, model) = crate::model::initial(spec.seed, inputs, classes, &spec.model, device)?;
    let named = crate::model::named_parameters(&vs);
    let names: Vec<String> = named.iter().map(|(k, _)| k.clone()).collect();
    let params: Vec<Tensor> = named.iter().map(|(_, t)| t.shallow_clone()).collect();
    let buckets = buckets(&params);
    let mut optimizer = Optimizer::new(
        spec.train.optimizer,
        spec.train.learning_rate,
        spec.train.weight_decay,
        params.len(),
    );
    let plan = ShardPlan::new(n as u64, u64::from(spec.train.global_batch), spec.seed)
        .map_err(|e| TrainError::Invalid(e.to_string()))?;
    let total_steps = spec.total_steps(n as u64);

    // Every rank loads the same committed checkpoint (each verifies it), so
    // no broadcast is needed after a resume.
    let mut first_step = 0;
    let mut latest: BTreeMap<String, f64> = BTreeMap::new();
    let resumed = resume(a, &names, &params, &mut optimizer, device, events)?;
    if let Some(state) = &resumed {
        first_step = state.step;
        latest = state.metrics.clone();
    }

    let mut ring_cfg = RingConfig::new(a.job_id.clone(), a.generation, a.rank, a.peers.clone());
    ring_cfg.connect_timeout = opts.connect_timeout;
    let mut ring = RingCollective::connect(listener, ring_cfg)?;
    control.install(ring.abort_handle())?;
    if resumed.is_none() {
        broadcast_params(&mut ring, &params, &buckets)?;
    }

    let mut metrics_log = if a.rank == 0 {
        let log = MetricsLog::open(&a.output_dir, first_step)?;
        link_latest(&a.output_dir);
        Some(log)
    } else {
        None
    };
    let ckpt_spec = &spec.checkpoint;
    let mut writer = if a.rank == 0 && ckpt_spec.asynchronous {
        Some(
            checkpoint::Writer::start().map_err(|source| TrainError::Output {
                path: "checkpoint writer thread".into(),
                source,
            })?,
        )
    } else {
        None
    };
    let mut last_checkpoint = Instant::now();
    let mut pending_blocked: BTreeMap<u64, f64> = BTreeMap::new();

    let mut perm_epoch = u64::MAX;
    let mut perm: Vec<u64> = Vec::new();
    let mut log_window = Window::default();
    let staging_len = buckets
        .iter()
        .map(|r| bucket_len(&params[r.clone()]))
        .max()
        .unwrap_or(0)
        + EXTRAS;
    let mut staging = Staging::new(staging_len)?;
    let mut stopped = false;
    let mut step = first_step;
    let loop_start = Instant::now();

    while step < total_steps {
        control.check()?;
        let (epoch, step_in_epoch) = plan.position(step);
        if epoch != perm_epoch {
            perm = plan.epoch_permutation(epoch);
            perm_epoch = epoch;
        }
        let batch = plan.batch_range(step_in_epoch);
        let batch_len = batch.end - batch.start;
        let mine = rank_range(batch.clone(), a.rank, world);
        let ids = &perm[mine.start as usize..mine.end as usize];
        let idx: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
        for p in &params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        let loss_sum = if idx.is_empty() {
            // Keep every gradient defined (as zeros) so this rank can join
            // the all-reduce with the same layout as its peers.
            let zero = params
                .iter()
                .map(|p| p.sum(Kind::Float) * 0.0)
                .fold(Tensor::zeros([], (Kind::Float, device)), |acc, t| acc + t);
            zero.backward();
            0.0
        } else {
            let idx = Tensor::from_slice(&idx).to_device(device);
            let xb = xs.index_select(0, &idx);
            let yb = ys.index_select(0, &idx);
            // Keyed by dataset sample id, not by rank or row: a sample gets
            // the same dropout mask however the batch is split.
            let noise = SampleNoise::new(spec.seed, step, ids, device);
            let logits = model.forward_train(&xb, &noise)?;
            let loss = logits.cross_entropy_loss::<Tensor>(&yb, None, Reduction::Sum, -100, 0.0);
            loss.backward();
            loss.double_value(&[])
        };

        let mut extras = [0f32; EXTRAS];
        extras[EXTRA_LOSS] = loss_sum as f32;
        let timer_due = a.rank == 0
            && ckpt_spec
                .every_seconds
                .is_some_and(|s| last_checkpoint.elapsed().as_secs() >= s);
        if control.checkpoint.swap(false, Ordering::SeqCst) || timer_due {
            extras[EXTRA_CHECKPOINT] = 1.0;
        }
        if control.stop.swap(false, Ordering::SeqCst) {
            extras[EXTRA_STOP] = 1.0;
        }
        all_reduce_grads(
            &mut ring,
            &params,
            &buckets,
            &mut staging,
            &mut extras,
            batch_len,
        )?;
        optimizer.step(&params)?;
        let total_loss = f64::from(extras[EXTRA_LOSS]) / batch_len.max(1) as f64;
        let stop = extras[EXTRA_STOP] > 0.0;

        log_window.add(total_loss, batch_len);
        step += 1;
        let done = step;
        let eval_due = spec
            .train
            .eval_every_steps
            .is_some_and(|every| done % every == 0)
            || done == total_steps;
        let mut record = BTreeMap::new();
        if eval_due && let Some(val) = &val_set {
            let (val_loss, val_acc) = evaluate(&mut ring, &model, val, a.rank, world, device)?;
            record.insert("val_loss".to_string(), val_loss);
            record.insert("val_accuracy".to_string(), val_acc);
        }
        let log_due = done % spec.train.log_every_steps.max(1) == 0
            || done == total_steps
            || stop
            || !record.is_empty();
        if log_due {
            if let Some((loss, rate)) = log_window.take() {
                record.insert("loss".to_string(), loss);
                record.insert("samples_per_sec".to_string(), rate);
            }
            record.insert("epoch".to_string(), epoch as f64);
            record.insert(
                "elapsed_seconds".to_string(),
                loop_start.elapsed().as_secs_f64(),
            );
            latest.extend(record.iter().map(|(k, v)| (k.clone(), *v)));
            if let Some(log) = metrics_log.as_mut() {
                log.append(done, &record)?;
            }
        }

        let checkpoint_due = extras[EXTRA_CHECKPOINT] > 0.0
            || stop
            || ckpt_spec.every_steps.is_some_and(|e| done % e == 0);
        if checkpoint_due && a.rank == 0 {
            let started = Instant::now();
            let snapshot =
                take_snapshot(a, &names, &params, &optimizer, &plan, done, world, &latest)?;
            match writer.as_ref() {
                Some(w) => {
                    if let Err(e) = w.submit(snapshot) {
                        report_checkpoint(events, done, Err(e), 0.0, &latest);
                    } else {
                        pending_blocked.insert(done, started.elapsed().as_secs_f64());
                    }
                }
                None => {
                    let result = checkpoint::write(&snapshot);
                    let blocked = started.elapsed().as_secs_f64();
                    report_result(events, result, blocked, &latest);
                }
            }
            last_checkpoint = Instant::now();
        }
        if let Some(w) = writer.as_ref() {
            for result in w.finished() {
                let blocked = pending_blocked.remove(&result.step).unwrap_or(0.0);
                report_result(events, result, blocked, &latest);
            }
        }

        let report_due = done % a.progress_every.max(1) == 0 || done == total_steps || stop;
        if report_due || record.contains_key("val_accuracy") {
            events(Event::Progress(Progress {
                step: done,
                total_steps,
                epoch,
                metrics: latest.clone(),
            }));
        }
        if stop {
            stopped = true;
            break;
        }
    }

    if let Some(mut w) = writer.take() {
        for result in w.finish() {
            let blocked = pending_blocked.remove(&result.step).unwrap_or(0.0);
            report_result(events, result, blocked, &latest);
        }
    }
    if a.rank == 0 && !stopped {
        save_model(&a.output_dir, &named)?;
    }
    // Nobody leaves before rank 0 has written the model (or its final
    // checkpoint), so "succeeded" always means the output exists.
    ring.barrier()?;
    Ok(Outcome {
        step,
        metrics: latest,
        stopped,
    })
}

/// Loss and throughput over the steps since the last log line.
#[derive(Default)]
struct Window {
    loss: f64,
    samples: u64,
    start: Option<Instant>,
}

impl Window {
    fn add(&mut self, mean_loss: f64, samples: u64) {
        self.start.get_or_insert_with(Instant::now);
        self.loss += mean_loss * samples as f64;
        self.samples += samples;
    }

    /// (mean loss, samples per second) of the window, then starts a new one.
    fn take(&mut self) -> Option<(f64, f64)> {
        let start = self.start.take()?;
        let secs = start.elapsed().as_secs_f64().max(1e-9);
        let out = (
            self.loss / self.samples.max(1) as f64,
            self.samples as f64 / secs,
        );
        self.loss = 0.0;
        self.samples = 0;
        // The next window starts now, so time between windows is counted.
        self.start = Some(Instant::now());
        Some(out)
    }
}

fn report_result(
    events: &mut dyn FnMut(Event),
    result: checkpoint::WriteResult,
    blocked: f64,
    metrics: &BTreeMap<String, f64>,
) {
    report_checkpoint(events, result.step, result.outcome, blocked, metrics)
}

fn report_checkpoint(
    events: &mut dyn FnMut(Event),
    step: u64,
    outcome: Result<checkpoint::Written, String>,
    blocked: f64,
    metrics: &BTreeMap<String, f64>,
) {
    if let Err(e) = &outcome {
        tracing::warn!(step, "checkpoint failed: {e}");
    }
    events(Event::Checkpoint {
        step,
        outcome: outcome.map(|w| CheckpointWritten {
            dir: w.dir,
            bytes: w.bytes,
            write_seconds: w.seconds,
            blocked_seconds: blocked,
        }),
        metrics: metrics.clone(),
    });
}

/// Copies model and optimizer state to host memory at this step boundary.
#[allow(clippy::too_many_arguments)]
fn take_snapshot(
    a: &Assignment,
    names: &[String],
    params: &[Tensor],
    optimizer: &Optimizer,
    plan: &ShardPlan,
    step: u64,
    world: u32,
    metrics: &BTreeMap<String, f64>,
) -> Result<checkpoint::Snapshot, TrainError> {
    let spec = &a.spec;
    let model = names
        .iter()
        .zip(params)
        .map(|(n, p)| checkpoint::HostTensor::copy_of(n, p))
        .collect::<Result<Vec<_>, _>>()?;
    let optim = optimizer
        .state_tensors(names)
        .iter()
        .map(|(n, t)| checkpoint::HostTensor::copy_of(n, t))
        .collect::<Result<Vec<_>, _>>()?;
    let (epoch, step_in_epoch) = plan.position(step);
    Ok(checkpoint::Snapshot {
        root: spec.checkpoint.dir.clone(),
        job_id: a.job_id.clone(),
        step,
        model,
        optimizer: optim,
        state: checkpoint::TrainState {
            format_version: 1,
            job_id: a.job_id.clone(),
            step,
            epoch,
            step_in_epoch,
            global_batch: u64::from(spec.train.global_batch),
            world_size: world,
            generation: a.generation,
            seed: spec.seed,
            optimizer: format!("{:?}", spec.train.optimizer),
            optimizer_steps: optimizer.steps(),
            learning_rate: spec.train.learning_rate,
            lr_schedule: "constant".into(),
            rng: "no state: dropout masks are a counter-based hash of (seed, step, dataset \
                  sample id, layer, unit)"
                .into(),
            metrics: metrics.clone(),
        },
    })
}

/// Loads the newest candidate checkpoint that verifies, noting every one
/// skipped and why. No candidates means a fresh start.
fn resume(
    a: &Assignment,
    names: &[String],
    params: &[Tensor],
    optimizer: &mut Optimizer,
    device: Device,
    events: &mut dyn FnMut(Event),
) -> Result<Option<checkpoint::TrainState>, TrainError> {
    if a.resume_candidates.is_empty() {
        return Ok(None);
    }
    let mut skipped = Vec::new();
    for dir in &a.resume_candidates {
        let loaded = match checkpoint::load(dir) {
            Ok(l) => l,
            Err(e) => {
                if a.rank == 0 {
                    events(Event::Note(format!(
                        "skipped checkpoint {}: {e}",
                        dir.display()
                    )));
                }
                skipped.push(format!("{}: {e}", dir.display()));
                continue;
            }
        };
        let state = loaded.state;
        if state.global_batch != u64::from(a.spec.train.global_batch) {
            return Err(TrainError::Resume(format!(
                "{} was taken with batch_size {}, the job has {}",
                dir.display(),
                state.global_batch,
                a.spec.train.global_batch
            )));
        }
        let mut model = loaded.model;
        tch::no_grad(|| -> Result<(), TrainError> {
            for (name, p) in names.iter().zip(params) {
                let t = model.remove(name).ok_or_else(|| {
                    TrainError::Resume(format!("{} has no tensor `{name}`", dir.display()))
                })?;
                if t.size() != p.size() {
                    return Err(TrainError::Resume(format!(
                        "`{name}` has shape {:?} in {}, the model has {:?}",
                        t.size(),
                        dir.display(),
                        p.size()
                    )));
                }
                p.shallow_clone().f_copy_(&t)?;
            }
            Ok(())
        })?;
        optimizer
            .load_state(names, loaded.optimizer, state.optimizer_steps, device)
            .map_err(TrainError::Resume)?;
        if a.rank == 0 {
            events(Event::Note(format!(
                "resumed from {} at step {}",
                dir.display(),
                state.step
            )));
        }
        return Ok(Some(state));
    }
    Err(TrainError::Resume(format!(
        "no candidate checkpoint verifies: {}",
        skipped.join("; ")
    )))
}

/// Groups consecutive parameters into buckets of about [`BUCKET_BYTES`].
fn buckets(params: &[Tensor]) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    for (i, p) in params.iter().enumerate() {
        bytes += p.numel() * 4;
        if bytes >= BUCKET_BYTES {
            out.push(start..i + 1);
            start = i + 1;
            bytes = 0;
        }
    }
    if start < params.len() {
        out.push(start..params.len());
    }
    out
}

fn bucket_len(params: &[Tensor]) -> usize {
    params.iter().map(|p| p.numel()).sum()
}

/// Host staging memory for gradient buckets: one contiguous f32 CPU tensor,
/// so gradients are copied in and out with libtorch's copy kernels (from any
/// device) and the ring reduces the tensor's memory in place, with no
/// per-step allocation.
struct Staging {
    tensor: Tensor,
    len: usize,
}

impl Staging {
    fn new(len: usize) -> Result<Self, AllocError> {
        Ok(Staging {
            tensor: model::zeros("gradient staging", &[len as i64], Kind::Float, Device::Cpu)?,
            len,
        })
    }

    fn slice(&mut self, len: usize) -> &mut [f32] {
        assert!(len <= self.len, "staging buffer too small");
        // SAFETY: the tensor is a contiguous CPU f32 tensor of `self.len`
        // elements that this struct owns; the returned borrow of `self`
        // keeps every other use of it out while the slice lives.
        unsafe { std::slice::from_raw_parts_mut(self.tensor.data_ptr() as *mut f32, len) }
    }

    fn view(&self, off: usize, len: usize) -> Tensor {
        self.tensor.narrow(0, off as i64, len as i64)
    }
}

/// Sums gradients over the ring bucket by bucket, then divides them by the
/// global batch's sample count. `extras` ride along with the last bucket and
/// come back summed over the ranks.
fn all_reduce_grads(
    ring: &mut RingCollective,
    params: &[Tensor],
    buckets: &[std::ops::Range<usize>],
    staging: &mut Staging,
    extras: &mut [f32],
    batch_len: u64,
) -> Result<(), TrainError> {
    let scale = 1.0 / batch_len.max(1) as f64;
    for (b, range) in buckets.iter().enumerate() {
        let last = b + 1 == buckets.len();
        let len = bucket_len(&params[range.clone()]);
        let mut off = 0;
        for p in &params[range.clone()] {
            let k = p.numel();
            staging.view(off, k).f_copy_(&p.grad().view([-1]))?;
            off += k;
        }
        let n_extra = if last { extras.len() } else { 0 };
        let flat = staging.slice(len + n_extra);
        if last {
            flat[len..].copy_from_slice(extras);
        }
        ring.all_reduce_sum(flat)?;
        if last {
            extras.copy_from_slice(&flat[len..]);
        }
        let _ = staging.view(0, len).f_mul_scalar_(scale)?;
        let mut off = 0;
        for p in &params[range.clone()] {
            let k = p.numel();
            let reduced = staging.view(off, k).view(p.size().as_slice());
            p.grad().f_copy_(&reduced)?;
            off += k;
        }
    }
    Ok(())
}

/// Makes every rank start from rank 0's parameters.
fn broadcast_params(
    ring: &mut RingCollective,
    params: &[Tensor],
    buckets: &[std::ops::Range<usize>],
) -> Result<(), TrainError> {
    if ring.world_size() == 1 {
        return Ok(());
    }
    let mut flat = Vec::new();
    for range in buckets {
        let ps = &params[range.clone()];
        flat.clear();
        flat.resize(bucket_len(ps), 0.0);
        let mut off = 0;
        for p in ps {
            let k = p.numel();
            p.view([-1])
                .to_device(Device::Cpu)
                .copy_data(&mut flat[off..off + k], k);
            off += k;
        }
        ring.broadcast(&mut flat, 0)?;
        let mut off = 0;
        tch::no_grad(|| -> Result<(), TrainError> {
            for p in ps {
                let k = p.numel();
                let t = Tensor::from_slice(&flat[off..off + k])
                    .view(p.size().as_slice())
                    .to_device(p.device());
                p.shallow_clone().f_copy_(&t)?;
                off += k;
            }
            Ok(())
        })?;
    }
    Ok(())
}

/// Mean loss and accuracy over the whole validation set; each rank scores
/// its balanced slice and the counts are summed over the ring.
fn evaluate(
    ring: &mut RingCollective,
    model: &Mlp,
    val: &Dataset,
    rank: u32,
    world: u32,
    device: Device,
) -> Result<(f64, f64), TrainError> {
    let n = val.y.len() as u64;
    let mine = rank_range(0..n, rank, world);
    let d = val.features;
    let (mut loss_sum, mut correct) = (0.0f64, 0.0f64);
    tch::no_grad(|| -> Result<(), TrainError> {
        let mut start = mine.start as i64;
        let end = mine.end as i64;
        while start < end {
            let stop = (start + EVAL_CHUNK).min(end);
            let (s, e) = (start as usize, stop as usize);
            let xb = Tensor::from_slice(&val.x[s * d..e * d])
                .view([stop - start, d as i64])
                .to_device(device);
            let yb = Tensor::from_slice(&val.y[s..e]).to_device(device);
            let logits = model.forward_eval(&xb)?;
            loss_sum += logits
                .cross_entropy_loss::<Tensor>(&yb, None, Reduction::Sum, -100, 0.0)
                .double_value(&[]);
            correct += logits
                .argmax(-1, false)
                .eq_tensor(&yb)
                .sum(Kind::Int64)
                .int64_value(&[]) as f64;
            start = stop;
        }
        Ok(())
    })?;
    // f32 holds integer counts exactly up to 2^24 samples per rank sum.
    let mut sums = [loss_sum as f32, correct as f32];
    ring.all_reduce_sum(&mut sums)?;
    let n = n.max(1) as f64;
    Ok((f64::from(sums[0]) / n, f64::from(sums[1]) / n))
}

/// `metrics.jsonl`: one JSON object per report, appended as training goes so
/// a crash keeps what was measured.
struct MetricsLog {
    file: std::fs::File,
    path: String,
}

impl MetricsLog {
    /// Opens the log for a run starting at `first_step`: a fresh run starts
    /// an empty file; a resumed one keeps the lines up to its checkpoint and
    /// drops later ones (they are about to be recomputed).
    fn open(dir: &Path, first_step: u64) -> Result<Self, TrainError> {
        let path = dir.join("metrics.jsonl");
        let err = |source| TrainError::Output {
            path: path.display().to_string(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(err)?;
        let kept: String = if first_step == 0 {
            String::new()
        } else {
            std::fs::read_to_string(&path)
                .unwrap_or_default()
                .lines()
                .filter(|l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .ok()
                        .and_then(|v| v["step"].as_u64())
                        .is_some_and(|s| s <= first_step)
                })
                .map(|l| format!("{l}\n"))
                .collect()
        };
        std::fs::write(&path, kept).map_err(err)?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(err)?;
        Ok(MetricsLog {
            file,
            path: path.display().to_string(),
        })
    }

    fn append(&mut self, step: u64, record: &BTreeMap<String, f64>) -> Result<(), TrainError> {
        let mut obj = serde_json::Map::new();
        obj.insert("step".into(), step.into());
        for (k, v) in record {
            obj.insert(k.clone(), serde_json::json!(v));
        }
        let line = serde_json::Value::Object(obj).to_string();
        writeln!(self.file, "{line}").map_err(|source| TrainError::Output {
            path: self.path.clone(),
            source,
        })
    }
}

/// Points `<output.dir>/latest` at this job's folder (a relative link,
/// replaced atomically), so a user finds the newest run without its id. A
/// failure only costs the convenience: it is logged, not fatal.
fn link_latest(job_dir: &Path) {
    let (Some(root), Some(name)) = (job_dir.parent(), job_dir.file_name()) else {
        return;
    };
    let link = root.join(ringmaster_common::jobspec::LATEST_LINK);
    let tmp = root.join(format!(".latest.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let made = std::os::unix::fs::symlink(name, &tmp).and_then(|()| std::fs::rename(&tmp, &link));
    if let Err(e) = made {
        let _ = std::fs::remove_file(&tmp);
        tracing::warn!(
            "could not point {} at {}: {e}",
            link.display(),
            job_dir.display()
        );
    }
}

/// Writes `model.safetensors` under a temporary name, fsyncs, then renames,
/// so a reader never sees a half-written model.
fn save_model(dir: &Path, named: &[(String, Tensor)]) -> Result<(), TrainError> {
    let path = dir.join("model.safetensors");
    let tmp = dir.join(".model.safetensors.tmp");
    let err = |p: &Path| {
        let p = p.display().to_string();
        move |source| TrainError::Output { path: p, source }
    };
    std::fs::create_dir_all(dir).map_err(err(dir))?;
    let cpu: Vec<(String, Tensor)> = named
        .iter()
        .map(|(k, t)| (k.clone(), t.to_device(Device::Cpu)))
        .collect();
    Tensor::write_safetensors(&cpu, &tmp)?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(err(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(err(&path))?;
    Ok(())
}
