//! Finding the NCCL library and making it loadable by cudarc.
//!
//! cudarc loads NCCL at run time by bare name (`libnccl.so`, or `libnccl.so.<CUDA major>`), but
//! the torch wheel ships only `nvidia/nccl/lib/libnccl.so.2`, with no `libnccl.so` link, and the
//! dynamic loader reads `LD_LIBRARY_PATH` once, at process start. So a CUDA worker does this
//! before anything else:
//!
//! 1. [`find`] looks for the library, in this order: the file (or folder) named by
//!    `RINGMASTER_NCCL_LIB`; a `libnccl` this process already has mapped (libtorch_cuda links
//!    one, and using the same copy keeps one NCCL in the process); the `nvidia/nccl/lib` folder
//!    of the torch install this process loaded libtorch from; `LD_LIBRARY_PATH`; the usual system
//!    folders. A miss is one error naming every place it looked.
//! 2. [`prepare`] puts a `libnccl.so` link to it in a private folder (created 0700, owned by
//!    this user, refused otherwise: a library planted there would run as us) and, unless this
//!    process was started that way already, returns the environment to re-execute with: that
//!    folder first on `LD_LIBRARY_PATH` and a marker naming the library, so the second start
//!    goes straight on. The loader recognises the link's target as the file libtorch already
//!    mapped (same inode), so NCCL is loaded once.

use sha2::{Digest, Sha256};
use std::ffi::{OsStr, OsString};
use std::fs;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Names the NCCL library file (or a folder holding it), overriding the search.
pub const ENV_LIB: &str = "RINGMASTER_NCCL_LIB";
/// Set by [`prepare`] for the re-executed process: the library its `LD_LIBRARY_PATH` resolves.
pub const ENV_LINKED: &str = "RINGMASTER_NCCL_LINKED";

/// File names tried in each folder, best first; any `libnccl.so.2.*` comes after these.
const NAMES: [&str; 2] = ["libnccl.so", "libnccl.so.2"];
/// Folders searched after the others.
const SYSTEM_DIRS: [&str; 6] = [
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/cuda/lib64",
    "/usr/local/nccl/lib",
];

/// Why NCCL cannot be used on this host.
#[derive(Debug, thiserror::Error)]
pub enum LibraryError {
    /// The override names nothing usable.
    #[error("{ENV_LIB}={path}: {why}")]
    BadOverride {
        /// The value of the variable.
        path: String,
        /// What is wrong with it.
        why: String,
    },
    /// No candidate anywhere.
    #[error(
        "NCCL library not found: looked for {names} in {places}; install NCCL (the torch wheel's \
         nvidia-nccl package has it) or set {ENV_LIB} to the library file",
        names = names_text(),
        places = .places.join(", ")
    )]
    NotFound {
        /// Every place searched, with where it came from.
        places: Vec<String>,
    },
    /// The private link folder could not be made or is not safe to use.
    #[error("cannot prepare NCCL loading in {dir}: {why}")]
    LinkDir {
        /// The folder.
        dir: PathBuf,
        /// What went wrong.
        why: String,
    },
    /// The library was found but does not load.
    #[error("NCCL at {path} does not load: {why}")]
    Load {
        /// The library file.
        path: PathBuf,
        /// The loader's or NCCL's answer.
        why: String,
    },
}

fn names_text() -> String {
    format!("{}, libnccl.so.2.*", NAMES.join(", "))
}

/// What the search may look at: the process's environment and memory map, passed in so the
/// search is a pure function that tests can drive.
#[derive(Debug, Default, Clone)]
pub struct SearchInputs {
    /// Value of `RINGMASTER_NCCL_LIB`.
    pub override_path: Option<OsString>,
    /// Contents of `/proc/self/maps`.
    pub maps: String,
    /// Value of `LD_LIBRARY_PATH`.
    pub ld_library_path: Option<OsString>,
    /// System folders to search last.
    pub system_dirs: Vec<PathBuf>,
}

impl SearchInputs {
    /// The inputs of this process.
    pub fn of_this_process() -> SearchInputs {
        SearchInputs {
            override_path: std::env::var_os(ENV_LIB),
            maps: fs::read_to_string("/proc/self/maps").unwrap_or_default(),
            ld_library_path: std::env::var_os("LD_LIBRARY_PATH"),
            system_dirs: SYSTEM_DIRS.iter().map(PathBuf::from).collect(),
        }
    }
}

/// The NCCL library file to use, and which rule found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// The library file (not resolved through links).
    pub path: PathBuf,
    /// Where it was found, for logs: "RINGMASTER_NCCL_LIB", "already loaded", "torch install",
    /// "LD_LIBRARY_PATH" or "system".
    pub origin: &'static str,
}

/// Searches for the NCCL library (see the module doc for the order).
pub fn find(inputs: &SearchInputs) -> Result<Found, LibraryError> {
    if let Some(raw) = inputs.override_path.as_ref().filter(|v| !v.is_empty()) {
        return find_override(raw);
    }
    let mut places = Vec::new();
    let mapped = mapped_files(&inputs.maps);
    if let Some(path) = mapped.iter().find(|p| is_nccl_name(p)) {
        return Ok(Found {
            path: path.clone(),
            origin: "already loaded",
        });
    }
    places.push("this process's loaded libraries".to_string());
    let torch_dirs = mapped
        .iter()
        .filter(|p| p.file_name() == Some(OsStr::new("libtorch_cpu.so")))
        .filter_map(|p| p.parent()?.parent()?.parent().map(Path::to_path_buf))
        .map(|site| site.join("nvidia/nccl/lib"));
    let ld_dirs = inputs
        .ld_library_path
        .iter()
        .flat_map(std::env::split_paths)
        .filter(|d| !d.as_os_str().is_empty());
    let groups: [(&'static str, Vec<PathBuf>); 3] = [
        ("torch install", torch_dirs.collect()),
        ("LD_LIBRARY_PATH", ld_dirs.collect()),
        ("system", inputs.system_dirs.clone()),
    ];
    for (origin, dirs) in groups {
        for dir in dirs {
            if let Some(path) = in_dir(&dir) {
                return Ok(Found { path, origin });
            }
            places.push(format!("{} ({origin})", dir.display()));
        }
    }
    Err(LibraryError::NotFound { places })
}

fn find_override(raw: &OsStr) -> Result<Found, LibraryError> {
    let path = PathBuf::from(raw);
    let bad = |why: &str| LibraryError::BadOverride {
        path: path.display().to_string(),
        why: why.to_string(),
    };
    let found = if path.is_dir() {
        in_dir(&path).ok_or_else(|| bad(&format!("the folder holds none of {}", names_text())))?
    } else if path.is_file() {
        path.clone()
    } else {
        return Err(bad("no such file or folder"));
    };
    Ok(Found {
        path: found,
        origin: "RINGMASTER_NCCL_LIB",
    })
}

/// The first NCCL library file in `dir`, by [`NAMES`] and then any `libnccl.so.2.*`.
fn in_dir(dir: &Path) -> Option<PathBuf> {
    for name in NAMES {
        let p = dir.join(name);
        if p.is_file() {
            return Some(p);
        }
    }
    let mut versioned: Vec<PathBuf> = fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(OsStr::to_str)
                .is_some_and(|n| n.starts_with("libnccl.so.2."))
                && p.is_file()
        })
        .collect();
    versioned.sort();
    versioned.pop()
}

fn is_nccl_name(p: &Path) -> bool {
    p.file_name()
        .and_then(OsStr::to_str)
        .is_some_and(|n| n == "libnccl.so" || n.starts_with("libnccl.so."))
}

/// The files mapped into a process, from the text of its `/proc/<pid>/maps`, in order of first
/// appearance.
fn mapped_files(maps: &str) -> Vec<PathBuf> {
    let mut seen = Vec::new();
    for line in maps.lines() {
        // address perms offset dev inode path; the path is everything after the fifth field.
        let mut rest = line;
        for _ in 0..5 {
            rest = rest.trim_start();
            rest = rest.find(' ').map_or("", |i| &rest[i..]);
        }
        let path = rest.trim();
        if path.starts_with('/') {
            let p = PathBuf::from(path);
            if !seen.contains(&p) {
                seen.push(p);
            }
        }
    }
    seen
}

/// What a CUDA worker does next about NCCL.
#[derive(Debug, PartialEq, Eq)]
pub enum Prepared {
    /// The library resolves by cudarc's name in this process: go on.
    Ready(Found),
    /// Start this program again with these variables set (see the module doc).
    Reexec {
        /// The library the new process will load.
        found: Found,
        /// Variables to set.
        env: Vec<(&'static str, OsString)>,
    },
}

/// Finds NCCL and makes sure cudarc can load it, linking it under `link_root` (a private
/// folder per library is made there). `linked` is this process's `RINGMASTER_NCCL_LINKED`.
pub fn prepare(
    inputs: &SearchInputs,
    link_root: &Path,
    linked: Option<&OsStr>,
) -> Result<Prepared, LibraryError> {
    let found = find(inputs)?;
    if linked == Some(found.path.as_os_str()) {
        return Ok(Prepared::Ready(found));
    }
    let dir = link_dir(link_root, &found.path)?;
    let link = dir.join("libnccl.so");
    let target = fs::canonicalize(&found.path).map_err(|e| LibraryError::Load {
        path: found.path.clone(),
        why: e.to_string(),
    })?;
    if fs::read_link(&link).ok().as_deref() != Some(target.as_path()) {
        // Made under a temporary name and renamed over, so a concurrent start of another
        // worker never sees a missing or half-made link.
        let tmp = dir.join(format!(".libnccl.so.{}", std::process::id()));
        let _ = fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&target, &tmp)
            .and_then(|()| fs::rename(&tmp, &link))
            .map_err(|e| LibraryError::LinkDir {
                dir: dir.clone(),
                why: e.to_string(),
            })?;
    }
    let mut search = OsString::from(dir.as_os_str());
    if let Some(old) = inputs.ld_library_path.as_ref().filter(|v| !v.is_empty()) {
        search.push(":");
        search.push(old);
    }
    Ok(Prepared::Reexec {
        env: vec![
            ("LD_LIBRARY_PATH", search),
            (ENV_LINKED, found.path.clone().into_os_string()),
        ],
        found,
    })
}

/// The private folder for links to `lib` under `root`: one per user and library, created 0700
/// and refused when someone else owns it or can write to it.
fn link_dir(root: &Path, lib: &Path) -> Result<PathBuf, LibraryError> {
    let uid = fs::metadata("/proc/self")
        .map(|m| m.uid())
        .map_err(|e| LibraryError::LinkDir {
            dir: root.to_path_buf(),
            why: format!("cannot tell this process's user: {e}"),
        })?;
    let digest = Sha256::digest(lib.as_os_str().as_encoded_bytes());
    let tag: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
    let dir = root.join(format!("ringmaster-nccl-{uid}-{tag}"));
    let fail = |why: String| LibraryError::LinkDir {
        dir: dir.clone(),
        why,
    };
    match fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(fail(e.to_string())),
    }
    let meta = fs::symlink_metadata(&dir).map_err(|e| fail(e.to_string()))?;
    if !meta.is_dir() {
        return Err(fail("it is not a folder".into()));
    }
    if meta.uid() != uid {
        return Err(fail(format!(
            "it belongs to user {}, not to this user ({uid})",
            meta.uid()
        )));
    }
    if meta.permissions().mode() & 0o022 != 0 {
        return Err(fail(format!(
            "others can write to it (mode {:o})",
            meta.permissions().mode() & 0o777
        )));
    }
    Ok(dir)
}

/// NCCL as this process loaded it.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The library file and how it was found.
    pub found: Found,
    /// `ncclGetVersion`.
    pub version: i32,
}

impl std::fmt::Display for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "NCCL {} from {} ({})",
            version_text(self.version),
            self.found.path.display(),
            self.found.origin
        )
    }
}

/// Finds NCCL and loads it through cudarc, re-executing this program first when the dynamic
/// loader must be pointed at it (see the module doc). Returns only in the process that has
/// NCCL loaded, or with the reason it cannot be.
pub fn load_or_reexec() -> Result<Loaded, LibraryError> {
    let root = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|d| d.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    let linked = std::env::var_os(ENV_LINKED);
    let found = match prepare(&SearchInputs::of_this_process(), &root, linked.as_deref())? {
        Prepared::Ready(found) => found,
        Prepared::Reexec { found, env } => {
            use std::os::unix::process::CommandExt;
            let exe = std::env::current_exe().map_err(|e| LibraryError::Load {
                path: found.path.clone(),
                why: format!("cannot find this program to restart it: {e}"),
            })?;
            let mut cmd = std::process::Command::new(exe);
            cmd.args(std::env::args_os().skip(1));
            for (k, v) in env {
                cmd.env(k, v);
            }
            // Only returns on failure.
            let e = cmd.exec();
            return Err(LibraryError::Load {
                path: found.path,
                why: format!("cannot restart this program to load it: {e}"),
            });
        }
    };
    // SAFETY: only opens the library by cudarc's names (a dlopen), runs no code of it.
    #[allow(unsafe_code)]
    let present = unsafe { cudarc::nccl::sys::is_culib_present() };
    if !present {
        return Err(LibraryError::Load {
            path: found.path,
            why: format!(
                "the dynamic loader does not open libnccl.so with LD_LIBRARY_PATH={}",
                std::env::var("LD_LIBRARY_PATH").unwrap_or_default()
            ),
        });
    }
    let version = super::nccl_version().map_err(|e| LibraryError::Load {
        path: found.path.clone(),
        why: e.to_string(),
    })?;
    Ok(Loaded { found, version })
}

/// NCCL's version as `major.minor.patch`, from its integer code (e.g. 22809 is 2.28.9).
pub fn version_text(code: i32) -> String {
    // NCCL >= 2.9 encodes major*10000 + minor*100 + patch; older ones major*1000 + minor*100 +
    // patch, which no supported NCCL is.
    format!("{}.{}.{}", code / 10000, (code % 10000) / 100, code % 100)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(p: &Path) {
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, b"not really a library").unwrap();
    }

    fn inputs(dirs: &[&Path]) -> SearchInputs {
        SearchInputs {
            system_dirs: dirs.iter().map(|d| d.to_path_buf()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn the_override_wins_and_a_wrong_one_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let lib = tmp.path().join("custom/libnccl.so.2.21.5");
        touch(&lib);
        let sys = tmp.path().join("sys");
        touch(&sys.join("libnccl.so.2"));
        let mut i = inputs(&[&sys]);
        i.override_path = Some(lib.clone().into());
        assert_eq!(find(&i).unwrap().path, lib);
        // A folder override finds the versioned file inside.
        i.override_path = Some(tmp.path().join("custom").into());
        assert_eq!(find(&i).unwrap().path, lib);
        i.override_path = Some(tmp.path().join("nope").into());
        let err = find(&i).unwrap_err().to_string();
        assert!(err.starts_with("RINGMASTER_NCCL_LIB="), "{err}");
        assert!(err.ends_with("no such file or folder"), "{err}");
        i.override_path = Some(sys.parent().unwrap().join("empty").into());
        fs::create_dir_all(i.override_path.as_ref().unwrap()).unwrap();
        let err = find(&i).unwrap_err().to_string();
        assert!(err.contains("the folder holds none of libnccl.so"), "{err}");
    }

    #[test]
    fn a_library_already_mapped_comes_before_any_folder() {
        let tmp = tempfile::tempdir().unwrap();
        let sys = tmp.path().join("sys");
        touch(&sys.join("libnccl.so"));
        let mut i = inputs(&[&sys]);
        i.maps = "7f25ac000000-7f25ac200000 r-xp 00000000 fd:01 123 \
                  /venv/site-packages/nvidia/nccl/lib/libnccl.so.2\n\
                  7f2500000000-7f2500001000 rw-p 00000000 00:00 0 \n"
            .to_string();
        let found = find(&i).unwrap();
        assert_eq!(
            found.path,
            PathBuf::from("/venv/site-packages/nvidia/nccl/lib/libnccl.so.2")
        );
        assert_eq!(found.origin, "already loaded");
    }

    #[test]
    fn the_torch_install_next_to_libtorch_is_searched() {
        let tmp = tempfile::tempdir().unwrap();
        let site = tmp.path().join("lib/python3.11/site-packages");
        let lib = site.join("nvidia/nccl/lib/libnccl.so.2");
        touch(&lib);
        let mut i = inputs(&[]);
        i.maps = format!(
            "7f0-7f1 r-xp 00000000 fd:01 5 {}\n",
            site.join("torch/lib/libtorch_cpu.so").display()
        );
        let found = find(&i).unwrap();
        assert_eq!((found.path, found.origin), (lib, "torch install"));
    }

    #[test]
    fn ld_library_path_comes_before_the_system_folders() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b, sys) = (
            tmp.path().join("a"),
            tmp.path().join("b"),
            tmp.path().join("s"),
        );
        touch(&b.join("libnccl.so.2.28.9"));
        touch(&sys.join("libnccl.so"));
        fs::create_dir_all(&a).unwrap();
        let mut i = inputs(&[&sys]);
        i.ld_library_path = Some(std::env::join_paths([&a, &b]).unwrap());
        let found = find(&i).unwrap();
        assert_eq!(found.path, b.join("libnccl.so.2.28.9"));
        assert_eq!(found.origin, "LD_LIBRARY_PATH");
    }

    #[test]
    fn a_miss_names_every_place_searched() {
        let tmp = tempfile::tempdir().unwrap();
        let sys = tmp.path().join("sys");
        fs::create_dir_all(&sys).unwrap();
        let mut i = inputs(&[&sys]);
        i.ld_library_path = Some("/opt/x/lib".into());
        let err = find(&i).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "NCCL library not found: looked for libnccl.so, libnccl.so.2, libnccl.so.2.* in \
                 this process's loaded libraries, /opt/x/lib (LD_LIBRARY_PATH), {} (system); \
                 install NCCL (the torch wheel's nvidia-nccl package has it) or set \
                 RINGMASTER_NCCL_LIB to the library file",
                sys.display()
            )
        );
    }

    #[test]
    fn prepare_links_the_library_once_and_the_second_start_goes_on() {
        let tmp = tempfile::tempdir().unwrap();
        let lib = tmp.path().join("venv/nvidia/nccl/lib/libnccl.so.2");
        touch(&lib);
        let root = tmp.path().join("run");
        fs::create_dir_all(&root).unwrap();
        let mut i = inputs(&[]);
        i.override_path = Some(lib.clone().into());
        i.ld_library_path = Some("/old".into());
        let Prepared::Reexec { env, found } = prepare(&i, &root, None).unwrap() else {
            panic!("expected a re-exec");
        };
        assert_eq!(found.path, lib);
        let dir = PathBuf::from(&env[0].1.to_str().unwrap().split(':').next().unwrap());
        assert!(env[0].1.to_str().unwrap().ends_with(":/old"));
        assert_eq!(
            fs::read_link(dir.join("libnccl.so")).unwrap(),
            fs::canonicalize(&lib).unwrap()
        );
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        assert_eq!(env[1], (ENV_LINKED, lib.clone().into_os_string()));
        // The re-executed process sees the marker and goes on; so does a second worker that
        // links the same library again.
        let again = prepare(&i, &root, Some(lib.as_os_str())).unwrap();
        assert!(matches!(again, Prepared::Ready(_)));
        assert!(matches!(
            prepare(&i, &root, None).unwrap(),
            Prepared::Reexec { .. }
        ));
    }

    #[test]
    fn a_link_folder_others_can_write_to_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let lib = tmp.path().join("libnccl.so.2");
        touch(&lib);
        let root = tmp.path().join("run");
        fs::create_dir_all(&root).unwrap();
        let mut i = inputs(&[]);
        i.override_path = Some(lib.into());
        let Prepared::Reexec { env, .. } = prepare(&i, &root, None).unwrap() else {
            panic!("expected a re-exec");
        };
        let dir = PathBuf::from(env[0].1.to_str().unwrap().split(':').next().unwrap());
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
        let err = prepare(&i, &root, None).unwrap_err().to_string();
        assert!(err.contains("others can write to it (mode 777)"), "{err}");
    }

    #[test]
    fn version_codes_read_as_nccl_prints_them() {
        assert_eq!(version_text(22809), "2.28.9");
        assert_eq!(version_text(21805), "2.18.5");
    }
}
