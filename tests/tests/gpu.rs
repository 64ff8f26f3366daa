//! The GPU path as far as a host without a GPU can take it, with the real `worker` binary: it
//! finds the torch wheel's `libnccl.so.2` (which cudarc would not find by itself), loads it by
//! re-executing with a private `libnccl.so` link, and reports NCCL's version; a wrong
//! `RINGMASTER_NCCL_LIB`, a missing device and `--devices all` without GPUs are each one clear
//! line and a non-zero exit. What needs a GPU is marked ignored with the reason, so the test
//! run lists it as not run (`scripts/gpu-check` runs the GPU checks on a GPU machine).

use ringmaster_tests::{bin, run_with_timeout};
use std::process::Command;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(60);

fn worker(args: &[&str], env: &[(&str, &str)]) -> ringmaster_tests::Output {
    let mut cmd = Command::new(bin("worker"));
    cmd.args(args)
        .env_remove("RINGMASTER_NCCL_LIB")
        .env_remove("RINGMASTER_NCCL_LINKED");
    for (k, v) in env {
        cmd.env(k, v);
    }
    run_with_timeout(cmd, LIMIT)
}

/// Whether libtorch sees a CUDA device here, and if not, what the worker says about `cuda:0`.
fn cuda_absent() -> Option<String> {
    let out = worker(&["--device", "cuda:0", "--nccl-info"], &[]);
    (out.code != 0).then(|| out.stderr.lines().next().unwrap_or_default().to_string())
}

#[test]
fn the_torch_wheels_nccl_is_found_and_loaded() {
    let out = worker(&["--nccl-info"], &[]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let line = out.stdout.trim();
    // The wheel's NCCL, as libtorch_cuda loaded it, under its versioned name only.
    assert!(line.starts_with("NCCL 2."), "{line}");
    assert!(
        line.contains("/nvidia/nccl/lib/libnccl.so.2 (already loaded)"),
        "{line}"
    );
}

#[test]
fn an_override_is_followed_through_the_reexec() {
    // A folder holding the library under a name cudarc would never try.
    let tmp = tempfile::tempdir().unwrap();
    let info = worker(&["--nccl-info"], &[]);
    let wheel = info
        .stdout
        .split(" from ")
        .nth(1)
        .and_then(|r| r.split(" (").next())
        .expect("the first line names the library")
        .to_string();
    let renamed = tmp.path().join("libnccl.so.2.99.0");
    std::os::unix::fs::symlink(&wheel, &renamed).unwrap();
    let dir = tmp.path().to_str().unwrap();
    let out = worker(&["--nccl-info"], &[("RINGMASTER_NCCL_LIB", dir)]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(
        out.stdout.trim(),
        format!(
            "NCCL {} from {} (RINGMASTER_NCCL_LIB)",
            info.stdout.split(' ').nth(1).unwrap(),
            renamed.display()
        )
    );
}

#[test]
fn a_wrong_override_is_one_line_naming_it() {
    let out = worker(
        &["--nccl-info"],
        &[("RINGMASTER_NCCL_LIB", "/nonexistent/nccl")],
    );
    assert_eq!(out.code, 1);
    assert_eq!(
        out.stderr.trim(),
        "worker: error: RINGMASTER_NCCL_LIB=/nonexistent/nccl: no such file or folder"
    );
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_str().unwrap();
    let out = worker(&["--nccl-info"], &[("RINGMASTER_NCCL_LIB", dir)]);
    assert_eq!(out.code, 1);
    assert_eq!(
        out.stderr.trim(),
        format!(
            "worker: error: RINGMASTER_NCCL_LIB={dir}: the folder holds none of libnccl.so, \
             libnccl.so.2, libnccl.so.2.*"
        )
    );
}

#[test]
fn missing_devices_are_refused_at_start() {
    let Some(reason) = cuda_absent() else {
        println!("SKIPPED: this host has a CUDA device; the refusals below need one without");
        return;
    };
    assert_eq!(
        reason,
        "error: invalid value 'cuda:3' for '--device <DEVICE>': device `cuda:3` is not \
         available: this machine has 0 CUDA devices"
            .replace("cuda:3", "cuda:0")
    );
    let out = worker(&["--device", "cuda:3"], &[]);
    assert_eq!(out.code, 2, "bad usage: {}", out.stderr);
    assert!(
        out.stderr
            .contains("device `cuda:3` is not available: this machine has 0 CUDA devices"),
        "{}",
        out.stderr
    );
    let out = worker(&["--devices", "all"], &[]);
    assert_eq!(out.code, 1);
    assert_eq!(
        out.stderr.trim(),
        "worker: error: --devices all: no CUDA device is visible (libtorch sees 0; check \
         nvidia-smi and CUDA_VISIBLE_DEVICES)"
    );
    let out = worker(&["--device", "cpu", "--bench-nccl"], &[]);
    assert_eq!(out.code, 1);
    assert_eq!(
        out.stderr.trim(),
        "worker: error: --bench-nccl needs --device cuda:N"
    );
}

#[test]
#[ignore = "needs a CUDA device: `cargo test --test gpu -- --ignored` on a GPU host, or scripts/gpu-check"]
fn nccl_all_reduces_on_a_gpu() {
    if let Some(reason) = cuda_absent() {
        panic!("no CUDA device on this host: {reason}");
    }
    let out = worker(&["--device", "cuda:0", "--bench-nccl"], &[]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let sizes: Vec<&str> = out
        .stdout
        .lines()
        .filter_map(|l| l.strip_prefix("RESULT nccl_allreduce bytes "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    assert_eq!(
        sizes,
        [
            "1048576",
            "4194304",
            "16777216",
            "67108864",
            "268435456",
            "1073741824"
        ]
    );
}
