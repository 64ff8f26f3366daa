//! End-to-end tests: real `coordinator` and `worker` processes on ephemeral
//! loopback ports train the scikit-learn digits dataset. They assert what a
//! user cares about: accuracy, the parameters written, exit codes and the
//! failure reason when a worker dies.

use ringmaster_tests::{
    JobBuilder, LocalCluster, pack_digits, read_params, relative_l2, wait_until,
};
use std::path::Path;
use std::time::{Duration, Instant};

const JOB_TIMEOUT: Duration = Duration::from_secs(300);

/// Writes a digits job file into `dir` and returns its path.
fn write_job(dir: &Path, data: &Path, name: &str, workers: u32, train: &str) -> std::path::PathBuf {
    JobBuilder::new(name, data)
        .seed(3)
        .hidden(&[64])
        .model("activation = \"relu\"")
        .validation()
        .train(train)
        .train("eval_every_steps = 20")
        .exactly(workers)
        .write(dir)
}

#[test]
fn digits_with_two_workers_reaches_95_percent() {
    let tmp = tempfile::tempdir().unwrap();
    let data = pack_digits(&tmp.path().join("digits"));
    let job = write_job(
        tmp.path(),
        &data,
        "digits",
        2,
        "epochs = 20\noptimizer = \"adam\"\nlearning_rate = 0.003",
    );
    let cluster = LocalCluster::start(2).unwrap();
    let out = cluster.submit_follow(&job, &[]);
    assert_eq!(
        out.code, 0,
        "submit --follow failed:\n{}\n{}",
        out.stdout, out.stderr
    );
    let done = out.json();
    assert_eq!(done["state"], "succeeded");
    let id = done["id"].as_str().unwrap().to_string();

    let status = cluster.status(&id);
    assert_eq!(status["state"], "succeeded");
    let acc = status["metrics"]["val_accuracy"].as_f64().unwrap();
    assert!(acc >= 0.95, "validation accuracy {acc} < 0.95");
    assert_eq!(status["step"], status["total_steps"]);
    // 1438 training samples, batch 64: 23 steps per epoch, 20 epochs.
    assert_eq!(status["total_steps"], 460);
    assert!(status["reason"].is_null());

    // Each job writes into its own folder, and `latest` points at it.
    let out_dir = Path::new(status["output_dir"].as_str().unwrap());
    assert_eq!(out_dir, tmp.path().join("out-digits").join(&id));
    assert_eq!(
        std::fs::read_link(tmp.path().join("out-digits/latest")).unwrap(),
        Path::new(&id)
    );
    let params = read_params(&out_dir.join("model.safetensors"));
    let shapes: Vec<(String, Vec<usize>)> = params
        .iter()
        .map(|(k, (s, _))| (k.clone(), s.clone()))
        .collect();
    assert_eq!(
        shapes,
        vec![
            ("fc0.bias".to_string(), vec![64]),
            ("fc0.weight".to_string(), vec![64, 64]),
            ("out.bias".to_string(), vec![10]),
            ("out.weight".to_string(), vec![10, 64]),
        ]
    );
    // The weights load in Python with safetensors.torch and score the same
    // validation accuracy there.
    let python = ringmaster_tests::repo_root().join(".venv/bin/python");
    let script = r#"
import json, sys, torch
from safetensors.torch import load_file
from safetensors import safe_open
w = load_file(sys.argv[1])
val = {}
import glob, os
for f in sorted(glob.glob(os.path.join(sys.argv[2], "shard-*.safetensors"))):
    with safe_open(f, "pt") as s:
        for k in ("x", "y"):
            val.setdefault(k, []).append(s.get_tensor(k))
x, y = torch.cat(val["x"]), torch.cat(val["y"])
h = torch.relu(x @ w["fc0.weight"].T + w["fc0.bias"])
logits = h @ w["out.weight"].T + w["out.bias"]
acc = (logits.argmax(-1) == y).float().mean().item()
print(json.dumps({"shapes": {k: list(v.shape) for k, v in w.items()}, "accuracy": acc}))
"#;
    let mut cmd = std::process::Command::new(&python);
    cmd.arg("-c")
        .arg(script)
        .arg(out_dir.join("model.safetensors"))
        .arg(data.join("val"));
    let py = ringmaster_tests::run_with_timeout(cmd, Duration::from_secs(120));
    assert_eq!(py.code, 0, "python failed: {}", py.stderr);
    let py = py.json();
    assert_eq!(py["shapes"]["fc0.weight"], serde_json::json!([64, 64]));
    assert_eq!(py["shapes"]["out.weight"], serde_json::json!([10, 64]));
    let py_acc = py["accuracy"].as_f64().unwrap();
    assert!(
        (py_acc - acc).abs() < 1e-6,
        "python accuracy {py_acc} vs reported {acc}"
    );

    let metrics = std::fs::read_to_string(out_dir.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let last = lines.last().unwrap();
    assert_eq!(last["step"], 460);
    assert_eq!(last["val_accuracy"].as_f64().unwrap(), acc);
    // Evaluated every 20 steps and at the end.
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.get("val_accuracy").is_some())
            .count(),
        23
    );

    // Both workers are free again.
    let workers = cluster.workers_json();
    assert!(workers.iter().all(|w| w["state"] == "idle"), "{workers:?}");
}

#[test]
fn one_and_two_workers_end_with_the_same_parameters() {
    let tmp = tempfile::tempdir().unwrap();
    let data = pack_digits(&tmp.path().join("digits"));
    let train = "steps = 120\noptimizer = \"sgd\"\nmomentum = 0.9\nlearning_rate = 0.05";
    let one = write_job(tmp.path(), &data, "one", 1, train);
    let two = write_job(tmp.path(), &data, "two", 2, train);
    let cluster = LocalCluster::start(2).unwrap();
    for job in [&one, &two] {
        let out = cluster.cli(&["submit", job.to_str().unwrap(), "--follow"], JOB_TIMEOUT);
        assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    }
    let a = read_params(&tmp.path().join("out-one/latest/model.safetensors"));
    let b = read_params(&tmp.path().join("out-two/latest/model.safetensors"));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    let flat = |m: &std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)>| -> Vec<f32> {
        m.values().flat_map(|(_, v)| v.iter().copied()).collect()
    };
    let (fa, fb) = (flat(&a), flat(&b));
    let rel = relative_l2(&fa, &fb);
    eprintln!("relative L2 between 1 and 2 workers: {rel:e}");
    assert!(rel < 1e-5, "relative L2 between 1 and 2 workers: {rel}");
    // And training moved the parameters away from where both runs started,
    // so the comparison is not trivially equal. The start: the same job for
    // one step at a learning rate far below float resolution, which leaves
    // every parameter exactly where initialisation put it.
    let start = write_job(
        tmp.path(),
        &data,
        "start",
        1,
        "steps = 1\noptimizer = \"sgd\"\nlearning_rate = 1e-30",
    );
    let out = cluster.cli(
        &["submit", start.to_str().unwrap(), "--follow"],
        JOB_TIMEOUT,
    );
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    let init = flat(&read_params(
        &tmp.path().join("out-start/latest/model.safetensors"),
    ));
    assert_eq!(init.len(), fa.len());
    let moved = relative_l2(&init, &fa);
    eprintln!("relative L2 between the initial and the trained parameters: {moved:e}");
    assert!(
        moved > 1e-2,
        "training barely moved the parameters: {moved}"
    );
}

/// Adds `dropout = p` to the `[model]` table of a job written by [`write_job`].
fn set_dropout(job: &Path, p: f64) {
    let text = std::fs::read_to_string(job).expect("read job");
    let text = text.replacen("\n[data]", &format!("dropout = {p}\n\n[data]"), 1);
    std::fs::write(job, text).expect("write job");
}

/// Runs `job` to success and returns its final parameters, flattened in name
/// order. The model is found through the status' `output_dir`, so the test
/// does not depend on how output folders are laid out.
fn train_to_params(cluster: &LocalCluster, job: &Path, fallback_dir: &Path) -> Vec<f32> {
    let done = cluster.follow(job, &[]);
    assert_eq!(done["state"], "succeeded", "{done}");
    let dir = match done["output_dir"].as_str() {
        Some(d) => std::path::PathBuf::from(d),
        None => match cluster.status(done["id"].as_str().unwrap())["output_dir"].as_str() {
            Some(d) => std::path::PathBuf::from(d),
            None => fallback_dir.to_path_buf(),
        },
    };
    read_params(&dir.join("model.safetensors"))
        .into_values()
        .flat_map(|(_, v)| v)
        .collect()
}

/// Dropout masks belong to the samples, not to the ranks: with dropout on,
/// 1, 2 and 4 workers still compute the same run.
#[test]
fn one_two_and_four_workers_with_dropout_end_with_the_same_parameters() {
    let tmp = tempfile::tempdir().unwrap();
    let data = pack_digits(&tmp.path().join("digits"));
    // 300 steps cross 13 epoch boundaries, each with a short last batch
    // (1438 = 22 * 64 + 30) that 4 ranks split unevenly.
    let train = "steps = 300\noptimizer = \"sgd\"\nmomentum = 0.9\nlearning_rate = 0.05";
    let cluster = LocalCluster::start(4).unwrap();
    let mut runs = Vec::new();
    for workers in [1, 2, 4] {
        let name = format!("dropout-w{workers}");
        let job = write_job(tmp.path(), &data, &name, workers, train);
        set_dropout(&job, 0.2);
        let params = train_to_params(&cluster, &job, &tmp.path().join(format!("out-{name}")));
        runs.push((workers, params));
    }
    let (_, one) = &runs[0];
    for (workers, params) in &runs[1..] {
        assert_eq!(params.len(), one.len());
        let rel = relative_l2(one, params);
        eprintln!("dropout 0.2: relative L2 between 1 and {workers} workers: {rel:e}");
        assert!(
            rel < 1e-5,
            "dropout 0.2: relative L2 between 1 and {workers} workers: {rel}"
        );
    }

    // Dropout was really on: the same job without it ends elsewhere.
    let job = write_job(tmp.path(), &data, "no-dropout", 1, train);
    let plain = train_to_params(&cluster, &job, &tmp.path().join("out-no-dropout"));
    let rel = relative_l2(one, &plain);
    assert!(rel > 1e-2, "dropout changed the parameters by only {rel}");
}

#[test]
fn sigkill_of_a_worker_fails_the_job_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let data = pack_digits(&tmp.path().join("digits"));
    // No restarts allowed: the loss of a member fails the job, and the
    // reason must name it.
    let job = JobBuilder::new("doomed", &data)
        .seed(3)
        .hidden(&[64])
        .validation()
        .train("epochs = 100000\noptimizer = \"sgd\"\nlearning_rate = 0.01")
        .exactly(2)
        .fault("max_restarts = 0")
        .write(tmp.path());
    let mut cluster = LocalCluster::start(2).unwrap();
    let out = cluster.cli(&["submit", job.to_str().unwrap()], Duration::from_secs(30));
    assert_eq!(out.code, 0, "{}", out.stderr);
    let id = out.stdout.trim().to_string();
    wait_until(Duration::from_secs(120), || {
        let s = cluster.status(&id);
        s["state"] == "running" && s["step"].as_u64().unwrap_or(0) > 0
    })
    .expect("job never started stepping");

    let victim = cluster.workers.remove(1);
    let mut victim = victim;
    let killed_at = Instant::now();
    victim.kill();
    wait_until(Duration::from_secs(5), || {
        cluster.status(&id)["state"] == "failed"
    })
    .expect("job did not fail within 5 s of the SIGKILL");
    let failed_after = killed_at.elapsed();
    let status = cluster.status(&id);
    let reason = status["reason"].as_str().unwrap();
    assert!(
        reason.contains("worker w1"),
        "reason does not name the worker: {reason}"
    );
    assert!(failed_after < Duration::from_secs(5));

    // The survivor is freed and the coordinator still serves.
    wait_until(Duration::from_secs(10), || {
        let ws = cluster.workers_json();
        ws.len() == 1 && ws[0]["name"] == "w0" && ws[0]["state"] == "idle"
    })
    .expect("the surviving worker was not freed");
    let list = cluster.cli(&["list", "--output", "json"], Duration::from_secs(20));
    assert_eq!(list.code, 0);
    assert_eq!(list.json().as_array().unwrap().len(), 1);
}
