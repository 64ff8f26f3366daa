//! The `lstm` and `gru` models end to end with the real binaries: an LSTM reading scikit-learn's
//! digits as 8 steps of 8 pixels learns them, its `model.safetensors` loads into PyTorch's
//! `nn.LSTM` module (`tests/python/rnn_reference.py`, strict `load_state_dict`) and scores the
//! same there, 1, 2 and 4 workers compute the same GRU run, a cancel + resume of an LSTM
//! is bitwise identical, and the shipped `examples/timeseries-lstm.toml` forecasts statsmodels'
//! sunspots series (packed with `dataset pack --timeseries`) better than the naive last-value
//! forecast, with the same figures in PyTorch's `nn.LSTM`.

use ringmaster_tests::{
    JobBuilder, LocalCluster, bin, model_params, pack_digits, relative_l2, repo_root,
    run_with_timeout,
};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

fn job(data: &Path, name: &str, cell: &str, workers: u32, steps: u32) -> JobBuilder {
    JobBuilder::new(name, data)
        .seed(4)
        .model_kind(&format!(
            "kind = \"{cell}\"\ninput_shape = [8, 8]\nhidden_size = 48\nlayers = 2\ndropout = 0.1"
        ))
        .validation()
        .train(&format!(
            "steps = {steps}\noptimizer = \"adam\"\nlearning_rate = 0.005\n\
             eval_every_steps = 100"
        ))
        .exactly(workers)
}

#[test]
fn an_lstm_learns_digits_row_by_row_and_loads_into_pytorch() {
    let tmp = tempfile::tempdir().unwrap();
    let data = pack_digits(&tmp.path().join("digits"));
    let cluster = LocalCluster::start(2).unwrap();
    let (done, out) = cluster.train(tmp.path(), &job(&data, "lstm", "lstm", 2, 600));
    let accuracy = done["metrics"]["val_accuracy"].as_f64().unwrap();
    eprintln!("lstm on digits rows: validation accuracy {accuracy}");
    assert!(accuracy >= 0.9, "{done}");

    let root = repo_root();
    let py = Command::new(root.join(".venv/bin/python"))
        .arg(root.join("tests/python/rnn_reference.py"))
        .arg(out.join("model.safetensors"))
        .arg(data.join("val"))
        .args(["lstm", "8", "8", "48", "2"])
        .output()
        .expect("run the project venv's python (scripts/bootstrap makes it)");
    assert!(
        py.status.success(),
        "{}",
        String::from_utf8_lossy(&py.stderr)
    );
    let torch: serde_json::Value = serde_json::from_slice(&py.stdout).unwrap();
    eprintln!("the same weights in nn.LSTM: {torch}");
    ringmaster_tests::assert_same_accuracy(&torch, accuracy);
}

#[test]
fn one_two_and_four_workers_train_the_same_gru() {
    let tmp = tempfile::tempdir().unwrap();
    let data = pack_digits(&tmp.path().join("digits"));
    let cluster = LocalCluster::start(4).unwrap();
    let (_, one) = cluster.train(tmp.path(), &job(&data, "g1", "gru", 1, 120));
    let one = model_params(&one);
    for workers in [2, 4] {
        let name = format!("g{workers}");
        let (_, out) = cluster.train(tmp.path(), &job(&data, &name, "gru", workers, 120));
        let rel = relative_l2(&one, &model_params(&out));
        eprintln!("gru: relative L2 between 1 and {workers} workers: {rel:e}");
        assert!(rel < 1e-5, "1 vs {workers} workers: {rel}");
    }
}

#[test]
fn cancel_then_resume_of_an_lstm_is_bitwise_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let data = pack_digits(&tmp.path().join("digits"));
    let cluster = LocalCluster::start(2).unwrap();
    let (_, whole) = cluster.train(tmp.path(), &job(&data, "whole", "lstm", 2, 1200));
    let whole = model_params(&whole);

    let (stop, resumed) =
        cluster.cancel_then_resume(tmp.path(), &job(&data, "split", "lstm", 2, 1200), 100);
    assert_eq!(
        whole, resumed,
        "parameters differ after cancel + resume at {stop}"
    );
}

#[test]
fn the_sunspots_example_beats_the_naive_forecast() {
    let root = repo_root();
    let fetch = run_with_timeout(
        {
            let mut c = Command::new(root.join("scripts/fetch-series"));
            c.arg("sunspots").current_dir(&root);
            c
        },
        Duration::from_secs(600),
    );
    assert_eq!(fetch.code, 0, "{}", fetch.stderr);
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("sunspots");
    let mut pack = Command::new(bin("coordinator"));
    pack.args(["dataset", "pack", "--timeseries", fetch.stdout.trim()])
        .args([
            "--column",
            "SUNACTIVITY",
            "--window",
            "12",
            "--horizon",
            "1",
        ])
        .args(["--standardize", "--val-fraction", "0.2", "--output", "json"])
        .arg("--out-dir")
        .arg(&data);
    let packed = run_with_timeout(pack, T);
    assert_eq!(packed.code, 0, "{}", packed.stderr);
    let packed = packed.json();
    assert_eq!(packed["values"], 309);
    assert_eq!(
        (
            packed["train_samples"].as_u64(),
            packed["val_samples"].as_u64()
        ),
        (Some(235), Some(62))
    );
    let naive = packed["naive_val_mae"].as_f64().unwrap();

    let example = std::fs::read_to_string(root.join("examples/timeseries-lstm.toml")).unwrap();
    let text = example
        .replace("../run/data/sunspots", data.to_str().unwrap())
        .replace("../run/out/sunspots-lstm", "out-sunspots");
    assert_ne!(text, example);
    let job = tmp.path().join("timeseries-lstm.toml");
    std::fs::write(&job, text).unwrap();
    let cluster = LocalCluster::start(2).unwrap();
    let done = cluster.follow(&job, &[]);
    assert_eq!(done["state"], "succeeded", "{done}");
    let mae = done["metrics"]["val_mae"].as_f64().unwrap();
    eprintln!("sunspots: LSTM validation MAE {mae:.3}, naive last-value forecast {naive:.3}");
    assert!(
        mae < 0.8 * naive,
        "the LSTM does not beat the naive forecast: {mae} vs {naive}"
    );

    // The same weights in nn.LSTM give the same error on the (standardized) validation windows.
    let out = PathBuf::from(done["output_dir"].as_str().unwrap());
    let py = Command::new(root.join(".venv/bin/python"))
        .arg(root.join("tests/python/rnn_reference.py"))
        .arg(out.join("model.safetensors"))
        .arg(data.join("val"))
        .args(["lstm", "12", "1", "32", "1"])
        .output()
        .unwrap();
    assert!(
        py.status.success(),
        "{}",
        String::from_utf8_lossy(&py.stderr)
    );
    let torch: serde_json::Value = serde_json::from_slice(&py.stdout).unwrap();
    let torch_mae = torch["mae"].as_f64().unwrap();
    assert!(
        (torch_mae - mae).abs() <= 1e-3 * mae,
        "ringmaster {mae}, pytorch {torch_mae}"
    );
}
