//! `coordinator`: serves the cluster (`serve`) and is the command-line client
//! for researchers and admins (`submit`, `status`, `list`, `cancel`,
//! `workers`, `dataset`). Exit codes: 0 success, 1 failure, 2 bad usage.

#![forbid(unsafe_code)]

use clap::Parser;
use ringmaster_coordinator::cli::{self, Cli};

fn main() {
    let args = Cli::parse();
    ringmaster_common::telemetry::init(if args.command.is_serve() {
        "info"
    } else {
        "warn"
    });
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: failed to start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = runtime.block_on(cli::run(args));
    std::process::exit(code);
}
