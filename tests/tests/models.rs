//! Built-in models beyond the MLP, end to end with the real binaries: the
//! `cnn` on scikit-learn's digits as 1×8×8 images reaches 0.97 validation
//! accuracy, its `model.safetensors` loads into the equivalent PyTorch module
//! (`tests/python/cnn_reference.py`, strict `load_state_dict`) and scores the
//! same there, 1, 2 and 4 workers compute the same run, random crops
//! (drawn per sample) included, as do 1 and 2 without normalization, and a
//! cancel + resume is bitwise identical.
//!
//! With batch normalization (`norm = "batch"`): the model trains, carries its
//! running statistics into `model.safetensors` (a strict `load_state_dict`
//! into `nn.BatchNorm2d` scores the same), follows PyTorch DDP's semantics
//! (per-rank statistics, rank 0's buffers; replayed step by step in
//! `tests/python/bn_ddp_replay.py` from the sample audit), and resumes
//! bitwise.

use ringmaster_tests::{
    JobBuilder, LocalCluster, bin, model_params, pack_digits, read_params, relative_l2, repo_root,
    run_with_timeout,
};
use std::path::Path;
use std::process::Command;

/// `CNN` with batch normalization and without dropout.
const BN_CNN: &str = "kind = \"cnn\"\ninput_shape = [1, 8, 8]\nchannels = [16, 32]\nkernel = 3\n\
    pool = 2\nnorm = \"batch\"";

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
    assert_pytorch_scores(&out, &data, "32,64", "8", accuracy);
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
    // Without normalization too.
    let none = |name: &str, workers: u32| {
        cnn_job(&data, name, workers, 150)
            .model_kind(&CNN.replace("norm = \"group\"\ngroups = 8", "norm = \"none\""))
    };
    let (_, one) = cluster.train(tmp.path(), &none("none1", 1));
    let (_, two) = cluster.train(tmp.path(), &none("none2", 2));
    let rel = relative_l2(&model_params(&one), &model_params(&two));
    eprintln!("cnn without normalization: relative L2 between 1 and 2 workers: {rel:e}");
    assert!(rel < 1e-5, "norm = none, 1 vs 2 workers: {rel}");
    assert!(!read_params(&one.join("model.safetensors")).contains_key("norm0.weight"));
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

fn bn_job(data: &Path, name: &str, workers: u32, train: &str) -> JobBuilder {
    JobBuilder::new(name, data)
        .seed(3)
        .model_kind(BN_CNN)
        .validation()
        .train(train)
        .exactly(workers)
}

/// Runs `tests/python/<script>` with the project's venv and returns its JSON line.
fn python_json(script: &str, args: &[String]) -> serde_json::Value {
    let root = repo_root();
    let py = Command::new(root.join(".venv/bin/python"))
        .arg(root.join("tests/python").join(script))
        .args(args)
        .output()
        .expect("run the project venv's python (scripts/bootstrap makes it)");
    assert!(
        py.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&py.stderr)
    );
    serde_json::from_slice(&py.stdout).unwrap()
}

/// `tests/python/cnn_reference.py` scores the job's `model.safetensors` on
/// the validation set, in PyTorch's own module (3x3 kernels, pools of 2), as
/// the job did: float rounding may flip at most a borderline sample.
fn assert_pytorch_scores(out: &Path, data: &Path, channels: &str, norm: &str, accuracy: f64) {
    let args = [
        out.join("model.safetensors").display().to_string(),
        data.join("val").display().to_string(),
    ];
    let shape = ["1", "8", "8", channels, "3", "2", norm].map(String::from);
    let torch = python_json("cnn_reference.py", &[&args[..], &shape[..]].concat());
    eprintln!("the same model in PyTorch: {torch}");
    ringmaster_tests::assert_same_accuracy(&torch, accuracy);
}

#[test]
fn batch_norm_cnn_trains_and_loads_into_pytorch_with_its_running_statistics() {
    let tmp = tempfile::tempdir().unwrap();
    let data = pack_digits(&tmp.path().join("digits"));
    let cluster = LocalCluster::start(2).unwrap();
    let steps = 400;
    let job = bn_job(
        &data,
        "bn",
        2,
        &format!(
            "steps = {steps}\noptimizer = \"adam\"\nlearning_rate = 0.003\nlr_schedule = \"cosine\""
        ),
    );
    let (done, out) = cluster.train(tmp.path(), &job);
    let accuracy = done["metrics"]["val_accuracy"].as_f64().unwrap();
    eprintln!("batch-normalized cnn on digits: validation accuracy {accuracy}");
    assert!(accuracy >= 0.95, "{done}");

    let weights = read_params(&out.join("model.safetensors"));
    for i in 0..2 {
        let (shape, mean) = &weights[&format!("norm{i}.running_mean")];
        assert_eq!(shape, &[[16, 32][i]]);
        // Statistics of real activations, not the initial zeros and ones.
        assert!(mean.iter().any(|&m| m.abs() > 1e-3), "norm{i}: {mean:?}");
        let (_, var) = &weights[&format!("norm{i}.running_var")];
        assert!(var.iter().all(|&v| v > 0.0) && var.iter().any(|&v| (v - 1.0).abs() > 1e-3));
        // One training forward per step on rank 0, as PyTorch counts them.
        let (shape, count) = &weights[&format!("norm{i}.num_batches_tracked")];
        assert!(shape.is_empty());
        assert_eq!(count, &[steps as f32]);
    }
    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(
        st.tensor("norm0.num_batches_tracked").unwrap().dtype(),
        safetensors::Dtype::I64
    );

    // PyTorch's own BatchNorm2d, in evaluation mode, uses the saved running
    // statistics: the same accuracy means they are the ones we evaluated with.
    assert_pytorch_scores(&out, &data, "16,32", "batch", accuracy);

    // `coordinator evaluate` rebuilds the model with its buffers: the job's
    // own confusion matrix.
    let mut cmd = Command::new(bin("coordinator"));
    cmd.args(["evaluate", "--output", "json", "--model"])
        .arg(&out)
        .arg("--data")
        .arg(data.join("val"));
    let scored = run_with_timeout(cmd, std::time::Duration::from_secs(60));
    assert_eq!(scored.code, 0, "{}", scored.stderr);
    let eval: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("eval.json")).unwrap()).unwrap();
    assert_eq!(scored.json()["confusion"], eval["confusion"]);
}

#[test]
fn batch_norm_follows_pytorch_ddp_per_rank_statistics() {
    let tmp = tempfile::tempdir().unwrap();
    let data = pack_digits(&tmp.path().join("digits"));
    let cluster = LocalCluster::start(2).unwrap();
    let (first, last, lr) = (6u64, 12u64, 0.1);
    let job = bn_job(
        &data,
        "ddp",
        2,
        &format!("steps = {last}\nlearning_rate = {lr}"),
    )
    .checkpoint(&format!("every_steps = {first}"))
    .debug("audit_samples = true");
    let (_, out) = cluster.train(tmp.path(), &job);
    let start = std::fs::read_dir(tmp.path().join("out-ddp/checkpoints"))
        .unwrap()
        .flatten()
        .flat_map(|job| std::fs::read_dir(job.path()).unwrap().flatten())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix("step-"))
                .and_then(|n| n.parse::<u64>().ok())
                == Some(first)
        })
        .expect("the checkpoint at the first replayed step");
    let report = python_json(
        "bn_ddp_replay.py",
        &[
            start.join("model.safetensors").display().to_string(),
            out.join("model.safetensors").display().to_string(),
            out.join("audit").display().to_string(),
            data.join("train").display().to_string(),
            first.to_string(),
            last.to_string(),
            lr.to_string(),
            "1".into(),
            "8".into(),
            "8".into(),
            "16,32".into(),
            "3".into(),
            "2".into(),
        ],
    );
    eprintln!("replayed in PyTorch: {report}");
    let ddp = &report["ddp"];
    assert!(ddp["params_rel_l2"].as_f64().unwrap() < 1e-5, "{report}");
    assert!(ddp["buffers_rel_l2"].as_f64().unwrap() < 1e-5, "{report}");
    assert_eq!(
        report["num_batches_tracked"]["ringmaster"],
        report["num_batches_tracked"]["ddp"]
    );
    // Statistics of the whole global batch give another run: the replay
    // tells the two apart.
    let whole = &report["whole_batch"];
    assert!(whole["params_rel_l2"].as_f64().unwrap() > 1e-4, "{report}");
}

#[test]
fn cancel_then_resume_of_a_batch_norm_cnn_is_bitwise_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let data = pack_digits(&tmp.path().join("digits"));
    let cluster = LocalCluster::start(2).unwrap();
    let train = "steps = 300\noptimizer = \"adam\"\nlearning_rate = 0.003";
    let (_, whole) = cluster.train(tmp.path(), &bn_job(&data, "whole", 2, train));
    // The buffers too: model_params reads every tensor of model.safetensors.
    let whole = model_params(&whole);
    let (stop, resumed) =
        cluster.cancel_then_resume(tmp.path(), &bn_job(&data, "split", 2, train), 100);
    assert_eq!(
        whole, resumed,
        "parameters or buffers differ after cancel + resume at {stop}"
    );
}
