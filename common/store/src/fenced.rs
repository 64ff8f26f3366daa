//! Fenced writes for a leader: a [`FencedStore`] turns every mutation into a
//! transaction conditioned on the leader key still being the one this
//! process created (its version unchanged). A deposed leader — whose lease
//! expired, and whose key another coordinator now holds — therefore cannot
//! write anything, even if it has not noticed yet: its writes fail with
//! [`StoreError::NotLeader`]. Reads, watches and leases pass through.

use super::{
    Compare, LeaseId, Op, StateStore, StoreError, Txn, TxnOutcome, Versioned, WatchStream,
};
use async_trait::async_trait;
use std::sync::Arc;
use std::time::Duration;

/// A store whose writes only succeed while `leader_key` is at
/// `leader_version`.
pub struct FencedStore {
    inner: Arc<dyn StateStore>,
    leader_key: String,
    leader_version: u64,
}

impl FencedStore {
    pub fn new(inner: Arc<dyn StateStore>, leader_key: String, leader_version: u64) -> Self {
        FencedStore {
            inner,
            leader_key,
            leader_version,
        }
    }

    fn fence(&self) -> Compare {
        Compare::Version {
            key: self.leader_key.clone(),
            version: Some(self.leader_version),
        }
    }

    async fn fenced(&self, mut txn: Txn) -> Result<TxnOutcome, StoreError> {
        // Compares that fail on the leader key alone must not be confused
        // with the caller's own: check the fence separately when the
        // caller's transaction has compares of its own.
        let own = !txn.compares.is_empty();
        txn.compares.push(self.fence());
        let outcome = self.inner.txn(txn).await?;
        if !outcome.succeeded {
            let still_leader = match self.inner.get(&self.leader_key).await? {
                Some(v) => v.version == self.leader_version,
                None => false,
            };
            if !still_leader || !own {
                return Err(StoreError::NotLeader(format!(
                    "{} changed since this coordinator was elected",
                    self.leader_key
                )));
            }
        }
        Ok(outcome)
    }

    async fn write(&self, op: Op) -> Result<u64, StoreError> {
        let outcome = self
            .fenced(Txn {
                compares: Vec::new(),
                success: vec![op],
                failure: Vec::new(),
            })
            .await?;
        Ok(outcome.revision)
    }
}

#[async_trait]
impl StateStore for FencedStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        self.inner.get(key).await
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<u64, StoreError> {
        self.write(Op::Put {
            key: key.to_owned(),
            value,
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        // The fenced transaction cannot report whether the key existed; a
        // read first tells, at the cost of a race with other writers (there
        // are none while this process leads).
        let existed = self.inner.get(key).await?.is_some();
        self.write(Op::Delete {
            key: key.to_owned(),
        })
        .await?;
        Ok(existed)
    }

    async fn range_with_revision(
        &self,
        prefix: &str,
    ) -> Result<(Vec<(String, Versioned)>, u64), StoreError> {
        self.inner.range_with_revision(prefix).await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        self.fenced(txn).await
    }

    async fn watch(
        &self,
        prefix: &str,
        start_revision: Option<u64>,
    ) -> Result<WatchStream, StoreError> {
        self.inner.watch(prefix, start_revision).await
    }

    async fn compact(&self, revision: u64) -> Result<(), StoreError> {
        self.inner.compact(revision).await
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        self.inner.grant_lease(ttl).await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError> {
        self.inner.keep_alive(lease).await
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.inner.revoke_lease(lease).await
    }

    async fn put_with_lease(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: LeaseId,
    ) -> Result<u64, StoreError> {
        self.write(Op::PutWithLease {
            key: key.to_owned(),
            value,
            lease,
        })
        .await
    }
}
