//! The `[task]` table of `job.toml`, seen from a user: its defaults (every
//! job file without it is a classification job with plain cross entropy),
//! each loss, the exact one-line `file:line:col` error for a key that does
//! not apply to the chosen kind or loss and for bad values, metrics that the
//! task does not report or ranked the wrong way, and the JSON re-check.

use std::path::Path;

use ringmaster_common::jobspec::{JobSpec, RegressionLoss, TaskSpec};

/// A valid job without a `[task]` table; line 19 is the first line after it,
/// where the cases append theirs.
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
eval_every_steps = 5
[workers]
min = 1
[output]
dir = "out"
"#;

const JOB: &str = "/jobs/team/job.toml";

fn with(task: &str) -> String {
    format!("{BASE}{task}")
}

#[track_caller]
fn task_of(source: &str) -> TaskSpec {
    match JobSpec::from_toml(source, Path::new(JOB)) {
        Ok(spec) => {
            assert_eq!(spec.check(), Ok(()));
            spec.task
        }
        Err(e) => panic!("expected a valid job, got: {e}"),
    }
}

#[track_caller]
fn check_err(source: &str, expected: &str) {
    match JobSpec::from_toml(source, Path::new(JOB)) {
        Ok(_) => panic!("expected {expected:?}, the job was accepted"),
        Err(e) => assert_eq!(e.to_string(), expected),
    }
}

#[test]
fn tasks_and_their_defaults() {
    let plain = TaskSpec::Classification {
        label_smoothing: 0.0,
    };
    assert_eq!(task_of(BASE), plain);
    assert_eq!(task_of(&with("[task]\n")), plain);
    assert_eq!(
        task_of(&with(
            "[task]\nkind = \"classification\"\nloss = \"cross_entropy\"\n"
        )),
        plain
    );
    assert_eq!(
        task_of(&with("[task]\nlabel_smoothing = 0.1\n")),
        TaskSpec::Classification {
            label_smoothing: 0.1
        }
    );
    let regression = |loss| TaskSpec::Regression { loss };
    assert_eq!(
        task_of(&with("[task]\nkind = \"regression\"\n")),
        regression(RegressionLoss::Mse)
    );
    assert_eq!(
        task_of(&with("[task]\nkind = \"regression\"\nloss = \"mae\"\n")),
        regression(RegressionLoss::Mae)
    );
    assert_eq!(
        task_of(&with("[task]\nkind = \"regression\"\nloss = \"huber\"\n")),
        regression(RegressionLoss::Huber { delta: 1.0 })
    );
    assert_eq!(
        task_of(&with(
            "[task]\nkind = \"regression\"\nloss = \"huber\"\nhuber_delta = 2.5\n"
        )),
        regression(RegressionLoss::Huber { delta: 2.5 })
    );
}

#[test]
fn keys_that_do_not_apply_and_bad_values_are_located() {
    check_err(
        &with("[task]\nkind = \"regression\"\nloss = \"cross_entropy\"\n"),
        "/jobs/team/job.toml:21:8: task.loss \"cross_entropy\" is a classification loss; \
         task.kind = \"regression\" takes \"mse\", \"mae\" or \"huber\"",
    );
    check_err(
        &with("[task]\nloss = \"mse\"\n"),
        "/jobs/team/job.toml:20:8: task.loss \"mse\" is a regression loss; task.kind = \
         \"classification\" takes \"cross_entropy\"",
    );
    check_err(
        &with("[task]\nkind = \"regression\"\nlabel_smoothing = 0.1\n"),
        "/jobs/team/job.toml:21:19: task.label_smoothing does not apply to task.kind = \
         \"regression\" (it smooths class labels)",
    );
    check_err(
        &with("[task]\nhuber_delta = 1.0\n"),
        "/jobs/team/job.toml:20:15: task.huber_delta does not apply to task.kind = \
         \"classification\" (it shapes the regression loss \"huber\")",
    );
    check_err(
        &with("[task]\nkind = \"regression\"\nhuber_delta = 1.0\n"),
        "/jobs/team/job.toml:21:15: task.huber_delta only applies to task.loss = \"huber\", \
         not \"mse\"",
    );
    check_err(
        &with("[task]\nkind = \"regression\"\nloss = \"huber\"\nhuber_delta = 0\n"),
        "/jobs/team/job.toml:22:15: task.huber_delta must be positive and finite, got 0.0",
    );
    check_err(
        &with("[task]\nlabel_smoothing = 1.0\n"),
        "/jobs/team/job.toml:20:19: task.label_smoothing must be at least 0 and below 1, \
         got 1.0",
    );
    check_err(
        &with("[task]\nlabel_smoothing = -0.1\n"),
        "/jobs/team/job.toml:20:19: task.label_smoothing must be at least 0 and below 1, \
         got -0.1",
    );
    check_err(
        &with("[task]\nkind = \"ranking\"\n"),
        "/jobs/team/job.toml:20:8: unknown variant `ranking`, expected one of \
         `classification`, `regression`, `language_model`",
    );
    check_err(
        &with("[task]\nkind = \"regression\"\nloss = \"l2\"\n"),
        "/jobs/team/job.toml:21:8: unknown variant `l2`, expected one of `cross_entropy`, \
         `mse`, `mae`, `huber`",
    );
    check_err(
        &with("[task]\nkind = \"regression\"\ndelta = 1.0\n"),
        "/jobs/team/job.toml:21:1: unknown field `delta`, expected one of `kind`, `loss`, \
         `label_smoothing`, `huber_delta`",
    );
}

#[test]
fn metrics_must_be_reported_by_the_task_and_ranked_the_right_way() {
    let regression = "[task]\nkind = \"regression\"\n";
    let early = |metric: &str, mode: &str| {
        BASE.replace(
            "eval_every_steps = 5\n",
            &format!(
                "eval_every_steps = 5\nearly_stopping = {{ metric = \"{metric}\", mode = \
                 \"{mode}\", patience = 2 }}\n"
            ),
        )
    };
    // Each regression score works with its own direction.
    for (metric, mode) in [("val_mse", "min"), ("val_mae", "min"), ("val_r2", "max")] {
        let spec = JobSpec::from_toml(
            &format!("{}{regression}", early(metric, mode)),
            Path::new(JOB),
        )
        .unwrap();
        assert_eq!(spec.check(), Ok(()));
        assert_eq!(spec.train.early_stopping.unwrap().metric, metric);
    }
    check_err(
        &format!("{}{regression}", early("val_accuracy", "max")),
        "/jobs/team/job.toml:15:29: train.early_stopping.metric \"val_accuracy\" is not \
         reported for task.kind = \"regression\" (its scores are `val_loss`, `val_mse`, \
         `val_mae`, `val_r2`)",
    );
    check_err(
        &early("val_r2", "max"),
        "/jobs/team/job.toml:15:29: train.early_stopping.metric \"val_r2\" is not reported \
         for task.kind = \"classification\" (its scores are `val_loss`, `val_accuracy`, \
         `val_macro_f1`)",
    );
    check_err(
        &format!("{}{regression}", early("val_r2", "min")),
        "/jobs/team/job.toml:15:29: train.early_stopping.mode \"min\" goes the wrong way for \
         \"val_r2\": a larger value is better (use mode = \"max\")",
    );
    check_err(
        &format!("{}{regression}", early("val_mse", "max")),
        "/jobs/team/job.toml:15:29: train.early_stopping.mode \"max\" goes the wrong way for \
         \"val_mse\": a smaller value is better (use mode = \"min\")",
    );
    let keep = |metric: &str, mode: &str| {
        format!(
            "{BASE}[checkpoint]\nkeep_best = {{ metric = \"{metric}\", mode = \"{mode}\" }}\n\
             {regression}"
        )
    };
    let spec = JobSpec::from_toml(&keep("val_r2", "max"), Path::new(JOB)).unwrap();
    assert_eq!(spec.checkpoint.keep_best.unwrap().metric, "val_r2");
    check_err(
        &keep("val_macro_f1", "max"),
        "/jobs/team/job.toml:20:24: checkpoint.keep_best.metric \"val_macro_f1\" is not \
         reported for task.kind = \"regression\" (its scores are `val_loss`, `val_mse`, \
         `val_mae`, `val_r2`)",
    );
    check_err(
        &keep("val_mae", "max"),
        "/jobs/team/job.toml:20:24: checkpoint.keep_best.mode \"max\" goes the wrong way for \
         \"val_mae\": a smaller value is better (use mode = \"min\")",
    );
}

#[test]
fn specs_stored_without_a_task_read_as_classification_and_check_rechecks_it() {
    let spec = JobSpec::from_toml(
        &with("[task]\nkind = \"regression\"\nloss = \"huber\"\nhuber_delta = 0.5\n"),
        Path::new(JOB),
    )
    .unwrap();
    let mut json: serde_json::Value = serde_json::to_value(&spec).unwrap();
    assert_eq!(
        json["task"],
        serde_json::json!({"kind": "regression", "loss": {"name": "huber", "delta": 0.5}})
    );
    let back: JobSpec = serde_json::from_value(json.clone()).unwrap();
    assert_eq!(back, spec);

    // A spec stored before `[task]` existed.
    json.as_object_mut().unwrap().remove("task");
    let old: JobSpec = serde_json::from_value(json.clone()).unwrap();
    assert_eq!(old.task, TaskSpec::default());

    // What the parser refuses, the re-check refuses too.
    json["task"] =
        serde_json::json!({"kind": "regression", "loss": {"name": "huber", "delta": -1.0}});
    let bad: JobSpec = serde_json::from_value(json.clone()).unwrap();
    assert_eq!(
        bad.check(),
        Err("task.huber_delta must be positive and finite, got -1.0".into())
    );
    json["task"] = serde_json::json!({"kind": "classification", "label_smoothing": 1.5});
    let bad: JobSpec = serde_json::from_value(json).unwrap();
    assert_eq!(
        bad.check(),
        Err("task.label_smoothing must be at least 0 and below 1, got 1.5".into())
    );
}
