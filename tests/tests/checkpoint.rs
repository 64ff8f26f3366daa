//! Checkpoints end to end with the real binaries: bitwise resume after a
//! cancel, forks with another worker count, corruption fallback, a crash
//! between the files and the manifest, disk errors, and retention.

use ringmaster_tests::{
    JobBuilder, LocalCluster, pack_digits, read_metrics, read_params, wait_until,
};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

const T: Duration = Duration::from_secs(30);
const JOB_TIMEOUT: Duration = Duration::from_secs(300);

struct Job<'a> {
    name: &'a str,
    workers: u32,
    train: &'a str,
    checkpoint: &'a str,
    dropout: f64,
}

fn write_job(dir: &Path, data: &Path, job: &Job) -> PathBuf {
    builder(data, job).write(dir)
}

fn builder(data: &Path, job: &Job) -> JobBuilder {
    JobBuilder::new(job.name, data)
        .seed(11)
        .model(&format!("dropout = {}", job.dropout))
        .validation()
        .train(job.train)
        .exactly(job.workers)
        .checkpoint(job.checkpoint)
}

fn submit(cluster: &LocalCluster, job: &Path, extra: &[&str]) -> String {
    let mut args = vec!["submit", job.to_str().unwrap()];
    args.extend_from_slice(extra);
    let out = cluster.cli(&args, T);
    assert_eq!(out.code, 0, "{}", out.stderr);
    out.stdout.trim().to_string()
}

fn wait_for_state(cluster: &LocalCluster, id: &str, state: &str) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    wait_until(JOB_TIMEOUT, || {
        last = cluster.status(id);
        last["state"] == state || (last["state"] != "running" && last["state"] != "queued")
    })
    .unwrap_or_else(|_| panic!("{id} never left running: {last}"));
    assert_eq!(last["state"], state, "{last}");
    last
}

fn checkpoints(cluster: &LocalCluster, id: &str) -> Vec<serde_json::Value> {
    let out = cluster.cli(&["checkpoints", id, "--output", "json"], T);
    assert_eq!(out.code, 0, "{}", out.stderr);
    out.json().as_array().cloned().unwrap_or_default()
}

fn step_dirs(root: &Path) -> BTreeSet<u64> {
    match std::fs::read_dir(root) {
        Ok(entries) => entries
            .filter_map(|e| {
                e.ok()?
                    .file_name()
                    .to_str()?
                    .strip_prefix("step-")?
                    .parse()
                    .ok()
            })
            .collect(),
        Err(_) => BTreeSet::new(),
    }
}

fn losses(metrics: &[serde_json::Value]) -> BTreeMap<u64, f64> {
    metrics
        .iter()
        .filter_map(|m| Some((m["step"].as_u64()?, m["loss"].as_f64()?)))
        .collect()
}

fn events(status: &serde_json::Value) -> Vec<String> {
    status["events"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| e.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn cancel_then_resume_is_bitwise_identical_to_an_undisturbed_run() {
    let tmp = tempfile::tempdir().unwrap();
    let data = pack_digits(&tmp.path().join("digits"));
    let train = "steps = 6000\noptimizer = \"adam\"\nlearning_rate = 0.002\neval_every_steps = 1000\nlog_every_steps = 1";
    let whole = write_job(
        tmp.path(),
        &data,
        &Job {
            name: "whole",
            workers: 2,
            train,
            checkpoint: "",
            dropout: 0.2,
        },
    );
    let split = write_job(
        tmp.path(),
        &data,
        &Job {
            name: "split",
            workers: 2,
            train,
            checkpoint: "",
            dropout: 0.2,
        },
    );
    let cluster = LocalCluster::start(2).unwrap();

    let out = cluster.cli(
        &["submit", whole.to_str().unwrap(), "--follow"],
        JOB_TIMEOUT,
    );
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);

    let id = submit(&cluster, &split, &[]);
    wait_until(JOB_TIMEOUT, || {
        cluster.status(&id)["step"].as_u64().unwrap_or(0) >= 100
    })
    .unwrap();
    let out = cluster.cli(&["cancel", &id], T);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let cancelled = wait_for_state(&cluster, &id, "cancelled");
    let stop = cancelled["step"].as_u64().unwrap();
    assert!(stop > 0 && stop < 6000, "cancelled at step {stop}");
    let listed = checkpoints(&cluster, &id);
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["step"], stop);
    assert_eq!(listed[0]["committed"], true);

    let out = cluster.cli(
        &["resume", &id, "--follow", "--output", "json"],
        JOB_TIMEOUT,
    );
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    let done = out.json();
    assert_eq!(done["state"], "succeeded");
    let resumed = format!(
        "resumed from {} at step {stop}",
        listed[0]["dir"].as_str().unwrap()
    );
    assert!(events(&done).contains(&resumed), "{:?}", events(&done));

    let a = read_params(&tmp.path().join("out-whole/latest/model.safetensors"));
    let b = read_params(&tmp.path().join("out-split/latest/model.safetensors"));
    assert_eq!(a, b, "parameters differ after cancel + resume");
    let la = losses(&read_metrics(
        &tmp.path().join("out-whole/latest/metrics.jsonl"),
    ));
    let lb = losses(&read_metrics(
        &tmp.path().join("out-split/latest/metrics.jsonl"),
    ));
    assert_eq!(la.len(), 6000);
    assert_eq!(la, lb, "per-step losses differ");
}

#[test]
fn a_fork_with_another_worker_count_sees_the_same_samples() {
    let tmp = tempfile::tempdir().unwrap();
    let data = pack_digits(&tmp.path().join("digits"));
    let train = "steps = 400\noptimizer = \"sgd\"\nmomentum = 0.9\nlearning_rate = 0.05";
    let base = write_job(
        tmp.path(),
        &data,
        &Job {
            name: "base",
            workers: 2,
            train,
            checkpoint: "every_steps = 200",
            dropout: 0.0,
        },
    );
    let fork = write_job(
        tmp.path(),
        &data,
        &Job {
            name: "fork",
            workers: 1,
            train,
            checkpoint: "",
            dropout: 0.0,
        },
    );
    let cluster = LocalCluster::start(2).unwrap();
    let out = cluster.cli(&["submit", base.to_str().unwrap(), "--follow"], JOB_TIMEOUT);
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    let from = tmp.path().join("out-base/checkpoints/base-1/step-200");
    let out = cluster.cli(
        &[
            "submit",
            fork.to_str().unwrap(),
            "--resume-from",
            from.to_str().unwrap(),
            "--follow",
        ],
        JOB_TIMEOUT,
    );
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    let a = read_params(&tmp.path().join("out-base/latest/model.safetensors"));
    let b = read_params(&tmp.path().join("out-fork/latest/model.safetensors"));
    let (mut diff, mut norm) = (0f64, 0f64);
    for (k, (_, va)) in &a {
        for (x, y) in va.iter().zip(&b[k].1) {
            diff += (f64::from(*x) - f64::from(*y)).powi(2);
            norm += f64::from(*x).powi(2);
        }
    }
    let rel = (diff / norm).sqrt();
    eprintln!("fork with 1 worker vs 2: relative L2 {rel:e}");
    assert!(rel < 1e-5, "relative L2 {rel}");
    // The fork logged only the steps after the fork point.
    let steps: Vec<u64> = read_metrics(&tmp.path().join("out-fork/latest/metrics.jsonl"))
        .iter()
        .filter_map(|m| m["step"].as_u64())
        .collect();
    assert_eq!(steps.first(), Some(&210));
    assert_eq!(steps.last(), Some(&400));
}

#[test]
fn a_corrupt_newest_checkpoint_falls_back_to_the_previous_one() {
    let tmp = tempfile::tempdir().unwrap();
    let data = pack_digits(&tmp.path().join("digits"));
    let job = write_job(
        tmp.path(),
        &data,
        &Job {
            name: "flip",
            workers: 2,
            train: "steps = 8000\noptimizer = \"sgd\"\nlearning_rate = 0.05",
            checkpoint: "every_steps = 100",
            dropout: 0.0,
        },
    );
    let cluster = LocalCluster::start(2).unwrap();
    let id = submit(&cluster, &job, &[]);
    wait_until(JOB_TIMEOUT, || checkpoints(&cluster, &id).len() >= 2).unwrap();
    assert_eq!(cluster.cli(&["cancel", &id], T).code, 0);
    wait_for_state(&cluster, &id, "cancelled");
    let listed = checkpoints(&cluster, &id);
    let newest = listed.last().unwrap();
    let previous = &listed[listed.len() - 2];
    let model = Path::new(newest["dir"].as_str().unwrap()).join("model.safetensors");
    let mut bytes = std::fs::read(&model).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&model, bytes).unwrap();

    let out = cluster.cli(
        &["resume", &id, "--follow", "--output", "json"],
        JOB_TIMEOUT,
    );
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    let ev = events(&out.json());
    let skipped = ev
        .iter()
        .find(|e| e.starts_with("skipped checkpoint"))
        .expect("no skip event");
    assert!(
        skipped.contains(newest["dir"].as_str().unwrap()),
        "{skipped}"
    );
    assert!(
        skipped.contains("model.safetensors: sha256 mismatch"),
        "{skipped}"
    );
    let resumed = format!(
        "resumed from {} at step {}",
        previous["dir"].as_str().unwrap(),
        previous["step"]
    );
    assert!(ev.contains(&resumed), "{ev:?}");
}

#[test]
fn a_crash_between_files_and_manifest_leaves_no_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let data = pack_digits(&tmp.path().join("digits"));
    // No restarts: the crashed worker fails the job, naming it, whether its
    // process dies silently (its peer reports the ring closed) or its
    // trainer reports the libtorch error of a process tearing down first.
    let job = builder(
        &data,
        &Job {
            name: "crash",
            workers: 2,
            train: "steps = 400\noptimizer = \"sgd\"\nlearning_rate = 0.05",
            checkpoint: "every_steps = 50",
            dropout: 0.0,
        },
    )
    .fault("max_restarts = 0")
    .write(tmp.path());
    let cluster = LocalCluster::start_with_env(
        2,
        &[("RINGMASTER_FAILPOINT", "checkpoint-before-manifest=exit")],
    )
    .unwrap();
    let id = submit(&cluster, &job, &[]);
    let failed = wait_for_state(&cluster, &id, "failed");
    assert!(
        failed["reason"].as_str().unwrap().contains("worker w0"),
        "{failed}"
    );
    assert!(checkpoints(&cluster, &id).is_empty());
    let root = tmp.path().join("out-crash/checkpoints/crash-1");
    assert_eq!(step_dirs(&root), BTreeSet::new());
    let out = cluster.cli(&["resume", &id], T);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr
            .contains("job `crash-1` has no committed checkpoint to resume from"),
        "{}",
        out.stderr
    );
}

#[test]
fn a_failed_checkpoint_write_is_reported_and_training_continues() {
    let tmp = tempfile::tempdir().unwrap();
    let data = pack_digits(&tmp.path().join("digits"));
    let job = write_job(
        tmp.path(),
        &data,
        &Job {
            name: "enospc",
            workers: 2,
            train: "steps = 200\noptimizer = \"sgd\"\nlearning_rate = 0.05",
            checkpoint: "every_steps = 50",
            dropout: 0.0,
        },
    );
    let cluster = LocalCluster::start_with_env(
        2,
        &[("RINGMASTER_FAILPOINT", "checkpoint-before-manifest=error")],
    )
    .unwrap();
    let done = cluster.follow(&job, &[]);
    assert_eq!(done["step"], 200);
    let ev = events(&done);
    let failures: Vec<&String> = ev.iter().filter(|e| e.contains("failed")).collect();
    assert_eq!(failures.len(), 4, "{ev:?}");
    assert!(
        failures[0].starts_with("checkpoint at step 50 failed:")
            && failures[0].contains("no space left on device (injected)"),
        "{}",
        failures[0]
    );
    assert_eq!(
        step_dirs(&tmp.path().join("out-enospc/checkpoints/enospc-1")),
        BTreeSet::new()
    );
    assert!(
        tmp.path()
            .join("out-enospc/latest/model.safetensors")
            .exists()
    );
}

#[test]
fn retention_keeps_the_last_two_and_the_best() {
    let tmp = tempfile::tempdir().unwrap();
    let data = pack_digits(&tmp.path().join("digits"));
    let job = write_job(
        tmp.path(),
        &data,
        &Job {
            name: "keep",
            workers: 2,
            train: "steps = 500\noptimizer = \"adam\"\nlearning_rate = 0.01\neval_every_steps = 50",
            checkpoint: "every_steps = 50\nkeep_last = 2\nkeep_best = { metric = \"val_accuracy\", mode = \"max\", count = 1 }",
            dropout: 0.3,
        },
    );
    let cluster = LocalCluster::start(2).unwrap();
    let id = cluster.follow(&job, &[])["id"]
        .as_str()
        .unwrap()
        .to_string();

    // The expected set, from the validation accuracy logged at each step.
    let acc: Vec<(u64, f64)> = read_metrics(&tmp.path().join("out-keep/latest/metrics.jsonl"))
        .iter()
        .filter_map(|m| Some((m["step"].as_u64()?, m["val_accuracy"].as_f64()?)))
        .filter(|(s, _)| s % 50 == 0)
        .collect();
    assert_eq!(acc.len(), 10);
    let best = acc
        .iter()
        .max_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)))
        .unwrap()
        .0;
    let expected: BTreeSet<u64> = [450, 500, best].into_iter().collect();

    let listed: BTreeSet<u64> = checkpoints(&cluster, &id)
        .iter()
        .filter(|c| c["committed"] == true)
        .map(|c| c["step"].as_u64().unwrap())
        .collect();
    assert_eq!(listed, expected);
    let root = tmp.path().join("out-keep/checkpoints").join(&id);
    wait_until(Duration::from_secs(20), || step_dirs(&root) == expected)
        .unwrap_or_else(|_| panic!("on disk {:?}, expected {expected:?}", step_dirs(&root)));
}

#[test]
fn checkpoints_come_on_a_timer_and_on_request() {
    let tmp = tempfile::tempdir().unwrap();
    let data = pack_digits(&tmp.path().join("digits"));
    let train = "steps = 1000000\noptimizer = \"sgd\"\nlearning_rate = 0.05";
    let timer = write_job(
        tmp.path(),
        &data,
        &Job {
            name: "timer",
            workers: 2,
            train,
            checkpoint: "every_seconds = 1",
            dropout: 0.0,
        },
    );
    let manual = write_job(
        tmp.path(),
        &data,
        &Job {
            name: "manual",
            workers: 2,
            train,
            checkpoint: "",
            dropout: 0.0,
        },
    );
    let cluster = LocalCluster::start(2).unwrap();

    // The timer alone produces checkpoints.
    let id = submit(&cluster, &timer, &[]);
    wait_until(JOB_TIMEOUT, || checkpoints(&cluster, &id).len() >= 2).unwrap();
    assert_eq!(cluster.cli(&["cancel", &id, "--now"], T).code, 0);
    wait_for_state(&cluster, &id, "cancelled");

    // Without a schedule, one checkpoint comes per request.
    let id = submit(&cluster, &manual, &[]);
    wait_until(JOB_TIMEOUT, || {
        cluster.status(&id)["step"].as_u64().unwrap_or(0) >= 100
    })
    .unwrap();
    assert!(checkpoints(&cluster, &id).is_empty());
    let out = cluster.cli(&["checkpoint", &id], T);
    assert_eq!(out.code, 0, "{}", out.stderr);
    wait_until(JOB_TIMEOUT, || checkpoints(&cluster, &id).len() == 1).unwrap();

    // cancel --now stops without a final checkpoint.
    let out = cluster.cli(&["cancel", &id, "--now"], T);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let cancelled = wait_for_state(&cluster, &id, "cancelled");
    assert_eq!(cancelled["reason"], "cancelled by user");
    assert_eq!(checkpoints(&cluster, &id).len(), 1);
    // A job that is not running cannot checkpoint.
    let out = cluster.cli(&["checkpoint", &id], T);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("only a running job can checkpoint"),
        "{}",
        out.stderr
    );
}
