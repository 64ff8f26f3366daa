//! Helpers for integration tests: locate the built binaries, run CLI commands
//! with timeouts, and start a local cluster (coordinator + workers) on
//! ephemeral ports whose processes are always killed and reaped on drop.
//!
//! The binaries must be built first (`scripts/test` does `cargo build
//! --workspace --bins`); set `RINGMASTER_BIN_DIR` to use others.

pub mod audit;
pub mod etcd;
pub mod proxy;

use anyhow::{Context, bail};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Where `coordinator` and `worker` live: `$RINGMASTER_BIN_DIR`, else the
/// profile directory this test binary was built into.
pub fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("RINGMASTER_BIN_DIR") {
        return PathBuf::from(dir);
    }
    // target/<profile>/deps/<test-binary>
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent()?.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| repo_root().join("target/debug"))
}

/// Path of a workspace binary, checked to exist with a helpful message.
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: build it first with `cargo build --workspace --bins` (scripts/test does)",
        path.display()
    );
    path
}

/// A finished CLI invocation.
#[derive(Debug)]
pub struct Output {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// Parses stdout as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}): {}\nstderr: {}",
                self.stdout, self.stderr
            )
        })
    }
}

/// Runs the coordinator CLI with a deadline; the process is killed if it
/// outlives it.
pub fn coordinator_cli(url: &str, args: &[&str], timeout: Duration) -> Output {
    let mut cmd = Command::new(bin("coordinator"));
    cmd.args(args).env("RINGMASTER_COORDINATOR", url);
    run_with_timeout(cmd, timeout)
}

/// Runs a command to completion within `timeout`, capturing its output.
pub fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().expect("failed to spawn");
    let mut guard = ChildGuard(Some(child));
    let pid = guard.0.as_ref().map(|c| c.id()).unwrap_or(0);
    let (tx, rx) = std::sync::mpsc::channel();
    let child = guard.0.take().expect("child");
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(Ok(out)) => Output {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        },
        Ok(Err(e)) => panic!("waiting for {cmd:?} failed: {e}"),
        Err(_) => {
            // SAFETY: plain kill(2) of a child we spawned and have not reaped.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("{cmd:?} did not finish within {timeout:?}");
        }
    }
}

/// Kills and reaps its child when dropped, so a failing test leaves nothing
/// running.
pub struct ChildGuard(pub Option<Child>);

impl ChildGuard {
    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.0.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Sends SIGKILL and reaps the process.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A coordinator with its workers, each a real process on ephemeral ports.
pub struct LocalCluster {
    pub url: String,
    pub state_dir: tempfile::TempDir,
    pub coordinator: ChildGuard,
    pub workers: Vec<ChildGuard>,
    serve_args: Vec<String>,
}

/// Starts `coordinator serve` on `listen` and returns it with the address it
/// reports. Heartbeats are fast so tests notice lost workers quickly.
pub fn spawn_coordinator(
    listen: &str,
    state_dir: &Path,
    serve_args: &[String],
) -> anyhow::Result<(ChildGuard, String)> {
    let mut child = Command::new(bin("coordinator"))
        .args(["serve", "--listen", listen, "--state-dir"])
        .arg(state_dir)
        .args([
            "--heartbeat-interval-ms",
            "200",
            "--heartbeat-timeout-ms",
            "3000",
        ])
        .args(serve_args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("failed to start the coordinator")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let guard = ChildGuard(Some(child));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        if let Some(Ok(line)) = lines.next() {
            let _ = tx.send(line);
        }
        // Keep draining so the coordinator never blocks on a full pipe.
        for _ in lines {}
    });
    let line = rx
        .recv_timeout(Duration::from_secs(30))
        .context("the coordinator did not report its address")?;
    let addr = line
        .strip_prefix("coordinator listening on ")
        .with_context(|| format!("unexpected first line: {line}"))?
        .to_string();
    Ok((guard, addr))
}

impl LocalCluster {
    /// Starts a coordinator and `workers` CPU workers named `w0`, `w1`, ...,
    /// and waits until all have registered.
    pub fn start(workers: usize) -> anyhow::Result<Self> {
        Self::start_on(tempfile::tempdir()?, workers)
    }

    /// Like [`LocalCluster::start`], on an existing state directory (to test
    /// what survives a coordinator restart).
    pub fn start_on(state_dir: tempfile::TempDir, workers: usize) -> anyhow::Result<Self> {
        Self::start_with(state_dir, workers, &[])
    }

    /// Like [`LocalCluster::start`], with extra environment for the workers
    /// (e.g. `RINGMASTER_FAILPOINT`).
    pub fn start_with_env(workers: usize, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        Self::start_with(tempfile::tempdir()?, workers, env)
    }

    /// Like [`LocalCluster::start`], with extra `coordinator serve` arguments
    /// (e.g. `--store etcd://...`).
    pub fn start_with_serve_args(workers: usize, serve_args: &[String]) -> anyhow::Result<Self> {
        Self::start_full(tempfile::tempdir()?, workers, &[], serve_args)
    }

    fn start_with(
        state_dir: tempfile::TempDir,
        workers: usize,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        Self::start_full(state_dir, workers, env, &[])
    }

    fn start_full(
        state_dir: tempfile::TempDir,
        workers: usize,
        env: &[(&str, &str)],
        serve_args: &[String],
    ) -> anyhow::Result<Self> {
        let (coordinator, addr) = spawn_coordinator("127.0.0.1:0", state_dir.path(), serve_args)?;
        let mut cluster = LocalCluster {
            url: format!("http://{addr}"),
            state_dir,
            coordinator,
            workers: Vec::new(),
            serve_args: serve_args.to_vec(),
        };
        for i in 0..workers {
            cluster.add_worker_with_env(&format!("w{i}"), env)?;
            // Registration order is rank order: keep it stable for tests.
            cluster.wait_for_workers(i + 1, Duration::from_secs(60))?;
        }
        Ok(cluster)
    }

    /// SIGKILLs the coordinator (workers keep running).
    pub fn kill_coordinator(&mut self) {
        self.coordinator.kill();
    }

    /// Starts the coordinator again on the same address, state dir and
    /// store, e.g. after [`LocalCluster::kill_coordinator`].
    pub fn restart_coordinator(&mut self) -> anyhow::Result<()> {
        self.coordinator.kill();
        let listen = self.url.trim_start_matches("http://").to_string();
        let (guard, _) = spawn_coordinator(&listen, self.state_dir.path(), &self.serve_args)?;
        self.coordinator = guard;
        Ok(())
    }

    /// Starts another coordinator on the same store (a standby, if this
    /// cluster's coordinator leads) with its own state dir; returns it and
    /// its URL.
    pub fn spawn_standby(&self) -> anyhow::Result<(ChildGuard, String, tempfile::TempDir)> {
        let dir = tempfile::tempdir()?;
        let (guard, addr) = spawn_coordinator("127.0.0.1:0", dir.path(), &self.serve_args)?;
        Ok((guard, format!("http://{addr}"), dir))
    }

    /// Starts one more worker.
    pub fn add_worker(&mut self, name: &str) -> anyhow::Result<()> {
        self.add_worker_with_env(name, &[])
    }

    /// Starts one more worker with extra environment variables.
    pub fn add_worker_with_env(&mut self, name: &str, env: &[(&str, &str)]) -> anyhow::Result<()> {
        self.workers.push(spawn_worker(&self.url, name, env)?);
        Ok(())
    }

    /// Runs a coordinator CLI command against this cluster.
    pub fn cli(&self, args: &[&str], timeout: Duration) -> Output {
        coordinator_cli(&self.url, args, timeout)
    }

    /// Submits a job file with `--follow --output json` and returns how the
    /// command ended, whatever the job's fate.
    pub fn submit_follow(&self, job: &Path, extra: &[&str]) -> Output {
        let mut args = vec![
            "submit",
            job.to_str().expect("utf-8 path"),
            "--follow",
            "--output",
            "json",
        ];
        args.extend_from_slice(extra);
        self.cli(&args, Duration::from_secs(300))
    }

    /// Submits a job file with `--follow --output json`, asserts the command
    /// succeeded, and returns the final status.
    pub fn follow(&self, job: &Path, extra: &[&str]) -> serde_json::Value {
        let out = self.submit_follow(job, extra);
        assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
        out.json()
    }

    /// Writes `job` into `dir`, runs it to success (asserting it succeeds)
    /// and returns its final status and its output folder.
    pub fn train(&self, dir: &Path, job: &JobBuilder) -> (serde_json::Value, PathBuf) {
        let done = self.follow(&job.write(dir), &[]);
        assert_eq!(done["state"], "succeeded", "{done}");
        let out = PathBuf::from(done["output_dir"].as_str().expect("output_dir"));
        (done, out)
    }

    /// The `workers --output json` listing.
    pub fn workers_json(&self) -> Vec<serde_json::Value> {
        let out = self.cli(&["workers", "--output", "json"], Duration::from_secs(20));
        assert_eq!(out.code, 0, "workers failed: {}", out.stderr);
        out.json().as_array().cloned().unwrap_or_default()
    }

    /// Waits until exactly `n` workers are registered.
    pub fn wait_for_workers(&self, n: usize, timeout: Duration) -> anyhow::Result<()> {
        wait_until(timeout, || self.workers_json().len() == n)
            .with_context(|| format!("{n} workers did not register"))
    }

    /// The `status --output json` of a job.
    pub fn status(&self, job: &str) -> serde_json::Value {
        let out = self.cli(
            &["status", job, "--output", "json"],
            Duration::from_secs(20),
        );
        assert_eq!(out.code, 0, "status failed: {}", out.stderr);
        out.json()
    }

    /// Submits `job`, cancels it once it has passed step `after` (the cancel writes a final
    /// checkpoint), resumes it to the end and returns the step it was cancelled at and its final
    /// parameters, for comparison with an undisturbed run of the same job.
    pub fn cancel_then_resume(&self, dir: &Path, job: &JobBuilder, after: u64) -> (u64, Vec<f32>) {
        const T: Duration = Duration::from_secs(30);
        const JOB: Duration = Duration::from_secs(300);
        let file = job.write(dir);
        let out = self.cli(&["submit", file.to_str().unwrap()], T);
        assert_eq!(out.code, 0, "{}", out.stderr);
        let id = out.stdout.trim().to_string();
        wait_until(JOB, || {
            self.status(&id)["step"].as_u64().unwrap_or(0) >= after
        })
        .unwrap();
        let out = self.cli(&["cancel", &id], T);
        assert_eq!(out.code, 0, "{}", out.stderr);
        let mut last = serde_json::Value::Null;
        wait_until(JOB, || {
            last = self.status(&id);
            last["state"] == "cancelled"
        })
        .unwrap_or_else(|_| panic!("never cancelled: {last}"));
        let stop = last["step"].as_u64().unwrap();
        let total = last["total_steps"].as_u64().unwrap_or(u64::MAX);
        assert!(stop < total, "cancelled at step {stop}, after the end");
        let out = self.cli(&["resume", &id, "--follow", "--output", "json"], JOB);
        assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
        let done = out.json();
        assert_eq!(done["state"], "succeeded", "{done}");
        let params = model_params(&PathBuf::from(done["output_dir"].as_str().unwrap()));
        (stop, params)
    }
}

/// Starts a worker process for the coordinator(s) at `url` (one URL or
/// several, comma-separated).
pub fn spawn_worker(url: &str, name: &str, env: &[(&str, &str)]) -> anyhow::Result<ChildGuard> {
    let child = Command::new(bin("worker"))
        .args(["--coordinator", url, "--name", name, "--threads", "1"])
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("failed to start a worker")?;
    Ok(ChildGuard(Some(child)))
}

/// `coordinator serve` arguments for a store on these etcd endpoints.
pub fn etcd_store_args(endpoints: &[String]) -> Vec<String> {
    let hosts: Vec<&str> = endpoints
        .iter()
        .map(|e| e.trim_start_matches("http://"))
        .collect();
    vec!["--store".into(), format!("etcd://{}", hosts.join(","))]
}

/// Reads `metrics.jsonl` as JSON objects.
pub fn read_metrics(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

/// The highest step in a `metrics.jsonl` (0 while it is missing or empty).
pub fn last_logged_step(metrics: &Path) -> u64 {
    std::fs::read_to_string(metrics)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["step"].as_u64())
        .max()
        .unwrap_or(0)
}

/// A `job.toml` for a test: an MLP on a dataset packed by [`pack_digits`]
/// (or any `<data>/train`, `<data>/val`), with every table a test may need
/// to change. Defaults: seed 0, hidden `[32]`, batch 64, one worker at
/// least, no validation set, output `out-<name>` next to the file. Lines
/// given to [`JobBuilder::model`], [`JobBuilder::train`],
/// [`JobBuilder::checkpoint`], [`JobBuilder::fault`] and [`JobBuilder::debug`]
/// are TOML written into that table as they are.
#[derive(Clone, Debug)]
pub struct JobBuilder {
    name: String,
    data: PathBuf,
    seed: u64,
    /// `[task]` lines, e.g. `kind = "regression"`.
    task: Vec<String>,
    hidden: Vec<u32>,
    /// Replaces `kind` and `hidden` when set (another kind of model).
    kind_lines: Option<String>,
    model: Vec<String>,
    validation: bool,
    data_lines: Vec<String>,
    batch: u32,
    train: Vec<String>,
    min: u32,
    max: Option<u32>,
    output: String,
    checkpoint: Vec<String>,
    fault: Vec<String>,
    debug: Vec<String>,
}

impl JobBuilder {
    /// A job called `name` training on `<data>/train`.
    pub fn new(name: &str, data: &Path) -> Self {
        JobBuilder {
            name: name.to_string(),
            data: data.to_path_buf(),
            seed: 0,
            task: Vec::new(),
            hidden: vec![32],
            kind_lines: None,
            model: Vec::new(),
            validation: false,
            data_lines: Vec::new(),
            batch: 64,
            train: Vec::new(),
            min: 1,
            max: None,
            output: format!("out-{name}"),
            checkpoint: Vec::new(),
            fault: Vec::new(),
            debug: Vec::new(),
        }
    }

    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// `[task]` lines, e.g. `kind = "regression"\nloss = "huber"`.
    pub fn task(mut self, lines: &str) -> Self {
        self.task.push(lines.to_string());
        self
    }

    pub fn hidden(mut self, widths: &[u32]) -> Self {
        self.hidden = widths.to_vec();
        self
    }

    /// A `[model]` table of another kind: `lines` replace `kind = "mlp"` and
    /// `hidden`, e.g. `kind = "cnn"\ninput_shape = [1, 8, 8]\nchannels = [8]`.
    pub fn model_kind(mut self, lines: &str) -> Self {
        self.kind_lines = Some(lines.to_string());
        self
    }

    /// More `[model]` lines, e.g. `dropout = 0.2`.
    pub fn model(mut self, lines: &str) -> Self {
        self.model.push(lines.to_string());
        self
    }

    /// Scores `<data>/val` as the validation set.
    pub fn validation(mut self) -> Self {
        self.validation = true;
        self
    }

    /// More `[data]` lines, e.g. `loading = "stream"`.
    pub fn data(mut self, lines: &str) -> Self {
        self.data_lines.push(lines.to_string());
        self
    }

    pub fn batch(mut self, batch: u32) -> Self {
        self.batch = batch;
        self
    }

    /// More `[train]` lines, e.g. `steps = 100\noptimizer = "sgd"`.
    pub fn train(mut self, lines: &str) -> Self {
        self.train.push(lines.to_string());
        self
    }

    /// `workers.min`; `workers.max` stays unset (it defaults to `min`).
    pub fn workers(mut self, min: u32) -> Self {
        self.min = min;
        self.max = None;
        self
    }

    /// `workers.min = workers.max = n`.
    pub fn exactly(mut self, n: u32) -> Self {
        self.min = n;
        self.max = Some(n);
        self
    }

    /// `output.dir`, relative to the job file's directory.
    pub fn output(mut self, dir: &str) -> Self {
        self.output = dir.to_string();
        self
    }

    /// `[checkpoint]` lines, e.g. `every_steps = 200`.
    pub fn checkpoint(mut self, lines: &str) -> Self {
        self.checkpoint.push(lines.to_string());
        self
    }

    /// `[fault]` lines, e.g. `max_restarts = 0`.
    pub fn fault(mut self, lines: &str) -> Self {
        self.fault.push(lines.to_string());
        self
    }

    /// `[debug]` lines, e.g. `audit_samples = true` (see [`audit`]).
    pub fn debug(mut self, lines: &str) -> Self {
        self.debug.push(lines.to_string());
        self
    }

    /// `workers.max`, after [`workers`](Self::workers) set the minimum.
    pub fn max(mut self, max: u32) -> Self {
        self.max = Some(max);
        self
    }

    /// The file's text.
    pub fn toml(&self) -> String {
        let hidden: Vec<String> = self.hidden.iter().map(u32::to_string).collect();
        let kind = match &self.kind_lines {
            Some(lines) => format!("{lines}\n"),
            None => format!("kind = \"mlp\"\nhidden = [{}]\n", hidden.join(", ")),
        };
        let mut t = format!("name = \"{}\"\nseed = {}\n", self.name, self.seed);
        if !self.task.is_empty() {
            t.push_str("\n[task]\n");
            for l in &self.task {
                t.push_str(&format!("{l}\n"));
            }
        }
        t.push_str(&format!("\n[model]\n{kind}"));
        for l in &self.model {
            t.push_str(&format!("{l}\n"));
        }
        t.push_str(&format!(
            "\n[data]\ntrain = \"{}\"\n",
            self.data.join("train").display()
        ));
        if self.validation {
            t.push_str(&format!(
                "validation = \"{}\"\n",
                self.data.join("val").display()
            ));
        }
        for l in &self.data_lines {
            t.push_str(&format!("{l}\n"));
        }
        t.push_str(&format!("\n[train]\nbatch_size = {}\n", self.batch));
        for l in &self.train {
            t.push_str(&format!("{l}\n"));
        }
        t.push_str(&format!("\n[workers]\nmin = {}\n", self.min));
        if let Some(max) = self.max {
            t.push_str(&format!("max = {max}\n"));
        }
        t.push_str(&format!("\n[output]\ndir = \"{}\"\n", self.output));
        if !self.checkpoint.is_empty() {
            t.push_str("\n[checkpoint]\n");
            for l in &self.checkpoint {
                t.push_str(&format!("{l}\n"));
            }
        }
        if !self.fault.is_empty() {
            t.push_str("\n[fault]\n");
            for l in &self.fault {
                t.push_str(&format!("{l}\n"));
            }
        }
        if !self.debug.is_empty() {
            t.push_str("\n[debug]\n");
            for l in &self.debug {
                t.push_str(&format!("{l}\n"));
            }
        }
        t
    }

    /// Writes `<dir>/<name>.toml` and returns its path.
    pub fn write(&self, dir: &Path) -> PathBuf {
        let path = dir.join(format!("{}.toml", self.name));
        std::fs::write(&path, self.toml()).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        path
    }
}

/// Polls `cond` every 50 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("condition not met within {timeout:?}")
}

/// The scikit-learn digits CSV shipped in the project venv (see
/// `scripts/fetch-digits`).
pub fn digits_csv() -> PathBuf {
    let out = run_with_timeout(
        {
            let mut c = Command::new(repo_root().join("scripts/fetch-digits"));
            c.current_dir(repo_root());
            c
        },
        Duration::from_secs(600),
    );
    assert_eq!(out.code, 0, "scripts/fetch-digits failed: {}", out.stderr);
    PathBuf::from(out.stdout.trim())
}

/// Packs digits into `<dir>/train` and `<dir>/val` with the CLI, the way the
/// quickstart does.
pub fn pack_digits(dir: &Path) -> PathBuf {
    let csv = digits_csv();
    let out = run_with_timeout(
        {
            let mut c = Command::new(bin("coordinator"));
            c.args(["dataset", "pack", "--csv"])
                .arg(&csv)
                .arg("--out-dir")
                .arg(dir)
                .args(["--standardize", "--val-fraction", "0.2", "--seed", "7"]);
            c
        },
        Duration::from_secs(120),
    );
    assert_eq!(out.code, 0, "dataset pack failed: {}", out.stderr);
    dir.to_path_buf()
}

/// Generates a synthetic dataset into `dir` with the CLI (`dataset synth`).
pub fn synth(dir: &Path, samples: usize, features: usize, shard_samples: usize, seed: u64) {
    let out = run_with_timeout(
        {
            let mut c = Command::new(bin("coordinator"));
            c.args(["dataset", "synth", "--out-dir"]).arg(dir).args([
                "--samples",
                &samples.to_string(),
                "--features",
                &features.to_string(),
                "--classes",
                "10",
                "--seed",
                &seed.to_string(),
                "--shard-samples",
                &shard_samples.to_string(),
            ]);
            c
        },
        Duration::from_secs(120),
    );
    assert_eq!(out.code, 0, "dataset synth failed: {}", out.stderr);
}

/// Generates a synthetic regression dataset of `targets` targets per sample
/// into `dir` with the CLI (`dataset synth --targets`).
pub fn synth_regression(
    dir: &Path,
    samples: usize,
    features: usize,
    targets: usize,
    shard_samples: usize,
    seed: u64,
) {
    let out = run_with_timeout(
        {
            let mut c = Command::new(bin("coordinator"));
            c.args(["dataset", "synth", "--out-dir"]).arg(dir).args([
                "--samples",
                &samples.to_string(),
                "--features",
                &features.to_string(),
                "--targets",
                &targets.to_string(),
                "--seed",
                &seed.to_string(),
                "--shard-samples",
                &shard_samples.to_string(),
            ]);
            c
        },
        Duration::from_secs(120),
    );
    assert_eq!(out.code, 0, "dataset synth failed: {}", out.stderr);
}

/// scikit-learn's diabetes data shipped in the project venv (442 patients,
/// 10 space-delimited features in `diabetes_data_raw.csv.gz`, the target in
/// `diabetes_target.csv.gz`), next to the digits `scripts/fetch-digits`
/// finds.
pub fn diabetes_csvs() -> (PathBuf, PathBuf) {
    let dir = digits_csv()
        .parent()
        .expect("digits.csv.gz lives in a folder")
        .to_path_buf();
    (
        dir.join("diabetes_data_raw.csv.gz"),
        dir.join("diabetes_target.csv.gz"),
    )
}

/// Packs diabetes into `<dir>/train` and `<dir>/val` with the CLI, as the
/// README shows: features standardized, targets as given, 20% held out.
pub fn pack_diabetes(dir: &Path) -> PathBuf {
    let (data, target) = diabetes_csvs();
    let out = run_with_timeout(
        {
            let mut c = Command::new(bin("coordinator"));
            c.args(["dataset", "pack", "--task", "regression", "--csv"])
                .arg(&data)
                .args(["--delimiter", "space", "--labels-csv"])
                .arg(&target)
                .arg("--out-dir")
                .arg(dir)
                .args(["--standardize", "--val-fraction", "0.2", "--seed", "7"]);
            c
        },
        Duration::from_secs(120),
    );
    assert_eq!(out.code, 0, "dataset pack failed: {}", out.stderr);
    dir.to_path_buf()
}

/// `|a - b| / |a|` over two flattened parameter vectors of one length.
pub fn relative_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "parameter vectors of different lengths");
    let diff: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2))
        .sum();
    let norm: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum();
    (diff / norm.max(1e-30)).sqrt()
}

/// The parameters of `<out>/model.safetensors`, flattened in name order.
pub fn model_params(out: &Path) -> Vec<f32> {
    read_params(&out.join("model.safetensors"))
        .into_values()
        .flat_map(|(_, v)| v)
        .collect()
}

/// Checks that a reference script's scores (`{"samples": n, "accuracy": a}`, the same trained
/// weights in the equivalent PyTorch module) give `accuracy`: float rounding may flip at most
/// one borderline sample.
pub fn assert_same_accuracy(torch: &serde_json::Value, accuracy: f64) {
    let samples = torch["samples"].as_f64().expect("a sample count");
    let torch_accuracy = torch["accuracy"].as_f64().expect("an accuracy");
    assert!(
        (torch_accuracy - accuracy).abs() <= 1.0 / samples + 1e-12,
        "ringmaster {accuracy}, pytorch {torch_accuracy}"
    );
}

/// Reads every tensor of a safetensors file as f32 values, by name (i64
/// tensors, such as BatchNorm's `num_batches_tracked`, converted by value).
pub fn read_params(path: &Path) -> std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("valid safetensors");
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let values = match view.dtype() {
                safetensors::Dtype::F32 => view
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
                safetensors::Dtype::I64 => view
                    .data()
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
                    .collect(),
                other => panic!("{}: {name} is {other:?}", path.display()),
            };
            (name, (view.shape().to_vec(), values))
        })
        .collect()
}
