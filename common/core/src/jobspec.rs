//! The job spec: `job.toml` as users write it (raw, serde with
//! `deny_unknown_fields`) and the validated domain [`JobSpec`] that the rest of
//! Ringmaster uses. One function, [`JobSpec::from_toml`], turns the first into
//! the second; every error it returns names `file:line:col`.
//!
//! The domain type is also what travels to the coordinator and the workers
//! (as JSON), and each receiver calls [`JobSpec::check`] again because inbound
//! data can be malformed.
//!
//! Layout: this file holds the domain types, the error type and the public
//! entry points; `raw` is the serde tree of the file, `rules` the value rules
//! shared by both entry points, `validate` the raw-to-domain function. Dataset
//! contents are not read here (see `crate::dataset`); callers that check them
//! report located errors through [`SpecSpans`].

mod raw;
mod rules;
mod schedule;
mod validate;

pub use schedule::{DEFAULT_GAMMA, LrSchedule, ScheduleKind};

use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};

/// Longest job name: names become store keys, directory names and metric labels.
pub const MAX_NAME_LEN: usize = 63;
/// Most hidden layers an MLP may have.
pub const MAX_HIDDEN_LAYERS: usize = 16;
/// Widest hidden layer.
pub const MAX_LAYER_WIDTH: i64 = 65_536;
/// Largest global batch.
pub const MAX_BATCH_SIZE: i64 = 1_048_576;
/// Largest group a job may ask for.
pub const MAX_WORKERS: i64 = 1024;
/// Largest job file: a real one is a few hundred bytes, and the parser holds
/// the whole tree in memory before any rule bounds it.
pub const MAX_SOURCE_BYTES: usize = 1 << 20;

/// A validated job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    pub name: String,
    pub seed: u64,
    /// What the model learns and its loss; classification with cross
    /// entropy when the file (or a spec stored before the table existed)
    /// has no `[task]` table.
    #[serde(default)]
    pub task: TaskSpec,
    pub model: ModelSpec,
    pub data: DataSpec,
    pub train: TrainSpec,
    pub workers: WorkersSpec,
    pub output: OutputSpec,
    /// Always present: the defaults when the file has no `[checkpoint]` table.
    pub checkpoint: CheckpointSpec,
    /// The defaults when the file (or a spec stored before the table
    /// existed) has no `[fault]` table.
    #[serde(default)]
    pub fault: FaultSpec,
    /// Test aids (`[debug]`); off unless the file turns them on.
    #[serde(default)]
    pub debug: DebugSpec,
}

/// Test aids (`[debug]`), documented as such: they cost disk and time.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DebugSpec {
    /// Every rank appends the ids of the samples of each step it applies to
    /// `<output.dir>/<job-id>/audit/`, so a test can prove each sample was
    /// applied exactly once per epoch across recoveries and resizes.
    #[serde(default)]
    pub audit_samples: bool,
}

/// How a job rides out lost workers (`[fault]`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FaultSpec {
    /// In-place recoveries allowed before a lost member fails the job.
    pub max_restarts: u32,
    /// How long a job whose group fell below `workers.min` waits for
    /// workers before it goes back to the queue (resuming later from its
    /// newest committed checkpoint).
    pub rejoin_timeout_secs: u64,
    /// A rank that completes no step for this long (a hung collective, a
    /// stalled data loader) leaves its group, and the group re-forms.
    #[serde(default = "default_hang_timeout_secs")]
    pub hang_timeout_secs: u64,
    /// A worker blamed for this many incidents within
    /// [`QUARANTINE_WINDOW`] is cordoned for `quarantine_cooldown_secs`; 0
    /// never quarantines.
    #[serde(default = "default_quarantine_after")]
    pub quarantine_after: u32,
    /// How long a quarantined worker takes no new work.
    #[serde(default = "default_quarantine_cooldown_secs")]
    pub quarantine_cooldown_secs: u64,
    /// A device collective (NCCL) that does not finish within this long has its communicator
    /// aborted, and the group re-forms.
    #[serde(default = "default_collective_timeout_secs")]
    pub collective_timeout_secs: u64,
}

fn default_collective_timeout_secs() -> u64 {
    60
}

/// The window in which `[fault] quarantine_after` incidents quarantine a
/// worker.
pub const QUARANTINE_WINDOW: std::time::Duration = std::time::Duration::from_secs(600);

fn default_hang_timeout_secs() -> u64 {
    60
}

fn default_quarantine_after() -> u32 {
    3
}

fn default_quarantine_cooldown_secs() -> u64 {
    600
}

impl Default for FaultSpec {
    fn default() -> Self {
        FaultSpec {
            max_restarts: 10,
            rejoin_timeout_secs: 300,
            hang_timeout_secs: default_hang_timeout_secs(),
            quarantine_after: default_quarantine_after(),
            quarantine_cooldown_secs: default_quarantine_cooldown_secs(),
            collective_timeout_secs: default_collective_timeout_secs(),
        }
    }
}

/// The built-in models.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ModelSpec {
    /// A multi-layer perceptron: input size and class count come from the
    /// training dataset's manifest.
    Mlp {
        hidden: Vec<u32>,
        activation: Activation,
        /// Dropout probability after each hidden activation, `0 <= p < 1`.
        dropout: f64,
    },
    /// A convolutional network over `[C, H, W]` inputs (the dataset's
    /// features, row-major): per block a `kernel`×`kernel` convolution
    /// (stride 1, padding `kernel / 2`), a normalization, the activation and
    /// a `pool`×`pool` max pool; then a global average pool, dropout and a
    /// linear head.
    Cnn {
        input_shape: [u32; 3],
        channels: Vec<u32>,
        kernel: u32,
        pool: u32,
        norm: Norm,
        /// Groups of `norm = "group"`; divides every channel count.
        groups: u32,
        activation: Activation,
        dropout: f64,
        /// Training-time image augmentation.
        #[serde(default)]
        augment: Augment,
    },
    /// Stacked LSTM layers over each sample read as a sequence, a linear head on the last step.
    Lstm(RnnSpec),
    /// The same with GRU layers.
    Gru(RnnSpec),
    /// A decoder-only GPT over token sequences (a language model's data).
    Transformer(TransformerSpec),
    /// A module scripted or traced in PyTorch and saved with `torch.jit.save`, trained with all
    /// its parameters; it maps a batch of samples to one logit per class.
    Torchscript {
        /// The `.pt` file, absolute (resolved against the job file's folder).
        path: std::path::PathBuf,
        /// Each sample is reshaped to this before the module sees it (`[batch, ...shape]`);
        /// none: `[batch, features]`.
        #[serde(default)]
        input_shape: Option<Vec<u32>>,
    },
}

/// The recurrent models' keys (`lstm`, `gru`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RnnSpec {
    /// `[steps, input_size]` each sample's features are read as; none: `[features, 1]`.
    #[serde(default)]
    pub input_shape: Option<[u32; 2]>,
    /// Width of every recurrent layer's state.
    pub hidden_size: u32,
    /// Stacked recurrent layers.
    pub layers: u32,
    /// Dropout probability before the head, `0 <= p < 1`.
    pub dropout: f64,
}

/// The `transformer` model's keys: a GPT-2-style decoder (pre-LayerNorm
/// blocks of causal multi-head self-attention and a GELU MLP), nanoGPT's
/// parameter names.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TransformerSpec {
    /// Blocks.
    pub layers: u32,
    /// Attention heads per block; divides `width`.
    pub heads: u32,
    /// Model (embedding) width.
    pub width: u32,
    /// Positions (`T`); must equal the dataset's tokens per sample.
    pub context: u32,
    /// Dropout probability on embeddings, attention and MLP outputs, `0 <= p < 1`.
    pub dropout: f64,
    /// Whether the output head is the token embedding transposed (GPT-2) or
    /// a separate `lm_head`.
    pub tied_embeddings: bool,
}

/// Which recurrent cell an [`RnnSpec`] uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RnnCell {
    Lstm,
    Gru,
}

impl RnnCell {
    /// The `model.kind` name.
    pub fn as_str(self) -> &'static str {
        match self {
            RnnCell::Lstm => "lstm",
            RnnCell::Gru => "gru",
        }
    }
}

/// What the model learns (`[task]`): the kind of labels it predicts and the
/// loss it minimises. The training dataset must hold the matching labels
/// (class labels or f32 regression targets); the worker refuses a mismatch.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TaskSpec {
    /// Class labels; the loss is cross entropy, as PyTorch's
    /// `F.cross_entropy(label_smoothing=)`.
    Classification {
        /// In `[0, 1)`: the target puts `1 - s + s/C` on the label and
        /// `s/C` on every other class.
        label_smoothing: f64,
    },
    /// `k` f32 targets per sample; the model outputs `k` values.
    Regression { loss: RegressionLoss },
    /// Token sequences: the model outputs logits over the vocabulary at each
    /// of the `T` positions; the loss is next-token cross entropy, a
    /// sample's loss the mean over its positions (so the trainer's sum over
    /// samples divided by the global count is the mean per token).
    LanguageModel,
}

impl Default for TaskSpec {
    fn default() -> Self {
        TaskSpec::Classification {
            label_smoothing: 0.0,
        }
    }
}

impl TaskSpec {
    /// `classification`, `regression` or `language_model`, as `task.kind`
    /// spells it.
    pub fn kind(&self) -> &'static str {
        match self {
            TaskSpec::Classification { .. } => "classification",
            TaskSpec::Regression { .. } => "regression",
            TaskSpec::LanguageModel => "language_model",
        }
    }

    /// The `val_*` scores evaluation reports for this task (besides
    /// `val_loss`).
    pub fn scores(&self) -> &'static [&'static str] {
        match self {
            TaskSpec::Classification { .. } => &["val_accuracy", "val_macro_f1"],
            TaskSpec::Regression { .. } => &["val_mse", "val_mae", "val_r2"],
            TaskSpec::LanguageModel => &["val_perplexity"],
        }
    }
}

/// A regression loss, each as PyTorch computes it per element: the
/// per-sample loss is the sum over the `k` targets of the element losses
/// divided by `k` (`reduction="mean"` over a batch of one sample).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "snake_case")]
pub enum RegressionLoss {
    /// `(ŷ - y)²` (`F.mse_loss`).
    Mse,
    /// `|ŷ - y|` (`F.l1_loss`).
    Mae,
    /// `½(ŷ - y)²` where `|ŷ - y| < delta`, else `delta·(|ŷ - y| - ½·delta)`
    /// (`F.huber_loss(delta=)`).
    Huber { delta: f64 },
}

impl RegressionLoss {
    /// The name `task.loss` gives it.
    pub fn name(&self) -> &'static str {
        match self {
            RegressionLoss::Mse => "mse",
            RegressionLoss::Mae => "mae",
            RegressionLoss::Huber { .. } => "huber",
        }
    }
}

/// Random crops and flips of training images, drawn per sample from
/// (seed, step, sample id): W workers still compute the same run, and a
/// resumed run the same steps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Augment {
    /// Pad each side with this many zeros, then crop back to the input size
    /// at a random offset (0: no crop).
    #[serde(default)]
    pub crop_padding: u32,
    /// Mirror left-right with probability 1/2.
    #[serde(default)]
    pub horizontal_flip: bool,
}

/// Values of a `cnn`'s input (`C·H·W`) at most: the dataset features' bound.
pub const MAX_CNN_INPUT_VALUES: u64 = 1 << 20;

/// The normalization after each convolution of a `cnn`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Norm {
    None,
    /// PyTorch's `nn.GroupNorm`: per-sample statistics, so any number of
    /// workers computes the same step.
    Group,
    /// PyTorch's `nn.BatchNorm2d`: each rank normalizes with its own slice's
    /// statistics, as under DDP, so a run depends on the number of workers;
    /// the running statistics are rank 0's.
    Batch,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    Relu,
    Gelu,
    Tanh,
}

/// Absolute dataset directories (each holds a `MANIFEST.json`) and how a
/// worker reads them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DataSpec {
    pub train: PathBuf,
    pub validation: Option<PathBuf>,
    /// Shards whose samples are shuffled together in an epoch (after the
    /// shard order is shuffled); 0: all of them, a uniform shuffle.
    #[serde(default = "default_shuffle_window_shards")]
    pub shuffle_window_shards: u32,
    /// Decoded training shards a streaming rank keeps in memory at most.
    #[serde(default = "default_cache_bytes")]
    pub cache_bytes: u64,
    #[serde(default)]
    pub loading: DataLoading,
}

/// Shuffle window when the job file names none: 8 shards (every shard of a
/// small dataset) mix in a window, and two windows of default-sized shards
/// (32 MiB) fit the default cache, so reads overlap training.
pub const DEFAULT_SHUFFLE_WINDOW_SHARDS: u32 = 8;
/// Streaming cache when the job file names none: 512 MiB.
pub const DEFAULT_CACHE_BYTES: u64 = 512 << 20;
/// Bounds of `data.cache_bytes`.
pub const MIN_CACHE_BYTES: u64 = 1 << 20;
pub const MAX_CACHE_BYTES: u64 = 1 << 40;

fn default_shuffle_window_shards() -> u32 {
    DEFAULT_SHUFFLE_WINDOW_SHARDS
}

fn default_cache_bytes() -> u64 {
    DEFAULT_CACHE_BYTES
}

/// How a worker holds the training set (`data.loading`). Both give the same
/// samples in the same order, so a job's results do not depend on it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataLoading {
    /// Stream when the decoded training set is larger than
    /// `data.cache_bytes`, load it whole otherwise.
    #[default]
    Auto,
    /// Load (and verify) every shard before the first step and keep the
    /// training set on the model's device.
    Memory,
    /// Read the shards each rank needs as it needs them, a window ahead, in
    /// at most `data.cache_bytes` of memory.
    Stream,
}

impl DataLoading {
    /// Whether a training set of `decoded_bytes` is streamed.
    pub fn streams(self, decoded_bytes: u64, cache_bytes: u64) -> bool {
        match self {
            DataLoading::Auto => decoded_bytes > cache_bytes,
            DataLoading::Memory => false,
            DataLoading::Stream => true,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainSpec {
    /// Samples per optimizer step across all ranks, fixed whatever the world size.
    pub global_batch: u32,
    pub duration: Duration,
    pub optimizer: Optimizer,
    pub learning_rate: f64,
    pub weight_decay: f64,
    /// Evaluate on the validation set every this many steps (and at the end).
    pub eval_every_steps: Option<u64>,
    /// Rank 0 appends a line to `metrics.jsonl` every this many steps, with
    /// the loss averaged over the window.
    pub log_every_steps: u64,
    /// How the learning rate moves over the run (`learning_rate` is its peak).
    #[serde(default)]
    pub schedule: LrSchedule,
    /// Gradients are scaled so their global L2 norm is at most this, after
    /// the all-reduce and before the optimizer (PyTorch's
    /// `clip_grad_norm_`).
    #[serde(default)]
    pub clip_grad_norm: Option<f64>,
    /// Each rank's slice of a step is forwarded and backwarded in this many
    /// micro-batches, gradients accumulated, then all-reduced once: the same
    /// step in less activation memory.
    #[serde(default = "one")]
    pub micro_batches: u32,
    /// L1 penalty `l1 · Σ|w|` added to the objective (its subgradient
    /// `l1 · sign(w)` to the averaged gradients).
    #[serde(default)]
    pub l1: f64,
    #[serde(default)]
    pub early_stopping: Option<EarlyStopping>,
    /// `bf16`: the forward pass and loss run under CUDA autocast in bfloat16, while weights,
    /// gradients, optimizer state and checkpoints stay fp32.
    #[serde(default)]
    pub precision: FloatFormat,
    /// `bf16`: gradients are rounded to bfloat16 for the NCCL all-reduce (half the bytes).
    #[serde(default)]
    pub allreduce_dtype: FloatFormat,
}

fn one() -> u32 {
    1
}

/// Stop the run when a validation score has not improved for `patience`
/// evaluations (`train.early_stopping`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EarlyStopping {
    /// A `val_*` metric of [`REPORTED_METRICS`].
    pub metric: String,
    pub mode: MetricMode,
    pub patience: u32,
    /// An improvement smaller than this does not count.
    #[serde(default)]
    pub min_delta: f64,
}

impl TrainSpec {
    /// The learning rate of optimizer step `step` (0-based) of a run of
    /// `total_steps`.
    pub fn learning_rate_at(&self, step: u64, total_steps: u64) -> f64 {
        self.schedule.rate(self.learning_rate, step, total_steps)
    }
}

/// How long a job trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Duration {
    Epochs(u64),
    Steps(u64),
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Optimizer {
    Sgd { momentum: f64, nesterov: bool },
    Adam { beta1: f64, beta2: f64, eps: f64 },
    AdamW { beta1: f64, beta2: f64, eps: f64 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkersSpec {
    pub min: u32,
    pub max: u32,
    pub device: DeviceKind,
    /// A running job with fewer than `max` workers takes free ones as they
    /// appear (re-forming in place). Specs stored before the key existed
    /// read as `true`.
    #[serde(default = "default_grow")]
    pub grow: bool,
    /// Which collective backend reduces gradients (`workers.collective`).
    #[serde(default)]
    pub collective: CollectiveChoice,
}

/// `workers.collective`: the backend asked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CollectiveChoice {
    /// NCCL on CUDA workers, the ring elsewhere.
    #[default]
    Auto,
    /// NCCL (CUDA workers only).
    Nccl,
    /// The TCP ring, reducing device tensors through pinned host memory.
    Ring,
}

/// The backend a job's ranks actually use, the same on every rank.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CollectiveBackend {
    /// NCCL, in device memory.
    Nccl,
    /// The TCP ring.
    Ring,
}

impl WorkersSpec {
    /// `collective` resolved against `device`: `auto` is NCCL exactly on CUDA workers.
    pub fn backend(&self) -> CollectiveBackend {
        match (self.collective, self.device) {
            (CollectiveChoice::Ring, _) | (CollectiveChoice::Auto, DeviceKind::Cpu) => {
                CollectiveBackend::Ring
            }
            (CollectiveChoice::Nccl, _) | (CollectiveChoice::Auto, DeviceKind::Cuda) => {
                CollectiveBackend::Nccl
            }
        }
    }
}

/// Floating-point format of a step's arithmetic (`train.precision`) or of the gradients on the
/// wire (`train.allreduce_dtype`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FloatFormat {
    /// IEEE single precision.
    #[default]
    Fp32,
    /// bfloat16: fp32's range with 8 bits of mantissa.
    Bf16,
}

fn default_grow() -> bool {
    true
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    Cpu,
    Cuda,
}

impl DeviceKind {
    /// The lowercase name, as in job files and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Cuda => "cuda",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OutputSpec {
    /// Absolute directory under which each job gets its own folder
    /// ([`OutputSpec::job_dir`]), where rank 0 writes `model.safetensors`
    /// and `metrics.jsonl`.
    pub dir: PathBuf,
}

/// The name of the link in `output.dir` that points at the folder of the
/// job that started there last.
pub const LATEST_LINK: &str = "latest";

impl OutputSpec {
    /// `<output.dir>/<job-id>/`: every job writes into a folder of its own,
    /// so submitting the same job file twice never mixes two runs' metrics
    /// or overwrites a model (job ids are unique per store).
    pub fn job_dir(&self, job_id: &str) -> PathBuf {
        self.dir.join(job_id)
    }
}

/// When and where rank 0 saves checkpoints, and which it keeps. With no
/// `every_*` trigger set, none are written during training.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointSpec {
    /// Absolute directory; defaults to `<output.dir>/checkpoints`.
    pub dir: PathBuf,
    pub every_steps: Option<u64>,
    pub every_seconds: Option<u64>,
    /// Keep only the newest this many (besides the `keep_best` ones).
    pub keep_last: Option<u32>,
    pub keep_best: Option<KeepBestSpec>,
    /// Write in the background while training continues (`async` in the file).
    pub asynchronous: bool,
}

/// Keep the `count` checkpoints with the best value of `metric`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KeepBestSpec {
    /// One of [`REPORTED_METRICS`].
    pub metric: String,
    pub mode: MetricMode,
    pub count: u32,
}

/// Whether a smaller or a larger metric is better.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MetricMode {
    Min,
    Max,
}

/// The metrics the trainer reports, hence the ones `keep_best` can rank by.
/// The `val_*` ones need `data.validation`; `val_accuracy` and
/// `val_macro_f1` are reported for classification, `val_mse`, `val_mae` and
/// `val_r2` for regression, `val_perplexity` for a language model
/// ([`TaskSpec::scores`]).
pub const REPORTED_METRICS: [&str; 8] = [
    "loss",
    "val_loss",
    "val_accuracy",
    "val_macro_f1",
    "val_mse",
    "val_mae",
    "val_r2",
    "val_perplexity",
];

/// Whether a larger value of a reported metric is better (`max`) or a
/// smaller one (`min`); `None` for a name that is not reported.
pub fn metric_direction(metric: &str) -> Option<MetricMode> {
    match metric {
        "loss" | "val_loss" | "val_mse" | "val_mae" | "val_perplexity" => Some(MetricMode::Min),
        "val_accuracy" | "val_macro_f1" | "val_r2" => Some(MetricMode::Max),
        _ => None,
    }
}

/// Default of `train.log_every_steps`.
pub const DEFAULT_LOG_EVERY_STEPS: u64 = 10;

/// A place in a job file: 1-based line and column, the column counted in
/// characters. Displays as `file:line:col`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.column)
    }
}

/// Why a job file was refused. Every variant displays as one line,
/// `file:line:col: message`, pointing at the offending text.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// The file is not valid TOML.
    #[error("{at}: {message}")]
    NotToml { at: Location, message: String },
    /// Valid TOML that does not fit the schema: an unknown key, a missing key,
    /// a value of the wrong type or an unknown enum value (the message lists
    /// the accepted alternatives).
    #[error("{at}: {message}")]
    SchemaMismatch { at: Location, message: String },
    /// The file is larger than [`MAX_SOURCE_BYTES`]; `at` is its start.
    #[error("{at}: {message}")]
    TooLarge { at: Location, message: String },
    /// A value that fits the schema but breaks a rule: a range, a combination
    /// of keys, or a check done by the caller through [`SpecSpans::error_at`].
    #[error("{at}: {message}")]
    InvalidValue { at: Location, message: String },
}

impl SpecError {
    /// Where in the job file the error points.
    pub fn location(&self) -> &Location {
        match self {
            SpecError::NotToml { at, .. }
            | SpecError::TooLarge { at, .. }
            | SpecError::SchemaMismatch { at, .. }
            | SpecError::InvalidValue { at, .. } => at,
        }
    }

    /// The message without its location.
    pub fn message(&self) -> &str {
        match self {
            SpecError::NotToml { message, .. }
            | SpecError::TooLarge { message, .. }
            | SpecError::SchemaMismatch { message, .. }
            | SpecError::InvalidValue { message, .. } => message,
        }
    }
}

/// The values of a job file that checks done outside this module (datasets
/// exist, their feature counts agree) need to point at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpanField {
    DataTrain,
    DataValidation,
    TrainBatchSize,
    ModelHidden,
}

impl SpanField {
    /// The key as written in `job.toml`, e.g. `data.train`.
    pub fn key(self) -> &'static str {
        match self {
            SpanField::DataTrain => "data.train",
            SpanField::DataValidation => "data.validation",
            SpanField::TrainBatchSize => "train.batch_size",
            SpanField::ModelHidden => "model.hidden",
        }
    }
}

/// Where some values of a parsed job file are, so that a caller's own checks
/// report `file:line:col` like the parser's do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecSpans {
    /// Fallback for `data.validation` when the file has none.
    data_table: Location,
    data_train: Location,
    data_validation: Option<Location>,
    train_batch_size: Location,
    model_hidden: Location,
}

impl SpecSpans {
    /// Where `field`'s value is. `data.validation` absent from the file points
    /// at the `[data]` table instead.
    pub fn location(&self, field: SpanField) -> &Location {
        match field {
            SpanField::DataTrain => &self.data_train,
            SpanField::DataValidation => self.data_validation.as_ref().unwrap_or(&self.data_table),
            SpanField::TrainBatchSize => &self.train_batch_size,
            SpanField::ModelHidden => &self.model_hidden,
        }
    }

    /// A located error about `field`, its message prefixed with the key:
    /// `error_at(SpanField::DataTrain, "no MANIFEST.json in /d")` displays as
    /// `job.toml:7:9: data.train: no MANIFEST.json in /d`.
    pub fn error_at(&self, field: SpanField, message: impl fmt::Display) -> SpecError {
        SpecError::InvalidValue {
            at: self.location(field).clone(),
            message: format!("{}: {message}", field.key()),
        }
    }
}

impl JobSpec {
    /// Parses and validates `source`, the contents of the job file at `path`.
    /// Relative paths in the file are resolved against `path`'s directory and
    /// made absolute; they need not exist yet.
    pub fn from_toml(source: &str, path: &Path) -> Result<JobSpec, SpecError> {
        Self::from_toml_with_spans(source, path).map(|(spec, _)| spec)
    }

    /// [`JobSpec::from_toml`], also returning where the values that callers
    /// check against the file system are, for errors located like ours.
    pub fn from_toml_with_spans(
        source: &str,
        path: &Path,
    ) -> Result<(JobSpec, SpecSpans), SpecError> {
        validate::parse(source, path)
    }

    /// Re-checks the invariants [`JobSpec::from_toml`] establishes, for a spec
    /// that arrived in another form (JSON from the store or the wire). The
    /// error names the key, as in the TOML errors, without a location.
    pub fn check(&self) -> Result<(), String> {
        rules::name(&self.name)?;
        match self.task {
            TaskSpec::Classification { label_smoothing } => {
                rules::label_smoothing(label_smoothing)?
            }
            TaskSpec::Regression { loss } => {
                if let RegressionLoss::Huber { delta } = loss {
                    rules::huber_delta(delta)?;
                }
            }
            TaskSpec::LanguageModel => {}
        }
        match &self.model {
            ModelSpec::Transformer(t) => {
                rules::transformer_layers(t.layers)?;
                rules::heads(t.heads)?;
                rules::width(t.width, t.heads)?;
                rules::context(t.context)?;
                rules::dropout(t.dropout)?;
            }
            ModelSpec::Lstm(r) | ModelSpec::Gru(r) => {
                if let Some(shape) = r.input_shape {
                    for (i, side) in shape.iter().enumerate() {
                        rules::input_side(i, *side)?;
                    }
                }
                rules::hidden_size(r.hidden_size)?;
                rules::rnn_layers(r.layers)?;
                rules::dropout(r.dropout)?;
            }
            ModelSpec::Torchscript { path, input_shape } => {
                // Specs from the wire must not point a worker at a relative path.
                if !path.is_absolute() {
                    return Err(format!(
                        "model.path must be absolute here, got {}",
                        path.display()
                    ));
                }
                if let Some(shape) = input_shape {
                    rules::script_input_dims(shape.len())?;
                    for (i, side) in shape.iter().enumerate() {
                        rules::input_side(i, *side)?;
                    }
                }
            }
            ModelSpec::Mlp {
                hidden, dropout, ..
            } => {
                rules::hidden_len(hidden.len())?;
                for (i, width) in hidden.iter().enumerate() {
                    rules::hidden_width(i, i64::from(*width))?;
                }
                rules::dropout(*dropout)?;
            }
            ModelSpec::Cnn {
                input_shape,
                channels,
                kernel,
                pool,
                norm,
                groups,
                dropout,
                augment,
                ..
            } => {
                rules::crop_padding(augment.crop_padding)?;
                for (i, side) in input_shape.iter().enumerate() {
                    rules::input_side(i, *side)?;
                }
                rules::cnn_channels_len(channels.len())?;
                for (i, c) in channels.iter().enumerate() {
                    rules::cnn_channel(i, *c)?;
                }
                rules::kernel(*kernel)?;
                rules::pool(*pool)?;
                let groups = (*norm == Norm::Group).then_some(*groups);
                if groups == Some(0) {
                    return Err("model.groups must be at least 1".into());
                }
                rules::cnn_shape(*input_shape, channels, *pool, groups, augment.crop_padding)?;
                rules::dropout(*dropout)?;
            }
        }

        absolute("data.train", &self.data.train)?;
        if let Some(validation) = &self.data.validation {
            absolute("data.validation", validation)?;
        }
        rules::shuffle_window_shards(self.data.shuffle_window_shards)?;
        rules::cache_bytes(saturate(self.data.cache_bytes))?;
        absolute("output.dir", &self.output.dir)?;

        let train = &self.train;
        rules::batch_size(i64::from(train.global_batch))?;
        match train.duration {
            Duration::Epochs(n) => rules::epochs(saturate(n))?,
            Duration::Steps(n) => rules::steps(saturate(n))?,
        }
        rules::learning_rate(train.learning_rate)?;
        rules::weight_decay(train.weight_decay)?;
        if let Some(every) = train.eval_every_steps {
            rules::eval_every_steps(saturate(every))?;
            rules::eval_needs_validation(self.data.validation.is_some())?;
        }
        rules::log_every_steps(saturate(train.log_every_steps))?;
        rules::schedule(&train.schedule)?;
        rules::micro_batches(train.micro_batches)?;
        rules::l1(train.l1)?;
        if let Some(es) = &train.early_stopping {
            rules::early_stopping(
                &es.metric,
                train.eval_every_steps.is_some(),
                self.data.validation.is_some(),
            )?;
            rules::patience(es.patience)?;
            rules::min_delta(es.min_delta)?;
            rules::metric_for_task("train.early_stopping.metric", &es.metric, &self.task)?;
            rules::metric_mode("train.early_stopping", &es.metric, es.mode)?;
        }
        if let Some(max) = train.clip_grad_norm {
            rules::clip_grad_norm(max)?;
        }
        match train.optimizer {
            Optimizer::Sgd { momentum, nesterov } => {
                rules::momentum(momentum)?;
                rules::nesterov(nesterov, momentum)?;
            }
            Optimizer::Adam { beta1, beta2, eps } | Optimizer::AdamW { beta1, beta2, eps } => {
                rules::beta(0, beta1)?;
                rules::beta(1, beta2)?;
                rules::eps(eps)?;
            }
        }

        let (min, max) = (i64::from(self.workers.min), i64::from(self.workers.max));
        rules::workers_min(min)?;
        rules::workers_max(max)?;
        rules::workers_order(min, max)?;
        rules::batch_split(i64::from(train.global_batch), min, max)?;
        if self.workers.collective == CollectiveChoice::Nccl {
            rules::nccl_needs_cuda(self.workers.device)?;
        }
        if train.precision == FloatFormat::Bf16 {
            rules::bf16_precision_needs_cuda(self.workers.device)?;
        }
        if train.allreduce_dtype == FloatFormat::Bf16 {
            rules::bf16_wire_needs_nccl(self.workers.backend())?;
        }

        let checkpoint = &self.checkpoint;
        absolute("checkpoint.dir", &checkpoint.dir)?;
        if let Some(every) = checkpoint.every_steps {
            rules::checkpoint_every_steps(saturate(every))?;
        }
        if let Some(every) = checkpoint.every_seconds {
            rules::checkpoint_every_seconds(saturate(every))?;
        }
        if let Some(keep) = checkpoint.keep_last {
            rules::keep_last(i64::from(keep))?;
        }
        if let Some(best) = &checkpoint.keep_best {
            rules::keep_best_metric(&best.metric)?;
            rules::keep_best_needs_validation(&best.metric, self.data.validation.is_some())?;
            rules::keep_best_count(i64::from(best.count))?;
            rules::metric_for_task("checkpoint.keep_best.metric", &best.metric, &self.task)?;
            rules::metric_mode("checkpoint.keep_best", &best.metric, best.mode)?;
        }
        rules::max_restarts(i64::from(self.fault.max_restarts))?;
        rules::rejoin_timeout_secs(saturate(self.fault.rejoin_timeout_secs))?;
        rules::hang_timeout_secs(saturate(self.fault.hang_timeout_secs))?;
        rules::collective_timeout_secs(saturate(self.fault.collective_timeout_secs))?;
        rules::quarantine_after(i64::from(self.fault.quarantine_after))?;
        rules::quarantine_cooldown_secs(saturate(self.fault.quarantine_cooldown_secs))?;
        Ok(())
    }

    /// Optimizer steps in one epoch over `train_samples` samples: every sample
    /// is seen once, so the last step of an epoch may be smaller than the batch.
    pub fn steps_per_epoch(&self, train_samples: u64) -> u64 {
        // `max(1)` keeps an unchecked spec with a zero batch from dividing by zero.
        train_samples.div_ceil(u64::from(self.train.global_batch.max(1)))
    }

    /// Optimizer steps in the whole job: `steps`, or `epochs` times
    /// [`JobSpec::steps_per_epoch`].
    pub fn total_steps(&self, train_samples: u64) -> u64 {
        match self.train.duration {
            Duration::Epochs(epochs) => epochs.saturating_mul(self.steps_per_epoch(train_samples)),
            Duration::Steps(steps) => steps,
        }
    }
}

/// Counts beyond `i64` are far past any rule's bound; saturating keeps the
/// rules' `i64` signatures shared with the TOML side.
fn saturate(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn absolute(key: &str, path: &Path) -> Result<(), String> {
    if path.is_absolute() {
        Ok(())
    } else {
        Err(format!(
            "{key} must be an absolute path, got {:?}",
            path.display().to_string()
        ))
    }
}
