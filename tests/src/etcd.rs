//! Real etcd servers for tests: [`EtcdProcess`] (one member) and
//! [`EtcdCluster`] (several members, each of which can be killed and
//! restarted), on free loopback ports, with data and logs in a temporary
//! directory. Every process is killed and reaped on drop. What the tests do
//! with etcd lives with the tests.
//!
//! The `etcd` binary is `$RINGMASTER_ETCD` if set, else `etcd` on `PATH`
//! (Debian's `etcd-server`, installed by `scripts/bootstrap`); without it,
//! starting fails with "etcd not found: run scripts/bootstrap" rather than
//! skipping anything.
//!
//! Ports are found by binding `127.0.0.1:0` and releasing the port; if
//! another process takes one before etcd binds it, etcd exits and the whole
//! start is retried on fresh ports.
//!
//! Readiness is an HTTP `GET /health` on each client port answering
//! `"health":"true"`, which etcd 3.4 only does once the cluster has a leader
//! and serves reads.

use anyhow::{Context, bail};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a start may take before it is reported as failed.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Attempts at starting on fresh ports when a port was taken meanwhile.
const START_ATTEMPTS: usize = 5;

/// The etcd binary, or the error that tells how to install it.
pub fn etcd_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("RINGMASTER_ETCD") {
        let path = PathBuf::from(path);
        if path.is_file() {
            return Ok(path);
        }
        bail!(
            "etcd not found: RINGMASTER_ETCD={} is not a file; run scripts/bootstrap",
            path.display()
        );
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("etcd"))
        .find(|path| path.is_file())
        .context("etcd not found: run scripts/bootstrap")
}

/// Raft timing of the members. A single member never waits for peers, so
/// it runs with short timeouts, which also lowers etcd's minimum lease TTL
/// (1.5 election timeouts, rounded up to whole seconds) to 1 s. Clusters keep
/// etcd's defaults so that a loaded test machine does not cause spurious
/// elections.
#[derive(Clone, Copy, Debug)]
struct Timing {
    heartbeat_ms: u64,
    election_ms: u64,
}

const SOLO: Timing = Timing {
    heartbeat_ms: 50,
    election_ms: 500,
};
const CLUSTER: Timing = Timing {
    heartbeat_ms: 100,
    election_ms: 1000,
};

/// One member: its fixed ports and directory, and its process while running.
struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    log_path: PathBuf,
    child: Option<Child>,
}

impl Member {
    fn client_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }

    fn spawn(
        &mut self,
        binary: &Path,
        initial_cluster: &str,
        token: &str,
        timing: Timing,
    ) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .with_context(|| format!("failed to open {}", self.log_path.display()))?;
        let child = Command::new(binary)
            .arg("--name")
            .arg(&self.name)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--listen-client-urls", &self.client_url()])
            .args(["--advertise-client-urls", &self.client_url()])
            .args(["--listen-peer-urls", &self.peer_url()])
            .args(["--initial-advertise-peer-urls", &self.peer_url()])
            .args(["--initial-cluster", initial_cluster])
            .args(["--initial-cluster-token", token])
            .args(["--initial-cluster-state", "new"])
            .args(["--heartbeat-interval", &timing.heartbeat_ms.to_string()])
            .args(["--election-timeout", &timing.election_ms.to_string()])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("failed to start {}", binary.display()))?;
        self.child = Some(child);
        Ok(())
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `Some(status)` if the process has exited.
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    fn lost_a_port_race(&self) -> bool {
        std::fs::read_to_string(&self.log_path)
            .is_ok_and(|log| log.contains("address already in use"))
    }
}

/// A cluster of etcd members on loopback, each a real process.
pub struct EtcdCluster {
    members: Vec<Member>,
    binary: PathBuf,
    initial_cluster: String,
    token: String,
    timing: Timing,
    dir: tempfile::TempDir,
}

impl EtcdCluster {
    /// Starts `size` members named `n0`, `n1`, ... and waits until every
    /// one reports healthy.
    pub fn start(size: usize) -> anyhow::Result<Self> {
        Self::start_with(size, CLUSTER)
    }

    fn start_with(size: usize, timing: Timing) -> anyhow::Result<Self> {
        if size == 0 {
            bail!("an etcd cluster needs at least one member");
        }
        let binary = etcd_binary()?;
        let mut last_error = None;
        for _ in 0..START_ATTEMPTS {
            let mut cluster = Self::prepare(&binary, size, timing)?;
            match cluster.launch() {
                Ok(()) => return Ok(cluster),
                Err(err) if cluster.members.iter().any(Member::lost_a_port_race) => {
                    last_error = Some(err);
                }
                Err(err) => return Err(err),
            }
        }
        Err(last_error
            .unwrap_or_else(|| anyhow::anyhow!("no attempt made"))
            .context(format!("etcd lost a port race {START_ATTEMPTS} times")))
    }

    fn prepare(binary: &Path, size: usize, timing: Timing) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("etcd-").tempdir()?;
        let ports = free_ports(2 * size)?;
        let members: Vec<Member> = (0..size)
            .map(|i| Member {
                name: format!("n{i}"),
                client_port: ports[2 * i],
                peer_port: ports[2 * i + 1],
                data_dir: dir.path().join(format!("n{i}.data")),
                log_path: dir.path().join(format!("n{i}.log")),
                child: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect::<Vec<_>>()
            .join(",");
        // Unique per cluster so that members of two test clusters never join.
        let token = format!(
            "ringmaster-test-{}-{}",
            std::process::id(),
            dir.path()
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        );
        Ok(EtcdCluster {
            members,
            binary: binary.to_owned(),
            initial_cluster,
            token,
            timing,
            dir,
        })
    }

    fn launch(&mut self) -> anyhow::Result<()> {
        for i in 0..self.members.len() {
            self.spawn(i)?;
        }
        for i in 0..self.members.len() {
            self.wait_healthy(i)?;
        }
        Ok(())
    }

    fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let (binary, cluster, token, timing) = (
            self.binary.clone(),
            self.initial_cluster.clone(),
            self.token.clone(),
            self.timing,
        );
        self.members[i].spawn(&binary, &cluster, &token, timing)
    }

    /// Polls member `i`'s `/health` until it answers healthy.
    fn wait_healthy(&mut self, i: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let member = &mut self.members[i];
            if let Some(status) = member.exited() {
                bail!(
                    "etcd member {} exited with {status} while starting; log tail:\n{}",
                    member.name,
                    member.log_tail()
                );
            }
            if http_get(member.client_port, "/health")
                .is_ok_and(|body| body.contains("\"health\":\"true\""))
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "etcd member {} was not healthy within {START_TIMEOUT:?}; log tail:\n{}",
                    member.name,
                    member.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The client URLs of every member, running or not.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Member::client_url).collect()
    }

    /// The client URL of member `i`.
    pub fn endpoint(&self, i: usize) -> String {
        self.members[i].client_url()
    }

    /// How many members the cluster has, running or not.
    pub fn size(&self) -> usize {
        self.members.len()
    }

    /// Kills member `i` with SIGKILL and reaps it; its data stays.
    pub fn kill(&mut self, i: usize) {
        self.members[i].kill();
    }

    /// Whether member `i`'s process is running.
    pub fn is_running(&mut self, i: usize) -> bool {
        self.members[i].child.is_some() && self.members[i].exited().is_none()
    }

    /// Restarts a killed member `i` on its old ports and data, and waits
    /// until it is healthy again (which needs a quorum of the cluster).
    pub fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        if self.is_running(i) {
            bail!("etcd member {} is still running", self.members[i].name);
        }
        self.members[i].kill();
        self.spawn(i)?;
        self.wait_healthy(i)
    }

    /// The value of a Prometheus metric on member `i`'s `/metrics` page
    /// (the first series of that name), or `None` if the page lacks it.
    pub fn metric(&self, i: usize, name: &str) -> anyhow::Result<Option<f64>> {
        let page = http_get(self.members[i].client_port, "/metrics")?;
        Ok(parse_metric(&page, name))
    }

    /// The directory holding every member's data and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for member in &mut self.members {
            member.kill();
        }
    }
}

/// A single etcd member: what most tests need.
pub struct EtcdProcess {
    cluster: EtcdCluster,
}

impl EtcdProcess {
    /// Starts one member and waits until it is healthy.
    pub fn start() -> anyhow::Result<Self> {
        Ok(EtcdProcess {
            cluster: EtcdCluster::start_with(1, SOLO)?,
        })
    }

    /// Its client URL, as a one-element list.
    pub fn endpoints(&self) -> Vec<String> {
        self.cluster.endpoints()
    }

    /// Its client URL.
    pub fn endpoint(&self) -> String {
        self.cluster.endpoint(0)
    }

    /// Kills it with SIGKILL and reaps it; its data stays.
    pub fn kill(&mut self) {
        self.cluster.kill(0);
    }

    /// Restarts it on its old port and data after [`EtcdProcess::kill`].
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.cluster.restart(0)
    }

    /// See [`EtcdCluster::metric`].
    pub fn metric(&self, name: &str) -> anyhow::Result<Option<f64>> {
        self.cluster.metric(0, name)
    }

    /// The directory holding its data and log.
    pub fn dir(&self) -> &Path {
        self.cluster.dir()
    }
}

/// Finds `n` distinct free loopback ports. All are held until all are
/// found, so that they differ; then they are released for etcd to bind.
fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .context("failed to find free loopback ports")?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

/// A plain HTTP/1.0 GET on a loopback port; the body, if the status is 200.
fn http_get(port: u16, path: &str) -> anyhow::Result<String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("malformed http response")?;
    let status = head.lines().next().unwrap_or_default();
    if !status.contains(" 200 ") {
        bail!("GET {path}: {status}");
    }
    Ok(body.to_owned())
}

/// The value of the first sample of `name` in a Prometheus text page.
fn parse_metric(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let series_name = series.split('{').next()?;
            (series_name == name).then(|| value.parse().ok())?
        })
}

#[cfg(test)]
mod tests {
    use super::parse_metric;

    #[test]
    fn metric_lines_parse() {
        let page = "# HELP x y\n# TYPE a gauge\na_total 3\nb{l=\"1\"} 2.5\nb{l=\"2\"} 7\nab 9\n";
        assert_eq!(parse_metric(page, "a_total"), Some(3.0));
        assert_eq!(parse_metric(page, "b"), Some(2.5));
        assert_eq!(parse_metric(page, "a"), None);
        assert_eq!(parse_metric(page, "missing"), None);
    }
}
