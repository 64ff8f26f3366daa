//! [`EmbeddedStore`]: the durable single-file state store for one host, on
//! redb. The key layout is in [`super::keys`]; this file only maps the
//! [`StateStore`] contract onto redb tables.
//!
//! File layout (format 1):
//! - table `kv`: key -> `(version, value bytes)`;
//! - table `meta`: `revision` -> the store revision of the last write,
//!   `format` -> the file format, checked on open.
//!
//! Durability: every write commits with `Durability::Immediate` (fsync before
//! the call returns). A commit that fails is reported as
//! [`StoreError::Ambiguous`], since part of it may have reached the disk.
//!
//! Blocking: redb calls block. Each call runs one short redb transaction on
//! tokio's blocking pool (`spawn_blocking`), which works on both the
//! multi-thread runtime of the coordinator and the current-thread runtime of
//! tests (`block_in_place` would panic on the latter). [`EmbeddedStore::open`]
//! is synchronous: it runs once, at start-up.

use super::{Op, StateStore, StoreError, Txn, TxnOutcome, Versioned, check_key};
use async_trait::async_trait;
use redb::{Database, DatabaseError, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use std::path::{Path, PathBuf};
use std::sync::Arc;

const KV: TableDefinition<&str, (u64, &[u8])> = TableDefinition::new("kv");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const META_REVISION: &str = "revision";
const META_FORMAT: &str = "format";
/// Bumped when the tables above change shape; an unknown format is refused.
const FORMAT: u64 = 1;

type KvTable<'txn> = redb::Table<'txn, &'static str, (u64, &'static [u8])>;

/// A state store in one redb file, locked against a second opener.
#[derive(Debug, Clone)]
pub struct EmbeddedStore {
    db: Arc<Database>,
    path: PathBuf,
}

impl EmbeddedStore {
    /// The file name the coordinator uses inside its state directory.
    pub const FILE_NAME: &'static str = "ringmaster.redb";

    /// Opens the store file at `path`, creating it if missing (its directory
    /// must exist). Fails with [`StoreError::Locked`] while another process,
    /// or another `EmbeddedStore` in this one, has it open.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let shown = path.display().to_string();
        let db = Database::create(path).map_err(|err| match err {
            DatabaseError::DatabaseAlreadyOpen => StoreError::Locked {
                path: shown.clone(),
            },
            other => redb_err(&format!("open {shown}"), other),
        })?;
        let store = EmbeddedStore {
            db: Arc::new(db),
            path: path.to_owned(),
        };
        store.init_tables()?;
        Ok(store)
    }

    /// The store file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates the tables on first open (so that reads never meet a missing
    /// table) and refuses files of an unknown format.
    fn init_tables(&self) -> Result<(), StoreError> {
        let what = format!("initialise {}", self.path.display());
        let what = what.as_str();
        let tx = self.db.begin_write().map_err(|e| redb_err(what, e))?;
        {
            let mut meta = tx.open_table(META).map_err(|e| redb_err(what, e))?;
            let format = meta
                .get(META_FORMAT)
                .map_err(|e| redb_err(what, e))?
                .map(|guard| guard.value());
            match format {
                Some(FORMAT) => {}
                Some(other) => {
                    return Err(StoreError::Corrupt(format!(
                        "{what}: file format {other} is not the supported format {FORMAT}"
                    )));
                }
                None => {
                    meta.insert(META_FORMAT, FORMAT)
                        .map_err(|e| redb_err(what, e))?;
                }
            }
            tx.open_table(KV).map_err(|e| redb_err(what, e))?;
        }
        tx.commit()
            .map_err(|e| StoreError::Ambiguous(format!("{what}: commit failed: {e}")))
    }

    /// Runs `f` on the blocking pool.
    async fn blocking<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    {
        let handle = tokio::runtime::Handle::try_current().map_err(|_| {
            StoreError::Internal("embedded store used outside a tokio runtime".to_owned())
        })?;
        let db = Arc::clone(&self.db);
        match handle.spawn_blocking(move || f(&db)).await {
            Ok(result) => result,
            // Never started: the runtime is shutting down, nothing was written.
            Err(err) if err.is_cancelled() => Err(StoreError::Unavailable(
                "runtime shutting down before the store call ran".to_owned(),
            )),
            // A panic drops the redb write transaction uncommitted, so nothing
            // was written either; it is still a bug.
            Err(err) => Err(StoreError::Internal(format!("store call panicked: {err}"))),
        }
    }
}

/// Runs one durable write transaction. `f` gets the kv table, the current
/// revision and the revision this write would get, and returns its answer and
/// whether it changed anything; unchanged transactions are aborted so that
/// the revision only moves on real writes.
fn write<T>(
    db: &Database,
    what: &str,
    f: impl FnOnce(&mut KvTable<'_>, u64, u64) -> Result<(T, bool), StoreError>,
) -> Result<T, StoreError> {
    let mut tx = db.begin_write().map_err(|e| redb_err(what, e))?;
    tx.set_durability(Durability::Immediate)
        .map_err(|e| redb_err(what, e))?;
    let (out, changed) = {
        let mut meta = tx.open_table(META).map_err(|e| redb_err(what, e))?;
        let current = meta
            .get(META_REVISION)
            .map_err(|e| redb_err(what, e))?
            .map(|guard| guard.value())
            .unwrap_or(0);
        let next = current
            .checked_add(1)
            .ok_or_else(|| StoreError::Corrupt(format!("{what}: store revision overflowed")))?;
        let mut kv = tx.open_table(KV).map_err(|e| redb_err(what, e))?;
        let (out, changed) = f(&mut kv, current, next)?;
        if changed {
            meta.insert(META_REVISION, next)
                .map_err(|e| redb_err(what, e))?;
        }
        (out, changed)
    };
    if changed {
        tx.commit()
            .map_err(|e| StoreError::Ambiguous(format!("{what}: commit failed: {e}")))?;
    } else {
        tx.abort().map_err(|e| redb_err(what, e))?;
    }
    Ok(out)
}

fn read_one(db: &Database, what: &str, key: &str) -> Result<Option<Versioned>, StoreError> {
    let tx = db.begin_read().map_err(|e| redb_err(what, e))?;
    let kv = tx.open_table(KV).map_err(|e| redb_err(what, e))?;
    let found = kv.get(key).map_err(|e| redb_err(what, e))?;
    Ok(found.map(|guard| {
        let (version, value) = guard.value();
        Versioned {
            value: value.to_vec(),
            version,
        }
    }))
}

/// Maps a redb error onto the store's contract; `what` names the call.
fn redb_err(what: &str, err: impl Into<redb::Error>) -> StoreError {
    use redb::Error as E;
    match err.into() {
        // redb reports a file that is not a redb file as invalid data.
        E::Io(err) if err.kind() == std::io::ErrorKind::InvalidData => {
            StoreError::Corrupt(format!("{what}: not a store file: {err}"))
        }
        E::Io(err) => StoreError::Io(format!("{what}: {err}")),
        E::PreviousIo => StoreError::Io(format!(
            "{what}: an earlier io error left the store unusable; restart to recover"
        )),
        E::Corrupted(msg) => StoreError::Corrupt(format!("{what}: {msg}")),
        E::UpgradeRequired(version) => StoreError::Corrupt(format!(
            "{what}: file is in redb format {version}, which this build can not read"
        )),
        err @ (E::TableTypeMismatch { .. }
        | E::TypeDefinitionChanged { .. }
        | E::TableIsMultimap(_)
        | E::TableIsNotMultimap(_)) => {
            StoreError::Corrupt(format!("{what}: file was written with other tables: {err}"))
        }
        E::ValueTooLarge(len) => {
            StoreError::InvalidRequest(format!("{what}: value of {len} bytes is over redb's limit"))
        }
        other => StoreError::Internal(format!("{what}: {other}")),
    }
}

#[async_trait]
impl StateStore for EmbeddedStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        check_key(key)?;
        let key = key.to_owned();
        self.blocking(move |db| read_one(db, &format!("get {key:?}"), &key))
            .await
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<u64, StoreError> {
        check_key(key)?;
        let key = key.to_owned();
        self.blocking(move |db| {
            write(db, &format!("put {key:?}"), |kv, _, next| {
                kv.insert(key.as_str(), (next, value.as_slice()))
                    .map_err(|e| redb_err(&format!("put {key:?}"), e))?;
                Ok((next, true))
            })
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        check_key(key)?;
        let key = key.to_owned();
        self.blocking(move |db| {
            let what = format!("delete {key:?}");
            write(db, &what, |kv, _, _| {
                let existed = kv
                    .remove(key.as_str())
                    .map_err(|e| redb_err(&what, e))?
                    .is_some();
                Ok((existed, existed))
            })
        })
        .await
    }

    async fn range(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, StoreError> {
        let prefix = prefix.to_owned();
        self.blocking(move |db| {
            let what = format!("range {prefix:?}");
            let err = |e: redb::StorageError| redb_err(&what, e);
            let tx = db.begin_read().map_err(|e| redb_err(&what, e))?;
            let kv = tx.open_table(KV).map_err(|e| redb_err(&what, e))?;
            let mut out = Vec::new();
            for entry in kv.range::<&str>(prefix.as_str()..).map_err(err)? {
                let (key, value) = entry.map_err(err)?;
                let key = key.value();
                if !key.starts_with(prefix.as_str()) {
                    break;
                }
                let (version, value) = value.value();
                out.push((
                    key.to_owned(),
                    Versioned {
                        value: value.to_vec(),
                        version,
                    },
                ));
            }
            Ok(out)
        })
        .await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        txn.validate()?;
        self.blocking(move |db| {
            let what = "txn";
            write(db, what, |kv, current, next| {
                let mut succeeded = true;
                for compare in &txn.compares {
                    let found = kv.get(compare.key()).map_err(|e| redb_err(what, e))?;
                    let holds = compare.holds(found.as_ref().map(|guard| guard.value()));
                    if !holds {
                        succeeded = false;
                        break;
                    }
                }
                let ops = if succeeded { txn.success } else { txn.failure };
                let mut changed = false;
                for op in ops {
                    match op {
                        Op::Put { key, value } => {
                            kv.insert(key.as_str(), (next, value.as_slice()))
                                .map_err(|e| redb_err(what, e))?;
                            changed = true;
                        }
                        Op::Delete { key } => {
                            changed |= kv
                                .remove(key.as_str())
                                .map_err(|e| redb_err(what, e))?
                                .is_some();
                        }
                    }
                }
                let revision = if changed { next } else { current };
                Ok((
                    TxnOutcome {
                        succeeded,
                        revision,
                    },
                    changed,
                ))
            })
        })
        .await
    }
}
