//! An ambiguous store write (sent, but no answer: it may or may not have
//! happened) is settled by reading the key back: the coordinator neither
//! loses the write nor fails the request.

use async_trait::async_trait;
use ringmaster_common::ids::JobId;
use ringmaster_common::jobspec::JobSpec;
use ringmaster_common::records::{self, JobStatusRecord};
use ringmaster_coordinator::control::{self, ControlConfig, Msg};
use ringmaster_store::{
    LeaseId, MemoryStore, StateStore, StoreError, Txn, TxnOutcome, Versioned, WatchStream, keys,
};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Whether the ambiguous write actually landed.
#[derive(Clone, Copy)]
enum Fate {
    Applied,
    Lost,
}

/// A memory store whose first write to a job status key gets no answer.
struct Flaky {
    inner: MemoryStore,
    fate: Fate,
    tripped: AtomicUsize,
    log: Mutex<Vec<String>>,
}

#[async_trait]
impl StateStore for Flaky {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        self.inner.get(key).await
    }
    async fn put(&self, key: &str, value: Vec<u8>) -> Result<u64, StoreError> {
        self.log.lock().unwrap().push(format!("put {key}"));
        if key.ends_with("/status") && self.tripped.fetch_add(1, Ordering::SeqCst) == 0 {
            if let Fate::Applied = self.fate {
                self.inner.put(key, value).await?;
            }
            return Err(StoreError::Ambiguous("timed out after sending".into()));
        }
        self.inner.put(key, value).await
    }
    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        self.inner.delete(key).await
    }
    async fn range_with_revision(
        &self,
        prefix: &str,
    ) -> Result<(Vec<(String, Versioned)>, u64), StoreError> {
        self.inner.range_with_revision(prefix).await
    }
    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        self.inner.txn(txn).await
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

#[track_caller]
fn check(fate: Fate, expected_status_puts: usize) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = std::sync::Arc::new(Flaky {
            inner: MemoryStore::new(),
            fate,
            tripped: AtomicUsize::new(0),
            log: Mutex::new(Vec::new()),
        });
        let handle = control::start(store.clone(), "flaky".into(), ControlConfig::default())
            .await
            .unwrap();
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/digits-mlp.toml");
        let spec = JobSpec::from_toml(&std::fs::read_to_string(&path).unwrap(), &path).unwrap();
        let id = handle.call(|r| Msg::Submit(spec, None, r)).await.unwrap();
        assert_eq!(id, JobId("digits-mlp-1".into()));
        let key = keys::job_status(&id).unwrap();
        let stored = store
            .inner
            .get(&key)
            .await
            .unwrap()
            .expect("status written");
        let status: JobStatusRecord = records::decode(&key, &stored.value).unwrap();
        assert_eq!(status.state.as_str(), "queued");
        let puts = store
            .log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.ends_with("/status"))
            .count();
        assert_eq!(puts, expected_status_puts);
    });
}

#[test]
fn an_ambiguous_write_that_landed_is_not_repeated() {
    check(Fate::Applied, 1);
}

#[test]
fn an_ambiguous_write_that_was_lost_is_written_again() {
    check(Fate::Lost, 2);
}
