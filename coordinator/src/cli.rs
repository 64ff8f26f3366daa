//! The command line: argument definitions (clap derive; the doc comments are
//! the help) and what each command does. Client commands talk to a running
//! coordinator over the `Control` service; `serve` runs one.

use crate::control::{self, ControlConfig};
use crate::election;
use crate::server::{Role, STANDBY_PREFIX, Services};
use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use ringmaster_common::dataset::{self, DatasetManifest};
use ringmaster_common::jobspec::{JobSpec, SpanField};
use ringmaster_common::store::fenced::FencedStore;
use ringmaster_common::store::keys;
use ringmaster_common::store::{
    EmbeddedStore, EtcdOptions, EtcdStore, StateStore, StoreUrl, parse_store_url,
};
use ringmaster_proto::pb::{self, control_client::ControlClient};
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tonic::transport::Channel;

/// Ringmaster coordinator and command-line client.
///
/// Examples:
///   coordinator serve --state-dir /var/lib/ringmaster
///   coordinator submit examples/digits-mlp.toml --follow
///   coordinator status digits-mlp-1 --output json
///   coordinator workers
#[derive(Parser, Debug)]
#[command(name = "coordinator", version, verbatim_doc_comment)]
pub struct Cli {
    /// Coordinator URL for client commands; several (comma-separated) for a
    /// leader and its standbys: the leader is found.
    #[arg(
        long,
        global = true,
        env = "RINGMASTER_COORDINATOR",
        default_value = "http://127.0.0.1:50051"
    )]
    pub coordinator: String,
    /// Output format for commands that print data.
    #[arg(long, global = true, value_enum, default_value_t = Output::Text)]
    pub output: Output,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the coordinator: gRPC server, control loop and embedded store.
    ///
    /// Example:
    ///   coordinator serve --listen 0.0.0.0:50051 --state-dir ./state
    #[command(verbatim_doc_comment)]
    Serve(ServeArgs),
    /// Validate a job file and submit it.
    ///
    /// Examples:
    ///   coordinator submit examples/digits-mlp.toml --follow
    ///   coordinator submit job.toml --dry-run
    #[command(verbatim_doc_comment)]
    Submit {
        /// The job file (job.toml).
        job: PathBuf,
        /// Show progress until the job ends; exit 0 only if it succeeded.
        #[arg(long)]
        follow: bool,
        /// Validate (job file and datasets) and print the job, submit nothing.
        #[arg(long)]
        dry_run: bool,
        /// Start from this checkpoint directory (`<dir>/<job>/step-<N>`) instead
        /// of a fresh initialisation: a fork. The worker count may differ.
        #[arg(long)]
        resume_from: Option<PathBuf>,
    },
    /// Show one job, or without JOB the coordinator itself (store, degraded
    /// or healthy, job and worker counts).
    ///
    /// Examples:
    ///   coordinator status digits-mlp-1 --output json
    ///   coordinator status
    #[command(verbatim_doc_comment)]
    Status { job: Option<String> },
    /// List all jobs.
    ///
    /// Example:
    ///   coordinator list --output json
    #[command(verbatim_doc_comment)]
    List,
    /// Cancel a queued or running job. A running job first takes a final
    /// checkpoint at its next step boundary (unless --now), so it can be resumed.
    ///
    /// Examples:
    ///   coordinator cancel digits-mlp-1
    ///   coordinator cancel digits-mlp-1 --now
    #[command(verbatim_doc_comment)]
    Cancel {
        job: String,
        /// Stop at once, without a final checkpoint.
        #[arg(long)]
        now: bool,
    },
    /// Continue a failed or cancelled job from its latest committed checkpoint
    /// (falling back to an older one if the newest does not verify).
    ///
    /// Example:
    ///   coordinator resume digits-mlp-1 --follow
    #[command(verbatim_doc_comment)]
    Resume {
        job: String,
        /// Show progress until the job ends; exit 0 only if it succeeded.
        #[arg(long)]
        follow: bool,
    },
    /// Ask a running job for a checkpoint at its next step boundary.
    ///
    /// Example:
    ///   coordinator checkpoint digits-mlp-1
    #[command(verbatim_doc_comment)]
    Checkpoint { job: String },
    /// List a job's checkpoints: step, metrics, size, committed.
    ///
    /// Example:
    ///   coordinator checkpoints digits-mlp-1 --output json
    #[command(verbatim_doc_comment)]
    Checkpoints { job: String },
    /// List connected workers.
    ///
    /// Example:
    ///   coordinator workers
    #[command(verbatim_doc_comment)]
    Workers,
    /// Prepare datasets in Ringmaster's shard format.
    #[command(subcommand)]
    Dataset(DatasetCommand),
}

impl Command {
    /// Whether this command runs the server (which logs at `info`).
    pub fn is_serve(&self) -> bool {
        matches!(self, Command::Serve(_))
    }
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Directory of the embedded store (created if missing); used when
    /// --store is not given.
    #[arg(long, default_value = ".ringmaster")]
    pub state_dir: PathBuf,
    /// The cluster store: `etcd://host:2379,host2:2379`, or
    /// `embedded:///abs/dir` (default: the embedded store in --state-dir).
    #[arg(long, env = "RINGMASTER_STORE")]
    pub store: Option<String>,
    /// How often workers send heartbeats, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub heartbeat_interval_ms: u64,
    /// A worker silent for this long is declared lost, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    pub heartbeat_timeout_ms: u64,
    /// Workers report progress every this many steps.
    #[arg(long, default_value_t = 10)]
    pub progress_every_steps: u64,
    /// The URL clients and workers should use to reach this coordinator
    /// (what a standby tells them); default `http://<listen address>`.
    #[arg(long)]
    pub advertise: Option<String>,
    /// Seconds a cancelled job may take to write its final checkpoint.
    #[arg(long, default_value_t = 60)]
    pub stop_grace_secs: u64,
    /// After a restart, seconds a running job's workers have to rejoin
    /// before the job is declared failed.
    #[arg(long, default_value_t = 30)]
    pub adopt_grace_secs: u64,
}

#[derive(Subcommand, Debug)]
pub enum DatasetCommand {
    /// Pack CSV (optionally gzip-compressed) or NPY data into train/validation shards.
    ///
    /// Examples:
    ///   coordinator dataset pack --csv digits.csv.gz --out-dir data/digits --standardize
    ///   coordinator dataset pack --npy-features x.npy --npy-labels y.npy --out-dir data/mine
    #[command(verbatim_doc_comment)]
    Pack(PackArgs),
    /// Generate a synthetic classification dataset (for benchmarks and tests).
    ///
    /// Example:
    ///   coordinator dataset synth --out-dir data/synthetic --samples 20000 --features 784 --classes 10
    #[command(verbatim_doc_comment)]
    Synth(SynthArgs),
}

#[derive(Args, Debug)]
pub struct PackArgs {
    /// CSV input (`.gz` is detected); one row per sample.
    #[arg(long, conflicts_with_all = ["npy_features", "npy_labels"], required_unless_present = "npy_features")]
    pub csv: Option<PathBuf>,
    /// Label column of the CSV: `first`, `last`, a 0-based index or a header name.
    #[arg(long, default_value = "last")]
    pub label_column: String,
    /// Whether the CSV has a header row (default: detected).
    #[arg(long)]
    pub header: Option<bool>,
    /// NPY features, 2-D float32/float64.
    #[arg(long, requires = "npy_labels")]
    pub npy_features: Option<PathBuf>,
    /// NPY labels, 1-D integers.
    #[arg(long, requires = "npy_features")]
    pub npy_labels: Option<PathBuf>,
    /// Output directory; `train/` and `val/` are written inside.
    #[arg(long)]
    pub out_dir: PathBuf,
    /// Dataset name (default: the output directory's name).
    #[arg(long)]
    pub name: Option<String>,
    /// Fraction of rows held out for validation (0 for none).
    #[arg(long, default_value_t = 0.2)]
    pub val_fraction: f64,
    /// Standardize features with the training split's mean and std (recorded in the manifest).
    #[arg(long)]
    pub standardize: bool,
    /// Samples per shard file.
    #[arg(long, default_value_t = 65536)]
    pub shard_samples: usize,
    /// Seed of the train/validation split.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Args, Debug)]
pub struct SynthArgs {
    /// The dataset directory to write.
    #[arg(long)]
    pub out_dir: PathBuf,
    #[arg(long, default_value_t = 10000)]
    pub samples: usize,
    #[arg(long, default_value_t = 784)]
    pub features: usize,
    #[arg(long, default_value_t = 10)]
    pub classes: u32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 65536)]
    pub shard_samples: usize,
}

/// Runs a parsed command line and returns the process exit code.
pub async fn run(cli: Cli) -> i32 {
    let result = match cli.command {
        Command::Serve(args) => serve(args).await.map(|()| 0),
        Command::Submit {
            job,
            follow,
            dry_run,
            resume_from,
        } => {
            submit(
                &cli.coordinator,
                cli.output,
                &job,
                follow,
                dry_run,
                resume_from.as_deref(),
            )
            .await
        }
        Command::Status { job: Some(job) } => {
            status(&cli.coordinator, cli.output, &job).await.map(|()| 0)
        }
        Command::Status { job: None } => health(&cli.coordinator, cli.output).await,
        Command::List => list(&cli.coordinator, cli.output).await.map(|()| 0),
        Command::Cancel { job, now } => cancel(&cli.coordinator, cli.output, &job, now)
            .await
            .map(|()| 0),
        Command::Resume { job, follow } => resume(&cli.coordinator, cli.output, &job, follow).await,
        Command::Checkpoint { job } => checkpoint_now(&cli.coordinator, cli.output, &job)
            .await
            .map(|()| 0),
        Command::Checkpoints { job } => checkpoints(&cli.coordinator, cli.output, &job)
            .await
            .map(|()| 0),
        Command::Workers => workers(&cli.coordinator, cli.output).await.map(|()| 0),
        Command::Dataset(cmd) => dataset_cmd(cmd, cli.output).map(|()| 0),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let url = match &args.store {
        Some(s) => parse_store_url(s)?,
        None => StoreUrl::Embedded(args.state_dir.clone()),
    };
    let store: Arc<dyn StateStore> = match &url {
        StoreUrl::Embedded(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("failed to create {}", dir.display()))?;
            let db = dir.join(EmbeddedStore::FILE_NAME);
            Arc::new(
                EmbeddedStore::open(&db)
                    .with_context(|| format!("failed to open the store at {}", db.display()))?,
            )
        }
        StoreUrl::Etcd(endpoints) => Arc::new(
            EtcdStore::connect(endpoints, EtcdOptions::default())
                .await
                .with_context(|| format!("failed to connect to {url}"))?,
        ),
    };
    let cfg = ControlConfig {
        heartbeat_interval: Duration::from_millis(args.heartbeat_interval_ms.max(10)),
        heartbeat_timeout: Duration::from_millis(args.heartbeat_timeout_ms.max(20)),
        progress_every_steps: args.progress_every_steps.max(1),
        stop_grace: Duration::from_secs(args.stop_grace_secs),
        adopt_grace: Duration::from_secs(args.adopt_grace_secs),
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("failed to listen on {}", args.listen))?;
    let local = listener.local_addr()?;
    // Scripts and tests read this line to learn the port when --listen ends in :0.
    println!("coordinator listening on {local}");
    let advertise = args
        .advertise
        .clone()
        .unwrap_or_else(|| format!("http://{local}"));
    tracing::info!(%local, store = %url, %advertise, "serving; campaigning for leadership");
    let role = Arc::new(std::sync::RwLock::new(Role::Standby { leader: None }));
    let (leader_tx, mut leader_rx) = tokio::sync::watch::channel(None::<String>);
    {
        // While standing by, answer with the current leader's address.
        let role = role.clone();
        tokio::spawn(async move {
            while leader_rx.changed().await.is_ok() {
                let leader = leader_rx.borrow_and_update().clone();
                let mut r = role.write().unwrap_or_else(|e| e.into_inner());
                if let Role::Standby { .. } = &*r {
                    *r = Role::Standby { leader };
                }
            }
        });
    }
    {
        let role = role.clone();
        let store_name = url.to_string();
        tokio::spawn(async move {
            let leadership = election::campaign(&store, &advertise, &leader_tx).await;
            // Every write of this leader is conditioned on its leader key.
            let fenced: Arc<dyn StateStore> = Arc::new(FencedStore::new(
                store.clone(),
                keys::leader(),
                leadership.version,
            ));
            match control::start(fenced, store_name, cfg).await {
                Ok(control) => {
                    *role.write().unwrap_or_else(|e| e.into_inner()) = Role::Leader(control);
                    tracing::info!("leading");
                }
                Err(e) => {
                    eprintln!("error: failed to load the cluster state: {e}");
                    std::process::exit(1);
                }
            }
            let why = election::hold(&store, leadership).await;
            // Another coordinator may lead now: stop rather than act on a
            // cluster we no longer own (our writes are fenced meanwhile).
            eprintln!("error: deposed as leader ({why}); exiting");
            std::process::exit(1);
        });
    }
    let services = Services { role };
    // Small replies must not wait for the client's delayed ACK (measured:
    // ~40 ms per Control call without TCP_NODELAY).
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_service(pb::control_server::ControlServer::new(services.clone()))
        .add_service(pb::agent_server::AgentServer::new(services))
        .serve_with_incoming_shutdown(incoming, shutdown_signal())
        .await
        .context("the gRPC server failed")?;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
}

/// How long client commands keep looking for a leader (one may be in the
/// middle of an election).
const FIND_LEADER: Duration = Duration::from_secs(15);

/// Connects to the leader among `urls` (comma-separated): a standby answers
/// with the leader's address, which is followed.
async fn client(urls: &str) -> anyhow::Result<ControlClient<Channel>> {
    let mut candidates: Vec<String> = urls.split(',').map(|u| u.trim().to_string()).collect();
    let deadline = tokio::time::Instant::now() + FIND_LEADER;
    let mut last_error = None;
    loop {
        let mut i = 0;
        while i < candidates.len() {
            let url = candidates[i].clone();
            i += 1;
            let mut c = match ControlClient::connect(url.clone()).await {
                Ok(c) => c,
                Err(e) => {
                    last_error = Some(
                        anyhow::Error::new(e)
                            .context(format!("failed to reach the coordinator at {url}")),
                    );
                    continue;
                }
            };
            match c.health(pb::HealthRequest {}).await {
                Ok(_) => return Ok(c),
                Err(status) => {
                    if let Some(leader) = status.message().strip_prefix(STANDBY_PREFIX)
                        && !candidates.iter().any(|u| u == leader)
                    {
                        candidates.push(leader.to_string());
                    }
                    last_error = Some(anyhow::anyhow!("{url}: {}", status.message()));
                }
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(last_error.unwrap_or_else(|| anyhow::anyhow!("no coordinator given")));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Parses and validates a job file, including its datasets, with every error
/// located as `file:line:col`.
pub fn load_job(path: &Path) -> anyhow::Result<JobSpec> {
    let src = std::fs::read_to_string(path)
        .with_context(|| format!("failed to read {}", path.display()))?;
    let (spec, spans) = JobSpec::from_toml_with_spans(&src, path).map_err(anyhow::Error::msg)?;
    let train = DatasetManifest::read(&spec.data.train)
        .map_err(|e| spans.error_at(SpanField::DataTrain, e.to_string()))
        .map_err(anyhow::Error::msg)?;
    if let Some(val) = &spec.data.validation {
        let v = DatasetManifest::read(val)
            .map_err(|e| spans.error_at(SpanField::DataValidation, e.to_string()))
            .map_err(anyhow::Error::msg)?;
        let (tf, vf) = (train.features(), v.features());
        if tf != vf {
            bail!(
                "{}",
                spans.error_at(
                    SpanField::DataValidation,
                    format!("data.validation has {vf} features per sample, data.train has {tf}"),
                )
            );
        }
        if v.schema.num_classes > train.schema.num_classes {
            bail!(
                "{}",
                spans.error_at(
                    SpanField::DataValidation,
                    format!(
                        "data.validation has {} classes, data.train only {}",
                        v.schema.num_classes, train.schema.num_classes
                    ),
                )
            );
        }
    }
    Ok(spec)
}

async fn submit(
    url: &str,
    output: Output,
    path: &Path,
    follow: bool,
    dry_run: bool,
    resume_from: Option<&Path>,
) -> anyhow::Result<i32> {
    let spec = load_job(path)?;
    let resume_from = match resume_from {
        Some(dir) => {
            let dir = std::path::absolute(dir)
                .with_context(|| format!("failed to resolve {}", dir.display()))?;
            ringmaster_common::checkpoint::verify_checkpoint(&dir).with_context(|| {
                format!("--resume-from {} is not a valid checkpoint", dir.display())
            })?;
            dir.display().to_string()
        }
        None => String::new(),
    };
    if dry_run {
        match output {
            Output::Json => println!("{}", serde_json::to_string_pretty(&spec)?),
            Output::Text => println!("{}: valid job `{}`", path.display(), spec.name),
        }
        return Ok(0);
    }
    let mut client = client(url).await?;
    let id = client
        .submit(pb::SubmitRequest {
            resume_from,
            ..pb::SubmitRequest::from(&spec)
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))
        .context("the coordinator refused the job")?
        .into_inner()
        .job_id;
    if !follow {
        match output {
            Output::Json => println!("{}", serde_json::json!({ "id": id })),
            Output::Text => println!("{id}"),
        }
        return Ok(0);
    }
    if output == Output::Text {
        println!("submitted {id}");
    }
    let last = follow_job(&mut client, &id, output == Output::Text).await?;
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&job_json(&last))?),
        Output::Text => print_summary(&last),
    }
    Ok(if last.state == "succeeded" { 0 } else { 1 })
}

/// Streams a job's status until it ends, drawing progress; returns the final status.
async fn follow_job(
    client: &mut ControlClient<Channel>,
    id: &str,
    show: bool,
) -> anyhow::Result<pb::JobStatus> {
    let mut stream = client
        .watch_job(pb::GetJobRequest { job_id: id.into() })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    let tty = std::io::stderr().is_terminal();
    let bar = ProgressBar::hidden();
    if show && tty {
        bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
    }
    let mut last: Option<pb::JobStatus> = None;
    let mut last_printed: Option<std::time::Instant> = None;
    while let Some(item) = stream
        .message()
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
    {
        if item.total_steps > 0 {
            bar.set_length(item.total_steps);
        }
        bar.set_position(item.step);
        let msg = progress_line(&item);
        bar.set_message(msg.clone());
        // Without a terminal (logs, CI), print a plain line every few seconds.
        let due = last_printed.is_none_or(|t| t.elapsed() >= Duration::from_secs(3));
        if show && !tty && item.step > 0 && due {
            eprintln!("step {}/{}  {}", item.step, item.total_steps, msg);
            last_printed = Some(std::time::Instant::now());
        }
        last = Some(item);
    }
    bar.finish_and_clear();
    last.ok_or_else(|| anyhow::anyhow!("the coordinator ended the watch without a status"))
}

fn progress_line(s: &pb::JobStatus) -> String {
    let mut parts = vec![s.state.clone()];
    for (key, label, digits) in [
        ("loss", "loss", 4),
        ("val_accuracy", "val_acc", 4),
        ("samples_per_sec", "samples/s", 0),
    ] {
        if let Some(v) = s.metrics.get(key) {
            parts.push(format!("{label} {v:.digits$}"));
        }
    }
    parts.join("  ")
}

fn print_summary(s: &pb::JobStatus) {
    println!(
        "job {} {} at step {}/{}",
        s.job_id, s.state, s.step, s.total_steps
    );
    if let Some(acc) = s.metrics.get("val_accuracy") {
        println!("validation accuracy: {acc:.4}");
    }
    if let Some(loss) = s.metrics.get("loss") {
        println!("training loss: {loss:.4}");
    }
    if s.state == "succeeded" {
        println!(
            "model: {}",
            Path::new(&s.output_dir).join("model.safetensors").display()
        );
        println!(
            "metrics: {}",
            Path::new(&s.output_dir).join("metrics.jsonl").display()
        );
    }
    if !s.reason.is_empty() {
        println!("reason: {}", s.reason);
    }
    for e in &s.events {
        println!("event: {e}");
    }
}

/// The JSON form of a job's status (`--output json`).
pub fn job_json(s: &pb::JobStatus) -> serde_json::Value {
    serde_json::json!({
        "id": s.job_id,
        "name": s.name,
        "state": s.state,
        "generation": s.generation,
        "step": s.step,
        "total_steps": s.total_steps,
        "metrics": s.metrics.iter().collect::<std::collections::BTreeMap<_, _>>(),
        "output_dir": s.output_dir,
        "reason": if s.reason.is_empty() { None } else { Some(&s.reason) },
        "members": s.members,
        "submitted_at_ms": s.submitted_at_ms,
        "updated_at_ms": s.updated_at_ms,
        "events": s.events,
    })
}

async fn status(url: &str, output: Output, id: &str) -> anyhow::Result<()> {
    let s = client(url)
        .await?
        .get_job(pb::GetJobRequest { job_id: id.into() })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&job_json(&s))?),
        Output::Text => {
            print_summary(&s);
            if !s.members.is_empty() {
                println!(
                    "workers: {} (generation {})",
                    s.members.join(", "),
                    s.generation
                );
            }
        }
    }
    Ok(())
}

/// `coordinator status` without a job: exit 0 when healthy, 1 when degraded.
async fn health(url: &str, output: Output) -> anyhow::Result<i32> {
    let h = client(url)
        .await?
        .health(pb::HealthRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    match output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "store": h.store,
                "state": if h.degraded.is_empty() { "healthy" } else { "degraded" },
                "degraded": if h.degraded.is_empty() { None } else { Some(&h.degraded) },
                "jobs": h.jobs,
                "running_jobs": h.running_jobs,
                "workers": h.workers,
                "version": h.version,
            }))?
        ),
        Output::Text => {
            if h.degraded.is_empty() {
                println!("coordinator {url}: healthy");
            } else {
                println!("coordinator {url}: DEGRADED: {}", h.degraded);
            }
            println!("store: {}", h.store);
            println!(
                "jobs: {} ({} running), workers: {}",
                h.jobs, h.running_jobs, h.workers
            );
        }
    }
    Ok(if h.degraded.is_empty() { 0 } else { 1 })
}

async fn list(url: &str, output: Output) -> anyhow::Result<()> {
    let jobs = client(url)
        .await?
        .list_jobs(pb::ListJobsRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner()
        .jobs;
    match output {
        Output::Json => {
            let all: Vec<_> = jobs.iter().map(job_json).collect();
            println!("{}", serde_json::to_string_pretty(&all)?);
        }
        Output::Text => {
            println!(
                "{:<28} {:<10} {:>12} {:>8}",
                "JOB", "STATE", "STEP", "VAL_ACC"
            );
            for j in jobs {
                let acc = j
                    .metrics
                    .get("val_accuracy")
                    .map(|a| format!("{a:.4}"))
                    .unwrap_or_else(|| "-".into());
                println!(
                    "{:<28} {:<10} {:>12} {:>8}",
                    j.job_id,
                    j.state,
                    format!("{}/{}", j.step, j.total_steps),
                    acc
                );
            }
        }
    }
    Ok(())
}

async fn cancel(url: &str, output: Output, id: &str, now: bool) -> anyhow::Result<()> {
    let s = client(url)
        .await?
        .cancel_job(pb::CancelJobRequest {
            job_id: id.into(),
            now,
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&job_json(&s))?),
        Output::Text => match s.events.last() {
            Some(e) if s.state == "running" => println!("{} {}: {e}", s.job_id, s.state),
            _ => println!("{} {}", s.job_id, s.state),
        },
    }
    Ok(())
}

async fn resume(url: &str, output: Output, id: &str, follow: bool) -> anyhow::Result<i32> {
    let mut client = client(url).await?;
    let s = client
        .resume_job(pb::GetJobRequest { job_id: id.into() })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    if !follow {
        match output {
            Output::Json => println!("{}", serde_json::to_string_pretty(&job_json(&s))?),
            Output::Text => println!("{} {}", s.job_id, s.state),
        }
        return Ok(0);
    }
    let last = follow_job(&mut client, id, output == Output::Text).await?;
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&job_json(&last))?),
        Output::Text => print_summary(&last),
    }
    Ok(if last.state == "succeeded" { 0 } else { 1 })
}

async fn checkpoint_now(url: &str, output: Output, id: &str) -> anyhow::Result<()> {
    let s = client(url)
        .await?
        .request_checkpoint(pb::GetJobRequest { job_id: id.into() })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&job_json(&s))?),
        Output::Text => println!("{}: checkpoint requested at step {}", s.job_id, s.step),
    }
    Ok(())
}

async fn checkpoints(url: &str, output: Output, id: &str) -> anyhow::Result<()> {
    let list = client(url)
        .await?
        .list_checkpoints(pb::GetJobRequest { job_id: id.into() })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner()
        .checkpoints;
    match output {
        Output::Json => {
            let all: Vec<_> = list
                .iter()
                .map(|c| {
                    serde_json::json!({
                        "step": c.step,
                        "dir": c.dir,
                        "bytes": c.bytes,
                        "committed": c.committed,
                        "metrics": c.metrics.iter().collect::<std::collections::BTreeMap<_, _>>(),
                        "created_at_ms": c.created_at_ms,
                    })
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&all)?);
        }
        Output::Text => {
            println!(
                "{:>10} {:>10} {:>12} {:>10}  DIR",
                "STEP", "COMMITTED", "BYTES", "VAL_ACC"
            );
            for c in list {
                let acc = c
                    .metrics
                    .get("val_accuracy")
                    .map(|a| format!("{a:.4}"))
                    .unwrap_or_else(|| "-".into());
                println!(
                    "{:>10} {:>10} {:>12} {:>10}  {}",
                    c.step,
                    if c.committed { "yes" } else { "no" },
                    c.bytes,
                    acc,
                    c.dir
                );
            }
        }
    }
    Ok(())
}

async fn workers(url: &str, output: Output) -> anyhow::Result<()> {
    let workers = client(url)
        .await?
        .list_workers(pb::ListWorkersRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner()
        .workers;
    match output {
        Output::Json => {
            let all: Vec<_> = workers
                .iter()
                .map(|w| {
                    serde_json::json!({
                        "id": w.worker_id, "name": w.name, "host": w.host, "device": w.device,
                        "state": w.state,
                        "job": if w.job_id.is_empty() { None } else { Some(&w.job_id) },
                        "rank": if w.job_id.is_empty() { None } else { Some(w.rank) },
                        "last_heartbeat_ms_ago": w.last_heartbeat_ms_ago,
                        "data_addr": w.data_addr,
                    })
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&all)?);
        }
        Output::Text => {
            println!(
                "{:<6} {:<16} {:<8} {:<6} {:<20} {:>6}",
                "ID", "NAME", "DEVICE", "STATE", "JOB/RANK", "BEAT"
            );
            for w in workers {
                let job = if w.job_id.is_empty() {
                    "-".to_string()
                } else {
                    format!("{}/{}", w.job_id, w.rank)
                };
                println!(
                    "{:<6} {:<16} {:<8} {:<6} {:<20} {:>5}s",
                    w.worker_id,
                    w.name,
                    w.device,
                    w.state,
                    job,
                    w.last_heartbeat_ms_ago / 1000
                );
            }
        }
    }
    Ok(())
}

fn dataset_cmd(cmd: DatasetCommand, output: Output) -> anyhow::Result<()> {
    match cmd {
        DatasetCommand::Pack(a) => {
            let input = match (&a.csv, &a.npy_features, &a.npy_labels) {
                (Some(csv), _, _) => dataset::PackInput::Csv {
                    path: csv.clone(),
                    label_column: parse_label_column(&a.label_column),
                    has_header: a.header,
                },
                (None, Some(f), Some(l)) => dataset::PackInput::Npy {
                    features: f.clone(),
                    labels: l.clone(),
                },
                _ => bail!("give --csv FILE or both --npy-features and --npy-labels"),
            };
            let name = a.name.clone().unwrap_or_else(|| {
                a.out_dir
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "dataset".into())
            });
            let opts = dataset::PackOptions {
                input,
                output: a.out_dir.clone(),
                name,
                val_fraction: a.val_fraction,
                standardize: a.standardize,
                shard_samples: a.shard_samples,
                seed: a.seed,
                show_progress: output == Output::Text && std::io::stderr().is_terminal(),
            };
            let report = dataset::pack(&opts).context("failed to pack the dataset")?;
            match output {
                Output::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "train_dir": report.train_dir,
                        "val_dir": report.val_dir,
                        "train_samples": report.train_samples,
                        "val_samples": report.val_samples,
                        "features": report.features,
                        "num_classes": report.num_classes,
                    }))?
                ),
                Output::Text => println!(
                    "packed {} train and {} validation samples ({} features, {} classes) into {}",
                    report.train_samples,
                    report.val_samples,
                    report.features,
                    report.num_classes,
                    a.out_dir.display()
                ),
            }
        }
        DatasetCommand::Synth(a) => {
            let manifest = dataset::synthesize(&dataset::SynthOptions {
                output: a.out_dir.clone(),
                name: a
                    .out_dir
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "synthetic".into()),
                samples: a.samples,
                features: a.features,
                classes: a.classes,
                seed: a.seed,
                shard_samples: a.shard_samples,
            })?;
            match output {
                Output::Json => println!(
                    "{}",
                    serde_json::json!({"dir": a.out_dir, "samples": manifest.num_samples})
                ),
                Output::Text => println!(
                    "wrote {} synthetic samples ({} features, {} classes) to {}",
                    manifest.num_samples,
                    a.features,
                    a.classes,
                    a.out_dir.display()
                ),
            }
        }
    }
    Ok(())
}

fn parse_label_column(s: &str) -> dataset::LabelColumn {
    match s {
        "first" => dataset::LabelColumn::First,
        "last" => dataset::LabelColumn::Last,
        _ => match s.parse::<usize>() {
            Ok(i) => dataset::LabelColumn::Index(i),
            Err(_) => dataset::LabelColumn::Name(s.to_string()),
        },
    }
}
