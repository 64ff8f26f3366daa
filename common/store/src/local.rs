//! What the in-process backends (memory, embedded) share about writing: how a
//! [`Txn`] picks its branch and how ops turn into table writes and watch
//! events, over a small [`Tables`] abstraction of their storage. Each backend
//! keeps its own locking and commit; the watch history is in
//! [`super::watch`], the lease table in [`super::lease`].
//!
//! A write runs as: `decide` (read, pick ops) → [`Leases::check`] → [`apply`]
//! → commit → [`Leases::record`] → publish the events to the history, all
//! under the backend's write lock so that revisions, lease bindings and watch
//! events stay in one order.

use super::lease::Leases;
use super::{LeaseId, Op, StoreError, Txn, WatchEvent};

/// Key-value storage as the shared write logic sees it.
pub(crate) trait Tables {
    /// Whether `compare` holds against the stored key.
    fn holds(&self, compare: &super::Compare) -> Result<bool, StoreError>;

    /// Stores the key at `version`, bound to `lease` or to none.
    fn write(
        &mut self,
        key: &str,
        version: u64,
        value: &[u8],
        lease: Option<LeaseId>,
    ) -> Result<(), StoreError>;

    /// Removes the key; `true` if it existed.
    fn remove(&mut self, key: &str) -> Result<bool, StoreError>;
}

/// Evaluates the compares: whether they all held, and the branch to run.
pub(crate) fn choose(tables: &impl Tables, txn: Txn) -> Result<(bool, Vec<Op>), StoreError> {
    let mut succeeded = true;
    for compare in &txn.compares {
        if !tables.holds(compare)? {
            succeeded = false;
            break;
        }
    }
    let ops = if succeeded { txn.success } else { txn.failure };
    Ok((succeeded, ops))
}

/// The delete ops that revoking `lease` runs, after taking it out of the
/// table; [`StoreError::LeaseNotFound`] if there is no such lease.
pub(crate) fn revoke_ops(leases: &mut Leases, lease: LeaseId) -> Result<Vec<Op>, StoreError> {
    let keys = leases.take(lease).ok_or(StoreError::LeaseNotFound(lease))?;
    Ok(keys.into_iter().map(|key| Op::Delete { key }).collect())
}

/// Applies `ops` at revision `next` and returns their watch events, in op
/// order; a delete of a missing key changes nothing and makes no event. No
/// events means nothing changed, and the revision must not move.
pub(crate) fn apply(
    tables: &mut impl Tables,
    ops: &[Op],
    next: u64,
) -> Result<Vec<WatchEvent>, StoreError> {
    let mut events = Vec::with_capacity(ops.len());
    for op in ops {
        match op {
            Op::Put { key, value } => {
                tables.write(key, next, value, None)?;
                events.push(WatchEvent::Put {
                    key: key.clone(),
                    value: value.clone(),
                    version: next,
                });
            }
            Op::PutWithLease { key, value, lease } => {
                tables.write(key, next, value, Some(*lease))?;
                events.push(WatchEvent::Put {
                    key: key.clone(),
                    value: value.clone(),
                    version: next,
                });
            }
            Op::Delete { key } => {
                if tables.remove(key)? {
                    events.push(WatchEvent::Delete {
                        key: key.clone(),
                        version: next,
                    });
                }
            }
        }
    }
    Ok(events)
}
