//! In-place recovery, with the real binaries: a member of a running job is
//! SIGKILLed; the survivors keep their state, the coordinator forms the next
//! generation (from a spare, or from a worker that joins later), a survivor
//! hands its state to the newcomer over the data plane, and the job ends
//! where an undisturbed run ends. The chaos and growth cases also keep the
//! sample audit (`[debug] audit_samples`) and prove from it that every step
//! applied once and every sample once per epoch, which matching parameters
//! alone cannot show.

use ringmaster_tests::audit::{Expect, assert_exactly_once, train_samples};
use ringmaster_tests::{
    JobBuilder, LocalCluster, pack_digits, read_params, relative_l2, wait_until,
};
use std::path::Path;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(120);

/// A job long enough to be killed in the middle of (a few seconds on two
/// cores), with dropout on so the newcomer's part of each batch must get the
/// same masks the lost rank would have drawn.
fn job(name: &str, data: &Path, dir: &Path, min: u32, max: u32) -> std::path::PathBuf {
    builder(name, data, min, max).write(dir)
}

fn builder(name: &str, data: &Path, min: u32, max: u32) -> JobBuilder {
    JobBuilder::new(name, data)
        .seed(11)
        .hidden(&[128, 128])
        .model("dropout = 0.2")
        .batch(96)
        .train("steps = 1500\noptimizer = \"sgd\"\nmomentum = 0.9\nlearning_rate = 0.02")
        .train("log_every_steps = 10")
        .workers(min)
        .max(max)
}

fn params_of(cluster: &LocalCluster, id: &str) -> Vec<f32> {
    let status = cluster.status(id);
    let dir = status["output_dir"].as_str().expect("an output folder");
    read_params(&Path::new(dir).join("model.safetensors"))
        .into_values()
        .flat_map(|(_, v)| v)
        .collect()
}

fn submit(cluster: &LocalCluster, job: &Path) -> String {
    let out = cluster.cli(&["submit", job.to_str().unwrap()], T);
    assert_eq!(out.code, 0, "{}", out.stderr);
    out.stdout.trim().to_string()
}

fn wait_for_step(cluster: &LocalCluster, id: &str, step: u64) {
    wait_until(T, || {
        let s = cluster.status(id);
        s["state"] == "running" && s["step"].as_u64().unwrap_or(0) >= step
    })
    .unwrap_or_else(|_| panic!("job {id} never reached step {step}: {}", cluster.status(id)));
}

/// The worker process named `name` in the cluster (workers are `w0`, `w1`, ...
/// in start order).
fn kill_worker(cluster: &mut LocalCluster, name: &str) {
    let index: usize = name.trim_start_matches('w').parse().expect("a wN name");
    cluster.workers[index].kill();
}

fn wait_for_end(cluster: &LocalCluster, id: &str) -> serde_json::Value {
    let mut s = serde_json::Value::Null;
    wait_until(Duration::from_secs(300), || {
        s = cluster.status(id);
        s["state"] == "succeeded" || s["state"] == "failed" || s["state"] == "cancelled"
    })
    .unwrap_or_else(|_| panic!("job {id} did not end: {s}"));
    s
}

/// Runs `job` undisturbed to success; its final parameters.
fn undisturbed(cluster: &LocalCluster, job: &Path) -> Vec<f32> {
    let done = cluster.follow(job, &[]);
    assert_eq!(done["state"], "succeeded", "{done}");
    params_of(cluster, done["id"].as_str().unwrap())
}

/// Checks the finished job's sample audit against `steps` steps of batches
/// of 96 over `data`'s training set; how many generations wrote to it.
fn assert_audited(end: &serde_json::Value, data: &Path, steps: u64) -> usize {
    let dir = end["output_dir"].as_str().expect("an output folder");
    let expect = Expect {
        train_samples: train_samples(data),
        global_batch: 96,
        steps,
    };
    assert_exactly_once(Path::new(dir), &expect).generations
}

/// The current members' names.
fn members(cluster: &LocalCluster, id: &str) -> Vec<String> {
    serde_json::from_value(cluster.status(id)["members"].clone()).expect("members are names")
}

/// Waits until the job runs again in a generation after `generation` (or
/// has succeeded, when `or_done`); its status.
fn wait_reformed(
    cluster: &LocalCluster,
    id: &str,
    generation: u64,
    or_done: bool,
) -> serde_json::Value {
    let mut s = serde_json::Value::Null;
    wait_until(T, || {
        s = cluster.status(id);
        (s["generation"].as_u64().unwrap_or(0) > generation && s["state"] == "running")
            || (or_done && s["state"] == "succeeded")
    })
    .unwrap_or_else(|_| panic!("the job did not re-form after generation {generation}: {s}"));
    s
}

/// Waits for the job to succeed and checks it computed the run `expected`
/// came from; its final status.
fn assert_ends_as(cluster: &LocalCluster, id: &str, expected: &[f32]) -> serde_json::Value {
    let end = wait_for_end(cluster, id);
    assert_eq!(end["state"], "succeeded", "{end}");
    let rel = relative_l2(expected, &params_of(cluster, id));
    eprintln!("relative L2 to the undisturbed run: {rel:e}");
    assert!(rel < 1e-5, "relative L2 to the undisturbed run: {rel}");
    end
}

#[test]
fn a_killed_member_is_replaced_by_a_spare_and_the_run_matches_an_undisturbed_one() {
    let tmp = tempfile::tempdir().unwrap();
    let data = pack_digits(&tmp.path().join("digits"));
    let mut cluster = LocalCluster::start(3).unwrap();

    // Undisturbed reference with the same world size: the disturbed run
    // must not differ from it beyond float summation order (with two ranks
    // there is none: a + b is b + a).
    let expected = undisturbed(&cluster, &job("reference", &data, tmp.path(), 2, 2));

    // Two members and a spare; one member dies mid-run.
    let disturbed = job("disturbed", &data, tmp.path(), 2, 2);
    let id = submit(&cluster, &disturbed);
    wait_for_step(&cluster, &id, 300);
    let members = members(&cluster, &id);
    assert_eq!(members.len(), 2, "{members:?}");
    let victim = members[1].clone();
    let killed = Instant::now();
    kill_worker(&mut cluster, &victim);

    // The job re-forms around the survivor and the spare.
    let s = wait_reformed(&cluster, &id, 1, false);
    eprintln!("re-formed {:?} after the SIGKILL: {s}", killed.elapsed());
    let members: Vec<String> = serde_json::from_value(s["members"].clone()).unwrap();
    assert!(!members.contains(&victim), "{members:?}");
    assert_eq!(members.len(), 2, "{members:?}");

    let end = assert_ends_as(&cluster, &id, &expected);
    assert_eq!(end["restarts"], 1, "{end}");
    let events = end["events"].to_string();
    assert!(
        events.contains(&victim),
        "the incident names the lost worker: {events}"
    );

    // The timeline: detected, evicted, formed, state moved, first step.
    let out = cluster.cli(&["events", &id, "--output", "json"], T);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let incidents = out.json();
    let all = incidents.as_array().expect("a list of incidents");
    assert_eq!(all.len(), 1, "{incidents}");
    let i = &all[0];
    assert_eq!(i["kind"], "loss", "{i}");
    assert!(i["detected"].as_str().unwrap().contains(&victim), "{i}");
    assert!(i["evicted"].to_string().contains(&victim), "{i}");
    assert_eq!(i["generation"], 2, "{i}");
    assert!(i["transfer_bytes"].as_u64().unwrap() > 100_000, "{i}");
    let ms = i["recovery_ms"]
        .as_u64()
        .expect("a first step after the incident");
    eprintln!("from detection to the first step of the new generation: {ms} ms");
    let text = cluster.cli(&["events", &id], T);
    assert_eq!(text.code, 0, "{}", text.stderr);
    for line in [
        "detected: worker",
        "generation 2 formed",
        "state transferred",
        "first step",
    ] {
        assert!(text.stdout.contains(line), "{line}: {}", text.stdout);
    }
}

/// Rank 0's batch-normalization buffers are every rank's after each step, so
/// when rank 0 dies its survivor carries them into the next generation: the
/// run ends exactly where an undisturbed one does, running statistics and
/// batch counts included.
#[test]
fn a_batch_norm_run_that_loses_rank_0_ends_bitwise_as_an_undisturbed_one() {
    let tmp = tempfile::tempdir().unwrap();
    let data = pack_digits(&tmp.path().join("digits"));
    let mut cluster = LocalCluster::start(3).unwrap();
    let bn = |name: &str| {
        JobBuilder::new(name, &data)
            .seed(5)
            .model_kind(
                "kind = \"cnn\"\ninput_shape = [1, 8, 8]\nchannels = [16, 32]\nnorm = \"batch\"",
            )
            .train("steps = 1500\noptimizer = \"adam\"\nlearning_rate = 0.002")
            .exactly(2)
            .write(tmp.path())
    };
    let expected = undisturbed(&cluster, &bn("reference"));

    let id = submit(&cluster, &bn("disturbed"));
    wait_for_step(&cluster, &id, 300);
    let victim = members(&cluster, &id)[0].clone();
    kill_worker(&mut cluster, &victim);
    let s = wait_reformed(&cluster, &id, 1, true);
    assert!(
        !s["members"].to_string().contains(&victim) || s["state"] == "succeeded",
        "{s}"
    );
    let end = wait_for_end(&cluster, &id);
    assert_eq!(end["state"], "succeeded", "{end}");
    assert_eq!(
        end["restarts"], 1,
        "the run finished before the kill: {end}"
    );
    assert_eq!(params_of(&cluster, &id), expected);
}

#[test]
fn below_the_minimum_the_job_waits_recovering_and_goes_on_when_a_worker_joins() {
    let tmp = tempfile::tempdir().unwrap();
    let data = pack_digits(&tmp.path().join("digits"));
    let mut cluster = LocalCluster::start(2).unwrap();
    let expected = undisturbed(&cluster, &job("reference", &data, tmp.path(), 2, 2));

    let disturbed = job("waits", &data, tmp.path(), 2, 2);
    let id = submit(&cluster, &disturbed);
    wait_for_step(&cluster, &id, 300);
    kill_worker(&mut cluster, "w1");

    let mut s = serde_json::Value::Null;
    wait_until(T, || {
        s = cluster.status(&id);
        s["state"] == "recovering"
    })
    .unwrap_or_else(|_| panic!("the job is not recovering: {s}"));
    // It waits (the survivor holds the state) until a worker joins.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(cluster.status(&id)["state"], "recovering");

    cluster.add_worker("w2").unwrap();
    let end = assert_ends_as(&cluster, &id, &expected);
    assert_eq!(end["restarts"], 1, "{end}");
}

#[test]
fn a_job_out_of_restarts_fails_listing_its_incidents() {
    let tmp = tempfile::tempdir().unwrap();
    let data = pack_digits(&tmp.path().join("digits"));
    let mut cluster = LocalCluster::start(3).unwrap();
    let spec = JobBuilder::new("budget", &data)
        .seed(11)
        .hidden(&[128, 128])
        .batch(96)
        .train("steps = 100000\noptimizer = \"sgd\"\nlearning_rate = 0.02")
        .workers(2)
        .max(2)
        .fault("max_restarts = 1")
        .write(tmp.path());
    let id = submit(&cluster, &spec);
    wait_for_step(&cluster, &id, 100);
    let first = members(&cluster, &id);
    kill_worker(&mut cluster, &first[1]);
    wait_reformed(&cluster, &id, 1, false);
    let step = cluster.status(&id)["step"].as_u64().unwrap_or(0);
    wait_for_step(&cluster, &id, step + 50);
    let members = members(&cluster, &id);
    kill_worker(&mut cluster, &members[0]);
    let end = wait_for_end(&cluster, &id);
    assert_eq!(end["state"], "failed", "{end}");
    let reason = end["reason"].as_str().unwrap();
    assert!(
        reason.contains("restart budget") && reason.contains(&members[0]),
        "{reason}"
    );
}

#[test]
fn a_stopped_member_is_taken_as_lost_when_its_heartbeats_stop_and_the_job_re_forms() {
    let tmp = tempfile::tempdir().unwrap();
    let data = pack_digits(&tmp.path().join("digits"));
    let cluster = LocalCluster::start(3).unwrap();
    let expected = undisturbed(&cluster, &job("reference", &data, tmp.path(), 2, 2));

    let id = submit(&cluster, &job("stopped", &data, tmp.path(), 2, 2));
    wait_for_step(&cluster, &id, 300);
    let members = members(&cluster, &id);
    let index: usize = members[1].trim_start_matches('w').parse().unwrap();
    // Alive but frozen: its sockets stay open, only its silence tells.
    let pid = cluster.workers[index].pid() as i32;
    // SAFETY: signalling a child process this test spawned and still owns.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let stopped = Instant::now();
    let s = wait_reformed(&cluster, &id, 1, false);
    eprintln!("re-formed {:?} after the SIGSTOP", stopped.elapsed());
    let members_now: Vec<String> = serde_json::from_value(s["members"].clone()).unwrap();
    assert!(!members_now.contains(&members[1]), "{members_now:?}");
    assert_ends_as(&cluster, &id, &expected);
    // SAFETY: as above; the guard then kills and reaps it.
    unsafe { libc::kill(pid, libc::SIGCONT) };
}

#[test]
fn a_member_that_stops_stepping_is_left_behind_by_the_hang_watchdog() {
    let tmp = tempfile::tempdir().unwrap();
    let data = pack_digits(&tmp.path().join("digits"));
    let mut cluster = LocalCluster::start(2).unwrap();
    let expected = undisturbed(&cluster, &job("reference", &data, tmp.path(), 2, 2));

    // w1 leaves; w2 stops making progress at step 200 while its process and
    // heartbeats live on (a stuck data loader); w3 is the spare.
    // Registration order is rank order: wait for each worker in turn.
    kill_worker(&mut cluster, "w1");
    cluster.wait_for_workers(1, T).unwrap();
    let hangs = [("RINGMASTER_FAILPOINT", "trainer-hang-at-step=200")];
    cluster.add_worker_with_env("w2", &hangs).unwrap();
    cluster.wait_for_workers(2, T).unwrap();
    cluster.add_worker("w3").unwrap();
    cluster.wait_for_workers(3, T).unwrap();
    let spec = builder("hangs", &data, 2, 2)
        .fault("hang_timeout_secs = 2")
        .write(tmp.path());
    let id = submit(&cluster, &spec);
    let s = wait_reformed(&cluster, &id, 1, false);
    let members: Vec<String> = serde_json::from_value(s["members"].clone()).unwrap();
    assert!(!members.contains(&"w2".to_string()), "{members:?}");
    assert!(s["events"].to_string().contains("w2"), "{s}");
    assert_ends_as(&cluster, &id, &expected);
}

#[test]
fn a_job_below_its_max_grows_when_a_worker_joins_and_still_computes_the_same_run() {
    let tmp = tempfile::tempdir().unwrap();
    let data = pack_digits(&tmp.path().join("digits"));
    // A smaller model than the other cases: the run changes world size
    // mid-way, so it is compared with one worker's run, which it matches up
    // to float summation order. Long enough (8000 steps) that the new
    // worker's process registers before the job ends, even on a loaded
    // machine (2000 once ended first while other tests ran beside it).
    let grows = |name: &str| {
        JobBuilder::new(name, &data)
            .seed(11)
            .hidden(&[64])
            .model("dropout = 0.2")
            .batch(96)
            .train("steps = 8000\noptimizer = \"sgd\"\nmomentum = 0.9\nlearning_rate = 0.02")
            .train("log_every_steps = 10")
            .workers(1)
            .max(2)
            .debug("audit_samples = true")
            .write(tmp.path())
    };
    let mut cluster = LocalCluster::start(1).unwrap();
    let expected = undisturbed(&cluster, &grows("alone"));

    let id = submit(&cluster, &grows("grows"));
    wait_for_step(&cluster, &id, 200);
    cluster.add_worker("w1").unwrap();
    let s = wait_reformed(&cluster, &id, 1, false);
    let members: Vec<String> = serde_json::from_value(s["members"].clone()).unwrap();
    assert_eq!(members, ["w0", "w1"], "{s}");
    let end = assert_ends_as(&cluster, &id, &expected);
    assert_eq!(end["restarts"], 0, "{end}");
    let generations = assert_audited(&end, &data, 8000);
    assert!(
        generations >= 2,
        "the audit spans the growth: {generations}"
    );
}

/// Chaos: a job on 3 workers with 2 spares loses a random member at a
/// random step, again and again (`RINGMASTER_CHAOS_KILLS`, default 5); each
/// killed worker comes back as a fresh process. The job ends where an
/// undisturbed run ends. The order of kills is drawn from a fixed seed
/// (`RINGMASTER_CHAOS_SEED`) so a failure can be replayed.
#[test]
fn chaos_repeated_sigkills_of_random_members_leave_the_result_unchanged() {
    let kills: u64 = std::env::var("RINGMASTER_CHAOS_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let mut seed: u64 = std::env::var("RINGMASTER_CHAOS_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed);
    let mut draw = |n: u64| {
        // xorshift64*: enough to spread kills, and reproducible.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    };
    let tmp = tempfile::tempdir().unwrap();
    let data = pack_digits(&tmp.path().join("digits"));
    let steps = 400 + 300 * kills;
    let chaos = |name: &str| {
        JobBuilder::new(name, &data)
            .seed(11)
            .hidden(&[64])
            .model("dropout = 0.2")
            .batch(96)
            .train(&format!(
                "steps = {steps}\noptimizer = \"sgd\"\nmomentum = 0.9\nlearning_rate = 0.02"
            ))
            .train("log_every_steps = 10")
            .workers(3)
            .max(3)
            .fault(&format!("max_restarts = {kills}"))
            .debug("audit_samples = true")
            .write(tmp.path())
    };
    let mut cluster = LocalCluster::start(5).unwrap();
    let expected = undisturbed(&cluster, &chaos("calm"));

    let id = submit(&cluster, &chaos("chaos"));
    let mut at = 0;
    for k in 0..kills {
        at += 100 + draw(200);
        wait_for_step(&cluster, &id, at);
        let members = members(&cluster, &id);
        let victim = members[draw(members.len() as u64) as usize].clone();
        let generation = cluster.status(&id)["generation"].as_u64().unwrap();
        eprintln!("kill {}: {victim} at step >= {at}", k + 1);
        kill_worker(&mut cluster, &victim);
        // A fresh process under a new name comes back as a spare.
        cluster.add_worker(&format!("w{}", 5 + k)).unwrap();
        wait_reformed(&cluster, &id, generation, true);
    }
    let end = assert_ends_as(&cluster, &id, &expected);
    assert_eq!(end["restarts"], kills, "{end}");
    let generations = assert_audited(&end, &data, steps);
    assert!(
        generations as u64 > kills,
        "the audit spans every generation: {generations}"
    );
}

#[test]
fn a_diverged_loss_fails_the_job_at_once_and_spends_no_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let data = pack_digits(&tmp.path().join("digits"));
    let cluster = LocalCluster::start(2).unwrap();
    // A learning rate no model survives: the loss becomes infinite or NaN
    // within a few steps.
    let spec = JobBuilder::new("diverges", &data)
        .seed(11)
        .hidden(&[64])
        .batch(96)
        .train("steps = 1000\noptimizer = \"sgd\"\nlearning_rate = 1e30")
        .workers(2)
        .max(2)
        .write(tmp.path());
    let id = submit(&cluster, &spec);
    let end = wait_for_end(&cluster, &id);
    assert_eq!(end["state"], "failed", "{end}");
    assert_eq!(end["restarts"], 0, "{end}");
    assert_eq!(end["generation"], 1, "{end}");
    let reason = end["reason"].as_str().unwrap();
    assert!(
        reason.contains("training diverged") && reason.contains("at step"),
        "{reason}"
    );
    assert!(end["step"].as_u64().unwrap() < 1000, "{end}");
    eprintln!("{reason}");
}

#[test]
fn a_member_whose_session_breaks_reconnects_and_keeps_its_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let data = pack_digits(&tmp.path().join("digits"));
    let mut cluster = LocalCluster::start(1).unwrap();
    // The second worker reaches the coordinator through a proxy that can
    // break its session while both processes live on.
    let target = cluster.url.trim_start_matches("http://").to_string();
    let proxy = ringmaster_tests::proxy::PartitionProxy::start(&target).unwrap();
    let url = format!("http://{}", proxy.addr());
    cluster
        .workers
        .push(ringmaster_tests::spawn_worker(&url, "proxied", &[]).unwrap());
    cluster.wait_for_workers(2, T).unwrap();
    let expected = undisturbed(&cluster, &job("reference", &data, tmp.path(), 2, 2));

    let id = submit(&cluster, &job("broken-session", &data, tmp.path(), 2, 2));
    wait_for_step(&cluster, &id, 300);
    proxy.reset();
    let mut s = serde_json::Value::Null;
    wait_until(T, || {
        s = cluster.status(&id);
        s["events"].to_string().contains("reconnected") || s["state"] != "running"
    })
    .unwrap_or_else(|_| panic!("the worker never reconnected: {s}"));
    eprintln!("after the session broke: {s}");

    let end = assert_ends_as(&cluster, &id, &expected);
    assert_eq!(end["restarts"], 0, "{end}");
    assert_eq!(end["generation"], 1, "nothing re-formed: {end}");
    assert!(
        end["events"]
            .to_string()
            .contains("worker proxied reconnected and took rank"),
        "{end}"
    );
}

/// A cluster whose coordinator gives rejoining workers `adopt_secs`.
fn cluster_with_adopt_grace(workers: usize, adopt_secs: u32) -> LocalCluster {
    let serve = ["--adopt-grace-secs".to_string(), adopt_secs.to_string()];
    LocalCluster::start_with_serve_args(workers, &serve).unwrap()
}

#[test]
fn a_coordinator_killed_while_a_job_re_forms_resumes_the_re_forming_from_the_survivors_state() {
    let tmp = tempfile::tempdir().unwrap();
    let data = pack_digits(&tmp.path().join("digits"));
    let mut cluster = cluster_with_adopt_grace(2, 5);
    let expected = undisturbed(&cluster, &job("reference", &data, tmp.path(), 2, 2));

    // No checkpoints: whatever the job resumes from is a survivor's memory.
    let id = submit(&cluster, &job("restarted", &data, tmp.path(), 2, 2));
    wait_for_step(&cluster, &id, 300);
    kill_worker(&mut cluster, "w1");
    let mut s = serde_json::Value::Null;
    wait_until(T, || {
        s = cluster.status(&id);
        s["state"] == "recovering"
    })
    .unwrap_or_else(|_| panic!("the job is not recovering: {s}"));

    cluster.kill_coordinator();
    cluster.restart_coordinator().unwrap();
    let s = cluster.status(&id);
    assert_eq!(s["state"], "recovering", "{s}");
    cluster.add_worker("w2").unwrap();

    let s = wait_reformed(&cluster, &id, 1, false);
    eprintln!("re-formed after the restart: {s}");
    assert!(
        s["step"].as_u64().unwrap() >= 300,
        "the survivor's state, not a fresh start: {s}"
    );
    let end = assert_ends_as(&cluster, &id, &expected);
    assert_eq!(end["restarts"], 1, "{end}");
    assert!(
        end["events"]
            .to_string()
            .contains("coordinator restarted while the job re-formed"),
        "{end}"
    );
}

#[test]
fn a_worker_killed_while_the_coordinator_is_down_is_replaced_when_it_comes_back() {
    let tmp = tempfile::tempdir().unwrap();
    let data = pack_digits(&tmp.path().join("digits"));
    let mut cluster = cluster_with_adopt_grace(3, 3);
    let expected = undisturbed(&cluster, &job("reference", &data, tmp.path(), 2, 2));

    let id = submit(&cluster, &job("orphaned", &data, tmp.path(), 2, 2));
    wait_for_step(&cluster, &id, 300);
    let victim = members(&cluster, &id)[1].clone();
    cluster.kill_coordinator();
    kill_worker(&mut cluster, &victim);
    cluster.restart_coordinator().unwrap();

    // The survivor rejoins holding its state, the victim never does: the
    // job re-forms with the spare once the adoption grace has passed.
    let s = wait_reformed(&cluster, &id, 1, false);
    eprintln!("re-formed after the restart: {s}");
    let members: Vec<String> = serde_json::from_value(s["members"].clone()).unwrap();
    assert!(!members.contains(&victim), "{members:?}");
    assert!(s["step"].as_u64().unwrap() >= 300, "{s}");
    let end = assert_ends_as(&cluster, &id, &expected);
    assert_eq!(end["restarts"], 1, "{end}");
}

#[test]
fn past_the_rejoin_timeout_the_survivors_state_is_checkpointed_and_the_job_resumes_from_it() {
    let tmp = tempfile::tempdir().unwrap();
    let data = pack_digits(&tmp.path().join("digits"));
    let mut cluster = LocalCluster::start(2).unwrap();
    let expected = undisturbed(&cluster, &job("reference", &data, tmp.path(), 2, 2));

    // No periodic checkpoints: the only one is the survivor's.
    let waits = builder("requeued", &data, 2, 2)
        .fault("rejoin_timeout_secs = 2")
        .write(tmp.path());
    let id = submit(&cluster, &waits);
    wait_for_step(&cluster, &id, 300);
    kill_worker(&mut cluster, "w1");
    let mut s = serde_json::Value::Null;
    wait_until(T, || {
        s = cluster.status(&id);
        s["state"] == "queued"
    })
    .unwrap_or_else(|_| panic!("the job was not queued again: {s}"));
    let out = cluster.cli(&["checkpoints", &id, "--output", "json"], T);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let saved = out.json();
    let step = saved[0]["step"]
        .as_u64()
        .expect("the survivor's checkpoint");
    assert!(step >= 300, "{saved}");

    cluster.add_worker("w2").unwrap();
    let s = wait_reformed(&cluster, &id, 1, true);
    eprintln!("resumed: {s}");
    let end = assert_ends_as(&cluster, &id, &expected);
    let events = end["events"].to_string();
    assert!(
        events.contains(&format!("resume from its checkpoint at step {step}")),
        "{events}"
    );
}
