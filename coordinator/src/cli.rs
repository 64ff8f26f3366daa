//! The command line: argument definitions (clap derive; the doc comments are
//! the help) and what each command does. Client commands talk to a running
//! coordinator over the `Control` service; `serve` runs one.

use crate::control::{self, ControlConfig, CordonAction};
use crate::election;
use crate::server::{Role, STANDBY_PREFIX, Services};
use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use ringmaster_common::jobspec::{JobSpec, ModelSpec, SpanField, TaskSpec};
use ringmaster_common::records::JobState;
use ringmaster_common::worker::WorkerState;
use ringmaster_dataset::{self as dataset, DatasetManifest};
use ringmaster_proto::pb::{self, control_client::ControlClient};
use ringmaster_store::fenced::FencedStore;
use ringmaster_store::keys;
use ringmaster_store::{
    EmbeddedStore, EtcdOptions, EtcdStore, StateStore, StoreUrl, parse_store_url,
};
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
    /// Where client commands find the coordinator and how they print; also
    /// accepted after the subcommand.
    #[command(flatten)]
    pub client: ClientOpts,
    #[command(subcommand)]
    pub command: Command,
}

/// The default coordinator URL of client commands.
pub const DEFAULT_URL: &str = "http://127.0.0.1:50051";
/// The environment variable client commands read the coordinator URL from.
pub const URL_ENV: &str = "RINGMASTER_COORDINATOR";

/// Options of the commands that talk to a running coordinator.
#[derive(Args, Debug, Default, Clone)]
pub struct ClientOpts {
    /// Coordinator URL [env: RINGMASTER_COORDINATOR; default: http://127.0.0.1:50051];
    /// several (comma-separated) for a leader and its standbys: the leader is found.
    #[arg(long, value_name = "URL")]
    pub coordinator: Option<String>,
    /// Output format: text or json.
    #[arg(long, value_enum)]
    pub output: Option<Output>,
    /// With several URLs (or while a leader is being elected), how long to
    /// keep looking for the leader, in seconds.
    #[arg(long, value_name = "SECS")]
    pub leader_wait_secs: Option<u64>,
}

impl ClientOpts {
    /// These options where given, else `outer`'s: a flag after the
    /// subcommand wins over one before it.
    pub fn or(self, outer: &ClientOpts) -> ClientOpts {
        ClientOpts {
            coordinator: self.coordinator.or_else(|| outer.coordinator.clone()),
            output: self.output.or(outer.output),
            leader_wait_secs: self.leader_wait_secs.or(outer.leader_wait_secs),
        }
    }

    /// The coordinator URL(s): the flag, else `$RINGMASTER_COORDINATOR`,
    /// else the default.
    pub fn url(&self) -> String {
        self.coordinator
            .clone()
            .or_else(|| std::env::var(URL_ENV).ok().filter(|u| !u.trim().is_empty()))
            .unwrap_or_else(|| DEFAULT_URL.to_string())
    }

    pub fn output(&self) -> Output {
        self.output.unwrap_or(Output::Text)
    }

    fn leader_wait(&self) -> Duration {
        Duration::from_secs(self.leader_wait_secs.unwrap_or(15))
    }
}

/// The output format of a dataset command (it talks to no coordinator).
#[derive(Args, Debug, Default, Clone)]
pub struct OutputOpt {
    /// Output format: text or json.
    #[arg(long, value_enum, global = true)]
    pub output: Option<Output>,
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
    /// Each job writes into its own folder, `<output.dir>/<job-id>/`, and
    /// `<output.dir>/latest` points at the newest one.
    ///
    /// Examples:
    ///   coordinator submit examples/digits-mlp.toml --follow
    ///   coordinator submit job.toml --dry-run
    #[command(verbatim_doc_comment)]
    Submit {
        /// The job file (job.toml).
        job: PathBuf,
        /// Show progress until the job ends; exit 0 only if it succeeded.
        /// Ctrl-C stops following, not the job.
        #[arg(long)]
        follow: bool,
        /// Validate (job file and datasets) and print the job, submit nothing.
        #[arg(long)]
        dry_run: bool,
        /// Start from this checkpoint directory (`<dir>/<job>/step-<N>`) instead
        /// of a fresh initialisation: a fork. The worker count may differ.
        #[arg(long)]
        resume_from: Option<PathBuf>,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Show one job, or without JOB the coordinator itself (store, degraded
    /// or healthy, job and worker counts).
    ///
    /// Examples:
    ///   coordinator status digits-mlp-1 --output json
    ///   coordinator status digits-mlp-1 --follow
    ///   coordinator status
    #[command(verbatim_doc_comment)]
    Status {
        /// The job's id, as `submit` printed it (e.g. digits-mlp-1).
        job: Option<String>,
        /// Follow the job until it ends (exit 0 only if it succeeded).
        #[arg(long, requires = "job")]
        follow: bool,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// List all jobs.
    ///
    /// Example:
    ///   coordinator list --output json
    #[command(verbatim_doc_comment)]
    List {
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Cancel a queued or running job. A running job first takes a final
    /// checkpoint at its next step boundary (unless --now), so it can be resumed.
    ///
    /// Examples:
    ///   coordinator cancel digits-mlp-1
    ///   coordinator cancel digits-mlp-1 --now
    #[command(verbatim_doc_comment)]
    Cancel {
        /// The job's id, as `submit` printed it (e.g. digits-mlp-1).
        job: String,
        /// Stop at once, without a final checkpoint.
        #[arg(long)]
        now: bool,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Continue a failed or cancelled job from its latest committed checkpoint
    /// (falling back to an older one if the newest does not verify).
    ///
    /// Example:
    ///   coordinator resume digits-mlp-1 --follow
    #[command(verbatim_doc_comment)]
    Resume {
        /// The job's id, as `submit` printed it (e.g. digits-mlp-1).
        job: String,
        /// Show progress until the job ends; exit 0 only if it succeeded.
        #[arg(long)]
        follow: bool,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Ask a running job for a checkpoint at its next step boundary.
    ///
    /// Example:
    ///   coordinator checkpoint digits-mlp-1
    #[command(verbatim_doc_comment)]
    Checkpoint {
        /// The job's id, as `submit` printed it (e.g. digits-mlp-1).
        job: String,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// List a job's checkpoints: step, metrics, size, committed.
    ///
    /// Example:
    ///   coordinator checkpoints digits-mlp-1 --output json
    #[command(verbatim_doc_comment)]
    Checkpoints {
        /// The job's id, as `submit` printed it (e.g. digits-mlp-1).
        job: String,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// A job's incident timeline: each time its group broke or re-formed,
    /// how it was detected, who was evicted, the generation formed, the
    /// state transferred (bytes, seconds), the first step after it, and the
    /// time from the incident to that step.
    ///
    /// Example:
    ///   coordinator events digits-mlp-1 --output json
    #[command(verbatim_doc_comment)]
    Events {
        /// The job's id, as `submit` printed it (e.g. digits-mlp-1).
        job: String,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// List connected workers.
    ///
    /// Example:
    ///   coordinator workers
    #[command(verbatim_doc_comment)]
    Workers {
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Take a worker out of service: it leaves its job at a step boundary
    /// once the job can re-form without it (or, failing that, move through
    /// a checkpoint to other free workers), then takes no new work. No
    /// trained step is lost. `uncordon` brings it back.
    ///
    /// Example:
    ///   coordinator drain gpu-node-3 --reason "disk replacement"
    #[command(verbatim_doc_comment)]
    Drain(CordonArgs),
    /// Stop placing new work on a worker; the work it holds continues.
    ///
    /// Example:
    ///   coordinator cordon w4
    #[command(verbatim_doc_comment)]
    Cordon(CordonArgs),
    /// Let a cordoned, drained or quarantined worker take work again.
    ///
    /// Example:
    ///   coordinator uncordon gpu-node-3
    #[command(verbatim_doc_comment)]
    Uncordon(CordonArgs),
    /// Prepare datasets in Ringmaster's shard format.
    Dataset {
        #[command(flatten)]
        output: OutputOpt,
        #[command(subcommand)]
        command: DatasetCommand,
    },
    /// Score a trained model on a dataset, outside any job.
    ///
    /// The model is a job's output folder or one of its checkpoints (the job wrote its spec,
    /// job.json, beside both); the dataset any folder packed for the same task and features.
    /// Runs the `worker` binary (next to this one, or RINGMASTER_WORKER), which links libtorch.
    ///
    /// Examples:
    ///   coordinator evaluate --model run/out/digits-cnn/latest --data run/data/digits/val
    ///   coordinator evaluate --model run/out/digits-mlp/checkpoints/digits-mlp-1/step-900 \
    ///       --data run/data/digits/val --output json
    #[command(verbatim_doc_comment)]
    Evaluate(EvaluateArgs),
}

#[derive(Args, Debug)]
pub struct EvaluateArgs {
    /// A job's output folder (<output.dir>/<job-id>, or its `latest` link) or a checkpoint
    /// (<checkpoint.dir>/<job-id>/step-N).
    #[arg(long)]
    pub model: PathBuf,
    /// The dataset to score (a folder with MANIFEST.json).
    #[arg(long)]
    pub data: PathBuf,
    /// Device to score on: `cpu` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// libtorch threads.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    #[command(flatten)]
    pub output: OutputOpt,
}

impl Command {
    /// Whether this command runs the server (which logs at `info`).
    pub fn is_serve(&self) -> bool {
        matches!(self, Command::Serve(_))
    }
}

/// The worker a cordon command acts on.
#[derive(Args, Debug)]
pub struct CordonArgs {
    /// The worker's id (w3) or name, as `coordinator workers` lists it.
    pub worker: String,
    /// Why, as `coordinator workers` shows it.
    #[arg(long)]
    pub reason: Option<String>,
    #[command(flatten)]
    pub client: ClientOpts,
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
    /// Milliseconds a member whose session broke (while this coordinator
    /// stayed up) has to reconnect and take its rank back before it is
    /// taken as lost; 0 takes it as lost at once.
    #[arg(long, default_value_t = 1500)]
    pub reconnect_grace_ms: u64,
}

#[derive(Subcommand, Debug)]
pub enum DatasetCommand {
    /// Pack CSV (optionally gzip-compressed), NPY data, images, text or a time series into
    /// train/validation shards.
    ///
    /// Examples:
    ///   coordinator dataset pack --csv digits.csv.gz --out-dir data/digits --standardize
    ///   coordinator dataset pack --npy-features x.npy --npy-labels y.npy --out-dir data/mine
    ///   coordinator dataset pack --task regression --csv diabetes_data_raw.csv.gz \
    ///       --delimiter space --labels-csv diabetes_target.csv.gz --out-dir data/diabetes --standardize
    ///   coordinator dataset pack --task regression --csv houses.csv --label-column price,rent \
    ///       --out-dir data/houses
    ///   coordinator dataset pack --text book.txt --context 64 --val-fraction 0.1 --out-dir data/book
    ///   coordinator dataset pack --text book.txt --context 64 --bpe-vocab 4096 --out-dir data/book-bpe
    ///   coordinator dataset pack --images x.npy --npy-labels y.npy --out-dir data/images
    #[command(verbatim_doc_comment)]
    Pack(Box<PackArgs>),
    /// Generate a synthetic classification or regression dataset (for benchmarks and tests).
    ///
    /// Examples:
    ///   coordinator dataset synth --out-dir data/synthetic --samples 20000 --features 784 --classes 10
    ///   coordinator dataset synth --out-dir data/synth-reg --samples 2000 --features 8 --targets 2
    #[command(verbatim_doc_comment)]
    Synth(SynthArgs),
}

#[derive(Args, Debug)]
pub struct PackArgs {
    /// What the labels are: `classification` (one integer label column) or `regression`
    /// (one or more float target columns, stored as f32 targets).
    #[arg(long, value_enum, default_value_t = PackTaskArg::Classification)]
    pub task: PackTaskArg,
    /// CSV input (`.gz` is detected); one row per sample.
    #[arg(long, conflicts_with_all = ["npy_features", "npy_labels"], required_unless_present_any = ["npy_features", "timeseries", "text", "images"])]
    pub csv: Option<PathBuf>,
    /// Images for a `cnn`: an NPY array of uint8 or float (float64 is stored as f32), shaped
    /// `[n, C, H, W]`, `[n, H, W]` (one channel) or, with `--channels-last`, `[n, H, W, C]`;
    /// labels from `--npy-labels`. Pixels are stored in their own type (u8: one byte per
    /// value); per-channel normalization fitted on the training split is recorded in the
    /// manifest and applied when the shards are read (`--no-normalize`: none).
    #[arg(long, value_name = "NPY", requires = "npy_labels", conflicts_with_all = ["csv", "npy_features", "text", "timeseries", "labels_csv", "label_column", "standardize", "missing"])]
    pub images: Option<PathBuf>,
    /// `--images` is `[n, H, W, C]` (as PIL, TensorFlow and most image files lay pixels out):
    /// transposed to `[C, H, W]` at pack time.
    #[arg(long)]
    pub channels_last: bool,
    /// Record no normalization for `--images`: the cnn sees the stored values as they are (u8
    /// pixels as 0..255).
    #[arg(long)]
    pub no_normalize: bool,
    /// Normalize `--images` with the statistics recorded in this image dataset's manifest
    /// instead of fitting them: for a set packed on its own (a held-out test set) that must be
    /// read as the training set was.
    #[arg(long, value_name = "DIR", conflicts_with = "no_normalize")]
    pub normalization_from: Option<PathBuf>,
    /// A time series: `--column` of this CSV (with a header; `.gz` is detected), read in file
    /// order and cut into samples of `--window` values predicting the next `--horizon` (f32
    /// regression targets). The split is chronological: the last `--val-fraction` of the
    /// series is the validation period, and no training target falls in it.
    #[arg(long, value_name = "CSV", conflicts_with_all = ["csv", "npy_features", "npy_labels", "labels_csv", "label_column"], requires_all = ["column", "window"])]
    pub timeseries: Option<PathBuf>,
    /// Text files for a language model, concatenated in order into one stream of byte-level
    /// tokens (vocabulary 256; BPE ids with `--bpe-vocab`) cut into consecutive chunks of
    /// `--context` + 1 tokens: each sample's features are its first `--context` tokens, its
    /// labels the next token at every position. The split is chronological (the last
    /// `--val-fraction` of the text is validation, no sample spans it); the pack prints the
    /// unigram baseline perplexity and its bits per byte.
    #[arg(long, value_name = "FILE", num_args = 1.., conflicts_with_all = ["csv", "npy_features", "npy_labels", "labels_csv", "label_column", "timeseries", "standardize"], requires = "context")]
    pub text: Vec<PathBuf>,
    /// Tokens per sample for `--text`: the model's context length.
    #[arg(long, value_name = "T")]
    pub context: Option<usize>,
    /// Byte-level BPE for `--text`: a vocabulary of at most N tokens (256 to 1048576, the 256
    /// byte symbols included) trained with HuggingFace's `tokenizers` on the training text
    /// only, written as `tokenizer.json` in train/ and val/. The text must be UTF-8.
    #[arg(long, value_name = "N", requires = "text", value_parser = clap::value_parser!(u32).range(i64::from(dataset::MIN_BPE_VOCAB)..=i64::from(dataset::MAX_BPE_VOCAB)))]
    pub bpe_vocab: Option<u32>,
    /// The series' column (its header name) for `--timeseries`.
    #[arg(long, requires = "timeseries", value_name = "NAME")]
    pub column: Option<String>,
    /// Values per sample (the inputs) for `--timeseries`.
    #[arg(long, requires = "timeseries", value_name = "N")]
    pub window: Option<usize>,
    /// Values forecast per sample (the targets) for `--timeseries`.
    #[arg(long, requires = "timeseries", value_name = "H")]
    pub horizon: Option<usize>,
    /// Missing values (empty, NA, NaN, null): `error` (the default: refuse, naming the first),
    /// `drop` (drop the row, or leave the point out of a `--timeseries`), `mean` or `median`
    /// (fill features with the training split's column mean or median; a time series from its
    /// training period). Rows with a missing label are dropped unless this is `error`. The
    /// counts are reported.
    #[arg(long, value_parser = parse_missing)]
    pub missing: Option<dataset::Missing>,
    /// Drop rows that repeat an earlier row exactly (features and label) before the split, so
    /// no sample lands in both train and validation; the count is reported.
    #[arg(long, conflicts_with = "timeseries")]
    pub dedup: bool,
    /// Label column of the CSV: `first`, `last`, a 0-based index or a header name (default
    /// `last`). With `--task regression`, a comma-separated list names several target columns
    /// (`--label-column 8,9`).
    #[arg(long, conflicts_with = "labels_csv")]
    pub label_column: Option<String>,
    /// The labels (or regression targets) in a CSV of their own, one row per sample in the
    /// order of `--csv`, every column a label; every column of `--csv` is then a feature.
    /// For scikit-learn's diabetes data, whose target is in `diabetes_target.csv.gz`.
    #[arg(long, requires = "csv", value_name = "FILE")]
    pub labels_csv: Option<PathBuf>,
    /// Field separator of the CSV: `comma`, `space`, `tab`, or any single ASCII character.
    #[arg(long, default_value = "comma", value_parser = parse_delimiter)]
    pub delimiter: u8,
    /// Whether the CSV has a header row (default: detected).
    #[arg(long)]
    pub header: Option<bool>,
    /// Lines to skip at the top of the CSV, before the header if there is one.
    ///
    /// For files that open with something other than the table, such as scikit-learn's
    /// breast_cancer.csv and wine_data.csv, whose first line holds counts and class names:
    /// `--skip-rows 1`. Lines in error messages still count from the top of the file.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub skip_rows: usize,
    /// NPY features, 2-D float32/float64.
    #[arg(long, requires = "npy_labels")]
    pub npy_features: Option<PathBuf>,
    /// NPY labels, 1-D integers (with `--task regression`: 1-D or 2-D floats), for
    /// `--npy-features` or `--images`.
    #[arg(long)]
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
    /// Not with `--images`, whose per-channel normalization replaces it.
    #[arg(long)]
    pub standardize: bool,
    /// Samples per shard file (default: about 32 MiB of samples per shard).
    ///
    /// Streaming workers hold a shuffle window of shards at a time (`data.shuffle_window_shards`,
    /// 8 by default, within `data.cache_bytes`, 512 MiB by default): shards much larger than
    /// the default need a larger cache or a smaller window.
    #[arg(long)]
    pub shard_samples: Option<usize>,
    /// Seed of the train/validation split.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl PackArgs {
    /// `--name`, else the output folder's name, else `fallback`.
    fn dataset_name(&self, fallback: &str) -> String {
        self.name.clone().unwrap_or_else(|| {
            self.out_dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| fallback.into())
        })
    }
}

#[derive(Args, Debug)]
pub struct SynthArgs {
    /// The dataset directory to write.
    #[arg(long)]
    pub out_dir: PathBuf,
    /// Number of samples to generate.
    #[arg(long, default_value_t = 10000)]
    pub samples: usize,
    /// Features per sample (1 to 1048576).
    #[arg(long, default_value_t = 784)]
    pub features: usize,
    /// Number of classes (2 to 1048576).
    ///
    /// Labels are drawn uniformly; each class's samples are a unit-variance Gaussian blob around
    /// a random mean of its own, so a small model learns them well but not perfectly.
    #[arg(long, default_value_t = 10)]
    pub classes: u32,
    /// Make a regression dataset with this many f32 targets per sample instead of classes.
    ///
    /// Features are standard normal; each target is a random linear plus tanh function of
    /// them with N(0, 0.1²) noise, so an MLP fits it well but not perfectly.
    #[arg(long, conflicts_with = "classes")]
    pub targets: Option<usize>,
    /// Seed of the class means, labels and noise: the same seed and sizes give the same data.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Samples per shard file (default: about 32 MiB of samples per shard).
    ///
    /// Streaming workers hold a shuffle window of shards at a time (`data.shuffle_window_shards`,
    /// 8 by default, within `data.cache_bytes`, 512 MiB by default): shards much larger than
    /// the default need a larger cache or a smaller window.
    #[arg(long)]
    pub shard_samples: Option<usize>,
}

/// Runs a parsed command line and returns the process exit code.
pub async fn run(cli: Cli) -> i32 {
    let top = cli.client;
    let result = match cli.command {
        Command::Serve(args) => serve(args).await.map(|()| 0),
        Command::Submit {
            job,
            follow,
            dry_run,
            resume_from,
            client,
        } => {
            submit(
                &client.or(&top),
                &job,
                follow,
                dry_run,
                resume_from.as_deref(),
            )
            .await
        }
        Command::Status {
            job: Some(job),
            follow,
            client,
        } => status(&client.or(&top), &job, follow).await,
        Command::Status {
            job: None, client, ..
        } => health(&client.or(&top)).await,
        Command::List { client } => list(&client.or(&top)).await.map(|()| 0),
        Command::Cancel { job, now, client } => {
            cancel(&client.or(&top), &job, now).await.map(|()| 0)
        }
        Command::Resume {
            job,
            follow,
            client,
        } => resume(&client.or(&top), &job, follow).await,
        Command::Checkpoint { job, client } => {
            checkpoint_now(&client.or(&top), &job).await.map(|()| 0)
        }
        Command::Checkpoints { job, client } => {
            checkpoints(&client.or(&top), &job).await.map(|()| 0)
        }
        Command::Workers { client } => workers(&client.or(&top)).await.map(|()| 0),
        Command::Events { job, client } => events(&client.or(&top), &job).await.map(|()| 0),
        Command::Drain(a) => cordon(&top, a, CordonAction::Drain).await.map(|()| 0),
        Command::Cordon(a) => cordon(&top, a, CordonAction::Cordon).await.map(|()| 0),
        Command::Uncordon(a) => cordon(&top, a, CordonAction::Uncordon).await.map(|()| 0),
        Command::Dataset { output, command } => {
            let output = output.output.or(top.output).unwrap_or(Output::Text);
            dataset_cmd(command, output).map(|()| 0)
        }
        Command::Evaluate(args) => {
            let output = args.output.output.or(top.output).unwrap_or(Output::Text);
            evaluate_cmd(&args, output).map(|()| 0)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.downcast_ref::<UsageError>().is_some() {
                2
            } else {
                1
            }
        }
    }
}

/// A mistake in how a command was called (exit code 2), found after clap's
/// own parsing, e.g. a coordinator URL that is not a URL.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(String);

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
        reconnect_grace: Duration::from_millis(args.reconnect_grace_ms),
        ..ControlConfig::default()
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
    let role = Arc::new(std::sync::RwLock::new(Role::Standby {
        leader: None,
        problem: None,
    }));
    let (leader_tx, mut leader_rx) = tokio::sync::watch::channel(None::<String>);
    let (problem_tx, mut problem_rx) = tokio::sync::watch::channel(None::<String>);
    {
        // While standing by, answer with the current leader's address and
        // what keeps this coordinator from leading.
        let role = role.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    changed = leader_rx.changed() => if changed.is_err() { break },
                    changed = problem_rx.changed() => if changed.is_err() { break },
                }
                let leader = leader_rx.borrow_and_update().clone();
                let problem = problem_rx.borrow_and_update().clone();
                let mut r = role.write().unwrap_or_else(|e| e.into_inner());
                if let Role::Standby { .. } = &*r {
                    *r = Role::Standby { leader, problem };
                }
            }
        });
    }
    {
        let role = role.clone();
        let store_name = url.to_string();
        tokio::spawn(async move {
            loop {
                let leadership =
                    election::campaign(&store, &advertise, &leader_tx, &problem_tx).await;
                // Every write of this leader is conditioned on its leader key,
                // and the cluster model is loaded afresh each time it leads.
                let fenced: Arc<dyn StateStore> = Arc::new(FencedStore::new(
                    store.clone(),
                    keys::leader(),
                    leadership.version,
                ));
                let control = match control::start(fenced, store_name.clone(), cfg).await {
                    Ok(control) => control,
                    Err(e) if e.retryable() => {
                        tracing::warn!("failed to load the cluster state: {e}; standing by");
                        let _ = store.revoke_lease(leadership.lease).await;
                        leader_tx.send_replace(None);
                        problem_tx
                            .send_replace(Some(format!("cannot load the cluster state: {e}")));
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                    Err(e) => {
                        eprintln!("error: failed to load the cluster state: {e}");
                        std::process::exit(1);
                    }
                };
                *role.write().unwrap_or_else(|e| e.into_inner()) = Role::Leader(control.clone());
                tracing::info!("leading");
                let why = tokio::select! {
                    why = election::hold(&store, leadership) => why,
                    () = control.deposed() => "a write was refused: another coordinator leads".to_string(),
                };
                // Stop acting before anyone else can: no more commands or
                // writes from this loop, and the workers' sessions close so
                // they look for the leader.
                tracing::warn!("stepping down as leader: {why}");
                leader_tx.send_replace(None);
                problem_tx.send_replace(Some(format!("stepped down as leader: {why}")));
                *role.write().unwrap_or_else(|e| e.into_inner()) = Role::Standby {
                    leader: None,
                    problem: Some(format!("stepped down as leader: {why}")),
                };
                control.shutdown().await;
                // Best effort: lets a standby take over without waiting for
                // the lease to run out, if the store still answers.
                let _ = tokio::time::timeout(
                    Duration::from_millis(500),
                    store.revoke_lease(leadership.lease),
                )
                .await;
            }
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

/// How long one connection attempt to one coordinator URL may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Checks the coordinator URL list before anything is dialled, so a typo is
/// a usage error at once rather than a wait.
fn parse_urls(urls: &str) -> Result<Vec<tonic::transport::Endpoint>, UsageError> {
    let list: Vec<&str> = urls
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect();
    if list.is_empty() {
        return Err(UsageError(
            "no coordinator URL given (--coordinator)".into(),
        ));
    }
    list.into_iter()
        .map(|u| {
            let bad = |why: &str| {
                UsageError(format!(
                    "invalid coordinator URL `{u}`: {why} (expected e.g. http://127.0.0.1:50051)"
                ))
            };
            let uri: tonic::codegen::http::Uri = u.parse().map_err(|e| bad(&format!("{e}")))?;
            match uri.scheme_str() {
                Some("http" | "https") => {}
                Some(other) => return Err(bad(&format!("unsupported scheme `{other}`"))),
                None => return Err(bad("no scheme")),
            }
            if uri.authority().is_none() {
                return Err(bad("no host"));
            }
            Ok(tonic::transport::Endpoint::from(uri).connect_timeout(CONNECT_TIMEOUT))
        })
        .collect()
}

/// Connects to the leader among the given URLs: a standby answers with the
/// leader's address, which is followed. With one URL that cannot be reached
/// at all this fails at once; otherwise (several URLs, or an election in
/// progress) it keeps looking for `--leader-wait-secs`, saying what it waits
/// for.
async fn client(opts: &ClientOpts) -> anyhow::Result<ControlClient<Channel>> {
    let urls = opts.url();
    let mut candidates = parse_urls(&urls)?;
    let single = candidates.len() == 1;
    let wait = opts.leader_wait();
    let deadline = tokio::time::Instant::now() + wait;
    let mut said_waiting = false;
    loop {
        let mut problems = Vec::new();
        let mut i = 0;
        while i < candidates.len() {
            let endpoint = candidates[i].clone();
            let url = endpoint.uri().to_string();
            i += 1;
            let mut c = match endpoint.connect().await {
                Ok(channel) => ControlClient::new(channel),
                Err(e) => {
                    let cause = connect_cause(&e);
                    if single {
                        bail!(
                            "failed to reach the coordinator at {urls}: {cause}; \
                             is `coordinator serve` running there?"
                        );
                    }
                    problems.push(format!("{url}: {cause}"));
                    continue;
                }
            };
            match c.health(pb::HealthRequest {}).await {
                Ok(h) if !h.get_ref().is_standby() => return Ok(c),
                Ok(h) => {
                    let h = h.into_inner();
                    if !h.leader.is_empty()
                        && !candidates.iter().any(|u| same_url(u, &h.leader))
                        && let Ok(more) = parse_urls(&h.leader)
                    {
                        candidates.extend(more);
                    }
                    problems.push(match (h.leader.is_empty(), h.degraded.is_empty()) {
                        (false, _) => format!("{url}: a standby; the leader is at {}", h.leader),
                        (true, true) => format!("{url}: a standby; no leader is elected yet"),
                        (true, false) => format!("{url}: a standby; {}", h.degraded),
                    });
                }
                Err(status) => {
                    if let Some(leader) = status.message().strip_prefix(STANDBY_PREFIX)
                        && !candidates.iter().any(|u| same_url(u, leader))
                        && let Ok(more) = parse_urls(leader)
                    {
                        candidates.extend(more);
                    }
                    problems.push(format!("{url}: {}", status.message()));
                }
            }
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "no leading coordinator found within {} s ({})",
                wait.as_secs(),
                problems.join("; ")
            );
        }
        if !said_waiting {
            eprintln!(
                "waiting up to {} s for a leading coordinator ({})",
                wait.as_secs(),
                problems.join("; ")
            );
            said_waiting = true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether `endpoint` is the coordinator at `url` (a parsed URI gains a
/// trailing `/`).
fn same_url(endpoint: &tonic::transport::Endpoint, url: &str) -> bool {
    endpoint.uri().to_string().trim_end_matches('/') == url.trim_end_matches('/')
}

/// The innermost cause of a failed connection (`connection refused`, ...),
/// rather than tonic's generic `transport error`.
fn connect_cause(e: &tonic::transport::Error) -> String {
    let mut cause: &dyn std::error::Error = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    let text = cause.to_string();
    if text.contains("elapsed") || text.contains("timed out") {
        format!("no answer within {} s", CONNECT_TIMEOUT.as_secs())
    } else {
        text
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
    if let ModelSpec::Torchscript { path, input_shape } = &spec.model {
        check_script_file(path, input_shape.as_deref(), train.features())
            .map_err(|e| anyhow::Error::msg(spans.error_at(SpanField::ModelHidden, e)))?;
    }
    if let (ModelSpec::Transformer(t), dataset::LabelKind::Tokens { len, .. }) =
        (&spec.model, train.labels())
        && t.context as usize != len
    {
        bail!(
            "{}",
            spans.error_at(
                SpanField::ModelHidden,
                format!(
                    "model.context is {} but the training set's samples hold {len} tokens (the \
                     --context it was packed with)",
                    t.context
                ),
            )
        );
    }
    if let ModelSpec::Cnn { input_shape, .. } = &spec.model {
        check_cnn_input(input_shape, &train)
            .map_err(|e| anyhow::Error::msg(spans.error_at(SpanField::ModelHidden, e)))?;
    }
    // The worker refuses this too; saying it at submit saves a queue wait.
    let fits = matches!(
        (&spec.task, train.labels()),
        (
            TaskSpec::Classification { .. },
            dataset::LabelKind::Classes(_)
        ) | (TaskSpec::Regression { .. }, dataset::LabelKind::Targets(_))
            | (TaskSpec::LanguageModel, dataset::LabelKind::Tokens { .. })
    );
    if !fits {
        bail!(
            "{}",
            spans.error_at(
                SpanField::DataTrain,
                format!(
                    "the dataset holds {}, which task.kind = \"{}\" cannot train on",
                    train.labels(),
                    spec.task.kind()
                ),
            )
        );
    }
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
        if v.image_normalization != train.image_normalization {
            bail!(
                "{}",
                spans.error_at(
                    SpanField::DataValidation,
                    format!(
                        "data.validation is normalized with other statistics than data.train \
                         ({:?} vs {:?}), so the model would see its images shifted: pack it \
                         with --normalization-from {}",
                        v.image_normalization,
                        train.image_normalization,
                        spec.data.train.display()
                    ),
                )
            );
        }
        if let (Some(vs), Some(ts)) = (v.image_shape(), train.image_shape())
            && vs != ts
        {
            bail!(
                "{}",
                spans.error_at(
                    SpanField::DataValidation,
                    format!(
                        "data.validation holds images of [C, H, W] = {vs:?}, data.train {ts:?}"
                    ),
                )
            );
        }
        match (v.labels(), train.labels()) {
            (dataset::LabelKind::Classes(vc), dataset::LabelKind::Classes(tc)) if vc > tc => {
                bail!(
                    "{}",
                    spans.error_at(
                        SpanField::DataValidation,
                        format!("data.validation has {vc} classes, data.train only {tc}"),
                    )
                );
            }
            (dataset::LabelKind::Classes(_), dataset::LabelKind::Classes(_)) => {}
            (vl, tl) if vl != tl => bail!(
                "{}",
                spans.error_at(
                    SpanField::DataValidation,
                    format!("data.validation holds {vl}, data.train {tl}"),
                )
            ),
            _ => {}
        }
    }
    Ok(spec)
}

/// A `cnn`'s `input_shape` against its training set: an image dataset's
/// `[C, H, W]` must be the same (a reshape of the right size but another
/// layout would train on scrambled pixels), flat features must at least hold
/// `C·H·W` values.
fn check_cnn_input(input_shape: &[u32; 3], train: &DatasetManifest) -> Result<(), String> {
    let want = input_shape.map(|v| v as usize);
    match train.image_shape() {
        Some(shape) if shape != want => Err(format!(
            "model.input_shape is {input_shape:?} but the training set holds images of [C, H, W] \
             = {shape:?} (as packed); set model.input_shape = {shape:?}"
        )),
        Some(_) => Ok(()),
        None => {
            let values: usize = want.iter().product();
            if values == train.features() {
                Ok(())
            } else {
                Err(format!(
                    "model.input_shape {input_shape:?} holds {values} values per sample, but \
                     data.train has {} features",
                    train.features()
                ))
            }
        }
    }
}

/// What can be checked of a TorchScript model without libtorch (the coordinator does not link
/// it): the file is there, readable, and a `torch.jit.save` archive (a zip), and its input
/// shape fits the dataset. The worker loads and probes it at start.
fn check_script_file(
    path: &Path,
    input_shape: Option<&[u32]>,
    features: usize,
) -> Result<(), String> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .map_err(|e| format!("model.path {}: {e}", path.display()))?;
    if magic != *b"PK\x03\x04" {
        return Err(format!(
            "model.path {} is not a TorchScript file (torch.jit.save writes a zip archive)",
            path.display()
        ));
    }
    if let Some(shape) = input_shape {
        let values: u64 = shape.iter().map(|&v| u64::from(v)).product();
        if values != features as u64 {
            return Err(format!(
                "model.input_shape {shape:?} holds {values} values, data.train has {features} \
                 features per sample"
            ));
        }
    }
    Ok(())
}

async fn submit(
    c: &ClientOpts,
    path: &Path,
    follow: bool,
    dry_run: bool,
    resume_from: Option<&Path>,
) -> anyhow::Result<i32> {
    let output = c.output();
    let spec = load_job(path)?;
    let resume_from = match resume_from {
        Some(dir) => {
            let dir = std::path::absolute(dir)
                .with_context(|| format!("failed to resolve {}", dir.display()))?;
            ringmaster_checkpoint::verify_checkpoint(&dir).with_context(|| {
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
    let mut client = client(c).await?;
    let id = client
        .submit(pb::SubmitRequest::new(&spec, resume_from))
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
    // Listening before saying "submitted": a Ctrl-C from then on stops the
    // follow with its message, never the process mid-way.
    let interrupt = interrupt_listener()?;
    if output == Output::Text {
        println!("submitted {id}");
    }
    follow_to_end(&mut client, &id, output, interrupt).await
}

/// Catches Ctrl-C (SIGINT) from now on, for a follow to end cleanly.
fn interrupt_listener() -> anyhow::Result<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("failed to listen for Ctrl-C")
}

/// Exit code of a follow that the user interrupted (128 + SIGINT).
const INTERRUPTED: i32 = 130;

/// Follows a job until it ends and prints its final status; the exit code
/// is 0 only if it succeeded. Ctrl-C stops following, not the job, and says
/// how to pick it up again.
async fn follow_to_end(
    client: &mut ControlClient<Channel>,
    id: &str,
    output: Output,
    interrupt: tokio::signal::unix::Signal,
) -> anyhow::Result<i32> {
    let Some(last) = follow_job(client, id, output == Output::Text, interrupt).await? else {
        eprintln!(
            "stopped following; job {id} goes on. Follow it again with \
             `coordinator status {id} --follow`, stop it with `coordinator cancel {id}`"
        );
        return Ok(INTERRUPTED);
    };
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&job_json(&last))?),
        Output::Text => print_summary(&last),
    }
    Ok(if state_of(&last) == Ok(JobState::Succeeded) {
        0
    } else {
        1
    })
}

/// Streams a job's status until it ends, drawing progress; returns the
/// final status, or `None` if the user pressed Ctrl-C.
async fn follow_job(
    client: &mut ControlClient<Channel>,
    id: &str,
    show: bool,
    mut interrupt: tokio::signal::unix::Signal,
) -> anyhow::Result<Option<pb::JobStatus>> {
    let mut stream = client
        .watch_job(pb::GetJobRequest::job(id))
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
    loop {
        let next = tokio::select! {
            next = stream.message() => next,
            _ = interrupt.recv() => {
                bar.finish_and_clear();
                return Ok(None);
            }
        };
        let Some(item) = next.map_err(|s| anyhow::anyhow!("{}", s.message()))? else {
            break;
        };
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
    last.map(Some)
        .ok_or_else(|| anyhow::anyhow!("the coordinator ended the watch without a status"))
}

/// A job status's state; a state this client does not know is an error.
fn state_of(s: &pb::JobStatus) -> Result<JobState, ringmaster_proto::WireError> {
    s.job_state()
}

/// The lowercase state name users and scripts read (`succeeded`, ...).
fn state_name(s: &pb::JobStatus) -> &'static str {
    state_of(s).map(JobState::as_str).unwrap_or("unknown")
}

/// The headline validation score of a job or checkpoint for tables:
/// accuracy for classification, R² for regression, perplexity for a language
/// model (`-` before the first evaluation).
fn val_score(metrics: &std::collections::HashMap<String, f64>) -> String {
    if let Some(a) = metrics.get("val_accuracy") {
        format!("acc {a:.4}")
    } else if let Some(r2) = metrics.get("val_r2") {
        format!("r2 {r2:.4}")
    } else if let Some(ppl) = metrics.get("val_perplexity") {
        format!("ppl {ppl:.3}")
    } else {
        "-".into()
    }
}

fn progress_line(s: &pb::JobStatus) -> String {
    let mut parts = vec![state_name(s).to_string()];
    if !s.waiting.is_empty() {
        parts.push(s.waiting.clone());
    }
    for (key, label, digits) in [
        ("loss", "loss", 4),
        ("val_accuracy", "val_acc", 4),
        ("val_mse", "val_mse", 4),
        ("val_r2", "val_r2", 4),
        ("val_perplexity", "val_ppl", 3),
        ("samples_per_sec", "samples/s", 0),
    ] {
        if let Some(v) = s.metrics.get(key) {
            parts.push(format!("{label} {v:.digits$}"));
        }
    }
    parts.join("  ")
}

fn print_summary(s: &pb::JobStatus) {
    let state = state_name(s);
    if state_of(s) == Ok(JobState::Queued) && s.step == 0 {
        println!("job {} queued", s.job_id);
    } else if s.total_steps == 0 {
        println!("job {} {state} at step {}", s.job_id, s.step);
    } else {
        println!(
            "job {} {} at step {}/{}",
            s.job_id, state, s.step, s.total_steps
        );
    }
    if !s.waiting.is_empty() {
        println!("waiting: {}", s.waiting);
    }
    if let Some(acc) = s.metrics.get("val_accuracy") {
        println!("validation accuracy: {acc:.4}");
    }
    for (key, label) in [
        ("val_mse", "validation MSE"),
        ("val_mae", "validation MAE"),
        ("val_r2", "validation R²"),
        ("val_perplexity", "validation perplexity"),
    ] {
        if let Some(v) = s.metrics.get(key) {
            println!("{label}: {v:.4}");
        }
    }
    if let Some(loss) = s.metrics.get("loss") {
        println!("training loss: {loss:.4}");
    }
    if state_of(s) == Ok(JobState::Succeeded) {
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
        "state": state_name(s),
        "generation": s.generation,
        "step": s.step,
        "total_steps": s.total_steps,
        "metrics": s.metrics.iter().collect::<std::collections::BTreeMap<_, _>>(),
        "output_dir": s.output_dir,
        "reason": if s.reason.is_empty() { None } else { Some(&s.reason) },
        "waiting": if s.waiting.is_empty() { None } else { Some(&s.waiting) },
        "members": s.members,
        "submitted_at_ms": s.submitted_at_ms,
        "updated_at_ms": s.updated_at_ms,
        "events": s.events,
        "restarts": s.restarts,
    })
}

async fn status(c: &ClientOpts, id: &str, follow: bool) -> anyhow::Result<i32> {
    let output = c.output();
    let mut client = client(c).await?;
    if follow {
        return follow_to_end(&mut client, id, output, interrupt_listener()?).await;
    }
    let s = client
        .get_job(pb::GetJobRequest::job(id))
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
    Ok(0)
}

/// `coordinator status` without a job: asks every given coordinator itself
/// (leader or standby) how it is. Exit 0 when one of them leads and can
/// write its store, 1 otherwise.
async fn health(c: &ClientOpts) -> anyhow::Result<i32> {
    let output = c.output();
    let endpoints = parse_urls(&c.url())?;
    let single = endpoints.len() == 1;
    let mut rows = Vec::new();
    let mut ok = false;
    for endpoint in endpoints {
        let url = endpoint.uri().to_string();
        let answer = match endpoint.connect().await {
            Ok(channel) => ControlClient::new(channel)
                .health(pb::HealthRequest {})
                .await
                .map(|r| r.into_inner())
                .map_err(|s| s.message().to_string()),
            Err(e) if single => bail!(
                "failed to reach the coordinator at {url}: {}; is `coordinator serve` running there?",
                connect_cause(&e)
            ),
            Err(e) => Err(connect_cause(&e)),
        };
        let row = match answer {
            Ok(h) => {
                let standby = h.is_standby();
                let healthy = !standby && h.degraded.is_empty();
                let state = match (standby, h.degraded.is_empty()) {
                    (false, true) => "healthy",
                    (_, false) => "degraded",
                    (true, true) => "standby",
                };
                ok |= healthy;
                serde_json::json!({
                    "url": url,
                    "role": if standby { "standby" } else { "leader" },
                    "state": state,
                    "degraded": if h.degraded.is_empty() { None } else { Some(&h.degraded) },
                    "leader": if h.leader.is_empty() { None } else { Some(&h.leader) },
                    "store": h.store,
                    "jobs": h.jobs,
                    "running_jobs": h.running_jobs,
                    "workers": h.workers,
                    "version": h.version,
                })
            }
            Err(why) => serde_json::json!({"url": url, "state": "unreachable", "error": why}),
        };
        rows.push(row);
    }
    match output {
        Output::Json if single => println!("{}", serde_json::to_string_pretty(&rows[0])?),
        Output::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
        Output::Text => {
            for r in &rows {
                let url = r["url"].as_str().unwrap_or_default();
                match (r["state"].as_str().unwrap_or_default(), r["role"].as_str()) {
                    ("unreachable", _) => {
                        println!(
                            "coordinator {url}: UNREACHABLE: {}",
                            r["error"].as_str().unwrap_or_default()
                        )
                    }
                    (_, Some("standby")) => {
                        let mut line = format!("coordinator {url}: standby");
                        if let Some(l) = r["leader"].as_str() {
                            line.push_str(&format!(", the leader is at {l}"));
                        }
                        if let Some(d) = r["degraded"].as_str() {
                            line.push_str(&format!("; DEGRADED: {d}"));
                        }
                        println!("{line}");
                    }
                    (state, _) => {
                        match r["degraded"].as_str() {
                            None => println!("coordinator {url}: leader, {state}"),
                            Some(d) => println!("coordinator {url}: leader, DEGRADED: {d}"),
                        }
                        println!("store: {}", r["store"].as_str().unwrap_or_default());
                        println!(
                            "jobs: {} ({} running), workers: {}",
                            r["jobs"], r["running_jobs"], r["workers"]
                        );
                    }
                }
            }
        }
    }
    Ok(if ok { 0 } else { 1 })
}

async fn list(c: &ClientOpts) -> anyhow::Result<()> {
    let output = c.output();
    let jobs = client(c)
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
                "{:<28} {:<10} {:>12} {:>11}",
                "JOB", "STATE", "STEP", "VAL_SCORE"
            );
            for j in jobs {
                let acc = val_score(&j.metrics);
                println!(
                    "{:<28} {:<10} {:>12} {:>11}",
                    j.job_id,
                    state_name(&j),
                    format!("{}/{}", j.step, j.total_steps),
                    acc
                );
            }
        }
    }
    Ok(())
}

async fn cancel(c: &ClientOpts, id: &str, now: bool) -> anyhow::Result<()> {
    let output = c.output();
    let s = client(c)
        .await?
        .cancel_job(pb::CancelJobRequest::new(id, now))
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&job_json(&s))?),
        Output::Text => match s.events.last() {
            Some(e) if state_of(&s) == Ok(JobState::Running) => {
                println!("{} {}: {e}", s.job_id, state_name(&s))
            }
            _ => println!("{} {}", s.job_id, state_name(&s)),
        },
    }
    Ok(())
}

async fn resume(c: &ClientOpts, id: &str, follow: bool) -> anyhow::Result<i32> {
    let output = c.output();
    let mut client = client(c).await?;
    let s = client
        .resume_job(pb::GetJobRequest::job(id))
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    if !follow {
        match output {
            Output::Json => println!("{}", serde_json::to_string_pretty(&job_json(&s))?),
            Output::Text => println!("{} {}", s.job_id, state_name(&s)),
        }
        return Ok(0);
    }
    follow_to_end(&mut client, id, output, interrupt_listener()?).await
}

async fn checkpoint_now(c: &ClientOpts, id: &str) -> anyhow::Result<()> {
    let output = c.output();
    let s = client(c)
        .await?
        .request_checkpoint(pb::GetJobRequest::job(id))
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&job_json(&s))?),
        Output::Text => println!("{}: checkpoint requested at step {}", s.job_id, s.step),
    }
    Ok(())
}

async fn checkpoints(c: &ClientOpts, id: &str) -> anyhow::Result<()> {
    let output = c.output();
    let list = client(c)
        .await?
        .list_checkpoints(pb::GetJobRequest::job(id))
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
                "{:>10} {:>10} {:>12} {:>11}  DIR",
                "STEP", "COMMITTED", "BYTES", "VAL_SCORE"
            );
            for c in list {
                let acc = val_score(&c.metrics);
                println!(
                    "{:>10} {:>10} {:>12} {:>11}  {}",
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

async fn cordon(top: &ClientOpts, a: CordonArgs, what: CordonAction) -> anyhow::Result<()> {
    let c = a.client.or(top);
    let req = pb::WorkerRequest {
        worker: a.worker,
        reason: a.reason.unwrap_or_default(),
    };
    let mut client = client(&c).await?;
    let w = match what {
        CordonAction::Drain => client.drain_worker(req).await,
        CordonAction::Cordon => client.cordon_worker(req).await,
        CordonAction::Uncordon => client.uncordon_worker(req).await,
    }
    .map_err(|s| anyhow::anyhow!("{}", s.message()))?
    .into_inner();
    match c.output() {
        Output::Json => println!("{}", serde_json::to_string_pretty(&worker_json(&w))?),
        Output::Text => {
            let name = format!("{} ({})", w.name, w.worker_id);
            match cordon_of(&w) {
                None => println!("{name} takes work again"),
                Some(("draining", reason, _)) => println!(
                    "{name} is draining ({reason}): it leaves {} at the next step boundary the \
                     job can re-form without it, then takes no work",
                    w.job_id
                ),
                Some((kind, reason, _)) => println!("{name} is {kind}: {reason}"),
            }
        }
    }
    Ok(())
}

async fn events(c: &ClientOpts, id: &str) -> anyhow::Result<()> {
    let status = client(c)
        .await?
        .get_job(pb::GetJobRequest::job(id))
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    match c.output() {
        Output::Json => {
            let all: Vec<_> = status.incidents.iter().map(incident_json).collect();
            println!("{}", serde_json::to_string_pretty(&all)?);
        }
        Output::Text if status.incidents.is_empty() => {
            println!(
                "{}: no incidents (generation {})",
                status.job_id, status.generation
            );
        }
        Output::Text => {
            for (n, i) in status.incidents.iter().enumerate() {
                print!("{}", incident_text(n + 1, i));
            }
        }
    }
    Ok(())
}

/// An epoch-milliseconds time as RFC 3339 UTC with milliseconds.
fn utc(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms);
    humantime::format_rfc3339_millis(t).to_string()
}

/// One incident as a block of timeline lines, each with its offset from
/// the detection.
fn incident_text(n: usize, i: &pb::Incident) -> String {
    let at = |ms: u64| {
        format!(
            "+{:>7.3} s",
            ms.saturating_sub(i.detected_at_ms) as f64 / 1e3
        )
    };
    let mut out = format!(
        "incident {n} ({}) at {}, generation {}\n",
        i.kind_name(),
        utc(i.detected_at_ms),
        i.from_generation
    );
    out += &format!("  {}  detected: {}\n", at(i.detected_at_ms), i.detected);
    for e in &i.evicted {
        out += &format!("             evicted: {e}\n");
    }
    if let (Some(g), Some(t)) = (i.generation, i.formed_at_ms) {
        let from = match (&i.state_source, i.state_step) {
            (Some(src), Some(step)) => format!(" (state of step {step} from {src})"),
            _ => String::new(),
        };
        out += &format!(
            "  {}  generation {g} formed: {}{from}\n",
            at(t),
            i.members.join(", ")
        );
    }
    if let (Some(b), Some(s)) = (i.transfer_bytes, i.transfer_seconds) {
        out += &format!("             state transferred: {} bytes in {s:.3} s\n", b);
    }
    if let Some(t) = i.first_step_at_ms {
        out += &format!("  {}  first step completed\n", at(t));
    }
    if let Some(o) = &i.outcome {
        out += &format!("             {o}\n");
    }
    if let Some(ms) = i.recovery_ms() {
        out += &format!("  incident to first step: {:.3} s\n", ms as f64 / 1e3);
    }
    out
}

fn incident_json(i: &pb::Incident) -> serde_json::Value {
    serde_json::json!({
        "kind": i.kind_name(),
        "detected": i.detected,
        "detected_at": utc(i.detected_at_ms),
        "detected_at_ms": i.detected_at_ms,
        "from_generation": i.from_generation,
        "evicted": i.evicted,
        "generation": i.generation,
        "formed_at_ms": i.formed_at_ms,
        "members": i.members,
        "state_source": i.state_source,
        "state_step": i.state_step,
        "transfer_bytes": i.transfer_bytes,
        "transfer_seconds": i.transfer_seconds,
        "first_step_at_ms": i.first_step_at_ms,
        "recovery_ms": i.recovery_ms(),
        "outcome": i.outcome,
    })
}

/// A worker's cordon as the CLI shows it: kind, reason and the seconds until
/// it lifts by itself.
fn cordon_of(w: &pb::WorkerInfo) -> Option<(&'static str, String, Option<u64>)> {
    match w.cordon_view() {
        Ok(None) => None,
        Ok(Some(c)) => Some((c.kind.as_str(), c.reason, c.remaining_secs)),
        Err(_) => Some(("unknown", w.cordon_reason.clone(), None)),
    }
}

fn worker_json(w: &pb::WorkerInfo) -> serde_json::Value {
    let cordon = cordon_of(w).map(|(kind, reason, remaining)| {
        serde_json::json!({ "kind": kind, "reason": reason, "remaining_secs": remaining })
    });
    serde_json::json!({
        "id": w.worker_id, "name": w.name, "host": w.host, "device": w.device,
        "state": worker_state_name(w),
        "job": if w.job_id.is_empty() { None } else { Some(&w.job_id) },
        "rank": if w.job_id.is_empty() { None } else { Some(w.rank) },
        "last_heartbeat_ms_ago": w.last_heartbeat_ms_ago,
        "data_addr": w.data_addr,
        "cordon": cordon,
    })
}

async fn workers(c: &ClientOpts) -> anyhow::Result<()> {
    let output = c.output();
    let workers = client(c)
        .await?
        .list_workers(pb::ListWorkersRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner()
        .workers;
    match output {
        Output::Json => {
            let all: Vec<_> = workers.iter().map(worker_json).collect();
            println!("{}", serde_json::to_string_pretty(&all)?);
        }
        Output::Text => {
            println!(
                "{:<6} {:<16} {:<8} {:<6} {:<20} {:>6}  SCHEDULING",
                "ID", "NAME", "DEVICE", "STATE", "JOB/RANK", "BEAT"
            );
            for w in workers {
                let job = if w.job_id.is_empty() {
                    "-".to_string()
                } else {
                    format!("{}/{}", w.job_id, w.rank)
                };
                let scheduling = match cordon_of(&w) {
                    None => "ok".to_string(),
                    Some((kind, reason, None)) => format!("{kind}: {reason}"),
                    Some((kind, reason, Some(secs))) => {
                        format!("{kind} for {secs} s more: {reason}")
                    }
                };
                println!(
                    "{:<6} {:<16} {:<8} {:<6} {:<20} {:>5}s  {}",
                    w.worker_id,
                    w.name,
                    w.device,
                    worker_state_name(&w),
                    job,
                    w.last_heartbeat_ms_ago / 1000,
                    scheduling
                );
            }
        }
    }
    Ok(())
}

/// The lowercase worker state users and scripts read (`idle`, `busy`); a
/// state this client does not know shows as `unknown`.
fn worker_state_name(w: &pb::WorkerInfo) -> &'static str {
    w.worker_state()
        .map(WorkerState::as_str)
        .unwrap_or("unknown")
}

/// The `worker` binary: `RINGMASTER_WORKER`, else the one next to this program, else `worker`
/// on the PATH.
fn worker_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("RINGMASTER_WORKER") {
        return PathBuf::from(p);
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("worker")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("worker"))
}

/// `coordinator evaluate`: runs `worker evaluate` and shows its scores.
fn evaluate_cmd(a: &EvaluateArgs, output: Output) -> anyhow::Result<()> {
    let worker = worker_binary();
    let out = std::process::Command::new(&worker)
        .args([
            "--device",
            &a.device,
            "--threads",
            &a.threads.to_string(),
            "evaluate",
        ])
        .arg("--model")
        .arg(&a.model)
        .arg("--data")
        .arg(&a.data)
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| {
            format!(
                "cannot run {} (the worker binary scores models; set RINGMASTER_WORKER to it)",
                worker.display()
            )
        })?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let line = err
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("worker: error: "))
            .or_else(|| err.lines().rev().find(|l| !l.trim().is_empty()))
            .unwrap_or("the worker failed without a message");
        bail!("{line}");
    }
    let scores: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("the worker's scores are not JSON")?;
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&scores)?),
        Output::Text => {
            let f = |k: &str| scores[k].as_f64();
            println!(
                "{} ({}) on {}: {} samples",
                a.model.display(),
                scores["job"].as_str().unwrap_or("?"),
                a.data.display(),
                scores["samples"]
            );
            let mut parts = Vec::new();
            for (key, label) in [
                ("accuracy", "accuracy"),
                ("macro_f1", "macro-F1"),
                ("r2", "R²"),
                ("mse", "MSE"),
                ("mae", "MAE"),
                ("perplexity", "perplexity"),
                ("loss", "loss"),
            ] {
                if let Some(v) = f(key) {
                    parts.push(format!("{label} {v:.4}"));
                }
            }
            println!("{}", parts.join(", "));
        }
    }
    Ok(())
}

fn parse_missing(s: &str) -> Result<dataset::Missing, String> {
    s.parse()
}

/// `dataset pack --timeseries`.
fn pack_series(a: &PackArgs, path: &Path, output: Output) -> anyhow::Result<()> {
    let (Some(column), Some(window)) = (&a.column, a.window) else {
        bail!("--timeseries needs --column NAME and --window N");
    };
    let report = dataset::pack_timeseries(&dataset::SeriesOptions {
        csv: path.to_path_buf(),
        column: column.clone(),
        window,
        horizon: a.horizon.unwrap_or(1),
        val_fraction: a.val_fraction,
        missing: a.missing.unwrap_or_default(),
        standardize: a.standardize,
        output: a.out_dir.clone(),
        name: a.dataset_name("series"),
    })
    .context("failed to pack the time series")?;
    match output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "train_dir": report.train_dir,
                "val_dir": report.val_dir,
                "values": report.values,
                "missing": report.missing,
                "train_samples": report.train_samples,
                "val_samples": report.val_samples,
                "features": window,
                "task": "regression",
                "targets": a.horizon.unwrap_or(1),
                "naive_val_mae": report.naive_val_mae,
            }))?
        ),
        Output::Text => {
            println!(
                "packed {} values ({} missing) into {} train and {} validation windows of {} \
                 predicting {} into {}",
                report.values,
                report.missing,
                report.train_samples,
                report.val_samples,
                window,
                a.horizon.unwrap_or(1),
                a.out_dir.display()
            );
            if let Some(mae) = report.naive_val_mae {
                println!(
                    "naive forecast (repeat the last value) on validation: MAE {mae:.4}; a \
                     model should beat it"
                );
            }
        }
    }
    Ok(())
}

/// `dataset pack --text`.
fn pack_text(a: &PackArgs, output: Output) -> anyhow::Result<()> {
    let Some(context) = a.context else {
        bail!("--text needs --context T");
    };
    let report = dataset::pack_text(&dataset::TextOptions {
        files: a.text.clone(),
        context,
        val_fraction: a.val_fraction,
        output: a.out_dir.clone(),
        name: a.dataset_name("text"),
        shard_samples: a.shard_samples,
        bpe_vocab: a.bpe_vocab,
    })
    .context("failed to pack the text")?;
    match output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "train_dir": report.train_dir,
                "val_dir": report.val_dir,
                "bytes": report.bytes,
                "split_byte": report.split_byte,
                "tokens": report.tokens,
                "train_tokens": report.train_tokens,
                "val_tokens": report.val_tokens,
                "train_samples": report.train_samples,
                "val_samples": report.val_samples,
                "context": context,
                "vocab": report.vocab,
                "tokenizer": report.tokenizer,
                "task": "language_model",
                "unigram_val_perplexity": report.unigram_val_perplexity,
                "unigram_val_bits_per_byte": report.unigram_val_bits_per_byte,
                "val_bytes_per_token": report.val_bytes_per_token,
            }))?
        ),
        Output::Text => {
            let tokens = match &report.tokenizer {
                None => "byte tokens".to_string(),
                Some(file) => format!("BPE tokens, {file}"),
            };
            println!(
                "packed {} bytes as {} tokens ({} training, {} validation; {tokens}, vocabulary \
                 {}) into {} train and {} validation samples of {} tokens into {}",
                report.bytes,
                report.tokens,
                report.train_tokens,
                report.val_tokens,
                report.vocab,
                report.train_samples,
                report.val_samples,
                context,
                a.out_dir.display()
            );
            if let (Some(ppl), Some(bpb), Some(per_token)) = (
                report.unigram_val_perplexity,
                report.unigram_val_bits_per_byte,
                report.val_bytes_per_token,
            ) {
                println!(
                    "unigram baseline (training token frequencies) on validation: perplexity \
                     {ppl:.3} per token, {bpb:.3} bits per byte; a model should beat it"
                );
                if report.tokenizer.is_some() {
                    println!(
                        "validation tokens hold {per_token:.3} bytes each: a model's perplexity \
                         P is log2(P) / {per_token:.3} bits per byte, comparable with byte-level \
                         models"
                    );
                }
            }
        }
    }
    Ok(())
}

/// `dataset pack --images`.
fn pack_images(a: &PackArgs, images: &Path, output: Output) -> anyhow::Result<()> {
    let Some(labels) = &a.npy_labels else {
        bail!("--images needs --npy-labels FILE");
    };
    let report = dataset::pack_images(&dataset::ImageOptions {
        images: images.to_path_buf(),
        labels: labels.clone(),
        channels_last: a.channels_last,
        normalize: !a.no_normalize,
        normalization_from: match &a.normalization_from {
            None => None,
            Some(dir) => {
                let m = DatasetManifest::read(dir)?;
                Some(m.image_normalization.clone().ok_or_else(|| {
                    anyhow::anyhow!(
                        "--normalization-from {}: that dataset records no image normalization",
                        dir.display()
                    )
                })?)
            }
        },
        task: match a.task {
            PackTaskArg::Classification => dataset::PackTask::Classification,
            PackTaskArg::Regression => dataset::PackTask::Regression,
        },
        output: a.out_dir.clone(),
        name: a.dataset_name("images"),
        val_fraction: a.val_fraction,
        shard_samples: a.shard_samples,
        seed: a.seed,
        dedup: a.dedup,
    })
    .context("failed to pack the images")?;
    let norm = report.normalization.as_ref();
    match output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "train_dir": report.train_dir,
                "val_dir": report.val_dir,
                "train_samples": report.train_samples,
                "val_samples": report.val_samples,
                "shape": report.shape,
                "dtype": report.dtype.to_string(),
                "features": report.shape.iter().product::<usize>(),
                "task": match report.labels {
                    dataset::LabelKind::Targets(_) => "regression",
                    _ => "classification",
                },
                "num_classes": match report.labels {
                    dataset::LabelKind::Classes(c) => Some(c),
                    _ => None,
                },
                "targets": match report.labels {
                    dataset::LabelKind::Targets(k) => Some(k),
                    _ => None,
                },
                "image_normalization": norm,
                "duplicates_removed": report.duplicates_removed,
            }))?
        ),
        Output::Text => {
            println!(
                "packed {} train and {} validation images of [C, H, W] = {:?} ({}, {}) into {}",
                report.train_samples,
                report.val_samples,
                report.shape,
                report.dtype,
                report.labels,
                a.out_dir.display()
            );
            match norm {
                Some(n) => println!(
                    "per-channel normalization (training split, values scaled by {}): mean {:?}, \
                     std {:?}; applied when the shards are read",
                    if report.dtype == dataset::ElementType::U8 {
                        "1/255"
                    } else {
                        "1"
                    },
                    n.mean,
                    n.std
                ),
                None => println!("no normalization: the model sees the stored values"),
            }
            if a.dedup {
                println!("{} duplicate images removed", report.duplicates_removed);
            }
        }
    }
    Ok(())
}

fn dataset_cmd(cmd: DatasetCommand, output: Output) -> anyhow::Result<()> {
    match cmd {
        // Checked here: clap's `requires` does not hold plain flags to it.
        DatasetCommand::Pack(a)
            if a.images.is_none()
                && (a.channels_last || a.no_normalize || a.normalization_from.is_some()) =>
        {
            bail!("--channels-last, --no-normalize and --normalization-from apply only to --images")
        }
        DatasetCommand::Pack(a) if !a.text.is_empty() => pack_text(&a, output)?,
        DatasetCommand::Pack(a) if a.images.is_some() => {
            let path = a.images.clone().unwrap_or_default();
            pack_images(&a, &path, output)?;
        }
        DatasetCommand::Pack(a) if a.timeseries.is_some() => {
            let path = a.timeseries.clone().unwrap_or_default();
            pack_series(&a, &path, output)?;
        }
        DatasetCommand::Pack(a) => {
            let input = match (&a.csv, &a.npy_features, &a.npy_labels) {
                (Some(csv), _, _) => dataset::PackInput::Csv {
                    path: csv.clone(),
                    label_column: parse_label_column(a.label_column.as_deref().unwrap_or("last")),
                    has_header: a.header,
                    skip_rows: a.skip_rows,
                    delimiter: a.delimiter,
                    labels: a.labels_csv.clone(),
                },
                (None, Some(f), Some(l)) => dataset::PackInput::Npy {
                    features: f.clone(),
                    labels: l.clone(),
                },
                _ => bail!(
                    "give --csv FILE, both --npy-features and --npy-labels, or --images with \
                     --npy-labels"
                ),
            };
            let name = a.dataset_name("dataset");
            let opts = dataset::PackOptions {
                input,
                task: match a.task {
                    PackTaskArg::Classification => dataset::PackTask::Classification,
                    PackTaskArg::Regression => dataset::PackTask::Regression,
                },
                output: a.out_dir.clone(),
                name,
                val_fraction: a.val_fraction,
                standardize: a.standardize,
                shard_samples: a.shard_samples,
                seed: a.seed,
                show_progress: output == Output::Text && std::io::stderr().is_terminal(),
                missing: a.missing.unwrap_or_default(),
                dedup: a.dedup,
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
                        "task": match report.labels {
                            dataset::LabelKind::Classes(_) => "classification",
                            dataset::LabelKind::Targets(_) => "regression",
                            dataset::LabelKind::Tokens { .. } => "language_model",
                        },
                        "num_classes": match report.labels {
                            dataset::LabelKind::Classes(c) => Some(c),
                            _ => None,
                        },
                        "targets": match report.labels {
                            dataset::LabelKind::Targets(k) => Some(k),
                            _ => None,
                        },
                        "missing_values": report.missing_values,
                        "rows_dropped": report.rows_dropped,
                        "duplicates_removed": report.duplicates_removed,
                    }))?
                ),
                Output::Text => {
                    println!(
                        "packed {} train and {} validation samples ({} features, {}) into {}",
                        report.train_samples,
                        report.val_samples,
                        report.features,
                        report.labels,
                        a.out_dir.display()
                    );
                    if report.missing_values > 0 || report.rows_dropped > 0 || a.dedup {
                        println!(
                            "cleaning: {} missing feature values ({}), {} rows dropped for \
                             missing values, {} duplicate rows removed",
                            report.missing_values,
                            match a.missing.unwrap_or_default() {
                                dataset::Missing::Mean => "filled with training means",
                                dataset::Missing::Median => "filled with training medians",
                                _ => "their rows dropped",
                            },
                            report.rows_dropped,
                            report.duplicates_removed
                        );
                    }
                }
            }
        }
        DatasetCommand::Synth(a) if a.targets.is_some() => {
            let k = a.targets.unwrap_or(1);
            let labels = dataset::LabelKind::Targets(k);
            let manifest = dataset::synthesize_regression(&dataset::SynthRegression {
                output: a.out_dir.clone(),
                name: a
                    .out_dir
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "synthetic".into()),
                samples: a.samples,
                features: a.features,
                targets: k,
                seed: a.seed,
                shard_samples: a
                    .shard_samples
                    .unwrap_or_else(|| dataset::default_shard_samples(a.features, labels)),
            })?;
            match output {
                Output::Json => println!(
                    "{}",
                    serde_json::json!({"dir": a.out_dir, "samples": manifest.num_samples})
                ),
                Output::Text => println!(
                    "wrote {} synthetic samples ({} features, {labels}) to {}",
                    manifest.num_samples,
                    a.features,
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
                shard_samples: a.shard_samples.unwrap_or_else(|| {
                    dataset::default_shard_samples(
                        a.features,
                        dataset::LabelKind::Classes(a.classes),
                    )
                }),
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

/// `dataset pack --task`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PackTaskArg {
    Classification,
    Regression,
}

/// `--delimiter`: a name or one ASCII character.
fn parse_delimiter(s: &str) -> Result<u8, String> {
    match s {
        "comma" | "," => Ok(b','),
        "space" | " " => Ok(b' '),
        "tab" | "\\t" | "\t" => Ok(b'\t'),
        _ if s.len() == 1 && s.is_ascii() && s != "\n" && s != "\r" && s != "\"" => {
            Ok(s.as_bytes()[0])
        }
        _ => Err(format!(
            "expected comma, space, tab or a single ASCII character, found {s:?}"
        )),
    }
}

fn parse_label_column(s: &str) -> dataset::LabelColumn {
    if s.contains(',') {
        return dataset::LabelColumn::Many(
            s.split(',').map(|c| parse_label_column(c.trim())).collect(),
        );
    }
    match s {
        "first" => dataset::LabelColumn::First,
        "last" => dataset::LabelColumn::Last,
        _ => match s.parse::<usize>() {
            Ok(i) => dataset::LabelColumn::Index(i),
            Err(_) => dataset::LabelColumn::Name(s.to_string()),
        },
    }
}
