//! [`MemoryStore`]: the in-process state store for unit tests, a `BTreeMap`
//! behind a mutex, with watches served from a bounded history
//! ([`super::watch`]) and leases expired by a background task
//! ([`super::lease`]). Nothing is persisted; durable backends live in
//! [`super::embedded`] and [`super::etcd`].

use super::lease::{Expire, Leases, Reaper};
use super::local::{self, Tables};
use super::watch::History;
use super::{
    Compare, HistoryLimits, LeaseId, Op, StateStore, StoreError, Txn, TxnOutcome, Versioned,
    WatchStream, check_key,
};
use async_trait::async_trait;
use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::time::Instant;

/// A state store that lives and dies with the process. Clones share it.
///
/// Every call takes the lock once and never awaits while holding it, so the
/// `std` mutex is fine inside async code.
#[derive(Debug, Clone)]
pub struct MemoryStore {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    inner: Mutex<Inner>,
    history: History,
    reaper: Reaper,
}

#[derive(Debug)]
struct Inner {
    /// The revision of the last write; 0 before any.
    revision: u64,
    /// key -> (version, value)
    data: BTreeMap<String, (u64, Vec<u8>)>,
    leases: Leases,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::with_history_limits(HistoryLimits::default())
    }
}

impl Tables for BTreeMap<String, (u64, Vec<u8>)> {
    fn holds(&self, compare: &Compare) -> Result<bool, StoreError> {
        let current = self
            .get(compare.key())
            .map(|(version, value)| (*version, value.as_slice()));
        Ok(compare.holds(current))
    }

    fn write(
        &mut self,
        key: &str,
        version: u64,
        value: &[u8],
        _lease: Option<LeaseId>,
    ) -> Result<(), StoreError> {
        // The binding lives in the lease table only: nothing to persist.
        self.insert(key.to_owned(), (version, value.to_vec()));
        Ok(())
    }

    fn remove(&mut self, key: &str) -> Result<bool, StoreError> {
        Ok(BTreeMap::remove(self, key).is_some())
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty store keeping the given amount of watch history.
    pub fn with_history_limits(limits: HistoryLimits) -> Self {
        MemoryStore {
            shared: Arc::new(Shared {
                inner: Mutex::new(Inner {
                    revision: 0,
                    data: BTreeMap::new(),
                    leases: Leases::new(),
                }),
                history: History::new(0, limits),
                reaper: Reaper::default(),
            }),
        }
    }

    /// How many watch streams are open (dropping one closes it).
    pub fn active_watches(&self) -> usize {
        self.shared.history.live_watchers()
    }

    fn lock(&self) -> Result<MutexGuard<'_, Inner>, StoreError> {
        self.shared.lock()
    }
}

impl Shared {
    fn lock(&self) -> Result<MutexGuard<'_, Inner>, StoreError> {
        // Nothing panics while the lock is held, so poisoning means a bug.
        self.inner
            .lock()
            .map_err(|_| StoreError::Internal("memory store lock poisoned".to_owned()))
    }

    /// One write: see [`super::local`]. Returns `decide`'s answer and the
    /// store revision after the write.
    fn write<T>(
        &self,
        inner: &mut Inner,
        decide: impl FnOnce(
            &BTreeMap<String, (u64, Vec<u8>)>,
            &mut Leases,
        ) -> Result<(T, Vec<Op>), StoreError>,
    ) -> Result<(T, u64), StoreError> {
        let (answer, ops) = decide(&inner.data, &mut inner.leases)?;
        inner.leases.check(&ops, Instant::now())?;
        let next = inner.revision + 1;
        let events = local::apply(&mut inner.data, &ops, next)?;
        inner.leases.record(&ops);
        if !events.is_empty() {
            inner.revision = next;
            self.history.publish(next, events)?;
        }
        Ok((answer, inner.revision))
    }

    fn revoke(&self, inner: &mut Inner, lease: LeaseId) -> Result<(), StoreError> {
        self.write(inner, |_, leases| {
            Ok(((), local::revoke_ops(leases, lease)?))
        })?;
        Ok(())
    }
}

#[async_trait]
impl Expire for Shared {
    fn next_deadline(&self) -> Option<Instant> {
        self.lock().ok()?.leases.next_deadline()
    }

    async fn expire_due(self: Arc<Self>) -> Result<(), StoreError> {
        let mut inner = self.lock()?;
        for lease in inner.leases.due(Instant::now()) {
            self.revoke(&mut inner, lease)?;
        }
        Ok(())
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
        let ops = vec![Op::Put {
            key: key.to_owned(),
            value,
        }];
        Ok(self.shared.write(&mut inner, |_, _| Ok(((), ops)))?.1)
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        check_key(key)?;
        let mut inner = self.lock()?;
        let existed = inner.data.contains_key(key);
        let ops = vec![Op::Delete {
            key: key.to_owned(),
        }];
        self.shared.write(&mut inner, |_, _| Ok(((), ops)))?;
        Ok(existed)
    }

    async fn range_with_revision(
        &self,
        prefix: &str,
    ) -> Result<(Vec<(String, Versioned)>, u64), StoreError> {
        let inner = self.lock()?;
        let found = inner
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
            .collect();
        Ok((found, inner.revision))
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        txn.validate()?;
        let mut inner = self.lock()?;
        let (succeeded, revision) = self
            .shared
            .write(&mut inner, |data, _| local::choose(data, txn))?;
        Ok(TxnOutcome {
            succeeded,
            revision,
        })
    }

    async fn watch(
        &self,
        prefix: &str,
        start_revision: Option<u64>,
    ) -> Result<WatchStream, StoreError> {
        self.shared.history.watch(prefix, start_revision)
    }

    async fn compact(&self, revision: u64) -> Result<(), StoreError> {
        self.shared.history.compact(revision)
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let id = self.lock()?.leases.grant(ttl, Instant::now())?;
        self.shared.reaper.poke(&self.shared);
        Ok(id)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError> {
        let mut inner = self.lock()?;
        if let Some(ttl) = inner.leases.refresh(lease, Instant::now()) {
            drop(inner);
            self.shared.reaper.poke(&self.shared);
            return Ok(ttl);
        }
        if inner.leases.exists(lease) {
            // Past its deadline but not reaped yet: end it now, as etcd does.
            self.shared.revoke(&mut inner, lease)?;
        }
        Err(StoreError::LeaseNotFound(lease))
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        let mut inner = self.lock()?;
        self.shared.revoke(&mut inner, lease)
    }
}
