//! Streamed training sets end to end with the real binaries: a multi-shard
//! dataset read through a cache smaller than it gives the same run with 1, 2
//! and 4 workers, the same run as loading it whole, a bitwise resume after a
//! cancel, and a job failure naming a corrupt shard's path.

use ringmaster_tests::{JobBuilder, LocalCluster, model_params, relative_l2, synth};
use std::path::{Path, PathBuf};

/// 20 shards of 1,000 samples of 64 features (264 KB decoded each) for
/// training and 6 shards of 500 for validation: with windows of 2 shards and
/// a 1 MiB cache, a rank holds under 4 shards and reads most of them again
/// every epoch.
fn dataset(root: &Path) -> PathBuf {
    let data = root.join("synth");
    synth(&data.join("train"), 20_000, 64, 1000, 3);
    synth(&data.join("val"), 3000, 64, 500, 3);
    data
}

const STREAM: &str = "loading = \"stream\"\nshuffle_window_shards = 2\ncache_bytes = \"1 MiB\"";

fn job(data: &Path, name: &str, workers: u32, loading: &str, steps: u64) -> JobBuilder {
    JobBuilder::new(name, data)
        .seed(5)
        .model("dropout = 0.1")
        .validation()
        .data(loading)
        .batch(256)
        .train(&format!(
            "steps = {steps}\noptimizer = \"sgd\"\nmomentum = 0.9\nlearning_rate = 0.05\n\
             eval_every_steps = 100\nlog_every_steps = 1"
        ))
        .exactly(workers)
}

/// Trains `job` to success; its final parameters (name order) and status.
fn train(cluster: &LocalCluster, dir: &Path, job: &JobBuilder) -> (Vec<f32>, serde_json::Value) {
    let (done, out) = cluster.train(dir, job);
    (model_params(&out), done)
}

#[test]
fn streamed_runs_match_across_world_sizes_and_the_in_memory_run() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path());
    let cluster = LocalCluster::start(4).unwrap();
    // 200 steps of 256 cross two epoch boundaries (78.1 steps per epoch).
    let (one, done) = train(&cluster, tmp.path(), &job(&data, "s1", 1, STREAM, 200));
    for workers in [2, 4] {
        let name = format!("s{workers}");
        let (params, _) = train(
            &cluster,
            tmp.path(),
            &job(&data, &name, workers, STREAM, 200),
        );
        let rel = relative_l2(&one, &params);
        eprintln!("streamed: relative L2 between 1 and {workers} workers: {rel:e}");
        assert!(rel < 1e-5, "1 vs {workers} workers: {rel}");
    }
    // The same samples in the same order: loading whole changes nothing.
    let memory = "loading = \"memory\"\nshuffle_window_shards = 2";
    let (whole, whole_done) = train(&cluster, tmp.path(), &job(&data, "m1", 1, memory, 200));
    assert_eq!(one, whole, "streamed and in-memory runs differ");
    assert_eq!(
        done["metrics"]["val_loss"], whole_done["metrics"]["val_loss"],
        "streamed validation scores differently"
    );
    let acc = done["metrics"]["val_accuracy"].as_f64().unwrap();
    assert!(acc > 0.5, "the streamed run did not learn: {done}");
}

#[test]
fn cancel_then_resume_while_streaming_is_bitwise_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path());
    let cluster = LocalCluster::start(2).unwrap();
    let (whole, _) = train(&cluster, tmp.path(), &job(&data, "whole", 2, STREAM, 1500));

    let (stop, resumed) =
        cluster.cancel_then_resume(tmp.path(), &job(&data, "split", 2, STREAM, 1500), 100);
    assert_eq!(
        whole, resumed,
        "parameters differ after cancel + resume at {stop}"
    );
}

#[test]
fn a_corrupt_shard_fails_the_job_naming_its_path_and_the_check() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path());
    let shard = data.join("train/shard-00007.safetensors");
    let mut bytes = std::fs::read(&shard).unwrap();
    let n = bytes.len();
    bytes[n - 100] ^= 0x40;
    std::fs::write(&shard, bytes).unwrap();

    let cluster = LocalCluster::start(1).unwrap();
    let path = job(&data, "corrupt", 1, STREAM, 200)
        .fault("max_restarts = 0")
        .write(tmp.path());
    let out = cluster.submit_follow(&path, &[]);
    assert_eq!(out.code, 1, "{}\n{}", out.stdout, out.stderr);
    let done = out.json();
    assert_eq!(done["state"], "failed", "{done}");
    let reason = done["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains(&format!("shard {}: sha256 is", shard.display())),
        "{done}"
    );
}
