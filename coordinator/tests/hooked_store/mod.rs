//! A `MemoryStore` with hooks around its writes, shared by the control-loop
//! tests that need to see (or disturb) what the coordinator writes: the
//! hook may answer a put instead of the store (an ambiguous write), and it
//! hears every write that reached the store, in order.

use async_trait::async_trait;
use ringmaster_store::{
    LeaseId, MemoryStore, Op, StateStore, StoreError, Txn, TxnOutcome, Versioned, WatchStream,
};
use std::time::Duration;

/// What a test does around the store's writes.
pub trait Hook: Send + Sync + 'static {
    /// Before a plain put reaches the store: `Some((apply, error))` answers
    /// the put with `error`, after applying it first when `apply` is true.
    fn intercept_put(&self, _key: &str) -> Option<(bool, StoreError)> {
        None
    }
    /// Writes that reached the store (a put, a delete, or the operations a
    /// transaction ran), in the order the store applied them.
    fn wrote(&self, _ops: &[Op]) {}
}

/// The store the loop under test writes to.
pub struct Hooked<H: Hook> {
    pub inner: MemoryStore,
    pub hook: H,
}

impl<H: Hook> Hooked<H> {
    pub fn new(hook: H) -> Self {
        Hooked {
            inner: MemoryStore::new(),
            hook,
        }
    }
}

#[async_trait]
impl<H: Hook> StateStore for Hooked<H> {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        self.inner.get(key).await
    }
    async fn put(&self, key: &str, value: Vec<u8>) -> Result<u64, StoreError> {
        let op = Op::Put {
            key: key.to_string(),
            value: value.clone(),
        };
        if let Some((apply, error)) = self.hook.intercept_put(key) {
            if apply {
                self.inner.put(key, value).await?;
                self.hook.wrote(&[op]);
            }
            return Err(error);
        }
        let version = self.inner.put(key, value).await?;
        self.hook.wrote(&[op]);
        Ok(version)
    }
    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let existed = self.inner.delete(key).await?;
        self.hook.wrote(&[Op::Delete {
            key: key.to_string(),
        }]);
        Ok(existed)
    }
    async fn range_with_revision(
        &self,
        prefix: &str,
    ) -> Result<(Vec<(String, Versioned)>, u64), StoreError> {
        self.inner.range_with_revision(prefix).await
    }
    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        let outcome = self.inner.txn(txn.clone()).await?;
        let ran = if outcome.succeeded {
            txn.success
        } else {
            txn.failure
        };
        self.hook.wrote(&ran);
        Ok(outcome)
    }
    async fn watch(&self, prefix: &str, start: Option<u64>) -> Result<WatchStream, StoreError> {
        self.inner.watch(prefix, start).await
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
}
