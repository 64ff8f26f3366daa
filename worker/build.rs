//! Build settings for the worker, which links libtorch: the one C++ file it
//! compiles (`cpp/script_buffers.cpp`, a TorchScript module's buffers), where the dynamic
//! loader looks for it, and `libtorch_cuda` linked even though no symbol of it
//! is referenced directly (the linker's `--as-needed` would drop it and CUDA
//! would never initialise).
//!
//! The `worker` binary's RUNPATH holds `$ORIGIN`-relative entries only, in
//! every profile, so a copied binary runs wherever libtorch sits at the same
//! place relative to it, and nowhere else:
//!
//! 1. `$ORIGIN/libtorch/lib`: a bundle (`scripts/package`), with `libtorch`
//!    next to the binary, a link to a torch install or a copy of one;
//! 2. `$ORIGIN/<path to LIBTORCH>/lib`: the build's own libtorch, seen from
//!    `target/<profile>/` (`../../.libtorch/lib` in a checkout), so the binary
//!    runs in place without any environment.
//!
//! Executables under `target/<profile>/deps` (unit, integration and bench
//! harnesses) get the same path seen from there instead. The unit-test
//! harnesses of the library and of the binary can only be reached through
//! `cargo:rustc-link-arg`, which also reaches the binary; in debug builds the
//! binary therefore carries that entry too (relative, and debug binaries are
//! not shipped), while release binaries stay clean, so `cargo test --release`
//! of this crate's unit tests needs `LD_LIBRARY_PATH=.libtorch/lib`.
//!
//! libtorch's own libraries find the CUDA libraries of the venv through their
//! `$ORIGIN/../../nvidia/...` RPATHs; the kernel resolves those `..` after
//! following a `libtorch` link, so they resolve through one as well.

use std::path::{Component, Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=LIBTORCH_INCLUDE");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    compile_script_buffers();
    let Ok(libtorch) = std::env::var("LIBTORCH") else {
        return;
    };
    let libtorch = std::path::absolute(&libtorch).unwrap_or_else(|_| PathBuf::from(&libtorch));
    let lib = libtorch.join("lib");
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }

    let Some(profile_dir) = std::env::var_os("OUT_DIR")
        .map(PathBuf::from)
        .and_then(|out| out.ancestors().nth(3).map(Path::to_path_buf))
    else {
        // Not run by cargo: no layout to be relative to.
        return;
    };
    let from_profile = origin_relative(&profile_dir, &libtorch);
    let from_deps = origin_relative(&profile_dir.join("deps"), &libtorch);

    println!("cargo:rustc-link-arg-bins=-Wl,-rpath,$ORIGIN/libtorch/lib");
    println!("cargo:rustc-link-arg-bins=-Wl,-rpath,{from_profile}/lib");
    if std::env::var("PROFILE").as_deref() == Ok("release") {
        println!("cargo:rustc-link-arg-tests=-Wl,-rpath,{from_deps}/lib");
        println!("cargo:rustc-link-arg-benches=-Wl,-rpath,{from_deps}/lib");
    } else {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{from_deps}/lib");
    }
}

/// Compiles `cpp/script_buffers.cpp` (a TorchScript module's buffers, which tch cannot list)
/// against libtorch's headers with the flags torch-sys compiles its own C++ with.
fn compile_script_buffers() {
    const SOURCE: &str = "cpp/script_buffers.cpp";
    println!("cargo:rerun-if-changed={SOURCE}");
    let root = std::env::var("LIBTORCH_INCLUDE")
        .or_else(|_| std::env::var("LIBTORCH"))
        .unwrap_or_else(|_| {
            panic!(
                "set LIBTORCH to the libtorch (or torch package) directory: scripts/bootstrap does"
            )
        });
    let root = std::path::absolute(&root).unwrap_or_else(|_| PathBuf::from(&root));
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_owned());
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .file(SOURCE)
        .compile("ringmaster_script_buffers");
}

/// `$ORIGIN/<relative path>` from an executable in `dir` to `libtorch`.
///
/// The loader expands `$ORIGIN` to the executable's real directory, so `dir`
/// is resolved through links first. Of `libtorch` only the parent is resolved:
/// `.libtorch` is a link that `scripts/bootstrap` may point elsewhere later,
/// and the binary should follow it.
fn origin_relative(dir: &Path, libtorch: &Path) -> String {
    let dir = resolve_existing(dir);
    let target = match (libtorch.parent(), libtorch.file_name()) {
        (Some(parent), Some(name)) => resolve_existing(parent).join(name),
        _ => libtorch.to_path_buf(),
    };
    let from: Vec<Component<'_>> = dir.components().collect();
    let to: Vec<Component<'_>> = target.components().collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut rel = String::from("$ORIGIN");
    for _ in common..from.len() {
        rel.push_str("/..");
    }
    for part in &to[common..] {
        rel.push('/');
        rel.push_str(&part.as_os_str().to_string_lossy());
    }
    rel
}

/// `path` with links resolved as far as it exists; `deps/` may not exist yet
/// when the build script runs.
fn resolve_existing(path: &Path) -> PathBuf {
    if let Ok(real) = std::fs::canonicalize(path) {
        return real;
    }
    match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) => resolve_existing(parent).join(name),
        _ => path.to_path_buf(),
    }
}
