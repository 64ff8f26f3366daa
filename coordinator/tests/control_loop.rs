//! The control loop driven in process, with fake worker sessions: who is
//! blamed when a worker dies, deadlines that die with their generation,
//! workers that never report their end, duplicate names, and why a queued
//! job waits. Each case is one a user hit with the real binaries.

use ringmaster_common::ids::{Generation, JobId, Rank, WorkerId};
use ringmaster_common::jobspec::JobSpec;
use ringmaster_common::now_ms;
use ringmaster_common::records::{self, CheckpointRecord, JobRecord, JobState, JobStatusRecord};
use ringmaster_common::worker::{Device, WorkerState};
use ringmaster_coordinator::control::{self, ControlConfig, ControlError, ControlHandle, Msg};
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
        ..ControlConfig::default()
    }
}

fn spec(min: u32) -> JobSpec {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/digits-mlp.toml");
    let mut spec = JobSpec::from_toml(&std::fs::read_to_string(&path).unwrap(), &path).unwrap();
    spec.workers.min = min;
    spec.workers.max = min;
    spec.train.global_batch = 96;
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
    let h = control::start(Arc::new(MemoryStore::new()), "mem".into(), c)
        .await
        .unwrap();
    let mut ws = Vec::new();
    for name in names {
        ws.push(register(&h, name, name, None).await.unwrap());
    }
    let world = names.len() as u32;
    let id = h.call(|r| Msg::Submit(spec(world), None, r)).await.unwrap();
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
        assert_eq!(reason(&s), "worker n2 (rank 2) lost: session closed");
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
