//! Tests of the state store: the shared conformance suite on the memory,
//! embedded and etcd backends (a real etcd, started on free loopback ports by
//! `ringmaster_tests::etcd`), the embedded store's durability, locking and
//! lease purge on reopen, watch leaks and history bounds, etcd under member
//! loss and with no server at all, `--store` url parsing, the key layout, and
//! the records' encoding.

use ringmaster_common::ids::{IdError, JobId, WorkerId};
use ringmaster_common::records::{
    self, JobState, JobStatusRecord, MAX_RECORD_BYTES, RecordError, WorkerRecord,
};
use ringmaster_store::conformance::{DEADLINE, run_conformance};
use ringmaster_store::keys::{self, JobKeyKind};
use ringmaster_store::{
    EmbeddedStore, EtcdOptions, EtcdStore, HistoryLimits, LeaseId, MemoryStore, StateStore,
    StoreError, StoreUrl, Txn, Versioned, WatchEvent, WatchStream, parse_store_url,
};
use ringmaster_tests::etcd::{EtcdCluster, EtcdProcess};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio_stream::Stream;

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

/// Runs a future on a fresh current-thread runtime, for tests that first
/// start etcd (which blocks while it polls for health).
fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(future)
}

fn start_etcd() -> EtcdProcess {
    EtcdProcess::start().unwrap_or_else(|err| panic!("{err:#}"))
}

async fn connect(endpoints: &[String], request_timeout: Duration) -> EtcdStore {
    let options = EtcdOptions {
        request_timeout,
        ..EtcdOptions::default()
    };
    EtcdStore::connect(endpoints, options).await.unwrap()
}

#[test]
fn etcd_store_conforms() {
    let etcd = start_etcd();
    block_on(async {
        let store = connect(&etcd.endpoints(), Duration::from_secs(5)).await;
        run_conformance(&store).await;
    });
}

// ---- watches: leaks and bounds ----------------------------------------------

/// Polls `check` every 50 ms until it holds, failing after [`DEADLINE`].
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !check() {
        assert!(Instant::now() < deadline, "{what}: not within {DEADLINE:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn next(stream: &mut WatchStream) -> Option<Result<WatchEvent, StoreError>> {
    tokio::time::timeout(DEADLINE, stream.next())
        .await
        .expect("a watch item within the deadline")
}

#[tokio::test]
async fn dropped_watches_are_released_by_local_stores() {
    let dir = tempfile::tempdir().unwrap();
    let memory = MemoryStore::new();
    let embedded = EmbeddedStore::open(&dir.path().join("s.redb")).unwrap();
    let stores: [(&dyn StateStore, &dyn Fn() -> usize); 2] = [
        (&memory, &|| memory.active_watches()),
        (&embedded, &|| embedded.active_watches()),
    ];
    for (store, active) in stores {
        let idle = store.watch("/w/", None).await.unwrap();
        let mut polled = store.watch("/w/", None).await.unwrap();
        let replaying = store.watch("/", Some(1)).await.unwrap();
        assert_eq!(active(), 3);
        let v = store.put("/w/a", b"1".to_vec()).await.unwrap();
        assert_eq!(
            next(&mut polled).await,
            Some(Ok(WatchEvent::Put {
                key: "/w/a".into(),
                value: b"1".to_vec(),
                version: v
            }))
        );
        // Parked on an empty history (its waker registered), then dropped.
        let parked = std::future::poll_fn(|cx| {
            std::task::Poll::Ready(std::pin::Pin::new(&mut polled).poll_next(cx))
        })
        .await;
        assert!(
            parked.is_pending(),
            "no second event was written: {parked:?}"
        );
        drop((idle, polled, replaying));
        assert_eq!(active(), 0, "dropping a watch must release it");
        store.put("/w/b", b"2".to_vec()).await.unwrap();
    }
}

#[tokio::test]
async fn a_watcher_overtaken_by_the_history_bound_gets_compacted() {
    let store = MemoryStore::with_history_limits(HistoryLimits {
        max_events: 4,
        max_bytes: 1 << 20,
    });
    let mut slow = store.watch("/k/", None).await.unwrap();
    let mut versions = Vec::new();
    for i in 0..6u8 {
        versions.push(store.put(&format!("/k/{i}"), vec![i]).await.unwrap());
    }
    // Revisions 1 and 2 fell off a 4-event history.
    assert_eq!(
        next(&mut slow).await,
        Some(Err(StoreError::Compacted {
            requested: versions[0],
            compacted: versions[2]
        }))
    );
    assert_eq!(next(&mut slow).await, None);
    let late = store.watch("/k/", Some(versions[1])).await.unwrap();
    let mut late = late;
    assert_eq!(
        next(&mut late).await,
        Some(Err(StoreError::Compacted {
            requested: versions[1],
            compacted: versions[2]
        }))
    );
    let mut kept = store.watch("/k/", Some(versions[2])).await.unwrap();
    for (i, version) in versions.iter().enumerate().skip(2) {
        assert_eq!(
            next(&mut kept).await,
            Some(Ok(WatchEvent::Put {
                key: format!("/k/{i}"),
                value: vec![i as u8],
                version: *version
            }))
        );
    }

    let bytes = MemoryStore::with_history_limits(HistoryLimits {
        max_events: 100,
        max_bytes: 10,
    });
    let v1 = bytes.put("/a", vec![0; 4]).await.unwrap();
    let v2 = bytes.put("/b", vec![0; 4]).await.unwrap();
    let mut from_first = bytes.watch("/", Some(v1)).await.unwrap();
    assert_eq!(
        next(&mut from_first).await,
        Some(Err(StoreError::Compacted {
            requested: v1,
            compacted: v2
        })),
        "two 6-byte events do not fit in 10 bytes"
    );
}

#[test]
fn dropped_etcd_watches_are_cancelled_in_etcd() {
    let etcd = start_etcd();
    let watchers = || {
        etcd.metric("etcd_debugging_mvcc_watcher_total")
            .unwrap()
            .expect("etcd exports etcd_debugging_mvcc_watcher_total")
    };
    assert_eq!(watchers(), 0.0);
    block_on(async {
        let store = connect(&etcd.endpoints(), Duration::from_secs(5)).await;
        let mut first = store.watch("/w/", None).await.unwrap();
        let second = store.watch("/", Some(1)).await.unwrap();
        assert_eq!(watchers(), 2.0, "watch() returns once etcd created it");
        let v = store.put("/w/a", b"1".to_vec()).await.unwrap();
        assert_eq!(
            next(&mut first).await,
            Some(Ok(WatchEvent::Put {
                key: "/w/a".into(),
                value: b"1".to_vec(),
                version: v
            }))
        );
        drop((first, second));
        eventually("etcd cancels dropped watches", || watchers() == 0.0).await;
        // The connection is still fine for new watches.
        let mut third = store.watch("/w/", None).await.unwrap();
        let v = store.put("/w/b", b"2".to_vec()).await.unwrap();
        assert_eq!(
            next(&mut third).await.map(|e| e.map(|e| e.version())),
            Some(Ok(v))
        );
    });
}

// ---- etcd: trouble ----------------------------------------------------------

#[test]
fn etcd_cluster_keeps_serving_when_a_member_dies() {
    let mut cluster = EtcdCluster::start(3).unwrap_or_else(|err| panic!("{err:#}"));
    let leader = (0..cluster.size())
        .find(|&i| cluster.metric(i, "etcd_server_is_leader").unwrap() == Some(1.0))
        .expect("a 3-member cluster has a leader");
    let follower = (leader + 1) % cluster.size();
    let endpoints = cluster.endpoints();
    let timeout = Duration::from_secs(3);
    block_on(async {
        let store = connect(&endpoints, timeout).await;
        let on_follower = connect(&[cluster.endpoint(follower)], timeout).await;
        let mut follower_watch = on_follower.watch("/m/", None).await.unwrap();

        // A follower dies: nothing the store does fails, although the
        // client keeps trying the dead endpoint for some requests.
        cluster.kill(follower);
        for i in 0..20 {
            let key = format!("/m/f{i}");
            let version = store.put(&key, vec![i]).await.unwrap();
            assert_eq!(
                store.get(&key).await.unwrap(),
                Some(Versioned {
                    value: vec![i],
                    version
                })
            );
        }
        match next(&mut follower_watch).await {
            Some(Err(err)) => assert!(err.retryable(), "{err:?}"),
            other => panic!("a watch on a killed member must end with an error, got {other:?}"),
        }
        assert_eq!(next(&mut follower_watch).await, None);
    });
    cluster.restart(follower).unwrap();

    // The leader dies: a write in flight may be lost or applied (Ambiguous);
    // once a new leader is elected, writes go through again.
    block_on(async {
        let store = connect(&endpoints, timeout).await;
        let before = store.put("/m/before", b"b".to_vec()).await.unwrap();
        cluster.kill(leader);
        let deadline = Instant::now() + DEADLINE;
        let after = loop {
            match store.put("/m/after", b"a".to_vec()).await {
                Ok(version) => break version,
                // Putting the same value again is harmless, so this test
                // may resend where a coordinator would reload.
                Err(err @ (StoreError::Unavailable(_) | StoreError::Ambiguous(_))) => {
                    assert!(
                        Instant::now() < deadline,
                        "no write within {DEADLINE:?}: {err}"
                    );
                }
                Err(err) => panic!("losing the leader must not break writes: {err}"),
            }
        };
        assert!(after > before);
        assert_eq!(
            store.get("/m/before").await.unwrap(),
            Some(Versioned {
                value: b"b".to_vec(),
                version: before
            })
        );
    });

    // The old leader comes back and catches up.
    cluster.restart(leader).unwrap();
    block_on(async {
        let only_restarted = connect(&[cluster.endpoint(leader)], timeout).await;
        assert_eq!(
            only_restarted
                .get("/m/after")
                .await
                .unwrap()
                .map(|v| v.value),
            Some(b"a".to_vec())
        );
        assert_eq!(
            only_restarted.get("/m/f19").await.unwrap().map(|v| v.value),
            Some(vec![19])
        );
    });
}

#[test]
fn a_stopped_etcd_fails_requests_with_retryable_errors_not_hangs() {
    let mut etcd = start_etcd();
    let timeout = Duration::from_secs(1);
    block_on(async {
        let store = connect(&etcd.endpoints(), timeout).await;
        store.put("/s/k", b"v".to_vec()).await.unwrap();
        etcd.kill();
        let read = tokio::time::timeout(DEADLINE, store.get("/s/k"))
            .await
            .expect("a read against a stopped etcd must not hang");
        let err = read.unwrap_err();
        assert!(err.retryable(), "{err:?}");
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
        let watch = tokio::time::timeout(DEADLINE, store.watch("/s/", None))
            .await
            .expect("a watch against a stopped etcd must not hang");
        assert!(
            matches!(watch, Err(StoreError::Unavailable(_))),
            "{watch:?}"
        );
        let write = tokio::time::timeout(DEADLINE, store.put("/s/k", b"w".to_vec()))
            .await
            .expect("a write against a stopped etcd must not hang");
        // A refused connection proves the write was never sent.
        assert!(
            matches!(write, Err(StoreError::Unavailable(_))),
            "{write:?}"
        );

        let never = connect(&["http://127.0.0.1:1".to_owned()], timeout).await;
        let err = tokio::time::timeout(DEADLINE, never.get("/k"))
            .await
            .expect("a read against no etcd must not hang")
            .unwrap_err();
        assert!(err.retryable(), "{err:?}");
    });
    // What was written before the stop is still there after a restart, and
    // the refused write is not.
    etcd.restart().unwrap();
    block_on(async {
        let store = connect(&etcd.endpoints(), Duration::from_secs(5)).await;
        let value = store.get("/s/k").await.unwrap().map(|v| v.value);
        assert_eq!(value, Some(b"v".to_vec()));
    });
}

#[test]
fn etcd_txn_that_writes_nothing_keeps_the_revision() {
    let etcd = start_etcd();
    block_on(async {
        let store = connect(&etcd.endpoints(), Duration::from_secs(5)).await;
        let v = store.put("/a", b"1".to_vec()).await.unwrap();
        let outcome = store.txn(Txn::default()).await.unwrap();
        assert!(outcome.succeeded);
        assert_eq!(outcome.revision, v);
        assert!(!store.delete("/missing").await.unwrap());
        assert_eq!(store.put("/b", Vec::new()).await.unwrap(), v + 1);
        let (all, revision) = store.range_with_revision("").await.unwrap();
        assert_eq!(revision, v + 1);
        assert_eq!(
            all.into_iter().map(|(k, _)| k).collect::<Vec<_>>(),
            vec!["/a".to_owned(), "/b".to_owned()],
            "the empty prefix lists every key"
        );
    });
}

// ---- embedded: durability and locking ---------------------------------------

#[tokio::test]
async fn embedded_store_reopens_without_leases_or_their_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(EmbeddedStore::FILE_NAME);
    let (lease, plain, last) = {
        let store = EmbeddedStore::open(&path).unwrap();
        let lease = store.grant_lease(Duration::from_secs(60)).await.unwrap();
        store
            .put_with_lease("/w/leased", b"l".to_vec(), lease)
            .await
            .unwrap();
        store
            .put_with_lease("/w/detached", b"l".to_vec(), lease)
            .await
            .unwrap();
        let plain = store.put("/w/detached", b"p".to_vec()).await.unwrap();
        let last = store.put("/w/plain", b"p".to_vec()).await.unwrap();
        (lease, plain, last)
    };

    let store = EmbeddedStore::open(&path).unwrap();
    let (found, revision) = store.range_with_revision("/w/").await.unwrap();
    assert_eq!(
        found,
        vec![
            (
                "/w/detached".to_owned(),
                Versioned {
                    value: b"p".to_vec(),
                    version: plain
                }
            ),
            (
                "/w/plain".to_owned(),
                Versioned {
                    value: b"p".to_vec(),
                    version: last
                }
            ),
        ],
        "keys bound to a lease are deleted on reopen; detached ones stay"
    );
    assert_eq!(revision, last + 1, "the purge is one revision");
    assert_eq!(
        store.keep_alive(lease).await,
        Err(StoreError::LeaseNotFound(lease))
    );
    let mut old = store.watch("/w/", Some(last)).await.unwrap();
    assert_eq!(
        old.next().await,
        Some(Err(StoreError::Compacted {
            requested: last,
            compacted: last + 2
        })),
        "a reopened store has no history before its first new revision"
    );
    let mut fresh = store.watch("/w/", Some(last + 2)).await.unwrap();
    let v = store.put("/w/new", b"n".to_vec()).await.unwrap();
    assert_eq!(v, last + 2);
    assert_eq!(
        fresh.next().await,
        Some(Ok(WatchEvent::Put {
            key: "/w/new".into(),
            value: b"n".to_vec(),
            version: v
        }))
    );
    drop(store);
    let store = EmbeddedStore::open(&path).unwrap();
    assert_eq!(
        store.range_with_revision("/w/").await.unwrap().1,
        v,
        "a reopen with no leased keys writes nothing"
    );
}

#[tokio::test]
async fn embedded_store_upgrades_a_format_1_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(EmbeddedStore::FILE_NAME);
    {
        // The walking skeleton's layout: kv and meta, format 1.
        let db = redb::Database::create(&path).unwrap();
        let tx = db.begin_write().unwrap();
        {
            let mut kv = tx
                .open_table(redb::TableDefinition::<&str, (u64, &[u8])>::new("kv"))
                .unwrap();
            kv.insert("/old", (7, b"v".as_slice())).unwrap();
            let mut meta = tx
                .open_table(redb::TableDefinition::<&str, u64>::new("meta"))
                .unwrap();
            meta.insert("format", 1).unwrap();
            meta.insert("revision", 7).unwrap();
        }
        tx.commit().unwrap();
    }
    let store = EmbeddedStore::open(&path).unwrap();
    assert_eq!(
        store.get("/old").await.unwrap(),
        Some(Versioned {
            value: b"v".to_vec(),
            version: 7
        })
    );
    let lease = store.grant_lease(Duration::from_secs(60)).await.unwrap();
    assert_eq!(
        store
            .put_with_lease("/new", b"n".to_vec(), lease)
            .await
            .unwrap(),
        8
    );
}

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
        (
            StoreError::Compacted {
                requested: 1,
                compacted: 2,
            },
            false,
        ),
        (StoreError::LeaseNotFound(LeaseId(1)), false),
        (StoreError::PermissionDenied("x".into()), false),
    ];
    for (err, retryable) in cases {
        assert_eq!(err.retryable(), retryable, "{err:?}");
    }
}

#[test]
fn store_errors_say_what_broke() {
    assert_eq!(
        StoreError::Compacted {
            requested: 3,
            compacted: 9
        }
        .to_string(),
        "revision 3 has been compacted, the oldest watchable revision is 9"
    );
    assert_eq!(
        StoreError::LeaseNotFound(LeaseId(0x1f)).to_string(),
        "lease 1f not found (expired or revoked)"
    );
}

// ---- store urls -------------------------------------------------------------

#[track_caller]
fn check_url(url: &str, expected: Result<StoreUrl, &str>) {
    match (parse_store_url(url), expected) {
        (Ok(got), Ok(want)) => assert_eq!(got, want, "{url}"),
        (Err(StoreError::InvalidRequest(msg)), Err(want)) => {
            assert!(msg.contains(want), "{url}: {msg:?} lacks {want:?}")
        }
        (got, want) => panic!("{url}: got {got:?}, want {want:?}"),
    }
}

#[test]
fn store_urls_parse() {
    let etcd = |eps: &[&str]| Ok(StoreUrl::Etcd(eps.iter().map(|e| e.to_string()).collect()));
    let embedded = |p: &str| Ok(StoreUrl::Embedded(PathBuf::from(p)));
    check_url(
        "etcd://h1:2379,h2:2379",
        etcd(&["http://h1:2379", "http://h2:2379"]),
    );
    check_url("etcd://127.0.0.1:1", etcd(&["http://127.0.0.1:1"]));
    check_url("etcd://[::1]:2379", etcd(&["http://[::1]:2379"]));
    check_url(
        "embedded:///var/lib/rm/s.redb",
        embedded("/var/lib/rm/s.redb"),
    );
    check_url("state/s.redb", embedded("state/s.redb"));
    check_url("/abs/dir", embedded("/abs/dir"));
    check_url("", Err("is empty"));
    check_url("etcd://", Err("endpoint is empty"));
    check_url("etcd://h1:2379,", Err("endpoint is empty"));
    check_url("etcd://h1", Err("has no port"));
    check_url("etcd://h1:0", Err("invalid port"));
    check_url("etcd://h1:99999", Err("invalid port"));
    check_url("etcd://h1:2379/path", Err("not host:port"));
    check_url("etcd://:2379", Err("no valid host"));
    check_url("etcd://::1:2379", Err("no valid host"));
    check_url("embedded://relative", Err("absolute path"));
    check_url("zookeeper://h:1", Err("unknown scheme"));
    let parsed: StoreUrl = "etcd://a:1,b:2".parse().unwrap();
    assert_eq!(parsed.to_string(), "etcd://a:1,b:2");
    assert_eq!(
        parse_store_url("embedded:///x").unwrap().to_string(),
        "embedded:///x"
    );
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
        "/../../examples/digits-mlp.toml"
    ));
    let source = std::fs::read_to_string(path).unwrap();
    let spec = ringmaster_common::jobspec::JobSpec::from_toml(&source, path).unwrap();
    let id = job("digits-mlp-1");
    let key = keys::job_spec(&id).unwrap();
    let record = records::JobRecord {
        resume_from: None,
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
    let err: StoreError = records::decode::<JobStatusRecord>(key, b"{\"state\":\"exploded\"}")
        .unwrap_err()
        .into();
    assert!(
        matches!(&err, StoreError::Corrupt(msg) if msg.contains(key)),
        "{err:?}"
    );
    let err: StoreError = records::decode::<JobStatusRecord>(key, b"\xff\x00")
        .unwrap_err()
        .into();
    assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
    let err: StoreError = records::decode::<JobStatusRecord>(
        key,
        br#"{"state":"running","generation":1,"step":1,"total_steps":2,"metrics":{"loss":"lots"},"members":[],"reason":null,"output_dir":"o","updated_at_ms":1}"#,
    )
    .unwrap_err().into();
    assert!(
        matches!(&err, StoreError::Corrupt(msg) if msg.contains("lots")),
        "{err:?}"
    );
}

#[test]
fn decode_refuses_oversized_values_before_parsing() {
    let huge = vec![b' '; MAX_RECORD_BYTES + 1];
    let err: StoreError = records::decode::<WorkerRecord>("/k", &huge)
        .unwrap_err()
        .into();
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
        records::encode("/k", &big).map_err(StoreError::from),
        Err(StoreError::ValueTooLarge { .. })
    ));
}

/// A deposed leader cannot write: its fenced store refuses every mutation
/// once the leader key is someone else's, while the new leader's works.
#[tokio::test]
async fn a_deposed_leaders_writes_are_fenced() {
    use ringmaster_store::fenced::FencedStore;
    use ringmaster_store::{MemoryStore, StateStore, StoreError, keys};
    use std::sync::Arc;
    let inner: Arc<dyn StateStore> = Arc::new(MemoryStore::new());
    let old_version = inner
        .put(&keys::leader(), b"http://a".to_vec())
        .await
        .unwrap();
    let old = FencedStore::new(inner.clone(), keys::leader(), old_version);
    old.put("/x", b"1".to_vec()).await.unwrap();
    assert!(old.delete("/x").await.unwrap());

    // Leadership moves to another coordinator.
    inner.delete(&keys::leader()).await.unwrap();
    let new_version = inner
        .put(&keys::leader(), b"http://b".to_vec())
        .await
        .unwrap();
    let new = FencedStore::new(inner.clone(), keys::leader(), new_version);

    for result in [
        old.put("/y", b"2".to_vec()).await.map(|_| ()),
        old.delete("/x").await.map(|_| ()),
        old.compare_and_swap("/z", None, b"3".to_vec())
            .await
            .map(|_| ()),
    ] {
        match result {
            Err(StoreError::NotLeader(why)) => {
                assert_eq!(
                    why,
                    "/ringmaster/v1/leader changed since this coordinator was elected"
                )
            }
            other => panic!("expected NotLeader, got {other:?}"),
        }
    }
    assert!(inner.get("/y").await.unwrap().is_none());
    assert!(inner.get("/z").await.unwrap().is_none());
    new.put("/y", b"2".to_vec()).await.unwrap();
    assert_eq!(inner.get("/y").await.unwrap().unwrap().value, b"2");
    // The new leader's own failed compare is an ordinary `false`.
    assert!(
        !new.compare_and_swap("/y", None, b"4".to_vec())
            .await
            .unwrap()
    );
}
