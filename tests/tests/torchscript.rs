//! `model.kind = "torchscript"` end to end with the real binaries and the shipped example
//! (`examples/torchscript/`): a CNN exported from PyTorch trains on scikit-learn's digits to the
//! built-in `cnn`'s accuracy, its trained weights load back into the PyTorch module with a
//! strict `load_state_dict` and score the same there, 1, 2 and 4 workers compute the same run,
//! a cancel + resume is bitwise identical, and a module that does not fit the dataset fails the
//! submit or the job with one clear line.

use ringmaster_tests::{
    JobBuilder, LocalCluster, model_params, pack_digits, relative_l2, repo_root,
};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);
const JOB_TIMEOUT: Duration = Duration::from_secs(300);

fn python() -> Command {
    Command::new(repo_root().join(".venv/bin/python"))
}

/// Runs `examples/torchscript/export.py` into `dir/model.pt`.
fn export(dir: &Path) -> PathBuf {
    export_with(dir, "model.pt", &[])
}

/// `export.py` with `flags` into `dir/name`.
fn export_with(dir: &Path, name: &str, flags: &[&str]) -> PathBuf {
    let path = dir.join(name);
    let out = python()
        .arg(repo_root().join("examples/torchscript/export.py"))
        .args(flags)
        .arg(&path)
        .output()
        .expect("run the project venv's python (scripts/bootstrap makes it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    path
}

fn job(data: &Path, module: &Path, name: &str, workers: u32, steps: u32) -> JobBuilder {
    JobBuilder::new(name, data)
        .model_kind(&format!(
            "kind = \"torchscript\"\npath = \"{}\"\ninput_shape = [1, 8, 8]",
            module.display()
        ))
        .validation()
        .train(&format!(
            "steps = {steps}\noptimizer = \"adam\"\nlearning_rate = 0.003\n\
             lr_schedule = \"cosine\"\nwarmup_steps = 50\neval_every_steps = 100"
        ))
        .exactly(workers)
}

#[test]
fn an_exported_cnn_trains_on_digits_and_loads_back_into_pytorch() {
    let tmp = tempfile::tempdir().unwrap();
    let data = pack_digits(&tmp.path().join("digits"));
    let module = export(tmp.path());
    let cluster = LocalCluster::start(2).unwrap();
    let (done, out) = cluster.train(tmp.path(), &job(&data, &module, "digits-ts", 2, 900));
    let accuracy = done["metrics"]["val_accuracy"].as_f64().unwrap();
    eprintln!("torchscript cnn on digits: validation accuracy {accuracy}");
    assert!(accuracy >= 0.97, "{done}");

    assert_scores_the_same_in_pytorch(&out, &data, accuracy, &[]);
}

/// `check.py` (with `flags`) loads the job's weights strictly into the PyTorch module and
/// scores the validation set as the job did, up to one borderline sample.
fn assert_scores_the_same_in_pytorch(out: &Path, data: &Path, accuracy: f64, flags: &[&str]) {
    let py = python()
        .arg(repo_root().join("examples/torchscript/check.py"))
        .args(flags)
        .arg(out.join("model.safetensors"))
        .arg(data.join("val"))
        .output()
        .unwrap();
    assert!(
        py.status.success(),
        "{}",
        String::from_utf8_lossy(&py.stderr)
    );
    let torch: serde_json::Value = serde_json::from_slice(&py.stdout).unwrap();
    eprintln!("the same weights in the PyTorch module: {torch}");
    ringmaster_tests::assert_same_accuracy(&torch, accuracy);
}

/// BatchNorm inside a module: its running statistics and batch counts are the module's
/// buffers, which the run carries: saved (a strict load works and scores the same), and
/// restored bitwise by a resume.
#[test]
fn a_module_with_batch_norm_keeps_and_saves_its_running_statistics() {
    let tmp = tempfile::tempdir().unwrap();
    let data = pack_digits(&tmp.path().join("digits"));
    let module = export_with(tmp.path(), "bn.pt", &["--batch-norm"]);
    let cluster = LocalCluster::start(2).unwrap();
    let steps = 300;
    let (done, out) = cluster.train(tmp.path(), &job(&data, &module, "bn", 2, steps));
    let accuracy = done["metrics"]["val_accuracy"].as_f64().unwrap();
    eprintln!("torchscript cnn with batch norm: validation accuracy {accuracy}");
    assert!(accuracy >= 0.9, "{done}");
    let weights = ringmaster_tests::read_params(&out.join("model.safetensors"));
    for i in 0..2 {
        let (_, count) = &weights[&format!("norm{i}.num_batches_tracked")];
        assert_eq!(
            count,
            &[steps as f32],
            "one training forward per step on rank 0"
        );
        let (_, mean) = &weights[&format!("norm{i}.running_mean")];
        assert!(mean.iter().any(|&m| m.abs() > 1e-3), "norm{i}: {mean:?}");
    }
    assert_scores_the_same_in_pytorch(&out, &data, accuracy, &["--batch-norm"]);

    let whole = model_params(&out);
    let (stop, resumed) =
        cluster.cancel_then_resume(tmp.path(), &job(&data, &module, "bn-split", 2, steps), 100);
    assert_eq!(
        whole, resumed,
        "parameters or buffers differ after cancel + resume at {stop}"
    );
}

#[test]
fn one_two_and_four_workers_train_the_same_module() {
    let tmp = tempfile::tempdir().unwrap();
    let data = pack_digits(&tmp.path().join("digits"));
    let module = export(tmp.path());
    let cluster = LocalCluster::start(4).unwrap();
    let (_, one) = cluster.train(tmp.path(), &job(&data, &module, "w1", 1, 120));
    let one = model_params(&one);
    for workers in [2, 4] {
        let name = format!("w{workers}");
        let (_, out) = cluster.train(tmp.path(), &job(&data, &module, &name, workers, 120));
        let rel = relative_l2(&one, &model_params(&out));
        eprintln!("torchscript: relative L2 between 1 and {workers} workers: {rel:e}");
        assert!(rel < 1e-5, "1 vs {workers} workers: {rel}");
    }
    // Training moved the module's own parameters.
    let (_, short) = cluster.train(tmp.path(), &job(&data, &module, "short", 1, 1));
    assert!(relative_l2(&one, &model_params(&short)) > 1e-2);
}

#[test]
fn cancel_then_resume_is_bitwise_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let data = pack_digits(&tmp.path().join("digits"));
    let module = export(tmp.path());
    let cluster = LocalCluster::start(2).unwrap();
    let (_, whole) = cluster.train(tmp.path(), &job(&data, &module, "whole", 2, 1500));
    let whole = model_params(&whole);

    let (stop, resumed) =
        cluster.cancel_then_resume(tmp.path(), &job(&data, &module, "split", 2, 1500), 100);
    assert_eq!(
        whole, resumed,
        "parameters differ after cancel + resume at {stop}"
    );
}

#[test]
fn a_module_that_does_not_fit_is_refused_in_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let data = pack_digits(&tmp.path().join("digits"));
    let module = export(tmp.path());
    let cluster = LocalCluster::start(1).unwrap();

    // Not a TorchScript file: refused at submit, at the key.
    let bogus = tmp.path().join("bogus.pt");
    std::fs::write(&bogus, b"not a module").unwrap();
    let file = job(&data, &bogus, "bogus", 1, 10).write(tmp.path());
    let out = cluster.cli(&["submit", file.to_str().unwrap()], T);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains(&format!(
            "model.path {} is not a TorchScript file (torch.jit.save writes a zip archive)",
            bogus.display()
        )),
        "{}",
        out.stderr
    );

    // A module that wants [batch, 1, 8, 8], given [batch, 64]: the job fails at start naming
    // the module, the shape and libtorch's complaint.
    let flat = JobBuilder::new("flat", &data)
        .model_kind(&format!(
            "kind = \"torchscript\"\npath = \"{}\"",
            module.display()
        ))
        .train("steps = 10\noptimizer = \"sgd\"\nlearning_rate = 0.1")
        .exactly(1)
        .write(tmp.path());
    let out = cluster.cli(
        &[
            "submit",
            flat.to_str().unwrap(),
            "--follow",
            "--output",
            "json",
        ],
        JOB_TIMEOUT,
    );
    assert_eq!(out.code, 1, "{}", out.stdout);
    let done = out.json();
    assert_eq!(done["state"], "failed", "{done}");
    let reason = done["reason"].as_str().unwrap();
    assert!(
        reason.ends_with(&format!(
            "the TorchScript module {} fails on a batch shaped [2, 64]: Expected 3D (unbatched) \
             or 4D (batched) input to conv2d, but got input of size: [2, 64]",
            module.display()
        )),
        "{reason}"
    );
    assert!(!reason.contains('\n'), "{reason}");
}
