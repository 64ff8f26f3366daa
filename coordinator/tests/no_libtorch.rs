//! Architecture invariants on dependency lines: the coordinator never links
//! libtorch, and the worker never links the store backends (etcd, redb) or
//! the dataset packers (CSV, NPY, progress bars, BPE training). Walks the resolved
//! dependency graph (`cargo tree`) from each binary's package along normal
//! (non-dev, non-build) edges, on this host's platform only, so a stray dependency is caught when it
//! is added rather than when a coordinator host without libtorch fails to
//! start or a worker grows an etcd client it never uses.

use std::collections::BTreeSet;
use std::process::Command;

/// Names of every package `package` reaches along normal dependency edges
/// when built on its own (`cargo tree` resolves the features that package
/// asks for; a workspace-wide build unifies features across packages, which
/// is why `scripts/package` builds each binary by itself).
fn reachable(package: &str) -> BTreeSet<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "tree",
            "--offline",
            "--locked",
            "-e",
            "normal",
            "--prefix",
            "none",
        ])
        .args(["-p", package])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

#[test]
fn the_coordinator_does_not_depend_on_libtorch() {
    let reached = reachable("ringmaster-coordinator");
    assert!(reached.contains("tonic"), "the walk found the real graph");
    for banned in ["tch", "torch-sys"] {
        assert!(
            !reached.contains(banned),
            "ringmaster-coordinator depends on {banned}"
        );
    }
}

#[test]
fn the_worker_does_not_depend_on_the_store_backends_or_the_packers() {
    let reached = reachable("ringmaster-worker");
    assert!(reached.contains("tch"), "the walk found the real graph");
    assert!(reached.contains("ringmaster-dataset"));
    for banned in [
        "ringmaster-store",
        "etcd-client",
        "redb",
        "csv",
        "npyz",
        "indicatif",
        "tokenizers",
    ] {
        assert!(
            !reached.contains(banned),
            "ringmaster-worker depends on {banned}"
        );
    }
}
