//! The one behaviour suite every [`StateStore`] backend must pass, called from
//! each backend's tests (`common/tests/store.rs`, later the etcd tests). It is
//! compiled into the library so that every backend's test crate can share it;
//! it panics with a message naming the broken expectation, as tests do.
//!
//! It writes only under [`PREFIX`] and expects nothing there when it starts.
//! Backend-specific behaviour (durability, locking) is tested next to the
//! backend, not here.

use super::{Compare, Op, StateStore, StoreError, Txn, Versioned};

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
