//! Learning-rate schedules, gradient clipping and the evaluation report end
//! to end on digits with the real binaries: the rate each step used (from
//! `metrics.jsonl`) follows the schedule, clipping is engaged and keeps 1 and
//! 2 workers on the same run, and `eval.json` and `coordinator status` carry
//! per-class scores, macro-F1 and a confusion matrix consistent with the
//! accuracy.

use ringmaster_common::jobspec::{LrSchedule, ScheduleKind};
use ringmaster_tests::{
    JobBuilder, LocalCluster, model_params, pack_digits, read_metrics, relative_l2,
};
use std::path::Path;

const STEPS: u64 = 300;
const TRAIN: &str = "steps = 300\noptimizer = \"sgd\"\nmomentum = 0.9\nlearning_rate = 0.1\n\
    lr_schedule = \"cosine\"\nwarmup_steps = 20\nfinal_learning_rate = 0.001\n\
    clip_grad_norm = 0.5\neval_every_steps = 100\nlog_every_steps = 1";

fn job(data: &Path, name: &str, workers: u32) -> JobBuilder {
    JobBuilder::new(name, data)
        .seed(4)
        .hidden(&[64])
        .validation()
        .train(TRAIN)
        .exactly(workers)
}

#[test]
fn schedule_clipping_and_scores_on_digits() {
    let tmp = tempfile::tempdir().unwrap();
    let data = pack_digits(&tmp.path().join("digits"));
    let cluster = LocalCluster::start(2).unwrap();
    let (done, out) = cluster.train(tmp.path(), &job(&data, "two", 2));

    // The rate each step used is the schedule's.
    let schedule = LrSchedule {
        kind: ScheduleKind::Cosine,
        warmup_steps: 20,
        final_learning_rate: 0.001,
        ..LrSchedule::default()
    };
    let metrics = read_metrics(&out.join("metrics.jsonl"));
    let mut clipped = 0;
    for m in &metrics {
        let step = m["step"].as_u64().unwrap();
        let expected = schedule.rate(0.1, step - 1, STEPS);
        let got = m["learning_rate"].as_f64().unwrap();
        assert!(
            (got - expected).abs() <= 1e-12,
            "step {step}: lr {got}, expected {expected}"
        );
        if m["grad_norm"].as_f64().unwrap() > 0.5 {
            clipped += 1;
        }
    }
    assert_eq!(metrics.len() as u64, STEPS);
    assert!(clipped > 10, "clipping was engaged on only {clipped} steps");

    // eval.json: the last evaluation, consistent with itself and the status.
    let eval: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("eval.json")).unwrap()).unwrap();
    assert_eq!(eval["step"], STEPS);
    let samples = eval["samples"].as_u64().unwrap();
    let confusion: Vec<Vec<u64>> = serde_json::from_value(eval["confusion"].clone()).unwrap();
    assert_eq!(confusion.len(), 10);
    let total: u64 = confusion.iter().flatten().sum();
    let diagonal: u64 = (0..10).map(|c| confusion[c][c]).sum();
    assert_eq!(total, samples);
    let accuracy = eval["accuracy"].as_f64().unwrap();
    assert!((accuracy - diagonal as f64 / samples as f64).abs() < 1e-12);
    for (c, row) in confusion.iter().enumerate() {
        assert_eq!(eval["classes"][c]["support"], row.iter().sum::<u64>());
    }
    let macro_f1 = eval["macro_f1"].as_f64().unwrap();
    assert!(macro_f1 > 0.9 && accuracy > 0.9, "{eval}");
    assert_eq!(done["metrics"]["val_macro_f1"].as_f64(), Some(macro_f1));
    assert_eq!(done["metrics"]["val_accuracy"].as_f64(), Some(accuracy));

    // One worker computes the same run, clipping and schedule included.
    let (_, one) = cluster.train(tmp.path(), &job(&data, "one", 1));
    let rel = relative_l2(&model_params(&one), &model_params(&out));
    eprintln!("relative L2 between 1 and 2 workers: {rel:e}");
    assert!(rel < 1e-5, "1 vs 2 workers: {rel}");
}

const PLAIN: &str = "steps = 200\noptimizer = \"sgd\"\nmomentum = 0.9\nlearning_rate = 0.05";

fn plain(data: &Path, name: &str, workers: u32, extra: &str) -> JobBuilder {
    JobBuilder::new(name, data)
        .seed(6)
        .hidden(&[64])
        .model("dropout = 0.1")
        .train(PLAIN)
        .train(extra)
        .exactly(workers)
}

#[test]
fn micro_batches_keep_the_run_and_l1_shrinks_the_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let data = pack_digits(&tmp.path().join("digits"));
    let cluster = LocalCluster::start(2).unwrap();
    let (_, whole) = cluster.train(tmp.path(), &plain(&data, "whole", 2, ""));
    // Each rank's 32 samples in 3 micro-batches, or one rank in 5.
    let (_, split) = cluster.train(tmp.path(), &plain(&data, "split", 2, "micro_batches = 3"));
    let (_, one) = cluster.train(tmp.path(), &plain(&data, "one", 1, "micro_batches = 5"));
    for (name, out) in [("2 workers x 3", &split), ("1 worker x 5", &one)] {
        let rel = relative_l2(&model_params(&whole), &model_params(out));
        eprintln!("micro-batches {name}: relative L2 {rel:e}");
        assert!(rel < 1e-5, "micro-batches {name}: {rel}");
    }

    let (_, l1) = cluster.train(tmp.path(), &plain(&data, "l1", 2, "l1 = 0.0005"));
    let abs = |out: &Path| {
        model_params(out)
            .iter()
            .map(|v| f64::from(v.abs()))
            .sum::<f64>()
    };
    let (with, without) = (abs(&l1), abs(&whole));
    assert!(
        with < 0.9 * without,
        "L1 norm {with} with l1, {without} without"
    );
}

#[test]
fn early_stopping_ends_the_run_when_the_score_stops_improving() {
    let tmp = tempfile::tempdir().unwrap();
    let data = pack_digits(&tmp.path().join("digits"));
    let cluster = LocalCluster::start(1).unwrap();
    // No evaluation can beat the first by 0.5 accuracy: the best stays at
    // step 20, and patience 2 runs out at the evaluation of step 60.
    let job = plain(
        &data,
        "early",
        1,
        "eval_every_steps = 20\nearly_stopping = { metric = \"val_accuracy\", mode = \"max\", \
         patience = 2, min_delta = 0.5 }",
    )
    .validation();
    let (done, out) = cluster.train(tmp.path(), &job);
    assert_eq!(done["step"], 60, "{done}");
    assert_eq!(done["metrics"]["early_stopping_stale_evals"], 2.0);
    let events = done["events"].to_string();
    assert!(
        events.contains("stopped early at step 60 of 200"),
        "{events}"
    );
    assert!(out.join("model.safetensors").exists());
}
