//! [`MemoryStore`]: the in-process state store for unit tests, a `BTreeMap`
//! behind a mutex. Nothing is persisted; durable backends live in
//! [`super::embedded`] (and later etcd).

use super::{Op, StateStore, StoreError, Txn, TxnOutcome, Versioned, check_key};
use async_trait::async_trait;
use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Mutex, MutexGuard};

/// A state store that lives and dies with the process.
///
/// Every call takes the lock once and never awaits while holding it, so the
/// `std` mutex is fine inside async code.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// The revision of the last write; 0 before any.
    revision: u64,
    /// key -> (version, value)
    data: BTreeMap<String, (u64, Vec<u8>)>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> Result<MutexGuard<'_, Inner>, StoreError> {
        // Nothing panics while the lock is held, so poisoning means a bug.
        self.inner
            .lock()
            .map_err(|_| StoreError::Internal("memory store lock poisoned".to_owned()))
    }
}

#[async_trait]
impl StateStore for MemoryStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        check_key(key)?;
        let inner = self.lock()?;
        Ok(inner.data.get(key).map(|(version, value)| Versioned {
            value: value.clone(),
            version: *version,
        }))
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<u64, StoreError> {
        check_key(key)?;
        let mut inner = self.lock()?;
        inner.revision += 1;
        let revision = inner.revision;
        inner.data.insert(key.to_owned(), (revision, value));
        Ok(revision)
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        check_key(key)?;
        let mut inner = self.lock()?;
        let existed = inner.data.remove(key).is_some();
        if existed {
            inner.revision += 1;
        }
        Ok(existed)
    }

    async fn range(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, StoreError> {
        let inner = self.lock()?;
        Ok(inner
            .data
            .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(|(key, _)| key.starts_with(prefix))
            .map(|(key, (version, value))| {
                (
                    key.clone(),
                    Versioned {
                        value: value.clone(),
                        version: *version,
                    },
                )
            })
            .collect())
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        txn.validate()?;
        let mut inner = self.lock()?;
        let succeeded = txn.compares.iter().all(|compare| {
            let current = inner
                .data
                .get(compare.key())
                .map(|(version, value)| (*version, value.as_slice()));
            compare.holds(current)
        });
        let ops = if succeeded { txn.success } else { txn.failure };
        let next = inner.revision + 1;
        let mut changed = false;
        for op in ops {
            match op {
                Op::Put { key, value } => {
                    inner.data.insert(key, (next, value));
                    changed = true;
                }
                Op::Delete { key } => changed |= inner.data.remove(&key).is_some(),
            }
        }
        if changed {
            inner.revision = next;
        }
        Ok(TxnOutcome {
            succeeded,
            revision: inner.revision,
        })
    }
}
