//! Leader election among coordinators that share a store (HA): each one
//! campaigns by creating the leader key under a short lease; the winner keeps
//! the lease alive and leads, the others serve as standbys that point
//! clients at the leader and campaign again when the key disappears.
//!
//! A leader whose lease cannot be kept alive is deposed: it stops (the
//! process exits) rather than act on a cluster someone else may now lead,
//! and every write it makes meanwhile is fenced on its leader key
//! (`ringmaster_common::store::fenced`), so it cannot corrupt the store.

use ringmaster_common::store::{Compare, LeaseId, Op, StateStore, StoreError, Txn, keys};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tracing::{info, warn};

/// TTL of the leader lease: a dead leader is replaced within about this long
/// (plus one poll interval).
pub const LEADER_TTL: Duration = Duration::from_secs(2);
/// How often a standby looks at the leader key.
const POLL: Duration = Duration::from_millis(200);

/// Proof of leadership: the lease holding the leader key and the key's
/// version, on which every write is fenced.
#[derive(Clone, Copy, Debug)]
pub struct Leadership {
    pub lease: LeaseId,
    pub version: u64,
}

/// Campaigns until this coordinator leads. `leader` is kept up to date with
/// the URL of the current leader while waiting (for standby answers).
pub async fn campaign(
    store: &Arc<dyn StateStore>,
    me: &str,
    leader: &watch::Sender<Option<String>>,
) -> Leadership {
    let key = keys::leader();
    loop {
        match try_lead(store, &key, me).await {
            Ok(Some(l)) => {
                info!(lease = %l.lease, "elected leader");
                leader.send_replace(Some(me.to_string()));
                return l;
            }
            Ok(None) => {}
            Err(e) => warn!("campaign: {e}"),
        }
        // Someone else leads: wait for the key to go.
        loop {
            match store.get(&key).await {
                Ok(Some(v)) => {
                    let url = String::from_utf8_lossy(&v.value).into_owned();
                    if leader.borrow().as_deref() != Some(url.as_str()) {
                        info!(leader = %url, "standing by");
                        leader.send_replace(Some(url));
                    }
                }
                Ok(None) => break,
                Err(e) => warn!("reading the leader key: {e}"),
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

async fn try_lead(
    store: &Arc<dyn StateStore>,
    key: &str,
    me: &str,
) -> Result<Option<Leadership>, StoreError> {
    let lease = store.grant_lease(LEADER_TTL).await?;
    let outcome = store
        .txn(Txn {
            compares: vec![Compare::Version {
                key: key.to_string(),
                version: None,
            }],
            success: vec![Op::PutWithLease {
                key: key.to_string(),
                value: me.as_bytes().to_vec(),
                lease,
            }],
            failure: Vec::new(),
        })
        .await;
    match outcome {
        Ok(o) if o.succeeded => Ok(Some(Leadership {
            lease,
            version: o.revision,
        })),
        Ok(_) => {
            let _ = store.revoke_lease(lease).await;
            Ok(None)
        }
        Err(e) => {
            let _ = store.revoke_lease(lease).await;
            Err(e)
        }
    }
}

/// Keeps the leader lease alive; returns (with the reason) once the store
/// says the lease is gone. While the store does not answer at all (quorum
/// lost) this keeps trying: nobody else can be elected then, the fence stops
/// this leader's writes if someone was, and etcd extends leases when it
/// regains a leader.
pub async fn hold(store: &Arc<dyn StateStore>, leadership: Leadership) -> String {
    let mut tick = tokio::time::interval(LEADER_TTL / 4);
    loop {
        tick.tick().await;
        match store.keep_alive(leadership.lease).await {
            Ok(_) => {}
            Err(StoreError::LeaseNotFound(_)) => return "the leader lease expired".into(),
            Err(e) => warn!("leader lease keep-alive: {e}"),
        }
    }
}
