//! The state store: the [`StateStore`] trait every backend implements, its
//! request and answer types ([`Txn`], [`Compare`], [`Op`], [`Versioned`]) and
//! its one error type [`StoreError`].
//!
//! Backends live in submodules: [`memory`] (unit tests), [`embedded`] (one
//! durable redb file, the default for a single host) and [`etcd`] (clusters).
//! Watches are in [`watch`], leases in [`lease`]; the machinery the two
//! in-process backends share (transaction evaluation, watch history, lease
//! expiry) is in the private `local` module. [`url`] parses the
//! coordinator's `--store` flag. The key layout is in [`keys`] (the JSON
//! records stored under those keys are `ringmaster_common::records`), and the
//! behaviour every backend must show in `conformance`, built with the
//! `testing` feature only. What the coordinator does with the
//! store (persist before acting, reload after an ambiguous write) lives in
//! the coordinator, not here.

#![forbid(unsafe_code)]

#[cfg(feature = "testing")]
pub mod conformance;
pub mod embedded;
pub mod etcd;
pub mod fenced;
pub mod keys;
pub mod lease;
mod local;
pub mod memory;
pub mod url;
pub mod watch;

pub use embedded::EmbeddedStore;
pub use etcd::{EtcdOptions, EtcdStore};
pub use lease::LeaseId;
pub use memory::MemoryStore;
pub use url::{StoreUrl, parse_store_url};
pub use watch::{HistoryLimits, WatchEvent, WatchStream};

use async_trait::async_trait;
use std::collections::BTreeSet;
use std::time::Duration;

/// A value together with its version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Versioned {
    pub value: Vec<u8>,
    /// The store revision of the write that last modified this key (etcd's
    /// `mod_revision`). Always at least 1; revisions grow strictly with every
    /// write to the store, so a later write to any key has a larger version.
    pub version: u64,
}

/// One condition of a [`Txn`]. A missing key compares as "absent"
/// (`None`), never as an error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Compare {
    /// Holds when the key's version equals `version`; `None` holds when the key
    /// does not exist. `Some(0)` is refused: no existing key has version 0.
    /// (etcd: `mod_revision == version`, `None` as `mod_revision == 0`.)
    Version { key: String, version: Option<u64> },
    /// Holds when the key's value equals `value` byte for byte; `None` holds
    /// when the key does not exist. (etcd: a value compare, `None` as
    /// `mod_revision == 0`, since etcd's value compare fails on missing keys.)
    Value { key: String, value: Option<Vec<u8>> },
}

impl Compare {
    /// The key this condition reads.
    pub fn key(&self) -> &str {
        match self {
            Compare::Version { key, .. } | Compare::Value { key, .. } => key,
        }
    }

    /// Whether the condition holds against the key's current `(version,
    /// value)`, `None` when the key is absent. Shared by the local backends so
    /// that they agree on the rules.
    pub fn holds(&self, current: Option<(u64, &[u8])>) -> bool {
        match (self, current) {
            (Compare::Version { version, .. }, current) => *version == current.map(|(v, _)| v),
            (Compare::Value { value: None, .. }, current) => current.is_none(),
            (Compare::Value { value: Some(_), .. }, None) => false,
            (
                Compare::Value {
                    value: Some(want), ..
                },
                Some((_, have)),
            ) => want.as_slice() == have,
        }
    }
}

/// One write of a [`Txn`] branch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Writes the key; if it was bound to a lease, it no longer is (as in
    /// etcd, a put without a lease detaches the key).
    Put { key: String, value: Vec<u8> },
    /// Writes the key bound to `lease`: when the lease expires or is revoked
    /// the key is deleted. Fails the whole txn with
    /// [`StoreError::LeaseNotFound`] if the branch runs and the lease is gone.
    PutWithLease {
        key: String,
        value: Vec<u8>,
        lease: LeaseId,
    },
    /// Deleting a missing key is not an error (and makes no watch event).
    Delete { key: String },
}

impl Op {
    /// The key this write touches.
    pub fn key(&self) -> &str {
        match self {
            Op::Put { key, .. } | Op::PutWithLease { key, .. } | Op::Delete { key } => key,
        }
    }
}

/// A compare-and-swap transaction, shaped like an etcd `Txn`: if every compare
/// holds, apply `success`, otherwise apply `failure`. The whole transaction is
/// atomic, and every put in it gets the same new version.
///
/// Rules checked before anything runs ([`Txn::validate`]): keys are not
/// empty, `Compare::Version` never asks for version 0, and one branch touches
/// a key at most once (etcd refuses duplicate keys in a branch).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Txn {
    pub compares: Vec<Compare>,
    pub success: Vec<Op>,
    pub failure: Vec<Op>,
}

impl Txn {
    /// Checks the rules in the type's doc; backends call it before touching
    /// any data so that a malformed transaction changes nothing.
    pub fn validate(&self) -> Result<(), StoreError> {
        for compare in &self.compares {
            check_key(compare.key())?;
            if let Compare::Version {
                key,
                version: Some(0),
            } = compare
            {
                return Err(StoreError::InvalidRequest(format!(
                    "compare on {key:?} asks for version 0, which no key has; use None for \"absent\""
                )));
            }
        }
        for (branch, ops) in [("success", &self.success), ("failure", &self.failure)] {
            let mut seen = BTreeSet::new();
            for op in ops {
                check_key(op.key())?;
                if !seen.insert(op.key()) {
                    return Err(StoreError::InvalidRequest(format!(
                        "txn {branch} branch touches key {:?} more than once",
                        op.key()
                    )));
                }
            }
        }
        Ok(())
    }
}

/// What a [`Txn`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxnOutcome {
    /// Whether every compare held (so `success` ran, not `failure`).
    pub succeeded: bool,
    /// The store revision after the transaction; the version of every key the
    /// executed branch put (etcd: the response header's revision).
    pub revision: u64,
}

/// Refuses the empty key, which etcd refuses too.
pub fn check_key(key: &str) -> Result<(), StoreError> {
    if key.is_empty() {
        return Err(StoreError::InvalidRequest("store key is empty".to_owned()));
    }
    Ok(())
}

/// Everything that can go wrong talking to a state store.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The store can not be reached right now and nothing was written; trying
    /// again later may work.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Another process holds the store (a second coordinator on the same state
    /// directory).
    #[error("store is locked by another process: {path}")]
    Locked { path: String },
    /// Reading or writing the store's files failed.
    #[error("store io error: {0}")]
    Io(String),
    /// The store's data can not be read back as what was written.
    #[error("store data is corrupt: {0}")]
    Corrupt(String),
    /// A stored value is larger than a reader accepts.
    #[error("value at {key:?} is {len} bytes, the limit is {max}")]
    ValueTooLarge { key: String, len: usize, max: usize },
    /// A write that may or may not have happened (a commit that failed half way,
    /// a timeout after sending). Retrying blindly can apply it twice or act on
    /// a stale view: the caller must reload what it depends on from the store
    /// and decide again.
    #[error("store write may or may not have happened: {0}")]
    Ambiguous(String),
    /// The request breaks the store's rules (empty key, bad txn); it will fail
    /// the same way every time.
    #[error("invalid store request: {0}")]
    InvalidRequest(String),
    /// A bug or broken invariant inside the store or its caller.
    #[error("store internal error: {0}")]
    Internal(String),
    /// A watch asked for history the store no longer keeps: `requested` is
    /// older than `compacted`, the oldest revision a watch can still start
    /// from. The caller must reload what it watches with
    /// [`StateStore::range_with_revision`] and watch again from the revision
    /// after that read.
    #[error(
        "revision {requested} has been compacted, the oldest watchable revision is {compacted}"
    )]
    Compacted { requested: u64, compacted: u64 },
    /// The lease does not exist: it expired, was revoked, or never existed
    /// (after an embedded store reopens, no earlier lease exists). Keys bound
    /// to it are gone; the caller must grant a new lease and write them again.
    #[error("lease {0} not found (expired or revoked)")]
    LeaseNotFound(LeaseId),
    /// A fenced write was refused because the writer no longer holds the
    /// leadership it was granted (see [`fenced`]): another coordinator leads.
    #[error("not the leader any more: {0}")]
    NotLeader(String),
    /// The store refused the request for lack of permission (etcd auth).
    #[error("store refused the request: {0}")]
    PermissionDenied(String),
}

impl From<ringmaster_common::records::RecordError> for StoreError {
    fn from(err: ringmaster_common::records::RecordError) -> Self {
        use ringmaster_common::records::RecordError;
        match err {
            RecordError::TooLarge { key, len, max } => StoreError::ValueTooLarge { key, len, max },
            RecordError::Corrupt { .. } => StoreError::Corrupt(err.to_string()),
            RecordError::Encode { .. } | RecordError::UnknownJobState(_) => {
                StoreError::Internal(err.to_string())
            }
        }
    }
}

impl StoreError {
    /// Whether the same request may succeed if simply sent again. `Ambiguous`
    /// is not: the caller must reload first. Neither is `Compacted` (reload
    /// and watch from a newer revision) nor `LeaseNotFound` (grant a new one).
    pub fn retryable(&self) -> bool {
        match self {
            StoreError::Unavailable(_) => true,
            StoreError::Locked { .. }
            | StoreError::Io(_)
            | StoreError::Corrupt(_)
            | StoreError::ValueTooLarge { .. }
            | StoreError::Ambiguous(_)
            | StoreError::InvalidRequest(_)
            | StoreError::Internal(_)
            | StoreError::Compacted { .. }
            | StoreError::LeaseNotFound(_)
            | StoreError::PermissionDenied(_)
            | StoreError::NotLeader(_) => false,
        }
    }
}

impl From<ringmaster_common::ids::IdError> for StoreError {
    fn from(err: ringmaster_common::ids::IdError) -> Self {
        StoreError::InvalidRequest(err.to_string())
    }
}

/// A linearizable key-value store holding the coordinator's durable state.
///
/// Keys are non-empty UTF-8 strings ordered byte-wise (as etcd orders them);
/// values are opaque bytes, usually JSON from [`records`]. Every write bumps
/// one store-wide revision, and a key's [`Versioned::version`] is the revision
/// of its last write, which is what compare-and-swap compares.
///
/// Object safe: the coordinator holds an `Arc<dyn StateStore>`. Dropping a
/// write's future before it resolves leaves the write "maybe done", like
/// [`StoreError::Ambiguous`].
///
/// Watches ([`StateStore::watch`]) stream the changes under a prefix in
/// revision order; leases ([`StateStore::grant_lease`]) bind keys to a
/// liveness deadline that the holder keeps pushing back. Both follow etcd's
/// semantics; where the in-process backends must approximate them (bounded
/// watch history, leases that do not survive a restart) their module docs
/// say how.
#[async_trait]
pub trait StateStore: Send + Sync + 'static {
    /// The key's value and version, `None` if it does not exist.
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError>;

    /// Writes the key unconditionally and returns its new version.
    async fn put(&self, key: &str, value: Vec<u8>) -> Result<u64, StoreError>;

    /// Deletes the key; `true` if it existed.
    async fn delete(&self, key: &str) -> Result<bool, StoreError>;

    /// Every key starting with `prefix`, sorted by key, read at one revision.
    /// A prefix is matched byte-wise: end it with `/` to list one directory
    /// (`/a/b/` does not match `/a/bc`).
    async fn range(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, StoreError> {
        Ok(self.range_with_revision(prefix).await?.0)
    }

    /// Like [`StateStore::range`], plus the store revision the read was
    /// served at: a watch started at that revision + 1 sees every change made
    /// after the read and none before it (the "reload, then watch" pattern).
    async fn range_with_revision(
        &self,
        prefix: &str,
    ) -> Result<(Vec<(String, Versioned)>, u64), StoreError>;

    /// Runs a compare-and-swap transaction atomically.
    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError>;

    /// Streams every change to keys starting with `prefix` (byte-wise, as in
    /// [`StateStore::range`]), in revision order and, within one txn, in the
    /// order of its ops.
    ///
    /// - `start_revision: None` streams the changes committed after this call
    ///   returns; `Some(r)` first replays every change at revisions `>= r`
    ///   (then continues live). `Some(0)` is refused: revisions start at 1.
    /// - If `r` is older than the history the store keeps, the stream's first
    ///   item is [`StoreError::Compacted`]; a watcher that falls behind the
    ///   kept history later gets the same error. Any error item ends the
    ///   stream, and the caller reloads and watches again.
    /// - Dropping the stream cancels the watch.
    async fn watch(
        &self,
        prefix: &str,
        start_revision: Option<u64>,
    ) -> Result<WatchStream, StoreError>;

    /// Discards the change history before `revision` (etcd's compaction):
    /// watches starting earlier fail with [`StoreError::Compacted`]. Values
    /// are unaffected. A revision at or below the current compaction point is
    /// a no-op; one above the store's current revision is an invalid request.
    async fn compact(&self, revision: u64) -> Result<(), StoreError>;

    /// Grants a lease that lives for `ttl` unless refreshed. TTLs are whole
    /// seconds, rounded up (at least 1); etcd may raise them further to its
    /// minimum (1.5 election timeouts, rounded up: 2 s with default
    /// settings). [`StateStore::keep_alive`] reports the TTL actually granted.
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError>;

    /// Refreshes the lease once, so that it lives a full TTL from now, and
    /// returns that TTL. The holder calls it in a loop, well within the TTL
    /// (a third of it is customary). An expired or revoked lease is
    /// [`StoreError::LeaseNotFound`].
    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError>;

    /// Ends the lease now and deletes every key bound to it (watchers see
    /// the deletes, all at one revision). An unknown lease is
    /// [`StoreError::LeaseNotFound`].
    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError>;

    /// Writes the key bound to `lease` and returns its new version; see
    /// [`Op::PutWithLease`].
    async fn put_with_lease(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: LeaseId,
    ) -> Result<u64, StoreError> {
        check_key(key)?;
        let outcome = self
            .txn(Txn {
                compares: Vec::new(),
                success: vec![Op::PutWithLease {
                    key: key.to_owned(),
                    value,
                    lease,
                }],
                failure: Vec::new(),
            })
            .await?;
        Ok(outcome.revision)
    }

    /// Writes `new` only if the key's version is `expected_version` (`None`:
    /// only if the key does not exist). `true` if the write happened.
    async fn compare_and_swap(
        &self,
        key: &str,
        expected_version: Option<u64>,
        new: Vec<u8>,
    ) -> Result<bool, StoreError> {
        let outcome = self
            .txn(Txn {
                compares: vec![Compare::Version {
                    key: key.to_owned(),
                    version: expected_version,
                }],
                success: vec![Op::Put {
                    key: key.to_owned(),
                    value: new,
                }],
                failure: Vec::new(),
            })
            .await?;
        Ok(outcome.succeeded)
    }
}
