//! Built-in models beyond the MLP, end to end with the real binaries: the
//! `cnn` on scikit-learn's digits as 1×8×8 images reaches 0.97 validation
//! accuracy, its `model.safetensors` loads into the equivalent PyTorch module
//! (`tests/python/cnn_reference.py`, strict `load_state_dict`) and scores the
//! same there, 1, 2 and 4 workers compute the same run, random crops
//! (drawn per sample) included, and a cancel + resume is bitwise identical.

use ringmaster_tests::{
    JobBuilder, LocalCluster, model_params, pack_digits, read_params, relative_l2, repo_root,
};
use std::path::Path;
use std::process::Command;

const CNN: &str = "kind = \"cnn\"\ninput_shape = [1, 8, 8]\nchannels = [32, 64]\nkernel = 3\n\
    pool = 2\nnorm = \"group\"\ngroups = 8\ndropout = 0.1";

fn cnn_job(data: &Path, name: &str, workers: u32, steps: u32) -> JobBuilder {
    JobBuilder::new(name, data)
        .seed(2)
        .model_kind(CNN)
        .validation()
        .train(&format!(
            "steps = {steps}\noptimizer = \"adam\"\nlearning_rate = 0.003\n\
             lr_schedule = \"cosine\"\nwarmup_steps = 50\neval_every_steps = 200"
        ))
        .exactly(workers)
}

/// With random crops and flips, drawn per sample.
fn augmented_job(data: &Path, name: &str, workers: u32, steps: u32) -> JobBuilder {
    JobBuilder::new(name, data)
        .seed(2)
        .model_kind(&format!(
            "{CNN}\naugment = {{ crop_padding = 1, horizontal_flip = true }}"
        ))
        .validation()
        .train(&format!(
            "steps = {steps}\noptimizer = \"adam\"\nlearning_rate = 0.003\n\
             lr_schedule = \"cosine\"\nwarmup_steps = 50\neval_every_steps = 200"
        ))
        .exactly(workers)
}

#[test]
fn cnn_on_digits_reaches_97_percent_and_scores_the_same_in_pytorch() {
    let tmp = tempfile::tempdir().unwrap();
    let data = pack_digits(&tmp.path().join("digits"));
    let cluster = LocalCluster::start(2).unwrap();
    let (done, out) = cluster.train(tmp.path(), &cnn_job(&data, "cnn", 2, 900));
    let accuracy = done["metrics"]["val_accuracy"].as_f64().unwrap();
    eprintln!("cnn on digits: validation accuracy {accuracy}");
    assert!(accuracy >= 0.97, "{done}");
    let names: Vec<String> = read_params(&out.join("model.safetensors"))
        .into_keys()
        .collect();
    assert_eq!(
        names,
        [
            "conv0.bias",
            "conv0.weight",
            "conv1.bias",
            "conv1.weight",
            "norm0.bias",
            "norm0.weight",
            "norm1.bias",
            "norm1.weight",
            "out.bias",
            "out.weight"
        ]
    );

    // The same weights in PyTorch's own module score the same.
    let root = repo_root();
    let py = Command::new(root.join(".venv/bin/python"))
        .arg(root.join("tests/python/cnn_reference.py"))
        .arg(out.join("model.safetensors"))
        .arg(data.join("val"))
        .args(["1", "8", "8", "32,64", "3", "2", "8"])
        .output()
        .expect("run the project venv's python (scripts/bootstrap makes it)");
    assert!(
        py.status.success(),
        "{}",
        String::from_utf8_lossy(&py.stderr)
    );
    let torch: serde_json::Value = serde_json::from_slice(&py.stdout).unwrap();
    let samples = torch["samples"].as_f64().unwrap();
    let torch_accuracy = torch["accuracy"].as_f64().unwrap();
    eprintln!("the same model in PyTorch: {torch}");
    // Float rounding may flip at most a borderline sample.
    assert!(
        (torch_accuracy - accuracy).abs() <= 1.0 / samples + 1e-12,
        "ringmaster {accuracy}, pytorch {torch_accuracy}"
    );
}

#[test]
fn one_two_and_four_workers_train_the_same_cnn() {
    let tmp = tempfile::tempdir().unwrap();
    let data = pack_digits(&tmp.path().join("digits"));
    let cluster = LocalCluster::start(4).unwrap();
    let (_, one) = cluster.train(tmp.path(), &augmented_job(&data, "one", 1, 150));
    // Augmentation was on: the same job without it ends elsewhere.
    let (_, plain) = cluster.train(tmp.path(), &cnn_job(&data, "plain", 1, 150));
    let moved = relative_l2(&model_params(&one), &model_params(&plain));
    assert!(moved > 1e-3, "augmentation changed the run by only {moved}");
    for workers in [2, 4] {
        let name = format!("w{workers}");
        let (_, out) = cluster.train(tmp.path(), &augmented_job(&data, &name, workers, 150));
        let rel = relative_l2(&model_params(&one), &model_params(&out));
        eprintln!("cnn: relative L2 between 1 and {workers} workers: {rel:e}");
        assert!(rel < 1e-5, "1 vs {workers} workers: {rel}");
    }
}

#[test]
fn cancel_then_resume_of_an_augmented_cnn_is_bitwise_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let data = pack_digits(&tmp.path().join("digits"));
    let cluster = LocalCluster::start(2).unwrap();
    let (_, whole) = cluster.train(tmp.path(), &augmented_job(&data, "whole", 2, 900));
    let whole = model_params(&whole);

    let (stop, resumed) =
        cluster.cancel_then_resume(tmp.path(), &augmented_job(&data, "split", 2, 900), 100);
    assert_eq!(
        whole, resumed,
        "parameters differ after cancel + resume at {stop}"
    );
}
