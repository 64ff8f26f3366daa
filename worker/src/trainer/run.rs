//! [`Run`]: one rank's training state for a job, independent of any one
//! generation. It owns the model, the optimizer, the data and its cursor, the
//! metrics and the checkpoint writer; a generation lends it a collective
//! through [`Run::rebind`], and the state stays when that group is gone.
//!
//! Step semantics (DESIGN.md invariants): the global batch `B` is fixed by the
//! job; step `k` of an epoch consumes positions `[kB, (k+1)B)` of the epoch's
//! permutation and rank `r` takes its balanced slice; every rank sums its
//! per-sample losses, gradients are summed across ranks and divided by the
//! number of samples in the global batch, so W workers compute exactly the
//! SGD step of one worker on the whole batch (up to float summation order).

use super::audit::AuditLog;
use super::buffers;
use super::data::TrainData;
use super::evaluation::{Counts, Evaluation, LmScores, RegressionScores, RegressionSums, Scores};
use super::grads::{BUCKET_BYTES, GradBuckets};
use super::loss::Loss;
use super::metrics::{MetricsLog, Window, link_latest};
use super::precision::Precision;
use super::transfer::{State, Transferred, transfer};
use super::{
    Assignment, CheckpointWritten, Event, Outcome, Progress, TrainError, TrainerControl,
    TrainerOptions, state,
};
use crate::checkpoint;
use crate::collective::Collective;
use crate::model::{self, Model};
use crate::optim::Optimizer;
use crate::sample_rng::SampleNoise;
use ringmaster_common::jobspec::JobSpec;
use ringmaster_dataset::{EpochOrder, LabelKind, ShardPlan, rank_range};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Instant;
use tch::{Device, Kind, Tensor, nn};

/// Keys of the early-stopping state in the run's metrics, which checkpoints
/// and state transfers carry, so a resumed or re-formed run keeps counting.
const BEST_KEY: &str = "early_stopping_best";
const STALE_KEY: &str = "early_stopping_stale_evals";

/// Updates the early-stopping state with this evaluation's `scores` (the
/// record of the step) and says whether the run should stop now.
fn early_stopping(
    es: &ringmaster_common::jobspec::EarlyStopping,
    scores: &BTreeMap<String, f64>,
    state: &mut BTreeMap<String, f64>,
) -> bool {
    let Some(&value) = scores.get(&es.metric) else {
        return false;
    };
    let better = match state.get(BEST_KEY) {
        None => true,
        Some(&best) => match es.mode {
            ringmaster_common::jobspec::MetricMode::Min => value < best - es.min_delta,
            ringmaster_common::jobspec::MetricMode::Max => value > best + es.min_delta,
        },
    };
    let stale = if better {
        state.insert(BEST_KEY.into(), value);
        0.0
    } else {
        state.get(STALE_KEY).copied().unwrap_or(0.0) + 1.0
    };
    state.insert(STALE_KEY.into(), stale);
    stale >= f64::from(es.patience)
}

/// Adds the subgradient of `l1 · Σ|w|`, `l1 · sign(w)`, to each parameter's
/// (averaged) gradient.
fn add_l1(params: &[Tensor], l1: f64) -> Result<(), TrainError> {
    tch::no_grad(|| -> Result<(), TrainError> {
        for p in params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.f_add_(&p.f_sign()?.f_mul_scalar(l1)?)?;
            }
        }
        Ok(())
    })
}

/// Scales the gradients of `params` so their global L2 norm is at most
/// `max`, as PyTorch's `clip_grad_norm_` does (`max / (norm + 1e-6)`, only
/// when below 1); returns the norm before clipping.
fn clip_grad_norm(params: &[Tensor], max: f64) -> Result<f64, TrainError> {
    let grads: Vec<Tensor> = params
        .iter()
        .map(|p| p.grad())
        .filter(|g| g.defined())
        .collect();
    // Summed on the device and read once: one synchronisation per step,
    // not one per parameter.
    let mut squares: Option<Tensor> = None;
    for g in &grads {
        let sq = g.f_square()?.f_sum(Kind::Double)?;
        squares = Some(match squares {
            None => sq,
            Some(total) => total.f_add(&sq)?,
        });
    }
    let norm = match squares {
        Some(total) => total.f_double_value(&[])?.sqrt(),
        None => 0.0,
    };
    let coef = max / (norm + 1e-6);
    if coef < 1.0 {
        tch::no_grad(|| -> Result<(), TrainError> {
            for g in &grads {
                let mut g = g.shallow_clone();
                let _ = g.f_mul_scalar_(coef)?;
            }
            Ok(())
        })?;
    }
    Ok(norm)
}

/// Slots appended to the last gradient bucket, summed with it: the batch's
/// loss and the control flags every rank must agree on at this step.
const EXTRA_LOSS: usize = 0;
const EXTRA_CHECKPOINT: usize = 1;
const EXTRA_STOP: usize = 2;
const EXTRAS: usize = 3;

/// One rank's training state, kept across generations.
pub struct Run {
    job_id: String,
    spec: JobSpec,
    output_dir: PathBuf,
    progress_every: u64,
    device: Device,
    /// fp32, or bf16 autocast on CUDA (`train.precision`).
    precision: Precision,
    data: TrainData,
    /// The job's training objective (`[task]`), also its validation loss.
    loss: Loss,
    model: Model,
    /// Owns the parameters the model and `params` point into.
    _vars: nn::VarStore,
    /// Parameters by name, in name order (buckets, checkpoints and
    /// `model.safetensors` use this order).
    named: Vec<(String, Tensor)>,
    names: Vec<String>,
    params: Vec<Tensor>,
    /// The model's buffers by name, in name order (BatchNorm's running
    /// statistics): rank 0's on every rank after each step.
    buffers: Vec<(String, Tensor)>,
    /// Copies of `buffers` at the last step boundary: a step's forward
    /// updates the buffers before it is known whether the step will be
    /// applied, and a step that fails must leave the state it found.
    boundary: Vec<Tensor>,
    grads: GradBuckets,
    optimizer: Optimizer,
    plan: ShardPlan,
    /// The data cursor: steps completed. The plan turns it into an epoch and
    /// a position in that epoch's order.
    step: u64,
    total_steps: u64,
    /// The run loaded a committed checkpoint at start (every rank of its
    /// first group loads the same one, so no transfer is needed).
    resumed: bool,
    /// False while (and after) a transfer into this rank failed half way:
    /// its tensors are a mix of two states and must not be kept.
    intact: bool,
    /// The order of the epoch the cursor is in, a window at a time.
    order: Option<EpochOrder>,
    latest: BTreeMap<String, f64>,
    window: Window,
    /// `metrics.jsonl`, written by rank 0 only.
    log: Option<MetricsLog>,
    started: Option<Instant>,
    writer: Option<checkpoint::Writer>,
    /// Seconds each submitted asynchronous checkpoint blocked the step loop.
    pending_blocked: BTreeMap<u64, f64>,
    last_checkpoint: Instant,
    group: Option<Box<dyn Collective>>,
    /// The current generation's sample audit (`[debug] audit_samples`).
    audit: Option<AuditLog>,
    /// The last step's global gradient norm before clipping (when the job
    /// clips).
    grad_norm: Option<f64>,
}

/// Where a new group's training state comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateSource {
    /// Every rank already holds the same state (all resumed from one
    /// committed checkpoint): nothing moves.
    Shared,
    /// This rank's state is copied to every other rank.
    Rank(u32),
}

/// What one step did, agreed by every rank.
#[derive(Clone, Debug, PartialEq)]
pub struct StepReport {
    /// Steps completed after it.
    pub step: u64,
    /// The epoch it belonged to.
    pub epoch: u64,
    /// Mean loss over the global batch.
    pub loss: f64,
    /// Samples in the global batch.
    pub samples: u64,
    /// Some rank asked for a checkpoint at this step.
    pub checkpoint: bool,
    /// Some rank asked to stop after this step.
    pub stop: bool,
}

impl Run {
    /// Loads the data, builds the initial model on the configured device and
    /// resumes from the first of `a.resume_candidates` that verifies. The run
    /// cannot step until [`rebind`](Self::rebind) gives it a group.
    pub fn start(
        a: &Assignment,
        opts: &TrainerOptions,
        control: &TrainerControl,
        events: &mut dyn FnMut(Event),
    ) -> Result<Run, TrainError> {
        let world = a.peers.len() as u32;
        if world == 0 || a.rank >= world {
            return Err(TrainError::Invalid(format!(
                "rank {} outside world of {world}",
                a.rank
            )));
        }
        tch::set_num_threads(opts.threads.max(1) as i32);
        let spec = a.spec.clone();
        let device = opts.device;
        let precision =
            Precision::new(spec.train.precision, device).map_err(TrainError::Invalid)?;
        let data = TrainData::prepared_or_load(&spec, device)?;
        control.check()?;

        // Same seed on every rank gives the same initial parameters; rank 0's
        // are broadcast anyway so that the group provably starts from one state.
        // The head has one unit per class, or per regression target.
        let outputs = data.labels.outputs() as i64;
        let (vars, model) = model::initial(
            spec.seed,
            data.features as i64,
            outputs,
            &spec.model,
            device,
        )
        .map_err(|e| match e {
            model::BuildError::Alloc(a) => TrainError::from(a),
            model::BuildError::Shape(msg) => TrainError::Invalid(msg),
        })?;
        let named = model.named_parameters(&vars)?;
        // What the loss and the scores index must be what the head outputs.
        if let Some((name, w)) = named.iter().find(|(n, _)| n == "out.weight")
            && w.size().first() != Some(&outputs)
        {
            return Err(TrainError::Invalid(format!(
                "the model's output layer {name} has {:?} units, but the training set holds {}",
                w.size().first(),
                data.labels
            )));
        }
        let names: Vec<String> = named.iter().map(|(k, _)| k.clone()).collect();
        let params: Vec<Tensor> = named.iter().map(|(_, t)| t.shallow_clone()).collect();
        let buffers = model.named_buffers()?;
        let boundary = buffers
            .iter()
            .map(|(name, b)| {
                model::allocate(
                    &format!("copy of model buffer {name}"),
                    &b.size(),
                    b.kind(),
                    device,
                    || b.f_detach_copy(),
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        let grads = GradBuckets::bind(&params, EXTRAS, device)?;
        let mut optimizer = Optimizer::new(
            spec.train.optimizer,
            spec.train.learning_rate,
            spec.train.weight_decay,
            params.len(),
        );
        let samples = data.samples();
        let plan = data.plan().clone();
        let total_steps = spec.total_steps(samples);

        // Every rank loads the same committed checkpoint (each verifies it),
        // so no broadcast is needed after a resume.
        let resumed = state::resume(a, &names, &params, &buffers, &mut optimizer, device, events)?;
        let (step, latest) = match &resumed {
            Some(s) => (s.step, s.metrics.clone()),
            None => (0, BTreeMap::new()),
        };
        // A streamed set starts reading the shards of the first step now,
        // while the group forms and the state moves: the coordinator's
        // cursor when the state comes from a survivor, else our own.
        let (epoch, step_in_epoch) = plan.position(a.cursor.unwrap_or(step));
        data.advance(epoch, plan.batch_range(step_in_epoch).start);
        let loss = Loss::of(&spec.task);
        Ok(Run {
            job_id: a.job_id.clone(),
            spec,
            output_dir: a.output_dir.clone(),
            progress_every: a.progress_every.max(1),
            device,
            precision,
            data,
            loss,
            model,
            _vars: vars,
            named,
            names,
            params,
            buffers,
            boundary,
            grads,
            optimizer,
            plan,
            step,
            total_steps,
            resumed: resumed.is_some(),
            intact: true,
            order: None,
            latest,
            window: Window::default(),
            log: None,
            started: None,
            writer: None,
            pending_blocked: BTreeMap::new(),
            last_checkpoint: Instant::now(),
            group: None,
            audit: None,
            grad_norm: None,
        })
    }

    /// Steps completed so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Whether the state is one consistent state (not a transfer that broke
    /// half way), so it may be held for a later generation.
    pub fn state_intact(&self) -> bool {
        self.intact
    }

    /// The parameters by name, in name order.
    pub fn named_parameters(&self) -> &[(String, Tensor)] {
        &self.named
    }

    /// The model's buffers by name, in name order (empty without batch
    /// normalization).
    pub fn named_buffers(&self) -> &[(String, Tensor)] {
        &self.buffers
    }

    /// Where the first group's state comes from: the checkpoint every rank
    /// loaded, or rank 0's freshly initialised parameters.
    pub fn initial_source(&self) -> StateSource {
        if self.resumed {
            StateSource::Shared
        } else {
            StateSource::Rank(0)
        }
    }

    /// Hands the run the group of a new generation and makes the group's
    /// state one: with [`StateSource::Rank`], that rank's parameters,
    /// optimizer state, cursor and metrics are copied to every other rank
    /// (checksummed). Then rank 0 takes on the metrics log and the checkpoint
    /// writer. Returns what the transfer moved, if there was one.
    pub fn rebind(
        &mut self,
        collective: Box<dyn Collective>,
        source: StateSource,
    ) -> Result<Option<Transferred>, TrainError> {
        let rank = collective.rank();
        let world = collective.world_size();
        let generation = collective.generation();
        // A failed rebind must not leave the previous generation's file in
        // place for steps of this one.
        self.audit = None;
        tracing::debug!(job = %self.job_id, generation, rank, world,
            ?source, "run bound to a group");
        self.group = Some(collective);
        let moved = match source {
            StateSource::Shared => None,
            StateSource::Rank(src) if src >= world => {
                return Err(TrainError::Invalid(format!(
                    "state source rank {src} outside a world of {world}"
                )));
            }
            StateSource::Rank(src) => Some(self.take_state_from(src)?),
        };
        if self.spec.debug.audit_samples {
            self.audit = Some(AuditLog::create(&self.output_dir, generation, rank, world)?);
        }
        if rank == 0 {
            if self.log.is_none() {
                self.log = Some(MetricsLog::open(&self.output_dir, self.step)?);
                link_latest(&self.output_dir);
                super::score::write_spec(
                    &self.spec,
                    &[
                        self.output_dir.clone(),
                        self.spec.checkpoint.dir.join(&self.job_id),
                    ],
                )?;
            }
            if self.spec.checkpoint.asynchronous && self.writer.is_none() {
                self.writer =
                    Some(
                        checkpoint::Writer::start().map_err(|source| TrainError::Output {
                            path: "checkpoint writer thread".into(),
                            source,
                        })?,
                    );
            }
        } else {
            self.log = None;
        }
        self.started.get_or_insert_with(Instant::now);
        Ok(moved)
    }

    /// The job this run trains.
    pub fn spec(&self) -> &JobSpec {
        &self.spec
    }

    fn group(&mut self) -> Result<&mut dyn Collective, TrainError> {
        match self.group.as_deref_mut() {
            Some(g) => Ok(g),
            None => Err(TrainError::Invalid(
                "the run has no group to train with".into(),
            )),
        }
    }

    /// Makes every rank's state rank `src`'s (see [`transfer`]).
    fn take_state_from(&mut self, src: u32) -> Result<Transferred, TrainError> {
        let state = State {
            job_id: &self.job_id,
            step: self.step,
            optimizer_steps: self.optimizer.steps(),
            metrics: &self.latest,
            params: &self.named,
            buffers: &self.buffers,
            optimizer: self.optimizer.state_tensors(&self.names),
        };
        let group = self
            .group
            .as_deref_mut()
            .ok_or_else(|| TrainError::Invalid("the run has no group".into()))?;
        let receiving = group.rank() != src;
        if receiving {
            self.intact = false;
        }
        let (received, moved) = transfer(group, src, state, self.device, BUCKET_BYTES)?;
        if let Some(r) = received {
            self.optimizer
                .load_state(
                    &self.names,
                    r.optimizer.into_iter().collect(),
                    r.header.optimizer_steps,
                    self.device,
                )
                .map_err(TrainError::Transfer)?;
            self.step = r.header.step;
            self.latest = r.header.metrics;
        }
        self.intact = true;
        Ok(moved)
    }

    /// One optimizer step on the next global batch: forward and backward on
    /// this rank's slice, gradients summed over the group, averaged, applied.
    /// Checkpoint and stop requests ride on the gradient all-reduce, so every
    /// rank learns of them at the same step.
    pub fn step(&mut self, control: &TrainerControl) -> Result<StepReport, TrainError> {
        tch::no_grad(|| -> Result<(), TrainError> {
            for (copy, (_, b)) in self.boundary.iter_mut().zip(&self.buffers) {
                copy.f_copy_(b)?;
            }
            Ok(())
        })?;
        let cursor = self.step;
        let result = self.step_inner(control);
        if result.is_err() && self.step == cursor {
            // Not applied: back to the boundary's buffers, so the state held
            // for the next generation is one consistent state.
            tch::no_grad(|| -> Result<(), TrainError> {
                for (copy, (_, b)) in self.boundary.iter().zip(&self.buffers) {
                    b.shallow_clone().f_copy_(copy)?;
                }
                Ok(())
            })?;
        }
        result
    }

    fn step_inner(&mut self, control: &TrainerControl) -> Result<StepReport, TrainError> {
        control.check()?;
        let (rank, world) = {
            let g = self.group()?;
            (g.rank(), g.world_size())
        };
        let (epoch, step_in_epoch) = self.plan.position(self.step);
        if self.order.as_ref().is_none_or(|o| o.epoch() != epoch) {
            self.order = Some(self.plan.epoch(epoch));
        }
        let batch = self.plan.batch_range(step_in_epoch);
        self.data.advance(epoch, batch.start);
        let batch_len = batch.end - batch.start;
        let mine = rank_range(batch, rank, world);
        let ids = self.order.as_mut().expect("computed above").ids(mine);
        let ids = &ids[..];

        hang_failpoint(self.step);
        // A rank with no samples still joins the all-reduce with zeros.
        self.grads.zero()?;
        // Micro-batches accumulate into the same gradients: per-sample
        // losses are summed, so the split changes only the summation order.
        let micro = u64::from(self.spec.train.micro_batches.max(1));
        let mut loss_sum = 0.0;
        for m in 0..micro {
            let part = rank_range(0..ids.len() as u64, m as u32, micro as u32);
            let ids = &ids[part.start as usize..part.end as usize];
            if ids.is_empty() {
                continue;
            }
            let (xb, yb) = self.data.batch(ids)?;
            // Keyed by dataset sample id, not by rank or row: a sample gets
            // the same dropout mask however the batch is split.
            let noise = SampleNoise::new(self.spec.seed, self.step, ids, self.device);
            let out = self
                .precision
                .forward(|| self.model.forward_train(&xb, &noise))?;
            let loss = self.loss.sum(&out, &yb)?;
            loss.f_backward()?;
            loss_sum += loss.f_double_value(&[])?;
        }

        let mut extras = [0f32; EXTRAS];
        extras[EXTRA_LOSS] = loss_sum as f32;
        let timer_due = rank == 0
            && self
                .spec
                .checkpoint
                .every_seconds
                .is_some_and(|s| self.last_checkpoint.elapsed().as_secs() >= s);
        if control.checkpoint.swap(false, Ordering::SeqCst) || timer_due {
            extras[EXTRA_CHECKPOINT] = 1.0;
        }
        if control.stop.swap(false, Ordering::SeqCst) {
            extras[EXTRA_STOP] = 1.0;
        }
        // Written before the all-reduce: once any rank completes it, these
        // samples are applied even if this rank dies before it can say so.
        if let Some(audit) = self.audit.as_mut() {
            audit.contributes(epoch, self.step, ids)?;
        }
        let group = self
            .group
            .as_deref_mut()
            .ok_or_else(|| TrainError::Invalid("the run has no group".into()))?;
        let scale = 1.0 / batch_len.max(1) as f64;
        self.grads.all_reduce(group, &mut extras, scale)?;
        // Each rank's forward folded its own slice into its running
        // statistics; rank 0's stand, as under DDP.
        buffers::sync(group, &self.buffers, &self.boundary)?;
        // Every rank sees the same summed loss, so all stop here together,
        // before a non-finite gradient reaches the parameters.
        let loss = f64::from(extras[EXTRA_LOSS]) / batch_len.max(1) as f64;
        if !loss.is_finite() {
            return Err(TrainError::Diverged {
                step: self.step + 1,
                loss,
            });
        }
        if self.spec.train.l1 > 0.0 {
            add_l1(&self.params, self.spec.train.l1)?;
        }
        if let Some(max) = self.spec.train.clip_grad_norm {
            // Every rank holds the same reduced gradients, so every rank
            // computes the same norm and scales alike.
            self.grad_norm = Some(clip_grad_norm(&self.params, max)?);
        }
        self.optimizer.set_learning_rate(
            self.spec
                .train
                .learning_rate_at(self.optimizer.steps(), self.total_steps),
        );
        self.optimizer.step(&self.params)?;
        let applied = self.step;
        self.step += 1;
        // After the cursor moved: a failed audit write must not leave the
        // parameters one step ahead of the cursor.
        if let Some(audit) = self.audit.as_mut() {
            audit.applied(epoch, applied)?;
        }
        control.beat();
        Ok(StepReport {
            step: self.step,
            epoch,
            loss,
            samples: batch_len,
            checkpoint: extras[EXTRA_CHECKPOINT] > 0.0,
            stop: extras[EXTRA_STOP] > 0.0,
        })
    }

    /// The scores over the whole validation set (`None` without one): for
    /// classification loss, accuracy, per-class precision/recall/F1,
    /// macro-F1 and the confusion matrix; for regression loss, MSE, MAE and
    /// R². Each rank scores its balanced slice and the sums are added over
    /// the group, so every rank gets the same figures.
    pub fn evaluate(&mut self) -> Result<Option<Evaluation>, TrainError> {
        let Some(n) = self.data.validation_samples() else {
            return Ok(None);
        };
        let (rank, world) = {
            let g = self.group()?;
            (g.rank(), g.world_size())
        };
        let mine = rank_range(0..n, rank, world);
        let model = &self.model;
        let loss = self.loss;
        let precision = self.precision;
        match self.data.labels {
            LabelKind::Classes(classes) => {
                let mut counts = Counts::new(classes, self.device)?;
                tch::no_grad(|| {
                    self.data.for_validation_chunks(mine, |xb, yb| {
                        let logits = precision.forward(|| model.forward_eval(xb))?;
                        counts.loss_sum += loss.sum(&logits, yb)?.f_double_value(&[])?;
                        counts.add(&logits, yb)
                    })
                })?;
                let out = self.reduce(counts.to_reduce()?)?;
                Ok(Some(Evaluation::Classification(Scores::from_reduced(
                    &out, classes, n, self.step,
                ))))
            }
            LabelKind::Targets(k) => {
                let mut sums = RegressionSums::new(k);
                tch::no_grad(|| {
                    self.data.for_validation_chunks(mine, |xb, yb| {
                        let pred = precision.forward(|| model.forward_eval(xb))?;
                        sums.loss_sum += loss.sum(&pred, yb)?.f_double_value(&[])?;
                        sums.add(&pred, yb)
                    })
                })?;
                let first = self.reduce(sums.to_reduce()?)?;
                let between = self.reduce(sums.between(&first, n)?)?;
                Ok(Some(Evaluation::Regression(
                    RegressionScores::from_reduced(&first, &between, k, n, self.step),
                )))
            }
            LabelKind::Tokens { len, .. } => {
                let mut loss_sum = 0.0;
                tch::no_grad(|| {
                    self.data.for_validation_chunks(mine, |xb, yb| {
                        let logits = precision.forward(|| model.forward_eval(xb))?;
                        loss_sum += loss.sum(&logits, yb)?.f_double_value(&[])?;
                        Ok(())
                    })
                })?;
                let out = self.reduce(Tensor::f_from_slice(&[loss_sum as f32])?)?;
                Ok(Some(Evaluation::LanguageModel(LmScores::from_loss_sum(
                    f64::from(out[0]),
                    n,
                    len,
                    self.step,
                ))))
            }
        }
    }

    /// Sums an f32 vector over the group and returns it on the host.
    fn reduce(&mut self, mut sums: Tensor) -> Result<Vec<f32>, TrainError> {
        self.group()?.all_reduce_sum(&mut sums)?;
        let len = sums.size()[0] as usize;
        let mut out = vec![0f32; len];
        sums.f_copy_data(&mut out, len)?;
        Ok(out)
    }

    /// Snapshots model and optimizer state at this step boundary and writes
    /// it (in the background when the job asks for asynchronous
    /// checkpoints). Rank 0 only; the outcome arrives as an event.
    pub fn checkpoint(&mut self, events: &mut dyn FnMut(Event)) -> Result<(), TrainError> {
        let started = Instant::now();
        let step = self.step;
        let snapshot = self.snapshot()?;
        match self.writer.as_ref() {
            Some(w) => match w.submit(snapshot) {
                Err(e) => report_checkpoint(events, step, Err(e), 0.0, &self.latest),
                Ok(()) => {
                    self.pending_blocked
                        .insert(step, started.elapsed().as_secs_f64());
                }
            },
            None => {
                let result = checkpoint::write(&snapshot);
                let blocked = started.elapsed().as_secs_f64();
                report_result(events, result, blocked, &self.latest);
            }
        }
        self.last_checkpoint = Instant::now();
        Ok(())
    }

    /// Writes the state held between generations (the group broke, the
    /// run is parked) as a checkpoint, synchronously: the job is going back
    /// to the queue and resumes from it. The outcome is reported either way.
    pub fn checkpoint_held(&mut self, events: &mut dyn FnMut(Event)) {
        let started = Instant::now();
        let result = self.snapshot().map(|s| checkpoint::write(&s));
        let blocked = started.elapsed().as_secs_f64();
        match result {
            Ok(written) => report_result(events, written, blocked, &self.latest),
            Err(e) => {
                report_checkpoint(events, self.step, Err(e.to_string()), blocked, &self.latest)
            }
        }
    }

    /// Copies model and optimizer state to host memory.
    fn snapshot(&self) -> Result<checkpoint::Snapshot, TrainError> {
        let group = self
            .group
            .as_deref()
            .ok_or_else(|| TrainError::Invalid("the run has no group".into()))?;
        let spec = &self.spec;
        let model = self
            .named
            .iter()
            .chain(&self.buffers)
            .map(|(n, p)| checkpoint::HostTensor::copy_of(n, p))
            .collect::<Result<Vec<_>, _>>()?;
        let optim = self
            .optimizer
            .state_tensors(&self.names)
            .iter()
            .map(|(n, t)| checkpoint::HostTensor::copy_of(n, t))
            .collect::<Result<Vec<_>, _>>()?;
        let (epoch, step_in_epoch) = self.plan.position(self.step);
        Ok(checkpoint::Snapshot {
            root: spec.checkpoint.dir.clone(),
            job_id: self.job_id.clone(),
            step: self.step,
            model,
            optimizer: optim,
            state: checkpoint::TrainState {
                format_version: 1,
                job_id: self.job_id.clone(),
                step: self.step,
                epoch,
                step_in_epoch,
                global_batch: u64::from(spec.train.global_batch),
                world_size: group.world_size(),
                generation: group.generation(),
                seed: spec.seed,
                optimizer: format!("{:?}", spec.train.optimizer),
                optimizer_steps: self.optimizer.steps(),
                learning_rate: spec.train.learning_rate,
                lr_schedule: spec.train.schedule.describe(spec.train.learning_rate),
                rng: "no state: dropout masks are a counter-based hash of (seed, step, dataset \
                      sample id, layer, unit)"
                    .into(),
                metrics: self.latest.clone(),
            },
        })
    }

    /// Reports the asynchronous checkpoints that finished writing.
    fn collect_written(&mut self, events: &mut dyn FnMut(Event)) {
        if let Some(w) = self.writer.as_ref() {
            for result in w.finished() {
                let blocked = self.pending_blocked.remove(&result.step).unwrap_or(0.0);
                report_result(events, result, blocked, &self.latest);
            }
        }
    }

    /// Trains until the job's last step or an agreed stop, with the job's
    /// evaluation, logging, checkpoint and progress cadence; then rank 0
    /// writes the model and the group leaves together.
    pub fn run_to_end(
        &mut self,
        control: &TrainerControl,
        events: &mut dyn FnMut(Event),
    ) -> Result<Outcome, TrainError> {
        let rank = self.group()?.rank();
        let mut stopped = false;
        let mut early_stop = false;
        // The first step of each generation is reported at once: it closes
        // the incident that re-formed the group (the job's timeline).
        let mut first = true;
        while self.step < self.total_steps {
            let r = self.step(control)?;
            self.window.add(r.loss, r.samples);
            let done = r.step;
            let total = self.total_steps;
            let train = &self.spec.train;
            let eval_due = train.eval_every_steps.is_some_and(|e| done % e == 0) || done == total;
            let log_every = train.log_every_steps.max(1);
            let mut record = BTreeMap::new();
            if eval_due && let Some(scores) = self.evaluate()? {
                for (name, value) in scores.metrics() {
                    record.insert(name.to_string(), value);
                }
                if rank == 0 {
                    scores.write(&self.output_dir)?;
                }
                control.beat();
                if let Some(es) = &self.spec.train.early_stopping {
                    // Every rank has the same scores, so all stop together.
                    early_stop = early_stopping(es, &record, &mut self.latest);
                }
            }
            let log_due = done % log_every == 0 || done == total || r.stop || !record.is_empty();
            if log_due {
                if let Some((loss, rate)) = self.window.take() {
                    record.insert("loss".to_string(), loss);
                    record.insert("samples_per_sec".to_string(), rate);
                }
                record.insert("epoch".to_string(), r.epoch as f64);
                record.insert("learning_rate".to_string(), self.optimizer.learning_rate());
                if let Some(norm) = self.grad_norm {
                    record.insert("grad_norm".to_string(), norm);
                }
                let elapsed = self.started.map_or(0.0, |s| s.elapsed().as_secs_f64());
                record.insert("elapsed_seconds".to_string(), elapsed);
                self.latest
                    .extend(record.iter().map(|(k, v)| (k.clone(), *v)));
                if let Some(log) = self.log.as_mut() {
                    log.append(done, &record)?;
                }
            }

            let checkpoint_due = r.checkpoint
                || r.stop
                || self
                    .spec
                    .checkpoint
                    .every_steps
                    .is_some_and(|e| done % e == 0);
            if checkpoint_due && rank == 0 {
                self.checkpoint(events)?;
                control.beat();
            }
            self.collect_written(events);

            let report_due = done % self.progress_every == 0 || done == total || r.stop;
            if report_due || first || record.contains_key("val_loss") {
                first = false;
                events(Event::Progress(Progress {
                    step: done,
                    total_steps: total,
                    epoch: r.epoch,
                    metrics: self.latest.clone(),
                }));
            }
            if r.stop {
                stopped = true;
                break;
            }
            if early_stop {
                tracing::info!(job = %self.job_id, step = done, "stopping early");
                break;
            }
        }

        if let Some(mut w) = self.writer.take() {
            for result in w.finish() {
                let blocked = self.pending_blocked.remove(&result.step).unwrap_or(0.0);
                report_result(events, result, blocked, &self.latest);
            }
        }
        if rank == 0 && !stopped {
            state::save_model(&self.output_dir, &self.named, &self.buffers)?;
        }
        if let Some(s) = self.data.stream_stats() {
            tracing::info!(job = %self.job_id, rank, shard_reads = s.reads,
                mib_read = s.bytes_read >> 20, stalled_secs = s.stalled.as_secs_f64(),
                peak_cache_mib = s.peak_bytes >> 20, "streamed the training set");
        }
        // Writing the last checkpoint and the model is progress too.
        control.beat();
        // Nobody leaves before rank 0 has written the model (or its final
        // checkpoint), so "succeeded" always means the output exists.
        self.group()?.barrier()?;
        Ok(Outcome {
            step: self.step,
            metrics: self.latest.clone(),
            stopped,
        })
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

/// `RINGMASTER_FAILPOINT=trainer-hang-at-step=N`: the first time this
/// process reaches step `N` it stops making progress for good, ignoring
/// aborts, as a data loader stuck on a dead file system would (tests of the
/// hang watchdog; only in builds with fail points).
fn hang_failpoint(step: u64) {
    use ringmaster_checkpoint::{FAILPOINT_ENV, FAILPOINTS_BUILT_IN};
    use std::sync::atomic::AtomicBool;
    static FIRED: AtomicBool = AtomicBool::new(false);
    // Read once: this runs on every step.
    static AT: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    let at = *AT.get_or_init(|| {
        let spec = std::env::var(FAILPOINT_ENV)
            .ok()
            .filter(|_| FAILPOINTS_BUILT_IN)?;
        spec.split(',')
            .filter_map(|e| e.trim().strip_prefix("trainer-hang-at-step="))
            .find_map(|n| n.parse::<u64>().ok())
    });
    if at == Some(step) && !FIRED.swap(true, Ordering::SeqCst) {
        tracing::warn!(step, "fail point: hanging for good");
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parameters whose gradients are `3·a` and `4·b` (loss = 3·Σa + 4·Σb).
    fn with_grads(a: &[f32], b: &[f32]) -> Vec<Tensor> {
        let p: Vec<Tensor> = [a, b]
            .iter()
            .map(|v| Tensor::from_slice(v).set_requires_grad(true))
            .collect();
        let loss = p[0].sum(Kind::Float) * 3.0 + p[1].sum(Kind::Float) * 4.0;
        loss.backward();
        p
    }

    #[test]
    fn clipping_scales_to_the_max_norm_like_pytorch_and_leaves_small_gradients() {
        // Gradients [3, 3] and [4, 4, 4, 4]: norm sqrt(18 + 64) = sqrt(82).
        let p = with_grads(&[1.0, 2.0], &[0.0; 4]);
        let norm = clip_grad_norm(&p, 1.0).unwrap();
        assert!((norm - 82f64.sqrt()).abs() < 1e-9);
        let coef = 1.0 / (82f64.sqrt() + 1e-6);
        let g0: Vec<f32> = Vec::try_from(p[0].grad()).unwrap();
        let g1: Vec<f32> = Vec::try_from(p[1].grad()).unwrap();
        assert!(g0.iter().all(|&g| (f64::from(g) - 3.0 * coef).abs() < 1e-6));
        assert!(g1.iter().all(|&g| (f64::from(g) - 4.0 * coef).abs() < 1e-6));

        // A norm below the maximum is left alone.
        let p = with_grads(&[1.0], &[1.0]);
        assert!((clip_grad_norm(&p, 10.0).unwrap() - 5.0).abs() < 1e-9);
        assert_eq!(Vec::<f32>::try_from(p[1].grad()).unwrap(), [4.0]);
    }
}
