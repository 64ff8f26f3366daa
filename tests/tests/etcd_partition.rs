//! A leader cut off from etcd (but not from its workers) steps down before
//! its lease can expire, so two coordinators never act at once: it stops its
//! control loop, closes its worker sessions and stands by; the standby that
//! still reaches etcd takes over and adopts the running job. The cut is a
//! fault proxy between the first coordinator and etcd that silently stops
//! all traffic, as a partition does.

use ringmaster_tests::etcd::EtcdProcess;
use ringmaster_tests::proxy::PartitionProxy;
use ringmaster_tests::{
    JobBuilder, coordinator_cli, etcd_store_args, pack_digits, spawn_coordinator, spawn_worker,
    wait_until,
};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(30);

fn health(url: &str) -> serde_json::Value {
    let out = coordinator_cli(url, &["status", "--output", "json"], T);
    out.json()
}

fn step(url: &str, id: &str) -> Option<u64> {
    let out = coordinator_cli(url, &["status", id, "--output", "json"], T);
    (out.code == 0).then(|| out.json()["step"].as_u64().unwrap_or(0))
}

#[test]
fn a_leader_partitioned_from_etcd_steps_down_and_the_standby_adopts_its_job() {
    let tmp = tempfile::tempdir().unwrap();
    let data = pack_digits(&tmp.path().join("digits"));
    let etcd = EtcdProcess::start().unwrap();
    let endpoint = etcd.endpoint();
    let proxy = PartitionProxy::start(endpoint.trim_start_matches("http://")).unwrap();
    let via_proxy = etcd_store_args(&[format!("http://{}", proxy.addr())]);
    let direct = etcd_store_args(std::slice::from_ref(&endpoint));

    let dir_a = tempfile::tempdir().unwrap();
    let (_a, addr_a) = spawn_coordinator("127.0.0.1:0", dir_a.path(), &via_proxy).unwrap();
    let a = format!("http://{addr_a}");
    wait_until(T, || health(&a)["role"] == "leader").expect("the first coordinator never led");
    let dir_b = tempfile::tempdir().unwrap();
    let (_b, addr_b) = spawn_coordinator("127.0.0.1:0", dir_b.path(), &direct).unwrap();
    let b = format!("http://{addr_b}");
    wait_until(T, || health(&b)["role"] == "standby").unwrap();

    let both = format!("{a},{b}");
    let _workers: Vec<_> = (0..2)
        .map(|i| spawn_worker(&both, &format!("w{i}"), &[]).unwrap())
        .collect();
    let job = JobBuilder::new("part", &data)
        .train("steps = 200000\noptimizer = \"sgd\"\nlearning_rate = 0.05")
        .workers(2)
        .output("out")
        .write(tmp.path());
    let out = coordinator_cli(&a, &["submit", job.to_str().unwrap()], T);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let id = out.stdout.trim().to_string();
    wait_until(Duration::from_secs(120), || {
        step(&a, &id).unwrap_or(0) >= 100
    })
    .unwrap();

    proxy.cut();
    let cut_at = Instant::now();
    let mut h = serde_json::Value::Null;
    wait_until(Duration::from_secs(15), || {
        h = health(&a);
        h["role"] == "standby"
    })
    .expect("the partitioned leader kept leading");
    // It stood down before its 5 s lease could expire: the standby had not
    // been elected yet, so the two never led at once.
    let stood_down = cut_at.elapsed();
    assert!(stood_down < Duration::from_secs(5), "{stood_down:?}");
    assert_eq!(
        health(&b)["role"],
        "standby",
        "both coordinators led at once"
    );
    let why = h["degraded"].as_str().unwrap_or_default();
    assert!(
        why.starts_with("stepped down as leader") || why.starts_with("cannot reach the store"),
        "{h}"
    );
    // While it stands by it refuses job requests, pointing nowhere.
    assert_ne!(
        coordinator_cli(&a, &["status", &id, "--leader-wait-secs", "0"], T).code,
        0
    );

    // The standby takes over and adopts the job, which trains on.
    wait_until(T, || health(&b)["role"] == "leader").expect("the standby never took over");
    let before = step(&b, &id).unwrap_or(0);
    wait_until(Duration::from_secs(60), || {
        step(&b, &id).is_some_and(|s| s > before + 200)
    })
    .expect("the job did not train on under the new leader");
    let status = coordinator_cli(&b, &["status", &id, "--output", "json"], T).json();
    assert_eq!(status["state"], "running", "{status}");
    assert_eq!(coordinator_cli(&b, &["cancel", &id, "--now"], T).code, 0);
}
