//! Turns a `job.toml` source into the validated [`JobSpec`]: TOML syntax, then
//! the raw schema (`raw.rs`), then one function, [`build`], that applies
//! defaults, runs the value rules (`rules.rs`) and the rules between keys, and
//! resolves paths. Every error is located at the value it is about.
//!
//! Nothing here reads the file system: datasets are checked by the caller
//! through [`SpecSpans`].

use std::ops::Range;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;
use serde_spanned::Spanned;

use super::raw::{
    Integer, RawBytes, RawCheckpoint, RawData, RawFault, RawJob, RawLoading, RawLoss, RawModel,
    RawModelKind, RawNorm, RawOptimizer, RawSchedule, RawTask, RawTaskKind, RawTrain, RawWorkers,
};
use super::rules::{self, Rule};
use super::{
    Activation, Augment, CheckpointSpec, CollectiveChoice, DEFAULT_CACHE_BYTES,
    DEFAULT_LOG_EVERY_STEPS, DEFAULT_SHUFFLE_WINDOW_SHARDS, DataLoading, DataSpec, DebugSpec,
    Duration, EarlyStopping, FaultSpec, FloatFormat, JobSpec, KeepBestSpec, Location, LrSchedule,
    MAX_SOURCE_BYTES, ModelSpec, Norm, Optimizer, OutputSpec, RegressionLoss, RnnCell, RnnSpec,
    ScheduleKind, SpecError, SpecSpans, TaskSpec, TrainSpec, TransformerSpec, WorkersSpec,
};

const DEFAULT_BETAS: (f64, f64) = (0.9, 0.999);
const DEFAULT_EPS: f64 = 1e-8;

/// Parses and validates `source`, the contents of the job file at `path`.
pub(super) fn parse(source: &str, path: &Path) -> Result<(JobSpec, SpecSpans), SpecError> {
    let at = Locator { source, file: path };
    if source.len() > MAX_SOURCE_BYTES {
        return Err(SpecError::TooLarge {
            at: at.at(0..0),
            message: format!(
                "job file is {} bytes, at most {MAX_SOURCE_BYTES} are allowed",
                source.len()
            ),
        });
    }
    let table = toml::de::DeTable::parse(source).map_err(|e| SpecError::NotToml {
        at: at.error_location(&e),
        message: one_line(e.message()),
    })?;
    let raw = RawJob::deserialize(toml::de::Deserializer::from(table)).map_err(|e| {
        SpecError::SchemaMismatch {
            at: at.error_location(&e),
            message: one_line(e.message()),
        }
    })?;
    build(raw, &at)
}

/// Maps byte spans of the source to `file:line:col`.
struct Locator<'a> {
    source: &'a str,
    file: &'a Path,
}

impl Locator<'_> {
    fn at(&self, span: Range<usize>) -> Location {
        let (line, column) = line_col(self.source, span.start);
        Location {
            file: self.file.to_path_buf(),
            line,
            column,
        }
    }

    /// Errors without a span (rare: a missing key at the top level) point at
    /// the start of the file.
    fn error_location(&self, e: &toml::de::Error) -> Location {
        self.at(e.span().unwrap_or(0..0))
    }

    fn check<T>(&self, value: &Spanned<T>, rule: Rule) -> Result<(), SpecError> {
        rule.map_err(|message| self.invalid(value.span(), message))
    }

    fn invalid(&self, span: Range<usize>, message: String) -> SpecError {
        SpecError::InvalidValue {
            at: self.at(span),
            message,
        }
    }
}

/// 1-based line and column of byte `offset`, the column counted in characters
/// so that editors and terminals agree with it.
fn line_col(source: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(source.len());
    while !source.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &source[..offset];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = before.matches('\n').count() + 1;
    let column = source[line_start..offset].chars().count() + 1;
    (line, column)
}

/// The contract is one line per error; toml's messages are one line today,
/// this keeps it so if that changes.
fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// The one function from the raw tree to the domain type.
fn build(raw: RawJob, at: &Locator<'_>) -> Result<(JobSpec, SpecSpans), SpecError> {
    at.check(&raw.name, rules::name(raw.name.get_ref()))?;
    let seed = match &raw.seed {
        Some(seed) => {
            at.check(seed, rules::seed(seed.get_ref().0))?;
            non_negative(seed.get_ref().0)
        }
        None => 0,
    };
    let task = match &raw.task {
        Some(t) => build_task(t.get_ref(), at)?,
        None => TaskSpec::default(),
    };
    let (model, model_hidden) = build_model(raw.model, at)?;
    let data_table = at.at(raw.data.span());
    let (data, data_train, data_validation) = build_data(raw.data.into_inner(), at)?;
    let train_table = raw.train.span();
    let batch_span = raw.train.get_ref().batch_size.span();
    let precision_at = raw.train.get_ref().precision.as_ref().map(Spanned::span);
    let wire_at = raw
        .train
        .get_ref()
        .allreduce_dtype
        .as_ref()
        .map(Spanned::span);
    let train = build_train(
        raw.train.into_inner(),
        train_table,
        data.validation.is_some(),
        &task,
        at,
    )?;
    let workers = build_workers(raw.workers, train.global_batch, batch_span.clone(), at)?;
    // These depend on the workers' device and backend, known only now.
    if let Some(span) = precision_at
        && train.precision == FloatFormat::Bf16
    {
        rules::bf16_precision_needs_cuda(workers.device).map_err(|m| at.invalid(span, m))?;
    }
    if let Some(span) = wire_at
        && train.allreduce_dtype == FloatFormat::Bf16
    {
        rules::bf16_wire_needs_nccl(workers.backend()).map_err(|m| at.invalid(span, m))?;
    }
    at.check(
        &raw.output.dir,
        rules::path_not_empty("output.dir", raw.output.dir.get_ref()),
    )?;
    let output = OutputSpec {
        dir: resolve(at, &raw.output.dir, "output.dir")?,
    };
    let checkpoint = build_checkpoint(
        raw.checkpoint,
        &output,
        data.validation.is_some(),
        &task,
        at,
    )?;
    let fault = build_fault(raw.fault, at)?;
    let spec = JobSpec {
        name: raw.name.into_inner(),
        seed,
        task,
        model,
        data,
        train,
        workers,
        output,
        checkpoint,
        fault,
        debug: DebugSpec {
            audit_samples: raw.debug.and_then(|d| d.audit_samples).unwrap_or(false),
        },
    };
    let spans = SpecSpans {
        data_table,
        data_train,
        data_validation,
        train_batch_size: at.at(batch_span),
        model_hidden,
    };
    Ok((spec, spans))
}

/// `[task]`: the kind, then its loss; a key that belongs to the other kind
/// (or another loss) is an error with the reason, not silently ignored.
fn build_task(raw: &RawTask, at: &Locator<'_>) -> Result<TaskSpec, SpecError> {
    let kind = raw
        .kind
        .as_ref()
        .map_or(RawTaskKind::Classification, |k| *k.get_ref());
    match kind {
        RawTaskKind::Classification => {
            if let Some(loss) = &raw.loss
                && *loss.get_ref() != RawLoss::CrossEntropy
            {
                return Err(at.invalid(
                    loss.span(),
                    format!(
                        "task.loss {:?} is a regression loss; task.kind = \"classification\" \
                         takes \"cross_entropy\"",
                        loss.get_ref().name()
                    ),
                ));
            }
            if let Some(delta) = &raw.huber_delta {
                return Err(at.invalid(
                    delta.span(),
                    "task.huber_delta does not apply to task.kind = \"classification\" (it \
                     shapes the regression loss \"huber\")"
                        .into(),
                ));
            }
            let label_smoothing = match &raw.label_smoothing {
                Some(s) => {
                    at.check(s, rules::label_smoothing(s.get_ref().0))?;
                    s.get_ref().0
                }
                None => 0.0,
            };
            Ok(TaskSpec::Classification { label_smoothing })
        }
        RawTaskKind::Regression => {
            if let Some(s) = &raw.label_smoothing {
                return Err(at.invalid(
                    s.span(),
                    "task.label_smoothing does not apply to task.kind = \"regression\" (it \
                     smooths class labels)"
                        .into(),
                ));
            }
            let loss = raw.loss.as_ref().map_or(RawLoss::Mse, |l| *l.get_ref());
            if let (Some(delta), false) = (&raw.huber_delta, loss == RawLoss::Huber) {
                return Err(at.invalid(
                    delta.span(),
                    format!(
                        "task.huber_delta only applies to task.loss = \"huber\", not {:?}",
                        loss.name()
                    ),
                ));
            }
            let loss = match loss {
                RawLoss::Mse => RegressionLoss::Mse,
                RawLoss::Mae => RegressionLoss::Mae,
                RawLoss::Huber => RegressionLoss::Huber {
                    delta: match &raw.huber_delta {
                        Some(d) => {
                            at.check(d, rules::huber_delta(d.get_ref().0))?;
                            d.get_ref().0
                        }
                        None => 1.0,
                    },
                },
                RawLoss::CrossEntropy => {
                    let span = raw.loss.as_ref().map_or(0..0, |l| l.span());
                    return Err(at.invalid(
                        span,
                        "task.loss \"cross_entropy\" is a classification loss; \
                         task.kind = \"regression\" takes \"mse\", \"mae\" or \"huber\""
                            .into(),
                    ));
                }
            };
            Ok(TaskSpec::Regression { loss })
        }
        RawTaskKind::LanguageModel => {
            // Next-token cross entropy is the loss; nothing of the others applies.
            let keys = [
                ("task.loss", raw.loss.as_ref().map(|l| l.span())),
                (
                    "task.label_smoothing",
                    raw.label_smoothing.as_ref().map(|l| l.span()),
                ),
                (
                    "task.huber_delta",
                    raw.huber_delta.as_ref().map(|l| l.span()),
                ),
            ];
            if let Some((key, Some(span))) = keys.into_iter().find(|(_, s)| s.is_some()) {
                return Err(at.invalid(
                    span,
                    format!(
                        "{key} does not apply to task.kind = \"language_model\" (its loss is \
                         next-token cross entropy)"
                    ),
                ));
            }
            Ok(TaskSpec::LanguageModel)
        }
    }
}

fn build_model(raw: RawModel, at: &Locator<'_>) -> Result<(ModelSpec, Location), SpecError> {
    let activation = raw
        .activation
        .as_ref()
        .map_or(Activation::Relu, |a| *a.get_ref());
    let dropout = match &raw.dropout {
        Some(p) => {
            at.check(p, rules::dropout(p.get_ref().0))?;
            p.get_ref().0
        }
        None => 0.0,
    };
    let kind_span = raw.kind.span();
    // Keys of another kind are errors, not silently ignored.
    let kind = *raw.kind.get_ref();
    for (key, span) in raw.given_keys() {
        if let Some(span) = span
            && !kind.keys().contains(&key)
        {
            let message = match kind {
                _ if key == "path" => {
                    "model.path applies to model.kind = \"torchscript\"".to_string()
                }
                RawModelKind::Torchscript => format!(
                    "model.{key} does not apply to model.kind = \"torchscript\" (the module \
                     file defines its own layers)"
                ),
                _ => format!(
                    "model.{key} does not apply to model.kind = \"{}\"",
                    kind.name()
                ),
            };
            return Err(at.invalid(span, message));
        }
    }
    match *raw.kind.get_ref() {
        RawModelKind::Torchscript => build_torchscript(raw, kind_span, at),
        RawModelKind::Transformer => build_transformer(raw, dropout, at),
        RawModelKind::Lstm => {
            build_rnn(raw, RnnCell::Lstm, dropout, at).map(|(r, l)| (ModelSpec::Lstm(r), l))
        }
        RawModelKind::Gru => {
            build_rnn(raw, RnnCell::Gru, dropout, at).map(|(r, l)| (ModelSpec::Gru(r), l))
        }
        RawModelKind::Mlp => {
            let Some(raw_hidden) = &raw.hidden else {
                return Err(at.invalid(
                    kind_span,
                    "model.kind = \"mlp\" needs model.hidden (the hidden layer widths, \
                     e.g. [128, 64])"
                        .into(),
                ));
            };
            at.check(raw_hidden, rules::hidden_len(raw_hidden.get_ref().len()))?;
            let mut hidden = Vec::with_capacity(raw_hidden.get_ref().len());
            for (i, width) in raw_hidden.get_ref().iter().enumerate() {
                at.check(width, rules::hidden_width(i, width.get_ref().0))?;
                hidden.push(narrow(width, at)?);
            }
            let model = ModelSpec::Mlp {
                hidden,
                activation,
                dropout,
            };
            Ok((model, at.at(raw_hidden.span())))
        }
        RawModelKind::Cnn => {
            let needs = |key: &str, example: &str| {
                at.invalid(
                    kind_span.clone(),
                    format!("model.kind = \"cnn\" needs {key} (e.g. {example})"),
                )
            };
            let shape = raw
                .input_shape
                .as_ref()
                .ok_or_else(|| needs("model.input_shape", "[1, 8, 8]"))?;
            at.check(shape, rules::input_shape_len(shape.get_ref().len()))?;
            let mut input_shape = [0u32; 3];
            for (i, v) in shape.get_ref().iter().enumerate() {
                at.check(v, rules::input_side(i, v.get_ref().0))?;
                input_shape[i] = narrow(v, at)?;
            }
            let raw_channels = raw
                .channels
                .as_ref()
                .ok_or_else(|| needs("model.channels", "[16, 32]"))?;
            at.check(
                raw_channels,
                rules::cnn_channels_len(raw_channels.get_ref().len()),
            )?;
            let mut channels = Vec::new();
            for (i, c) in raw_channels.get_ref().iter().enumerate() {
                at.check(c, rules::cnn_channel(i, c.get_ref().0))?;
                channels.push(narrow(c, at)?);
            }
            let kernel = match &raw.kernel {
                Some(k) => {
                    at.check(k, rules::kernel(k.get_ref().0))?;
                    narrow(k, at)?
                }
                None => 3,
            };
            let pool = match &raw.pool {
                Some(p) => {
                    at.check(p, rules::pool(p.get_ref().0))?;
                    narrow(p, at)?
                }
                None => 2,
            };
            let norm = match raw.norm.as_ref().map(|n| (*n.get_ref(), n.span())) {
                None | Some((RawNorm::Group, _)) => Norm::Group,
                Some((RawNorm::None, _)) => Norm::None,
                Some((RawNorm::Batch, _)) => Norm::Batch,
            };
            let groups = match &raw.groups {
                Some(g) if norm != Norm::Group => {
                    return Err(at.invalid(
                        g.span(),
                        "model.groups applies to model.norm = \"group\"".into(),
                    ));
                }
                Some(g) => {
                    at.check(
                        g,
                        rules::cnn_channel(0, g.get_ref().0).map_err(|_| {
                            format!(
                                "model.groups must be between 1 and 4096, got {}",
                                g.get_ref().0
                            )
                        }),
                    )?;
                    let groups = narrow(g, at)?;
                    at.check(
                        g,
                        rules::cnn_shape(input_shape, &channels, pool, Some(groups), 0),
                    )?;
                    groups
                }
                // The largest of 8, 4, 2, 1 that divides every channel count.
                None => [8, 4, 2, 1]
                    .into_iter()
                    .find(|g| channels.iter().all(|c| c % g == 0))
                    .unwrap_or(1),
            };
            let mut augment = Augment::default();
            if let Some(a) = &raw.augment {
                if let Some(p) = &a.get_ref().crop_padding {
                    at.check(p, rules::crop_padding(p.get_ref().0))?;
                    augment.crop_padding = narrow(p, at)?;
                }
                augment.horizontal_flip = a.get_ref().horizontal_flip.unwrap_or(false);
            }
            at.check(
                shape,
                rules::cnn_shape(input_shape, &channels, pool, None, augment.crop_padding),
            )?;
            let model = ModelSpec::Cnn {
                input_shape,
                channels,
                kernel,
                pool,
                norm,
                groups,
                activation,
                dropout,
                augment,
            };
            Ok((model, at.at(raw_channels.span())))
        }
    }
}

/// `model.kind = "lstm" | "gru"`: the state width, the layers and how a sample reads as a
/// sequence.
fn build_rnn(
    raw: RawModel,
    cell: RnnCell,
    dropout: f64,
    at: &Locator<'_>,
) -> Result<(RnnSpec, Location), SpecError> {
    let kind = cell.as_str();
    let Some(hidden) = &raw.hidden_size else {
        return Err(at.invalid(
            raw.kind.span(),
            format!("model.kind = \"{kind}\" needs model.hidden_size (e.g. 64)"),
        ));
    };
    at.check(hidden, rules::hidden_size(hidden.get_ref().0))?;
    let layers = match &raw.layers {
        Some(n) => {
            at.check(n, rules::rnn_layers(n.get_ref().0))?;
            narrow(n, at)?
        }
        None => 1,
    };
    let input_shape = match &raw.input_shape {
        None => None,
        Some(shape) => {
            at.check(shape, rules::rnn_input_dims(shape.get_ref().len()))?;
            let mut dims = [0u32; 2];
            for (i, v) in shape.get_ref().iter().enumerate() {
                at.check(v, rules::input_side(i, v.get_ref().0))?;
                dims[i] = narrow(v, at)?;
            }
            Some(dims)
        }
    };
    let spec = RnnSpec {
        input_shape,
        hidden_size: narrow(hidden, at)?,
        layers,
        dropout,
    };
    Ok((spec, at.at(hidden.span())))
}

/// `model.kind = "transformer"`: layers, heads, width and context are required (a language
/// model's shape is a choice, not a default); tied embeddings default to true.
fn build_transformer(
    raw: RawModel,
    dropout: f64,
    at: &Locator<'_>,
) -> Result<(ModelSpec, Location), SpecError> {
    let required = |value: &Option<Spanned<Integer>>, key: &str, example: &str| {
        value.clone().ok_or_else(|| {
            at.invalid(
                raw.kind.span(),
                format!("model.kind = \"transformer\" needs {key} (e.g. {example})"),
            )
        })
    };
    let layers = required(&raw.layers, "model.layers", "2")?;
    let heads = required(&raw.heads, "model.heads", "4")?;
    let width = required(&raw.width, "model.width", "128")?;
    let context = required(&raw.context, "model.context", "64, the dataset's --context")?;
    at.check(&layers, rules::transformer_layers(layers.get_ref().0))?;
    at.check(&heads, rules::heads(heads.get_ref().0))?;
    at.check(&width, rules::in_range_width(width.get_ref().0))?;
    at.check(&context, rules::context(context.get_ref().0))?;
    let spec = TransformerSpec {
        layers: narrow(&layers, at)?,
        heads: narrow(&heads, at)?,
        width: narrow(&width, at)?,
        context: narrow(&context, at)?,
        dropout,
        tied_embeddings: raw.tied_embeddings.as_ref().is_none_or(|t| *t.get_ref()),
    };
    at.check(&width, rules::width(spec.width, spec.heads))?;
    Ok((ModelSpec::Transformer(spec), at.at(width.span())))
}

/// `model.kind = "torchscript"`: a module file and, optionally, the shape each sample is given
/// to it in. The module brings its own layers, so every built-in model key is refused.
fn build_torchscript(
    raw: RawModel,
    kind_span: Range<usize>,
    at: &Locator<'_>,
) -> Result<(ModelSpec, Location), SpecError> {
    let Some(path) = &raw.path else {
        return Err(at.invalid(
            kind_span,
            "model.kind = \"torchscript\" needs model.path (a module saved with torch.jit.save, \
             e.g. \"model.pt\")"
                .into(),
        ));
    };
    at.check(path, rules::path_not_empty("model.path", path.get_ref()))?;
    let input_shape = match &raw.input_shape {
        None => None,
        Some(shape) => {
            at.check(shape, rules::script_input_dims(shape.get_ref().len()))?;
            let mut dims = Vec::with_capacity(shape.get_ref().len());
            for (i, v) in shape.get_ref().iter().enumerate() {
                at.check(v, rules::input_side(i, v.get_ref().0))?;
                dims.push(narrow(v, at)?);
            }
            Some(dims)
        }
    };
    let model = ModelSpec::Torchscript {
        path: resolve(at, path, "model.path")?,
        input_shape,
    };
    Ok((model, at.at(path.span())))
}

fn build_data(
    raw: RawData,
    at: &Locator<'_>,
) -> Result<(DataSpec, Location, Option<Location>), SpecError> {
    at.check(
        &raw.train,
        rules::path_not_empty("data.train", raw.train.get_ref()),
    )?;
    let train = resolve(at, &raw.train, "data.train")?;
    let validation = match &raw.validation {
        Some(v) => {
            at.check(v, rules::path_not_empty("data.validation", v.get_ref()))?;
            Some(resolve(at, v, "data.validation")?)
        }
        None => None,
    };
    let mut spec = DataSpec {
        train,
        validation,
        shuffle_window_shards: DEFAULT_SHUFFLE_WINDOW_SHARDS,
        cache_bytes: DEFAULT_CACHE_BYTES,
        loading: match raw.loading {
            None | Some(RawLoading::Auto) => DataLoading::Auto,
            Some(RawLoading::Memory) => DataLoading::Memory,
            Some(RawLoading::Stream) => DataLoading::Stream,
        },
    };
    if let Some(w) = &raw.shuffle_window_shards {
        at.check(w, rules::shuffle_window_shards(w.get_ref().0))?;
        spec.shuffle_window_shards = narrow(w, at)?;
    }
    if let Some(size) = &raw.cache_bytes {
        let bytes: i128 = match size.get_ref() {
            RawBytes::Bytes(n) => n.0,
            RawBytes::Text(text) => text
                .parse::<bytesize::ByteSize>()
                .map(|b| i128::from(b.as_u64()))
                .map_err(|_| {
                    at.invalid(
                        size.span(),
                        format!(
                            "data.cache_bytes: cannot read {text:?} as a size; write bytes \
                             (536870912) or a number with a unit (\"512 MiB\", \"2 GiB\")"
                        ),
                    )
                })?,
        };
        at.check(size, rules::cache_bytes(bytes))?;
        spec.cache_bytes = non_negative(bytes);
    }
    let train_at = at.at(raw.train.span());
    let validation_at = raw.validation.map(|v| at.at(v.span()));
    Ok((spec, train_at, validation_at))
}

fn build_train(
    raw: RawTrain,
    table: Range<usize>,
    has_validation: bool,
    task: &TaskSpec,
    at: &Locator<'_>,
) -> Result<TrainSpec, SpecError> {
    at.check(
        &raw.batch_size,
        rules::batch_size(raw.batch_size.get_ref().0),
    )?;
    let duration = match (&raw.epochs, &raw.steps) {
        (Some(_), Some(steps)) => {
            return Err(at.invalid(
                steps.span(),
                "train.epochs and train.steps are both set: give exactly one".to_owned(),
            ));
        }
        (None, None) => {
            return Err(at.invalid(table, "train needs one of `epochs` or `steps`".to_owned()));
        }
        (Some(epochs), None) => {
            at.check(epochs, rules::epochs(epochs.get_ref().0))?;
            Duration::Epochs(non_negative(epochs.get_ref().0))
        }
        (None, Some(steps)) => {
            at.check(steps, rules::steps(steps.get_ref().0))?;
            Duration::Steps(non_negative(steps.get_ref().0))
        }
    };
    at.check(
        &raw.learning_rate,
        rules::learning_rate(raw.learning_rate.get_ref().0),
    )?;
    let weight_decay = match &raw.weight_decay {
        Some(wd) => {
            at.check(wd, rules::weight_decay(wd.get_ref().0))?;
            wd.get_ref().0
        }
        None => 0.0,
    };
    let eval_every_steps = match &raw.eval_every_steps {
        Some(every) => {
            at.check(every, rules::eval_every_steps(every.get_ref().0))?;
            at.check(every, rules::eval_needs_validation(has_validation))?;
            Some(non_negative(every.get_ref().0))
        }
        None => None,
    };
    let log_every_steps = match &raw.log_every_steps {
        Some(every) => {
            at.check(every, rules::log_every_steps(every.get_ref().0))?;
            non_negative(every.get_ref().0)
        }
        None => DEFAULT_LOG_EVERY_STEPS,
    };
    let optimizer = build_optimizer(&raw, at)?;
    let schedule = build_schedule(&raw, at)?;
    let micro_batches = match &raw.micro_batches {
        Some(n) => {
            at.check(n, rules::micro_batches(n.get_ref().0))?;
            narrow(n, at)?
        }
        None => 1,
    };
    let l1 = match &raw.l1 {
        Some(l1) => {
            at.check(l1, rules::l1(l1.get_ref().0))?;
            l1.get_ref().0
        }
        None => 0.0,
    };
    let early_stopping = match &raw.early_stopping {
        None => None,
        Some(es) => {
            let metric = &es.get_ref().metric;
            at.check(
                metric,
                rules::early_stopping(metric.get_ref(), eval_every_steps.is_some(), has_validation),
            )?;
            at.check(
                metric,
                rules::metric_for_task("train.early_stopping.metric", metric.get_ref(), task),
            )?;
            at.check(
                metric,
                rules::metric_mode("train.early_stopping", metric.get_ref(), es.get_ref().mode),
            )?;
            let patience = &es.get_ref().patience;
            at.check(patience, rules::patience(patience.get_ref().0))?;
            let min_delta = match &es.get_ref().min_delta {
                Some(d) => {
                    at.check(d, rules::min_delta(d.get_ref().0))?;
                    d.get_ref().0
                }
                None => 0.0,
            };
            Some(EarlyStopping {
                metric: metric.get_ref().clone(),
                mode: es.get_ref().mode,
                patience: narrow(patience, at)?,
                min_delta,
            })
        }
    };
    let clip_grad_norm = match &raw.clip_grad_norm {
        Some(max) => {
            at.check(max, rules::clip_grad_norm(max.get_ref().0))?;
            Some(max.get_ref().0)
        }
        None => None,
    };
    Ok(TrainSpec {
        precision: raw
            .precision
            .as_ref()
            .map_or_else(Default::default, |p| *p.get_ref()),
        allreduce_dtype: raw
            .allreduce_dtype
            .as_ref()
            .map_or_else(Default::default, |p| *p.get_ref()),
        global_batch: narrow(&raw.batch_size, at)?,
        duration,
        optimizer,
        learning_rate: raw.learning_rate.get_ref().0,
        weight_decay,
        eval_every_steps,
        log_every_steps,
        schedule,
        clip_grad_norm,
        micro_batches,
        l1,
        early_stopping,
    })
}

/// `train.lr_schedule` and the keys that shape it; a key that belongs to
/// another kind of schedule is an error, not silently ignored.
fn build_schedule(raw: &RawTrain, at: &Locator<'_>) -> Result<LrSchedule, SpecError> {
    let kind = match raw.lr_schedule.as_ref().map(|k| *k.get_ref()) {
        None | Some(RawSchedule::Constant) => ScheduleKind::Constant,
        Some(RawSchedule::Step) => ScheduleKind::Step,
        Some(RawSchedule::Linear) => ScheduleKind::Linear,
        Some(RawSchedule::Cosine) => ScheduleKind::Cosine,
    };
    let name = match kind {
        ScheduleKind::Constant => "constant",
        ScheduleKind::Step => "step",
        ScheduleKind::Linear => "linear",
        ScheduleKind::Cosine => "cosine",
    };
    let wrong_kind = |span: Range<usize>, key: &str, needs: &str| {
        at.invalid(
            span,
            format!("{key} applies to lr_schedule = {needs}, not \"{name}\""),
        )
    };
    let mut schedule = LrSchedule {
        kind,
        ..LrSchedule::default()
    };
    if let Some(w) = &raw.warmup_steps {
        at.check(w, rules::warmup_steps(w.get_ref().0))?;
        schedule.warmup_steps = non_negative(w.get_ref().0);
    }
    match (&raw.lr_step_every, kind) {
        (Some(every), ScheduleKind::Step) => {
            at.check(every, rules::lr_step_every(every.get_ref().0))?;
            schedule.step_every = Some(non_negative(every.get_ref().0));
        }
        (Some(every), _) => {
            return Err(wrong_kind(every.span(), "train.lr_step_every", "\"step\""));
        }
        (None, ScheduleKind::Step) => {
            let span = raw
                .lr_schedule
                .as_ref()
                .map(|k| k.span())
                .unwrap_or_default();
            return Err(at.invalid(
                span,
                "lr_schedule = \"step\" needs train.lr_step_every (steps between decays)".into(),
            ));
        }
        (None, _) => {}
    }
    if let Some(gamma) = &raw.lr_gamma {
        if kind != ScheduleKind::Step {
            return Err(wrong_kind(gamma.span(), "train.lr_gamma", "\"step\""));
        }
        at.check(gamma, rules::lr_gamma(gamma.get_ref().0))?;
        schedule.gamma = gamma.get_ref().0;
    }
    if let Some(end) = &raw.final_learning_rate {
        if !matches!(kind, ScheduleKind::Linear | ScheduleKind::Cosine) {
            return Err(wrong_kind(
                end.span(),
                "train.final_learning_rate",
                "\"linear\" or \"cosine\"",
            ));
        }
        at.check(end, rules::final_learning_rate(end.get_ref().0))?;
        schedule.final_learning_rate = end.get_ref().0;
    }
    Ok(schedule)
}

fn build_optimizer(raw: &RawTrain, at: &Locator<'_>) -> Result<Optimizer, SpecError> {
    let kind = raw.optimizer;
    if kind == RawOptimizer::Sgd {
        only_for_adam(at, &raw.betas, "train.betas")?;
        only_for_adam(at, &raw.eps, "train.eps")?;
        let momentum = match &raw.momentum {
            Some(m) => {
                at.check(m, rules::momentum(m.get_ref().0))?;
                m.get_ref().0
            }
            None => 0.0,
        };
        let nesterov = match &raw.nesterov {
            Some(n) => {
                at.check(n, rules::nesterov(*n.get_ref(), momentum))?;
                *n.get_ref()
            }
            None => false,
        };
        return Ok(Optimizer::Sgd { momentum, nesterov });
    }
    if let Some(momentum) = &raw.momentum {
        return Err(sgd_only(at, momentum.span(), "train.momentum", kind));
    }
    if let Some(nesterov) = &raw.nesterov {
        return Err(sgd_only(at, nesterov.span(), "train.nesterov", kind));
    }
    let (beta1, beta2) = match &raw.betas {
        Some(betas) => {
            at.check(betas, rules::betas_len(betas.get_ref().len()))?;
            for (i, b) in betas.get_ref().iter().enumerate() {
                at.check(b, rules::beta(i, b.get_ref().0))?;
            }
            (
                betas.get_ref()[0].get_ref().0,
                betas.get_ref()[1].get_ref().0,
            )
        }
        None => DEFAULT_BETAS,
    };
    let eps = match &raw.eps {
        Some(eps) => {
            at.check(eps, rules::eps(eps.get_ref().0))?;
            eps.get_ref().0
        }
        None => DEFAULT_EPS,
    };
    Ok(if kind == RawOptimizer::Adam {
        Optimizer::Adam { beta1, beta2, eps }
    } else {
        Optimizer::AdamW { beta1, beta2, eps }
    })
}

fn sgd_only(at: &Locator<'_>, span: Range<usize>, key: &str, kind: RawOptimizer) -> SpecError {
    at.invalid(
        span,
        format!(
            "{key} only applies to optimizer \"sgd\", not {:?}",
            kind.name()
        ),
    )
}

fn only_for_adam<T>(
    at: &Locator<'_>,
    value: &Option<Spanned<T>>,
    key: &str,
) -> Result<(), SpecError> {
    match value {
        Some(v) => Err(at.invalid(
            v.span(),
            format!("{key} only applies to optimizers \"adam\" and \"adamw\", not \"sgd\""),
        )),
        None => Ok(()),
    }
}

fn build_workers(
    raw: RawWorkers,
    batch: u32,
    batch_span: Range<usize>,
    at: &Locator<'_>,
) -> Result<WorkersSpec, SpecError> {
    let min = match &raw.min {
        Some(min) => {
            at.check(min, rules::workers_min(min.get_ref().0))?;
            bounded(min.get_ref().0)
        }
        None => 1,
    };
    let max = match &raw.max {
        Some(max) => {
            at.check(max, rules::workers_max(max.get_ref().0))?;
            bounded(max.get_ref().0)
        }
        None => min,
    };
    if let Some(min_value) = &raw.min {
        at.check(min_value, rules::workers_order(min, max))?;
    } else if let Some(max_value) = &raw.max {
        at.check(max_value, rules::workers_order(min, max))?;
    }
    rules::batch_split(i64::from(batch), min, max)
        .map_err(|message| at.invalid(batch_span, message))?;
    let collective = match &raw.collective {
        Some(c) => {
            if *c.get_ref() == CollectiveChoice::Nccl {
                at.check(c, rules::nccl_needs_cuda(raw.device))?;
            }
            *c.get_ref()
        }
        None => CollectiveChoice::Auto,
    };
    Ok(WorkersSpec {
        // Both within 1..=MAX_WORKERS after the rules above.
        min: u32::try_from(min).unwrap_or(u32::MAX),
        max: u32::try_from(max).unwrap_or(u32::MAX),
        device: raw.device,
        grow: raw.grow.unwrap_or(true),
        collective,
    })
}

/// The `[fault]` table, or its defaults when the file has none.
fn build_fault(raw: Option<RawFault>, at: &Locator<'_>) -> Result<FaultSpec, SpecError> {
    let mut fault = FaultSpec::default();
    let Some(raw) = raw else {
        return Ok(fault);
    };
    if let Some(n) = &raw.max_restarts {
        at.check(n, rules::max_restarts(n.get_ref().0))?;
        fault.max_restarts = narrow(n, at)?;
    }
    if let Some(secs) = &raw.rejoin_timeout_secs {
        at.check(secs, rules::rejoin_timeout_secs(secs.get_ref().0))?;
        fault.rejoin_timeout_secs = non_negative(secs.get_ref().0);
    }
    if let Some(secs) = &raw.hang_timeout_secs {
        at.check(secs, rules::hang_timeout_secs(secs.get_ref().0))?;
        fault.hang_timeout_secs = non_negative(secs.get_ref().0);
    }
    if let Some(secs) = &raw.collective_timeout_secs {
        at.check(secs, rules::collective_timeout_secs(secs.get_ref().0))?;
        fault.collective_timeout_secs = non_negative(secs.get_ref().0);
    }
    if let Some(n) = &raw.quarantine_after {
        at.check(n, rules::quarantine_after(n.get_ref().0))?;
        fault.quarantine_after = narrow(n, at)?;
    }
    if let Some(secs) = &raw.quarantine_cooldown_secs {
        at.check(secs, rules::quarantine_cooldown_secs(secs.get_ref().0))?;
        fault.quarantine_cooldown_secs = non_negative(secs.get_ref().0);
    }
    Ok(fault)
}

/// The `[checkpoint]` table, or its defaults when the file has none.
fn build_checkpoint(
    raw: Option<RawCheckpoint>,
    output: &OutputSpec,
    has_validation: bool,
    task: &TaskSpec,
    at: &Locator<'_>,
) -> Result<CheckpointSpec, SpecError> {
    let Some(raw) = raw else {
        return Ok(CheckpointSpec {
            dir: output.dir.join("checkpoints"),
            every_steps: None,
            every_seconds: None,
            keep_last: None,
            keep_best: None,
            asynchronous: true,
        });
    };
    let dir = match &raw.dir {
        Some(dir) => {
            at.check(dir, rules::path_not_empty("checkpoint.dir", dir.get_ref()))?;
            resolve(at, dir, "checkpoint.dir")?
        }
        None => output.dir.join("checkpoints"),
    };
    let every_steps = match &raw.every_steps {
        Some(every) => {
            at.check(every, rules::checkpoint_every_steps(every.get_ref().0))?;
            Some(non_negative(every.get_ref().0))
        }
        None => None,
    };
    let every_seconds = match &raw.every_seconds {
        Some(every) => {
            at.check(every, rules::checkpoint_every_seconds(every.get_ref().0))?;
            Some(non_negative(every.get_ref().0))
        }
        None => None,
    };
    let keep_last = match &raw.keep_last {
        Some(keep) => {
            at.check(keep, rules::keep_last(keep.get_ref().0))?;
            Some(narrow(keep, at)?)
        }
        None => None,
    };
    let keep_best = match raw.keep_best {
        Some(best) => {
            let metric = &best.metric;
            at.check(metric, rules::keep_best_metric(metric.get_ref()))?;
            at.check(
                metric,
                rules::keep_best_needs_validation(metric.get_ref(), has_validation),
            )?;
            at.check(
                metric,
                rules::metric_for_task("checkpoint.keep_best.metric", metric.get_ref(), task),
            )?;
            at.check(
                metric,
                rules::metric_mode("checkpoint.keep_best", metric.get_ref(), best.mode),
            )?;
            let count = match &best.count {
                Some(count) => {
                    at.check(count, rules::keep_best_count(count.get_ref().0))?;
                    narrow(count, at)?
                }
                None => 1,
            };
            Some(KeepBestSpec {
                metric: best.metric.into_inner(),
                mode: best.mode,
                count,
            })
        }
        None => None,
    };
    Ok(CheckpointSpec {
        dir,
        every_steps,
        every_seconds,
        keep_last,
        keep_best,
        asynchronous: raw.asynchronous.unwrap_or(true),
    })
}

/// An integer that a rule has already found within `0..=u64::MAX`, as a `u64`.
fn non_negative(value: i128) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

/// An integer that a rule has already bounded well within `i64`, as an `i64`.
fn bounded(value: i128) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// An integer that a rule has already bounded, as a `u32`; the error is
/// unreachable unless a rule's bounds are widened past `u32`.
fn narrow(value: &Spanned<Integer>, at: &Locator<'_>) -> Result<u32, SpecError> {
    u32::try_from(value.get_ref().0)
        .map_err(|_| at.invalid(value.span(), format!("{} is too large", value.get_ref().0)))
}

/// Resolves a path from the job file against the file's directory, made
/// absolute and lexically normalized (`.` and `..` removed). Nothing is
/// required to exist yet.
fn resolve(at: &Locator<'_>, value: &Spanned<String>, key: &str) -> Result<PathBuf, SpecError> {
    let base = at.file.parent().unwrap_or(Path::new(""));
    let joined = base.join(value.get_ref());
    let absolute = std::path::absolute(&joined).map_err(|e| {
        at.invalid(
            value.span(),
            format!("{key}: can not make {} absolute: {e}", joined.display()),
        )
    })?;
    Ok(normalize(&absolute))
}

/// Removes `.` and resolves `..` against the preceding component, without
/// looking at the file system (so through symlinks it may differ from what the
/// kernel would do, which is the usual trade for paths that need not exist).
pub(super) fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                // `..` at the root stays at the root, as the kernel does.
                if !matches!(out.components().next_back(), Some(Component::Normal(_))) {
                    if out.has_root() {
                        continue;
                    }
                    out.push("..");
                } else {
                    out.pop();
                }
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}
