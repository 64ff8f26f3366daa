//! `worker`: joins a coordinator, then trains whatever it is assigned until
//! the coordinator goes away. Exit codes: 0 after a clean shutdown, 1 on
//! failure, 2 on bad usage.

#![forbid(unsafe_code)]

use anyhow::Context;
use clap::Parser;
use ringmaster_worker::agent::{self, AgentConfig};
use ringmaster_worker::collective::nccl::library;
use std::time::Duration;

/// A Ringmaster worker: runs libtorch training steps and all-reduces
/// gradients directly with its peers.
///
/// Examples:
///   worker --coordinator http://10.0.0.1:50051 --threads 4
///   worker --device cuda:0 --name gpu0 --data-listen 0.0.0.0:7000 --data-advertise 10.0.0.2:7000
///   worker --devices all --name node3 --data-listen 0.0.0.0:7000   (one rank per GPU, ports 7000+i)
///   worker --nccl-info
#[derive(Parser, Debug)]
#[command(name = "worker", version, verbatim_doc_comment)]
struct Args {
    /// Coordinator URL; several (comma-separated) for a leader and its
    /// standbys: a standby points the worker at the leader.
    #[arg(
        long,
        env = "RINGMASTER_COORDINATOR",
        default_value = "http://127.0.0.1:50051"
    )]
    coordinator: String,
    /// Device to train on: `cpu` or `cuda:N`.
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    device: (String, tch::Device),
    /// `all`: start one worker process per visible GPU (`cuda:0`, `cuda:1`, ...), named
    /// `<name>-gpu<i>`, the data plane of GPU i on port `<port>+i` (of `--data-listen` and
    /// `--data-advertise`); stops them all when stopped.
    #[arg(long, value_parser = ["all"], conflicts_with_all = ["device", "nccl_info"])]
    devices: Option<String>,
    /// Find and load the NCCL library as a CUDA worker would, print what was loaded, and exit.
    #[arg(long)]
    nccl_info: bool,
    #[command(subcommand)]
    command: Option<WorkerCommand>,
    /// Time this worker's NCCL all-reduce (a communicator of one rank on `--device`) on
    /// buffers of 1 MiB to 1 GiB, print one `RESULT` line per size, and exit.
    #[arg(long)]
    bench_nccl: bool,
    /// libtorch intra-op threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Name shown in `coordinator workers`, unique among live workers
    /// (default: `<host>-<pid>`).
    #[arg(long)]
    name: Option<String>,
    /// Address the data plane (ring all-reduce) listens on.
    #[arg(long, default_value = "127.0.0.1:0")]
    data_listen: String,
    /// Address peers should dial for the data plane (default: the bound address).
    #[arg(long)]
    data_advertise: Option<String>,
    /// Seconds to keep trying to reach the coordinator at start.
    #[arg(long, default_value_t = 30)]
    connect_timeout_secs: u64,
}

#[derive(clap::Subcommand, Debug)]
enum WorkerCommand {
    /// Score a trained model on a dataset, outside any job, and print its scores as JSON (the
    /// format of eval.json). `coordinator evaluate` runs this.
    Evaluate {
        /// A job's output folder (<output.dir>/<job-id>) or one of its checkpoints
        /// (<checkpoint.dir>/<job-id>/step-N): its model.safetensors, and the job.json the
        /// job wrote beside it.
        #[arg(long)]
        model: std::path::PathBuf,
        /// A dataset folder (with MANIFEST.json) of the kind the model was trained on.
        #[arg(long)]
        data: std::path::PathBuf,
    },
}

/// `worker evaluate`: the scores as one JSON document on stdout.
fn evaluate(
    model: &std::path::Path,
    data: &std::path::Path,
    device: tch::Device,
) -> anyhow::Result<()> {
    use ringmaster_worker::trainer::{self, TrainError};
    // An invalid request reads as its message alone (its Display adds "invalid assignment").
    let plain = |e: TrainError| match e {
        TrainError::Invalid(m) => anyhow::anyhow!(m),
        other => anyhow::anyhow!(other),
    };
    let (spec, spec_path) = trainer::find_spec(model).map_err(plain)?;
    let scores = trainer::score(&spec, model, data, device).map_err(plain)?;
    let mut json = scores.to_json();
    if let Some(obj) = json.as_object_mut() {
        // The step is the job's, not this run's.
        obj.remove("step");
        obj.insert("model".into(), model.display().to_string().into());
        obj.insert("data".into(), data.display().to_string().into());
        obj.insert("job".into(), spec.name.clone().into());
        obj.insert("spec".into(), spec_path.display().to_string().into());
    }
    println!("{}", serde_json::to_string_pretty(&json)?);
    Ok(())
}

fn parse_device(s: &str) -> Result<(String, tch::Device), String> {
    let device = match s {
        "cpu" => tch::Device::Cpu,
        "cuda" => tch::Device::Cuda(0),
        _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => tch::Device::Cuda(n),
            _ => return Err(format!("unknown device `{s}`, expected `cpu` or `cuda:N`")),
        },
    };
    if let tch::Device::Cuda(n) = device
        && n >= tch::Cuda::device_count() as usize
    {
        return Err(format!(
            "device `{s}` is not available: this machine has {} CUDA devices",
            tch::Cuda::device_count()
        ));
    }
    Ok((s.to_string(), device))
}

fn main() {
    let args = Args::parse();
    ringmaster_common::telemetry::init("info");
    if let Some(WorkerCommand::Evaluate { model, data }) = &args.command {
        tch::set_num_threads(args.threads.max(1) as i32);
        if let Err(e) = evaluate(model, data, args.device.1) {
            fail(&format!("{e:#}"));
        }
        return;
    }
    if args.nccl_info {
        match library::load_or_reexec() {
            Ok(loaded) => {
                println!("{loaded}");
                return;
            }
            Err(e) => fail(&e),
        }
    }
    if args.bench_nccl {
        let tch::Device::Cuda(ordinal) = args.device.1 else {
            fail(&"--bench-nccl needs --device cuda:N");
        };
        if let Err(e) = library::load_or_reexec() {
            fail(&e);
        }
        if let Err(e) = bench_nccl(ordinal) {
            fail(&format!("{e:#}"));
        }
        return;
    }
    if args.devices.is_some() {
        let code = per_gpu::run(&args).unwrap_or_else(|e| fail(&e));
        std::process::exit(code);
    }
    if matches!(args.device.1, tch::Device::Cuda(_)) {
        // Every CUDA job reduces through NCCL unless it asks for the ring: a worker that could
        // not load it would fail each job it took, so it refuses to start instead.
        match library::load_or_reexec() {
            Ok(loaded) => tracing::info!("{loaded}"),
            Err(e) => fail(&e),
        }
    }
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| format!("{}-{}", agent::hostname(), std::process::id()));
    let cfg = AgentConfig {
        coordinator: args.coordinator.clone(),
        name,
        device_label: args.device.0.clone(),
        device: args.device.1,
        threads: args.threads,
        data_listen: args.data_listen.clone(),
        data_advertise: args.data_advertise.clone(),
        connect_timeout: Duration::from_secs(args.connect_timeout_secs),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("failed to start the async runtime");
    let result = runtime.and_then(|rt| rt.block_on(agent::run(cfg)));
    if let Err(e) = result {
        fail(&format!("{e:#}"));
    }
}

/// `--bench-nccl`: the median of 20 timed all-reduces per size after 5 untimed ones, through
/// the same backend a job uses (its wait for completion included).
fn bench_nccl(ordinal: usize) -> anyhow::Result<()> {
    use ringmaster_worker::collective::{
        Collective, DataPlaneListener, NcclBackend, NcclOptions, RingConfig, WireDtype,
    };
    let listener = DataPlaneListener::bind("127.0.0.1:0")?;
    let cfg = RingConfig::new("bench-nccl", 1, 0, vec![listener.local_addr().to_string()]);
    let opts = NcclOptions {
        device: ordinal as i32,
        timeout: Duration::from_secs(120),
        wire: WireDtype::F32,
    };
    let mut nccl = NcclBackend::connect(&listener, cfg, opts)?;
    for mib in [1usize, 4, 16, 64, 256, 1024] {
        let elems = mib * 1024 * 1024 / 4;
        let mut buf = tch::Tensor::f_ones(
            [elems as i64],
            (tch::Kind::Float, tch::Device::Cuda(ordinal)),
        )?;
        let mut times = Vec::new();
        for i in 0..25 {
            let t = std::time::Instant::now();
            nccl.all_reduce_sum(&mut buf)?;
            if i >= 5 {
                times.push(t.elapsed().as_secs_f64());
            }
        }
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        println!(
            "RESULT nccl_allreduce bytes {} median_s {median:.6} gb_per_s {:.2}",
            elems * 4,
            (elems * 4) as f64 / median / 1e9
        );
    }
    Ok(())
}

/// Prints the one-line error and exits 1.
fn fail(e: &dyn std::fmt::Display) -> ! {
    eprintln!("worker: error: {e}");
    std::process::exit(1);
}

/// `--devices all`: one child worker per visible GPU.
mod per_gpu {
    use super::Args;
    use anyhow::{Context, bail};

    /// `host:port` with the port moved up by `i` (a port of 0 stays 0: the system picks).
    pub(super) fn offset_port(addr: &str, i: usize) -> anyhow::Result<String> {
        let (host, port) = addr
            .rsplit_once(':')
            .with_context(|| format!("`{addr}` is not host:port"))?;
        let port: u16 = port
            .parse()
            .with_context(|| format!("`{addr}` has no valid port"))?;
        if port == 0 {
            return Ok(addr.to_string());
        }
        let moved = usize::from(port) + i;
        let moved = u16::try_from(moved)
            .with_context(|| format!("port {port} + {i} for GPU {i} is beyond 65535"))?;
        Ok(format!("{host}:{moved}"))
    }

    /// Starts the children and waits for them; returns the exit code for this process.
    pub(super) fn run(args: &Args) -> anyhow::Result<i32> {
        let count = tch::Cuda::device_count();
        if count <= 0 {
            bail!(
                "--devices all: no CUDA device is visible (libtorch sees {count}; check \
                 nvidia-smi and CUDA_VISIBLE_DEVICES)"
            );
        }
        let exe = std::env::current_exe().context("cannot find this program")?;
        let base = args.name.clone().unwrap_or_else(|| {
            format!(
                "{}-{}",
                ringmaster_worker::agent::hostname(),
                std::process::id()
            )
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("failed to start the async runtime")?;
        rt.block_on(async {
            let mut children = Vec::new();
            for i in 0..count as usize {
                let mut cmd = tokio::process::Command::new(&exe);
                cmd.arg("--coordinator")
                    .arg(&args.coordinator)
                    .arg("--device")
                    .arg(format!("cuda:{i}"))
                    .arg("--threads")
                    .arg(args.threads.to_string())
                    .arg("--name")
                    .arg(format!("{base}-gpu{i}"))
                    .arg("--data-listen")
                    .arg(offset_port(&args.data_listen, i)?)
                    .arg("--connect-timeout-secs")
                    .arg(args.connect_timeout_secs.to_string())
                    .kill_on_drop(true);
                if let Some(adv) = &args.data_advertise {
                    cmd.arg("--data-advertise").arg(offset_port(adv, i)?);
                }
                children.push(
                    cmd.spawn()
                        .with_context(|| format!("starting the worker for GPU {i}"))?,
                );
            }
            tracing::info!(workers = children.len(), "one worker per GPU started");
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .context("installing the SIGTERM handler")?;
            let waits = futures_wait_all(&mut children);
            tokio::select! {
                code = waits => Ok(code),
                _ = tokio::signal::ctrl_c() => Ok(stop_all(&mut children).await),
                _ = term.recv() => Ok(stop_all(&mut children).await),
            }
        })
    }

    /// Waits for every child; the code is the first non-zero exit (1 for a signal), else 0.
    async fn futures_wait_all(children: &mut [tokio::process::Child]) -> i32 {
        let mut code = 0;
        for c in children.iter_mut() {
            let status = c.wait().await;
            let this = status.map_or(1, |s| s.code().unwrap_or(1));
            if code == 0 {
                code = this;
            }
        }
        code
    }

    /// Passes the stop on to the children (SIGTERM) and waits for them.
    async fn stop_all(children: &mut [tokio::process::Child]) -> i32 {
        for c in children.iter() {
            if let Some(pid) = c.id() {
                let _ = std::process::Command::new("kill")
                    .arg("-TERM")
                    .arg(pid.to_string())
                    .status();
            }
        }
        futures_wait_all(children).await;
        0
    }

    #[cfg(test)]
    mod tests {
        use super::offset_port;

        #[test]
        fn each_gpu_gets_the_next_port() {
            assert_eq!(offset_port("0.0.0.0:7000", 0).unwrap(), "0.0.0.0:7000");
            assert_eq!(offset_port("0.0.0.0:7000", 3).unwrap(), "0.0.0.0:7003");
            assert_eq!(offset_port("127.0.0.1:0", 3).unwrap(), "127.0.0.1:0");
            assert_eq!(offset_port("[::1]:7000", 1).unwrap(), "[::1]:7001");
            let e = offset_port("h:65535", 1).unwrap_err().to_string();
            assert_eq!(e, "port 65535 + 1 for GPU 1 is beyond 65535");
            assert!(offset_port("nohost", 1).is_err());
        }
    }
}
