//! `worker`: joins a coordinator, then trains whatever it is assigned until
//! the coordinator goes away. Exit codes: 0 after a clean shutdown, 1 on
//! failure, 2 on bad usage.

#![forbid(unsafe_code)]

use anyhow::Context;
use clap::Parser;
use ringmaster_worker::agent::{self, AgentConfig};
use std::time::Duration;

/// A Ringmaster worker: runs libtorch training steps and all-reduces
/// gradients directly with its peers.
///
/// Examples:
///   worker --coordinator http://10.0.0.1:50051 --threads 4
///   worker --device cuda:0 --name gpu0 --data-listen 0.0.0.0:7000 --data-advertise 10.0.0.2:7000
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
        eprintln!("worker: error: {e:#}");
        std::process::exit(1);
    }
}
