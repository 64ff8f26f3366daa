//! Leases: the public [`LeaseId`], and for the in-process backends (memory,
//! embedded) the lease table `Leases` and the expiry task `Reaper`.
//! etcd keeps its own leases; [`super::etcd`] only forwards to it.
//!
//! # In-process expiry
//!
//! A lease is a deadline (`now + ttl`, pushed back by every keep-alive) and
//! the set of keys bound to it. Expiry is driven two ways:
//! - a background tokio task per store (the `Reaper`), started on the first
//!   grant, sleeps until the earliest deadline and revokes what is due, so
//!   watchers see the deletes without anyone touching the store. It holds the
//!   store weakly and stops when the store is dropped (or its runtime ends; the
//!   next grant or keep-alive starts a new one);
//! - lazily: a keep-alive or a leased put on a lease past its deadline fails
//!   with [`StoreError::LeaseNotFound`] (the keep-alive also revokes it then),
//!   even if the task has not run yet.
//!
//! As in etcd, reads may still see a key for the moment between its lease's
//! deadline and the revoke (etcd checks every 500 ms).
//!
//! TTLs are whole seconds rounded up, at least 1, as etcd counts them.

use super::{Op, StoreError};
use async_trait::async_trait;
use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// A lease, as etcd numbers them (a positive 64-bit id; etcd's 0 means "no
/// lease"). Shown in hex, as `etcdctl` does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseId(pub i64);

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// etcd's largest lease TTL (`MaxLeaseTTL`), which we refuse beyond on every
/// backend.
pub const MAX_TTL_SECS: i64 = 9_000_000_000;

/// A requested TTL in etcd's whole seconds: rounded up, at least 1.
pub(crate) fn ttl_secs(ttl: Duration) -> Result<i64, StoreError> {
    if ttl.is_zero() {
        return Err(StoreError::InvalidRequest(
            "lease ttl must be positive".to_owned(),
        ));
    }
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    match i64::try_from(secs) {
        Ok(secs) if secs <= MAX_TTL_SECS => Ok(secs),
        _ => Err(StoreError::InvalidRequest(format!(
            "lease ttl of {secs} s is over the limit of {MAX_TTL_SECS} s"
        ))),
    }
}

#[derive(Debug)]
struct Lease {
    ttl: Duration,
    deadline: Instant,
    keys: BTreeSet<String>,
}

/// The leases of an in-process store and which keys each one holds. Not
/// durable: see the embedded store's doc for what a reopen does.
#[derive(Debug)]
pub(crate) struct Leases {
    leases: HashMap<LeaseId, Lease>,
    bound: HashMap<String, LeaseId>,
    next_id: i64,
}

impl Leases {
    /// An empty table. Ids start from the wall clock in microseconds so that
    /// an embedded store reopened later does not hand out an id that a
    /// process from before the restart may still be refreshing.
    pub(crate) fn new() -> Self {
        let micros = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros())
            .unwrap_or(0);
        // Leave room below i64::MAX for the ids handed out afterwards.
        let next_id = (micros % (1 << 62)) as i64 + 1;
        Leases {
            leases: HashMap::new(),
            bound: HashMap::new(),
            next_id,
        }
    }

    pub(crate) fn grant(&mut self, ttl: Duration, now: Instant) -> Result<LeaseId, StoreError> {
        let ttl = Duration::from_secs(ttl_secs(ttl)? as u64);
        let id = LeaseId(self.next_id);
        self.next_id = self
            .next_id
            .checked_add(1)
            .ok_or_else(|| StoreError::Internal("lease ids exhausted".to_owned()))?;
        self.leases.insert(
            id,
            Lease {
                ttl,
                deadline: now + ttl,
                keys: BTreeSet::new(),
            },
        );
        Ok(id)
    }

    /// Whether the lease exists and its deadline has not passed.
    pub(crate) fn live(&self, id: LeaseId, now: Instant) -> bool {
        self.leases.get(&id).is_some_and(|l| l.deadline > now)
    }

    /// Whether the lease exists (live or past its deadline, not yet revoked).
    pub(crate) fn exists(&self, id: LeaseId) -> bool {
        self.leases.contains_key(&id)
    }

    /// Pushes a live lease's deadline to `now + ttl` and returns the ttl;
    /// `None` if it is gone or past its deadline.
    pub(crate) fn refresh(&mut self, id: LeaseId, now: Instant) -> Option<Duration> {
        let lease = self.leases.get_mut(&id)?;
        if lease.deadline <= now {
            return None;
        }
        lease.deadline = now + lease.ttl;
        Some(lease.ttl)
    }

    /// Removes the lease and returns the keys bound to it, which the caller
    /// deletes; `None` if there is no such lease.
    pub(crate) fn take(&mut self, id: LeaseId) -> Option<BTreeSet<String>> {
        let lease = self.leases.remove(&id)?;
        for key in &lease.keys {
            self.bound.remove(key);
        }
        Some(lease.keys)
    }

    /// Fails with [`StoreError::LeaseNotFound`] unless every lease the ops
    /// bind to is live.
    pub(crate) fn check(&self, ops: &[Op], now: Instant) -> Result<(), StoreError> {
        for op in ops {
            if let Op::PutWithLease { lease, .. } = op
                && !self.live(*lease, now)
            {
                return Err(StoreError::LeaseNotFound(*lease));
            }
        }
        Ok(())
    }

    /// Updates which key belongs to which lease after `ops` committed: a
    /// leased put binds the key, a plain put or a delete unbinds it.
    pub(crate) fn record(&mut self, ops: &[Op]) {
        for op in ops {
            let key = op.key();
            if let Some(old) = self.bound.remove(key)
                && let Some(lease) = self.leases.get_mut(&old)
            {
                lease.keys.remove(key);
            }
            if let Op::PutWithLease { key, lease, .. } = op
                && let Some(entry) = self.leases.get_mut(lease)
            {
                entry.keys.insert(key.clone());
                self.bound.insert(key.clone(), *lease);
            }
        }
    }

    /// Leases whose deadline has passed.
    pub(crate) fn due(&self, now: Instant) -> Vec<LeaseId> {
        let mut due: Vec<LeaseId> = self
            .leases
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        due.sort();
        due
    }

    /// The earliest deadline, if any lease exists.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.leases.values().map(|l| l.deadline).min()
    }
}

/// How long the [`Reaper`] waits after failing to revoke expired leases.
const EXPIRY_RETRY: Duration = Duration::from_secs(1);

/// What the [`Reaper`] task needs from its store.
#[async_trait]
pub(crate) trait Expire: Send + Sync + 'static {
    /// The earliest lease deadline, if any.
    fn next_deadline(&self) -> Option<Instant>;

    /// Revokes every lease past its deadline.
    async fn expire_due(self: Arc<Self>) -> Result<(), StoreError>;
}

/// The expiry task of one in-process store; see the module doc.
#[derive(Debug, Default)]
pub(crate) struct Reaper {
    wake: Arc<Notify>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Reaper {
    /// Makes sure the task runs, and has it re-read the next deadline. Called
    /// after every grant and keep-alive. Outside a tokio runtime it starts
    /// nothing, and expiry is only lazy.
    pub(crate) fn poke<T: Expire>(&self, owner: &Arc<T>) {
        if let Ok(mut task) = self.task.lock() {
            let running = task.as_ref().is_some_and(|t| !t.is_finished());
            if !running && let Ok(handle) = tokio::runtime::Handle::try_current() {
                *task = Some(handle.spawn(reap(Arc::downgrade(owner), Arc::clone(&self.wake))));
            }
        }
        self.wake.notify_one();
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        if let Ok(mut task) = self.task.lock()
            && let Some(task) = task.take()
        {
            task.abort();
        }
    }
}

async fn reap<T: Expire>(owner: Weak<T>, wake: Arc<Notify>) {
    loop {
        // Registered before reading the deadline, so that a grant between the
        // read and the wait is not missed.
        let notified = wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        // Never hold the store while waiting: the task must not keep it alive.
        let deadline = match owner.upgrade() {
            Some(store) => store.next_deadline(),
            None => return,
        };
        match deadline {
            None => notified.await,
            Some(deadline) => {
                tokio::select! {
                    () = &mut notified => {}
                    () = tokio::time::sleep_until(deadline) => {
                        let Some(store) = owner.upgrade() else { return };
                        if let Err(err) = store.expire_due().await {
                            // The store is failing; do not spin on a deadline
                            // that stays in the past.
                            tracing::warn!(error = %err, "failed to revoke expired leases");
                            tokio::time::sleep(EXPIRY_RETRY).await;
                        }
                    }
                }
            }
        }
    }
}
