//! Link-time settings for binaries that use libtorch: an rpath to the
//! bootstrap's libtorch so the binary runs without `LD_LIBRARY_PATH`, and
//! `libtorch_cuda` linked even though no symbol of it is referenced directly
//! (the linker's `--as-needed` would drop it and CUDA would never initialise).

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let Ok(libtorch) = std::env::var("LIBTORCH") else {
        return;
    };
    // Resolve the bootstrap's `.libtorch` link so the rpath survives even if
    // the link is later replaced.
    let lib = std::fs::canonicalize(PathBuf::from(&libtorch).join("lib"))
        .unwrap_or_else(|_| PathBuf::from(&libtorch).join("lib"));
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}
