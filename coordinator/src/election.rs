//! Leader election among coordinators that share a store (HA): each one
//! campaigns by creating the leader key under a short lease; the winner keeps
//! the lease alive and leads, the others serve as standbys that point
//! clients at the leader and campaign again when the key disappears.
//!
//! A leader steps down (its control loop stops, its worker sessions close,
//! it stands by and campaigns again) as soon as it can no longer be sure it
//! leads: when its lease is gone, and also when no keep-alive has succeeded
//! for the lease's TTL minus a margin, since by then a coordinator that
//! still reaches the store may have taken over. Keep-alive calls are timed
//! out well below the TTL so a store that does not answer is noticed in time.
//! Every write of a leader is also fenced on its leader key
//! (`ringmaster_store::fenced`), so a deposed one cannot corrupt the
//! store in the moment before it notices.

use ringmaster_store::{Compare, LeaseId, Op, StateStore, StoreError, Txn, keys};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

/// TTL of the leader lease: a dead leader is replaced within about this long
/// (plus one poll interval). Long enough to ride out an etcd leader election
/// (1-2 s with etcd's defaults, during which no lease can be renewed, but
/// after which etcd extends every lease), so losing one etcd member never
/// makes the coordinator step down.
pub const LEADER_TTL: Duration = Duration::from_secs(5);
/// How often a standby looks at the leader key.
const POLL: Duration = Duration::from_millis(200);
/// How long one keep-alive of the leader lease may take, and how often one
/// is sent.
const KEEP_ALIVE_EVERY: Duration = Duration::from_millis(LEADER_TTL.as_millis() as u64 / 5);
/// A leader steps down this long before its lease could expire, counted from
/// the sending of the last keep-alive that succeeded.
const STEP_DOWN_MARGIN: Duration = Duration::from_millis(LEADER_TTL.as_millis() as u64 / 5);

/// Proof of leadership: the lease holding the leader key and the key's
/// version, on which every write is fenced.
#[derive(Clone, Copy, Debug)]
pub struct Leadership {
    pub lease: LeaseId,
    pub version: u64,
    /// When the lease was asked for: it lasts at most TTL from then.
    pub granted_at: Instant,
}

/// Campaigns until this coordinator leads. `leader` is kept up to date with
/// the URL of the current leader while waiting (for standby answers).
pub async fn campaign(
    store: &Arc<dyn StateStore>,
    me: &str,
    leader: &watch::Sender<Option<String>>,
    problem: &watch::Sender<Option<String>>,
) -> Leadership {
    let key = keys::leader();
    loop {
        match try_lead(store, &key, me).await {
            Ok(Some(l)) => {
                info!(lease = %l.lease, "elected leader");
                problem.send_replace(None);
                leader.send_replace(Some(me.to_string()));
                return l;
            }
            Ok(None) => {}
            Err(e) => {
                warn!("campaign: {e}");
                problem.send_replace(Some(format!("cannot reach the store: {e}")));
            }
        }
        // Someone else leads (or the store does not answer): wait for the
        // key to go.
        loop {
            match store.get(&key).await {
                Ok(Some(v)) => {
                    problem.send_replace(None);
                    let url = String::from_utf8_lossy(&v.value).into_owned();
                    if leader.borrow().as_deref() != Some(url.as_str()) {
                        info!(leader = %url, "standing by");
                        leader.send_replace(Some(url));
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    warn!("reading the leader key: {e}");
                    problem.send_replace(Some(format!("cannot reach the store: {e}")));
                    if leader.borrow().is_some() {
                        leader.send_replace(None);
                    }
                }
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
    let granted_at = Instant::now();
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
            granted_at,
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

/// Keeps the leader lease alive; returns, with the reason, when this
/// coordinator must step down: the store says the lease is gone, or no
/// keep-alive has succeeded for the lease's TTL minus a margin (a store that
/// does not answer, or a partition from it: another coordinator that reaches
/// the store may be elected once the lease runs out, so this one stops
/// acting before that can happen).
pub async fn hold(store: &Arc<dyn StateStore>, leadership: Leadership) -> String {
    let mut tick = tokio::time::interval(KEEP_ALIVE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The lease lasts at least TTL from the sending of the last keep-alive
    // that succeeded: stand down a margin before that, whatever is pending.
    let mut step_down_at = leadership.granted_at + LEADER_TTL - STEP_DOWN_MARGIN;
    let mut last_error = String::from("no answer");
    loop {
        let outcome = tokio::select! {
            _ = tokio::time::sleep_until(step_down_at) => None,
            outcome = async {
                tick.tick().await;
                let sent = Instant::now();
                let r = tokio::time::timeout(KEEP_ALIVE_EVERY, store.keep_alive(leadership.lease)).await;
                (sent, r)
            } => Some(outcome),
        };
        match outcome {
            None => {
                return format!(
                    "no keep-alive of the leader lease succeeded for {} ms (last: {last_error}); \
                     another coordinator may lead once it expires",
                    (LEADER_TTL - STEP_DOWN_MARGIN).as_millis()
                );
            }
            Some((sent, Ok(Ok(_)))) => step_down_at = sent + LEADER_TTL - STEP_DOWN_MARGIN,
            Some((_, Ok(Err(StoreError::LeaseNotFound(_))))) => {
                return "the leader lease expired".into();
            }
            Some((_, Ok(Err(e)))) => {
                warn!("leader lease keep-alive: {e}");
                last_error = e.to_string();
            }
            Some((_, Err(_))) => {
                last_error = format!("no answer within {} ms", KEEP_ALIVE_EVERY.as_millis());
                warn!("leader lease keep-alive: {last_error}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leader_steps_down_before_its_lease_can_expire() {
        // Several keep-alives must fit before the step-down point, or one
        // slow answer would depose a healthy leader.
        assert!(KEEP_ALIVE_EVERY * 2 + STEP_DOWN_MARGIN < LEADER_TTL);
    }
}
