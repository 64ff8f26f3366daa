//! Architecture invariants of the control loop that show only in the order,
//! or the absence, of its effects. The loop runs in process with fake worker
//! sessions and a wrapped `MemoryStore`; every store write and every command
//! the loop puts on a session go into one ordered log.
//!
//! - Persist before acting: a new generation (with its members by rank) and
//!   a final state are in the store before any member hears of them; a
//!   checkpoint's commit is in the store before the job's step reports it,
//!   before retention drops an older one and before a worker is told to
//!   resume from it.
//! - Fencing: reports of an older generation (and a stale run a worker
//!   rejoins with) change neither the store nor what `GetJob` and `ListJobs`
//!   show, and commit no checkpoint.
//! - Heartbeats write nothing: sent through the real `Agent.Session` handler
//!   on a loopback port, for longer than the heartbeat timeout.
//!
//! Worker reports are built, and coordinator commands read, only in the
//! helpers at the top, so a change of the control loop's message types
//! touches them alone.

mod hooked_store;

use hooked_store::{Hook, Hooked};
use ringmaster_common::ids::{Generation, JobId, Rank, WorkerId};
use ringmaster_common::jobspec::JobSpec;
use ringmaster_common::now_ms;
use ringmaster_common::records::{self, CheckpointRecord, JobState, JobStatusRecord};
use ringmaster_common::worker::{Device, WorkerState};
use ringmaster_coordinator::control::{self, ControlConfig, ControlHandle, Msg};
use ringmaster_coordinator::server::{Role, Services};
use ringmaster_proto::pb::{self, agent_client::AgentClient};
use ringmaster_proto::{
    CheckpointReport, Command, CurrentRun, FailureCause, JobView, Note, Progress, Registration,
    RunId, RunOutcome, TrainingEnded, WorkerReport, WrittenCheckpoint,
};
use ringmaster_store::{Op, StateStore, keys};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

// ---- Worker reports and coordinator commands: the only code that builds
// ---- or reads the session's message types.

/// A command the coordinator sent, reduced to what these tests compare.
#[derive(Clone, Debug, PartialEq)]
enum Cmd {
    Registered,
    Start {
        generation: u64,
        rank: u32,
        resume: Vec<PathBuf>,
    },
    Abort {
        generation: u64,
    },
    Checkpoint {
        generation: u64,
    },
    /// Free workers load a running job's data; it changes no job state.
    Prepare,
}

fn command(c: Command) -> Cmd {
    match c {
        Command::Registered(_) => Cmd::Registered,
        Command::Start(s) => Cmd::Start {
            generation: s.run.generation.0,
            rank: s.rank.0,
            resume: s.resume_candidates,
        },
        Command::Abort(a) => Cmd::Abort {
            generation: a.run.generation.0,
        },
        Command::Checkpoint(c) => Cmd::Checkpoint {
            generation: c.run.generation.0,
        },
        Command::Prepare(_) => Cmd::Prepare,
    }
}

fn run(job: &JobId, generation: u64) -> RunId {
    RunId {
        job: job.clone(),
        generation: Generation(generation),
    }
}

fn registration(name: &str, data_addr: String, current: Option<CurrentRun>) -> Registration {
    Registration {
        name: name.into(),
        host: "test".into(),
        device: Device::Cpu,
        data_addr,
        threads: 1,
        current,
        instance: Some(name.into()),
    }
}

/// Registers a fake worker named `name` (a rejoin when `current` names the
/// run it was part of: job, generation, rank, step). Its session's
/// commands go into `rec`'s log.
async fn register(
    h: &ControlHandle,
    rec: &Recorder,
    name: &str,
    current: Option<(&JobId, u64, u32, u64)>,
) -> WorkerId {
    let (tx, mut rx) = mpsc::channel(64);
    // The inbox joins the log before the coordinator can send anything on
    // it, so no command can be logged later than the write that follows it.
    let port = rec.add_inbox(name, Box::new(move || rx.try_recv().ok().map(command)));
    let current = current.map(|(job, generation, rank, step)| CurrentRun {
        run: run(job, generation),
        rank: Rank(rank),
        step,
        parked: false,
    });
    let info = registration(name, format!("127.0.0.1:{port}"), current);
    // These sessions never beat: the tests' heartbeat timeout is long.
    let last_seen = Arc::new(AtomicU64::new(now_ms()));
    h.call(|r| Msg::Register(info, tx, last_seen, r))
        .await
        .expect("registration refused")
}

fn progress(
    job: &JobId,
    generation: u64,
    step: u64,
    total: u64,
    loss: Option<f64>,
) -> WorkerReport {
    WorkerReport::Progress(Progress {
        run: run(job, generation),
        step,
        epoch: 0,
        total_steps: total,
        metrics: loss.map(|l| ("loss".to_string(), l)).into_iter().collect(),
    })
}

fn checkpoint(job: &JobId, generation: u64, step: u64, dir: &Path, ok: bool) -> WorkerReport {
    let written = WrittenCheckpoint {
        dir: dir.to_path_buf(),
        bytes: 1,
        write_seconds: 0.0,
        blocked_seconds: 0.0,
    };
    WorkerReport::Checkpoint(CheckpointReport {
        run: run(job, generation),
        step,
        metrics: Default::default(),
        outcome: if ok {
            Ok(written)
        } else {
            Err("disk full".into())
        },
    })
}

fn ended(job: &JobId, generation: u64, success: bool, step: u64, reason: &str) -> WorkerReport {
    WorkerReport::Ended(TrainingEnded {
        run: run(job, generation),
        step,
        metrics: Default::default(),
        outcome: if success {
            RunOutcome::Succeeded { stopped: false }
        } else {
            RunOutcome::Failed {
                reason: reason.into(),
                cause: FailureCause::OwnWork,
            }
        },
    })
}

fn note(job: &JobId, generation: u64, text: &str) -> WorkerReport {
    WorkerReport::Note(Note {
        run: run(job, generation),
        text: text.into(),
    })
}

/// Hands a report to the loop the way a session task does.
fn send(h: &ControlHandle, from: &WorkerId, report: WorkerReport) {
    h.from_session(Msg::FromWorker(from.clone(), report));
}

/// A report as a real worker puts it on the wire (`Agent.Session`).
fn wire(report: WorkerReport) -> pb::WorkerMessage {
    pb::WorkerMessage::from(report)
}

/// A command as a real worker reads it off the wire.
fn unwire(msg: pb::CoordinatorMessage) -> Cmd {
    command(Command::try_from(msg).expect("a well-formed command"))
}

// ---- The ordered log of writes and commands.

/// A store record as written, decoded where a test looks inside it.
#[derive(Clone, Debug)]
enum Record {
    Status(JobStatusRecord),
    Checkpoint(CheckpointRecord),
    Other,
}

/// Something the coordinator did, in the order it did it.
#[derive(Clone, Debug)]
enum Event {
    Put { key: String, record: Record },
    Delete { key: String },
    Sent { to: String, cmd: Cmd },
}

impl Event {
    fn put(key: &str, value: &[u8]) -> Event {
        let record = match keys::parse_job_key(key) {
            Some((_, keys::JobKeyKind::Status)) => {
                Record::Status(records::decode(key, value).expect("a status record"))
            }
            Some((_, keys::JobKeyKind::Checkpoint(_))) => {
                Record::Checkpoint(records::decode(key, value).expect("a checkpoint record"))
            }
            _ => Record::Other,
        };
        Event::Put {
            key: key.into(),
            record,
        }
    }

    fn is_write(&self) -> bool {
        !matches!(self, Event::Sent { .. })
    }

    /// The status record this event wrote, if it wrote one.
    fn status(&self) -> Option<&JobStatusRecord> {
        match self {
            Event::Put {
                record: Record::Status(s),
                ..
            } => Some(s),
            _ => None,
        }
    }

    /// The checkpoint record this event wrote as committed, if any.
    fn committed(&self) -> Option<&CheckpointRecord> {
        match self {
            Event::Put {
                record: Record::Checkpoint(c),
                ..
            } if c.committed => Some(c),
            _ => None,
        }
    }

    /// `(to, generation, rank, resume candidates)` of a `StartTraining`.
    fn start(&self) -> Option<(&str, u64, u32, &[PathBuf])> {
        match self {
            Event::Sent {
                to,
                cmd:
                    Cmd::Start {
                        generation,
                        rank,
                        resume,
                    },
            } => Some((to, *generation, *rank, resume)),
            _ => None,
        }
    }

    /// `(to, generation)` of an `AbortTraining`.
    fn abort(&self) -> Option<(&str, u64)> {
        match self {
            Event::Sent {
                to,
                cmd: Cmd::Abort { generation },
            } => Some((to, *generation)),
            _ => None,
        }
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::Put {
                key,
                record: Record::Status(s),
            } => write!(
                f,
                "put {key}: {} generation {} step {} members {:?}",
                s.state.as_str(),
                s.generation,
                s.step,
                s.members
            ),
            Event::Put {
                key,
                record: Record::Checkpoint(c),
            } => write!(
                f,
                "put {key}: committed {} dir {}",
                c.committed,
                c.dir.display()
            ),
            Event::Put {
                key,
                record: Record::Other,
            } => write!(f, "put {key}"),
            Event::Delete { key } => write!(f, "delete {key}"),
            Event::Sent { to, cmd } => write!(f, "sent {cmd:?} to {to}"),
        }
    }
}

fn show(log: &[Event]) -> String {
    log.iter()
        .enumerate()
        .map(|(i, e)| format!("  {i:3}: {e}\n"))
        .collect()
}

/// Takes the next command off one fake worker's session, if one is there.
type Inbox = Box<dyn FnMut() -> Option<Cmd> + Send>;

/// The events so far, and the fake sessions whose commands join them.
#[derive(Default)]
struct Log {
    events: Vec<Event>,
    inboxes: Vec<(String, Inbox)>,
}

impl Log {
    /// Moves every command sent so far into the log. Runs before each write
    /// is logged: the control loop is one task, so a command it sent before
    /// a write lands in the log before that write, and one sent after it
    /// lands after.
    fn drain(&mut self) {
        let Log { events, inboxes } = self;
        for (name, inbox) in inboxes {
            while let Some(cmd) = inbox() {
                events.push(Event::Sent {
                    to: name.clone(),
                    cmd,
                });
            }
        }
    }
}

/// The log, shared by the store wrapper (inside the control loop's task)
/// and the test.
#[derive(Default)]
struct Recorder(Mutex<Log>);

impl Recorder {
    /// Adds a worker's session; returns a number unique to it.
    fn add_inbox(&self, name: &str, inbox: Inbox) -> usize {
        let mut log = self.0.lock().unwrap();
        log.inboxes.push((name.into(), inbox));
        9000 + log.inboxes.len()
    }

    fn write(&self, event: Event) {
        let mut log = self.0.lock().unwrap();
        log.drain();
        log.events.push(event);
    }

    /// The log so far.
    fn events(&self) -> Vec<Event> {
        let mut log = self.0.lock().unwrap();
        log.drain();
        log.events.clone()
    }

    /// Waits until an event at index `from` or later matches; its index.
    async fn wait(&self, from: usize, what: &str, pred: impl Fn(&Event) -> bool) -> usize {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let log = self.events();
            if let Some(i) = log.iter().skip(from).position(&pred) {
                return from + i;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not within 5 s; log:\n{}",
                show(&log)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits for the `StartTraining` of `generation` to each of `world`
    /// ranks; the receivers' names by rank, with the resume candidates.
    async fn starts(&self, generation: u64, world: usize) -> Vec<(String, Vec<PathBuf>)> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let log = self.events();
            let mut by_rank: BTreeMap<u32, (String, Vec<PathBuf>)> = BTreeMap::new();
            for (to, g, rank, resume) in log.iter().filter_map(Event::start) {
                if g == generation {
                    by_rank.insert(rank, (to.to_string(), resume.to_vec()));
                }
            }
            if by_rank.len() == world {
                return by_rank.into_values().collect();
            }
            assert!(
                Instant::now() < deadline,
                "no start of generation {generation} to {world} ranks within 5 s; log:\n{}",
                show(&log)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// The index of the first event that matches, or a panic showing the log.
#[track_caller]
fn first(log: &[Event], what: &str, pred: impl Fn(&Event) -> bool) -> usize {
    log.iter()
        .position(pred)
        .unwrap_or_else(|| panic!("never happened: {what}; log:\n{}", show(log)))
}

/// Asserts that the first event matching `earlier` precedes the first one
/// matching `later` (both must happen).
#[track_caller]
fn assert_before(
    log: &[Event],
    earlier: (&str, &dyn Fn(&Event) -> bool),
    later: (&str, &dyn Fn(&Event) -> bool),
) {
    let a = first(log, earlier.0, earlier.1);
    let b = first(log, later.0, later.1);
    assert!(
        a < b,
        "{} (event {a}) must come before {} (event {b}); log:\n{}",
        earlier.0,
        later.0,
        show(log)
    );
}

/// Asserts that `generation` was written as running before any of its
/// members was told to start.
#[track_caller]
fn assert_running_before_started(log: &[Event], generation: u64) {
    let running = format!("the status `running`, generation {generation}");
    let start = format!("the first StartTraining of generation {generation}");
    assert_before(
        log,
        (&running, &|e: &Event| {
            e.status()
                .is_some_and(|s| s.state == JobState::Running && s.generation == generation)
        }),
        (&start, &|e: &Event| {
            e.start().is_some_and(|s| s.1 == generation)
        }),
    );
}

/// A `MemoryStore` whose successful writes go into the log.
type Recording = Hooked<Arc<Recorder>>;

impl Hook for Arc<Recorder> {
    fn wrote(&self, ops: &[Op]) {
        for op in ops {
            match op {
                Op::Put { key, value } | Op::PutWithLease { key, value, .. } => {
                    self.write(Event::put(key, value))
                }
                Op::Delete { key } => self.write(Event::Delete { key: key.clone() }),
            }
        }
    }
}

/// Every job key and its value, as the store holds them now.
async fn stored_jobs(store: &Recording) -> BTreeMap<String, Vec<u8>> {
    let range = store.inner.range(&keys::jobs_prefix()).await.unwrap();
    range.into_iter().map(|(k, v)| (k, v.value)).collect()
}

// ---- The harness: a loop, its store and a job running on fake workers.

fn cfg() -> ControlConfig {
    ControlConfig {
        heartbeat_interval: Duration::from_millis(100),
        // Nobody is declared lost behind a test's back.
        heartbeat_timeout: Duration::from_secs(60),
        ..ControlConfig::default()
    }
}

fn spec(world: u32, checkpoints: &Path) -> JobSpec {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/digits-mlp.toml");
    let mut spec = JobSpec::from_toml(&std::fs::read_to_string(&path).unwrap(), &path).unwrap();
    spec.workers.min = world;
    spec.workers.max = world;
    spec.train.global_batch = 96;
    spec.checkpoint.dir = checkpoints.to_path_buf();
    // Retention acts on every commit after the first.
    spec.checkpoint.keep_last = Some(1);
    // A lost worker fails the job (and a user resumes it) unless a case
    // asks for in-place recovery.
    spec.fault.max_restarts = 0;
    spec
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap()
}

async fn job_view(h: &ControlHandle, id: &JobId) -> JobView {
    let id = id.to_string();
    h.call(|r| Msg::GetJob(id, r)).await.unwrap()
}

async fn wait_job(
    h: &ControlHandle,
    id: &JobId,
    what: &str,
    pred: impl Fn(&JobStatusRecord) -> bool,
) -> JobView {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = job_view(h, id).await;
        if pred(&s.status) {
            return s;
        }
        assert!(Instant::now() < deadline, "{what}: not within 5 s: {s:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The steps of the job's committed checkpoints, as `coordinator
/// checkpoints` gets them from the loop.
async fn committed(h: &ControlHandle, id: &JobId) -> Vec<u64> {
    let id = id.to_string();
    let c = h.call(|r| Msg::ListCheckpoints(id, r)).await.unwrap();
    c.committed.iter().map(|i| i.step).collect()
}

/// `(name, state)` of every registered worker.
async fn workers(h: &ControlHandle) -> Vec<(String, WorkerState)> {
    let list = h.call(Msg::ListWorkers).await.unwrap();
    list.into_iter()
        .map(|w| (w.name.clone(), w.state()))
        .collect()
}

struct Harness {
    h: ControlHandle,
    rec: Arc<Recorder>,
    store: Arc<Recording>,
    /// Session ids by worker name (the latest session of a name).
    ids: BTreeMap<String, WorkerId>,
    job: JobId,
    /// Worker names by rank in generation 1.
    ranks: Vec<String>,
    checkpoints: tempfile::TempDir,
}

/// A loop on a recording store, and a job of `world` ranks running in
/// generation 1 on fake workers `n0`, `n1`, ...
async fn running_job(world: usize) -> Harness {
    running_job_with(world, 0).await
}

/// [`running_job`] for a job that may re-form in place `max_restarts` times.
async fn running_job_with(world: usize, max_restarts: u32) -> Harness {
    let rec = Arc::new(Recorder::default());
    let store = Arc::new(Hooked::new(rec.clone()));
    let h = control::start(store.clone(), "recording".into(), cfg())
        .await
        .unwrap();
    let mut ids = BTreeMap::new();
    for i in 0..world {
        let name = format!("n{i}");
        ids.insert(name.clone(), register(&h, &rec, &name, None).await);
    }
    let checkpoints = tempfile::tempdir().unwrap();
    let mut spec = spec(world as u32, checkpoints.path());
    spec.fault.max_restarts = max_restarts;
    let job = h.call(|r| Msg::Submit(spec, None, r)).await.unwrap();
    let ranks = rec
        .starts(1, world)
        .await
        .into_iter()
        .map(|s| s.0)
        .collect();
    Harness {
        h,
        rec,
        store,
        ids,
        job,
        ranks,
        checkpoints,
    }
}

impl Harness {
    fn id(&self, name: &str) -> &WorkerId {
        &self.ids[name]
    }

    /// Where rank 0 would have written the checkpoint of `step`.
    fn dir(&self, step: u64) -> PathBuf {
        self.checkpoints
            .path()
            .join(self.job.as_str())
            .join(format!("step-{step}"))
    }

    /// Rank 0 of generation 1 reports a complete checkpoint at `step`;
    /// returns once the loop lists it as committed.
    async fn commit(&self, step: u64) {
        let report = checkpoint(&self.job, 1, step, &self.dir(step), true);
        send(&self.h, self.id(&self.ranks[0]), report);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !committed(&self.h, &self.job).await.contains(&step) {
            assert!(Instant::now() < deadline, "step {step} never committed");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Moves the job to generation 2 the way it happens to a user: rank 1's
    /// worker is lost, the job fails, rank 0 reports how its run ended, a
    /// fresh worker `n9` joins and the job is resumed from its newest
    /// committed checkpoint (there must be one). Returns generation 2's
    /// workers by rank, with the resume candidates each was given.
    async fn lose_rank_1_and_resume(&mut self) -> Vec<(String, Vec<PathBuf>)> {
        let (r0, r1) = (self.ranks[0].clone(), self.ranks[1].clone());
        let lost = self.id(&r1).clone();
        self.h
            .from_session(Msg::Disconnected(lost, "session closed".into()));
        wait_job(&self.h, &self.job, "failed", |s| {
            s.state == JobState::Failed
        })
        .await;
        let aborted = ended(&self.job, 1, false, 0, "aborted by the coordinator");
        send(&self.h, self.id(&r0), aborted);
        // Reports and requests reach the loop on separate queues: the end
        // must be handled (the worker free) before the resume is asked for.
        let deadline = Instant::now() + Duration::from_secs(5);
        while workers(&self.h)
            .await
            .contains(&(r0.clone(), WorkerState::Busy))
        {
            assert!(Instant::now() < deadline, "{r0} never became idle");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let n9 = register(&self.h, &self.rec, "n9", None).await;
        self.ids.insert("n9".into(), n9);
        let id = self.job.to_string();
        self.h.call(|r| Msg::Resume(id, r)).await.unwrap();
        self.rec.starts(2, 2).await
    }
}

// ---- (a) Persist before acting.

#[test]
fn a_generation_is_in_the_store_before_its_members_are_told_to_start() {
    rt().block_on(async {
        let t = running_job(2).await;
        let log = t.rec.events();
        let running = |e: &Event| {
            e.status()
                .is_some_and(|s| s.state == JobState::Running && s.generation == 1)
        };
        assert_before(
            &log,
            ("the status `running`, generation 1", &running),
            ("the first StartTraining of generation 1", &|e| {
                e.start().is_some_and(|s| s.1 == 1)
            }),
        );
        // The written assignment is the one the workers were given: the
        // worker that got rank r is the record's member r.
        let written = &log[first(&log, "", running)];
        assert_eq!(written.status().unwrap().members, t.ranks, "{written}");
    });
}

/// How a running job of two ranks ends in [`check_final`].
#[derive(Clone, Copy, Debug)]
enum Ending {
    CancelNow,
    /// Rank 0 reports that its run failed.
    RankFails,
    /// Rank 1's session breaks.
    WorkerLost,
}

/// The job's final state is written before any member is told to stop,
/// and the members still running are told.
async fn check_final(how: Ending) {
    let t = running_job(2).await;
    let (state, told) = match how {
        Ending::CancelNow => {
            let id = t.job.to_string();
            t.h.call(|r| Msg::Cancel(id, true, r)).await.unwrap();
            (JobState::Cancelled, vec![&t.ranks[0], &t.ranks[1]])
        }
        Ending::RankFails => {
            let report = ended(&t.job, 1, false, 0, "could not start training");
            send(&t.h, t.id(&t.ranks[0]), report);
            (JobState::Failed, vec![&t.ranks[1]])
        }
        Ending::WorkerLost => {
            let lost = t.id(&t.ranks[1]).clone();
            t.h.from_session(Msg::Disconnected(lost, "session closed".into()));
            (JobState::Failed, vec![&t.ranks[0]])
        }
    };
    wait_job(&t.h, &t.job, state.as_str(), |s| s.state == state).await;
    let log = t.rec.events();
    let written = first(&log, &format!("{how:?}: the final state"), |e| {
        e.status().is_some_and(|s| s.state == state)
    });
    for name in told {
        let abort = first(&log, &format!("{how:?}: an abort to {name}"), |e| {
            e.abort() == Some((name.as_str(), 1))
        });
        assert!(
            written < abort,
            "{how:?}: the final state (event {written}) must be written before {name} is told \
             to stop (event {abort}); log:\n{}",
            show(&log)
        );
    }
    let any_abort = first(&log, "an abort", |e| e.abort().is_some());
    assert!(written < any_abort, "{how:?}; log:\n{}", show(&log));
}

#[test]
fn a_final_state_is_in_the_store_before_members_are_told_to_stop() {
    rt().block_on(async {
        for how in [Ending::CancelNow, Ending::RankFails, Ending::WorkerLost] {
            check_final(how).await;
        }
    });
}

#[test]
fn a_checkpoint_is_committed_in_the_store_before_anything_acts_on_it() {
    rt().block_on(async {
        let mut t = running_job(2).await;
        t.commit(10).await;
        t.commit(20).await;
        // A write that failed is reported, and must never be committed.
        let rank0 = t.id(&t.ranks[0]).clone();
        send(&t.h, &rank0, checkpoint(&t.job, 1, 30, &t.dir(30), false));
        wait_job(&t.h, &t.job, "the failed checkpoint noted", |s| {
            s.events.iter().any(|e| e.contains("step 30 failed"))
        })
        .await;
        let gen2 = t.lose_rank_1_and_resume().await;
        let log = t.rec.events();
        let key = |step| keys::job_checkpoint(&t.job, step).unwrap();

        // The step a status reports is one the store has committed.
        assert_before(
            &log,
            ("the commit of step 10", &|e| {
                e.committed().is_some_and(|c| c.step == 10)
            }),
            ("a status at step 10 or later", &|e| {
                e.status().is_some_and(|s| s.step >= 10)
            }),
        );
        // Retention drops the older record only once the newer one is
        // committed.
        assert_before(
            &log,
            ("the commit of step 20", &|e| {
                e.committed().is_some_and(|c| c.step == 20)
            }),
            (
                "retention dropping step 10",
                &|e| matches!(e, Event::Delete { key: k } if *k == key(10)),
            ),
        );
        assert!(
            !log.iter()
                .any(|e| matches!(e, Event::Put { key: k, .. } if *k == key(30))),
            "a failed checkpoint was written; log:\n{}",
            show(&log)
        );
        // The new generation is written before its members hear of it ...
        assert_running_before_started(&log, 2);
        // ... and resumes from the newest committed checkpoint alone.
        for (name, resume) in &gen2 {
            assert_eq!(resume, &vec![t.dir(20)], "{name}");
        }
        // Every resume candidate a worker was given had been committed
        // (and not dropped since) when its start was sent.
        for (i, e) in log.iter().enumerate() {
            let Some((to, generation, _, resume)) = e.start() else {
                continue;
            };
            for dir in resume {
                let commit = log[..i]
                    .iter()
                    .rposition(|e| e.committed().is_some_and(|c| c.dir == *dir));
                let step = commit.and_then(|c| log[c].committed()).map(|c| c.step);
                let dropped = log[..i].iter().rposition(
                    |e| matches!(e, Event::Delete { key: k } if Some(k) == step.map(key).as_ref()),
                );
                assert!(
                    commit.is_some() && dropped < commit,
                    "{to} was told to resume generation {generation} from {}, which was not \
                     committed (event {i}); log:\n{}",
                    dir.display(),
                    show(&log)
                );
            }
        }
    });
}

// ---- (b) Fencing.

#[test]
fn reports_of_an_older_generation_change_nothing() {
    rt().block_on(async {
        let mut t = running_job(2).await;
        let (old0, old1) = (t.ranks[0].clone(), t.ranks[1].clone());
        send(&t.h, t.id(&old0), progress(&t.job, 1, 25, 1000, None));
        t.commit(20).await;
        let gen2 = t.lose_rank_1_and_resume().await;
        assert!(gen2.iter().any(|(name, _)| *name == old0), "{gen2:?}");

        // The lost worker rejoins, still reporting its generation-1 run: it
        // is told to stop that run, and is not adopted.
        let mark = t.rec.events().len();
        let rejoined = register(&t.h, &t.rec, &old1, Some((&t.job, 1, 1, 400))).await;
        t.rec
            .wait(mark, "the stale run is told to stop", |e| {
                e.abort() == Some((old1.as_str(), 1))
            })
            .await;

        let before_store = stored_jobs(&t.store).await;
        let before_view = job_view(&t.h, &t.job).await;
        assert_eq!(
            (before_view.status.state, before_view.status.generation),
            (JobState::Running, 2)
        );
        let before_list = t.h.call(Msg::ListJobs).await.unwrap();
        assert_eq!(before_list, vec![before_view.clone()]);
        let mark = t.rec.events().len();

        // Generation 1's reports, from each member of generation 2 (one of
        // them was rank 0 in both; whichever is rank 0 now is not fenced
        // off by its rank) and from the worker that rejoined.
        let mut senders: Vec<WorkerId> = gen2.iter().map(|(name, _)| t.id(name).clone()).collect();
        senders.push(rejoined);
        for from in &senders {
            send(&t.h, from, progress(&t.job, 1, 999, 5000, Some(7.0)));
            send(&t.h, from, checkpoint(&t.job, 1, 500, &t.dir(500), true));
            send(&t.h, from, ended(&t.job, 1, false, 999, "stale failure"));
            send(&t.h, from, ended(&t.job, 1, true, 999, ""));
        }
        // A current report after them: once it shows, the loop (one queue
        // for every session) has handled all of the above.
        let barrier = "generation 2 is training";
        let rank0 = t.id(&gen2[0].0).clone();
        send(&t.h, &rank0, note(&t.job, 2, barrier));
        let after_view = wait_job(&t.h, &t.job, "the barrier note", |s| {
            s.events.iter().any(|e| e == barrier)
        })
        .await;

        // The one write since the mark is the note's, on top of the status
        // as it was: state, generation, step, length and metrics unchanged.
        let log = t.rec.events();
        let writes: Vec<&Event> = log[mark..].iter().filter(|e| e.is_write()).collect();
        let status_key = keys::job_status(&t.job).unwrap();
        let mut expected: JobStatusRecord =
            records::decode(&status_key, &before_store[&status_key]).unwrap();
        expected.note(barrier);
        assert!(
            writes.len() == 1 && writes[0].status() == Some(&expected),
            "writes after the stale reports:\n{}",
            show(&log[mark..])
        );
        let mut after_store = stored_jobs(&t.store).await;
        after_store.insert(status_key.clone(), before_store[&status_key].clone());
        assert_eq!(after_store, before_store, "job keys changed");

        // What users see is unchanged, but for the note.
        let mut expected_view = before_view;
        expected_view.status.events.push(barrier.into());
        assert_eq!(after_view, expected_view);
        let after_list = t.h.call(Msg::ListJobs).await.unwrap();
        assert_eq!(after_list, vec![expected_view]);
        assert_eq!(committed(&t.h, &t.job).await, vec![20]);

        // Generation 2's members still hold their ranks; the rejoined
        // worker holds none.
        let mut states = workers(&t.h).await;
        states.sort_by(|a, b| a.0.cmp(&b.0));
        let mut expected_states: Vec<(String, WorkerState)> = gen2
            .iter()
            .map(|(name, _)| (name.clone(), WorkerState::Busy))
            .collect();
        expected_states.push((old1.clone(), WorkerState::Idle));
        expected_states.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(states, expected_states);
    });
}

// ---- (c) Heartbeats never write to the store.

/// Serves `Agent` for the loop behind `h` on a free loopback port.
async fn serve(h: ControlHandle) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let services = Services {
        role: Arc::new(std::sync::RwLock::new(Role::Leader(h))),
    };
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(pb::agent_server::AgentServer::new(services))
            .serve_with_incoming(incoming),
    );
    addr
}

#[test]
fn heartbeats_never_write_to_the_store() {
    rt().block_on(async {
        let rec = Arc::new(Recorder::default());
        let store = Arc::new(Hooked::new(rec.clone()));
        // The loop checks liveness every 5 ms; a worker whose beats went
        // unseen for 1 s would be declared lost (a write, and a failed job).
        let c = ControlConfig {
            heartbeat_interval: Duration::from_millis(10),
            heartbeat_timeout: Duration::from_secs(1),
            ..cfg()
        };
        let h = control::start(store.clone(), "recording".into(), c)
            .await
            .unwrap();
        let addr = serve(h.clone()).await;
        let mut client = AgentClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let (to_coordinator, outbound) = mpsc::channel(16);
        let register = WorkerReport::Register(registration("n0", "127.0.0.1:9000".into(), None));
        to_coordinator.send(wire(register)).await.unwrap();
        let mut inbound = client
            .session(ReceiverStream::new(outbound))
            .await
            .unwrap()
            .into_inner();
        let mut next = async || {
            let msg = tokio::time::timeout(Duration::from_secs(5), inbound.message())
                .await
                .expect("no command within 5 s")
                .expect("session broken")
                .expect("session closed");
            unwire(msg)
        };
        assert_eq!(next().await, Cmd::Registered);
        let checkpoints = tempfile::tempdir().unwrap();
        let spec = spec(1, checkpoints.path());
        let job = h.call(|r| Msg::Submit(spec, None, r)).await.unwrap();
        let Cmd::Start { generation, .. } = next().await else {
            panic!("expected the start of the job");
        };
        // The run's length is written once, with the first progress report.
        let report = progress(&job, generation, 1, 1000, None);
        to_coordinator.send(wire(report)).await.unwrap();
        wait_job(&h, &job, "step 1", |s| s.step == 1).await;
        let mark = rec.events().len();

        let beats = 150;
        for _ in 0..beats {
            to_coordinator
                .send(wire(WorkerReport::Heartbeat))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The session passes reports on in order: once this one shows,
        // every beat before it has been taken in.
        let report = progress(&job, generation, 2, 1000, None);
        to_coordinator.send(wire(report)).await.unwrap();
        let s = wait_job(&h, &job, "step 2", |s| s.step == 2).await;

        let log = rec.events();
        assert!(
            !log[mark..].iter().any(Event::is_write),
            "{beats} heartbeats wrote to the store:\n{}",
            show(&log[mark..])
        );
        // The beats kept the worker alive well past the heartbeat timeout.
        assert_eq!(
            (s.status.state, s.status.generation),
            (JobState::Running, generation)
        );
        assert_eq!(workers(&h).await, vec![("n0".into(), WorkerState::Busy)]);
    });
}

#[test]
fn the_last_generation_ending_late_does_not_fail_the_resumed_job() {
    rt().block_on(async {
        let mut t = running_job(2).await;
        t.commit(20).await;
        let (r0, r1) = (t.ranks[0].clone(), t.ranks[1].clone());
        t.h.from_session(Msg::Disconnected(
            t.id(&r1).clone(),
            "session closed".into(),
        ));
        wait_job(&t.h, &t.job, "failed", |s| s.state == JobState::Failed).await;
        let n9 = register(&t.h, &t.rec, "n9", None).await;
        t.ids.insert("n9".into(), n9);
        // The user resumes before rank 0 has reported how its (aborted)
        // run of generation 1 ended: the job is queued, still at
        // generation 1, waiting for rank 0's worker.
        let id = t.job.to_string();
        t.h.call(|r| Msg::Resume(id, r)).await.unwrap();
        let aborted = ended(&t.job, 1, false, 0, "aborted by the coordinator");
        send(&t.h, t.id(&r0), aborted);
        // That report frees the worker; it must not end the resumed job.
        t.rec.starts(2, 2).await;
        let s = job_view(&t.h, &t.job).await;
        assert_eq!(
            (s.status.state, s.status.generation),
            (JobState::Running, 2)
        );
    });
}

/// In-place recovery persists before acting too: `recovering` is in the
/// store before any member is told to leave its ring, and the re-formed
/// generation before any of its members starts.
#[test]
fn a_re_forming_job_is_in_the_store_before_its_members_are_told_anything() {
    rt().block_on(async {
        let mut t = running_job_with(2, 1).await;
        let spare = register(&t.h, &t.rec, "n9", None).await;
        t.ids.insert("n9".into(), spare);
        let (r0, r1) = (t.ranks[0].clone(), t.ranks[1].clone());
        t.h.from_session(Msg::Disconnected(
            t.id(&r1).clone(),
            "session closed".into(),
        ));
        let recovering = |e: &Event| {
            e.status()
                .is_some_and(|s| s.state == JobState::Recovering && s.generation == 1)
        };
        t.rec.wait(0, "the status `recovering`", recovering).await;
        let parked = WorkerReport::Parked(ringmaster_proto::Parked {
            run: run(&t.job, 1),
            step: 12,
            lost_peer: Some(Rank(1)),
            reason: "collective: lost peer rank 1".into(),
        });
        send(&t.h, t.id(&r0), parked);
        let starts = t.rec.starts(2, 2).await;
        assert_eq!(
            starts.iter().map(|s| s.0.as_str()).collect::<Vec<_>>(),
            [r0.as_str(), "n9"]
        );
        assert!(
            starts.iter().all(|s| s.1.is_empty()),
            "no checkpoint is read"
        );
        let log = t.rec.events();
        assert_before(
            &log,
            ("the status `recovering`", &recovering),
            ("the abort of generation 1 to the survivor", &|e| {
                e.abort().is_some_and(|(to, g)| to == r0 && g == 1)
            }),
        );
        assert_running_before_started(&log, 2);
        let s = t
            .rec
            .events()
            .iter()
            .rev()
            .find_map(|e| e.status().cloned());
        assert_eq!(s.map(|s| (s.restarts, s.step)), Some((1, 12)));
    });
}
