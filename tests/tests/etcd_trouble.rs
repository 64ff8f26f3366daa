//! etcd trouble with real processes: losing one member of three interrupts
//! nothing; losing quorum (two of three) makes the leader step down (it can
//! no longer keep its lease; `coordinator status` exits 1 and says why)
//! while jobs keep training, and when the store returns it leads again and
//! adopts the running job by itself.

use ringmaster_tests::etcd::EtcdCluster;
use ringmaster_tests::{
    JobBuilder, LocalCluster, etcd_store_args, last_logged_step, pack_digits, wait_until,
};
use std::path::Path;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

fn write_job(dir: &Path, data: &Path, steps: u64) -> std::path::PathBuf {
    JobBuilder::new("etcd-job", data)
        .train(&format!(
            "steps = {steps}\noptimizer = \"sgd\"\nlearning_rate = 0.05"
        ))
        .workers(2)
        .output("out")
        .checkpoint("every_steps = 500")
        .write(dir)
}

fn health(cluster: &LocalCluster) -> (i32, serde_json::Value) {
    let out = cluster.cli(&["status", "--output", "json"], T);
    (out.code, out.json())
}

#[test]
fn losing_one_of_three_etcd_members_interrupts_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let data = pack_digits(&tmp.path().join("digits"));
    let mut etcd = EtcdCluster::start(3).unwrap();
    let cluster =
        LocalCluster::start_with_serve_args(2, &etcd_store_args(&etcd.endpoints())).unwrap();
    let job = write_job(tmp.path(), &data, 4000);
    let out = cluster.cli(&["submit", job.to_str().unwrap()], T);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let id = out.stdout.trim().to_string();
    wait_until(Duration::from_secs(120), || {
        cluster.status(&id)["step"].as_u64().unwrap_or(0) >= 300
    })
    .unwrap();
    etcd.kill(0);
    let mut status = serde_json::Value::Null;
    wait_until(Duration::from_secs(300), || {
        status = cluster.status(&id);
        status["state"] != "running"
    })
    .unwrap();
    assert_eq!(status["state"], "succeeded", "{status}");
    // Checkpoints kept being committed through the remaining members.
    let out = cluster.cli(&["checkpoints", &id, "--output", "json"], T);
    let steps: Vec<u64> = out
        .json()
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["step"].as_u64())
        .collect();
    assert_eq!(steps, vec![500, 1000, 1500, 2000, 2500, 3000, 3500, 4000]);
    assert_eq!(health(&cluster).0, 0);
}

#[test]
fn losing_etcd_quorum_degrades_the_coordinator_until_it_returns() {
    let tmp = tempfile::tempdir().unwrap();
    let data = pack_digits(&tmp.path().join("digits"));
    let mut etcd = EtcdCluster::start(3).unwrap();
    let cluster =
        LocalCluster::start_with_serve_args(2, &etcd_store_args(&etcd.endpoints())).unwrap();
    let (code, h) = health(&cluster);
    assert_eq!((code, h["state"].as_str()), (0, Some("healthy")), "{h}");
    // Long enough to outlast the outage on any machine (the test cancels it):
    // 20000 steps once ended while etcd was still coming back.
    let job = write_job(tmp.path(), &data, 10_000_000);
    let out = cluster.cli(&["submit", job.to_str().unwrap()], T);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let id = out.stdout.trim().to_string();
    wait_until(Duration::from_secs(120), || {
        cluster.status(&id)["step"].as_u64().unwrap_or(0) >= 100
    })
    .unwrap();

    // Two of three members gone: the survivor has no quorum.
    etcd.kill(1);
    etcd.kill(2);
    let mut h = serde_json::Value::Null;
    wait_until(Duration::from_secs(60), || {
        let (code, v) = health(&cluster);
        h = v;
        code == 1 && h["role"] == "standby"
    })
    .expect("the coordinator never stepped down");
    assert_eq!(h["state"], "degraded", "{h}");
    // First why it stepped down, then what keeps it from leading again.
    let why = h["degraded"].as_str().unwrap();
    assert!(
        why.starts_with("stepped down as leader") || why.starts_with("cannot reach the store"),
        "{h}"
    );
    // Training goes on meanwhile: rank 0 keeps logging.
    let metrics = cluster_metrics(tmp.path());
    let before = last_logged_step(&metrics);
    wait_until(Duration::from_secs(60), || {
        last_logged_step(&metrics) > before + 100
    })
    .expect("training stopped while the store was down");

    etcd.restart(1).unwrap();
    etcd.restart(2).unwrap();
    wait_until(Duration::from_secs(60), || health(&cluster).0 == 0)
        .expect("the coordinator did not lead again when the store returned");
    // The job was adopted, not restarted: it is still running, ahead of
    // where it was when the store went away.
    let mut status = serde_json::Value::Null;
    wait_until(Duration::from_secs(60), || {
        status = cluster.status(&id);
        status["state"] == "running" && status["step"].as_u64().unwrap_or(0) > before
    })
    .unwrap_or_else(|_| panic!("the job was not adopted: {status}"));
    assert_eq!(status["generation"], 1, "{status}");
    assert_eq!(cluster.cli(&["cancel", &id, "--now"], T).code, 0);
}

/// `metrics.jsonl` of the job (each job writes into `out/<id>/`).
fn cluster_metrics(root: &Path) -> std::path::PathBuf {
    root.join("out/latest/metrics.jsonl")
}
