//! `scripts/quickstart`, run as users run it, in this checkout's `run/`: a run
//! never uses the coordinator address an earlier run left in
//! `run/logs/coordinator.out`, and a second quickstart started while one runs
//! waits for it, saying so, instead of sharing `run/` with it; both train to
//! the usual accuracy.
//!
//! Ignored by default: the script builds in release mode (minutes the first
//! time) and trains twice. Run it with
//! `cargo test -p ringmaster-tests --test quickstart_concurrent -- --ignored`.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use ringmaster_tests::{Output, repo_root};

/// The first run may build everything in release mode.
const T: Duration = Duration::from_secs(40 * 60);

/// A running quickstart; SIGTERM on drop, so that the script's own trap stops
/// the cluster it started (SIGKILL would leave it running).
struct Quickstart {
    pid: i32,
    done: Receiver<std::io::Result<std::process::Output>>,
    finished: bool,
}

impl Quickstart {
    fn start(root: &Path) -> Quickstart {
        let child = Command::new(root.join("scripts/quickstart"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("failed to start scripts/quickstart");
        let pid = child.id() as i32;
        let (tx, done) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        Quickstart {
            pid,
            done,
            finished: false,
        }
    }

    fn wait(mut self, deadline: Instant) -> Output {
        let left = deadline.saturating_duration_since(Instant::now());
        let result = self.done.recv_timeout(left);
        self.finished = result.is_ok();
        match result {
            Ok(Ok(out)) => Output {
                code: out.status.code().unwrap_or(-1),
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            },
            Ok(Err(e)) => panic!("waiting for scripts/quickstart failed: {e}"),
            Err(_) => panic!("scripts/quickstart did not finish within {T:?}"),
        }
    }
}

impl Drop for Quickstart {
    fn drop(&mut self) {
        if !self.finished && self.done.try_recv().is_err() {
            // SAFETY: plain kill(2) of a child we spawned and that its waiter
            // thread has not reaped (it would have sent on `done`).
            unsafe { libc::kill(self.pid, libc::SIGTERM) };
        }
    }
}

#[track_caller]
fn assert_trained(name: &str, out: &Output) {
    assert_eq!(
        out.code, 0,
        "{name} failed\nstdout:\n{}\nstderr:\n{}",
        out.stdout, out.stderr
    );
    let accuracy: f64 = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("validation accuracy: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} printed no validation accuracy:\n{}", out.stdout));
    assert!(accuracy > 0.9, "{name}: validation accuracy {accuracy}");
}

#[test]
#[ignore = "runs scripts/quickstart twice, building in release mode"]
fn quickstarts_take_turns_and_never_use_a_stale_address() {
    let root = repo_root();
    let run = root.join("run");
    std::fs::create_dir_all(run.join("logs")).unwrap();
    // What an earlier run leaves behind: the address of a coordinator long
    // gone (nothing listens on the discard port).
    std::fs::write(
        run.join("logs/coordinator.out"),
        "coordinator listening on 127.0.0.1:9\n",
    )
    .unwrap();
    let deadline = Instant::now() + T;

    let first = Quickstart::start(&root);
    // Start the second once the first holds run/ (it says so in
    // run/quickstart.owner), so the second has to wait.
    let owner = format!("pid {},", first.pid);
    let until = Instant::now() + Duration::from_secs(60);
    while Instant::now() < until
        && !std::fs::read_to_string(run.join("quickstart.owner"))
            .is_ok_and(|s| s.starts_with(&owner))
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    let second = Quickstart::start(&root);

    let first = first.wait(deadline);
    let second = second.wait(deadline);
    assert_trained("the first quickstart", &first);
    assert_trained("the second quickstart", &second);
    assert!(
        second
            .stderr
            .contains("quickstart: waiting for the quickstart already running in"),
        "the second quickstart did not wait for the first:\n{}",
        second.stderr
    );
    assert!(
        !first.stderr.contains("waiting for the quickstart"),
        "{}",
        first.stderr
    );
}
