//! `coordinator evaluate` with the real binaries: a trained model (its output folder, or one of
//! its checkpoints) scored on a dataset outside any job gives the figures the job's own
//! evaluation wrote to `eval.json`; a dataset of another task or width is refused in one line
//! naming what does not fit; a language model scores the perplexity its job reported.

use ringmaster_tests::{
    JobBuilder, LocalCluster, bin, pack_diabetes, pack_digits, run_with_timeout,
};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

fn evaluate(model: &Path, data: &Path, json: bool) -> ringmaster_tests::Output {
    let mut cmd = Command::new(bin("coordinator"));
    cmd.arg("evaluate")
        .arg("--model")
        .arg(model)
        .arg("--data")
        .arg(data);
    if json {
        cmd.args(["--output", "json"]);
    }
    run_with_timeout(cmd, T)
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn a_trained_model_scores_as_its_job_did_from_its_folder_or_a_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let data = pack_digits(&tmp.path().join("digits"));
    let cluster = LocalCluster::start(2).unwrap();
    let job = JobBuilder::new("scored", &data)
        .validation()
        .train("steps = 200\noptimizer = \"adam\"\nlearning_rate = 0.003\neval_every_steps = 100")
        .checkpoint("every_steps = 100")
        .exactly(2);
    let (done, out) = cluster.train(tmp.path(), &job);
    let eval = read_json(&out.join("eval.json"));

    let scored = evaluate(&out, &data.join("val"), true);
    assert_eq!(scored.code, 0, "{}", scored.stderr);
    let scored = scored.json();
    // Counts are exact; the loss is summed in another order over one process than two.
    assert_eq!(scored["samples"], eval["samples"]);
    assert_eq!(scored["accuracy"], eval["accuracy"], "{scored}\n{eval}");
    assert_eq!(scored["confusion"], eval["confusion"]);
    let (a, b) = (
        scored["loss"].as_f64().unwrap(),
        eval["loss"].as_f64().unwrap(),
    );
    assert!((a - b).abs() <= 1e-5 * b.abs(), "{a} vs {b}");
    assert_eq!(scored["job"], "scored");

    // Text output: the figures a person reads.
    let text = evaluate(&out, &data.join("val"), false);
    assert_eq!(text.code, 0, "{}", text.stderr);
    assert!(
        text.stdout.contains(&format!(
            "accuracy {:.4}",
            eval["accuracy"].as_f64().unwrap()
        )),
        "{}",
        text.stdout
    );

    // A checkpoint of the same job scores too (the job's spec sits beside its step folders),
    // on any dataset of the same kind: here the training set.
    let job_id = done["id"].as_str().unwrap();
    let step = tmp
        .path()
        .join("out-scored/checkpoints")
        .join(job_id)
        .join("step-100");
    assert!(step.is_dir(), "{}", step.display());
    let on_train = evaluate(&step, &data.join("train"), true);
    assert_eq!(on_train.code, 0, "{}", on_train.stderr);
    let on_train = on_train.json();
    assert_eq!(on_train["samples"], 1438);
    assert!(on_train["accuracy"].as_f64().unwrap() > 0.8, "{on_train}");
}

#[test]
fn a_dataset_that_does_not_fit_is_refused_in_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let digits = pack_digits(&tmp.path().join("digits"));
    let diabetes = pack_diabetes(&tmp.path().join("diabetes"));
    let cluster = LocalCluster::start(1).unwrap();
    let job = JobBuilder::new("small", &digits)
        .train("steps = 5\noptimizer = \"sgd\"\nlearning_rate = 0.1")
        .exactly(1);
    let (_, out) = cluster.train(tmp.path(), &job);

    let wrong_task = evaluate(&out, &diabetes.join("val"), false);
    assert_eq!(wrong_task.code, 1);
    assert_eq!(
        wrong_task.stderr.trim(),
        format!(
            "error: {} holds regression targets (1 per sample), which a model trained for \
             task.kind = \"classification\" cannot score",
            diabetes.join("val").display()
        )
    );
    let no_spec = evaluate(&digits, &digits.join("val"), false);
    assert_eq!(no_spec.code, 1);
    assert!(
        no_spec
            .stderr
            .contains(&format!("error: no job.json in {}", digits.display())),
        "{}",
        no_spec.stderr
    );
}

#[test]
fn a_language_model_scores_its_perplexity_as_its_job_did() {
    let root = ringmaster_tests::repo_root();
    let mut fetch = Command::new(root.join("scripts/fetch-text"));
    fetch.arg("licenses").current_dir(&root);
    let files = run_with_timeout(fetch, T);
    assert_eq!(files.code, 0, "{}", files.stderr);
    let first = files.stdout.lines().next().unwrap().to_string();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("text");
    let mut pack = Command::new(bin("coordinator"));
    pack.args([
        "dataset",
        "pack",
        "--text",
        &first,
        "--context",
        "16",
        "--out-dir",
    ])
    .arg(&data);
    let packed = run_with_timeout(pack, T);
    assert_eq!(packed.code, 0, "{}", packed.stderr);
    let cluster = LocalCluster::start(1).unwrap();
    let job = JobBuilder::new("lm", &data)
        .task("kind = \"language_model\"")
        .model_kind("kind = \"transformer\"\nlayers = 1\nheads = 2\nwidth = 32\ncontext = 16")
        .validation()
        .batch(16)
        .train("steps = 30\noptimizer = \"adam\"\nlearning_rate = 0.003")
        .exactly(1);
    let (_, out) = cluster.train(tmp.path(), &job);
    let eval = read_json(&out.join("eval.json"));
    let scored = evaluate(&out, &data.join("val"), true);
    assert_eq!(scored.code, 0, "{}", scored.stderr);
    let scored = scored.json();
    assert_eq!(scored["tokens"], eval["tokens"]);
    let (a, b) = (
        scored["perplexity"].as_f64().unwrap(),
        eval["perplexity"].as_f64().unwrap(),
    );
    assert!((a - b).abs() <= 1e-5 * b, "{a} vs {b}");
    let text = evaluate(&out, &data.join("val"), false);
    assert!(text.stdout.contains("perplexity "), "{}", text.stdout);
}
