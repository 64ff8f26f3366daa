//! `job.toml` exactly as users write it: the serde tree with
//! `deny_unknown_fields`, so a misspelt key is an error that lists the keys
//! that would have been accepted.
//!
//! Nothing here is validated beyond TOML types and enum spellings. Integers are
//! `i128`, wider than any key allows and than TOML's own `i64`, because the
//! `toml` crate hands over larger literals as `u64`, `i128` or `u128`: so a
//! negative or oversized value reaches the range rules in `rules.rs` and gets
//! their message (`train.batch_size must be between 1 and 1048576`), not
//! serde's (`invalid type: integer ... as i128`).
//!
//! Values a later check must point at are [`Spanned`]; an optional key is an
//! `Option` so that "given" and "defaulted" stay distinguishable (sgd-only keys
//! given with adam are errors, not silently ignored). Defaults are applied in
//! `validate.rs`.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};
use serde_spanned::Spanned;

use super::{Activation, CollectiveChoice, DeviceKind, FloatFormat, MetricMode};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a job file")]
pub(super) struct RawJob {
    pub name: Spanned<String>,
    pub seed: Option<Spanned<Integer>>,
    pub task: Option<Spanned<RawTask>>,
    pub model: RawModel,
    pub data: Spanned<RawData>,
    pub train: Spanned<RawTrain>,
    #[serde(default)]
    pub workers: RawWorkers,
    pub output: RawOutput,
    pub checkpoint: Option<RawCheckpoint>,
    pub fault: Option<RawFault>,
    pub debug: Option<RawDebug>,
}

/// The optional `[task]` table; which keys apply depends on `kind`
/// (`validate.rs`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [task] table")]
pub(super) struct RawTask {
    pub kind: Option<Spanned<RawTaskKind>>,
    pub loss: Option<Spanned<RawLoss>>,
    pub label_smoothing: Option<Spanned<Float>>,
    pub huber_delta: Option<Spanned<Float>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum RawTaskKind {
    Classification,
    Regression,
    LanguageModel,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum RawLoss {
    CrossEntropy,
    Mse,
    Mae,
    Huber,
}

impl RawLoss {
    pub fn name(self) -> &'static str {
        match self {
            RawLoss::CrossEntropy => "cross_entropy",
            RawLoss::Mse => "mse",
            RawLoss::Mae => "mae",
            RawLoss::Huber => "huber",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum RawModelKind {
    Mlp,
    Cnn,
    Lstm,
    Gru,
    Torchscript,
    Transformer,
}

impl RawModelKind {
    /// The `model.kind` spelling.
    pub fn name(self) -> &'static str {
        match self {
            RawModelKind::Mlp => "mlp",
            RawModelKind::Cnn => "cnn",
            RawModelKind::Lstm => "lstm",
            RawModelKind::Gru => "gru",
            RawModelKind::Torchscript => "torchscript",
            RawModelKind::Transformer => "transformer",
        }
    }
}

#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum RawNorm {
    None,
    Group,
    Batch,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [model] table")]
pub(super) struct RawModel {
    pub kind: Spanned<RawModelKind>,
    pub hidden: Option<Spanned<Vec<Spanned<Integer>>>>,
    pub activation: Option<Spanned<Activation>>,
    pub dropout: Option<Spanned<Float>>,
    pub input_shape: Option<Spanned<Vec<Spanned<Integer>>>>,
    pub channels: Option<Spanned<Vec<Spanned<Integer>>>>,
    pub kernel: Option<Spanned<Integer>>,
    pub pool: Option<Spanned<Integer>>,
    pub norm: Option<Spanned<RawNorm>>,
    pub groups: Option<Spanned<Integer>>,
    pub augment: Option<Spanned<RawAugment>>,
    pub path: Option<Spanned<String>>,
    pub hidden_size: Option<Spanned<Integer>>,
    pub layers: Option<Spanned<Integer>>,
    pub heads: Option<Spanned<Integer>>,
    pub width: Option<Spanned<Integer>>,
    pub context: Option<Spanned<Integer>>,
    pub tied_embeddings: Option<Spanned<bool>>,
}

impl RawModel {
    /// Every optional key of `[model]` with its span when the file gives it, in table order.
    pub fn given_keys(&self) -> [(&'static str, Option<std::ops::Range<usize>>); 17] {
        fn at<T>(v: &Option<Spanned<T>>) -> Option<std::ops::Range<usize>> {
            v.as_ref().map(Spanned::span)
        }
        [
            ("hidden", at(&self.hidden)),
            ("activation", at(&self.activation)),
            ("dropout", at(&self.dropout)),
            ("input_shape", at(&self.input_shape)),
            ("channels", at(&self.channels)),
            ("kernel", at(&self.kernel)),
            ("pool", at(&self.pool)),
            ("norm", at(&self.norm)),
            ("groups", at(&self.groups)),
            ("augment", at(&self.augment)),
            ("path", at(&self.path)),
            ("hidden_size", at(&self.hidden_size)),
            ("layers", at(&self.layers)),
            ("heads", at(&self.heads)),
            ("width", at(&self.width)),
            ("context", at(&self.context)),
            ("tied_embeddings", at(&self.tied_embeddings)),
        ]
    }
}

impl RawModelKind {
    /// The optional `[model]` keys this kind takes; any other is an error naming the kind.
    pub fn keys(self) -> &'static [&'static str] {
        match self {
            RawModelKind::Mlp => &["hidden", "activation", "dropout"],
            RawModelKind::Cnn => &[
                "activation",
                "dropout",
                "input_shape",
                "channels",
                "kernel",
                "pool",
                "norm",
                "groups",
                "augment",
            ],
            RawModelKind::Lstm | RawModelKind::Gru => {
                &["dropout", "input_shape", "hidden_size", "layers"]
            }
            RawModelKind::Transformer => &[
                "dropout",
                "layers",
                "heads",
                "width",
                "context",
                "tied_embeddings",
            ],
            RawModelKind::Torchscript => &["path", "input_shape"],
        }
    }
}

/// `model.augment`, usually an inline table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "an augment table")]
pub(super) struct RawAugment {
    pub crop_padding: Option<Spanned<Integer>>,
    pub horizontal_flip: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [data] table")]
pub(super) struct RawData {
    pub train: Spanned<String>,
    pub validation: Option<Spanned<String>>,
    pub shuffle_window_shards: Option<Spanned<Integer>>,
    pub cache_bytes: Option<Spanned<RawBytes>>,
    pub loading: Option<RawLoading>,
}

/// A size: bytes as an integer, or a string with a unit (`"512 MiB"`).
#[derive(Debug, Deserialize)]
#[serde(
    untagged,
    expecting = "data.cache_bytes must be a number of bytes or a size such as \"512 MiB\""
)]
pub(super) enum RawBytes {
    Bytes(Integer),
    Text(String),
}

#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum RawLoading {
    Auto,
    Memory,
    Stream,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub(super) enum RawOptimizer {
    #[default]
    #[serde(rename = "sgd")]
    Sgd,
    #[serde(rename = "adam")]
    Adam,
    #[serde(rename = "adamw")]
    AdamW,
}

impl RawOptimizer {
    pub fn name(self) -> &'static str {
        match self {
            RawOptimizer::Sgd => "sgd",
            RawOptimizer::Adam => "adam",
            RawOptimizer::AdamW => "adamw",
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [train] table")]
pub(super) struct RawTrain {
    pub batch_size: Spanned<Integer>,
    pub epochs: Option<Spanned<Integer>>,
    pub steps: Option<Spanned<Integer>>,
    #[serde(default)]
    pub optimizer: RawOptimizer,
    pub learning_rate: Spanned<Float>,
    pub momentum: Option<Spanned<Float>>,
    pub nesterov: Option<Spanned<bool>>,
    pub betas: Option<Spanned<Vec<Spanned<Float>>>>,
    pub eps: Option<Spanned<Float>>,
    pub weight_decay: Option<Spanned<Float>>,
    pub eval_every_steps: Option<Spanned<Integer>>,
    pub log_every_steps: Option<Spanned<Integer>>,
    pub lr_schedule: Option<Spanned<RawSchedule>>,
    pub warmup_steps: Option<Spanned<Integer>>,
    pub lr_step_every: Option<Spanned<Integer>>,
    pub lr_gamma: Option<Spanned<Float>>,
    pub final_learning_rate: Option<Spanned<Float>>,
    pub clip_grad_norm: Option<Spanned<Float>>,
    pub micro_batches: Option<Spanned<Integer>>,
    pub l1: Option<Spanned<Float>>,
    pub early_stopping: Option<Spanned<RawEarlyStopping>>,
    pub precision: Option<Spanned<FloatFormat>>,
    pub allreduce_dtype: Option<Spanned<FloatFormat>>,
}

/// `train.early_stopping`, usually an inline table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "an early_stopping table")]
pub(super) struct RawEarlyStopping {
    pub metric: Spanned<String>,
    pub mode: MetricMode,
    pub patience: Spanned<Integer>,
    pub min_delta: Option<Spanned<Float>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum RawSchedule {
    Constant,
    Step,
    Linear,
    Cosine,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [workers] table")]
pub(super) struct RawWorkers {
    pub min: Option<Spanned<Integer>>,
    pub max: Option<Spanned<Integer>>,
    #[serde(default = "default_device")]
    pub device: DeviceKind,
    pub grow: Option<bool>,
    pub collective: Option<Spanned<CollectiveChoice>>,
}

fn default_device() -> DeviceKind {
    DeviceKind::Cpu
}

/// A job file without a `[workers]` table runs on one CPU worker.
impl Default for RawWorkers {
    fn default() -> Self {
        RawWorkers {
            min: None,
            max: None,
            device: default_device(),
            grow: None,
            collective: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "an [output] table")]
pub(super) struct RawOutput {
    pub dir: Spanned<String>,
}

/// The optional `[checkpoint]` table; every key is optional too.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [checkpoint] table")]
pub(super) struct RawCheckpoint {
    pub dir: Option<Spanned<String>>,
    pub every_steps: Option<Spanned<Integer>>,
    pub every_seconds: Option<Spanned<Integer>>,
    pub keep_last: Option<Spanned<Integer>>,
    pub keep_best: Option<RawKeepBest>,
    #[serde(rename = "async")]
    pub asynchronous: Option<bool>,
}

/// The optional `[fault]` table: how the job rides out lost workers.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [fault] table")]
pub(super) struct RawFault {
    pub max_restarts: Option<Spanned<Integer>>,
    pub rejoin_timeout_secs: Option<Spanned<Integer>>,
    pub hang_timeout_secs: Option<Spanned<Integer>>,
    pub quarantine_after: Option<Spanned<Integer>>,
    pub quarantine_cooldown_secs: Option<Spanned<Integer>>,
    pub collective_timeout_secs: Option<Spanned<Integer>>,
}

/// The optional `[debug]` table: test aids.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [debug] table")]
pub(super) struct RawDebug {
    pub audit_samples: Option<bool>,
}

/// `checkpoint.keep_best`, usually an inline table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a keep_best table")]
pub(super) struct RawKeepBest {
    pub metric: Spanned<String>,
    pub mode: MetricMode,
    pub count: Option<Spanned<Integer>>,
}

/// A TOML integer. Its own type so that a wrong type reads "expected an
/// integer", not serde's "expected i64", and so that an integer past `i64`
/// still reaches the range rules.
#[derive(Clone, Copy, Debug)]
pub(super) struct Integer(pub i128);

/// A TOML float; integers are accepted too (`weight_decay = 0`).
#[derive(Clone, Copy, Debug)]
pub(super) struct Float(pub f64);

impl<'de> Deserialize<'de> for Integer {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct IntegerVisitor;
        impl Visitor<'_> for IntegerVisitor {
            type Value = Integer;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an integer")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Integer, E> {
                Ok(Integer(v.into()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Integer, E> {
                Ok(Integer(v.into()))
            }
            fn visit_i128<E: de::Error>(self, v: i128) -> Result<Integer, E> {
                Ok(Integer(v))
            }
            // Only literals of 2^127 and more land here (`toml` tries i128
            // first); no rule could print them as an i128, so they are refused
            // here, still naming the value. Past u128 `toml` itself reports
            // "integer number overflowed".
            fn visit_u128<E: de::Error>(self, v: u128) -> Result<Integer, E> {
                i128::try_from(v).map(Integer).map_err(|_| {
                    E::invalid_value(de::Unexpected::Other(&format!("integer `{v}`")), &self)
                })
            }
        }
        deserializer.deserialize_i64(IntegerVisitor)
    }
}

impl<'de> Deserialize<'de> for Float {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FloatVisitor;
        impl Visitor<'_> for FloatVisitor {
            type Value = Float;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number")
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Float, E> {
                Ok(Float(v))
            }
            // Exact for every integer a job file plausibly holds (|v| <= 2^53).
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Float, E> {
                Ok(Float(v as f64))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Float, E> {
                Ok(Float(v as f64))
            }
            // Past i64 the nearest float; the rules then judge its magnitude.
            fn visit_i128<E: de::Error>(self, v: i128) -> Result<Float, E> {
                Ok(Float(v as f64))
            }
            fn visit_u128<E: de::Error>(self, v: u128) -> Result<Float, E> {
                Ok(Float(v as f64))
            }
        }
        deserializer.deserialize_f64(FloatVisitor)
    }
}
