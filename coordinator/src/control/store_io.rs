//! How the control loop writes job state to the store: nothing while
//! degraded (`writable`), an ambiguous write settled by reading the key back
//! (`put_settled`), and a write refused by the leader fence turned into
//! stepping down (`check_fenced`). Worker records (`membership.rs`) and
//! deletions call the store directly.

use super::Cluster;
use ringmaster_common::ids::JobId;
use ringmaster_common::records::{self, JobStatusRecord};
use ringmaster_store::{StoreError, keys};
use tracing::warn;

impl Cluster {
    /// While degraded the coordinator does not write: a store that does not
    /// answer would stall the control loop on every call. What it skips is
    /// written again on recovery ([`Msg::NewLease`](super::Msg::NewLease)).
    pub(super) fn writable(&self) -> Result<(), StoreError> {
        match self.health.get() {
            Some(problem) => Err(StoreError::Unavailable(problem)),
            None => Ok(()),
        }
    }

    /// Writes `key`. A write that may or may not have happened (a timeout
    /// after sending: [`StoreError::Ambiguous`]) is settled by reading the key
    /// back before going on, and written again only if it did not land.
    pub(super) async fn put_settled(&self, key: &str, bytes: Vec<u8>) -> Result<(), StoreError> {
        let r = self.put_settled_inner(key, bytes).await;
        self.check_fenced(r)
    }

    async fn put_settled_inner(&self, key: &str, bytes: Vec<u8>) -> Result<(), StoreError> {
        match self.store.put(key, bytes.clone()).await {
            Ok(_) => Ok(()),
            Err(StoreError::Ambiguous(why)) => {
                warn!(
                    key,
                    "write may or may not have happened ({why}); reading it back"
                );
                match self.store.get(key).await? {
                    Some(v) if v.value == bytes => Ok(()),
                    _ => self.store.put(key, bytes).await.map(|_| ()),
                }
            }
            Err(e) => Err(e),
        }
    }

    pub(super) async fn persist_status(
        &self,
        id: &JobId,
        status: &JobStatusRecord,
    ) -> Result<(), StoreError> {
        self.writable()?;
        let key = keys::job_status(id)?;
        self.put_settled(&key, records::encode(&key, status)?).await
    }

    /// A write refused by the leader fence means another coordinator leads:
    /// tell the election to step down now rather than at the next keep-alive.
    fn check_fenced<T>(&self, r: Result<T, StoreError>) -> Result<T, StoreError> {
        if let Err(StoreError::NotLeader(why)) = &r {
            warn!("a write was fenced off ({why}): stepping down");
            self.deposed.notify_one();
        }
        r
    }
}
