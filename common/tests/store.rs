//! Tests of the state store: the shared conformance suite on the memory and
//! embedded backends, the embedded store's durability and locking, the key
//! layout, and the records' encoding. The etcd backend's tests live with it.

use ringmaster_common::ids::{IdError, JobId, WorkerId};
use ringmaster_common::store::conformance::run_conformance;
use ringmaster_common::store::keys::{self, JobKeyKind};
use ringmaster_common::store::records::{
    self, JobState, JobStatusRecord, MAX_RECORD_BYTES, RecordError, WorkerRecord,
};
use ringmaster_common::store::{
    EmbeddedStore, MemoryStore, StateStore, StoreError, Txn, Versioned,
};
use std::collections::BTreeMap;

fn job(id: &str) -> JobId {
    JobId::parse(id).expect("test job id is valid")
}

// ---- conformance ------------------------------------------------------------

#[tokio::test]
async fn memory_store_conforms() {
    run_conformance(&MemoryStore::new()).await;
}

#[tokio::test]
async fn embedded_store_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&dir.path().join(EmbeddedStore::FILE_NAME)).unwrap();
    run_conformance(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_conforms_behind_arc_dyn_on_multi_thread_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let store: std::sync::Arc<dyn StateStore> =
        std::sync::Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).unwrap());
    run_conformance(store.as_ref()).await;
}

// ---- embedded: durability and locking ---------------------------------------

#[tokio::test]
async fn embedded_store_keeps_values_and_versions_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(EmbeddedStore::FILE_NAME);
    let spec_key = keys::job_spec(&job("mnist-1")).unwrap();
    let status_key = keys::job_status(&job("mnist-1")).unwrap();
    let bytes: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();

    let (v_spec, v_status) = {
        let store = EmbeddedStore::open(&path).unwrap();
        let v_spec = store.put(&spec_key, bytes.clone()).await.unwrap();
        let v_queued = store.put(&status_key, b"queued".to_vec()).await.unwrap();
        assert!(store.delete(&status_key).await.unwrap());
        let v_status = store.put(&status_key, b"running".to_vec()).await.unwrap();
        assert_eq!(
            v_status,
            v_queued + 2,
            "put, delete, put: one revision each"
        );
        (v_spec, v_status)
    };

    let store = EmbeddedStore::open(&path).unwrap();
    assert_eq!(
        store.get(&spec_key).await.unwrap(),
        Some(Versioned {
            value: bytes,
            version: v_spec
        })
    );
    assert_eq!(
        store.get(&status_key).await.unwrap(),
        Some(Versioned {
            value: b"running".to_vec(),
            version: v_status
        })
    );
    let v_next = store.put(&spec_key, b"later".to_vec()).await.unwrap();
    assert_eq!(
        v_next,
        v_status + 1,
        "the revision counter must continue where it stopped before the reopen"
    );
    let listed: Vec<String> = store
        .range(&keys::jobs_prefix())
        .await
        .unwrap()
        .into_iter()
        .map(|(key, _)| key)
        .collect();
    assert_eq!(listed, vec![spec_key, status_key]);
}

#[tokio::test]
async fn second_open_of_an_open_embedded_store_is_locked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(EmbeddedStore::FILE_NAME);
    let first = EmbeddedStore::open(&path).unwrap();
    first.put("/k", b"v".to_vec()).await.unwrap();

    let err = EmbeddedStore::open(&path).unwrap_err();
    assert_eq!(
        err,
        StoreError::Locked {
            path: path.display().to_string()
        }
    );
    assert!(
        err.to_string()
            .starts_with("store is locked by another process: "),
        "{err}"
    );
    assert!(!err.retryable());

    // The first opener is unaffected, and the lock goes with it.
    assert_eq!(
        first.get("/k").await.unwrap().map(|v| v.value),
        Some(b"v".to_vec())
    );
    drop(first);
    let again = EmbeddedStore::open(&path).unwrap();
    assert_eq!(
        again.get("/k").await.unwrap().map(|v| v.value),
        Some(b"v".to_vec())
    );
}

#[tokio::test]
async fn embedded_store_in_a_missing_directory_is_an_io_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir
        .path()
        .join("no-such-dir")
        .join(EmbeddedStore::FILE_NAME);
    let err = EmbeddedStore::open(&path).unwrap_err();
    assert!(
        matches!(&err, StoreError::Io(msg) if msg.contains("no-such-dir")),
        "{err:?}"
    );
}

#[tokio::test]
async fn embedded_store_refuses_a_file_that_is_not_a_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(EmbeddedStore::FILE_NAME);
    std::fs::write(&path, vec![0x5a; 8192]).unwrap();
    let err = EmbeddedStore::open(&path).unwrap_err();
    assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
}

#[tokio::test]
async fn txn_that_writes_nothing_keeps_the_revision() {
    let dir = tempfile::tempdir().unwrap();
    for store in [
        Box::new(MemoryStore::new()) as Box<dyn StateStore>,
        Box::new(EmbeddedStore::open(&dir.path().join("s.redb")).unwrap()),
    ] {
        let v = store.put("/a", b"1".to_vec()).await.unwrap();
        let outcome = store.txn(Txn::default()).await.unwrap();
        assert!(outcome.succeeded);
        assert_eq!(outcome.revision, v);
        assert!(!store.delete("/missing").await.unwrap());
        assert_eq!(store.put("/b", Vec::new()).await.unwrap(), v + 1);
    }
}

// ---- errors -----------------------------------------------------------------

#[test]
fn only_unavailable_is_retryable() {
    let cases = [
        (StoreError::Unavailable("x".into()), true),
        (StoreError::Locked { path: "p".into() }, false),
        (StoreError::Io("x".into()), false),
        (StoreError::Corrupt("x".into()), false),
        (
            StoreError::ValueTooLarge {
                key: "k".into(),
                len: 2,
                max: 1,
            },
            false,
        ),
        (StoreError::Ambiguous("x".into()), false),
        (StoreError::InvalidRequest("x".into()), false),
        (StoreError::Internal("x".into()), false),
    ];
    for (err, retryable) in cases {
        assert_eq!(err.retryable(), retryable, "{err:?}");
    }
}

// ---- keys -------------------------------------------------------------------

#[track_caller]
fn check_key(actual: Result<String, IdError>, expected: &str) {
    assert_eq!(actual.unwrap(), expected);
}

#[test]
fn key_layout_is_exact() {
    let j = job("mnist-42");
    let w = WorkerId::parse("w-7").unwrap();
    check_key(keys::job_spec(&j), "/ringmaster/v1/jobs/mnist-42/spec");
    check_key(keys::job_status(&j), "/ringmaster/v1/jobs/mnist-42/status");
    check_key(
        keys::job_checkpoint(&j, 1200),
        "/ringmaster/v1/jobs/mnist-42/checkpoints/00000000000000001200",
    );
    check_key(
        keys::job_checkpoint(&j, u64::MAX),
        "/ringmaster/v1/jobs/mnist-42/checkpoints/18446744073709551615",
    );
    check_key(
        keys::job_checkpoints_prefix(&j),
        "/ringmaster/v1/jobs/mnist-42/checkpoints/",
    );
    check_key(keys::job_prefix(&j), "/ringmaster/v1/jobs/mnist-42/");
    check_key(keys::worker(&w), "/ringmaster/v1/workers/w-7");
    assert_eq!(keys::jobs_prefix(), "/ringmaster/v1/jobs/");
    assert_eq!(keys::workers_prefix(), "/ringmaster/v1/workers/");
    assert_eq!(keys::leader(), "/ringmaster/v1/leader");
    assert_eq!(keys::job_seq(), "/ringmaster/v1/meta/job_seq");
}

#[tokio::test]
async fn checkpoint_keys_range_in_numeric_step_order() {
    let store = MemoryStore::new();
    let j = job("a-1");
    for step in [1000u64, 9, 100, 0, 10] {
        store
            .put(&keys::job_checkpoint(&j, step).unwrap(), Vec::new())
            .await
            .unwrap();
    }
    let steps: Vec<u64> = store
        .range(&keys::job_checkpoints_prefix(&j).unwrap())
        .await
        .unwrap()
        .into_iter()
        .map(|(key, _)| match keys::parse_job_key(&key) {
            Some((_, JobKeyKind::Checkpoint(step))) => step,
            other => panic!("{key} parsed as {other:?}"),
        })
        .collect();
    assert_eq!(steps, vec![0, 9, 10, 100, 1000]);
}

#[tokio::test]
async fn job_prefix_does_not_list_a_job_whose_id_extends_it() {
    let store = MemoryStore::new();
    for id in ["a-1", "a-10"] {
        store
            .put(&keys::job_spec(&job(id)).unwrap(), Vec::new())
            .await
            .unwrap();
    }
    let listed = store
        .range(&keys::job_prefix(&job("a-1")).unwrap())
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].0, "/ringmaster/v1/jobs/a-1/spec");
}

#[test]
fn job_keys_parse_back() {
    let j = job("resnet-3");
    for (key, kind) in [
        (keys::job_spec(&j).unwrap(), JobKeyKind::Spec),
        (keys::job_status(&j).unwrap(), JobKeyKind::Status),
        (
            keys::job_checkpoint(&j, 0).unwrap(),
            JobKeyKind::Checkpoint(0),
        ),
        (
            keys::job_checkpoint(&j, 123_456).unwrap(),
            JobKeyKind::Checkpoint(123_456),
        ),
        (
            keys::job_checkpoint(&j, u64::MAX).unwrap(),
            JobKeyKind::Checkpoint(u64::MAX),
        ),
    ] {
        assert_eq!(keys::parse_job_key(&key), Some((j.clone(), kind)), "{key}");
    }
    let w = WorkerId::parse("gpu-node-2").unwrap();
    assert_eq!(keys::parse_worker_key(&keys::worker(&w).unwrap()), Some(w));
}

#[test]
fn foreign_keys_do_not_parse() {
    for key in [
        "",
        "/ringmaster/v1/jobs/",
        "/ringmaster/v1/jobs/a-1",
        "/ringmaster/v1/jobs/a-1/",
        "/ringmaster/v1/jobs/a-1/spec/extra",
        "/ringmaster/v1/jobs/a-1/other",
        "/ringmaster/v2/jobs/a-1/spec",
        "/ringmaster/v1/jobs/A-1/spec",
        "/ringmaster/v1/jobs/a-1/checkpoints/",
        "/ringmaster/v1/jobs/a-1/checkpoints/12",
        "/ringmaster/v1/jobs/a-1/checkpoints/0000000000000000001x",
        "/ringmaster/v1/jobs/a-1/checkpoints/+0000000000000000001",
        "/ringmaster/v1/jobs/a-1/checkpoints/99999999999999999999",
        "/ringmaster/v1/jobs/a-1/checkpoints/000000000000000000001",
        "/ringmaster/v1/workers/w-1",
        "/ringmaster/v1/leader",
    ] {
        assert_eq!(keys::parse_job_key(key), None, "{key:?} must not parse");
    }
    for key in [
        "/ringmaster/v1/workers/",
        "/ringmaster/v1/workers/a/b",
        "/ringmaster/v1/jobs/a-1/spec",
    ] {
        assert_eq!(keys::parse_worker_key(key), None, "{key:?} must not parse");
    }
}

#[test]
fn ids_that_are_not_one_key_segment_are_rejected() {
    for bad in ["a/b", "../x", "", "A-1", "a b", "ümlaut"] {
        assert!(JobId::parse(bad).is_err(), "{bad:?} parsed as a job id");
        assert!(
            WorkerId::parse(bad).is_err(),
            "{bad:?} parsed as a worker id"
        );
    }
    assert_eq!(
        JobId::parse(&"x".repeat(81)),
        Err(IdError::TooLong {
            kind: "job",
            len: 81
        })
    );
    assert_eq!(JobId::parse(&"x".repeat(80)).map(|j| j.0.len()), Ok(80));

    // Ids built directly, bypassing parse, are still refused by the key builders.
    let rogue = JobId("a/b".to_owned());
    assert_eq!(
        keys::job_spec(&rogue),
        Err(IdError::InvalidChar {
            kind: "job",
            id: "a/b".to_owned(),
            ch: '/'
        })
    );
    assert!(keys::job_status(&rogue).is_err());
    assert!(keys::job_checkpoint(&rogue, 1).is_err());
    assert!(keys::job_prefix(&JobId(String::new())).is_err());
    assert!(keys::worker(&WorkerId("w/1".to_owned())).is_err());
    let as_store_error: StoreError = keys::job_spec(&rogue).unwrap_err().into();
    assert!(matches!(as_store_error, StoreError::InvalidRequest(_)));
}

// ---- records ----------------------------------------------------------------

#[test]
fn job_state_names_round_trip() {
    for state in JobState::ALL {
        assert_eq!(state.as_str().parse::<JobState>(), Ok(state));
        assert_eq!(
            serde_json::to_string(&state).unwrap(),
            format!("\"{}\"", state.as_str())
        );
    }
    assert_eq!(JobState::Queued.as_str(), "queued");
    assert_eq!(JobState::Cancelled.as_str(), "cancelled");
    assert_eq!(
        "Running".parse::<JobState>(),
        Err(RecordError::UnknownJobState("Running".to_owned()))
    );
    let finals: Vec<JobState> = JobState::ALL.into_iter().filter(|s| s.is_final()).collect();
    assert_eq!(
        finals,
        vec![JobState::Succeeded, JobState::Failed, JobState::Cancelled]
    );
}

#[test]
fn status_record_round_trips_including_non_finite_metrics() {
    let key = keys::job_status(&job("a-1")).unwrap();
    let mut status = JobStatusRecord::queued(500, "/out/a-1".to_owned(), 1_700_000_000_000);
    status.state = JobState::Running;
    status.generation = 3;
    status.step = 120;
    status.members = vec!["w-1".to_owned(), "w-2".to_owned()];
    status.metrics = BTreeMap::from([
        ("accuracy".to_owned(), 0.875),
        ("loss".to_owned(), f64::NAN),
        ("grad_norm".to_owned(), f64::INFINITY),
        ("min".to_owned(), f64::NEG_INFINITY),
    ]);
    let bytes = records::encode(&key, &status).unwrap();
    let back: JobStatusRecord = records::decode(&key, &bytes).unwrap();
    assert_eq!(back.state, JobState::Running);
    assert_eq!(back.generation, 3);
    assert_eq!(back.step, 120);
    assert_eq!(back.total_steps, 500);
    assert_eq!(back.members, status.members);
    assert_eq!(back.output_dir, "/out/a-1");
    assert_eq!(back.updated_at_ms, 1_700_000_000_000);
    assert_eq!(back.metrics["accuracy"], 0.875);
    assert!(back.metrics["loss"].is_nan());
    assert_eq!(back.metrics["grad_norm"], f64::INFINITY);
    assert_eq!(back.metrics["min"], f64::NEG_INFINITY);
    let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(json["state"], "running");
    assert_eq!(json["metrics"]["loss"], "NaN");
}

#[test]
fn job_record_round_trips_with_the_example_spec() {
    let path = std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/digits-mlp.toml"
    ));
    let source = std::fs::read_to_string(path).unwrap();
    let spec = ringmaster_common::jobspec::JobSpec::from_toml(&source, path).unwrap();
    let id = job("digits-mlp-1");
    let key = keys::job_spec(&id).unwrap();
    let record = records::JobRecord {
        id,
        spec,
        submitted_at_ms: 7,
    };
    let back: records::JobRecord =
        records::decode(&key, &records::encode(&key, &record).unwrap()).unwrap();
    assert_eq!(back, record);
}

#[test]
fn worker_record_round_trips() {
    let key = keys::worker(&WorkerId::parse("w-1").unwrap()).unwrap();
    let record = WorkerRecord {
        id: WorkerId::parse("w-1").unwrap(),
        name: "node-a".to_owned(),
        host: "10.0.0.5".to_owned(),
        device: "cuda:0".to_owned(),
        data_addr: "10.0.0.5:29500".to_owned(),
        registered_at_ms: 42,
    };
    let back: WorkerRecord =
        records::decode(&key, &records::encode(&key, &record).unwrap()).unwrap();
    assert_eq!(back, record);
}

#[test]
fn decode_names_the_key_of_a_bad_record() {
    let key = "/ringmaster/v1/jobs/a-1/status";
    let err = records::decode::<JobStatusRecord>(key, b"{\"state\":\"exploded\"}").unwrap_err();
    assert!(
        matches!(&err, StoreError::Corrupt(msg) if msg.contains(key)),
        "{err:?}"
    );
    let err = records::decode::<JobStatusRecord>(key, b"\xff\x00").unwrap_err();
    assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
    let err = records::decode::<JobStatusRecord>(
        key,
        br#"{"state":"running","generation":1,"step":1,"total_steps":2,"metrics":{"loss":"lots"},"members":[],"reason":null,"output_dir":"o","updated_at_ms":1}"#,
    )
    .unwrap_err();
    assert!(
        matches!(&err, StoreError::Corrupt(msg) if msg.contains("lots")),
        "{err:?}"
    );
}

#[test]
fn decode_refuses_oversized_values_before_parsing() {
    let huge = vec![b' '; MAX_RECORD_BYTES + 1];
    let err = records::decode::<WorkerRecord>("/k", &huge).unwrap_err();
    assert_eq!(
        err,
        StoreError::ValueTooLarge {
            key: "/k".to_owned(),
            len: MAX_RECORD_BYTES + 1,
            max: MAX_RECORD_BYTES
        }
    );
    let mut big = WorkerRecord {
        id: WorkerId::parse("w-1").unwrap(),
        name: String::new(),
        host: String::new(),
        device: String::new(),
        data_addr: String::new(),
        registered_at_ms: 0,
    };
    big.name = "n".repeat(MAX_RECORD_BYTES);
    assert!(matches!(
        records::encode("/k", &big),
        Err(StoreError::ValueTooLarge { .. })
    ));
}
