//! CLI behaviour against real binaries: exit codes and error text for bad
//! input, and job records that survive a coordinator restart.

use ringmaster_tests::{LocalCluster, bin, coordinator_cli, run_with_timeout};
use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

#[test]
fn usage_errors_exit_2() {
    let mut cmd = Command::new(bin("coordinator"));
    cmd.arg("frobnicate");
    let out = run_with_timeout(cmd, T);
    assert_eq!(out.code, 2, "{}", out.stderr);
    let mut cmd = Command::new(bin("worker"));
    cmd.args(["--device", "tpu"]);
    let out = run_with_timeout(cmd, T);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(
        out.stderr
            .contains("unknown device `tpu`, expected `cpu` or `cuda:N`"),
        "{}",
        out.stderr
    );
}

#[test]
fn a_bad_job_file_is_rejected_with_its_location_before_contacting_anyone() {
    let tmp = tempfile::tempdir().unwrap();
    let job = tmp.path().join("bad.toml");
    std::fs::write(&job, "name = \"x\"\nbogus = 1\n").unwrap();
    // Nothing listens on this port: validation must fail first.
    let out = coordinator_cli("http://127.0.0.1:9", &["submit", job.to_str().unwrap()], T);
    assert_eq!(out.code, 1);
    let first = out.stderr.lines().next().unwrap_or_default();
    assert!(
        first.starts_with(&format!(
            "error: {}:2:1: unknown field `bogus`",
            job.display()
        )),
        "{}",
        out.stderr
    );
}

#[test]
fn a_missing_dataset_is_reported_at_its_key() {
    let tmp = tempfile::tempdir().unwrap();
    let job = tmp.path().join("job.toml");
    std::fs::write(
        &job,
        "name = \"x\"\n[model]\nkind = \"mlp\"\nhidden = [8]\n[data]\ntrain = \"nowhere\"\n[train]\nbatch_size = 8\nsteps = 1\nlearning_rate = 0.1\n[output]\ndir = \"out\"\n",
    )
    .unwrap();
    let out = coordinator_cli(
        "http://127.0.0.1:9",
        &["submit", "--dry-run", job.to_str().unwrap()],
        T,
    );
    assert_eq!(out.code, 1);
    assert!(
        out.stderr
            .starts_with(&format!("error: {}:6:9: data.train:", job.display())),
        "{}",
        out.stderr
    );
}

#[test]
fn unknown_jobs_are_reported_and_records_survive_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(0).unwrap();
    let out = cluster.cli(&["status", "nope-1"], T);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("job `nope-1` not found"),
        "{}",
        out.stderr
    );

    // A job that can never be placed (no workers) stays queued; cancel it.
    let data = ringmaster_tests::pack_digits(&tmp.path().join("digits"));
    let job = tmp.path().join("q.toml");
    std::fs::write(
        &job,
        format!(
            "name = \"queued\"\n[model]\nkind = \"mlp\"\nhidden = [8]\n[data]\ntrain = \"{}\"\n[train]\nbatch_size = 8\nsteps = 1\nlearning_rate = 0.1\n[output]\ndir = \"out\"\n",
            data.join("train").display()
        ),
    )
    .unwrap();
    let a = cluster.cli(&["submit", job.to_str().unwrap()], T);
    assert_eq!(a.code, 0, "{}", a.stderr);
    let b = cluster.cli(&["submit", job.to_str().unwrap()], T);
    let (a, b) = (a.stdout.trim().to_string(), b.stdout.trim().to_string());
    assert_eq!((a.as_str(), b.as_str()), ("queued-1", "queued-2"));
    let c = cluster.cli(&["cancel", &b, "--output", "json"], T);
    assert_eq!(c.json()["state"], "cancelled");
    let again = cluster.cli(&["cancel", &b], T);
    assert_eq!(again.code, 1);
    assert!(
        again.stderr.contains("job `queued-2` is already cancelled"),
        "{}",
        again.stderr
    );

    // Restart the coordinator on the same state dir: both records are back,
    // the queued one still queued, and new ids continue the sequence.
    let state = cluster.state_dir.path().to_path_buf();
    let mut restarted = cluster;
    restarted.restart_coordinator().unwrap();
    assert_eq!(restarted.status(&a)["state"], "queued");
    assert_eq!(restarted.status(&b)["state"], "cancelled");
    let d = restarted.cli(&["submit", job.to_str().unwrap()], T);
    assert_eq!(d.stdout.trim(), "queued-3");
    assert!(state.join("ringmaster.redb").exists());
}
