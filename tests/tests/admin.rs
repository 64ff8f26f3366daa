//! An admin's operations on workers, with the real binaries: `drain` takes a
//! member out of its running job at a step boundary (the job re-forms with
//! a spare, spending no restart, and ends where an undisturbed run ends),
//! `cordon` keeps new work off a worker, `uncordon` brings it back, and
//! `coordinator workers` says which is which and why. The drained run's
//! sample audit shows every sample applied exactly once per epoch.

use ringmaster_tests::audit::{Expect, assert_exactly_once, train_samples};
use ringmaster_tests::{
    JobBuilder, LocalCluster, pack_digits, read_params, relative_l2, wait_until,
};
use std::path::Path;
use std::time::Duration;

const T: Duration = Duration::from_secs(120);

fn job(name: &str, data: &Path, dir: &Path) -> std::path::PathBuf {
    JobBuilder::new(name, data)
        .seed(5)
        .hidden(&[128, 128])
        .model("dropout = 0.2")
        .batch(96)
        .train("steps = 1500\noptimizer = \"sgd\"\nmomentum = 0.9\nlearning_rate = 0.02")
        .exactly(2)
        .debug("audit_samples = true")
        .write(dir)
}

fn params(status: &serde_json::Value) -> Vec<f32> {
    let dir = status["output_dir"].as_str().expect("an output folder");
    read_params(&Path::new(dir).join("model.safetensors"))
        .into_values()
        .flat_map(|(_, v)| v)
        .collect()
}

/// The worker named `name` as `coordinator workers --output json` lists it.
fn worker(cluster: &LocalCluster, name: &str) -> serde_json::Value {
    cluster
        .workers_json()
        .into_iter()
        .find(|w| w["name"] == name)
        .unwrap_or_else(|| panic!("no worker {name}"))
}

#[test]
fn a_drained_member_leaves_its_job_which_ends_as_an_undisturbed_run() {
    let tmp = tempfile::tempdir().unwrap();
    let data = pack_digits(&tmp.path().join("digits"));
    let cluster = LocalCluster::start(3).unwrap();
    let reference = cluster.follow(&job("reference", &data, tmp.path()), &[]);
    assert_eq!(reference["state"], "succeeded", "{reference}");

    let out = cluster.cli(
        &[
            "submit",
            job("drained", &data, tmp.path()).to_str().unwrap(),
        ],
        T,
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let id = out.stdout.trim().to_string();
    wait_until(T, || {
        let s = cluster.status(&id);
        s["state"] == "running" && s["step"].as_u64().unwrap_or(0) >= 300
    })
    .unwrap_or_else(|_| panic!("never reached step 300: {}", cluster.status(&id)));
    let members: Vec<String> =
        serde_json::from_value(cluster.status(&id)["members"].clone()).expect("member names");
    let leaving = members[1].clone();

    let out = cluster.cli(
        &[
            "drain",
            &leaving,
            "--reason",
            "disk swap",
            "--output",
            "json",
        ],
        T,
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let w = out.json();
    assert_eq!(w["cordon"]["kind"], "draining", "{w}");
    assert_eq!(w["cordon"]["reason"], "disk swap", "{w}");

    let mut s = serde_json::Value::Null;
    wait_until(Duration::from_secs(300), || {
        s = cluster.status(&id);
        s["state"] == "succeeded" || s["state"] == "failed"
    })
    .unwrap_or_else(|_| panic!("the job did not end: {s}"));
    assert_eq!(s["state"], "succeeded", "{s}");
    assert_eq!(s["restarts"], 0, "a drain spends no restart: {s}");
    assert!(s["generation"].as_u64().unwrap() >= 2, "{s}");
    let events = s["events"].to_string();
    assert!(
        events.contains(&format!("draining {leaving}")),
        "{leaving}: {events}"
    );
    let rel = relative_l2(&params(&reference), &params(&s));
    eprintln!("relative L2 to the undisturbed run: {rel:e}");
    assert!(rel < 1e-5, "relative L2 to the undisturbed run: {rel}");
    let expect = Expect {
        train_samples: train_samples(&data),
        global_batch: 96,
        steps: 1500,
    };
    let dir = s["output_dir"].as_str().expect("an output folder");
    assert!(assert_exactly_once(Path::new(dir), &expect).generations >= 2);

    // Drained: free, and takes no work until uncordoned.
    let w = worker(&cluster, &leaving);
    assert_eq!(w["state"], "idle", "{w}");
    assert_eq!(w["cordon"]["kind"], "cordoned", "{w}");
    assert_eq!(w["cordon"]["reason"], "drained: disk swap", "{w}");
    let text = cluster.cli(&["workers"], T);
    assert!(
        text.stdout.contains("cordoned: drained: disk swap"),
        "{}",
        text.stdout
    );
    let out = cluster.cli(&["uncordon", &leaving], T);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains("takes work again"), "{}", out.stdout);
    assert!(worker(&cluster, &leaving)["cordon"].is_null());
}

#[test]
fn cordon_commands_name_what_is_wrong() {
    let cluster = LocalCluster::start(1).unwrap();
    let out = cluster.cli(&["cordon", "nope"], T);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("no worker `nope` is registered"),
        "{}",
        out.stderr
    );
    let out = cluster.cli(&["cordon", "w0"], T);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stdout.contains("is cordoned: cordoned by admin"),
        "{}",
        out.stdout
    );
}

#[test]
fn a_worker_blamed_for_an_incident_is_quarantined_and_released_after_the_cooldown() {
    let tmp = tempfile::tempdir().unwrap();
    let data = pack_digits(&tmp.path().join("digits"));
    let mut cluster = LocalCluster::start(3).unwrap();
    let job = JobBuilder::new("flaky", &data)
        .hidden(&[64])
        .batch(96)
        .train("steps = 100000\nlearning_rate = 0.01")
        .exactly(2)
        .fault("max_restarts = 3\nquarantine_after = 1\nquarantine_cooldown_secs = 4")
        .write(tmp.path());
    let out = cluster.cli(&["submit", job.to_str().unwrap()], T);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let id = out.stdout.trim().to_string();
    wait_until(T, || {
        let s = cluster.status(&id);
        s["state"] == "running" && s["step"].as_u64().unwrap_or(0) >= 100
    })
    .unwrap_or_else(|_| panic!("never reached step 100: {}", cluster.status(&id)));
    let members: Vec<String> =
        serde_json::from_value(cluster.status(&id)["members"].clone()).expect("member names");
    let victim = members[1].clone();
    let index: usize = victim.trim_start_matches('w').parse().expect("a wN name");
    cluster.workers[index].kill();

    // The job re-forms with the spare; the victim comes back as a fresh
    // process under its name, quarantined.
    wait_until(T, || {
        let s = cluster.status(&id);
        s["state"] == "running" && s["generation"].as_u64().unwrap_or(0) >= 2
    })
    .unwrap_or_else(|_| panic!("the job did not re-form: {}", cluster.status(&id)));
    cluster.add_worker(&victim).unwrap();
    let mut w = serde_json::Value::Null;
    wait_until(T, || {
        w = cluster
            .workers_json()
            .into_iter()
            .find(|w| w["name"] == victim.as_str())
            .unwrap_or_default();
        !w.is_null()
    })
    .unwrap_or_else(|_| panic!("{victim} did not register again"));
    assert_eq!(w["cordon"]["kind"], "quarantined", "{w}");
    assert_eq!(w["cordon"]["reason"], "1 incident in 10 min", "{w}");
    assert!(w["cordon"]["remaining_secs"].as_u64().unwrap() <= 4, "{w}");
    let events = cluster.status(&id)["events"].to_string();
    assert!(
        events.contains(&format!("worker {victim} quarantined for 4 s")),
        "{events}"
    );

    // After the cooldown it takes work again.
    wait_until(Duration::from_secs(30), || {
        worker(&cluster, &victim)["cordon"].is_null()
    })
    .unwrap_or_else(|_| panic!("still quarantined: {}", worker(&cluster, &victim)));
    assert_eq!(cluster.cli(&["cancel", &id, "--now"], T).code, 0);
}
