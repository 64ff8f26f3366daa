//! Control-plane load: N simulated workers heartbeating at the coordinator's
//! interval (1 Hz by default) against one real `coordinator serve --store
//! etcd://...` process on a real etcd. `scripts/bench control-plane` runs it.
//!
//! Each simulated worker is a tokio task speaking the real `Agent.Session`
//! protocol: it sends `Register` (protocol 1, name `bench-<i>`), waits for
//! `Registered`, then sends `Heartbeat` every `heartbeat_interval_ms`, starting
//! after a per-worker offset spread over one interval so that beats do not
//! arrive in bursts. Sessions are multiplexed as HTTP/2 streams over a few
//! tonic `Channel`s (`--streams-per-conn`, 1 = one TCP connection per worker).
//! etcd runs as in the integration tests (`ringmaster_tests::etcd`, free
//! loopback ports); each N gets a fresh etcd and a fresh coordinator (this
//! package's release binary), which must answer a control call before the
//! workers start, and which is stopped with SIGTERM afterwards.
//!
//! Measured over the steady window (all workers registered, every one beating):
//! - coordinator CPU cores: Δ(utime + stime) of its process in
//!   `/proc/<pid>/stat` over the window's wall time (etcd's and this harness's
//!   own are printed beside it: they share the machine);
//! - etcd writes/s: Δ(`etcd_mvcc_put_total` + `etcd_mvcc_delete_total`), every
//!   key put or deleted, alone or inside a txn; next to it Δ
//!   `etcd_debugging_mvcc_current_revision` (one per committed write txn).
//!   `etcd_mvcc_txn_total` is not a write count in etcd 3.4: read-only txns
//!   bump it too. The same counters are also read over the registration ramp
//!   and the departure of every worker;
//! - control-loop round trip: every `--probe-ms`, on a connection and thread
//!   of its own, a `GetJob` for a job that does not exist: the handler asks
//!   the single control loop through its mpsc queue and the `NotFound` comes
//!   back as one HTTP/2 HEADERS frame, so the round trip is the loop's
//!   queueing and work plus one gRPC round trip. A `ListJobs` follows each
//!   one: the same path, but its reply has a body, which the coordinator
//!   writes as more than one TCP segment; while its accepted sockets lack
//!   TCP_NODELAY, the last segment can wait for the client's delayed ACK
//!   (~40 ms on Linux), which this figure shows. The idle coordinator's
//!   figures, taken before any worker arrives, are the floor;
//! - heartbeat send→seen delay, from the coordinator's own view: the protocol
//!   has no heartbeat ack, so every `--snapshot-secs` a `ListWorkers` call
//!   returns each worker's `last_heartbeat_ms_ago` (age: whole ms, refreshed
//!   when the coordinator takes in a message of that worker). The coordinator
//!   computes all ages at one moment Ts within the call's [T0, T1], so it last
//!   saw a worker at P in [Ts − age − 1 ms, Ts − age + 1 ms]. Workers whose
//!   last send S lies within `--margin-ms` before T0 (or later) are skipped as
//!   in flight; for the others S is the beat in question. If it was seen, its
//!   delay P − S lies in [Ts_lo − age − 1 ms − S, T1 − age + 1 ms − S], where
//!   Ts_lo ≥ T0 is the latest S + age − 1 ms over the workers certainly seen
//!   (both ends reported; the width is about one ListWorkers round trip,
//!   delayed-ACK waits included; the list is built in one pass rather than
//!   at one instant, so the lower end can be high by the time of that pass,
//!   which is part of the round trip). If
//!   T1 − age + 1 ms < S it was still unseen a margin after its send: delay
//!   ≥ T0 − S, upper end infinite. This assumes a worker is seen less than an
//!   interval late, which `max age` (about one interval when it holds) shows.
//!   Both figures include the harness side of the wire (channel, HTTP/2
//!   framing), as a real worker's would.
//!
//! Usage: `cargo bench -p ringmaster-coordinator --bench control_plane --
//! [--workers 1000,10000] [--seconds 30] [--streams-per-conn 100]
//! [--settle-secs 3] [--probe-ms 20] [--snapshot-secs 3] [--margin-ms 100]
//! [--register-timeout-secs 180] [--coordinator-bin PATH] [--log-dir DIR]`.
//! Lines starting with `RESULT` are for scripts, `key=value` pairs after
//! `RESULT control-plane`.

use anyhow::{Context, bail};
use ringmaster_common::worker::Device;
use ringmaster_proto::pb::{
    self, WorkerMessage, agent_client::AgentClient, control_client::ControlClient,
};
use ringmaster_proto::{self as proto, Registration, WorkerReport};
use ringmaster_tests::etcd::EtcdProcess;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

/// One millisecond in µs: the resolution of the coordinator's ages.
const MS: u64 = 1000;
/// Send times kept per worker; covers several intervals of coordinator lag.
const HISTORY: usize = 8;
/// Sessions being set up at once, so that a burst of 10,000 does not
/// overflow the listen backlog when every worker has its own connection.
const REGISTER_CONCURRENCY: usize = 256;
/// How long the idle coordinator is probed before any worker arrives.
const IDLE_PROBE: Duration = Duration::from_secs(2);
/// How long a stopping coordinator gets before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long the departure of every worker may take to show.
const DEPART_TIMEOUT: Duration = Duration::from_secs(60);

struct Args {
    workers: Vec<usize>,
    seconds: u64,
    streams_per_conn: usize,
    settle_secs: u64,
    probe_ms: u64,
    snapshot_secs: u64,
    margin_ms: u64,
    register_timeout_secs: u64,
    coordinator_bin: PathBuf,
    log_dir: PathBuf,
}

fn parse_args() -> Result<Args, String> {
    let root = ringmaster_tests::repo_root();
    let mut args = Args {
        workers: vec![1_000, 10_000],
        seconds: 30,
        streams_per_conn: 100,
        settle_secs: 3,
        probe_ms: 20,
        snapshot_secs: 3,
        margin_ms: 100,
        register_timeout_secs: 180,
        coordinator_bin: PathBuf::from(env!("CARGO_BIN_EXE_coordinator")),
        log_dir: root.join("run/bench-control-plane"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        // `cargo bench` passes `--bench` to every bench binary.
        if flag == "--bench" {
            continue;
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number = |v: &str| {
            v.trim()
                .parse::<usize>()
                .map_err(|e| format!("bad value {v:?} for {flag}: {e}"))
        };
        match flag.as_str() {
            "--workers" => args.workers = value.split(',').map(number).collect::<Result<_, _>>()?,
            "--seconds" => args.seconds = number(&value)? as u64,
            "--streams-per-conn" => args.streams_per_conn = number(&value)?,
            "--settle-secs" => args.settle_secs = number(&value)? as u64,
            "--probe-ms" => args.probe_ms = number(&value)? as u64,
            "--snapshot-secs" => args.snapshot_secs = number(&value)? as u64,
            "--margin-ms" => args.margin_ms = number(&value)? as u64,
            "--register-timeout-secs" => args.register_timeout_secs = number(&value)? as u64,
            "--coordinator-bin" => args.coordinator_bin = PathBuf::from(value),
            "--log-dir" => args.log_dir = PathBuf::from(value),
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if args.workers.is_empty() || args.workers.contains(&0) {
        return Err("--workers needs positive counts".into());
    }
    if args.streams_per_conn == 0 || args.seconds == 0 || args.probe_ms == 0 {
        return Err("--streams-per-conn, --seconds and --probe-ms must be positive".into());
    }
    if args.snapshot_secs == 0 {
        return Err("--snapshot-secs must be positive".into());
    }
    Ok(args)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("control_plane: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("control_plane: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs every N; `Ok(false)` when some run saw failures (they are printed).
fn run(args: &Args) -> anyhow::Result<bool> {
    if !args.coordinator_bin.is_file() {
        bail!(
            "{} is missing: build it with `cargo build --release -p ringmaster-coordinator`",
            args.coordinator_bin.display()
        );
    }
    std::fs::create_dir_all(&args.log_dir)
        .with_context(|| format!("failed to create {}", args.log_dir.display()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the async runtime")?;
    println!("== control plane: simulated workers on one coordinator on a fresh etcd per N ==");
    println!(
        "machine: {} cores, load average {}; {} s steady window per N, {} streams per HTTP/2 connection",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load_average(),
        args.seconds,
        args.streams_per_conn
    );
    let mut rows = Vec::new();
    for &n in &args.workers {
        println!();
        println!("-- N = {n} --");
        // A fresh etcd each time: nothing of the previous run (its records,
        // its coordinator's leadership) can show in this one.
        let etcd = Arc::new(EtcdProcess::start().context("failed to start etcd")?);
        let etcd_pid = find_etcd_pid(etcd.dir());
        let row = runtime.block_on(run_one(args, n, &etcd, etcd_pid))?;
        row.print_details();
        rows.push(row);
    }
    drop(runtime);
    println!();
    print_table(&rows);
    for row in &rows {
        row.print_result();
    }
    let ok = rows.iter().all(Row::clean);
    if !ok {
        println!("control_plane: some runs saw failures (see `problems` above)");
    }
    Ok(ok)
}

/// Everything measured for one N.
struct Row {
    n: usize,
    conns: usize,
    registered: usize,
    register_failed: usize,
    register_secs: f64,
    register_cores: f64,
    window_secs: f64,
    coordinator_cores: f64,
    etcd_cores: Option<f64>,
    harness_cores: f64,
    beats_per_sec: f64,
    register_writes: f64,
    steady_writes_per_sec: f64,
    steady_revisions_per_sec: f64,
    steady_proposals_per_sec: f64,
    steady_lease_renewals_per_sec: f64,
    depart_writes: f64,
    depart_secs: f64,
    departed: bool,
    idle_get_job: Stats,
    idle_list_jobs: Stats,
    get_job: Stats,
    list_jobs: Stats,
    probe_errors: usize,
    delay_lo: Stats,
    delay_hi: Stats,
    in_flight: usize,
    unprocessed: usize,
    snapshot_rtt: Stats,
    max_age_ms: u64,
    lost: usize,
    problems: Vec<String>,
}

impl Row {
    fn clean(&self) -> bool {
        self.problems.is_empty()
    }

    fn print_details(&self) {
        println!(
            "registration: {}/{} workers in {:.2} s ({:.0}/s), {} failed; coordinator CPU {:.3} cores; etcd key writes during it: {}",
            self.registered,
            self.n,
            self.register_secs,
            self.registered as f64 / self.register_secs.max(1e-9),
            self.register_failed,
            self.register_cores,
            self.register_writes
        );
        println!(
            "steady window {:.1} s: {:.0} heartbeats/s sent; CPU cores: coordinator {:.3}, etcd {}, harness {:.3}",
            self.window_secs,
            self.beats_per_sec,
            self.coordinator_cores,
            self.etcd_cores
                .map_or_else(|| "n/a".to_string(), |c| format!("{c:.3}")),
            self.harness_cores
        );
        println!(
            "etcd per second: key writes (put+delete) {:.2}, write txns (revision) {:.2}, raft proposals {:.2}, lease renewals {:.2}",
            self.steady_writes_per_sec,
            self.steady_revisions_per_sec,
            self.steady_proposals_per_sec,
            self.steady_lease_renewals_per_sec
        );
        println!(
            "control-loop round trip, GetJob(unknown) → NotFound: idle p50 {:.2} p99 {:.2} ms; under load p50 {:.2} p99 {:.2} max {:.2} ms ({} probes, {} errors)",
            self.idle_get_job.p50,
            self.idle_get_job.p99,
            self.get_job.p50,
            self.get_job.p99,
            self.get_job.max,
            self.get_job.count,
            self.probe_errors
        );
        println!(
            "control round trip with a reply body, ListJobs: idle p50 {:.2} p99 {:.2} ms; under load p50 {:.2} p99 {:.2} ms",
            self.idle_list_jobs.p50,
            self.idle_list_jobs.p99,
            self.list_jobs.p50,
            self.list_jobs.p99
        );
        println!(
            "heartbeat send→seen (coordinator view, {} samples, {} in flight skipped, {} unseen after the margin): p50 in [{:.2}, {:.2}] ms, p99 in [{:.2}, {:.2}] ms; ListWorkers p50 {:.2} p99 {:.2} ms; max age {} ms",
            self.delay_hi.count,
            self.in_flight,
            self.unprocessed,
            self.delay_lo.p50,
            self.delay_hi.p50,
            self.delay_lo.p99,
            self.delay_hi.p99,
            self.snapshot_rtt.p50,
            self.snapshot_rtt.p99,
            self.max_age_ms
        );
        println!(
            "departure (every session closed at once): {} after {:.2} s; etcd key writes during it: {}",
            if self.departed {
                "every worker gone from ListWorkers"
            } else {
                "workers still listed"
            },
            self.depart_secs,
            self.depart_writes
        );
        for p in &self.problems {
            println!("problem: {p}");
        }
    }

    fn print_result(&self) {
        println!(
            "RESULT control-plane n={} conns={} registered={} register_s={:.3} coordinator_cores={:.4} \
             etcd_writes_per_s={:.3} etcd_write_txns_per_s={:.3} register_writes={} depart_writes={} \
             loop_rtt_p50_ms={:.3} loop_rtt_p99_ms={:.3} list_jobs_p50_ms={:.3} list_jobs_p99_ms={:.3} \
             beat_delay_p50_ms={:.3} beat_delay_p99_ms={:.3} beat_delay_p99_lo_ms={:.3} lost={} problems={}",
            self.n,
            self.conns,
            self.registered,
            self.register_secs,
            self.coordinator_cores,
            self.steady_writes_per_sec,
            self.steady_revisions_per_sec,
            self.register_writes,
            self.depart_writes,
            self.get_job.p50,
            self.get_job.p99,
            self.list_jobs.p50,
            self.list_jobs.p99,
            self.delay_hi.p50,
            self.delay_hi.p99,
            self.delay_lo.p99,
            self.lost,
            self.problems.len()
        );
    }
}

fn print_table(rows: &[Row]) {
    println!(
        "{:>6} {:>5} {:>7} {:>7} {:>7} {:>8} {:>9} {:>15} {:>15} {:>15} {:>4}",
        "N",
        "conns",
        "reg s",
        "beats/s",
        "coord",
        "etcd w/s",
        "etcd tx/s",
        "loop p50/p99",
        "beat p50 lo-hi",
        "beat p99 lo-hi",
        "lost"
    );
    for r in rows {
        println!(
            "{:>6} {:>5} {:>7.2} {:>7.0} {:>7.3} {:>8.2} {:>9.2} {:>15} {:>15} {:>15} {:>4}",
            r.n,
            r.conns,
            r.register_secs,
            r.beats_per_sec,
            r.coordinator_cores,
            r.steady_writes_per_sec,
            r.steady_revisions_per_sec,
            format!("{:.2}/{:.2}", r.get_job.p50, r.get_job.p99),
            format!("{:.1}-{:.1}", r.delay_lo.p50, r.delay_hi.p50),
            format!("{:.1}-{:.1}", r.delay_lo.p99, r.delay_hi.p99),
            r.lost
        );
    }
    println!(
        "coord: coordinator CPU cores in the steady window; etcd w/s: key puts+deletes per second, tx/s: \
         write txns (revisions) per second;\nloop: GetJob round trip through the control loop, ms; \
         beat: heartbeat send→seen by the coordinator, bounds in ms"
    );
}

async fn run_one(
    args: &Args,
    n: usize,
    etcd: &Arc<EtcdProcess>,
    etcd_pid: Option<u32>,
) -> anyhow::Result<Row> {
    let mut problems = Vec::new();
    let conns = n.div_ceil(args.streams_per_conn);
    check_fd_limit(conns, &mut problems);
    let log = args.log_dir.join(format!("coordinator-{n}.log"));
    let mut coordinator = CoordinatorProcess::start(&args.coordinator_bin, etcd, &log)?;
    let url = format!("http://{}", coordinator.addr);
    let endpoint = Endpoint::from_shared(url.clone())
        .context("bad coordinator url")?
        .connect_timeout(Duration::from_secs(10));
    let probe_interval = Duration::from_millis(args.probe_ms);
    wait_serving(&endpoint).await.with_context(|| {
        format!(
            "the coordinator did not start serving; see {}",
            log.display()
        )
    })?;

    let idle = on_own_thread({
        let endpoint = endpoint.clone();
        async move {
            let control = control_client(&endpoint).await?;
            Ok(probe(control, probe_interval, Instant::now() + IDLE_PROBE).await)
        }
    })
    .await?;

    // Registration ramp.
    let fleet = Arc::new(Fleet::new(n));
    let before_register = etcd_counters(etcd).await?;
    let coordinator_pid = coordinator.child.id();
    let cpu_register = CpuSample::take(coordinator_pid, etcd_pid)?;
    let gate = Arc::new(Semaphore::new(REGISTER_CONCURRENCY));
    let channels: Vec<Channel> = (0..conns).map(|_| endpoint.connect_lazy()).collect();
    let start = Instant::now();
    let agents: Vec<_> = (0..n)
        .map(|i| {
            let channel = channels[i % conns].clone();
            tokio::spawn(agent(i, channel, fleet.clone(), gate.clone()))
        })
        .collect();
    let deadline = start + Duration::from_secs(args.register_timeout_secs);
    while fleet.registered.load(Ordering::Relaxed) + fleet.failed.load(Ordering::Relaxed) < n
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let register_secs = start.elapsed().as_secs_f64();
    let registered = fleet.registered.load(Ordering::Relaxed);
    let register_failed = fleet.failed.load(Ordering::Relaxed);
    if registered < n {
        problems.push(format!(
            "only {registered} of {n} workers registered within {} s ({register_failed} failed{})",
            args.register_timeout_secs,
            fleet.first_error_suffix()
        ));
    }
    let after_register = etcd_counters(etcd).await?;
    let cpu_registered = CpuSample::take(coordinator_pid, etcd_pid)?;
    tokio::time::sleep(Duration::from_secs(args.settle_secs)).await;

    // Steady window.
    let cpu0 = CpuSample::take(coordinator_pid, etcd_pid)?;
    let counters0 = etcd_counters(etcd).await?;
    let beats0 = fleet.beats.load(Ordering::Relaxed);
    let lost0 = fleet.lost.load(Ordering::Relaxed);
    let until = Instant::now() + Duration::from_secs(args.seconds);
    let (load, views) = on_own_thread({
        let endpoint = endpoint.clone();
        let fleet = fleet.clone();
        let every = Duration::from_secs(args.snapshot_secs);
        let margin = Duration::from_millis(args.margin_ms);
        async move {
            let control = control_client(&endpoint).await?;
            let snapshot_client = control_client(&endpoint).await?;
            Ok(tokio::join!(
                probe(control, probe_interval, until),
                snapshots(snapshot_client, &fleet, every, margin, until)
            ))
        }
    })
    .await?;
    let cpu1 = CpuSample::take(coordinator_pid, etcd_pid)?;
    let counters1 = etcd_counters(etcd).await?;
    let beats1 = fleet.beats.load(Ordering::Relaxed);
    let lost = fleet.lost.load(Ordering::Relaxed);
    let window_secs = cpu1.wall.duration_since(cpu0.wall).as_secs_f64();
    if lost > 0 {
        problems.push(format!(
            "{lost} sessions ended while beating ({} during the steady window){}",
            lost - lost0,
            fleet.first_error_suffix()
        ));
    }
    if let Some(status) = coordinator.child.try_wait()? {
        problems.push(format!(
            "the coordinator exited with {status}; see {}",
            log.display()
        ));
    }
    if idle.errors > 0 {
        problems.push(format!("{} idle control-loop probes failed", idle.errors));
    }
    if load.errors > 0 {
        problems.push(format!("{} control-loop probes failed", load.errors));
    }
    if let Some(e) = &views.error {
        problems.push(format!("ListWorkers snapshot failed: {e}"));
    }
    if views.workers_seen.iter().any(|&seen| seen < registered) {
        problems.push(format!(
            "ListWorkers listed fewer than the {registered} registered workers: {:?}",
            views.workers_seen
        ));
    }

    // Departure: every session closes at once.
    for a in &agents {
        a.abort();
    }
    let depart_start = Instant::now();
    let departed = wait_departed(&endpoint).await;
    let depart_secs = depart_start.elapsed().as_secs_f64();
    if !departed {
        problems.push(format!(
            "workers still listed {} s after every session closed",
            DEPART_TIMEOUT.as_secs()
        ));
    }
    let after_depart = etcd_counters(etcd).await?;
    drop(channels);
    coordinator.stop();

    let per_sec = |f: fn(&EtcdCounters) -> f64| (f(&counters1) - f(&counters0)) / window_secs;
    let clk = clock_ticks_per_sec();
    Ok(Row {
        n,
        conns,
        registered,
        register_failed,
        register_secs,
        register_cores: cpu_registered.coordinator_cores_since(&cpu_register),
        window_secs,
        coordinator_cores: cpu1.coordinator_cores_since(&cpu0),
        etcd_cores: cpu1
            .etcd
            .zip(cpu0.etcd)
            .map(|(b, a)| (b - a) / clk / window_secs),
        harness_cores: (cpu1.harness - cpu0.harness) / clk / window_secs,
        beats_per_sec: (beats1 - beats0) as f64 / window_secs,
        register_writes: after_register.writes() - before_register.writes(),
        steady_writes_per_sec: per_sec(EtcdCounters::writes),
        steady_revisions_per_sec: per_sec(|c| c.revision),
        steady_proposals_per_sec: per_sec(|c| c.proposals),
        steady_lease_renewals_per_sec: per_sec(|c| c.lease_renewals),
        depart_writes: after_depart.writes() - counters1.writes(),
        depart_secs,
        departed,
        idle_get_job: Stats::of(idle.get_job_ms),
        idle_list_jobs: Stats::of(idle.list_jobs_ms),
        get_job: Stats::of(load.get_job_ms),
        list_jobs: Stats::of(load.list_jobs_ms),
        probe_errors: load.errors,
        delay_lo: Stats::of(views.delay_lo_ms),
        delay_hi: Stats::of(views.delay_hi_ms),
        in_flight: views.in_flight,
        unprocessed: views.unprocessed,
        snapshot_rtt: Stats::of(views.rtts_ms),
        max_age_ms: views.max_age_ms,
        lost,
        problems,
    })
}

/// Warns when this process may run out of file descriptors (the
/// coordinator inherits the same limit).
fn check_fd_limit(conns: usize, problems: &mut Vec<String>) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return;
    }
    let need = conns as u64 + 256;
    if limit.rlim_cur < need {
        problems.push(format!(
            "open-file limit {} is below the {need} this run needs; raise it with `ulimit -n` (scripts/bench-control-plane does)",
            limit.rlim_cur
        ));
    }
}

/// Shared state of the simulated workers, read by the measuring thread.
struct Fleet {
    base: Instant,
    slots: Vec<Slot>,
    registered: AtomicUsize,
    failed: AtomicUsize,
    lost: AtomicUsize,
    beats: AtomicU64,
    first_error: Mutex<Option<String>>,
}

/// One worker's recent send times, in µs since `Fleet::base` plus one
/// (0: no send yet), written only by that worker's task.
struct Slot {
    sends: [AtomicU64; HISTORY],
    count: AtomicU64,
}

impl Fleet {
    fn new(n: usize) -> Self {
        Fleet {
            base: Instant::now(),
            slots: (0..n)
                .map(|_| Slot {
                    sends: std::array::from_fn(|_| AtomicU64::new(0)),
                    count: AtomicU64::new(0),
                })
                .collect(),
            registered: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
            lost: AtomicUsize::new(0),
            beats: AtomicU64::new(0),
            first_error: Mutex::new(None),
        }
    }

    fn now_us(&self) -> u64 {
        self.base.elapsed().as_micros() as u64
    }

    fn record_send(&self, i: usize) {
        let slot = &self.slots[i];
        let k = slot.count.fetch_add(1, Ordering::Relaxed);
        slot.sends[k as usize % HISTORY].store(self.now_us() + 1, Ordering::Relaxed);
        self.beats.fetch_add(1, Ordering::Relaxed);
    }

    /// Worker `i`'s send times (µs since base), unordered.
    fn sends(&self, i: usize) -> impl Iterator<Item = u64> + '_ {
        self.slots[i]
            .sends
            .iter()
            .map(|s| s.load(Ordering::Relaxed))
            .filter(|&s| s != 0)
            .map(|s| s - 1)
    }

    fn note_error(&self, e: String) {
        let mut first = self.first_error.lock().unwrap_or_else(|p| p.into_inner());
        first.get_or_insert(e);
    }

    fn first_error_suffix(&self) -> String {
        let first = self.first_error.lock().unwrap_or_else(|p| p.into_inner());
        first
            .as_ref()
            .map(|e| format!("; first error: {e}"))
            .unwrap_or_default()
    }
}

/// Where in one interval worker `i` beats: a low-discrepancy spread in
/// [0, 1) (the golden-ratio sequence), the same on every run.
fn phase(i: usize) -> f64 {
    let x = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11;
    x as f64 / (1u64 << 53) as f64
}

/// One simulated worker: registers, then beats until aborted or until the
/// coordinator ends the session.
async fn agent(i: usize, channel: Channel, fleet: Arc<Fleet>, gate: Arc<Semaphore>) {
    let permit = gate.acquire_owned().await;
    let (tx, rx) = mpsc::channel::<WorkerMessage>(8);
    let register = WorkerMessage::from(WorkerReport::Register(Registration {
        name: format!("bench-{i}"),
        host: "bench".into(),
        device: Device::Cpu,
        data_addr: "127.0.0.1:9".into(),
        threads: 1,
        current: None,
        instance: None,
    }));
    let registered = async {
        tx.send(register).await?;
        let mut inbound = AgentClient::new(channel)
            .session(ReceiverStream::new(rx))
            .await
            .context("session refused")?
            .into_inner();
        let reply = inbound
            .message()
            .await
            .context("no registration reply")?
            .map(proto::Command::try_from);
        match reply {
            Some(Ok(proto::Command::Registered(r))) => anyhow::Ok((inbound, r)),
            other => bail!("expected Registered, got {other:?}"),
        }
    }
    .await;
    drop(permit);
    let (mut inbound, reply) = match registered {
        Ok(r) => r,
        Err(e) => {
            fleet.note_error(format!("worker {i} could not register: {e:#}"));
            fleet.failed.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    fleet.registered.fetch_add(1, Ordering::Relaxed);
    let interval = reply.heartbeat_interval.max(Duration::from_millis(1));
    let first = tokio::time::Instant::now() + interval.mul_f64(phase(i));
    let mut tick = tokio::time::interval_at(first, interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let why = loop {
        tokio::select! {
            _ = tick.tick() => {
                fleet.record_send(i);
                let beat = WorkerMessage::from(WorkerReport::Heartbeat);
                if tx.send(beat).await.is_err() {
                    break "the request stream closed".to_string();
                }
            }
            m = inbound.message() => match m {
                // No job is ever submitted, so nothing else is expected; a
                // command would simply be ignored.
                Ok(Some(_)) => {}
                Ok(None) => break "the coordinator closed the session".to_string(),
                Err(status) => break format!("session error: {status}"),
            },
        }
    };
    fleet.note_error(format!("worker {i} ({}): {why}", reply.worker));
    fleet.lost.fetch_add(1, Ordering::Relaxed);
}

async fn control_client(endpoint: &Endpoint) -> anyhow::Result<ControlClient<Channel>> {
    let channel = endpoint
        .connect()
        .await
        .context("failed to connect to the coordinator")?;
    Ok(ControlClient::new(channel).max_decoding_message_size(256 << 20))
}

/// Runs `fut` on a current-thread runtime of its own OS thread, so that its
/// timestamps do not queue behind thousands of worker tasks.
async fn on_own_thread<T: Send + 'static>(
    fut: impl Future<Output = anyhow::Result<T>> + Send + 'static,
) -> anyhow::Result<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("measure".into())
        .spawn(move || {
            let result = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("failed to start the measuring runtime")
                .and_then(|rt| rt.block_on(fut));
            let _ = tx.send(result);
        })
        .context("failed to start the measuring thread")?;
    rx.await.context("the measuring thread panicked")?
}

/// The job id the probe asks for; no job ever has it.
const PROBE_JOB: &str = "control-plane-bench-no-such-job";

#[derive(Default)]
struct Probes {
    /// `GetJob` of an unknown job: through the control loop and back as a
    /// `NotFound` status, which is one HTTP/2 HEADERS frame.
    get_job_ms: Vec<f64>,
    /// `ListJobs` (no jobs): the same path, but a reply with a body, which
    /// the coordinator writes as more than one TCP segment.
    list_jobs_ms: Vec<f64>,
    errors: usize,
}

/// Control-loop round trips, one call at a time, every `every`.
async fn probe(mut control: ControlClient<Channel>, every: Duration, until: Instant) -> Probes {
    let mut out = Probes::default();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while Instant::now() < until {
        tick.tick().await;
        let t0 = Instant::now();
        let get = control
            .get_job(pb::GetJobRequest {
                job_id: PROBE_JOB.into(),
            })
            .await;
        match get {
            Err(status) if status.code() == tonic::Code::NotFound => {
                out.get_job_ms.push(t0.elapsed().as_secs_f64() * 1e3)
            }
            _ => out.errors += 1,
        }
        let t0 = Instant::now();
        match control.list_jobs(pb::ListJobsRequest {}).await {
            Ok(_) => out.list_jobs_ms.push(t0.elapsed().as_secs_f64() * 1e3),
            Err(_) => out.errors += 1,
        }
    }
    out
}

#[derive(Default)]
struct Views {
    delay_lo_ms: Vec<f64>,
    delay_hi_ms: Vec<f64>,
    /// Workers skipped because they sent within the margin before the call.
    in_flight: usize,
    /// Beats sent more than the margin before the call and not yet processed.
    unprocessed: usize,
    rtts_ms: Vec<f64>,
    max_age_ms: u64,
    workers_seen: Vec<usize>,
    error: Option<String>,
}

/// The coordinator's view of every worker's last heartbeat, every `every`,
/// turned into bounds on the send→processed delay (see the module doc).
async fn snapshots(
    mut control: ControlClient<Channel>,
    fleet: &Fleet,
    every: Duration,
    margin: Duration,
    until: Instant,
) -> Views {
    let mut out = Views::default();
    let margin_us = margin.as_micros() as u64;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate: start half an interval in instead, so
    // the snapshots fall inside the window.
    tick.tick().await;
    tokio::time::sleep(every / 2).await;
    while Instant::now() < until {
        let t0 = fleet.now_us();
        let reply = control.list_workers(pb::ListWorkersRequest {}).await;
        let t1 = fleet.now_us();
        let workers = match reply {
            Ok(r) => r.into_inner().workers,
            Err(status) => {
                out.error.get_or_insert(status.to_string());
                tick.tick().await;
                continue;
            }
        };
        out.rtts_ms.push((t1 - t0) as f64 / 1e3);
        out.workers_seen.push(workers.len());
        // (last send, age) of every worker not in flight, all in µs.
        let mut settled = Vec::with_capacity(workers.len());
        for w in &workers {
            out.max_age_ms = out.max_age_ms.max(w.last_heartbeat_ms_ago);
            let Some(i) = w
                .name
                .strip_prefix("bench-")
                .and_then(|s| s.parse::<usize>().ok())
                .filter(|&i| i < fleet.slots.len())
            else {
                continue;
            };
            // Sends after t1 cannot show in this reply.
            let Some(last) = fleet.sends(i).filter(|&s| s <= t1).max() else {
                continue; // its last message is the registration
            };
            if last + margin_us > t0 {
                out.in_flight += 1;
                continue;
            }
            settled.push((last, w.last_heartbeat_ms_ago * 1000));
        }
        // The loop computed every age at one moment Ts in [t0, t1], from
        // whole-ms clocks: a worker was last seen at P in
        // [Ts − age − 1 ms, Ts − age + 1 ms]. A worker certainly seen after
        // its last send S (P ≥ t0 − age − 1 ms > S) also gives
        // Ts ≥ S + age − 1 ms, which tightens the lower end.
        let ts_lo = settled
            .iter()
            .filter(|&&(last, age)| t0 > last + age + MS)
            .map(|&(last, age)| (last + age).saturating_sub(MS))
            .fold(t0, u64::max)
            .min(t1);
        for (last, age) in settled {
            let lo = ts_lo.saturating_sub(age + MS);
            let hi = (t1 + MS).saturating_sub(age);
            if hi >= last {
                out.delay_lo_ms.push(lo.saturating_sub(last) as f64 / 1e3);
                out.delay_hi_ms.push((hi - last) as f64 / 1e3);
            } else {
                // Not seen yet, at least `margin` after it was sent.
                out.unprocessed += 1;
                out.delay_lo_ms.push((t0 - last) as f64 / 1e3);
                out.delay_hi_ms.push(f64::INFINITY);
            }
        }
        tick.tick().await;
    }
    out
}

/// How long a coordinator may take to serve (to win the election).
const SERVE_TIMEOUT: Duration = Duration::from_secs(60);

/// Waits until the coordinator answers a control call from its loop: a
/// fresh one may first have to win the leader election.
async fn wait_serving(endpoint: &Endpoint) -> anyhow::Result<()> {
    let mut control = control_client(endpoint).await?;
    let deadline = Instant::now() + SERVE_TIMEOUT;
    loop {
        let reply = control
            .get_job(pb::GetJobRequest {
                job_id: PROBE_JOB.into(),
            })
            .await;
        match reply {
            Err(status) if status.code() == tonic::Code::NotFound => return Ok(()),
            Ok(_) => bail!("the coordinator knows a job named {PROBE_JOB}"),
            Err(status) if Instant::now() >= deadline => {
                bail!("still refusing after {SERVE_TIMEOUT:?}: {status}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Polls `ListWorkers` until it is empty or [`DEPART_TIMEOUT`] passes.
async fn wait_departed(endpoint: &Endpoint) -> bool {
    let Ok(mut control) = control_client(endpoint).await else {
        return false;
    };
    let deadline = Instant::now() + DEPART_TIMEOUT;
    while Instant::now() < deadline {
        if let Ok(r) = control.list_workers(pb::ListWorkersRequest {}).await
            && r.get_ref().workers.is_empty()
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[derive(Clone, Copy, Default)]
struct Stats {
    count: usize,
    p50: f64,
    p99: f64,
    max: f64,
}

impl Stats {
    fn of(mut v: Vec<f64>) -> Self {
        if v.is_empty() {
            return Stats {
                p50: f64::NAN,
                p99: f64::NAN,
                max: f64::NAN,
                ..Stats::default()
            };
        }
        v.sort_by(f64::total_cmp);
        // Nearest rank.
        let at = |p: f64| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        Stats {
            count: v.len(),
            p50: at(0.50),
            p99: at(0.99),
            max: v[v.len() - 1],
        }
    }
}

/// The etcd counters the report uses, read from its `/metrics` page.
struct EtcdCounters {
    puts: f64,
    deletes: f64,
    revision: f64,
    proposals: f64,
    lease_renewals: f64,
}

impl EtcdCounters {
    fn writes(&self) -> f64 {
        self.puts + self.deletes
    }
}

async fn etcd_counters(etcd: &Arc<EtcdProcess>) -> anyhow::Result<EtcdCounters> {
    let etcd = etcd.clone();
    tokio::task::spawn_blocking(move || {
        let read = |name: &str| -> anyhow::Result<f64> {
            etcd.metric(name)
                .with_context(|| format!("failed to read etcd's {name}"))?
                .with_context(|| format!("etcd's /metrics has no {name}"))
        };
        Ok(EtcdCounters {
            puts: read("etcd_mvcc_put_total")?,
            deletes: read("etcd_mvcc_delete_total")?,
            revision: read("etcd_debugging_mvcc_current_revision")?,
            proposals: read("etcd_server_proposals_committed_total")?,
            lease_renewals: read("etcd_debugging_lease_renewed_total")?,
        })
    })
    .await
    .context("the etcd metrics reader panicked")?
}

/// CPU time in clock ticks of the coordinator, etcd and this process.
struct CpuSample {
    wall: Instant,
    coordinator: f64,
    etcd: Option<f64>,
    harness: f64,
}

impl CpuSample {
    /// Cores the coordinator used on average since `earlier`.
    fn coordinator_cores_since(&self, earlier: &CpuSample) -> f64 {
        let wall = self.wall.duration_since(earlier.wall).as_secs_f64();
        (self.coordinator - earlier.coordinator) / clock_ticks_per_sec() / wall
    }

    fn take(coordinator: u32, etcd: Option<u32>) -> anyhow::Result<Self> {
        Ok(CpuSample {
            wall: Instant::now(),
            coordinator: cpu_ticks(&format!("/proc/{coordinator}/stat"))?,
            etcd: etcd.and_then(|pid| cpu_ticks(&format!("/proc/{pid}/stat")).ok()),
            harness: cpu_ticks("/proc/self/stat")?,
        })
    }
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(stat_path: &str) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(stat_path)
        .with_context(|| format!("failed to read {stat_path}"))?;
    // The command name (field 2) may hold spaces; fields after it start at 3.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .with_context(|| format!("malformed {stat_path}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> anyhow::Result<f64> {
        fields
            .get(n - 3)
            .and_then(|v| v.parse::<f64>().ok())
            .with_context(|| format!("malformed {stat_path}: field {n}"))
    };
    Ok(field(14)? + field(15)?)
}

fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "n/a".into())
}

/// The etcd process whose data directory lies under `dir`, found in /proc
/// (`EtcdProcess` does not expose its pid).
fn find_etcd_pid(dir: &Path) -> Option<u32> {
    let needle = dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        let cmdline = String::from_utf8_lossy(&cmdline);
        (cmdline.contains("--data-dir") && cmdline.contains(&needle)).then_some(pid)
    })
}

/// A `coordinator serve` child on an ephemeral port; killed on drop.
struct CoordinatorProcess {
    child: Child,
    addr: String,
}

impl CoordinatorProcess {
    fn start(bin: &Path, etcd: &EtcdProcess, log: &Path) -> anyhow::Result<Self> {
        let store = format!("etcd://{}", etcd.endpoint().trim_start_matches("http://"));
        let stderr = std::fs::File::create(log)
            .with_context(|| format!("failed to create {}", log.display()))?;
        let state_dir = log.with_extension("state");
        let mut child = Command::new(bin)
            .args(["serve", "--listen", "127.0.0.1:0", "--store", &store])
            .arg("--state-dir")
            .arg(&state_dir)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("failed to start {}", bin.display()))?;
        let stdout = child.stdout.take().context("no stdout pipe")?;
        let (tx, rx) = std::sync::mpsc::channel();
        // Reads the port line, then drains stdout until the process exits.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("coordinator listening on ") {
                    let _ = tx.send(addr.trim().to_string());
                }
            }
        });
        let mut process = CoordinatorProcess {
            child,
            addr: String::new(),
        };
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(addr) => process.addr = addr,
            Err(_) => bail!(
                "the coordinator did not report its address; see {}",
                log.display()
            ),
        }
        Ok(process)
    }

    /// SIGTERM (it resigns and stops serving), SIGKILL if it lingers.
    fn stop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on our own child's pid, which is not reaped yet.
            unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + STOP_GRACE;
            while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for CoordinatorProcess {
    fn drop(&mut self) {
        self.stop();
    }
}
