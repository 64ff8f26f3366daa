//! Architecture invariant: the coordinator never links libtorch. Walks the
//! resolved dependency graph (`cargo metadata`) from `ringmaster-coordinator`
//! along normal (non-dev, non-build) edges and fails if `tch` or `torch-sys`
//! is reachable, so a stray dependency is caught when it is added rather
//! than when a coordinator host without libtorch fails to start.

use std::collections::{BTreeSet, HashMap};
use std::process::Command;

#[test]
fn the_coordinator_does_not_depend_on_libtorch() {
    // Only this host's platform: other platforms' crates need not be
    // downloaded, and the binary built here is what must not link libtorch.
    let rustc = Command::new("rustc")
        .arg("-vV")
        .output()
        .expect("rustc runs");
    let host = String::from_utf8_lossy(&rustc.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_string))
        .expect("rustc -vV names the host");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--offline"])
        .args(["--filter-platform", &host])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: HashMap<&str, &str> = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["id"].as_str().unwrap(), p["name"].as_str().unwrap()))
        .collect();
    let nodes: HashMap<&str, &serde_json::Value> = meta["resolve"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["id"].as_str().unwrap(), n))
        .collect();
    let root = names
        .iter()
        .find(|(_, name)| **name == "ringmaster-coordinator")
        .map(|(id, _)| *id)
        .expect("the coordinator package");
    let mut seen = BTreeSet::new();
    let mut stack = vec![root];
    while let Some(id) = stack.pop() {
        if !seen.insert(id) {
            continue;
        }
        for dep in nodes[id]["deps"].as_array().unwrap() {
            let normal = dep["dep_kinds"]
                .as_array()
                .unwrap()
                .iter()
                .any(|k| k["kind"].is_null());
            if normal {
                stack.push(dep["pkg"].as_str().unwrap());
            }
        }
    }
    let reached: BTreeSet<&str> = seen.iter().map(|id| names[id]).collect();
    assert!(reached.contains("tonic"), "the walk found the real graph");
    for banned in ["tch", "torch-sys"] {
        assert!(
            !reached.contains(banned),
            "ringmaster-coordinator depends on {banned}"
        );
    }
}
