//! The control loop driven in process, with fake worker sessions: who is
//! blamed when a worker dies, deadlines that die with their generation,
//! workers that never report their end, duplicate names, why a queued job
//! waits, and how a job re-forms in place after a lost member. Each case is
//! one a user hit with the real binaries.

use ringmaster_common::ids::{Generation, JobId, Rank, WorkerId};
use ringmaster_common::jobspec::JobSpec;
use ringmaster_common::now_ms;
use ringmaster_common::records::{
    self, CheckpointRecord, CordonKind, JobRecord, JobState, JobStatusRecord,
};
use ringmaster_common::worker::{Device, WorkerState};
use ringmaster_coordinator::control::{
    self, ControlConfig, ControlError, ControlHandle, CordonAction, Msg,
};
use ringmaster_proto::{
    Command, CurrentRun, FailureCause, JobView, Metrics, Registration, RunId, RunOutcome,
    StartTraining, TrainingEnded, WorkerReport, WorkerView,
};
use ringmaster_store::{MemoryStore, StateStore, keys};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;
use tokio::sync::mpsc;

/// A worker as the control loop sees it: its id and its command stream.
struct FakeWorker {
    id: WorkerId,
    commands: mpsc::Receiver<Command>,
    /// Kept so the session stays "alive" (its heartbeat clock).
    _last_seen: Arc<AtomicU64>,
}

impl FakeWorker {
    /// The next command.
    async fn next(&mut self) -> Command {
        tokio::time::timeout(Duration::from_secs(5), self.commands.recv())
            .await
            .expect("no command within 5 s")
            .expect("session closed")
    }

    /// The next `StartTraining`, skipping anything else.
    async fn start(&mut self) -> StartTraining {
        loop {
            let next = tokio::time::timeout(Duration::from_secs(5), self.commands.recv())
                .await
                .expect("no command within 5 s")
                .expect("session closed");
            if let Command::Start(s) = next {
                return *s;
            }
        }
    }
}

fn cfg() -> ControlConfig {
    ControlConfig {
        heartbeat_interval: Duration::from_millis(100),
        heartbeat_timeout: Duration::from_secs(60),
        adopt_grace: Duration::from_millis(600),
        release_grace: Duration::from_millis(300),
        reconnect_grace: Duration::from_millis(200),
        ..ControlConfig::default()
    }
}

fn spec(min: u32) -> JobSpec {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/digits-mlp.toml");
    let mut spec = JobSpec::from_toml(&std::fs::read_to_string(&path).unwrap(), &path).unwrap();
    spec.workers.min = min;
    spec.workers.max = min;
    spec.train.global_batch = 96;
    // Most cases here are about failing (and blaming); recovery cases ask
    // for restarts themselves.
    spec.fault.max_restarts = 0;
    spec
}

async fn register(
    h: &ControlHandle,
    name: &str,
    instance: &str,
    current: Option<CurrentRun>,
) -> Result<FakeWorker, ControlError> {
    let (tx, mut rx) = mpsc::channel(64);
    let last_seen = Arc::new(AtomicU64::new(now_ms()));
    {
        // Heartbeats: the session task stamps this clock on every message.
        let clock = last_seen.clone();
        tokio::spawn(async move {
            loop {
                clock.store(now_ms(), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
    }
    let info = Registration {
        name: name.into(),
        host: "test".into(),
        device: Device::Cpu,
        data_addr: format!("127.0.0.1:{}", 9000 + name.len()),
        threads: 1,
        current,
        instance: Some(instance.into()),
    };
    let id = h
        .call(|r| Msg::Register(info, tx, last_seen.clone(), r))
        .await?;
    // `Registered` comes first.
    let first = rx.recv().await.unwrap();
    assert!(matches!(first, Command::Registered(_)), "{first:?}");
    Ok(FakeWorker {
        id,
        commands: rx,
        _last_seen: last_seen,
    })
}

/// How generation 1 of `job` ended on one rank: failed with `reason`.
fn failed(job: &JobId, reason: &str, cause: FailureCause) -> TrainingEnded {
    TrainingEnded {
        run: RunId {
            job: job.clone(),
            generation: Generation(1),
        },
        step: 0,
        metrics: Metrics::new(),
        outcome: RunOutcome::Failed {
            reason: reason.into(),
            cause,
        },
    }
}

/// A data-plane failure that names the lost peer.
fn peer_lost(job: &JobId, lost: u32, reason: &str) -> TrainingEnded {
    let cause = FailureCause::DataPlane {
        lost_peer: Some(Rank(lost)),
    };
    failed(job, reason, cause)
}

async fn report(h: &ControlHandle, w: &WorkerId, e: TrainingEnded) {
    h.from_session(Msg::FromWorker(w.clone(), WorkerReport::Ended(e)));
}

async fn job(h: &ControlHandle, id: &JobId) -> JobView {
    let id = id.to_string();
    h.call(|r| Msg::GetJob(id, r)).await.unwrap()
}

/// Why the job failed or was cancelled (empty while it has no reason).
fn reason(s: &JobView) -> &str {
    s.status.reason.as_deref().unwrap_or_default()
}

async fn wait_state(h: &ControlHandle, id: &JobId, state: JobState) -> JobView {
    for _ in 0..200 {
        let s = job(h, id).await;
        if s.status.state == state {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("job {id} never became {state}: {:?}", job(h, id).await);
}

async fn workers(h: &ControlHandle) -> Vec<WorkerView> {
    h.call(Msg::ListWorkers).await.unwrap()
}

/// A job of `names.len()` ranks running on fresh fake workers with those
/// names: the loop, the workers (each has received its start) and the job.
async fn running_job(c: ControlConfig, names: &[&str]) -> (ControlHandle, Vec<FakeWorker>, JobId) {
    let world = names.len() as u32;
    let store = Arc::new(MemoryStore::new());
    running_job_with(store, c, names, spec(world)).await
}

/// [`running_job`] with the given store and spec.
async fn running_job_with(
    store: Arc<MemoryStore>,
    c: ControlConfig,
    names: &[&str],
    spec: JobSpec,
) -> (ControlHandle, Vec<FakeWorker>, JobId) {
    let h = control::start(store, "mem".into(), c).await.unwrap();
    let mut ws = Vec::new();
    for name in names {
        ws.push(register(&h, name, name, None).await.unwrap());
    }
    let id = h.call(|r| Msg::Submit(spec, None, r)).await.unwrap();
    for w in &mut ws {
        w.start().await;
    }
    (h, ws, id)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap()
}

#[test]
fn a_dead_worker_is_blamed_even_when_a_neighbours_report_comes_first() {
    rt().block_on(async {
        let (h, ws, id) = running_job(cfg(), &["n0", "n1", "n2"]).await;
        // n2 (rank 2) dies. Its ring neighbours' reports race its session
        // break, and name a live worker: rank 1 saw rank 0's connection close
        // as the ring came down.
        let e = peer_lost(
            &id,
            0,
            "collective: peer rank 0 lost: ring connection closed",
        );
        report(&h, &ws[1].id, e).await;
        h.from_session(Msg::Disconnected(ws[2].id.clone(), "session closed".into()));
        let s = wait_state(&h, &id, JobState::Failed).await;
        assert_eq!(
            reason(&s),
            "worker n2 (rank 2) lost: session closed (no reconnect within 0.2 s)"
        );
    });
}

#[test]
fn without_a_session_break_the_reason_says_what_each_rank_reported() {
    rt().block_on(async {
        let mut c = cfg();
        c.heartbeat_timeout = Duration::from_millis(300);
        let (h, ws, id) = running_job(c, &["n0", "n1"]).await;
        for (rank, w) in ws.iter().enumerate() {
            let other = 1 - rank as u32;
            let e = peer_lost(&id, other, &format!("collective: peer rank {other} lost"));
            report(&h, &w.id, e).await;
        }
        // Both sessions stay open and keep beating: nobody is known dead.
        let s = wait_state(&h, &id, JobState::Failed).await;
        assert!(
            reason(&s).contains("n0 (rank 0) reported: collective: peer rank 1 lost")
                && reason(&s).contains("n1 (rank 1) reported: collective: peer rank 0 lost"),
            "{}",
            reason(&s)
        );
    });
}

#[test]
fn a_worker_that_never_reports_its_end_is_freed() {
    rt().block_on(async {
        let (h, ws, id) = running_job(cfg(), &["n0", "n1"]).await;
        // Rank 0 could not start; rank 1 (a worker that failed to start
        // too, say) never reports anything.
        let e = failed(
            &id,
            "could not start training: no thread",
            FailureCause::OwnWork,
        );
        report(&h, &ws[0].id, e).await;
        let s = wait_state(&h, &id, JobState::Failed).await;
        assert_eq!(
            reason(&s),
            "rank 0 on worker n0 failed: could not start training: no thread"
        );
        let mut idle = false;
        for _ in 0..100 {
            idle = workers(&h)
                .await
                .iter()
                .all(|w| w.state() == WorkerState::Idle);
            if idle {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert!(idle, "{:?}", workers(&h).await);
    });
}

#[test]
fn a_live_duplicate_name_is_refused_but_a_reconnect_of_the_same_process_is_not() {
    rt().block_on(async {
        let h = control::start(Arc::new(MemoryStore::new()), "mem".into(), cfg())
            .await
            .unwrap();
        let first = register(&h, "gpu0", "aaaa", None).await.unwrap();
        match register(&h, "gpu0", "bbbb", None).await {
            Err(ControlError::DuplicateName { name, id, .. }) => {
                assert_eq!((name.as_str(), id), ("gpu0", first.id.to_string()));
            }
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("a second worker named gpu0 was accepted"),
        }
        let again = register(&h, "gpu0", "aaaa", None).await.unwrap();
        let list = workers(&h).await;
        assert_eq!(list.len(), 1, "{list:?}");
        assert_eq!(list[0].id, again.id);
    });
}

#[test]
fn a_queued_job_says_why_it_waits() {
    rt().block_on(async {
        let h = control::start(Arc::new(MemoryStore::new()), "mem".into(), cfg())
            .await
            .unwrap();
        let id = h.call(|r| Msg::Submit(spec(2), None, r)).await.unwrap();
        assert_eq!(
            job(&h, &id).await.waiting.as_deref(),
            Some("waiting for workers: needs 2 cpu workers, 0 registered")
        );
        let _w = register(&h, "n0", "n0", None).await.unwrap();
        assert_eq!(
            job(&h, &id).await.waiting.as_deref(),
            Some("waiting for workers: needs 2 cpu workers, 1 registered")
        );
        let later = h.call(|r| Msg::Submit(spec(1), None, r)).await.unwrap();
        assert_eq!(
            job(&h, &later).await.waiting,
            Some(format!("behind job {id}, which is waiting for cpu workers"))
        );
    });
}

/// What a store holds for a job that was running (generation 1, two
/// members, a committed checkpoint) when its coordinator died.
async fn running_job_in_store(store: &MemoryStore) -> JobId {
    let id = JobId("digits-mlp-1".into());
    let record = JobRecord {
        id: id.clone(),
        spec: spec(2),
        submitted_at_ms: now_ms(),
        resume_from: None,
    };
    let status = JobStatusRecord {
        state: JobState::Running,
        generation: 1,
        step: 300,
        total_steps: 1000,
        metrics: BTreeMap::new(),
        members: vec!["n0".into(), "n1".into()],
        reason: None,
        output_dir: "/tmp/out".into(),
        updated_at_ms: now_ms(),
        events: Vec::new(),
        restarts: 0,
        incidents: Vec::new(),
    };
    let ckpt = CheckpointRecord {
        step: 300,
        dir: "/tmp/out/checkpoints/digits-mlp-1/step-300".into(),
        bytes: 1,
        committed: true,
        generation: 1,
        metrics: BTreeMap::new(),
        created_at_ms: now_ms(),
    };
    for (key, bytes) in [
        (
            keys::job_spec(&id).unwrap(),
            records::encode("spec", &record).unwrap(),
        ),
        (
            keys::job_status(&id).unwrap(),
            records::encode("status", &status).unwrap(),
        ),
        (
            keys::job_checkpoint(&id, 300).unwrap(),
            records::encode("ckpt", &ckpt).unwrap(),
        ),
    ] {
        store.put(&key, bytes).await.unwrap();
    }
    id
}

#[test]
fn after_a_restart_a_lost_rank_keeps_its_name_and_the_adoption_deadline_dies_with_its_generation() {
    rt().block_on(async {
        let store = Arc::new(MemoryStore::new());
        let id = running_job_in_store(&store).await;
        let h = control::start(store.clone(), "mem".into(), cfg())
            .await
            .unwrap();
        // The restarted coordinator shows where the job was, not 0/0.
        let s = job(&h, &id).await;
        assert_eq!((s.status.step, s.status.total_steps), (300, 1000));
        // Rank 0 rejoins; rank 1 was killed while no coordinator ran, and
        // rank 0's ring to it is closed.
        let run = CurrentRun {
            run: RunId {
                job: id.clone(),
                generation: Generation(1),
            },
            rank: Rank(0),
            step: 310,
            parked: false,
        };
        let n0 = register(&h, "n0", "n0", Some(run)).await.unwrap();
        report(
            &h,
            &n0.id,
            peer_lost(&id, 1, "collective: peer rank 1 lost"),
        )
        .await;
        let s = wait_state(&h, &id, JobState::Failed).await;
        assert!(reason(&s).contains("n1 (rank 1)"), "{}", reason(&s));

        // Resumed on two fresh workers, generation 2 outlives the old
        // adoption deadline (600 ms after the restart).
        let mut n2 = register(&h, "n2", "n2", None).await.unwrap();
        let idr = id.to_string();
        h.call(|r| Msg::Resume(idr, r)).await.unwrap();
        let mut n0 = n0;
        let mut starts = Vec::new();
        for w in [&mut n0, &mut n2] {
            starts.push(w.start().await);
        }
        assert!(starts.iter().all(|s| s.run.generation == Generation(2)));
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let s = job(&h, &id).await;
        assert_eq!(
            (s.status.state, s.status.generation),
            (JobState::Running, 2),
            "{s:?}"
        );
    });
}

/// A job of `min` ranks that may restart, running on fresh fake workers.
async fn recoverable_job(
    names: &[&str],
    spares: &[&str],
    min: u32,
) -> (ControlHandle, Vec<FakeWorker>, Vec<FakeWorker>, JobId) {
    let h = control::start(Arc::new(MemoryStore::new()), "mem".into(), cfg())
        .await
        .unwrap();
    let mut ws = Vec::new();
    for name in names {
        ws.push(register(&h, name, name, None).await.unwrap());
    }
    let mut spec = spec(min);
    spec.fault.max_restarts = 3;
    let id = h.call(|r| Msg::Submit(spec, None, r)).await.unwrap();
    for w in &mut ws {
        w.start().await;
    }
    let mut extra = Vec::new();
    for name in spares {
        extra.push(register(&h, name, name, None).await.unwrap());
    }
    (h, ws, extra, id)
}

/// Rank 0's report that the checkpoint of `step` is complete in `dir`.
fn checkpoint_written(
    job: &JobId,
    generation: u64,
    step: u64,
    dir: &std::path::Path,
) -> WorkerReport {
    WorkerReport::Checkpoint(ringmaster_proto::CheckpointReport {
        run: RunId {
            job: job.clone(),
            generation: Generation(generation),
        },
        step,
        metrics: Metrics::new(),
        outcome: Ok(ringmaster_proto::WrittenCheckpoint {
            dir: dir.to_path_buf(),
            bytes: 1,
            write_seconds: 0.0,
            blocked_seconds: 0.0,
        }),
    })
}

fn parked(job: &JobId, generation: u64, step: u64, lost: Option<u32>) -> WorkerReport {
    WorkerReport::Parked(ringmaster_proto::Parked {
        run: RunId {
            job: job.clone(),
            generation: Generation(generation),
        },
        step,
        lost_peer: lost.map(Rank),
        reason: "collective: lost peer".into(),
    })
}

#[test]
fn a_lost_member_is_replaced_by_a_spare_around_the_newest_survivor_state() {
    rt().block_on(async {
        let (h, mut ws, mut spares, id) = recoverable_job(&["n0", "n1", "n2"], &["s0"], 3).await;
        // n2 dies; its neighbours' rings break.
        h.from_session(Msg::Disconnected(ws[2].id.clone(), "session closed".into()));
        let s = wait_state(&h, &id, JobState::Recovering).await;
        assert_eq!(s.status.restarts, 1);
        assert!(
            s.status
                .events
                .iter()
                .any(|e| e.contains("n2 (rank 2) lost")),
            "{:?}",
            s.status.events
        );
        // The survivors are told to leave their ring keeping their state.
        for w in &mut ws[..2] {
            match w.next().await {
                Command::Abort(a) => {
                    assert!(a.keep_state, "{a:?}");
                    assert_eq!(a.run.generation, Generation(1));
                }
                other => panic!("expected an abort keeping the state, got {other:?}"),
            }
        }
        // n1 completed one more step than n0 before the ring broke.
        h.from_session(Msg::FromWorker(
            ws[0].id.clone(),
            parked(&id, 1, 41, Some(2)),
        ));
        h.from_session(Msg::FromWorker(ws[1].id.clone(), parked(&id, 1, 42, None)));
        // Generation 2: n1 (the newest state) is rank 0 and the source, then
        // n0, then the spare.
        let starts = [
            ws[1].start().await,
            ws[0].start().await,
            spares[0].start().await,
        ];
        for (rank, st) in starts.iter().enumerate() {
            assert_eq!(st.run.generation, Generation(2));
            assert_eq!(st.rank, Rank(rank as u32));
            assert_eq!(st.state_source, Some(Rank(0)));
            // The group picks up at the source's cursor, and every rank
            // is told so (it checks the state it ends up with).
            assert_eq!(st.cursor, Some(42));
            assert!(st.resume_candidates.is_empty(), "no checkpoint is read");
        }
        let s = wait_state(&h, &id, JobState::Running).await;
        assert_eq!(s.status.generation, 2);
        assert_eq!(s.status.members, ["n1", "n0", "s0"]);
        assert_eq!(s.status.step, 42);
        // The status was persisted before the starts went out (invariants.rs
        // checks the order for every launch); here: it is in the store.
    });
}

#[test]
fn a_parked_report_starts_recovery_and_a_silent_member_is_lost_after_the_window() {
    rt().block_on(async {
        let c = ControlConfig {
            heartbeat_timeout: Duration::from_millis(300),
            ..cfg()
        };
        let mut spec = spec(1);
        spec.workers.max = 2;
        spec.fault.max_restarts = 1;
        let store = Arc::new(MemoryStore::new());
        let (h, mut ws, id) = running_job_with(store, c, &["n0", "n1"], spec).await;
        // n0's ring broke; n1 stays connected but never parks (hung).
        h.from_session(Msg::FromWorker(
            ws[0].id.clone(),
            parked(&id, 1, 7, Some(1)),
        ));
        wait_state(&h, &id, JobState::Recovering).await;
        // After the regroup window, n0 alone re-forms the job (min 1).
        let st = ws[0].start().await;
        assert_eq!(st.run.generation, Generation(2));
        assert_eq!(st.peers.len(), 1);
        let s = wait_state(&h, &id, JobState::Running).await;
        assert_eq!(s.status.members, ["n0"]);
        assert!(
            s.status
                .events
                .iter()
                .any(|e| e.contains("state of step 7 from n0")),
            "{:?}",
            s.status.events
        );
        // n1 parks after all: too late for generation 2, it is told to drop
        // its state and is free again.
        h.from_session(Msg::FromWorker(ws[1].id.clone(), parked(&id, 1, 7, None)));
        loop {
            match ws[1].next().await {
                Command::Abort(a) if !a.keep_state => break,
                _ => continue,
            }
        }
        let all = workers(&h).await;
        let n1 = all.iter().find(|w| w.name == "n1").unwrap();
        assert_eq!(n1.state(), WorkerState::Idle);
    });
}

#[test]
fn without_survivors_or_past_the_budget_the_job_does_not_re_form() {
    rt().block_on(async {
        let (h, mut ws, _, id) = recoverable_job(&["n0", "n1"], &[], 2).await;
        // Both members go: nobody holds the state, so the job is queued
        // again (to resume from a checkpoint; here from the start).
        h.from_session(Msg::Disconnected(ws[0].id.clone(), "session closed".into()));
        h.from_session(Msg::Disconnected(ws[1].id.clone(), "session closed".into()));
        let s = wait_state(&h, &id, JobState::Queued).await;
        assert!(
            s.status
                .events
                .iter()
                .any(|e| e.contains("no survivor holds the training state")),
            "{:?}",
            s.status.events
        );
        drop(ws.drain(..));
        // Stale reports of generation 1 change nothing now.
        let a = register(&h, "a", "a", None).await.unwrap();
        h.from_session(Msg::FromWorker(a.id.clone(), parked(&id, 1, 5, None)));
        let s2 = job(&h, &id).await;
        assert_eq!(s2.status.state, JobState::Queued);
        assert_eq!(s2.status.restarts, 1);
    });
}

#[test]
fn with_too_few_workers_a_recovering_job_waits_and_then_goes_back_to_the_queue() {
    rt().block_on(async {
        let mut spec = spec(2);
        spec.fault.max_restarts = 2;
        spec.fault.rejoin_timeout_secs = 1;
        let store = Arc::new(MemoryStore::new());
        let (h, mut ws, id) = running_job_with(store, cfg(), &["n0", "n1"], spec).await;
        h.from_session(Msg::Disconnected(ws[1].id.clone(), "session closed".into()));
        wait_state(&h, &id, JobState::Recovering).await;
        h.from_session(Msg::FromWorker(
            ws[0].id.clone(),
            parked(&id, 1, 9, Some(1)),
        ));
        // One survivor, min 2, nobody free: it waits, saying why.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let s = job(&h, &id).await;
        assert_eq!(s.status.state, JobState::Recovering);
        assert_eq!(
            s.waiting.as_deref(),
            Some("re-forming: needs 2 workers, 1 survivor and 0 free")
        );
        // Past rejoin_timeout_secs: the survivor writes the state it holds
        // as a checkpoint, ...
        loop {
            match ws[0].next().await {
                Command::Checkpoint(c) => {
                    assert_eq!((c.run.generation, c.stop), (Generation(1), false));
                    break;
                }
                other => assert!(matches!(other, Command::Abort(_)), "{other:?}"),
            }
        }
        let dir = std::path::PathBuf::from("/ckpt/step-9");
        h.from_session(Msg::FromWorker(
            ws[0].id.clone(),
            checkpoint_written(&id, 1, 9, &dir),
        ));
        // ... then the job is queued again and the survivor drops the state.
        let s = wait_state(&h, &id, JobState::Queued).await;
        for text in [
            "too few workers to re-form within 1 s: saving the state of step 9 from n0",
            "the survivors' state of step 9 is saved: queued again, to resume from its \
             checkpoint at step 9",
        ] {
            assert!(
                s.status.events.iter().any(|e| e.contains(text)),
                "{text}: {:?}",
                s.status.events
            );
        }
        loop {
            match ws[0].next().await {
                Command::Abort(a) if !a.keep_state => break,
                _ => continue,
            }
        }
        // A worker joins: the job starts again from the survivor's state.
        let mut n2 = register(&h, "n2", "n2", None).await.unwrap();
        let st = n2.start().await;
        assert_eq!(st.resume_candidates, [dir]);
    });
}

#[test]
fn a_running_job_below_its_max_grows_when_a_worker_joins_without_spending_a_restart() {
    rt().block_on(async {
        let h = control::start(Arc::new(MemoryStore::new()), "mem".into(), cfg())
            .await
            .unwrap();
        let mut n0 = register(&h, "n0", "n0", None).await.unwrap();
        let mut spec = spec(1);
        spec.workers.max = 2;
        spec.fault.max_restarts = 1;
        let id = h.call(|r| Msg::Submit(spec, None, r)).await.unwrap();
        assert_eq!(n0.start().await.peers.len(), 1);
        // A second worker appears: the job leaves its ring to grow.
        let mut n1 = register(&h, "n1", "n1", None).await.unwrap();
        match n0.next().await {
            Command::Abort(a) => assert!(a.keep_state, "{a:?}"),
            other => panic!("expected an abort keeping the state, got {other:?}"),
        }
        h.from_session(Msg::FromWorker(n0.id.clone(), parked(&id, 1, 30, None)));
        let (a, b) = (n0.start().await, n1.start().await);
        assert_eq!((a.rank, b.rank), (Rank(0), Rank(1)));
        assert_eq!(a.state_source, Some(Rank(0)));
        let s = wait_state(&h, &id, JobState::Running).await;
        assert_eq!(s.status.members, ["n0", "n1"]);
        assert_eq!(s.status.restarts, 0, "growing spends no restart");
        assert!(
            s.status
                .events
                .iter()
                .any(|e| e.contains("growing from 1 to 2 workers")),
            "{:?}",
            s.status.events
        );
        // At its max it does not grow again.
        let _n2 = register(&h, "n2", "n2", None).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(job(&h, &id).await.status.generation, 2);
    });
}

async fn cordon(h: &ControlHandle, who: &str, action: CordonAction) -> WorkerView {
    let who = who.to_string();
    h.call(|r| Msg::Cordon(who, action, String::new(), r))
        .await
        .unwrap()
}

/// The worker named `name` as `coordinator workers` shows it.
async fn worker_named(h: &ControlHandle, name: &str) -> WorkerView {
    workers(h)
        .await
        .into_iter()
        .find(|w| w.name == name)
        .unwrap_or_else(|| panic!("no worker {name}"))
}

fn progress(job: &JobId, generation: u64, step: u64) -> WorkerReport {
    WorkerReport::Progress(ringmaster_proto::Progress {
        run: RunId {
            job: job.clone(),
            generation: Generation(generation),
        },
        step,
        epoch: 0,
        total_steps: 1000,
        metrics: Metrics::new(),
    })
}

#[test]
fn a_cordoned_worker_takes_no_new_job_until_uncordoned() {
    rt().block_on(async {
        let h = control::start(Arc::new(MemoryStore::new()), "mem".into(), cfg())
            .await
            .unwrap();
        let mut w = register(&h, "n0", "n0", None).await.unwrap();
        let view = cordon(&h, "n0", CordonAction::Cordon).await;
        let c = view.cordon.expect("cordoned");
        assert_eq!(
            (c.kind, c.reason.as_str()),
            (CordonKind::Cordoned, "cordoned by admin")
        );
        let id = h.call(|r| Msg::Submit(spec(1), None, r)).await.unwrap();
        let s = job(&h, &id).await;
        assert_eq!(s.status.state, JobState::Queued);
        assert!(w.commands.try_recv().is_err(), "a cordoned worker got work");
        // By id as well as by name.
        let view = cordon(&h, w.id.as_str(), CordonAction::Uncordon).await;
        assert_eq!(view.cordon, None);
        let start = w.start().await;
        assert_eq!(start.run.job, id);
        // Cordoning a busy worker leaves its work running.
        let view = cordon(&h, "n0", CordonAction::Cordon).await;
        assert_eq!(view.state(), WorkerState::Busy);
        assert_eq!(job(&h, &id).await.status.state, JobState::Running);
        let missing = h
            .call(|r| Msg::Cordon("nope".into(), CordonAction::Drain, String::new(), r))
            .await
            .unwrap_err();
        assert_eq!(
            missing.to_string(),
            "no worker `nope` is registered (give its id, as `coordinator workers` lists it, or \
             its name)"
        );
    });
}

#[test]
fn a_cordon_outlives_a_coordinator_restart() {
    rt().block_on(async {
        let store: Arc<dyn StateStore> = Arc::new(MemoryStore::new());
        let h = control::start(store.clone(), "mem".into(), cfg())
            .await
            .unwrap();
        let _w = register(&h, "n0", "n0", None).await.unwrap();
        cordon(&h, "n0", CordonAction::Cordon).await;
        h.shutdown().await;
        let h = control::start(store, "mem".into(), cfg()).await.unwrap();
        let _w = register(&h, "n0", "n0-again", None).await.unwrap();
        let c = worker_named(&h, "n0").await.cordon.expect("still cordoned");
        assert_eq!(c.kind, CordonKind::Cordoned);
    });
}

#[test]
fn draining_a_member_re_forms_its_job_without_it_and_spends_no_restart() {
    rt().block_on(async {
        let (h, mut ws, mut spares, id) = recoverable_job(&["n0", "n1"], &["s0"], 2).await;
        // The spare is free but the job is full: draining n1 re-forms the
        // job with n0 and s0.
        let view = cordon(&h, "n1", CordonAction::Drain).await;
        let c = view.cordon.expect("draining");
        assert_eq!(c.kind, CordonKind::Draining);
        let s = wait_state(&h, &id, JobState::Recovering).await;
        assert_eq!(s.status.restarts, 0, "a drain is no failure");
        for w in &mut ws {
            match w.next().await {
                Command::Abort(a) => assert!(a.keep_state, "{a:?}"),
                other => panic!("expected an abort keeping the state, got {other:?}"),
            }
        }
        // n1 completed one more step than n0: still left out, n0's state
        // is the source (the step in flight is redone).
        h.from_session(Msg::FromWorker(ws[0].id.clone(), parked(&id, 1, 30, None)));
        h.from_session(Msg::FromWorker(ws[1].id.clone(), parked(&id, 1, 31, None)));
        let starts = [ws[0].start().await, spares[0].start().await];
        for (rank, st) in starts.iter().enumerate() {
            assert_eq!(st.run.generation, Generation(2));
            assert_eq!(st.rank, Rank(rank as u32));
            assert_eq!(st.state_source, Some(Rank(0)));
        }
        // n1 drops its state and is free, cordoned.
        match ws[1].next().await {
            Command::Abort(a) => assert!(!a.keep_state, "{a:?}"),
            other => panic!("expected the drained worker to drop its state, got {other:?}"),
        }
        let s = wait_state(&h, &id, JobState::Running).await;
        assert_eq!(s.status.members, ["n0", "s0"]);
        assert_eq!((s.status.restarts, s.status.step), (0, 30));
        let n1 = worker_named(&h, "n1").await;
        assert_eq!(n1.state(), WorkerState::Idle);
        let c = n1.cordon.expect("cordoned after the drain");
        assert_eq!(
            (c.kind, c.reason.as_str()),
            (CordonKind::Cordoned, "drained: drained by admin")
        );
    });
}

#[test]
fn a_drain_with_no_replacement_waits_then_moves_the_job_through_a_checkpoint() {
    rt().block_on(async {
        let tmp = tempfile::tempdir().unwrap();
        let (h, mut ws, _, id) = recoverable_job(&["n0"], &[], 1).await;
        cordon(&h, "n0", CordonAction::Drain).await;
        // Nowhere to go: n0 keeps training, draining.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(job(&h, &id).await.status.state, JobState::Running);
        assert!(ws[0].commands.try_recv().is_err());
        assert_eq!(
            worker_named(&h, "n0").await.cordon.map(|c| c.kind),
            Some(CordonKind::Draining)
        );
        // A worker arrives, but the job's max is 1: no group of n0 and s0
        // can form, so the job moves through a checkpoint.
        let mut s0 = register(&h, "s0", "s0", None).await.unwrap();
        match ws[0].next().await {
            Command::Checkpoint(c) => assert!(c.stop, "{c:?}"),
            other => panic!("expected a stopping checkpoint request, got {other:?}"),
        }
        let dir = tmp.path().join("step-57");
        h.from_session(Msg::FromWorker(
            ws[0].id.clone(),
            checkpoint_written(&id, 1, 57, &dir),
        ));
        h.from_session(Msg::FromWorker(
            ws[0].id.clone(),
            WorkerReport::Ended(TrainingEnded {
                run: RunId {
                    job: id.clone(),
                    generation: Generation(1),
                },
                step: 57,
                metrics: Metrics::new(),
                outcome: RunOutcome::Succeeded { stopped: true },
            }),
        ));
        let start = s0.start().await;
        assert_eq!(start.run.generation, Generation(2));
        assert_eq!(start.resume_candidates, [dir]);
        let s = wait_state(&h, &id, JobState::Running).await;
        assert_eq!(s.status.members, ["s0"]);
        assert!(
            s.status
                .events
                .iter()
                .any(|e| e.contains("moved off its draining workers")),
            "{:?}",
            s.status.events
        );
        let c = worker_named(&h, "n0").await.cordon.expect("drained");
        assert_eq!(c.kind, CordonKind::Cordoned);
    });
}

#[test]
fn a_worker_blamed_twice_in_ten_minutes_is_quarantined_for_the_cooldown() {
    rt().block_on(async {
        let h = control::start(Arc::new(MemoryStore::new()), "mem".into(), cfg())
            .await
            .unwrap();
        let mut n0 = register(&h, "n0", "n0", None).await.unwrap();
        let mut n1 = register(&h, "n1", "n1", None).await.unwrap();
        let mut spec = spec(2);
        spec.fault.max_restarts = 5;
        spec.fault.quarantine_after = 2;
        spec.fault.quarantine_cooldown_secs = 1;
        let id = h.call(|r| Msg::Submit(spec, None, r)).await.unwrap();
        n0.start().await;
        n1.start().await;
        for generation in 1..=2u64 {
            // n1 dies; n0 parks; n1 comes back as a fresh process.
            h.from_session(Msg::Disconnected(n1.id.clone(), "session closed".into()));
            wait_state(&h, &id, JobState::Recovering).await;
            assert!(matches!(n0.next().await, Command::Abort(a) if a.keep_state));
            h.from_session(Msg::FromWorker(
                n0.id.clone(),
                parked(&id, generation, 10 * generation, None),
            ));
            n1 = register(&h, "n1", &format!("n1-{generation}"), None)
                .await
                .unwrap();
            if generation == 1 {
                // One incident: no quarantine; the job re-forms with it.
                assert_eq!(worker_named(&h, "n1").await.cordon, None);
                assert_eq!(n0.start().await.run.generation, Generation(2));
                n1.start().await;
                wait_state(&h, &id, JobState::Running).await;
            }
        }
        // The second incident quarantined n1: the job waits for a worker.
        let c = worker_named(&h, "n1").await.cordon.expect("quarantined");
        assert_eq!(c.kind, CordonKind::Quarantined);
        assert_eq!(c.reason, "2 incidents in 10 min");
        assert_eq!(c.remaining_secs, Some(1));
        let s = job(&h, &id).await;
        assert_eq!(s.status.state, JobState::Recovering);
        assert!(
            s.status
                .events
                .iter()
                .any(|e| e == "worker n1 quarantined for 1 s: 2 incidents in 10 min"),
            "{:?}",
            s.status.events
        );
        // After the cooldown it takes work again: generation 3 forms.
        let st = n1.start().await;
        assert_eq!(st.run.generation, Generation(3));
        assert_eq!(worker_named(&h, "n1").await.cordon, None);
    });
}

#[test]
fn a_draining_sole_state_holder_hands_its_state_on_before_it_leaves() {
    rt().block_on(async {
        let h = control::start(Arc::new(MemoryStore::new()), "mem".into(), cfg())
            .await
            .unwrap();
        let mut n0 = register(&h, "n0", "n0", None).await.unwrap();
        let mut spec = spec(1);
        spec.workers.max = 2;
        let id = h.call(|r| Msg::Submit(spec, None, r)).await.unwrap();
        n0.start().await;
        cordon(&h, "n0", CordonAction::Drain).await;
        let mut s0 = register(&h, "s0", "s0", None).await.unwrap();
        // Generation 2: n0 sources its state to s0 ...
        assert!(matches!(n0.next().await, Command::Abort(a) if a.keep_state));
        h.from_session(Msg::FromWorker(n0.id.clone(), parked(&id, 1, 20, None)));
        let (a, b) = (n0.start().await, s0.start().await);
        assert_eq!((a.rank, b.rank), (Rank(0), Rank(1)));
        assert_eq!(b.state_source, Some(Rank(0)));
        // ... and once a step of it is done, the job re-forms without n0.
        h.from_session(Msg::FromWorker(n0.id.clone(), progress(&id, 2, 30)));
        assert!(matches!(n0.next().await, Command::Abort(a) if a.keep_state));
        assert!(matches!(s0.next().await, Command::Abort(a) if a.keep_state));
        h.from_session(Msg::FromWorker(n0.id.clone(), parked(&id, 2, 31, None)));
        h.from_session(Msg::FromWorker(s0.id.clone(), parked(&id, 2, 31, None)));
        let st = s0.start().await;
        assert_eq!((st.run.generation, st.rank), (Generation(3), Rank(0)));
        let s = wait_state(&h, &id, JobState::Running).await;
        assert_eq!(s.status.members, ["s0"]);
        assert_eq!(s.status.restarts, 0);
        assert!(matches!(n0.next().await, Command::Abort(a) if !a.keep_state));
    });
}

#[test]
fn an_incident_records_detection_eviction_the_new_generation_its_transfer_and_first_step() {
    rt().block_on(async {
        let store = Arc::new(MemoryStore::new());
        let mut spec = spec(2);
        spec.fault.max_restarts = 1;
        let (h, mut ws, id) = running_job_with(store.clone(), cfg(), &["n0", "n1"], spec).await;
        let mut s0 = register(&h, "s0", "s0", None).await.unwrap();
        h.from_session(Msg::Disconnected(ws[1].id.clone(), "session closed".into()));
        assert!(matches!(ws[0].next().await, Command::Abort(a) if a.keep_state));
        h.from_session(Msg::FromWorker(
            ws[0].id.clone(),
            parked(&id, 1, 17, Some(1)),
        ));
        ws[0].start().await;
        s0.start().await;
        let s = wait_state(&h, &id, JobState::Running).await;
        let i = s.status.incidents.last().expect("an incident").clone();
        assert_eq!(i.kind, Some(records::IncidentKind::Loss));
        assert_eq!(
            i.detected,
            "worker n1 (rank 1) lost: session closed (no reconnect within 0.2 s)"
        );
        assert_eq!(
            i.evicted,
            ["n1 (rank 1): session closed (no reconnect within 0.2 s)"]
        );
        assert_eq!(
            (i.from_generation, i.generation, i.state_step),
            (1, Some(2), Some(17))
        );
        assert_eq!(i.members, ["n0", "s0"]);
        assert_eq!(i.state_source.as_deref(), Some("n0"));
        assert!(i.formed_at_ms.unwrap() >= i.detected_at_ms);
        assert_eq!((i.transfer_bytes, i.first_step_at_ms), (None, None));
        // Rank 0 reports what the state copy moved, then its first step.
        let run = RunId {
            job: id.clone(),
            generation: Generation(2),
        };
        h.from_session(Msg::FromWorker(
            ws[0].id.clone(),
            WorkerReport::Rebound(ringmaster_proto::Rebound {
                run,
                step: 17,
                transfer: Some((4096, 0.25)),
            }),
        ));
        // A stale generation's progress does not close it.
        h.from_session(Msg::FromWorker(ws[0].id.clone(), progress(&id, 1, 18)));
        h.from_session(Msg::FromWorker(ws[0].id.clone(), progress(&id, 2, 18)));
        let mut i = records::IncidentRecord::default();
        for _ in 0..100 {
            i = job(&h, &id).await.status.incidents.last().unwrap().clone();
            if i.first_step_at_ms.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            (i.transfer_bytes, i.transfer_seconds),
            (Some(4096), Some(0.25))
        );
        let ms = i.recovery_ms().expect("closed by the first step");
        assert!(ms < 5_000, "{ms}");
        // Written to the store: the timeline outlives a restart.
        let key = keys::job_status(&id).unwrap();
        let stored: JobStatusRecord =
            records::decode(&key, &store.get(&key).await.unwrap().unwrap().value).unwrap();
        assert_eq!(stored.incidents.last(), Some(&i));
    });
}

#[test]
fn a_member_whose_session_breaks_takes_its_rank_back_when_it_reconnects_in_time() {
    rt().block_on(async {
        // max_restarts = 0: before re-adoption, a broken session failed the job.
        let (h, mut ws, id) = running_job(cfg(), &["n0", "n1"]).await;
        h.from_session(Msg::Disconnected(
            ws[1].id.clone(),
            "session broken: h2 protocol error".into(),
        ));
        // The process trains on and reconnects, reporting its run.
        let current = CurrentRun {
            run: RunId {
                job: id.clone(),
                generation: Generation(1),
            },
            rank: Rank(1),
            step: 40,
            parked: false,
        };
        let _n1 = register(&h, "n1", "n1", Some(current)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let s = job(&h, &id).await;
        assert_eq!(s.status.state, JobState::Running, "{:?}", s.status);
        assert_eq!((s.status.generation, s.status.restarts), (1, 0));
        assert_eq!(s.status.members, ["n0", "n1"]);
        assert!(
            s.status
                .events
                .iter()
                .any(|e| e == "worker n1 reconnected and took rank 1 back"),
            "{:?}",
            s.status.events
        );
        assert!(ws[0].commands.try_recv().is_err(), "n0 was disturbed");
        let n1 = worker_named(&h, "n1").await;
        assert_eq!(n1.assignment, Some((id.clone(), Rank(1))));
    });
}

#[test]
fn free_workers_prepare_for_a_running_job_they_may_join() {
    rt().block_on(async {
        let h = control::start(Arc::new(MemoryStore::new()), "mem".into(), cfg())
            .await
            .unwrap();
        let mut n0 = register(&h, "n0", "n0", None).await.unwrap();
        let mut n1 = register(&h, "n1", "n1", None).await.unwrap();
        let mut early = register(&h, "early", "early", None).await.unwrap();
        let mut recoverable = spec(2);
        recoverable.fault.max_restarts = 2;
        let id = h.call(|r| Msg::Submit(recoverable, None, r)).await.unwrap();
        n0.start().await;
        n1.start().await;
        // A worker free when the job starts, and one that registers later.
        match early.next().await {
            Command::Prepare(p) => assert_eq!(p.job, id),
            other => panic!("expected a prepare, got {other:?}"),
        }
        let mut late = register(&h, "late", "late", None).await.unwrap();
        match late.next().await {
            Command::Prepare(p) => assert_eq!(p.job, id),
            other => panic!("expected a prepare, got {other:?}"),
        }
        // Members are not spares.
        assert!(n0.commands.try_recv().is_err());
        // A job that can neither re-form nor grow needs no spares.
        let h2 = control::start(Arc::new(MemoryStore::new()), "mem".into(), cfg())
            .await
            .unwrap();
        let mut m = register(&h2, "m", "m", None).await.unwrap();
        let mut spare = register(&h2, "spare", "spare", None).await.unwrap();
        let mut fixed = spec(1);
        fixed.workers.grow = false;
        h2.call(|r| Msg::Submit(fixed, None, r)).await.unwrap();
        m.start().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(spare.commands.try_recv().is_err());
    });
}
