//! The one behaviour suite every [`StateStore`] backend must pass, called from
//! each backend's tests (`common/tests/store.rs`: memory, embedded, etcd). It is
//! compiled into the library so that every backend's test crate can share it;
//! it panics with a message naming the broken expectation, as tests do.
//!
//! It writes only under [`PREFIX`] and expects nothing there when it starts.
//! It compacts the store's watch history, so give it a store of its own.
//! Backend-specific behaviour (durability, locking, leaks, history bounds) is
//! tested next to the backend, not here.
//!
//! Timing: nothing here asserts how fast anything happens. Waits for a watch
//! event or a lease expiry poll against a generous deadline
//! ([`DEADLINE`]) and fail only when it passes. The lease checks rely on
//! this much of etcd's TTL semantics: a lease lives at least its granted TTL
//! (the one `keep_alive` reports, which may be above the requested one) after
//! its last refresh, and ends some time after that; keep-alives a quarter TTL
//! apart keep it alive. They request 1 s TTLs, so a run takes a few seconds.

use super::{
    Compare, LeaseId, Op, StateStore, StoreError, Txn, Versioned, WatchEvent, WatchStream,
};
use std::time::Duration;
use tokio::time::Instant;

/// How long the suite waits for something that must happen before calling
/// it a failure.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// Every key the suite writes starts with this.
pub const PREFIX: &str = "/conformance/";

fn k(rest: &str) -> String {
    format!("{PREFIX}{rest}")
}

#[track_caller]
fn ok<T>(what: &str, result: Result<T, StoreError>) -> T {
    match result {
        Ok(value) => value,
        Err(err) => panic!("{what}: store error: {err}"),
    }
}

/// Runs every check against `store`.
pub async fn run_conformance(store: &dyn StateStore) {
    let existing = ok("range before start", store.range(PREFIX).await);
    assert!(
        existing.is_empty(),
        "conformance needs an empty {PREFIX}, found {} keys",
        existing.len()
    );
    basics(store).await;
    range(store).await;
    txn_branches(store).await;
    compare_and_swap(store).await;
    atomicity(store).await;
    large_and_unicode(store).await;
    invalid_requests(store).await;
    range_revision(store).await;
    watch_order_and_prefix(store).await;
    watch_compaction(store).await;
    watch_cancellation(store).await;
    leases(store).await;
    lease_refusals(store).await;
}

async fn basics(store: &dyn StateStore) {
    let key = k("basic/one");
    assert_eq!(
        ok("get missing", store.get(&key).await),
        None,
        "get of a key never written must be None"
    );

    let v1 = ok("first put", store.put(&key, b"alpha".to_vec()).await);
    assert!(v1 >= 1, "versions start at 1, put returned {v1}");
    assert_eq!(
        ok("get after put", store.get(&key).await),
        Some(Versioned {
            value: b"alpha".to_vec(),
            version: v1
        }),
        "get must return the bytes and the version that put returned"
    );

    let other = k("basic/two");
    let v_other = ok("put other key", store.put(&other, b"beta".to_vec()).await);
    assert!(
        v_other > v1,
        "versions must grow across keys: {v_other} after {v1}"
    );

    let v2 = ok("overwrite", store.put(&key, b"gamma".to_vec()).await);
    assert!(
        v2 > v_other,
        "an overwrite must get a newer version: {v2} after {v_other}"
    );
    assert_eq!(
        ok("get after overwrite", store.get(&key).await),
        Some(Versioned {
            value: b"gamma".to_vec(),
            version: v2
        }),
        "overwrite must replace the value"
    );

    let empty = k("basic/empty");
    let v_empty = ok("put empty value", store.put(&empty, Vec::new()).await);
    assert_eq!(
        ok("get empty value", store.get(&empty).await),
        Some(Versioned {
            value: Vec::new(),
            version: v_empty
        }),
        "an empty value is a value, not an absent key"
    );

    assert!(
        ok("delete existing", store.delete(&key).await),
        "delete of an existing key must return true"
    );
    assert_eq!(
        ok("get after delete", store.get(&key).await),
        None,
        "a deleted key must read as absent"
    );
    assert!(
        !ok("delete again", store.delete(&key).await),
        "delete of a missing key must return false"
    );
    let v3 = ok("put after delete", store.put(&key, b"delta".to_vec()).await);
    assert!(
        v3 > v_empty,
        "a re-created key must get a newer version than every earlier write: {v3} after {v_empty}"
    );
    assert_eq!(
        ok("get other key", store.get(&other).await).map(|v| v.version),
        Some(v_other),
        "writes to one key must not change another key's version"
    );
}

async fn range(store: &dyn StateStore) {
    // Inserted out of order on purpose.
    let keys = ["r/a/bc", "r/a/b/y", "r/a/b", "r/a/b/x", "r/a/a", "r/b"];
    let mut versions = Vec::new();
    for key in keys {
        let version = ok(
            "put for range",
            store.put(&k(key), key.as_bytes().to_vec()).await,
        );
        versions.push((k(key), version));
    }

    let names = |found: &[(String, Versioned)]| -> Vec<String> {
        found.iter().map(|(key, _)| key.clone()).collect()
    };

    let dir = ok("range of a directory", store.range(&k("r/a/b/")).await);
    assert_eq!(
        names(&dir),
        vec![k("r/a/b/x"), k("r/a/b/y")],
        "range(\"/a/b/\") must return exactly /a/b's children, sorted, not the sibling /a/bc"
    );

    let bare = ok("range of a bare prefix", store.range(&k("r/a/b")).await);
    assert_eq!(
        names(&bare),
        vec![k("r/a/b"), k("r/a/b/x"), k("r/a/b/y"), k("r/a/bc")],
        "range is a byte-wise prefix match, sorted by key"
    );

    let all = ok("range of everything", store.range(&k("r/")).await);
    assert_eq!(all.len(), keys.len(), "range(\"r/\") must return every key");
    for (key, found) in &all {
        let (_, version) = versions
            .iter()
            .find(|(k, _)| k == key)
            .unwrap_or_else(|| panic!("range returned a key never written: {key:?}"));
        assert_eq!(
            found.version, *version,
            "range must return each key's version ({key:?})"
        );
        assert_eq!(
            found.value,
            key.strip_prefix(PREFIX).unwrap_or_default().as_bytes(),
            "range must return each key's value ({key:?})"
        );
    }

    let none = ok("range with no match", store.range(&k("r/zzz")).await);
    assert!(
        none.is_empty(),
        "range with no matching key must be empty, got {:?}",
        names(&none)
    );
}

async fn txn_branches(store: &dyn StateStore) {
    let guard = k("txn/guard");
    let v_guard = ok("put guard", store.put(&guard, b"1".to_vec()).await);
    let doomed = k("txn/doomed");
    ok("put doomed", store.put(&doomed, b"x".to_vec()).await);

    // Success branch: all compares hold.
    let outcome = ok(
        "txn success",
        store
            .txn(Txn {
                compares: vec![
                    Compare::Version {
                        key: guard.clone(),
                        version: Some(v_guard),
                    },
                    Compare::Value {
                        key: guard.clone(),
                        value: Some(b"1".to_vec()),
                    },
                    Compare::Version {
                        key: k("txn/absent"),
                        version: None,
                    },
                    Compare::Value {
                        key: k("txn/absent"),
                        value: None,
                    },
                ],
                success: vec![
                    Op::Put {
                        key: k("txn/s1"),
                        value: b"s1".to_vec(),
                    },
                    Op::Put {
                        key: k("txn/s2"),
                        value: b"s2".to_vec(),
                    },
                    Op::Delete {
                        key: doomed.clone(),
                    },
                ],
                failure: vec![Op::Put {
                    key: k("txn/f"),
                    value: b"f".to_vec(),
                }],
            })
            .await,
    );
    assert!(
        outcome.succeeded,
        "txn whose compares all hold must succeed"
    );
    assert!(
        outcome.revision > v_guard,
        "a writing txn must move the revision past {v_guard}, got {}",
        outcome.revision
    );
    for (key, value) in [("txn/s1", b"s1"), ("txn/s2", b"s2")] {
        assert_eq!(
            ok("get success put", store.get(&k(key)).await),
            Some(Versioned {
                value: value.to_vec(),
                version: outcome.revision
            }),
            "every put of a txn gets the txn's revision ({key})"
        );
    }
    assert_eq!(
        ok("get deleted by txn", store.get(&doomed).await),
        None,
        "the success branch's delete must apply"
    );
    assert_eq!(
        ok("get failure put", store.get(&k("txn/f")).await),
        None,
        "the failure branch must not run when compares hold"
    );

    // Failure branch: one stale version is enough.
    let outcome = ok(
        "txn failure",
        store
            .txn(Txn {
                compares: vec![Compare::Version {
                    key: guard.clone(),
                    version: Some(v_guard + 1_000_000),
                }],
                success: vec![Op::Put {
                    key: k("txn/s3"),
                    value: b"s3".to_vec(),
                }],
                failure: vec![Op::Put {
                    key: k("txn/f"),
                    value: b"f".to_vec(),
                }],
            })
            .await,
    );
    assert!(
        !outcome.succeeded,
        "txn with a version that does not match must fail"
    );
    assert_eq!(
        ok("get failure put", store.get(&k("txn/f")).await),
        Some(Versioned {
            value: b"f".to_vec(),
            version: outcome.revision
        }),
        "the failure branch must run when a compare fails"
    );
    assert_eq!(
        ok("get skipped success put", store.get(&k("txn/s3")).await),
        None,
        "the success branch must not run when a compare fails"
    );

    // Each compare kind fails on its own.
    let failing = [
        (
            "value mismatch",
            Compare::Value {
                key: guard.clone(),
                value: Some(b"2".to_vec()),
            },
        ),
        (
            "value on a missing key",
            Compare::Value {
                key: k("txn/absent"),
                value: Some(b"1".to_vec()),
            },
        ),
        (
            "absent value on an existing key",
            Compare::Value {
                key: guard.clone(),
                value: None,
            },
        ),
        (
            "absent version on an existing key",
            Compare::Version {
                key: guard.clone(),
                version: None,
            },
        ),
        (
            "version on a missing key",
            Compare::Version {
                key: k("txn/absent"),
                version: Some(v_guard),
            },
        ),
    ];
    for (name, compare) in failing {
        let outcome = ok(
            name,
            store
                .txn(Txn {
                    compares: vec![compare],
                    success: vec![Op::Put {
                        key: k("txn/never"),
                        value: Vec::new(),
                    }],
                    failure: Vec::new(),
                })
                .await,
        );
        assert!(!outcome.succeeded, "compare must fail: {name}");
    }
    assert_eq!(
        ok("get never", store.get(&k("txn/never")).await),
        None,
        "no failing compare may run the success branch"
    );
}

async fn compare_and_swap(store: &dyn StateStore) {
    let key = k("cas/key");
    assert!(
        ok(
            "cas create",
            store.compare_and_swap(&key, None, b"one".to_vec()).await
        ),
        "create-if-absent must succeed on a missing key"
    );
    let v1 = ok("get after cas create", store.get(&key).await)
        .map(|v| v.version)
        .unwrap_or_else(|| panic!("cas create wrote nothing"));
    assert!(
        !ok(
            "cas create again",
            store.compare_and_swap(&key, None, b"two".to_vec()).await
        ),
        "create-if-absent must fail on an existing key"
    );
    assert!(
        ok(
            "cas update",
            store
                .compare_and_swap(&key, Some(v1), b"three".to_vec())
                .await
        ),
        "update-if-version must succeed with the current version"
    );
    let now = ok("get after cas update", store.get(&key).await);
    let v2 = now.as_ref().map(|v| v.version).unwrap_or(0);
    assert_eq!(
        now.map(|v| v.value),
        Some(b"three".to_vec()),
        "cas update must write the new value"
    );
    assert!(v2 > v1, "cas update must bump the version: {v2} after {v1}");
    assert!(
        !ok(
            "cas stale",
            store
                .compare_and_swap(&key, Some(v1), b"four".to_vec())
                .await
        ),
        "update-if-version must fail with a stale version"
    );
    assert_eq!(
        ok("get after stale cas", store.get(&key).await),
        Some(Versioned {
            value: b"three".to_vec(),
            version: v2
        }),
        "a failed cas must change nothing"
    );
}

async fn atomicity(store: &dyn StateStore) {
    ok("put a", store.put(&k("atom/a"), b"a".to_vec()).await);
    ok("put b", store.put(&k("atom/b"), b"b".to_vec()).await);
    let before = ok("range before", store.range(&k("atom/")).await);

    let outcome = ok(
        "failing txn",
        store
            .txn(Txn {
                compares: vec![
                    Compare::Value {
                        key: k("atom/a"),
                        value: Some(b"a".to_vec()),
                    },
                    Compare::Value {
                        key: k("atom/b"),
                        value: Some(b"not b".to_vec()),
                    },
                ],
                success: vec![
                    Op::Put {
                        key: k("atom/a"),
                        value: b"changed".to_vec(),
                    },
                    Op::Delete { key: k("atom/b") },
                    Op::Put {
                        key: k("atom/c"),
                        value: b"new".to_vec(),
                    },
                ],
                failure: Vec::new(),
            })
            .await,
    );
    assert!(
        !outcome.succeeded,
        "txn with one failing compare among holding ones must fail"
    );
    assert_eq!(
        ok("range after", store.range(&k("atom/")).await),
        before,
        "a failed txn must change no value and no version"
    );

    let outcome = ok(
        "multi-op txn",
        store
            .txn(Txn {
                compares: Vec::new(),
                success: vec![
                    Op::Put {
                        key: k("atom/a"),
                        value: b"a2".to_vec(),
                    },
                    Op::Delete { key: k("atom/b") },
                    Op::Put {
                        key: k("atom/c"),
                        value: b"c".to_vec(),
                    },
                ],
                failure: Vec::new(),
            })
            .await,
    );
    assert!(outcome.succeeded, "txn with no compares must succeed");
    let after: Vec<(String, Vec<u8>, u64)> = ok("range after", store.range(&k("atom/")).await)
        .into_iter()
        .map(|(key, v)| (key, v.value, v.version))
        .collect();
    assert_eq!(
        after,
        vec![
            (k("atom/a"), b"a2".to_vec(), outcome.revision),
            (k("atom/c"), b"c".to_vec(), outcome.revision),
        ],
        "a succeeded txn must apply all its ops at one revision"
    );
}

async fn large_and_unicode(store: &dyn StateStore) {
    let large: Vec<u8> = (0..(1usize << 20)).map(|i| (i % 251) as u8).collect();
    let key = k("large");
    let version = ok("put 1 MiB", store.put(&key, large.clone()).await);
    let found = ok("get 1 MiB", store.get(&key).await);
    assert_eq!(
        found.as_ref().map(|v| v.version),
        Some(version),
        "1 MiB value version"
    );
    assert!(
        found.map(|v| v.value) == Some(large),
        "a 1 MiB value must come back byte for byte"
    );

    // 'z' (0x7a) sorts before 'é' (0xc3 0xa9) and '日' (0xe6 ...) byte-wise.
    let names = ["u/日本語/ключ/🦀", "u/é", "u/z"];
    for name in names {
        ok(
            "put unicode",
            store.put(&k(name), name.as_bytes().to_vec()).await,
        );
    }
    for name in names {
        assert_eq!(
            ok("get unicode", store.get(&k(name)).await).map(|v| v.value),
            Some(name.as_bytes().to_vec()),
            "unicode key {name:?} must round-trip"
        );
    }
    let found: Vec<String> = ok("range unicode", store.range(&k("u/")).await)
        .into_iter()
        .map(|(key, _)| key)
        .collect();
    assert_eq!(
        found,
        vec![k("u/z"), k("u/é"), k("u/日本語/ключ/🦀")],
        "unicode keys must sort byte-wise"
    );
    let found: Vec<String> = ok("range unicode prefix", store.range(&k("u/日本語/")).await)
        .into_iter()
        .map(|(key, _)| key)
        .collect();
    assert_eq!(
        found,
        vec![k("u/日本語/ключ/🦀")],
        "a unicode prefix must match"
    );
}

async fn invalid_requests(store: &dyn StateStore) {
    let put_empty = store.put("", b"x".to_vec()).await;
    assert!(
        matches!(put_empty, Err(StoreError::InvalidRequest(_))),
        "put of the empty key must be an invalid request, got {put_empty:?}"
    );

    let key = k("invalid/dup");
    let dup = store
        .txn(Txn {
            compares: Vec::new(),
            success: vec![
                Op::Put {
                    key: key.clone(),
                    value: b"1".to_vec(),
                },
                Op::Delete { key: key.clone() },
            ],
            failure: Vec::new(),
        })
        .await;
    assert!(
        matches!(dup, Err(StoreError::InvalidRequest(_))),
        "a txn branch touching one key twice must be an invalid request, got {dup:?}"
    );

    let zero = store
        .txn(Txn {
            compares: vec![Compare::Version {
                key: key.clone(),
                version: Some(0),
            }],
            success: vec![Op::Put {
                key: key.clone(),
                value: b"1".to_vec(),
            }],
            failure: Vec::new(),
        })
        .await;
    assert!(
        matches!(zero, Err(StoreError::InvalidRequest(_))),
        "a compare on version 0 must be an invalid request, got {zero:?}"
    );
    assert_eq!(
        ok("get after invalid txns", store.get(&key).await),
        None,
        "an invalid txn must change nothing"
    );
}

async fn range_revision(store: &dyn StateStore) {
    let v = ok("put", store.put(&k("rev/a"), b"a".to_vec()).await);
    let (found, revision) = ok(
        "range with revision",
        store.range_with_revision(&k("rev/")).await,
    );
    assert_eq!(
        revision, v,
        "a range right after a put must be served at that put's revision"
    );
    assert_eq!(
        found,
        vec![(
            k("rev/a"),
            Versioned {
                value: b"a".to_vec(),
                version: v
            }
        )],
        "range_with_revision must return the same entries as range"
    );
}

/// The next item of a watch, which must be an event and come before
/// [`DEADLINE`].
#[track_caller]
fn next_event(
    stream: &mut WatchStream,
    what: &str,
) -> impl std::future::Future<Output = WatchEvent> {
    let caller = std::panic::Location::caller();
    async move {
        match tokio::time::timeout(DEADLINE, stream.next()).await {
            Ok(Some(Ok(event))) => event,
            Ok(Some(Err(err))) => panic!("{what} (at {caller}): watch failed: {err}"),
            Ok(None) => panic!("{what} (at {caller}): watch ended"),
            Err(_) => panic!("{what} (at {caller}): no watch event within {DEADLINE:?}"),
        }
    }
}

async fn expect_events(stream: &mut WatchStream, what: &str, expected: &[WatchEvent]) {
    let mut got = Vec::new();
    for _ in expected {
        got.push(next_event(stream, what).await);
    }
    assert_eq!(got, expected, "{what}");
}

fn put_event(key: &str, value: &[u8], version: u64) -> WatchEvent {
    WatchEvent::Put {
        key: key.to_owned(),
        value: value.to_vec(),
        version,
    }
}

fn delete_event(key: &str, version: u64) -> WatchEvent {
    WatchEvent::Delete {
        key: key.to_owned(),
        version,
    }
}

/// The store revision now, read through a range of nothing.
async fn current_revision(store: &dyn StateStore) -> u64 {
    ok(
        "range for the revision",
        store.range_with_revision(&k("nothing/")).await,
    )
    .1
}

async fn watch_order_and_prefix(store: &dyn StateStore) {
    let dir = k("w/a/");
    let mut watch = ok("watch a directory", store.watch(&dir, None).await);
    let mut parent = ok("watch the parent", store.watch(&k("w/"), None).await);

    let v1 = ok("put a/1", store.put(&k("w/a/1"), b"1".to_vec()).await);
    let v_sibling = ok("put sibling", store.put(&k("w/ab"), b"s".to_vec()).await);
    let v_other = ok("put b/x", store.put(&k("w/b/x"), b"x".to_vec()).await);
    let v2 = ok("put a/2", store.put(&k("w/a/2"), b"2".to_vec()).await);
    assert!(ok("delete a/1", store.delete(&k("w/a/1")).await));
    let v_del = current_revision(store).await;
    assert!(
        !ok("delete missing", store.delete(&k("w/a/never")).await),
        "the key was never written"
    );
    let txn = ok(
        "txn in the directory",
        store
            .txn(Txn {
                compares: Vec::new(),
                success: vec![
                    Op::Put {
                        key: k("w/a/3"),
                        value: b"3".to_vec(),
                    },
                    Op::Delete { key: k("w/a/2") },
                    Op::Put {
                        key: k("w/b/y"),
                        value: b"y".to_vec(),
                    },
                ],
                failure: Vec::new(),
            })
            .await,
    );
    let r = txn.revision;
    let in_dir = vec![
        put_event(&k("w/a/1"), b"1", v1),
        put_event(&k("w/a/2"), b"2", v2),
        delete_event(&k("w/a/1"), v_del),
        put_event(&k("w/a/3"), b"3", r),
        delete_event(&k("w/a/2"), r),
    ];
    expect_events(
        &mut watch,
        "a watch sees its prefix's changes in revision order, a txn's in op order, \
         no sibling (w/ab), no delete of a missing key",
        &in_dir,
    )
    .await;
    expect_events(
        &mut parent,
        "a watch on the parent sees every change below it",
        &[
            put_event(&k("w/a/1"), b"1", v1),
            put_event(&k("w/ab"), b"s", v_sibling),
            put_event(&k("w/b/x"), b"x", v_other),
            put_event(&k("w/a/2"), b"2", v2),
            delete_event(&k("w/a/1"), v_del),
            put_event(&k("w/a/3"), b"3", r),
            delete_event(&k("w/a/2"), r),
            put_event(&k("w/b/y"), b"y", r),
        ],
    )
    .await;

    // Nothing else is queued: the next event is a later write.
    let v_next = ok("put a/4", store.put(&k("w/a/4"), b"4".to_vec()).await);
    expect_events(
        &mut watch,
        "after the txn the directory watch sees only the next write",
        &[put_event(&k("w/a/4"), b"4", v_next)],
    )
    .await;

    let mut replay = ok("watch from a revision", store.watch(&dir, Some(v1)).await);
    let mut replayed = in_dir.clone();
    replayed.push(put_event(&k("w/a/4"), b"4", v_next));
    expect_events(
        &mut replay,
        "a watch from a past revision replays every change since, in order",
        &replayed,
    )
    .await;
    let mut partial = ok(
        "watch from a later revision",
        store.watch(&dir, Some(v2)).await,
    );
    expect_events(
        &mut partial,
        "a watch from revision r starts with the change at r",
        &replayed[1..],
    )
    .await;
    let v_live = ok("put a/5", store.put(&k("w/a/5"), b"5".to_vec()).await);
    expect_events(
        &mut replay,
        "a replaying watch goes on live after the replay",
        &[put_event(&k("w/a/5"), b"5", v_live)],
    )
    .await;

    let zero = store.watch(&dir, Some(0)).await;
    assert!(
        matches!(zero, Err(StoreError::InvalidRequest(_))),
        "a watch from revision 0 must be an invalid request, got {zero:?}"
    );
}

async fn watch_compaction(store: &dyn StateStore) {
    let dir = k("c/");
    let v_old = ok("put old", store.put(&k("c/old"), b"o".to_vec()).await);
    ok("put between", store.put(&k("c/mid"), b"m".to_vec()).await);
    let v_at = ok("put at", store.put(&k("c/at"), b"a".to_vec()).await);
    ok("compact", store.compact(v_at).await);

    let mut stale = ok(
        "watch before the compaction",
        store.watch(&dir, Some(v_old)).await,
    );
    match tokio::time::timeout(DEADLINE, stale.next()).await {
        Ok(Some(Err(err))) => {
            assert_eq!(
                err,
                StoreError::Compacted {
                    requested: v_old,
                    compacted: v_at
                },
                "a watch from before the compaction must fail with Compacted"
            );
            assert!(!err.retryable(), "Compacted is not retryable");
        }
        other => {
            panic!("a watch from before the compaction must fail with Compacted, got {other:?}")
        }
    }
    assert!(
        matches!(tokio::time::timeout(DEADLINE, stale.next()).await, Ok(None)),
        "a watch ends after its error"
    );

    let mut fresh = ok(
        "watch from the compaction",
        store.watch(&dir, Some(v_at)).await,
    );
    expect_events(
        &mut fresh,
        "a watch from the compaction revision still sees the change at it",
        &[put_event(&k("c/at"), b"a", v_at)],
    )
    .await;
    assert_eq!(
        ok("get after compaction", store.get(&k("c/old")).await),
        Some(Versioned {
            value: b"o".to_vec(),
            version: v_old
        }),
        "compaction must not change values"
    );
    ok(
        "compact again at the same revision",
        store.compact(v_at).await,
    );
    ok("compact below the compaction", store.compact(v_old).await);
    let future = store.compact(v_at + 1_000_000).await;
    assert!(
        matches!(future, Err(StoreError::InvalidRequest(_))),
        "compacting at a future revision must be an invalid request, got {future:?}"
    );
}

async fn watch_cancellation(store: &dyn StateStore) {
    let dir = k("cancel/");
    let never_polled = ok("watch", store.watch(&dir, None).await);
    drop(never_polled);

    let mut watch = ok("watch", store.watch(&dir, None).await);
    let v1 = ok("put 1", store.put(&k("cancel/1"), b"1".to_vec()).await);
    expect_events(
        &mut watch,
        "watch before drop",
        &[put_event(&k("cancel/1"), b"1", v1)],
    )
    .await;
    // Dropped with events it has not read.
    ok("put 2", store.put(&k("cancel/2"), b"2".to_vec()).await);
    ok("put 3", store.put(&k("cancel/3"), b"3".to_vec()).await);
    drop(watch);

    let mut after = ok("watch after drops", store.watch(&dir, None).await);
    let v4 = ok("put 4", store.put(&k("cancel/4"), b"4".to_vec()).await);
    expect_events(
        &mut after,
        "watches keep working after others were dropped",
        &[put_event(&k("cancel/4"), b"4", v4)],
    )
    .await;
}

async fn leases(store: &dyn StateStore) {
    let kept = ok(
        "grant kept",
        store.grant_lease(Duration::from_secs(1)).await,
    );
    let granted = Instant::now();
    let ttl = ok("first keep-alive", store.keep_alive(kept).await);
    assert!(
        ttl >= Duration::from_secs(1),
        "keep_alive must report at least the requested ttl, got {ttl:?}"
    );
    let lapsing = ok(
        "grant lapsing",
        store.grant_lease(Duration::from_millis(300)).await,
    );
    assert_ne!(kept, lapsing, "two leases must have two ids");

    let dir = k("lease/");
    let mut watch = ok("watch leased keys", store.watch(&dir, None).await);
    let v_kept = ok(
        "put with kept lease",
        store
            .put_with_lease(&k("lease/kept"), b"k".to_vec(), kept)
            .await,
    );
    let v_lapsing = ok(
        "put with lapsing lease",
        store
            .put_with_lease(&k("lease/lapsing"), b"l".to_vec(), lapsing)
            .await,
    );
    let txn = ok(
        "txn with a leased put",
        store
            .txn(Txn {
                compares: vec![Compare::Version {
                    key: k("lease/txn"),
                    version: None,
                }],
                success: vec![Op::PutWithLease {
                    key: k("lease/txn"),
                    value: b"t".to_vec(),
                    lease: kept,
                }],
                failure: Vec::new(),
            })
            .await,
    );
    assert!(
        txn.succeeded,
        "create-if-absent of a leased key must succeed"
    );
    let v_bound = ok(
        "put detached with lease",
        store
            .put_with_lease(&k("lease/detached"), b"bound".to_vec(), lapsing)
            .await,
    );
    let v_plain = ok(
        "overwrite without lease",
        store.put(&k("lease/detached"), b"plain".to_vec()).await,
    );

    // Keep `kept` alive until `lapsing` has expired and `kept` has outlived
    // its own ttl by half.
    let deadline = Instant::now() + DEADLINE;
    let mut kept_ttl = ttl;
    loop {
        kept_ttl = ok("keep-alive", store.keep_alive(kept).await).max(kept_ttl);
        let lapsed = ok("get lapsing", store.get(&k("lease/lapsing")).await).is_none();
        if lapsed && granted.elapsed() > kept_ttl * 3 / 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a lease that is not kept alive must expire within {DEADLINE:?}"
        );
        tokio::time::sleep(kept_ttl / 4).await;
    }
    assert_eq!(
        ok("get kept", store.get(&k("lease/kept")).await),
        Some(Versioned {
            value: b"k".to_vec(),
            version: v_kept
        }),
        "keep-alives must keep a lease's key past its ttl"
    );
    assert_eq!(
        ok("get txn key", store.get(&k("lease/txn")).await).map(|v| v.version),
        Some(txn.revision),
        "a key bound in a txn lives with its lease"
    );
    assert_eq!(
        ok("get detached", store.get(&k("lease/detached")).await),
        Some(Versioned {
            value: b"plain".to_vec(),
            version: v_plain
        }),
        "a put without lease detaches the key from its old lease"
    );
    expect_events(
        &mut watch,
        "leased puts are ordinary puts to a watcher",
        &[
            put_event(&k("lease/kept"), b"k", v_kept),
            put_event(&k("lease/lapsing"), b"l", v_lapsing),
            put_event(&k("lease/txn"), b"t", txn.revision),
            put_event(&k("lease/detached"), b"bound", v_bound),
            put_event(&k("lease/detached"), b"plain", v_plain),
        ],
    )
    .await;
    match next_event(&mut watch, "expiry").await {
        WatchEvent::Delete { key, version } => {
            assert_eq!(
                key,
                k("lease/lapsing"),
                "expiry deletes the expired lease's key only"
            );
            assert!(
                version > v_plain,
                "the expiry's delete comes after the last write"
            );
        }
        other => panic!("expiry must show as a Delete, got {other:?}"),
    }
    let expired = store.keep_alive(lapsing).await;
    assert_eq!(
        expired,
        Err(StoreError::LeaseNotFound(lapsing)),
        "keep-alive of an expired lease"
    );

    ok("revoke kept", store.revoke_lease(kept).await);
    assert_eq!(
        ok("get kept after revoke", store.get(&k("lease/kept")).await),
        None,
        "revoke must delete the lease's keys before it returns"
    );
    assert_eq!(
        ok("get txn key after revoke", store.get(&k("lease/txn")).await),
        None,
        "revoke must delete every key of the lease"
    );
    let first = next_event(&mut watch, "revoke").await;
    let second = next_event(&mut watch, "revoke").await;
    assert_eq!(
        (first.key(), second.key()),
        (k("lease/kept").as_str(), k("lease/txn").as_str()),
        "revoke deletes the lease's keys, sorted by key"
    );
    assert!(
        matches!(first, WatchEvent::Delete { .. }) && matches!(second, WatchEvent::Delete { .. }),
        "revoke shows as deletes, got {first:?} and {second:?}"
    );
    assert_eq!(
        first.version(),
        second.version(),
        "revoke deletes all of a lease's keys at one revision"
    );
    assert_eq!(
        ok(
            "get detached after revokes",
            store.get(&k("lease/detached")).await
        )
        .map(|v| v.value),
        Some(b"plain".to_vec()),
        "a detached key outlives its old lease"
    );
}

async fn lease_refusals(store: &dyn StateStore) {
    let lease = ok("grant", store.grant_lease(Duration::from_secs(5)).await);
    ok("revoke", store.revoke_lease(lease).await);
    let gone = Err(StoreError::LeaseNotFound(lease));
    assert_eq!(
        store.revoke_lease(lease).await,
        gone,
        "revoke of a revoked lease"
    );
    assert_eq!(
        store.keep_alive(lease).await.map(|_| ()),
        gone,
        "keep-alive of a revoked lease"
    );
    let key = k("lease/refused");
    assert_eq!(
        store
            .put_with_lease(&key, b"x".to_vec(), lease)
            .await
            .map(|_| ()),
        gone,
        "put with a revoked lease"
    );
    let txn = store
        .txn(Txn {
            compares: Vec::new(),
            success: vec![
                Op::Put {
                    key: k("lease/refused-plain"),
                    value: b"p".to_vec(),
                },
                Op::PutWithLease {
                    key: key.clone(),
                    value: b"x".to_vec(),
                    lease,
                },
            ],
            failure: Vec::new(),
        })
        .await;
    assert_eq!(txn.map(|_| ()), gone, "txn with a revoked lease");
    for key in [key.as_str(), &k("lease/refused-plain")] {
        assert_eq!(
            ok("get refused", store.get(key).await),
            None,
            "a refused leased write must change nothing ({key})"
        );
    }
    let never = LeaseId(0x7eed_0000_0000_0001);
    assert_eq!(
        store.keep_alive(never).await.map(|_| ()),
        Err(StoreError::LeaseNotFound(never)),
        "keep-alive of a lease never granted"
    );
    let zero = store.grant_lease(Duration::ZERO).await;
    assert!(
        matches!(zero, Err(StoreError::InvalidRequest(_))),
        "a zero ttl must be an invalid request, got {zero:?}"
    );
}
