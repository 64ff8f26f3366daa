//! Defects a new user hit with the real binaries, each reproduced here as
//! they met it: a resumed job killed by a stale adoption deadline, a worker
//! that could not start leaving its job and itself stuck, silent waits on a
//! wrong coordinator URL, Ctrl-C on `submit --follow`, two runs of one job
//! file in one output folder, and help texts.

use ringmaster_tests::{
    JobBuilder, LocalCluster, bin, coordinator_cli, pack_digits, read_metrics, run_with_timeout,
    wait_until,
};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(30);

fn job(name: &str, data: &Path, min: u32, train: &str) -> JobBuilder {
    JobBuilder::new(name, data)
        .seed(3)
        .train("optimizer = \"sgd\"\nlearning_rate = 0.05\nlog_every_steps = 1")
        .train(train)
        .workers(min)
}

/// A port nothing listens on (bound, then released).
fn dead_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn a_wrong_coordinator_url_fails_at_once() {
    let url = format!("http://127.0.0.1:{}", dead_port());
    let started = Instant::now();
    let out = coordinator_cli(&url, &["status"], T);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert!(out.stderr.contains(&url), "{}", out.stderr);
    assert!(
        out.stderr.contains("is `coordinator serve` running"),
        "{}",
        out.stderr
    );

    let started = Instant::now();
    let out = coordinator_cli("not a url", &["list"], T);
    assert_eq!(out.code, 2, "{out:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(
        out.stderr.contains("invalid coordinator URL `not a url`"),
        "{}",
        out.stderr
    );

    // Several URLs: a bounded, configurable wait that says what it waits for.
    let two = format!("{url},http://127.0.0.1:{}", dead_port());
    let started = Instant::now();
    let out = coordinator_cli(&two, &["list", "--leader-wait-secs", "1"], T);
    assert_eq!(out.code, 1);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        out.stderr
            .contains("waiting up to 1 s for a leading coordinator"),
        "{}",
        out.stderr
    );
}

#[test]
fn help_texts_name_what_each_command_takes() {
    let help = |args: &[&str]| {
        let mut c = Command::new(bin("coordinator"));
        c.args(args);
        let out = run_with_timeout(c, T);
        assert_eq!(out.code, 0, "{out:?}");
        out.stdout
    };
    let serve = help(&["serve", "--help"]);
    assert!(!serve.contains("--coordinator"), "{serve}");
    assert!(!serve.contains("--output"), "{serve}");
    let pack = help(&["dataset", "pack", "--help"]);
    assert!(!pack.contains("--coordinator"), "{pack}");
    assert!(pack.contains("--output"), "{pack}");
    for cmd in ["status", "cancel", "resume", "checkpoint", "checkpoints"] {
        let text = help(&[cmd, "--help"]);
        assert!(text.contains("The job's id"), "{cmd}: {text}");
    }
    let synth = help(&["dataset", "synth", "--help"]);
    assert!(synth.contains("--seed <SEED>\n          Seed"), "{synth}");
}

#[test]
fn ctrl_c_on_follow_leaves_the_job_running_and_says_how_to_find_it() {
    let tmp = tempfile::tempdir().unwrap();
    let data = pack_digits(&tmp.path().join("digits"));
    let cluster = LocalCluster::start(0).unwrap();
    let job = job("waits", &data, 2, "steps = 10").write(tmp.path());
    let child = Command::new(bin("coordinator"))
        .args(["submit", job.to_str().unwrap(), "--follow"])
        .env("RINGMASTER_COORDINATOR", &cluster.url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let mut guard = ringmaster_tests::ChildGuard(Some(child));
    // The job is queued (no workers): it says why.
    let mut status = serde_json::Value::Null;
    wait_until(T, || {
        // The submit may not have landed yet: "not found" is not a failure.
        let out = cluster.cli(&["status", "waits-1", "--output", "json"], T);
        out.code == 0 && {
            status = out.json();
            status["state"] == "queued"
        }
    })
    .unwrap();
    assert_eq!(
        status["waiting"], "waiting for workers: needs 2 cpu workers, 0 registered",
        "{status}"
    );
    // The client says "submitted" once it listens for Ctrl-C.
    let mut child = guard.0.take().unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    assert_eq!(line.trim(), "submitted waits-1");
    guard.0 = Some(child);
    // SAFETY: kill(2) of our own child, not yet reaped.
    unsafe { libc::kill(pid, libc::SIGINT) };
    let out = guard.0.take().unwrap().wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("job waits-1 goes on"), "{stderr}");
    assert!(
        stderr.contains("coordinator status waits-1 --follow"),
        "{stderr}"
    );
    assert!(stderr.contains("coordinator cancel waits-1"), "{stderr}");
    assert_eq!(cluster.status("waits-1")["state"], "queued");
}

#[test]
fn the_same_job_file_twice_writes_two_folders() {
    let tmp = tempfile::tempdir().unwrap();
    let data = pack_digits(&tmp.path().join("digits"));
    let cluster = LocalCluster::start(1).unwrap();
    let job = job("twice", &data, 1, "steps = 30").write(tmp.path());
    let first = cluster.follow(&job, &[]);
    let second = cluster.follow(&job, &[]);
    let dirs: Vec<PathBuf> = [&first, &second]
        .iter()
        .map(|s| PathBuf::from(s["output_dir"].as_str().unwrap()))
        .collect();
    assert_eq!(dirs[0], tmp.path().join("out-twice/twice-1"));
    assert_eq!(dirs[1], tmp.path().join("out-twice/twice-2"));
    for dir in &dirs {
        let steps: Vec<u64> = read_metrics(&dir.join("metrics.jsonl"))
            .iter()
            .map(|m| m["step"].as_u64().unwrap())
            .collect();
        assert_eq!(steps, (1..=30).collect::<Vec<_>>(), "{}", dir.display());
        assert!(dir.join("model.safetensors").exists());
    }
    assert_eq!(
        std::fs::read_link(tmp.path().join("out-twice/latest")).unwrap(),
        Path::new("twice-2")
    );
}

#[test]
fn a_worker_that_cannot_start_fails_the_job_at_once_and_is_free_again() {
    let tmp = tempfile::tempdir().unwrap();
    let data = pack_digits(&tmp.path().join("digits"));
    let mut cluster = LocalCluster::start(1).unwrap();
    cluster
        .add_worker_with_env("broken", &[("RINGMASTER_FAILPOINT", "agent-start=error")])
        .unwrap();
    cluster.wait_for_workers(2, T).unwrap();
    let job = job("nostart", &data, 2, "steps = 50").write(tmp.path());
    let started = Instant::now();
    let out = cluster.submit_follow(&job, &[]);
    assert_eq!(out.code, 1, "{out:?}");
    let status = out.json();
    assert_eq!(status["state"], "failed");
    let reason = status["reason"].as_str().unwrap();
    assert!(
        reason.contains("on worker broken failed: could not start training"),
        "{reason}"
    );
    // Not the peers' 30 s connect timeout.
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    wait_until(T, || {
        cluster.workers_json().iter().all(|w| w["state"] == "idle")
    })
    .expect("a worker stayed busy");
}

#[test]
fn a_job_resumed_after_a_coordinator_restart_is_not_killed_by_the_old_adoption_deadline() {
    let tmp = tempfile::tempdir().unwrap();
    let data = pack_digits(&tmp.path().join("digits"));
    let serve = ["--adopt-grace-secs".to_string(), "3".to_string()];
    let mut cluster = LocalCluster::start_with_serve_args(2, &serve).unwrap();
    // No restarts: the lost rank fails the job, naming it.
    let job = job("long", &data, 2, "steps = 30000")
        .checkpoint("every_steps = 200")
        .fault("max_restarts = 0")
        .write(tmp.path());
    let out = cluster.cli(&["submit", job.to_str().unwrap()], T);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let id = out.stdout.trim().to_string();
    wait_until(Duration::from_secs(120), || {
        let s = cluster.status(&id);
        s["step"].as_u64().unwrap_or(0) >= 600
    })
    .unwrap();

    cluster.kill_coordinator();
    cluster.workers[1].kill(); // w1, rank 1
    cluster.restart_coordinator().unwrap();
    // The restarted coordinator knows how far the job got (not 0/0).
    let s = cluster.status(&id);
    assert!(s["step"].as_u64().unwrap() >= 200, "{s}");
    assert_eq!(s["total_steps"], 30000, "{s}");
    let restarted = Instant::now();
    let mut s = serde_json::Value::Null;
    wait_until(T, || {
        s = cluster.status(&id);
        s["state"] == "failed"
    })
    .unwrap();
    // The lost rank is named by its worker's name.
    let reason = s["reason"].as_str().unwrap();
    assert!(reason.contains("w1 (rank 1)"), "{reason}");

    cluster.add_worker("w2").unwrap();
    cluster.wait_for_workers(2, T).unwrap();
    let out = cluster.cli(&["resume", &id], T);
    assert_eq!(out.code, 0, "{}", out.stderr);
    // Past the old generation's adoption deadline, the new one still runs.
    wait_until(T, || restarted.elapsed() > Duration::from_secs(5)).unwrap();
    let s = cluster.status(&id);
    assert_eq!(s["state"], "running", "{s}");
    assert_eq!(cluster.cli(&["cancel", &id, "--now"], T).code, 0);
}

#[test]
fn a_second_worker_with_a_name_in_use_is_refused_with_a_clear_error() {
    let cluster = LocalCluster::start(1).unwrap();
    let mut c = Command::new(bin("worker"));
    c.args([
        "--coordinator",
        &cluster.url,
        "--name",
        "w0",
        "--threads",
        "1",
    ]);
    let out = run_with_timeout(c, T);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr
            .contains("a worker named `w0` is already registered"),
        "{}",
        out.stderr
    );
    let names: Vec<String> = cluster
        .workers_json()
        .iter()
        .map(|w| w["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["w0"]);
}
