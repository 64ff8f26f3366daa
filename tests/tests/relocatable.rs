//! The worker binary does not depend on the checkout that built it: its
//! RUNPATH holds `$ORIGIN`-relative entries only (`worker/build.rs`), so a copy
//! runs where a `libtorch` link to a torch install sits next to it (the layout
//! `scripts/package` makes) or where `LD_LIBRARY_PATH` names one, and fails
//! with a loader error naming libtorch anywhere else.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ringmaster_tests::{Output, bin, repo_root, run_with_timeout};

const T: Duration = Duration::from_secs(60);

/// The torch package the bootstrap installed (`.libtorch` resolved): its
/// `lib/` holds libtorch, and `../nvidia/` the CUDA libraries it needs.
fn torch_dir() -> PathBuf {
    let link = repo_root().join(".libtorch");
    std::fs::canonicalize(&link).unwrap_or_else(|e| {
        panic!(
            "{} does not resolve ({e}): run scripts/bootstrap",
            link.display()
        )
    })
}

/// Copies the worker into `<tmp>/a/b/c/bin/`: deep enough that the entries
/// meant for the checkout (`$ORIGIN/../../.libtorch/lib` and, in debug
/// builds, one more `..`) point inside the temporary directory, where
/// nothing is.
fn copy_worker(tmp: &Path) -> PathBuf {
    let dir = tmp.join("a/b/c/bin");
    std::fs::create_dir_all(&dir).unwrap();
    let copy = dir.join("worker");
    std::fs::copy(bin("worker"), &copy).unwrap();
    copy
}

fn version(worker: &Path, ld_library_path: Option<&Path>) -> Output {
    let mut cmd = Command::new(worker);
    cmd.arg("--version").env_remove("LD_LIBRARY_PATH");
    if let Some(dir) = ld_library_path {
        cmd.env("LD_LIBRARY_PATH", dir);
    }
    run_with_timeout(cmd, T)
}

#[track_caller]
fn assert_runs(out: &Output) {
    assert_eq!(out.code, 0, "stderr: {}", out.stderr);
    assert!(out.stdout.starts_with("worker "), "stdout: {}", out.stdout);
}

#[test]
fn a_copied_worker_runs_only_with_libtorch_next_to_it_or_on_the_library_path() {
    let tmp = tempfile::tempdir().unwrap();
    let worker = copy_worker(tmp.path());

    // Nothing next to it: the loader must not find libtorch anywhere, which
    // an absolute RUNPATH entry back into the checkout would allow.
    let out = version(&worker, None);
    assert_ne!(out.code, 0, "a copy without libtorch ran: {}", out.stdout);
    assert!(
        out.stderr
            .contains("error while loading shared libraries: libtorch"),
        "expected a loader error naming libtorch, got: {}",
        out.stderr
    );

    // Pointed at the torch install through the library path.
    assert_runs(&version(&worker, Some(&torch_dir().join("lib"))));

    // A `libtorch` link next to it, as `scripts/package` lays out: libtorch's
    // own `$ORIGIN/../../nvidia/...` entries must resolve through the link.
    std::os::unix::fs::symlink(torch_dir(), worker.with_file_name("libtorch")).unwrap();
    assert_runs(&version(&worker, None));
}

#[test]
fn worker_runpath_is_origin_relative_and_links_libtorch_cuda() {
    let out = run_with_timeout(
        {
            let mut cmd = Command::new("readelf");
            cmd.args(["--dynamic", "--wide"]).arg(bin("worker"));
            cmd
        },
        T,
    );
    assert_eq!(out.code, 0, "readelf (binutils) failed: {}", out.stderr);
    // Lines read `0x... (RUNPATH)  Library runpath: [a:b]`.
    let tag = |name: &str| -> Vec<String> {
        out.stdout
            .lines()
            .filter(|l| l.contains(&format!("({name})")))
            .filter_map(|l| Some(l.split_once('[')?.1.trim_end_matches(']').to_owned()))
            .collect()
    };
    // RUNPATH, not RPATH: LD_LIBRARY_PATH must be able to override it.
    assert_eq!(tag("RPATH"), Vec::<String>::new());
    let runpath = tag("RUNPATH");
    assert_eq!(runpath.len(), 1, "{}", out.stdout);
    let entries: Vec<&str> = runpath[0].split(':').collect();
    assert_eq!(entries[0], "$ORIGIN/libtorch/lib");
    for entry in &entries {
        assert!(
            entry.starts_with("$ORIGIN/"),
            "RUNPATH entry {entry:?} is not relative to the binary: {entries:?}"
        );
    }
    if torch_dir().join("lib/libtorch_cuda.so").exists() {
        // Without it CUDA never initialises (see worker/build.rs).
        assert!(
            tag("NEEDED").iter().any(|n| n == "libtorch_cuda.so"),
            "{}",
            out.stdout
        );
    }
}
