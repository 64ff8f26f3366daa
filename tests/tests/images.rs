//! Image datasets end to end with the real binaries: scikit-learn's digits
//! written as a u8 `[n, 8, 8]` NPY and packed with `dataset pack --images`
//! (one byte per pixel on disk, per-channel normalization fitted on the
//! training split and applied when read) train the `cnn` on 2 workers to
//! 0.97 validation accuracy, with train shards about a quarter the size of
//! the f32 pack's; a `cnn` whose `input_shape` disagrees with the images is
//! refused at submit (and by the worker), and so are image flags that do not
//! apply; `coordinator evaluate` scores the images as the job did, and a set
//! packed on its own is read with the training set's normalization
//! (`--normalization-from`) or refused, at submit and by `evaluate`; a
//! streamed image set trains bitwise as the same set loaded whole.

use ringmaster_tests::{
    JobBuilder, LocalCluster, bin, digits_csv, pack_digits, repo_root, run_with_timeout,
};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

/// The `CNN` of `models.rs`: two conv blocks with group norm.
const CNN: &str = "kind = \"cnn\"\ninput_shape = [1, 8, 8]\nchannels = [32, 64]\nkernel = 3\n\
    pool = 2\nnorm = \"group\"\ngroups = 8\ndropout = 0.1";

/// Writes digits as `x.npy` (u8 `[1797, 8, 8]`, pixel values 0..16) and
/// `y.npy` (i64 labels) in `dir`, with the project venv's numpy.
fn digits_npy(dir: &Path) -> (PathBuf, PathBuf) {
    let (x, y) = (dir.join("x.npy"), dir.join("y.npy"));
    let out = run_with_timeout(
        {
            let mut c = Command::new(repo_root().join(".venv/bin/python"));
            c.arg("-c")
                .arg(
                    "import sys, numpy as np\n\
                     d = np.loadtxt(sys.argv[1], delimiter=',')\n\
                     assert d.shape == (1797, 65) and (d == np.round(d)).all()\n\
                     np.save(sys.argv[2], d[:, :64].reshape(-1, 8, 8).astype(np.uint8))\n\
                     np.save(sys.argv[3], d[:, 64].astype(np.int64))\n\
                     np.save(sys.argv[4], d[:, :64].reshape(-1, 4, 16).astype(np.uint8))",
                )
                .arg(digits_csv())
                .arg(&x)
                .arg(&y)
                .arg(dir.join("x-4x16.npy"));
            c
        },
        T,
    );
    assert_eq!(out.code, 0, "writing the digits NPY failed: {}", out.stderr);
    (x, y)
}

/// `dataset pack --images` of `x` and `y` into `out` with the split of
/// `pack_digits`; returns the report.
fn pack_images(x: &Path, y: &Path, out: &Path) -> serde_json::Value {
    pack_images_with(x, y, out, &[])
}

/// [`pack_images`] with more flags.
fn pack_images_with(x: &Path, y: &Path, out: &Path, extra: &[&str]) -> serde_json::Value {
    let mut c = Command::new(bin("coordinator"));
    c.args(["dataset", "pack", "--images"])
        .arg(x)
        .arg("--npy-labels")
        .arg(y)
        .arg("--out-dir")
        .arg(out)
        .args(["--val-fraction", "0.2", "--seed", "7", "--output", "json"])
        .args(extra);
    let done = run_with_timeout(c, T);
    assert_eq!(
        done.code, 0,
        "dataset pack --images failed: {}",
        done.stderr
    );
    done.json()
}

/// Total bytes of the shard files in `dir`.
fn shard_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
        .map(|e| e.metadata().unwrap().len())
        .sum()
}

#[test]
fn cnn_on_u8_digit_images_reaches_97_percent() {
    let tmp = tempfile::tempdir().unwrap();
    let (x, y) = digits_npy(tmp.path());
    let data = tmp.path().join("images");
    let report = pack_images(&x, &y, &data);
    eprintln!("pack --images: {report}");
    assert_eq!(report["shape"], serde_json::json!([1, 8, 8]));
    assert_eq!(report["dtype"], "u8");
    assert_eq!(report["num_classes"], 10);
    let norm = &report["image_normalization"];
    assert_eq!(norm["mean"].as_array().unwrap().len(), 1);
    // Digits' pixels are 0..16 of 255: a small mean and std after scaling.
    let (mean, std) = (
        norm["mean"][0].as_f64().unwrap(),
        norm["std"][0].as_f64().unwrap(),
    );
    assert!(
        mean > 0.01 && mean < 0.03 && std > 0.01 && std < 0.04,
        "{norm}"
    );

    // The channel normalization replaces --standardize; the image flags
    // need --images.
    let refused = |args: &[&str]| {
        let mut c = Command::new(bin("coordinator"));
        c.args(["dataset", "pack"])
            .args(args)
            .arg("--out-dir")
            .arg(tmp.path().join("refused"));
        let out = run_with_timeout(c, T);
        assert_ne!(out.code, 0, "{args:?}: {}", out.stdout);
        out.stderr
    };
    let (xs, ys) = (x.to_str().unwrap(), y.to_str().unwrap());
    let err = refused(&["--images", xs, "--npy-labels", ys, "--standardize"]);
    assert!(
        err.contains("'--images <NPY>' cannot be used with '--standardize'"),
        "{err}"
    );
    let err = refused(&["--npy-features", xs, "--npy-labels", ys, "--channels-last"]);
    assert!(
        err.contains(
            "--channels-last, --no-normalize and --normalization-from apply only to --images"
        ),
        "{err}"
    );

    // The same split of the same digits packed from CSV as f32.
    let flat = pack_digits(&tmp.path().join("flat"));
    let (u8_bytes, f32_bytes) = (
        shard_bytes(&data.join("train")),
        shard_bytes(&flat.join("train")),
    );
    let ratio = f32_bytes as f64 / u8_bytes as f64;
    eprintln!("train shards: u8 images {u8_bytes} bytes, f32 features {f32_bytes} ({ratio:.2}x)");
    // 64 pixels + an 8-byte label against 256 + 8 bytes per sample.
    assert!(ratio > 3.5 && ratio < 4.0, "{u8_bytes} vs {f32_bytes}");

    let cluster = LocalCluster::start(2).unwrap();

    // An input_shape that is not the images' [C, H, W] is refused at submit,
    // even one of the same size.
    let wrong = JobBuilder::new("wrong", &data)
        .model_kind(&CNN.replace("[1, 8, 8]", "[1, 4, 16]"))
        .validation()
        .train("steps = 10\noptimizer = \"adam\"\nlearning_rate = 0.003")
        .write(tmp.path());
    let refused = cluster.cli(&["submit", "--dry-run", wrong.to_str().unwrap()], T);
    assert_ne!(refused.code, 0, "{}", refused.stdout);
    assert!(
        refused.stderr.contains(
            "model.input_shape is [1, 4, 16] but the training set holds images of [C, H, W] = \
             [1, 8, 8] (as packed); set model.input_shape = [1, 8, 8]"
        ),
        "{}",
        refused.stderr
    );

    let job = JobBuilder::new("cnn-images", &data)
        .seed(2)
        .model_kind(CNN)
        .validation()
        .train(
            "steps = 600\noptimizer = \"adam\"\nlearning_rate = 0.003\n\
             lr_schedule = \"cosine\"\nwarmup_steps = 50\neval_every_steps = 200",
        )
        .exactly(2);
    let (done, out) = cluster.train(tmp.path(), &job);
    let accuracy = done["metrics"]["val_accuracy"].as_f64().unwrap();
    eprintln!("cnn on u8 digit images: validation accuracy {accuracy}");
    assert!(accuracy >= 0.97, "{done}");

    // `coordinator evaluate` reads the images through the same normalizing
    // reader, so it scores what the job's own evaluation did.
    let evaluate = |data: &Path| {
        let mut c = Command::new(bin("coordinator"));
        c.arg("evaluate")
            .arg("--model")
            .arg(&out)
            .arg("--data")
            .arg(data)
            .args(["--output", "json"]);
        run_with_timeout(c, T)
    };
    let scored = evaluate(&data.join("val"));
    assert_eq!(scored.code, 0, "{}", scored.stderr);
    let eval: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("eval.json")).unwrap()).unwrap();
    assert_eq!(scored.json()["accuracy"], eval["accuracy"], "{eval}");

    // Images of another [C, H, W] with as many values are refused by the
    // worker too, not scored as scrambled pixels.
    let wide = tmp.path().join("wide");
    pack_images(&tmp.path().join("x-4x16.npy"), &y, &wide);
    let refused = evaluate(&wide.join("val"));
    assert_ne!(refused.code, 0, "{}", refused.stdout);
    assert!(
        refused.stderr.contains(&format!(
            "model.input_shape is [1, 8, 8] but {} holds images of [C, H, W] = [1, 4, 16]",
            wide.join("val").display()
        )),
        "{}",
        refused.stderr
    );

    // A set packed on its own (a held-out test set) gets its own statistics
    // unless it takes the training set's: scoring it would shift its pixels,
    // so it is refused until packed with --normalization-from.
    let own = tmp.path().join("own");
    let mut c = Command::new(bin("coordinator"));
    c.args(["dataset", "pack", "--images"])
        .arg(&x)
        .arg("--npy-labels")
        .arg(&y)
        .args(["--val-fraction", "0", "--out-dir"])
        .arg(tmp.path().join("test"))
        .arg("--normalization-from")
        .arg(data.join("train"));
    let packed = run_with_timeout(c, T);
    assert_eq!(packed.code, 0, "{}", packed.stderr);
    let test = tmp.path().join("test/train");
    let manifest = |dir: &Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(dir.join("MANIFEST.json")).unwrap()).unwrap()
    };
    assert_eq!(
        manifest(&test)["image_normalization"],
        manifest(&data.join("train"))["image_normalization"]
    );
    let scored = evaluate(&test);
    assert_eq!(scored.code, 0, "{}", scored.stderr);
    // The whole digits set, through the training set's normalization.
    assert_eq!(scored.json()["samples"], 1797);

    // Its own fit (here: a split with other statistics) is refused.
    let mut c = Command::new(bin("coordinator"));
    c.args(["dataset", "pack", "--images"])
        .arg(&x)
        .arg("--npy-labels")
        .arg(&y)
        .args(["--val-fraction", "0", "--out-dir"])
        .arg(&own);
    assert_eq!(run_with_timeout(c, T).code, 0);
    let refused = evaluate(&own.join("train"));
    assert_ne!(refused.code, 0, "{}", refused.stdout);
    assert!(
        refused
            .stderr
            .contains("is normalized with other statistics than the training set")
            && refused.stderr.contains("--normalization-from"),
        "{}",
        refused.stderr
    );

    // The same at submit, for a validation set.
    let mismatched = JobBuilder::new("mismatched", &data)
        .model_kind(CNN)
        .data(&format!("validation = \"{}\"", own.join("train").display()))
        .train("steps = 10\nlearning_rate = 0.1")
        .write(tmp.path());
    let refused = cluster.cli(&["submit", "--dry-run", mismatched.to_str().unwrap()], T);
    assert_ne!(refused.code, 0, "{}", refused.stdout);
    assert!(
        refused
            .stderr
            .contains("data.validation is normalized with other statistics than data.train"),
        "{}",
        refused.stderr
    );

    // Streamed a window of shards at a time, 8 shards of u8 images train
    // exactly as the set loaded whole: one reader serves both.
    let sharded = tmp.path().join("sharded");
    pack_images_with(&x, &y, &sharded, &["--shard-samples", "180"]);
    let short = |name: &str, loading: &str| {
        JobBuilder::new(name, &sharded)
            .seed(4)
            .model_kind(CNN)
            .validation()
            .data(loading)
            .train("steps = 60\noptimizer = \"adam\"\nlearning_rate = 0.003")
            .exactly(2)
    };
    let (streamed_done, streamed) = cluster.train(
        tmp.path(),
        &short(
            "streamed",
            "loading = \"stream\"\nshuffle_window_shards = 2\ncache_bytes = \"1 MiB\"",
        ),
    );
    let (whole_done, whole) = cluster.train(
        tmp.path(),
        &short("whole", "loading = \"memory\"\nshuffle_window_shards = 2"),
    );
    assert_eq!(
        ringmaster_tests::model_params(&streamed),
        ringmaster_tests::model_params(&whole),
        "streamed and loaded image runs differ"
    );
    assert_eq!(
        streamed_done["metrics"]["val_loss"],
        whole_done["metrics"]["val_loss"]
    );
}
