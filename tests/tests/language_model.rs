//! Language models end to end with the real binaries: `dataset pack --text` turns Debian's
//! license texts (`scripts/fetch-text licenses`) into byte-token samples, the shipped
//! `examples/text-gpt.toml` GPT reaches a validation perplexity well below the unigram
//! baseline the pack prints, and its `model.safetensors` loads into nanoGPT's PyTorch module
//! (`tests/python/gpt_reference.py`, strict `load_state_dict`) with the same validation loss;
//! 1, 2 and 4 workers train the same transformer (dropout on); a cancel + resume is bitwise
//! identical; a model context unlike the dataset's is refused at submit. With `--bpe-vocab 512`
//! the same corpus packs into BPE tokens that decode back to the text (in pure Python,
//! `tests/python/byte_bpe.py`), and a transformer with 512 outputs trains on them to a
//! validation perplexity below the BPE unigram baseline.

use ringmaster_tests::{
    JobBuilder, LocalCluster, bin, model_params, read_params, relative_l2, repo_root,
    run_with_timeout,
};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

/// The license texts, as `scripts/fetch-text` lists them.
fn corpus() -> Vec<String> {
    let root = repo_root();
    let mut c = Command::new(root.join("scripts/fetch-text"));
    c.arg("licenses").current_dir(&root);
    let out = run_with_timeout(c, T);
    assert_eq!(out.code, 0, "{}", out.stderr);
    out.stdout.lines().map(str::to_string).collect()
}

/// Packs `files` with `--context context` into `dir` and returns the pack's JSON report.
fn pack(files: &[String], context: u32, dir: &Path) -> serde_json::Value {
    pack_with(files, context, dir, &[])
}

/// [`pack`] with more `dataset pack` arguments.
fn pack_with(files: &[String], context: u32, dir: &Path, extra: &[&str]) -> serde_json::Value {
    let mut c = Command::new(bin("coordinator"));
    c.args(["dataset", "pack", "--text"])
        .args(files)
        .args(["--context", &context.to_string(), "--val-fraction", "0.1"])
        .args(extra)
        .args(["--output", "json", "--out-dir"])
        .arg(dir);
    let out = run_with_timeout(c, T);
    assert_eq!(out.code, 0, "{}", out.stderr);
    out.json()
}

/// A small transformer over `context` tokens; dropout on so the W-equivalence covers it.
fn job(data: &Path, name: &str, workers: u32, steps: u32) -> JobBuilder {
    JobBuilder::new(name, data)
        .seed(5)
        .task("kind = \"language_model\"")
        .model_kind(
            "kind = \"transformer\"\nlayers = 2\nheads = 2\nwidth = 32\ncontext = 16\n\
             dropout = 0.1\ntied_embeddings = false",
        )
        .validation()
        .batch(16)
        .train(&format!(
            "steps = {steps}\noptimizer = \"adam\"\nlearning_rate = 0.003\n\
             eval_every_steps = 20"
        ))
        .exactly(workers)
}

/// The first license only (Apache-2.0, 11 KB) at context 16: small enough for seconds.
fn small_data(tmp: &Path) -> PathBuf {
    let files = corpus();
    let data = tmp.join("apache");
    let packed = pack(&files[..1], 16, &data);
    assert_eq!(packed["task"], "language_model");
    data
}

#[test]
fn the_text_example_beats_the_unigram_baseline_and_loads_into_pytorch() {
    let root = repo_root();
    let tmp = tempfile::tempdir().unwrap();
    let files = corpus();
    assert!(files.len() >= 10, "{files:?}");
    let data = tmp.path().join("licenses");
    let packed = pack(&files, 64, &data);
    let tokens = packed["tokens"].as_u64().unwrap();
    let (train, val) = (
        packed["train_samples"].as_u64().unwrap(),
        packed["val_samples"].as_u64().unwrap(),
    );
    // Chunks of 65 tokens, none spanning the split at 90% of the stream.
    assert_eq!(train, packed["train_tokens"].as_u64().unwrap() / 65);
    assert_eq!(val, packed["val_tokens"].as_u64().unwrap() / 65);
    assert!(tokens > 200_000 && val > 300, "{packed}");
    let baseline = packed["unigram_val_perplexity"].as_f64().unwrap();

    let example = std::fs::read_to_string(root.join("examples/text-gpt.toml")).unwrap();
    let text = example
        .replace("../run/data/licenses", data.to_str().unwrap())
        .replace("../run/out/text-gpt", "out-text-gpt");
    assert_ne!(text, example);
    let job = tmp.path().join("text-gpt.toml");
    std::fs::write(&job, text).unwrap();
    let cluster = LocalCluster::start(2).unwrap();
    let done = cluster.follow(&job, &[]);
    assert_eq!(done["state"], "succeeded", "{done}");
    let ppl = done["metrics"]["val_perplexity"].as_f64().unwrap();
    let loss = done["metrics"]["val_loss"].as_f64().unwrap();
    eprintln!("text-gpt: validation perplexity {ppl:.3}, unigram baseline {baseline:.3}");
    assert!((ppl - loss.exp()).abs() <= 1e-6 * ppl, "{done}");
    assert!(
        ppl < 0.7 * baseline,
        "the transformer does not beat the unigram baseline: {ppl} vs {baseline}"
    );

    // The same weights in nanoGPT's module give the same validation loss.
    let out = PathBuf::from(done["output_dir"].as_str().unwrap());
    let eval: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("eval.json")).unwrap()).unwrap();
    assert_eq!(eval["tokens"].as_u64(), Some(val * 64), "{eval}");
    let py = Command::new(root.join(".venv/bin/python"))
        .arg(root.join("tests/python/gpt_reference.py"))
        .arg("score")
        .arg(out.join("model.safetensors"))
        .arg(data.join("val"))
        .args(["2", "4", "128", "64"])
        .output()
        .expect("run the project venv's python (scripts/bootstrap makes it)");
    assert!(
        py.status.success(),
        "{}",
        String::from_utf8_lossy(&py.stderr)
    );
    let torch: serde_json::Value = serde_json::from_slice(&py.stdout).unwrap();
    let torch_loss = torch["loss"].as_f64().unwrap();
    let best = eval["loss"].as_f64().unwrap();
    eprintln!("the same weights in PyTorch: {torch} (ringmaster eval.json loss {best})");
    assert!(
        (torch_loss - best).abs() <= 1e-3 * best,
        "ringmaster {best}, pytorch {torch_loss}"
    );

    // The example's sampler prints text from those weights.
    let sampled = Command::new(root.join(".venv/bin/python"))
        .arg(root.join("examples/text-gpt/sample.py"))
        .arg(out.join("model.safetensors"))
        .args(["This License ", "200"])
        .output()
        .unwrap();
    assert!(
        sampled.status.success(),
        "{}",
        String::from_utf8_lossy(&sampled.stderr)
    );
    let sampled = String::from_utf8_lossy(&sampled.stdout);
    eprintln!("sampled: {sampled}");
    assert!(sampled.starts_with("This License ") && sampled.len() > 200);
}

#[test]
fn one_two_and_four_workers_train_the_same_transformer() {
    let tmp = tempfile::tempdir().unwrap();
    let data = small_data(tmp.path());
    let cluster = LocalCluster::start(4).unwrap();
    let (_, one) = cluster.train(tmp.path(), &job(&data, "t1", 1, 30));
    let one = model_params(&one);
    for workers in [2, 4] {
        let name = format!("t{workers}");
        let (_, out) = cluster.train(tmp.path(), &job(&data, &name, workers, 30));
        let rel = relative_l2(&one, &model_params(&out));
        eprintln!("transformer: relative L2 between 1 and {workers} workers: {rel:e}");
        assert!(rel < 1e-5, "1 vs {workers} workers: {rel}");
    }
}

#[test]
fn a_streamed_token_dataset_trains_as_one_loaded_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let files = corpus();
    let data = tmp.path().join("sharded");
    // Shards of 32 samples read on demand a window of 2 shards at a time through the smallest
    // cache (1 MiB), across an epoch boundary (about 37 steps per epoch).
    let mut c = Command::new(bin("coordinator"));
    c.args(["dataset", "pack", "--text", &files[0], "--context", "16"])
        .args([
            "--val-fraction",
            "0.1",
            "--shard-samples",
            "32",
            "--out-dir",
        ])
        .arg(&data);
    let out = run_with_timeout(c, T);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let cluster = LocalCluster::start(2).unwrap();
    let stream = "loading = \"stream\"\nshuffle_window_shards = 2\ncache_bytes = \"1 MiB\"";
    let memory = "loading = \"memory\"\nshuffle_window_shards = 2";
    let (s_done, s_out) = cluster.train(tmp.path(), &job(&data, "s", 2, 60).data(stream));
    let (m_done, m_out) = cluster.train(tmp.path(), &job(&data, "m", 2, 60).data(memory));
    assert_eq!(
        model_params(&s_out),
        model_params(&m_out),
        "streamed and in-memory token runs differ"
    );
    assert_eq!(
        s_done["metrics"]["val_perplexity"],
        m_done["metrics"]["val_perplexity"]
    );
}

#[test]
fn cancel_then_resume_of_a_transformer_is_bitwise_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let data = small_data(tmp.path());
    let cluster = LocalCluster::start(2).unwrap();
    let steps = 400;
    let (_, whole) = cluster.train(tmp.path(), &job(&data, "whole", 2, steps));
    let whole = model_params(&whole);

    let (stop, resumed) =
        cluster.cancel_then_resume(tmp.path(), &job(&data, "split", 2, steps), 40);
    assert_eq!(
        whole, resumed,
        "parameters differ after cancel + resume at {stop}"
    );
}

#[test]
fn a_context_unlike_the_datasets_and_a_classifier_on_tokens_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = small_data(tmp.path());
    let cluster = LocalCluster::start(1).unwrap();
    let wrong = job(&data, "wrong", 1, 10)
        .model_kind("kind = \"transformer\"\nlayers = 1\nheads = 2\nwidth = 32\ncontext = 32")
        .write(tmp.path());
    let out = cluster.cli(&["submit", wrong.to_str().unwrap()], T);
    assert_ne!(out.code, 0, "{}", out.stdout);
    assert!(
        out.stderr.contains("model.context is 32")
            && out.stderr.contains("hold 16 tokens")
            && out.stderr.contains("wrong.toml:"),
        "{}",
        out.stderr
    );
    let classifier = JobBuilder::new("cls", &data)
        .train("steps = 10\noptimizer = \"adam\"\nlearning_rate = 0.001")
        .write(tmp.path());
    let out = cluster.cli(&["submit", classifier.to_str().unwrap()], T);
    assert_ne!(out.code, 0, "{}", out.stdout);
    assert!(
        out.stderr.contains("token sequences") && out.stderr.contains("classification"),
        "{}",
        out.stderr
    );
}

/// Runs the project venv's python on `args` (from the repository root) and returns its stdout,
/// asserting it succeeds.
fn python(args: &[&std::ffi::OsStr]) -> String {
    let root = repo_root();
    let out = Command::new(root.join(".venv/bin/python"))
        .args(args)
        .current_dir(&root)
        .output()
        .expect("run the project venv's python (scripts/bootstrap makes it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_bpe_vocabulary_packs_losslessly_and_trains_a_transformer_with_that_many_outputs() {
    let root = repo_root();
    let tmp = tempfile::tempdir().unwrap();
    let files = corpus();
    let bytes = pack(&files, 16, &tmp.path().join("bytes"));
    let data = tmp.path().join("bpe");
    let packed = pack_with(&files, 16, &data, &["--bpe-vocab", "512"]);
    eprintln!("BPE 512: {packed}");
    assert_eq!(packed["vocab"], 512, "{packed}");
    assert_eq!(packed["tokenizer"], "tokenizer.json");
    let (tokens, text_bytes) = (
        packed["tokens"].as_u64().unwrap(),
        packed["bytes"].as_u64().unwrap(),
    );
    assert_eq!(text_bytes, bytes["tokens"].as_u64().unwrap());
    assert!(
        tokens < text_bytes * 3 / 5,
        "{tokens} tokens for {text_bytes} bytes"
    );
    assert_eq!(
        packed["train_samples"].as_u64().unwrap(),
        packed["train_tokens"].as_u64().unwrap() / 17
    );
    assert_eq!(
        packed["val_samples"].as_u64().unwrap(),
        packed["val_tokens"].as_u64().unwrap() / 17
    );
    // Per token the BPE baseline is far above the bytes'; per byte of text it is below.
    let baseline = packed["unigram_val_perplexity"].as_f64().unwrap();
    let bpb = packed["unigram_val_bits_per_byte"].as_f64().unwrap();
    let per_token = packed["val_bytes_per_token"].as_f64().unwrap();
    let byte_bpb = bytes["unigram_val_bits_per_byte"].as_f64().unwrap();
    assert!((bpb - baseline.log2() / per_token).abs() < 1e-9, "{packed}");
    assert!(baseline > 4.0 * bytes["unigram_val_perplexity"].as_f64().unwrap());
    assert!(
        bpb < byte_bpb,
        "BPE unigram {bpb} bits per byte, bytes {byte_bpb}"
    );

    // Both parts' tokens decode to the text in pure Python, and Python's encoder (the one
    // sample.py uses for prompts) gives the same ids: the training part from byte 0, the
    // validation part from the split.
    let split = packed["split_byte"].as_u64().unwrap().to_string();
    for (part, start) in [("train", "0"), ("val", split.as_str())] {
        let script = root.join("tests/python/byte_bpe.py");
        let dir = data.join(part);
        let mut args: Vec<&std::ffi::OsStr> = vec![
            script.as_os_str(),
            "check".as_ref(),
            dir.as_os_str(),
            start.as_ref(),
        ];
        args.extend(files.iter().map(std::ffi::OsStr::new));
        let check: serde_json::Value = serde_json::from_str(&python(&args)).unwrap();
        eprintln!("{part}: {check}");
        assert_eq!(check["decodes_to_text"], true, "{part}: {check}");
        assert_eq!(check["encode_agrees"], true, "{part}: {check}");
        assert!(check["tokens"].as_u64().unwrap() > 1000, "{check}");
    }

    // Usage errors (exit 2): fewer tokens than the byte symbols, and BPE without text.
    for args in [
        ["--text", &files[0], "--context", "16", "--bpe-vocab", "255"].as_slice(),
        ["--csv", &files[0], "--bpe-vocab", "512"].as_slice(),
    ] {
        let mut c = Command::new(bin("coordinator"));
        c.args(["dataset", "pack"]).args(args).arg("--out-dir");
        c.arg(tmp.path().join("refused"));
        let out = run_with_timeout(c, T);
        assert_eq!(out.code, 2, "{args:?}: {}", out.stderr);
        assert!(out.stderr.contains("--bpe-vocab"), "{}", out.stderr);
    }
    assert!(!tmp.path().join("refused").exists());

    let cluster = LocalCluster::start(2).unwrap();
    let job = JobBuilder::new("bpe", &data)
        .seed(5)
        .task("kind = \"language_model\"")
        .model_kind(
            "kind = \"transformer\"\nlayers = 2\nheads = 2\nwidth = 32\ncontext = 16\n\
             tied_embeddings = false",
        )
        .validation()
        .batch(32)
        .train(
            "steps = 300\noptimizer = \"adam\"\nlearning_rate = 0.003\n\
             eval_every_steps = 150",
        )
        .exactly(2);
    let (done, out) = cluster.train(tmp.path(), &job);
    let params = read_params(&out.join("model.safetensors"));
    assert_eq!(params["wte.weight"].0, [512, 32]);
    assert_eq!(params["lm_head.weight"].0, [512, 32]);
    let ppl = done["metrics"]["val_perplexity"].as_f64().unwrap();
    eprintln!(
        "BPE 512 transformer: validation perplexity {ppl:.2}, unigram baseline {baseline:.2}, {:.3} bits per byte",
        ppl.log2() / per_token
    );
    assert!(
        ppl.is_finite() && ppl < 0.5 * baseline,
        "{ppl} vs {baseline}"
    );

    // The example's sampler decodes the model's tokens with the dataset's tokenizer.
    let model = out.join("model.safetensors");
    let sampled = python(&[
        root.join("examples/text-gpt/sample.py").as_os_str(),
        "--heads".as_ref(),
        "2".as_ref(),
        "--tokenizer".as_ref(),
        data.join("train").as_os_str(),
        model.as_os_str(),
        "This License ".as_ref(),
        "40".as_ref(),
    ]);
    eprintln!("sampled: {sampled}");
    assert!(
        sampled.starts_with("This License ") && sampled.len() > 60,
        "{sampled}"
    );
}
