//! The coordinator is off the step path: SIGKILL it while a 2-worker job
//! trains, and the workers keep stepping, reconnect, and are adopted by the
//! restarted coordinator, which rebuilds its model from the store. The job
//! then ends exactly as an undisturbed run does. Run on the embedded store
//! (same state dir) and on a real etcd.

use ringmaster_tests::etcd::EtcdProcess;
use ringmaster_tests::{
    JobBuilder, LocalCluster, etcd_store_args, last_logged_step, pack_digits, read_metrics,
    read_params, wait_until,
};
use std::path::Path;
use std::time::Duration;

const JOB_TIMEOUT: Duration = Duration::from_secs(300);

fn write_job(dir: &Path, data: &Path, name: &str) -> std::path::PathBuf {
    JobBuilder::new(name, data)
        .seed(5)
        .model("dropout = 0.1")
        .validation()
        .train("steps = 6000\noptimizer = \"adam\"\nlearning_rate = 0.002")
        .train("eval_every_steps = 1000\nlog_every_steps = 1")
        .workers(2)
        .write(dir)
}

fn restart_mid_job(serve_args: &[String]) {
    let tmp = tempfile::tempdir().unwrap();
    let data = pack_digits(&tmp.path().join("digits"));
    let reference = write_job(tmp.path(), &data, "calm");
    let chaos = write_job(tmp.path(), &data, "chaos");
    let mut cluster = LocalCluster::start_with_serve_args(2, serve_args).unwrap();

    let out = cluster.cli(
        &["submit", reference.to_str().unwrap(), "--follow"],
        JOB_TIMEOUT,
    );
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);

    let out = cluster.cli(
        &["submit", chaos.to_str().unwrap()],
        Duration::from_secs(30),
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let id = out.stdout.trim().to_string();
    let metrics = tmp.path().join("out-chaos/latest/metrics.jsonl");
    wait_until(JOB_TIMEOUT, || last_logged_step(&metrics) >= 200).unwrap();

    cluster.kill_coordinator();
    let at_kill = last_logged_step(&metrics);
    // Training goes on without a coordinator.
    wait_until(Duration::from_secs(60), || {
        last_logged_step(&metrics) >= at_kill + 200
    })
    .expect("the workers stopped stepping while the coordinator was down");
    assert!(
        last_logged_step(&metrics) < 6000,
        "the job finished before the restart"
    );

    cluster.restart_coordinator().unwrap();
    let mut status = serde_json::Value::Null;
    wait_until(JOB_TIMEOUT, || {
        status = cluster.status(&id);
        status["state"] != "running"
    })
    .unwrap();
    assert_eq!(status["state"], "succeeded", "{status}");
    let events: Vec<&str> = status["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e.as_str())
        .collect();
    assert!(
        events
            .iter()
            .any(|e| e.starts_with("adopted after a coordinator restart at step")),
        "{events:?}"
    );
    assert_eq!(
        status["generation"], 1,
        "the job was restarted instead of adopted"
    );

    let a = read_params(&tmp.path().join("out-calm/latest/model.safetensors"));
    let b = read_params(&tmp.path().join("out-chaos/latest/model.safetensors"));
    assert_eq!(a, b, "parameters differ from the undisturbed run");
    let losses = |p: &Path| -> Vec<(u64, f64)> {
        read_metrics(p)
            .iter()
            .filter_map(|m| Some((m["step"].as_u64()?, m["loss"].as_f64()?)))
            .collect()
    };
    assert_eq!(
        losses(&tmp.path().join("out-calm/latest/metrics.jsonl")),
        losses(&metrics)
    );
}

#[test]
fn coordinator_sigkill_and_restart_on_the_embedded_store() {
    restart_mid_job(&[]);
}

#[test]
fn coordinator_sigkill_and_restart_on_etcd() {
    let etcd = EtcdProcess::start().unwrap();
    restart_mid_job(&etcd_store_args(&etcd.endpoints()));
}
