//! The state store: the [`StateStore`] trait every backend implements, its
//! request and answer types ([`Txn`], [`Compare`], [`Op`], [`Versioned`]) and
//! its one error type [`StoreError`].
//!
//! Backends live in submodules: [`memory`] (unit tests) and [`embedded`] (one
//! durable redb file, the default for a single host); etcd comes later. The
//! key layout is in [`keys`], the JSON records stored under those keys in
//! [`records`], and the behaviour every backend must show in [`conformance`].
//! What the coordinator does with the store (persist before acting, reload
//! after an ambiguous write) lives in the coordinator, not here.

pub mod conformance;
pub mod embedded;
pub mod keys;
pub mod memory;
pub mod records;

pub use embedded::EmbeddedStore;
pub use memory::MemoryStore;

use async_trait::async_trait;
use std::collections::BTreeSet;

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
    Put {
        key: String,
        value: Vec<u8>,
    },
    /// Deleting a missing key is not an error.
    Delete {
        key: String,
    },
}

impl Op {
    /// The key this write touches.
    pub fn key(&self) -> &str {
        match self {
            Op::Put { key, .. } | Op::Delete { key } => key,
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
}

impl StoreError {
    /// Whether the same request may succeed if simply sent again. `Ambiguous`
    /// is not: the caller must reload first.
    pub fn retryable(&self) -> bool {
        match self {
            StoreError::Unavailable(_) => true,
            StoreError::Locked { .. }
            | StoreError::Io(_)
            | StoreError::Corrupt(_)
            | StoreError::ValueTooLarge { .. }
            | StoreError::Ambiguous(_)
            | StoreError::InvalidRequest(_)
            | StoreError::Internal(_) => false,
        }
    }
}

impl From<crate::ids::IdError> for StoreError {
    fn from(err: crate::ids::IdError) -> Self {
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
/// later: watches (`watch(prefix)` returning a stream of put/delete events
/// from a revision) and leases (`grant`, `keep_alive`, `revoke`, and puts
/// bound to a lease) join this trait with the etcd backend.
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
    async fn range(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, StoreError>;

    /// Runs a compare-and-swap transaction atomically.
    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError>;

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
