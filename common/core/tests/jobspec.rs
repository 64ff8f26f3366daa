//! `job.toml` parsing and validation, seen from a user: the exact one-line
//! error for each kind of mistake, defaults, path resolution, the shipped
//! examples, and the JSON form receivers re-check. Dataset contents are not
//! read here (that is `dataset`'s job).

use std::path::{Path, PathBuf};

use ringmaster_common::jobspec::{
    Activation, Augment, CheckpointSpec, CollectiveBackend, CollectiveChoice, DEFAULT_CACHE_BYTES,
    DEFAULT_SHUFFLE_WINDOW_SHARDS, DataLoading, DataSpec, DeviceKind, Duration, FaultSpec,
    FloatFormat, JobSpec, KeepBestSpec, LrSchedule, MetricMode, ModelSpec, Norm, Optimizer,
    RegressionLoss, RnnSpec, ScheduleKind, SpanField, SpecError, TaskSpec,
};

/// A valid job; cases below edit it. Line numbers, for reading the expected
/// locations:
///  1 name            6 [data]          11 steps            16 max
///  2 seed            7 train           12 optimizer        17 [output]
///  3 [model]         8 validation      13 learning_rate    18 dir
///  4 kind            9 [train]         14 [workers]
///  5 hidden         10 batch_size      15 min
const BASE: &str = r#"name = "tiny"
seed = 1
[model]
kind = "mlp"
hidden = [16, 8]
[data]
train = "data/train"
validation = "data/val"
[train]
batch_size = 12
steps = 10
optimizer = "sgd"
learning_rate = 0.1
[workers]
min = 2
max = 4
[output]
dir = "out"
"#;

const JOB: &str = "/jobs/team/job.toml";

/// `BASE` with each `(from, to)` applied; `from` must occur exactly once, so
/// that a stale case fails instead of silently testing `BASE`.
#[track_caller]
fn edit(edits: &[(&str, &str)]) -> String {
    let mut source = BASE.to_owned();
    for (from, to) in edits {
        assert_eq!(source.matches(from).count(), 1, "{from:?} must occur once");
        source = source.replace(from, to);
    }
    source
}

#[track_caller]
fn parse(source: &str) -> JobSpec {
    match JobSpec::from_toml(source, Path::new(JOB)) {
        Ok(spec) => spec,
        Err(e) => panic!("expected a valid job, got: {e}"),
    }
}

#[track_caller]
fn check_err(source: &str, expected: &str) {
    match JobSpec::from_toml(source, Path::new("job.toml")) {
        Ok(spec) => panic!("expected `{expected}`, got a valid job: {spec:?}"),
        Err(e) => assert_eq!(e.to_string(), expected),
    }
}

#[test]
fn base_is_valid() {
    let spec = parse(BASE);
    assert_eq!(spec.name, "tiny");
    assert_eq!(spec.train.global_batch, 12);
    assert_eq!(spec.train.duration, Duration::Steps(10));
    assert_eq!((spec.workers.min, spec.workers.max), (2, 4));
    assert_eq!(spec.check(), Ok(()));
}

#[test]
fn unknown_keys_list_the_expected_ones() {
    check_err(
        &edit(&[("seed = 1", "seed = 1\nepoch = 3")]),
        "job.toml:3:1: unknown field `epoch`, expected one of `name`, `seed`, `task`, `model`, `data`, \
         `train`, `workers`, `output`, `checkpoint`, `fault`, `debug`",
    );
    check_err(
        &edit(&[("steps = 10", "steps = 10\nlr = 0.1")]),
        "job.toml:12:1: unknown field `lr`, expected one of `batch_size`, `epochs`, `steps`, \
         `optimizer`, `learning_rate`, `momentum`, `nesterov`, `betas`, `eps`, `weight_decay`, \
         `eval_every_steps`, `log_every_steps`, `lr_schedule`, `warmup_steps`, `lr_step_every`, \
             `lr_gamma`, `final_learning_rate`, `clip_grad_norm`, `micro_batches`, `l1`, \
             `early_stopping`, `precision`, `allreduce_dtype`",
    );
    check_err(
        &edit(&[("max = 4", "max = 4\ngpus = 2")]),
        "job.toml:17:1: unknown field `gpus`, expected one of `min`, `max`, `device`, `grow`, \
         `collective`",
    );
    check_err(
        &edit(&[("[output]", "[logging]\nlevel = 1\n[output]")]),
        "job.toml:17:2: unknown field `logging`, expected one of `name`, `seed`, `task`, `model`, \
         `data`, `train`, `workers`, `output`, `checkpoint`, `fault`, `debug`",
    );
}

#[test]
fn wrong_types() {
    check_err(
        &edit(&[("batch_size = 12", "batch_size = \"12\"")]),
        "job.toml:10:14: invalid type: string \"12\", expected an integer",
    );
    check_err(
        &edit(&[("batch_size = 12", "batch_size = 12.0")]),
        "job.toml:10:14: invalid type: floating point `12.0`, expected an integer",
    );
    check_err(
        &edit(&[("learning_rate = 0.1", "learning_rate = \"0.1\"")]),
        "job.toml:13:17: invalid type: string \"0.1\", expected a number",
    );
    check_err(
        &edit(&[
            ("seed = 1", "seed = 1\nworkers = 2"),
            ("[workers]\nmin = 2\nmax = 4\n", ""),
        ]),
        "job.toml:3:11: invalid type: integer `2`, expected a [workers] table",
    );
    check_err(
        &edit(&[("hidden = [16, 8]", "hidden = 16")]),
        "job.toml:5:10: invalid type: integer `16`, expected a sequence",
    );
}

#[test]
fn unknown_enum_values_list_the_alternatives() {
    check_err(
        &edit(&[("optimizer = \"sgd\"", "optimizer = \"rmsprop\"")]),
        "job.toml:12:13: unknown variant `rmsprop`, expected one of `sgd`, `adam`, `adamw`",
    );
    check_err(
        &edit(&[(
            "hidden = [16, 8]",
            "hidden = [16, 8]\nactivation = \"swish\"",
        )]),
        "job.toml:6:14: unknown variant `swish`, expected one of `relu`, `gelu`, `tanh`",
    );
    check_err(
        &edit(&[("max = 4", "max = 4\ndevice = \"tpu\"")]),
        "job.toml:17:10: unknown variant `tpu`, expected `cpu` or `cuda`",
    );
    check_err(
        &edit(&[("kind = \"mlp\"", "kind = \"resnet\"")]),
        "job.toml:4:8: unknown variant `resnet`, expected one of `mlp`, `cnn`, `lstm`, `gru`, `torchscript`, `transformer`",
    );
}

#[test]
fn missing_keys() {
    check_err(
        &edit(&[("learning_rate = 0.1\n", "")]),
        "job.toml:9:1: missing field `learning_rate`",
    );
    check_err(
        &edit(&[("name = \"tiny\"\n", "")]),
        "job.toml:1:1: missing field `name`",
    );
    check_err(
        &edit(&[("steps = 10\n", "")]),
        "job.toml:9:1: train needs one of `epochs` or `steps`",
    );
}

#[test]
fn toml_syntax_errors() {
    check_err(
        &edit(&[("name = \"tiny\"", "name = hello")]),
        "job.toml:1:8: string values must be quoted, expected literal string",
    );
    check_err(
        &edit(&[("seed = 1", "seed = 1\nseed = 2")]),
        "job.toml:3:1: duplicate key",
    );
}

#[test]
fn rules_between_keys() {
    check_err(
        &edit(&[("min = 2", "min = 8")]),
        "job.toml:15:7: workers.min (8) is greater than workers.max (4)",
    );
    check_err(
        &edit(&[("steps = 10", "steps = 10\nepochs = 3")]),
        "job.toml:11:9: train.epochs and train.steps are both set: give exactly one",
    );
    check_err(
        &edit(&[(
            "optimizer = \"sgd\"",
            "optimizer = \"adam\"\nmomentum = 0.9",
        )]),
        "job.toml:13:12: train.momentum only applies to optimizer \"sgd\", not \"adam\"",
    );
    check_err(
        &edit(&[(
            "optimizer = \"sgd\"",
            "optimizer = \"adamw\"\nnesterov = true",
        )]),
        "job.toml:13:12: train.nesterov only applies to optimizer \"sgd\", not \"adamw\"",
    );
    check_err(
        &edit(&[(
            "optimizer = \"sgd\"",
            "optimizer = \"sgd\"\nbetas = [0.9, 0.99]",
        )]),
        "job.toml:13:9: train.betas only applies to optimizers \"adam\" and \"adamw\", not \"sgd\"",
    );
    check_err(
        &edit(&[(
            "optimizer = \"sgd\"",
            "optimizer = \"sgd\"\nnesterov = true",
        )]),
        "job.toml:13:12: train.nesterov needs train.momentum > 0",
    );
    check_err(
        &edit(&[
            ("validation = \"data/val\"\n", ""),
            ("steps = 10", "steps = 10\neval_every_steps = 5"),
        ]),
        "job.toml:11:20: train.eval_every_steps needs data.validation",
    );
}

#[test]
fn global_batch_must_split_evenly_over_min_and_max() {
    check_err(
        &edit(&[("max = 4", "max = 5")]),
        "job.toml:10:14: train.batch_size 12 is not divisible by workers.max = 5: every rank \
         takes an equal share of the global batch",
    );
    check_err(
        &edit(&[("min = 2", "min = 5"), ("max = 4", "max = 6")]),
        "job.toml:10:14: train.batch_size 12 is not divisible by workers.min = 5: every rank \
         takes an equal share of the global batch",
    );
    // Sizes in between that do not divide (5 here) are skipped by the scheduler.
    let src = edit(&[("max = 4", "max = 6")]);
    assert!(JobSpec::from_toml(&src, Path::new("job.toml")).is_ok());
    check_err(
        &edit(&[("batch_size = 12", "batch_size = 3")]),
        "job.toml:10:14: train.batch_size 3 is smaller than workers.max = 4: every rank needs \
         at least one sample",
    );
}

#[test]
fn value_ranges() {
    check_err(
        &edit(&[("learning_rate = 0.1", "learning_rate = -0.1")]),
        "job.toml:13:17: train.learning_rate must be positive and finite, got -0.1",
    );
    check_err(
        &edit(&[("learning_rate = 0.1", "learning_rate = inf")]),
        "job.toml:13:17: train.learning_rate must be positive and finite, got inf",
    );
    check_err(
        &edit(&[("hidden = [16, 8]", "hidden = [16, 8]\ndropout = 1.0")]),
        "job.toml:6:11: model.dropout must be in [0, 1), got 1.0",
    );
    check_err(
        &edit(&[("hidden = [16, 8]", "hidden = [16, 0]")]),
        "job.toml:5:15: model.hidden[1] must be between 1 and 65536, got 0",
    );
    check_err(
        &edit(&[(
            "hidden = [16, 8]",
            &format!("hidden = [{}]", ["4"; 17].join(", ")),
        )]),
        "job.toml:5:10: model.hidden has 17 layers, at most 16 are allowed",
    );
    check_err(
        &edit(&[("batch_size = 12", "batch_size = 2_000_000")]),
        "job.toml:10:14: train.batch_size must be between 1 and 1048576, got 2000000",
    );
    check_err(
        &edit(&[("steps = 10", "steps = 0")]),
        "job.toml:11:9: train.steps must be at least 1, got 0",
    );
    check_err(
        &edit(&[("min = 2", "min = 0")]),
        "job.toml:15:7: workers.min must be between 1 and 1024, got 0",
    );
    check_err(
        &edit(&[("seed = 1", "seed = -1")]),
        "job.toml:2:8: seed must be an integer between 0 and 2^64-1 (18446744073709551615), \
         got -1",
    );
    check_err(
        &edit(&[(
            "optimizer = \"sgd\"",
            "optimizer = \"adam\"\nbetas = [0.9, 0.999, 0.5]",
        )]),
        "job.toml:13:9: train.betas must hold 2 values, got 3",
    );
    check_err(
        &edit(&[(
            "optimizer = \"sgd\"",
            "optimizer = \"adam\"\nbetas = [0.9, 1]",
        )]),
        "job.toml:13:15: train.betas[1] must be in [0, 1), got 1.0",
    );
    check_err(
        &edit(&[("dir = \"out\"", "dir = \"\"")]),
        "job.toml:18:7: output.dir must not be empty",
    );
}

/// TOML integers past `i64` (which the `toml` crate hands over as `u64`,
/// `i128` or `u128`) get the key's range, not serde's `invalid type: integer
/// ... as i128`.
#[test]
fn integers_past_i64_report_the_range() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "seed = 1",
            "seed = 1180591620717411303424",
            "job.toml:2:8: seed must be an integer between 0 and 2^64-1 (18446744073709551615), \
             got 1180591620717411303424",
        ),
        (
            "seed = 1",
            "seed = 18446744073709551616",
            "job.toml:2:8: seed must be an integer between 0 and 2^64-1 (18446744073709551615), \
             got 18446744073709551616",
        ),
        (
            "seed = 1",
            "seed = -1180591620717411303424",
            "job.toml:2:8: seed must be an integer between 0 and 2^64-1 (18446744073709551615), \
             got -1180591620717411303424",
        ),
        (
            "batch_size = 12",
            "batch_size = 1180591620717411303424",
            "job.toml:10:14: train.batch_size must be between 1 and 1048576, \
             got 1180591620717411303424",
        ),
        (
            "batch_size = 12",
            "batch_size = 9223372036854775808",
            "job.toml:10:14: train.batch_size must be between 1 and 1048576, \
             got 9223372036854775808",
        ),
        (
            "hidden = [16, 8]",
            "hidden = [16, 1180591620717411303424]",
            "job.toml:5:15: model.hidden[1] must be between 1 and 65536, \
             got 1180591620717411303424",
        ),
        (
            "steps = 10",
            "steps = 1180591620717411303424",
            "job.toml:11:9: train.steps must be between 1 and 9223372036854775807, \
             got 1180591620717411303424",
        ),
        (
            "min = 2",
            "min = -1180591620717411303424",
            "job.toml:15:7: workers.min must be between 1 and 1024, \
             got -1180591620717411303424",
        ),
        (
            "learning_rate = 0.1",
            "learning_rate = -1180591620717411303424",
            "job.toml:13:17: train.learning_rate must be positive and finite, \
             got -1.1805916207174113e21",
        ),
        // Past i128 no rule can print the value; it is still named.
        (
            "batch_size = 12",
            "batch_size = 170141183460469231731687303715884105728",
            "job.toml:10:14: invalid value: integer `170141183460469231731687303715884105728`, \
             expected an integer",
        ),
    ];
    for (from, to, expected) in cases {
        check_err(&edit(&[(from, to)]), expected);
    }
    check_err(
        &with_checkpoint("keep_last = 1180591620717411303424"),
        "job.toml:20:13: checkpoint.keep_last must be at most 4294967295, \
         got 1180591620717411303424",
    );
    check_err(
        &with_checkpoint("every_seconds = 9223372036854775808"),
        "job.toml:20:17: checkpoint.every_seconds must be between 1 and 9223372036854775807, \
         got 9223372036854775808",
    );
    // The whole u64 range is a valid seed.
    let spec = parse(&edit(&[("seed = 1", "seed = 18446744073709551615")]));
    assert_eq!(spec.seed, u64::MAX);
    assert_eq!(spec.check(), Ok(()));
}

/// `BASE` with a `[checkpoint]` table holding `body` appended: the table is
/// line 19, `body` starts on line 20.
fn with_checkpoint(body: &str) -> String {
    edit(&[(
        "dir = \"out\"\n",
        &format!("dir = \"out\"\n[checkpoint]\n{body}\n"),
    )])
}

#[test]
fn schedule_and_clipping_keys() {
    let spec = parse(&edit(&[(
        "learning_rate = 0.1",
        "learning_rate = 0.1\nlr_schedule = \"step\"\nlr_step_every = 30\nlr_gamma = 0.5\n\
         warmup_steps = 5\nclip_grad_norm = 2",
    )]));
    let s = &spec.train.schedule;
    assert_eq!(
        (s.kind, s.step_every, s.gamma, s.warmup_steps),
        (ScheduleKind::Step, Some(30), 0.5, 5)
    );
    assert_eq!(spec.train.clip_grad_norm, Some(2.0));
    assert_eq!(spec.train.learning_rate_at(40, 100), 0.05);
    let json = serde_json::to_string(&spec).unwrap();
    assert_eq!(serde_json::from_str::<JobSpec>(&json).unwrap(), spec);
    assert_eq!(
        serde_json::from_str::<JobSpec>(&json).unwrap().check(),
        Ok(())
    );
    // A job without the keys: constant rate, no clipping.
    let plain = parse(BASE);
    assert_eq!(plain.train.schedule, LrSchedule::default());
    assert_eq!(plain.train.clip_grad_norm, None);
    assert_eq!((plain.train.micro_batches, plain.train.l1), (1, 0.0));
    assert_eq!(plain.train.early_stopping, None);
    let es = parse(&edit(&[(
        "learning_rate = 0.1",
        "learning_rate = 0.1\neval_every_steps = 5\nmicro_batches = 4\nl1 = 0.001\n\
         early_stopping = { metric = \"val_macro_f1\", mode = \"max\", patience = 3 }",
    )]))
    .train;
    assert_eq!((es.micro_batches, es.l1), (4, 0.001));
    let stop = es.early_stopping.unwrap();
    assert_eq!(
        (stop.metric.as_str(), stop.patience, stop.min_delta),
        ("val_macro_f1", 3, 0.0)
    );

    let cases: &[(&str, &str)] = &[
        (
            "lr_schedule = \"step\"",
            "job.toml:14:15: lr_schedule = \"step\" needs train.lr_step_every (steps between decays)",
        ),
        (
            "lr_schedule = \"cosine\"\nlr_gamma = 0.5",
            "job.toml:15:12: train.lr_gamma applies to lr_schedule = \"step\", not \"cosine\"",
        ),
        (
            "final_learning_rate = 0.01",
            "job.toml:14:23: train.final_learning_rate applies to lr_schedule = \"linear\" or \
             \"cosine\", not \"constant\"",
        ),
        (
            "lr_schedule = \"linear\"\nlr_step_every = 3",
            "job.toml:15:17: train.lr_step_every applies to lr_schedule = \"step\", not \"linear\"",
        ),
        (
            "lr_schedule = \"exponential\"",
            "job.toml:14:15: unknown variant `exponential`, expected one of `constant`, `step`, \
             `linear`, `cosine`",
        ),
        (
            "warmup_steps = -1",
            "job.toml:14:16: train.warmup_steps must be between 0 and 1099511627776, got -1",
        ),
        (
            "clip_grad_norm = 0",
            "job.toml:14:18: train.clip_grad_norm must be positive and finite, got 0.0",
        ),
        (
            "micro_batches = 0",
            "job.toml:14:17: train.micro_batches must be between 1 and 1048576, got 0",
        ),
        (
            "l1 = -0.1",
            "job.toml:14:6: train.l1 must be non-negative and finite, got -0.1",
        ),
        (
            "early_stopping = { metric = \"val_loss\", mode = \"min\", patience = 3 }",
            "job.toml:14:29: train.early_stopping needs data.validation and \
             train.eval_every_steps",
        ),
        (
            "eval_every_steps = 5\nearly_stopping = { metric = \"loss\", mode = \"min\", \
             patience = 3 }",
            "job.toml:15:29: train.early_stopping.metric \"loss\" must be a validation score \
             (val_loss, val_accuracy, val_macro_f1, val_mse, val_mae, val_r2, val_perplexity)",
        ),
        (
            "eval_every_steps = 5\nearly_stopping = { metric = \"val_loss\", mode = \"min\", \
             patience = 0 }",
            "job.toml:15:66: train.early_stopping.patience must be between 1 and 1048576, got 0",
        ),
    ];
    for (lines, expected) in cases {
        let source = edit(&[(
            "learning_rate = 0.1",
            &format!("learning_rate = 0.1\n{lines}"),
        )]);
        check_err(&source, expected);
    }
}

#[test]
fn cnn_keys() {
    let cnn = |lines: &str| edit(&[("kind = \"mlp\"\nhidden = [16, 8]", lines)]);
    let spec = parse(&cnn(
        "kind = \"cnn\"\ninput_shape = [3, 32, 32]\nchannels = [12, 24, 48]",
    ));
    assert_eq!(
        spec.model,
        ModelSpec::Cnn {
            input_shape: [3, 32, 32],
            channels: vec![12, 24, 48],
            kernel: 3,
            pool: 2,
            norm: Norm::Group,
            // The largest of 8, 4, 2, 1 dividing every count.
            groups: 4,
            activation: Activation::Relu,
            dropout: 0.0,
            augment: Augment::default(),
        }
    );
    let json = serde_json::to_string(&spec).unwrap();
    assert_eq!(
        serde_json::from_str::<JobSpec>(&json).unwrap().check(),
        Ok(())
    );
    let batch = parse(&cnn(
        "kind = \"cnn\"\ninput_shape = [1, 8, 8]\nchannels = [6]\nnorm = \"batch\"",
    ));
    let ModelSpec::Cnn { norm, .. } = &batch.model else {
        panic!("{:?}", batch.model)
    };
    assert_eq!(*norm, Norm::Batch);
    assert_eq!(batch.check(), Ok(()));

    let cases: &[(&str, &str)] = &[
        (
            "kind = \"cnn\"\nchannels = [8]",
            "job.toml:4:8: model.kind = \"cnn\" needs model.input_shape (e.g. [1, 8, 8])",
        ),
        (
            "kind = \"cnn\"\ninput_shape = [8, 8]\nchannels = [8]",
            "job.toml:5:15: model.input_shape must be [channels, height, width], got 2 values",
        ),
        (
            "kind = \"cnn\"\ninput_shape = [1, 8, 8]\nchannels = [8]\nhidden = [4]",
            "job.toml:7:10: model.hidden does not apply to model.kind = \"cnn\"",
        ),
        (
            "kind = \"mlp\"\nhidden = [4]\nchannels = [8]",
            "job.toml:6:12: model.channels does not apply to model.kind = \"mlp\"",
        ),
        (
            "kind = \"mlp\"",
            "job.toml:4:8: model.kind = \"mlp\" needs model.hidden (the hidden layer widths, \
             e.g. [128, 64])",
        ),
        (
            "kind = \"cnn\"\ninput_shape = [1, 8, 8]\nchannels = [8]\n\
             augment = { crop_padding = 65 }",
            "job.toml:7:28: model.augment.crop_padding must be between 0 and 64, got 65",
        ),
        (
            "kind = \"cnn\"\ninput_shape = [1, 8, 8]\nchannels = [8]\n\
             augment = { crop_padding = 8 }",
            "job.toml:5:15: model.augment.crop_padding = 8 must be smaller than the image's \
             height and width ([1, 8, 8]): the border is mirrored",
        ),
        (
            "kind = \"mlp\"\nhidden = [4]\naugment = { horizontal_flip = true }",
            "job.toml:6:11: model.augment does not apply to model.kind = \"mlp\"",
        ),
        (
            "kind = \"cnn\"\ninput_shape = [1, 8, 8]\nchannels = [8]\nkernel = 4",
            "job.toml:7:10: model.kernel must be odd, 1 to 15, got 4",
        ),
        (
            "kind = \"cnn\"\ninput_shape = [1, 8, 8]\nchannels = [8, 8, 8, 8]",
            "job.toml:5:15: model.input_shape [1, 8, 8] is too small for 4 pools of 2: the \
             sides would reach 0 (lower model.pool or use fewer blocks)",
        ),
        (
            "kind = \"cnn\"\ninput_shape = [1, 8, 8]\nchannels = [6]\ngroups = 4",
            "job.toml:7:10: model.groups = 4 must divide every channel count, and 6 is not a \
             multiple",
        ),
        (
            "kind = \"cnn\"\ninput_shape = [1, 8, 8]\nchannels = [8]\nnorm = \"batch\"\ngroups = 2",
            "job.toml:8:10: model.groups applies to model.norm = \"group\"",
        ),
    ];
    for (lines, expected) in cases {
        check_err(&cnn(lines), expected);
    }
}

#[test]
fn data_reading_keys() {
    let spec = parse(&edit(&[(
        "validation = \"data/val\"",
        "validation = \"data/val\"\nshuffle_window_shards = 4\ncache_bytes = \"64 MiB\"\n\
         loading = \"stream\"",
    )]));
    assert_eq!(spec.data.shuffle_window_shards, 4);
    assert_eq!(spec.data.cache_bytes, 64 << 20);
    assert_eq!(spec.data.loading, DataLoading::Stream);
    let spec = parse(&edit(&[(
        "validation = \"data/val\"",
        "validation = \"data/val\"\ncache_bytes = 2097152\nshuffle_window_shards = 0",
    )]));
    assert_eq!(
        (spec.data.cache_bytes, spec.data.shuffle_window_shards),
        (2 << 20, 0)
    );
    // Both spellings survive the JSON form receivers re-check.
    let json = serde_json::to_string(&spec).unwrap();
    assert_eq!(serde_json::from_str::<JobSpec>(&json).unwrap(), spec);

    let cases: &[(&str, &str)] = &[
        (
            "cache_bytes = \"lots\"",
            "job.toml:9:15: data.cache_bytes: cannot read \"lots\" as a size; write bytes \
             (536870912) or a number with a unit (\"512 MiB\", \"2 GiB\")",
        ),
        (
            "cache_bytes = 1000",
            "job.toml:9:15: data.cache_bytes must be between 1 MiB and 1 TiB (1048576 to \
             1099511627776 bytes), got 1000",
        ),
        (
            "cache_bytes = true",
            "job.toml:9:15: data.cache_bytes must be a number of bytes or a size such as \"512 MiB\"",
        ),
        (
            "shuffle_window_shards = -1",
            "job.toml:9:25: data.shuffle_window_shards must be between 0 and 1048576, got -1",
        ),
        (
            "loading = \"lazy\"",
            "job.toml:9:11: unknown variant `lazy`, expected one of `auto`, `memory`, `stream`",
        ),
    ];
    for (line, expected) in cases {
        let source = edit(&[(
            "validation = \"data/val\"",
            &format!("validation = \"data/val\"\n{line}"),
        )]);
        check_err(&source, expected);
    }
}

#[test]
fn checkpoint_errors() {
    let cases: &[(&str, &str)] = &[
        (
            "every_step = 100",
            "job.toml:20:1: unknown field `every_step`, expected one of `dir`, `every_steps`, \
             `every_seconds`, `keep_last`, `keep_best`, `async`",
        ),
        (
            "keep_best = { metric = \"val_loss\", mode = \"min\", top = 2 }",
            "job.toml:20:50: unknown field `top`, expected one of `metric`, `mode`, `count`",
        ),
        (
            "keep_best = { metric = \"val_loss\", mode = \"lowest\" }",
            "job.toml:20:43: unknown variant `lowest`, expected `min` or `max`",
        ),
        (
            "keep_best = { mode = \"max\" }",
            "job.toml:20:13: missing field `metric`",
        ),
        (
            "every_steps = 0",
            "job.toml:20:15: checkpoint.every_steps must be at least 1, got 0",
        ),
        (
            "every_seconds = -5",
            "job.toml:20:17: checkpoint.every_seconds must be at least 1, got -5",
        ),
        (
            "keep_last = 0",
            "job.toml:20:13: checkpoint.keep_last must be at least 1, got 0",
        ),
        (
            "keep_last = 5_000_000_000",
            "job.toml:20:13: checkpoint.keep_last must be at most 4294967295, got 5000000000",
        ),
        (
            "keep_best = { metric = \"val_loss\", mode = \"min\", count = 0 }",
            "job.toml:20:58: checkpoint.keep_best.count must be at least 1, got 0",
        ),
        (
            "keep_best = { metric = \"val_f1\", mode = \"max\" }",
            "job.toml:20:24: checkpoint.keep_best.metric \"val_f1\" is not reported by the \
             trainer, expected one of `loss`, `val_loss`, `val_accuracy`, `val_macro_f1`, `val_mse`, `val_mae`, `val_r2`, `val_perplexity`",
        ),
        (
            "keep_best = { metric = \"Val-Acc\", mode = \"max\" }",
            "job.toml:20:24: checkpoint.keep_best.metric \"Val-Acc\" must be 1 or more \
             characters of a-z, 0-9 and '_'",
        ),
        (
            "keep_best = { metric = \"\", mode = \"max\" }",
            "job.toml:20:24: checkpoint.keep_best.metric \"\" must be 1 or more characters of \
             a-z, 0-9 and '_'",
        ),
        (
            "dir = \"\"",
            "job.toml:20:7: checkpoint.dir must not be empty",
        ),
        (
            "async = \"yes\"",
            "job.toml:20:9: invalid type: string \"yes\", expected a boolean",
        ),
    ];
    for (body, expected) in cases {
        check_err(&with_checkpoint(body), expected);
    }

    // A validation metric needs a validation set; `loss` does not.
    let no_validation =
        |body: &str| with_checkpoint(body).replace("validation = \"data/val\"\n", "");
    check_err(
        &no_validation("keep_best = { metric = \"val_accuracy\", mode = \"max\" }"),
        "job.toml:19:24: checkpoint.keep_best.metric \"val_accuracy\" needs data.validation",
    );
    let spec = parse(&no_validation(
        "keep_best = { metric = \"loss\", mode = \"min\" }",
    ));
    assert_eq!(
        spec.checkpoint.keep_best,
        Some(KeepBestSpec {
            metric: "loss".into(),
            mode: MetricMode::Min,
            count: 1
        })
    );

    check_err(
        &edit(&[("steps = 10", "steps = 10\nlog_every_steps = 0")]),
        "job.toml:12:19: train.log_every_steps must be at least 1, got 0",
    );
    // Not a table at all.
    check_err(
        &edit(&[("seed = 1", "seed = 1\ncheckpoint = 5")]),
        "job.toml:3:14: invalid type: integer `5`, expected a [checkpoint] table",
    );
}

#[test]
fn full_checkpoint_table() {
    let spec = parse(&with_checkpoint(
        "dir = \"../ckpt/./tiny\"\nevery_steps = 100\nevery_seconds = 600\nkeep_last = 3\n\
         keep_best = { metric = \"val_accuracy\", mode = \"max\", count = 2 }\nasync = false",
    ));
    assert_eq!(
        spec.checkpoint,
        CheckpointSpec {
            dir: PathBuf::from("/jobs/ckpt/tiny"),
            every_steps: Some(100),
            every_seconds: Some(600),
            keep_last: Some(3),
            keep_best: Some(KeepBestSpec {
                metric: "val_accuracy".into(),
                mode: MetricMode::Max,
                count: 2
            }),
            asynchronous: false,
        }
    );
    assert_eq!(spec.check(), Ok(()));
    let back: JobSpec = serde_json::from_str(&serde_json::to_string(&spec).unwrap()).unwrap();
    assert_eq!(back, spec);

    // A [checkpoint.keep_best] sub-table works too, and an absolute dir is kept.
    let spec = parse(&with_checkpoint(
        "dir = \"/var/ckpt\"\n[checkpoint.keep_best]\nmetric = \"val_loss\"\nmode = \"min\"",
    ));
    assert_eq!(spec.checkpoint.dir, PathBuf::from("/var/ckpt"));
    assert_eq!(spec.checkpoint.keep_best.unwrap().mode, MetricMode::Min);
    assert!(spec.checkpoint.asynchronous);

    let spec = parse(&edit(&[("steps = 10", "steps = 10\nlog_every_steps = 1")]));
    assert_eq!(spec.train.log_every_steps, 1);
}

#[test]
fn bad_names() {
    check_err(
        &edit(&[("name = \"tiny\"", "name = \"Tiny_Net\"")]),
        "job.toml:1:8: name \"Tiny_Net\" must be 1 to 63 characters of a-z, 0-9 and '-', \
         starting with a letter or digit",
    );
    check_err(
        &edit(&[("name = \"tiny\"", "name = \"-tiny\"")]),
        "job.toml:1:8: name \"-tiny\" must be 1 to 63 characters of a-z, 0-9 and '-', \
         starting with a letter or digit",
    );
    let long = "a".repeat(64);
    check_err(
        &edit(&[("name = \"tiny\"", &format!("name = \"{long}\""))]),
        &format!(
            "job.toml:1:8: name \"{long}\" must be 1 to 63 characters of a-z, 0-9 and '-', \
             starting with a letter or digit"
        ),
    );
    assert_eq!(
        parse(&edit(&[(
            "name = \"tiny\"",
            &format!("name = \"{}\"", "0-a".repeat(21))
        )]))
        .name,
        "0-a".repeat(21)
    );
}

#[test]
fn columns_count_characters_not_bytes() {
    // "dätä/träin" is 10 characters but 13 bytes: `""` starts at character 45.
    check_err(
        &edit(&[
            (
                "seed = 1",
                "seed = 1\ndata = { train = \"dätä/träin\", validation = \"\" }",
            ),
            (
                "[data]\ntrain = \"data/train\"\nvalidation = \"data/val\"\n",
                "",
            ),
        ]),
        "job.toml:3:45: data.validation must not be empty",
    );
}

#[test]
fn error_kinds() {
    let kind = |source: &str| match JobSpec::from_toml(source, Path::new("job.toml")) {
        Err(SpecError::NotToml { .. }) => "not toml",
        Err(SpecError::SchemaMismatch { .. }) => "schema",
        Err(SpecError::InvalidValue { .. }) => "invalid",
        Err(SpecError::TooLarge { .. }) => "too large",
        Ok(_) => "ok",
    };
    assert_eq!(kind("name = "), "not toml");
    assert_eq!(kind(&edit(&[("seed = 1", "sead = 1")])), "schema");
    assert_eq!(kind(&edit(&[("seed = 1", "seed = -1")])), "invalid");
    assert_eq!(kind(BASE), "ok");
    let huge = format!("{BASE}#{}\n", " ".repeat(1 << 20));
    assert!(matches!(
        JobSpec::from_toml(&huge, Path::new("job.toml")),
        Err(SpecError::TooLarge { .. })
    ));
    check_err(
        &huge,
        &format!(
            "job.toml:1:1: job file is {} bytes, at most 1048576 are allowed",
            huge.len()
        ),
    );

    let err = JobSpec::from_toml(&edit(&[("seed = 1", "seed = -1")]), Path::new("a/job.toml"))
        .unwrap_err();
    assert_eq!(
        (err.location().line, err.location().column),
        (2, 8),
        "{err}"
    );
    assert_eq!(err.location().file, Path::new("a/job.toml"));
    assert_eq!(
        err.message(),
        "seed must be an integer between 0 and 2^64-1 (18446744073709551615), got -1"
    );
}

#[test]
fn defaults() {
    let source = r#"name = "d"
model = { kind = "mlp", hidden = [] }
data = { train = "t" }
train = { batch_size = 1, epochs = 2, learning_rate = 1 }
output = { dir = "o" }
"#;
    let spec = parse(source);
    assert_eq!(spec.seed, 0);
    assert_eq!(
        spec.model,
        ModelSpec::Mlp {
            hidden: vec![],
            activation: Activation::Relu,
            dropout: 0.0
        }
    );
    assert_eq!(spec.data.validation, None);
    assert_eq!(spec.train.duration, Duration::Epochs(2));
    // An integer where a float is expected is fine.
    assert_eq!(spec.train.learning_rate, 1.0);
    assert_eq!(spec.train.weight_decay, 0.0);
    assert_eq!(spec.train.eval_every_steps, None);
    assert_eq!(spec.train.log_every_steps, 10);
    // No [checkpoint] table: under the output directory, written in the
    // background, no trigger and nothing pruned.
    assert_eq!(
        spec.checkpoint,
        CheckpointSpec {
            dir: PathBuf::from("/jobs/team/o/checkpoints"),
            every_steps: None,
            every_seconds: None,
            keep_last: None,
            keep_best: None,
            asynchronous: true,
        }
    );
    // An empty table is the same as none.
    let empty = parse(&format!("{source}[checkpoint]\n"));
    assert_eq!(empty.checkpoint, spec.checkpoint);
    assert_eq!(
        spec.train.optimizer,
        Optimizer::Sgd {
            momentum: 0.0,
            nesterov: false
        }
    );
    assert_eq!(
        (spec.workers.min, spec.workers.max, spec.workers.device),
        (1, 1, DeviceKind::Cpu)
    );

    let adam = parse(&source.replace("epochs = 2", "epochs = 2, optimizer = \"adam\""));
    assert_eq!(
        adam.train.optimizer,
        Optimizer::Adam {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8
        }
    );
    // `max` defaults to `min`.
    let three = parse(
        &source
            .replace("output =", "workers = { min = 3 }\noutput =")
            .replace("batch_size = 1", "batch_size = 3"),
    );
    assert_eq!((three.workers.min, three.workers.max), (3, 3));
}

#[test]
fn paths_resolve_against_the_job_file_directory() {
    let spec = parse(&edit(&[
        (
            "train = \"data/train\"",
            "train = \"../shared/./data/../digits\"",
        ),
        ("validation = \"data/val\"", "validation = \"/abs/val/\""),
    ]));
    assert_eq!(
        spec.data,
        DataSpec {
            train: PathBuf::from("/jobs/shared/digits"),
            validation: Some(PathBuf::from("/abs/val")),
            shuffle_window_shards: DEFAULT_SHUFFLE_WINDOW_SHARDS,
            cache_bytes: DEFAULT_CACHE_BYTES,
            loading: DataLoading::Auto,
        }
    );
    assert_eq!(spec.output.dir, PathBuf::from("/jobs/team/out"));

    // `..` past the root stays at the root, as the kernel has it.
    let spec = parse(&edit(&[("dir = \"out\"", "dir = \"../../../../x\"")]));
    assert_eq!(spec.output.dir, PathBuf::from("/x"));

    // A job file named relative to the working directory.
    let spec = JobSpec::from_toml(BASE, Path::new("jobs/job.toml")).unwrap();
    let cwd = std::env::current_dir().unwrap();
    assert_eq!(spec.data.train, cwd.join("jobs/data/train"));
    let spec = JobSpec::from_toml(BASE, Path::new("job.toml")).unwrap();
    assert_eq!(spec.output.dir, cwd.join("out"));
}

#[test]
fn spans_locate_caller_checks() {
    let (spec, spans) = JobSpec::from_toml_with_spans(BASE, Path::new(JOB)).unwrap();
    let missing = format!("no MANIFEST.json in {}", spec.data.train.display());
    assert_eq!(
        spans.error_at(SpanField::DataTrain, missing).to_string(),
        "/jobs/team/job.toml:7:9: data.train: no MANIFEST.json in /jobs/team/data/train"
    );
    let at = |field| {
        let l = spans.location(field);
        (l.line, l.column)
    };
    assert_eq!(at(SpanField::DataValidation), (8, 14));
    assert_eq!(at(SpanField::TrainBatchSize), (10, 14));
    assert_eq!(at(SpanField::ModelHidden), (5, 10));
    assert_eq!(
        spans
            .error_at(SpanField::DataValidation, "64 features, data.train has 32")
            .to_string(),
        "/jobs/team/job.toml:8:14: data.validation: 64 features, data.train has 32"
    );

    // Without a validation set, its errors point at the [data] table.
    let (_, spans) = JobSpec::from_toml_with_spans(
        &edit(&[("validation = \"data/val\"\n", "")]),
        Path::new("job.toml"),
    )
    .unwrap();
    assert_eq!(spans.location(SpanField::DataValidation).line, 6);
    assert_eq!(spans.location(SpanField::DataValidation).column, 1);
}

#[test]
fn step_counts() {
    let steps = parse(BASE);
    assert_eq!(steps.steps_per_epoch(100), 9); // ceil(100 / 12)
    assert_eq!(steps.total_steps(100), 10); // `steps = 10` whatever the data
    assert_eq!(steps.total_steps(0), 10);

    let epochs = parse(&edit(&[("steps = 10", "epochs = 30")]));
    assert_eq!(epochs.steps_per_epoch(96), 8);
    assert_eq!(epochs.steps_per_epoch(97), 9);
    assert_eq!(epochs.total_steps(97), 270);
    assert_eq!(epochs.total_steps(0), 0);
}

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples")
}

#[track_caller]
fn example(name: &str) -> JobSpec {
    let path = examples_dir().join(name);
    let source = std::fs::read_to_string(&path).unwrap();
    match JobSpec::from_toml(&source, &path) {
        Ok(spec) => spec,
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn examples_parse() {
    // The repository root: examples/ resolves `../run/...` to `<root>/run/...`.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .unwrap();

    let digits = example("digits-mlp.toml");
    assert_eq!(digits.check(), Ok(()));
    assert_eq!(digits.name, "digits-mlp");
    assert_eq!(digits.seed, 42);
    assert_eq!(digits.data.train, root.join("run/data/digits/train"));
    assert_eq!(
        digits.data.validation,
        Some(root.join("run/data/digits/val"))
    );
    assert_eq!(digits.output.dir, root.join("run/out/digits-mlp"));
    assert_eq!((digits.workers.min, digits.workers.max), (2, 2));
    assert_eq!(digits.train.global_batch, 64);
    assert_eq!(digits.train.duration, Duration::Epochs(30));
    assert_eq!(digits.train.eval_every_steps, Some(50));
    assert!(matches!(digits.train.optimizer, Optimizer::Adam { .. }));
    let ModelSpec::Mlp { hidden, .. } = &digits.model else {
        panic!("an mlp")
    };
    assert_eq!(hidden, &[128, 64]);

    let cnn = example("digits-cnn.toml");
    assert_eq!(cnn.check(), Ok(()));
    assert_eq!(
        cnn.model,
        ModelSpec::Cnn {
            input_shape: [1, 8, 8],
            channels: vec![32, 64],
            kernel: 3,
            pool: 2,
            norm: Norm::Group,
            groups: 8,
            activation: Activation::Relu,
            dropout: 0.1,
            augment: Augment::default(),
        }
    );
    assert_eq!(cnn.data, digits.data);

    let script = example("torchscript/job.toml");
    assert_eq!(script.check(), Ok(()));
    let ModelSpec::Torchscript { path, input_shape } = &script.model else {
        panic!("{:?}", script.model);
    };
    // Resolved against the job file's own folder, one level deeper than the others.
    assert!(
        path.ends_with("run/torchscript/model.pt"),
        "{}",
        path.display()
    );
    assert_eq!(
        path.parent().unwrap().parent(),
        digits
            .data
            .train
            .parent()
            .unwrap()
            .parent()
            .unwrap()
            .parent()
    );
    assert_eq!(input_shape.as_deref(), Some(&[1u32, 8, 8][..]));
    assert_eq!(script.data, digits.data);

    let sgd = example("digits-mlp-sgd.toml");
    assert_eq!(sgd.check(), Ok(()));
    assert_eq!((sgd.workers.min, sgd.workers.max), (1, 2));
    assert_eq!(
        sgd.train.optimizer,
        Optimizer::Sgd {
            momentum: 0.9,
            nesterov: false
        }
    );
    assert_eq!(sgd.data, digits.data);

    assert_eq!(digits.train.log_every_steps, 10);
    assert_eq!(
        digits.checkpoint.dir,
        root.join("run/out/digits-mlp/checkpoints")
    );
    assert_eq!(digits.checkpoint.every_steps, None);

    let ckpt = example("digits-mlp-checkpoint.toml");
    assert_eq!(ckpt.check(), Ok(()));
    assert_eq!(ckpt.name, "digits-mlp-checkpoint");
    assert_eq!(ckpt.data, digits.data);
    let ModelSpec::Mlp { dropout, .. } = &ckpt.model else {
        panic!("an mlp")
    };
    assert_eq!(*dropout, 0.1);
    assert_eq!(
        ckpt.checkpoint,
        CheckpointSpec {
            dir: root.join("run/out/digits-mlp-checkpoint/checkpoints"),
            every_steps: Some(100),
            every_seconds: None,
            keep_last: Some(2),
            keep_best: Some(KeepBestSpec {
                metric: "val_accuracy".into(),
                mode: MetricMode::Max,
                count: 1
            }),
            asynchronous: true,
        }
    );

    let synthetic = example("synthetic-mlp.toml");
    assert_eq!(synthetic.check(), Ok(()));
    assert_eq!(synthetic.data.train, root.join("run/data/synthetic/train"));
    assert_eq!(synthetic.data.validation, None);
    assert_eq!(synthetic.train.global_batch, 128);
    assert_eq!(synthetic.train.duration, Duration::Steps(200));
    assert_eq!((synthetic.workers.min, synthetic.workers.max), (2, 2));
    let ModelSpec::Mlp { hidden, .. } = &synthetic.model else {
        panic!("an mlp")
    };
    assert_eq!(hidden, &[1024, 1024]);

    let diabetes = example("diabetes-mlp.toml");
    assert_eq!(diabetes.check(), Ok(()));
    assert_eq!(
        diabetes.task,
        TaskSpec::Regression {
            loss: RegressionLoss::Mse
        }
    );
    assert_eq!(diabetes.data.train, root.join("run/data/diabetes/train"));
    assert_eq!(
        diabetes.data.validation,
        Some(root.join("run/data/diabetes/val"))
    );
    assert_eq!(diabetes.output.dir, root.join("run/out/diabetes-mlp"));
    // Every other example is classification, by default.
    assert_eq!(digits.task, TaskSpec::default());
}

#[test]
fn json_round_trip_and_recheck() {
    for name in [
        "digits-mlp.toml",
        "digits-mlp-sgd.toml",
        "digits-mlp-checkpoint.toml",
        "synthetic-mlp.toml",
        "diabetes-mlp.toml",
    ] {
        let spec = example(name);
        let json = serde_json::to_string(&spec).unwrap();
        let back: JobSpec = serde_json::from_str(&json).unwrap();
        assert_eq!(back, spec, "{name}");
        assert_eq!(back.check(), Ok(()), "{name}");
    }
}

/// Receivers compare and re-train from the JSON form, so floats must survive
/// it bit for bit, not only the short ones people type.
#[test]
fn json_keeps_every_float_bit() {
    let spec = parse(&edit(&[
        (
            "learning_rate = 0.1",
            "learning_rate = 0.00039430133835633677",
        ),
        (
            "optimizer = \"sgd\"",
            "optimizer = \"sgd\"\nmomentum = 0.8999999999999999",
        ),
    ]));
    let back: JobSpec = serde_json::from_str(&serde_json::to_string(&spec).unwrap()).unwrap();
    assert_eq!(
        back.train.learning_rate.to_bits(),
        0.00039430133835633677_f64.to_bits()
    );
    assert_eq!(back, spec);
}

#[test]
fn check_refuses_what_the_parser_refuses() {
    let good = parse(BASE);
    let check = |change: &dyn Fn(&mut JobSpec)| {
        let mut spec = good.clone();
        change(&mut spec);
        spec.check().unwrap_err()
    };
    assert_eq!(
        check(&|s| s.data.train = PathBuf::from("rel/train")),
        "data.train must be an absolute path, got \"rel/train\""
    );
    assert_eq!(
        check(&|s| s.workers.min = 5),
        "workers.min (5) is greater than workers.max (4)"
    );
    assert_eq!(
        check(&|s| s.train.global_batch = 10),
        "train.batch_size 10 is not divisible by workers.max = 4: every rank takes an equal \
         share of the global batch"
    );
    assert_eq!(
        check(&|s| s.train.duration = Duration::Epochs(0)),
        "train.epochs must be at least 1, got 0"
    );
    assert_eq!(
        check(&|s| s.name = "Bad".into()),
        "name \"Bad\" must be 1 to 63 characters of a-z, 0-9 and '-', starting with a letter \
         or digit"
    );
    assert_eq!(
        check(&|s| {
            s.train.optimizer = Optimizer::AdamW {
                beta1: 0.9,
                beta2: 0.999,
                eps: 0.0,
            }
        }),
        "train.eps must be positive and finite, got 0.0"
    );
    assert_eq!(
        check(&|s| {
            s.data.validation = None;
            s.train.eval_every_steps = Some(5);
        }),
        "train.eval_every_steps needs data.validation"
    );
    assert_eq!(
        check(&|s| s.train.log_every_steps = 0),
        "train.log_every_steps must be at least 1, got 0"
    );
    assert_eq!(
        check(&|s| s.checkpoint.dir = PathBuf::from("ckpt")),
        "checkpoint.dir must be an absolute path, got \"ckpt\""
    );
    assert_eq!(
        check(&|s| s.checkpoint.every_steps = Some(0)),
        "checkpoint.every_steps must be at least 1, got 0"
    );
    assert_eq!(
        check(&|s| s.checkpoint.every_seconds = Some(0)),
        "checkpoint.every_seconds must be at least 1, got 0"
    );
    assert_eq!(
        check(&|s| s.checkpoint.keep_last = Some(0)),
        "checkpoint.keep_last must be at least 1, got 0"
    );
    let best = |metric: &str, count| {
        Some(KeepBestSpec {
            metric: metric.into(),
            mode: MetricMode::Max,
            count,
        })
    };
    assert_eq!(
        check(&|s| s.checkpoint.keep_best = best("val_accuracy", 0)),
        "checkpoint.keep_best.count must be at least 1, got 0"
    );
    assert_eq!(
        check(&|s| s.checkpoint.keep_best = best("accuracy", 1)),
        "checkpoint.keep_best.metric \"accuracy\" is not reported by the trainer, expected one \
         of `loss`, `val_loss`, `val_accuracy`, `val_macro_f1`, `val_mse`, `val_mae`, `val_r2`, `val_perplexity`"
    );
    assert_eq!(
        check(&|s| {
            s.data.validation = None;
            s.checkpoint.keep_best = best("val_loss", 1);
        }),
        "checkpoint.keep_best.metric \"val_loss\" needs data.validation"
    );
}

/// `BASE` with a `[fault]` table holding `body` appended: the table is line
/// 19, `body` starts on line 20.
fn with_fault(body: &str) -> String {
    edit(&[(
        "dir = \"out\"\n",
        &format!("dir = \"out\"\n[fault]\n{body}\n"),
    )])
}

#[test]
fn fault_table_defaults_values_and_errors() {
    let base = parse(&edit(&[]));
    assert_eq!(
        base.fault,
        FaultSpec {
            max_restarts: 10,
            rejoin_timeout_secs: 300,
            hang_timeout_secs: 60,
            quarantine_after: 3,
            quarantine_cooldown_secs: 600,
            collective_timeout_secs: 60,
        }
    );
    assert!(!base.debug.audit_samples);
    let set = parse(&with_fault(
        "max_restarts = 0\nrejoin_timeout_secs = 30\nhang_timeout_secs = 5\n\
         quarantine_after = 0\nquarantine_cooldown_secs = 90",
    ));
    assert_eq!(set.fault.quarantine_after, 0);
    assert_eq!(set.fault.quarantine_cooldown_secs, 90);
    assert_eq!(set.fault.max_restarts, 0);
    assert_eq!(set.fault.rejoin_timeout_secs, 30);
    assert_eq!(set.fault.hang_timeout_secs, 5);
    assert_eq!(set.check(), Ok(()));
    check_err(
        &with_fault("max_restarts = -1"),
        "job.toml:20:16: fault.max_restarts must be between 0 and 10000, got -1",
    );
    check_err(
        &with_fault("hang_timeout_secs = 0"),
        "job.toml:20:21: fault.hang_timeout_secs must be between 1 and 86400, got 0",
    );
    check_err(
        &with_fault("rejoin_timeout_secs = 0"),
        "job.toml:20:23: fault.rejoin_timeout_secs must be between 1 and 604800, got 0",
    );
    check_err(
        &with_fault("restarts = 3"),
        "job.toml:20:1: unknown field `restarts`, expected one of `max_restarts`, \
         `rejoin_timeout_secs`, `hang_timeout_secs`, `quarantine_after`, \
         `quarantine_cooldown_secs`, `collective_timeout_secs`",
    );
    check_err(
        &with_fault("quarantine_cooldown_secs = 0"),
        "job.toml:20:28: fault.quarantine_cooldown_secs must be between 1 and 604800, got 0",
    );
    check_err(
        &with_fault("quarantine_after = 1001"),
        "job.toml:20:20: fault.quarantine_after must be between 0 and 1000, got 1001",
    );
    // A spec stored before the table existed reads with the defaults.
    let mut json: serde_json::Value = serde_json::to_value(&base).unwrap();
    json.as_object_mut().unwrap().remove("fault");
    let old: JobSpec = serde_json::from_value(json).unwrap();
    assert_eq!(old.fault, FaultSpec::default());
    let mut wire = base.clone();
    wire.fault.rejoin_timeout_secs = 0;
    assert_eq!(
        wire.check(),
        Err("fault.rejoin_timeout_secs must be between 1 and 604800, got 0".into())
    );
}

#[test]
fn recurrent_keys() {
    let model = |lines: &str| edit(&[("kind = \"mlp\"\nhidden = [16, 8]", lines)]);
    let spec = parse(&model("kind = \"lstm\"\nhidden_size = 32"));
    assert_eq!(
        spec.model,
        ModelSpec::Lstm(RnnSpec {
            input_shape: None,
            hidden_size: 32,
            layers: 1,
            dropout: 0.0,
        })
    );
    let gru = parse(&model(
        "kind = \"gru\"\nhidden_size = 8\nlayers = 3\ninput_shape = [4, 2]\ndropout = 0.2",
    ));
    assert_eq!(
        gru.model,
        ModelSpec::Gru(RnnSpec {
            input_shape: Some([4, 2]),
            hidden_size: 8,
            layers: 3,
            dropout: 0.2,
        })
    );
    let json = serde_json::to_string(&gru).unwrap();
    let back: JobSpec = serde_json::from_str(&json).unwrap();
    assert_eq!((back.check(), back.model), (Ok(()), gru.model));
    check_err(
        &model("kind = \"lstm\""),
        "job.toml:4:8: model.kind = \"lstm\" needs model.hidden_size (e.g. 64)",
    );
    check_err(
        &model("kind = \"gru\"\nhidden_size = 0"),
        "job.toml:5:15: model.hidden_size must be between 1 and 4096, got 0",
    );
    check_err(
        &model("kind = \"lstm\"\nhidden_size = 8\nlayers = 17"),
        "job.toml:6:10: model.layers must be between 1 and 16, got 17",
    );
    check_err(
        &model("kind = \"lstm\"\nhidden_size = 8\ninput_shape = [1, 8, 8]"),
        "job.toml:6:15: model.input_shape of a recurrent model must be [steps, input_size], got 3 \
         values",
    );
    check_err(
        &model("kind = \"lstm\"\nhidden_size = 8\nchannels = [4]"),
        "job.toml:6:12: model.channels does not apply to model.kind = \"lstm\"",
    );
    check_err(
        &model("kind = \"mlp\"\nhidden = [4]\nlayers = 2"),
        "job.toml:6:10: model.layers does not apply to model.kind = \"mlp\"",
    );
}

#[test]
fn torchscript_keys() {
    let script = |lines: &str| edit(&[("kind = \"mlp\"\nhidden = [16, 8]", lines)]);
    let spec = parse(&script(
        "kind = \"torchscript\"\npath = \"models/net.pt\"\ninput_shape = [1, 8, 8]",
    ));
    assert_eq!(
        spec.model,
        ModelSpec::Torchscript {
            // Relative to the job file's folder, like the datasets.
            path: PathBuf::from("/jobs/team/models/net.pt"),
            input_shape: Some(vec![1, 8, 8]),
        }
    );
    assert_eq!(spec.check(), Ok(()));
    let flat = parse(&script("kind = \"torchscript\"\npath = \"net.pt\""));
    assert!(matches!(
        flat.model,
        ModelSpec::Torchscript {
            input_shape: None,
            ..
        }
    ));
    check_err(
        &script("kind = \"torchscript\""),
        "job.toml:4:8: model.kind = \"torchscript\" needs model.path (a module saved with \
         torch.jit.save, e.g. \"model.pt\")",
    );
    check_err(
        &script("kind = \"torchscript\"\npath = \"net.pt\"\nhidden = [4]"),
        "job.toml:6:10: model.hidden does not apply to model.kind = \"torchscript\" (the module \
         file defines its own layers)",
    );
    check_err(
        &script("kind = \"torchscript\"\npath = \"net.pt\"\nactivation = \"gelu\""),
        "job.toml:6:14: model.activation does not apply to model.kind = \"torchscript\" (the \
         module file defines its own layers)",
    );
    check_err(
        &script("kind = \"torchscript\"\npath = \"net.pt\"\ninput_shape = [1, 2, 3, 4, 5]"),
        "job.toml:6:15: model.input_shape must have 1 to 4 dimensions (each sample's shape, e.g. \
         [1, 28, 28]), got 5",
    );
    check_err(
        &script("kind = \"torchscript\"\npath = \"\""),
        "job.toml:5:8: model.path must not be empty",
    );
    check_err(
        &script("kind = \"mlp\"\nhidden = [4]\npath = \"net.pt\""),
        "job.toml:6:8: model.path applies to model.kind = \"torchscript\"",
    );
    // A spec from the wire must carry an absolute path.
    let mut wire = spec.clone();
    wire.model = ModelSpec::Torchscript {
        path: PathBuf::from("net.pt"),
        input_shape: None,
    };
    assert_eq!(
        wire.check(),
        Err("model.path must be absolute here, got net.pt".into())
    );
}

#[test]
fn gpu_keys_collective_precision_and_timeouts() {
    let base = parse(&edit(&[]));
    assert_eq!(base.workers.collective, CollectiveChoice::Auto);
    assert_eq!(base.workers.backend(), CollectiveBackend::Ring);
    assert_eq!(base.train.precision, FloatFormat::Fp32);
    assert_eq!(base.train.allreduce_dtype, FloatFormat::Fp32);
    let cuda = "max = 4\ndevice = \"cuda\"";
    assert_eq!(
        parse(&edit(&[("max = 4", cuda)])).workers.backend(),
        CollectiveBackend::Nccl
    );
    let ring = parse(&edit(&[(
        "max = 4",
        &format!("{cuda}\ncollective = \"ring\""),
    )]));
    assert_eq!(ring.workers.backend(), CollectiveBackend::Ring);
    let bf16 = parse(&edit(&[
        ("max = 4", cuda),
        (
            "learning_rate = 0.1",
            "learning_rate = 0.1\nprecision = \"bf16\"\nallreduce_dtype = \"bf16\"",
        ),
    ]));
    assert_eq!(bf16.train.precision, FloatFormat::Bf16);
    assert_eq!(bf16.train.allreduce_dtype, FloatFormat::Bf16);
    assert_eq!(bf16.check(), Ok(()));
    check_err(
        &edit(&[("max = 4", "max = 4\ncollective = \"nccl\"")]),
        "job.toml:17:14: workers.collective = \"nccl\" needs workers.device = \"cuda\"; CPU \
         workers use the ring",
    );
    check_err(
        &edit(&[("max = 4", "max = 4\ncollective = \"mpi\"")]),
        "job.toml:17:14: unknown variant `mpi`, expected one of `auto`, `nccl`, `ring`",
    );
    check_err(
        &edit(&[(
            "learning_rate = 0.1",
            "learning_rate = 0.1\nprecision = \"bf16\"",
        )]),
        "job.toml:14:13: train.precision = \"bf16\" needs workers.device = \"cuda\" (CUDA \
         autocast); CPU workers train in fp32",
    );
    check_err(
        &edit(&[
            ("max = 4", &format!("{cuda}\ncollective = \"ring\"")),
            (
                "learning_rate = 0.1",
                "learning_rate = 0.1\nallreduce_dtype = \"bf16\"",
            ),
        ]),
        "job.toml:14:19: train.allreduce_dtype = \"bf16\" needs the NCCL collective (CUDA \
         workers, workers.collective = \"auto\" or \"nccl\"); the ring reduces in fp32",
    );
    check_err(
        &with_fault("collective_timeout_secs = 0"),
        "job.toml:20:27: fault.collective_timeout_secs must be between 1 and 86400, got 0",
    );
    // A spec handed over the wire is checked the same way.
    let mut wire = base.clone();
    wire.train.precision = FloatFormat::Bf16;
    assert!(wire.check().unwrap_err().starts_with("train.precision"));
    // Specs stored before these keys existed read with the defaults.
    let mut json: serde_json::Value = serde_json::to_value(&base).unwrap();
    json["workers"]
        .as_object_mut()
        .unwrap()
        .remove("collective");
    json["train"].as_object_mut().unwrap().remove("precision");
    json["fault"]
        .as_object_mut()
        .unwrap()
        .remove("collective_timeout_secs");
    let old: JobSpec = serde_json::from_value(json).unwrap();
    assert_eq!(old, base);
}

#[test]
fn workers_grow_by_default_and_can_be_held_at_their_start_size() {
    assert!(parse(&edit(&[])).workers.grow);
    let held = parse(&edit(&[("max = 4", "max = 4\ngrow = false")]));
    assert!(!held.workers.grow);
    check_err(
        &edit(&[("max = 4", "max = 4\ngrow = 1")]),
        "job.toml:17:8: invalid type: integer `1`, expected a boolean",
    );
}

#[test]
fn debug_table_turns_on_the_sample_audit_and_rejects_unknown_keys() {
    let on = parse(&edit(&[(
        "dir = \"out\"\n",
        "dir = \"out\"\n[debug]\naudit_samples = true\n",
    )]));
    assert!(on.debug.audit_samples);
    check_err(
        &edit(&[("dir = \"out\"\n", "dir = \"out\"\n[debug]\naudit = true\n")]),
        "job.toml:20:1: unknown field `audit`, expected `audit_samples`",
    );
}
