//! High availability: two coordinators on one etcd elect a leader; the
//! standby points clients and workers at it. SIGKILL the leader mid-job and
//! the standby takes over, adopts the running job, and the job ends exactly
//! as an undisturbed run does. A deposed leader's writes are fenced (see the
//! store tests).

use ringmaster_tests::etcd::EtcdProcess;
use ringmaster_tests::{
    JobBuilder, LocalCluster, coordinator_cli, etcd_store_args, pack_digits, read_params,
    wait_until,
};
use std::path::Path;
use std::time::{Duration, Instant};

const JOB_TIMEOUT: Duration = Duration::from_secs(300);

fn write_job(dir: &Path, data: &Path, name: &str) -> std::path::PathBuf {
    JobBuilder::new(name, data)
        .seed(9)
        .train("steps = 6000\noptimizer = \"sgd\"\nmomentum = 0.9\nlearning_rate = 0.02")
        .workers(2)
        .write(dir)
}

#[test]
fn the_standby_takes_over_and_adopts_the_running_job() {
    let tmp = tempfile::tempdir().unwrap();
    let data = pack_digits(&tmp.path().join("digits"));
    let etcd = EtcdProcess::start().unwrap();
    let store = etcd_store_args(&etcd.endpoints());
    let mut cluster = LocalCluster::start_with_serve_args(0, &store).unwrap();
    let leader_url = cluster.url.clone();
    wait_until(Duration::from_secs(30), || {
        coordinator_cli(&leader_url, &["status"], Duration::from_secs(30)).code == 0
    })
    .unwrap();
    let (_standby, standby_url, _dir) = cluster.spawn_standby().unwrap();
    // Clients and workers know both; the standby redirects them.
    cluster.url = format!("{leader_url},{standby_url}");
    cluster.add_worker("w0").unwrap();
    cluster
        .wait_for_workers(1, Duration::from_secs(60))
        .unwrap();
    cluster.add_worker("w1").unwrap();
    cluster
        .wait_for_workers(2, Duration::from_secs(60))
        .unwrap();
    // Asking the standby alone reaches the leader.
    let via_standby = coordinator_cli(
        &standby_url,
        &["workers", "--output", "json"],
        Duration::from_secs(30),
    );
    assert_eq!(via_standby.code, 0, "{}", via_standby.stderr);
    assert_eq!(via_standby.json().as_array().unwrap().len(), 2);

    let reference = write_job(tmp.path(), &data, "calm");
    let out = cluster.cli(
        &["submit", reference.to_str().unwrap(), "--follow"],
        JOB_TIMEOUT,
    );
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    let job = write_job(tmp.path(), &data, "storm");
    let out = cluster.cli(&["submit", job.to_str().unwrap()], Duration::from_secs(30));
    assert_eq!(out.code, 0, "{}", out.stderr);
    let id = out.stdout.trim().to_string();
    wait_until(JOB_TIMEOUT, || {
        cluster.status(&id)["step"].as_u64().unwrap_or(0) >= 200
    })
    .unwrap();

    cluster.kill_coordinator();
    let killed = Instant::now();
    // The standby answers for itself once it leads.
    wait_until(Duration::from_secs(30), || {
        coordinator_cli(&standby_url, &["status"], Duration::from_secs(30)).code == 0
    })
    .expect("the standby never took over");
    let takeover = killed.elapsed();
    eprintln!("standby took over {takeover:?} after the leader's SIGKILL");

    let mut status = serde_json::Value::Null;
    wait_until(JOB_TIMEOUT, || {
        let out = coordinator_cli(
            &standby_url,
            &["status", &id, "--output", "json"],
            Duration::from_secs(30),
        );
        if out.code != 0 {
            return false;
        }
        status = out.json();
        status["state"] != "running"
    })
    .unwrap();
    assert_eq!(status["state"], "succeeded", "{status}");
    assert_eq!(
        status["generation"], 1,
        "the job was restarted instead of adopted"
    );
    let a = read_params(&tmp.path().join("out-calm/latest/model.safetensors"));
    let b = read_params(&tmp.path().join("out-storm/latest/model.safetensors"));
    assert_eq!(a, b, "parameters differ from the undisturbed run");
    assert!(
        takeover < Duration::from_secs(10),
        "takeover took {takeover:?}"
    );
}
