//! The value rules of a job spec, each a function from values to an error
//! message. Both entry points use them: `validate.rs` (TOML, which adds
//! `file:line:col`) and [`JobSpec::check`](super::JobSpec::check) (the JSON form
//! a receiver got), so the two can not drift apart.
//!
//! Rules that only make sense on the raw file (a key given for the wrong
//! optimizer, both `epochs` and `steps`) live in `validate.rs`: the domain
//! types can not express those mistakes.

use super::{
    CollectiveBackend, DeviceKind, MAX_BATCH_SIZE, MAX_CACHE_BYTES, MAX_HIDDEN_LAYERS,
    MAX_LAYER_WIDTH, MAX_NAME_LEN, MAX_WORKERS, MIN_CACHE_BYTES, MetricMode, REPORTED_METRICS,
    TaskSpec, metric_direction,
};

/// Integer rules take `impl Into<i128>`: job files hand over values past `i64`
/// (`raw.rs`), received specs hand over `i64`s, and both must get the same
/// message.
pub(super) type Rule = Result<(), String>;

/// Counts held as `u64` in the domain type are bounded by `i64::MAX`, the
/// largest integer TOML promises to carry.
const MAX_COUNT: i128 = i64::MAX as i128;

pub(super) fn name(name: &str) -> Rule {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if first_ok && rest_ok && name.len() <= MAX_NAME_LEN {
        Ok(())
    } else {
        Err(format!(
            "name {name:?} must be 1 to {MAX_NAME_LEN} characters of a-z, 0-9 and '-', \
             starting with a letter or digit"
        ))
    }
}

/// Any `u64`, the domain type: the seed only feeds hashing, so nothing is
/// gained by refusing the upper half, which `toml` reads as `u64`.
pub(super) fn seed(seed: impl Into<i128>) -> Rule {
    let seed = seed.into();
    if (0..=i128::from(u64::MAX)).contains(&seed) {
        Ok(())
    } else {
        Err(format!(
            "seed must be an integer between 0 and 2^64-1 ({}), got {seed}",
            u64::MAX
        ))
    }
}

pub(super) fn hidden_len(layers: usize) -> Rule {
    if layers <= MAX_HIDDEN_LAYERS {
        Ok(())
    } else {
        Err(format!(
            "model.hidden has {layers} layers, at most {MAX_HIDDEN_LAYERS} are allowed"
        ))
    }
}

pub(super) fn hidden_width(index: usize, width: impl Into<i128>) -> Rule {
    in_range(&format!("model.hidden[{index}]"), width, 1, MAX_LAYER_WIDTH)
}

/// Convolution blocks of a `cnn`.
pub(super) const MAX_CNN_BLOCKS: usize = 16;
/// Bounds of a `cnn`'s channel counts and input sides.
const MAX_CHANNELS: i64 = 4096;
const MAX_SIDE: i64 = 4096;

pub(super) fn cnn_channels_len(blocks: usize) -> Rule {
    if (1..=MAX_CNN_BLOCKS).contains(&blocks) {
        Ok(())
    } else {
        Err(format!(
            "model.channels has {blocks} blocks, 1 to {MAX_CNN_BLOCKS} are allowed"
        ))
    }
}

pub(super) fn cnn_channel(index: usize, channels: impl Into<i128>) -> Rule {
    in_range(
        &format!("model.channels[{index}]"),
        channels,
        1,
        MAX_CHANNELS,
    )
}

pub(super) fn input_shape_len(dims: usize) -> Rule {
    if dims == 3 {
        Ok(())
    } else {
        Err(format!(
            "model.input_shape must be [channels, height, width], got {dims} values"
        ))
    }
}

pub(super) fn hidden_size(h: impl Into<i128>) -> Rule {
    in_range("model.hidden_size", h, 1, 4096)
}

pub(super) fn transformer_layers(n: impl Into<i128>) -> Rule {
    in_range("model.layers", n, 1, 64)
}

pub(super) fn heads(n: impl Into<i128>) -> Rule {
    in_range("model.heads", n, 1, 256)
}

/// The model width, split evenly between the heads.
pub(super) fn width(width: u32, heads: u32) -> Rule {
    in_range("model.width", width, 1, 16384)?;
    if heads > 0 && !width.is_multiple_of(heads) {
        return Err(format!(
            "model.width ({width}) must be divisible by model.heads ({heads})"
        ));
    }
    Ok(())
}

/// `model.width` alone, before it is known to fit in 32 bits.
pub(super) fn in_range_width(n: impl Into<i128>) -> Rule {
    in_range("model.width", n, 1, 16384)
}

pub(super) fn context(n: impl Into<i128>) -> Rule {
    in_range("model.context", n, 1, 65536)
}

pub(super) fn rnn_layers(n: impl Into<i128>) -> Rule {
    in_range("model.layers", n, 1, 16)
}

/// A recurrent model reads each sample as `[steps, input_size]`.
pub(super) fn rnn_input_dims(dims: usize) -> Rule {
    if dims == 2 {
        Ok(())
    } else {
        Err(format!(
            "model.input_shape of a recurrent model must be [steps, input_size], got {dims} values"
        ))
    }
}

/// A TorchScript module's per-sample input shape: 1 to 4 dimensions.
pub(super) fn script_input_dims(dims: usize) -> Rule {
    if (1..=4).contains(&dims) {
        Ok(())
    } else {
        Err(format!(
            "model.input_shape must have 1 to 4 dimensions (each sample's shape, e.g. [1, 28, \
             28]), got {dims}"
        ))
    }
}

pub(super) fn input_side(index: usize, side: impl Into<i128>) -> Rule {
    in_range(&format!("model.input_shape[{index}]"), side, 1, MAX_SIDE)
}

pub(super) fn kernel(k: impl Into<i128>) -> Rule {
    let k = k.into();
    if (1..=15).contains(&k) && k % 2 == 1 {
        Ok(())
    } else {
        Err(format!("model.kernel must be odd, 1 to 15, got {k}"))
    }
}

pub(super) fn crop_padding(p: impl Into<i128>) -> Rule {
    in_range("model.augment.crop_padding", p, 0, 64)
}

pub(super) fn pool(p: impl Into<i128>) -> Rule {
    in_range("model.pool", p, 1, 8)
}

/// The whole `cnn` shape: features within bounds, every channel count
/// divisible by the groups, and an input that survives every pool.
pub(super) fn cnn_shape(
    input: [u32; 3],
    channels: &[u32],
    pool: u32,
    groups: Option<u32>,
    crop_padding: u32,
) -> Rule {
    let values: u64 = input.iter().map(|&v| u64::from(v)).product();
    if values > super::MAX_CNN_INPUT_VALUES {
        return Err(format!(
            "model.input_shape holds {values} values, at most {} are allowed",
            super::MAX_CNN_INPUT_VALUES
        ));
    }
    if let Some(g) = groups
        && let Some(c) = channels.iter().find(|&&c| c % g != 0)
    {
        return Err(format!(
            "model.groups = {g} must divide every channel count, and {c} is not a multiple"
        ));
    }
    let shrink = u64::from(pool).saturating_pow(channels.len() as u32);
    if crop_padding > 0 && crop_padding >= input[1].min(input[2]) {
        return Err(format!(
            "model.augment.crop_padding = {crop_padding} must be smaller than the image's \
             height and width ({input:?}): the border is mirrored"
        ));
    }
    let side = u64::from(input[1].min(input[2]));
    if pool > 1 && side < shrink {
        return Err(format!(
            "model.input_shape {input:?} is too small for {} pools of {pool}: the sides \
             would reach 0 (lower model.pool or use fewer blocks)",
            channels.len()
        ));
    }
    Ok(())
}

pub(super) fn dropout(p: f64) -> Rule {
    unit_interval("model.dropout", p)
}

pub(super) fn batch_size(batch: impl Into<i128>) -> Rule {
    in_range("train.batch_size", batch, 1, MAX_BATCH_SIZE)
}

pub(super) fn epochs(epochs: impl Into<i128>) -> Rule {
    at_least_one("train.epochs", epochs)
}

pub(super) fn steps(steps: impl Into<i128>) -> Rule {
    at_least_one("train.steps", steps)
}

pub(super) fn eval_every_steps(every: impl Into<i128>) -> Rule {
    at_least_one("train.eval_every_steps", every)
}

pub(super) fn log_every_steps(every: impl Into<i128>) -> Rule {
    at_least_one("train.log_every_steps", every)
}

pub(super) fn learning_rate(lr: f64) -> Rule {
    positive_finite("train.learning_rate", lr)
}

pub(super) fn momentum(m: f64) -> Rule {
    unit_interval("train.momentum", m)
}

/// PyTorch refuses Nesterov momentum without momentum; say so before a worker
/// finds out.
pub(super) fn nesterov(nesterov: bool, momentum: f64) -> Rule {
    if nesterov && momentum == 0.0 {
        Err("train.nesterov needs train.momentum > 0".to_owned())
    } else {
        Ok(())
    }
}

pub(super) fn betas_len(len: usize) -> Rule {
    if len == 2 {
        Ok(())
    } else {
        Err(format!("train.betas must hold 2 values, got {len}"))
    }
}

pub(super) fn beta(index: usize, b: f64) -> Rule {
    unit_interval(&format!("train.betas[{index}]"), b)
}

pub(super) fn eps(eps: f64) -> Rule {
    positive_finite("train.eps", eps)
}

pub(super) fn weight_decay(wd: f64) -> Rule {
    if wd >= 0.0 && wd.is_finite() {
        Ok(())
    } else {
        Err(format!(
            "train.weight_decay must be non-negative and finite, got {wd:?}"
        ))
    }
}

/// Evaluation runs on the validation set, so asking for it without one is a
/// mistake worth reporting rather than a no-op.
pub(super) fn eval_needs_validation(has_validation: bool) -> Rule {
    if has_validation {
        Ok(())
    } else {
        Err("train.eval_every_steps needs data.validation".to_owned())
    }
}

pub(super) fn workers_min(min: impl Into<i128>) -> Rule {
    in_range("workers.min", min, 1, MAX_WORKERS)
}

pub(super) fn workers_max(max: impl Into<i128>) -> Rule {
    in_range("workers.max", max, 1, MAX_WORKERS)
}

pub(super) fn workers_order(min: i64, max: i64) -> Rule {
    if min <= max {
        Ok(())
    } else {
        Err(format!(
            "workers.min ({min}) is greater than workers.max ({max})"
        ))
    }
}

/// The global batch is fixed by the job and split evenly over the ranks, so it
/// must divide by every group size the job may run at, `min..=max`.
pub(super) fn batch_split(batch: i64, min: i64, max: i64) -> Rule {
    const WHY: &str = "every rank takes an equal share of the global batch";
    if batch < max {
        return Err(format!(
            "train.batch_size {batch} is smaller than workers.max = {max}: \
             every rank needs at least one sample"
        ));
    }
    if batch % max != 0 {
        return Err(format!(
            "train.batch_size {batch} is not divisible by workers.max = {max}: {WHY}"
        ));
    }
    if batch % min != 0 {
        return Err(format!(
            "train.batch_size {batch} is not divisible by workers.min = {min}: {WHY}"
        ));
    }
    // Sizes strictly between min and max that do not divide the batch are
    // simply skipped by the scheduler, so they are not an error here.
    Ok(())
}

pub(super) fn checkpoint_every_steps(every: impl Into<i128>) -> Rule {
    at_least_one("checkpoint.every_steps", every)
}

pub(super) fn checkpoint_every_seconds(every: impl Into<i128>) -> Rule {
    at_least_one("checkpoint.every_seconds", every)
}

pub(super) fn warmup_steps(steps: impl Into<i128>) -> Rule {
    in_range("train.warmup_steps", steps, 0, 1 << 40)
}

pub(super) fn lr_step_every(steps: impl Into<i128>) -> Rule {
    in_range("train.lr_step_every", steps, 1, 1 << 40)
}

pub(super) fn lr_gamma(gamma: f64) -> Rule {
    positive_finite("train.lr_gamma", gamma)
}

pub(super) fn final_learning_rate(lr: f64) -> Rule {
    if lr >= 0.0 && lr.is_finite() {
        Ok(())
    } else {
        Err(format!(
            "train.final_learning_rate must be non-negative and finite, got {lr:?}"
        ))
    }
}

pub(super) fn clip_grad_norm(max: f64) -> Rule {
    positive_finite("train.clip_grad_norm", max)
}

/// The schedule's values, and that `step` has its interval (the JSON form;
/// the TOML form also refuses keys of another kind).
pub(super) fn schedule(s: &super::LrSchedule) -> Rule {
    warmup_steps(s.warmup_steps)?;
    lr_gamma(s.gamma)?;
    final_learning_rate(s.final_learning_rate)?;
    match (s.kind, s.step_every) {
        (super::ScheduleKind::Step, None) => {
            Err("train.lr_schedule = \"step\" needs train.lr_step_every".into())
        }
        (_, Some(every)) => lr_step_every(every),
        _ => Ok(()),
    }
}

pub(super) fn shuffle_window_shards(shards: impl Into<i128>) -> Rule {
    in_range("data.shuffle_window_shards", shards, 0, 1 << 20)
}

pub(super) fn cache_bytes(bytes: impl Into<i128>) -> Rule {
    let bytes = bytes.into();
    if (i128::from(MIN_CACHE_BYTES)..=i128::from(MAX_CACHE_BYTES)).contains(&bytes) {
        Ok(())
    } else {
        Err(format!(
            "data.cache_bytes must be between 1 MiB and 1 TiB ({MIN_CACHE_BYTES} to \
             {MAX_CACHE_BYTES} bytes), got {bytes}"
        ))
    }
}

pub(super) fn max_restarts(n: impl Into<i128>) -> Rule {
    in_range("fault.max_restarts", n, 0, 10_000)
}

pub(super) fn rejoin_timeout_secs(secs: impl Into<i128>) -> Rule {
    in_range("fault.rejoin_timeout_secs", secs, 1, 7 * 24 * 3600)
}

pub(super) fn collective_timeout_secs(secs: impl Into<i128>) -> Rule {
    in_range("fault.collective_timeout_secs", secs, 1, 24 * 3600)
}

/// NCCL reduces device memory: CPU workers have none.
pub(super) fn nccl_needs_cuda(device: DeviceKind) -> Rule {
    if device == DeviceKind::Cpu {
        return Err(
            "workers.collective = \"nccl\" needs workers.device = \"cuda\"; CPU \
                    workers use the ring"
                .into(),
        );
    }
    Ok(())
}

/// Autocast in bf16 is a CUDA feature here.
pub(super) fn bf16_precision_needs_cuda(device: DeviceKind) -> Rule {
    if device == DeviceKind::Cpu {
        return Err(
            "train.precision = \"bf16\" needs workers.device = \"cuda\" (CUDA \
                    autocast); CPU workers train in fp32"
                .into(),
        );
    }
    Ok(())
}

/// Only NCCL reduces in bf16; the ring always moves fp32.
pub(super) fn bf16_wire_needs_nccl(backend: CollectiveBackend) -> Rule {
    if backend != CollectiveBackend::Nccl {
        return Err(
            "train.allreduce_dtype = \"bf16\" needs the NCCL collective (CUDA workers, \
                    workers.collective = \"auto\" or \"nccl\"); the ring reduces in fp32"
                .into(),
        );
    }
    Ok(())
}

pub(super) fn hang_timeout_secs(secs: impl Into<i128>) -> Rule {
    in_range("fault.hang_timeout_secs", secs, 1, 24 * 3600)
}

pub(super) fn quarantine_after(n: impl Into<i128>) -> Rule {
    in_range("fault.quarantine_after", n, 0, 1000)
}

pub(super) fn quarantine_cooldown_secs(secs: impl Into<i128>) -> Rule {
    in_range("fault.quarantine_cooldown_secs", secs, 1, 7 * 24 * 3600)
}

pub(super) fn keep_last(keep: impl Into<i128>) -> Rule {
    count("checkpoint.keep_last", keep)
}

pub(super) fn keep_best_count(keep: impl Into<i128>) -> Rule {
    count("checkpoint.keep_best.count", keep)
}

/// A metric name is `[a-z0-9_]+`, and ranking by one the trainer never
/// reports would keep nothing, so both are refused up front.
pub(super) fn keep_best_metric(metric: &str) -> Rule {
    reported_metric("checkpoint.keep_best.metric", metric)
}

/// A metric `key` names: well formed and one the trainer reports.
pub(super) fn reported_metric(key: &str, metric: &str) -> Rule {
    let well_formed = !metric.is_empty()
        && metric
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !well_formed {
        return Err(format!(
            "{key} {metric:?} must be 1 or more characters of a-z, 0-9 and '_'"
        ));
    }
    if REPORTED_METRICS.contains(&metric) {
        Ok(())
    } else {
        let expected = REPORTED_METRICS
            .iter()
            .map(|m| format!("`{m}`"))
            .collect::<Vec<_>>()
            .join(", ");
        Err(format!(
            "{key} {metric:?} is not reported by the trainer, expected one of {expected}"
        ))
    }
}

/// `val_*` metrics come from scoring the validation set.
pub(super) fn keep_best_needs_validation(metric: &str, has_validation: bool) -> Rule {
    if has_validation || !metric.starts_with("val_") {
        Ok(())
    } else {
        Err(format!(
            "checkpoint.keep_best.metric {metric:?} needs data.validation"
        ))
    }
}

pub(super) fn micro_batches(n: impl Into<i128>) -> Rule {
    in_range("train.micro_batches", n, 1, 1 << 20)
}

pub(super) fn l1(l1: f64) -> Rule {
    if l1 >= 0.0 && l1.is_finite() {
        Ok(())
    } else {
        Err(format!(
            "train.l1 must be non-negative and finite, got {l1:?}"
        ))
    }
}

/// A metric `key` names must be one this task reports: accuracy means
/// nothing for regression, R² nothing for classification.
pub(super) fn metric_for_task(key: &str, metric: &str, task: &TaskSpec) -> Rule {
    let every_task = [
        TaskSpec::default(),
        TaskSpec::Regression {
            loss: super::RegressionLoss::Mse,
        },
        TaskSpec::LanguageModel,
    ];
    let elsewhere = every_task.iter().any(|t| t.scores().contains(&metric));
    if elsewhere && !task.scores().contains(&metric) {
        let ours = task
            .scores()
            .iter()
            .map(|m| format!("`{m}`"))
            .collect::<Vec<_>>()
            .join(", ");
        return Err(format!(
            "{key} {metric:?} is not reported for task.kind = \"{}\" (its scores are \
             `val_loss`, {ours})",
            task.kind()
        ));
    }
    Ok(())
}

/// Ranking by a metric in the wrong direction keeps the worst checkpoints
/// or stops on the best evaluation, so `mode` must match the metric.
pub(super) fn metric_mode(key: &str, metric: &str, mode: MetricMode) -> Rule {
    match metric_direction(metric) {
        Some(right) if right != mode => {
            let (better, name) = match right {
                MetricMode::Min => ("smaller", "min"),
                MetricMode::Max => ("larger", "max"),
            };
            Err(format!(
                "{key}.mode {:?} goes the wrong way for {metric:?}: a {better} value is better \
                 (use mode = \"{name}\")",
                match mode {
                    MetricMode::Min => "min",
                    MetricMode::Max => "max",
                }
            ))
        }
        _ => Ok(()),
    }
}

/// `task.label_smoothing`, as PyTorch accepts it for training: `[0, 1)`.
pub(super) fn label_smoothing(s: f64) -> Rule {
    if (0.0..1.0).contains(&s) {
        Ok(())
    } else {
        Err(format!(
            "task.label_smoothing must be at least 0 and below 1, got {s:?}"
        ))
    }
}

pub(super) fn huber_delta(delta: f64) -> Rule {
    positive_finite("task.huber_delta", delta)
}

/// Early stopping watches a validation score, scored every
/// `eval_every_steps`.
pub(super) fn early_stopping(metric: &str, evaluates: bool, has_validation: bool) -> Rule {
    reported_metric("train.early_stopping.metric", metric)?;
    if !metric.starts_with("val_") {
        return Err(format!(
            "train.early_stopping.metric {metric:?} must be a validation score (val_loss, \
             val_accuracy, val_macro_f1, val_mse, val_mae, val_r2, val_perplexity)"
        ));
    }
    if !has_validation || !evaluates {
        return Err("train.early_stopping needs data.validation and train.eval_every_steps".into());
    }
    Ok(())
}

pub(super) fn patience(n: impl Into<i128>) -> Rule {
    in_range("train.early_stopping.patience", n, 1, 1 << 20)
}

pub(super) fn min_delta(delta: f64) -> Rule {
    if delta >= 0.0 && delta.is_finite() {
        Ok(())
    } else {
        Err(format!(
            "train.early_stopping.min_delta must be non-negative and finite, got {delta:?}"
        ))
    }
}

pub(super) fn path_not_empty(key: &str, path: &str) -> Rule {
    if path.is_empty() {
        Err(format!("{key} must not be empty"))
    } else {
        Ok(())
    }
}

fn in_range(key: &str, value: impl Into<i128>, lo: i64, hi: i64) -> Rule {
    let value = value.into();
    if (i128::from(lo)..=i128::from(hi)).contains(&value) {
        Ok(())
    } else {
        Err(format!("{key} must be between {lo} and {hi}, got {value}"))
    }
}

fn at_least_one(key: &str, value: impl Into<i128>) -> Rule {
    let value = value.into();
    if value < 1 {
        Err(format!("{key} must be at least 1, got {value}"))
    } else if value > MAX_COUNT {
        Err(format!(
            "{key} must be between 1 and {MAX_COUNT}, got {value}"
        ))
    } else {
        Ok(())
    }
}

/// A count held as `u32` in the domain type.
fn count(key: &str, value: impl Into<i128>) -> Rule {
    let value = value.into();
    if value < 1 {
        Err(format!("{key} must be at least 1, got {value}"))
    } else if value > i128::from(u32::MAX) {
        Err(format!("{key} must be at most {}, got {value}", u32::MAX))
    } else {
        Ok(())
    }
}

fn positive_finite(key: &str, value: f64) -> Rule {
    if value > 0.0 && value.is_finite() {
        Ok(())
    } else {
        Err(format!("{key} must be positive and finite, got {value:?}"))
    }
}

fn unit_interval(key: &str, value: f64) -> Rule {
    if (0.0..1.0).contains(&value) {
        Ok(())
    } else {
        Err(format!("{key} must be in [0, 1), got {value:?}"))
    }
}
