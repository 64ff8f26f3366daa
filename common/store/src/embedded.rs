//! [`EmbeddedStore`]: the durable single-file state store for one host, on
//! redb. The key layout is in [`super::keys`]; this file only maps the
//! [`StateStore`] contract onto redb tables. Watches and leases use the
//! in-process machinery of [`super::watch`] and [`super::lease`].
//!
//! File layout (format 2):
//! - table `kv`: key -> `(version, value bytes)`;
//! - table `leased`: key -> the lease id it is bound to (format 2; a format 1
//!   file is upgraded in place on open by adding the empty table);
//! - table `meta`: `revision` -> the store revision of the last write,
//!   `format` -> the file format, checked on open.
//!
//! Durability: every write commits with `Durability::Immediate` (fsync before
//! the call returns). A commit that fails is reported as
//! [`StoreError::Ambiguous`], since part of it may have reached the disk.
//!
//! Leases are not durable: they live in memory, and only the key -> lease
//! binding is on disk, so that [`EmbeddedStore::open`] deletes every key
//! that was bound to a lease (in one revision). The process that kept those
//! leases alive is gone, so its keys (worker registrations, say) must not
//! outlive it; the new process grants new leases and writes them again.
//! Lease ids from before a reopen are unknown afterwards
//! ([`StoreError::LeaseNotFound`]).
//!
//! Watch history is in memory too (bounded, see [`super::watch`]): after a
//! reopen at revision `R`, watches can start at `R + 1` or later.
//!
//! Ordering: writes hold one mutex across redb commit, lease bookkeeping and
//! publishing to the watch history, so watchers see revisions in order.
//!
//! Blocking: redb calls block. Each call runs one short redb transaction on
//! tokio's blocking pool (`spawn_blocking`), which works on both the
//! multi-thread runtime of the coordinator and the current-thread runtime of
//! tests (`block_in_place` would panic on the latter). [`EmbeddedStore::open`]
//! is synchronous: it runs once, at start-up.

use super::lease::{Expire, Leases, Reaper};
use super::local::{self, Tables};
use super::watch::History;
use super::{
    Compare, HistoryLimits, LeaseId, Op, StateStore, StoreError, Txn, TxnOutcome, Versioned,
    WatchStream, check_key,
};
use async_trait::async_trait;
use redb::{
    Database, DatabaseError, Durability, ReadableDatabase, ReadableTable, TableDefinition,
    WriteTransaction,
};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::time::Instant;

const KV: TableDefinition<&str, (u64, &[u8])> = TableDefinition::new("kv");
const LEASED: TableDefinition<&str, i64> = TableDefinition::new("leased");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const META_REVISION: &str = "revision";
const META_FORMAT: &str = "format";
/// Bumped when the tables above change shape; an unknown format is refused.
const FORMAT: u64 = 2;
/// Formats this build upgrades in place: 1 lacks the `leased` table.
const UPGRADABLE: u64 = 1;

type KvTable<'txn> = redb::Table<'txn, &'static str, (u64, &'static [u8])>;
type LeasedTable<'txn> = redb::Table<'txn, &'static str, i64>;

/// A state store in one redb file, locked against a second opener. Clones
/// share it.
#[derive(Debug, Clone)]
pub struct EmbeddedStore {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    db: Database,
    path: PathBuf,
    /// Held across every write (see the module doc); guards the leases.
    writer: Mutex<Leases>,
    history: History,
    reaper: Reaper,
}

impl EmbeddedStore {
    /// The file name the coordinator uses inside its state directory.
    pub const FILE_NAME: &'static str = "ringmaster.redb";

    /// Opens the store file at `path`, creating it if missing (its directory
    /// must exist), and deletes the keys that were bound to leases (see the
    /// module doc). Fails with [`StoreError::Locked`] while another process,
    /// or another `EmbeddedStore` in this one, has it open.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with_history_limits(path, HistoryLimits::default())
    }

    /// Like [`EmbeddedStore::open`], keeping the given amount of watch
    /// history.
    pub fn open_with_history_limits(
        path: &Path,
        limits: HistoryLimits,
    ) -> Result<Self, StoreError> {
        let shown = path.display().to_string();
        let db = Database::create(path).map_err(|err| match err {
            DatabaseError::DatabaseAlreadyOpen => StoreError::Locked {
                path: shown.clone(),
            },
            other => redb_err(&format!("open {shown}"), other),
        })?;
        let revision = init_tables(&db, &shown)?;
        Ok(EmbeddedStore {
            shared: Arc::new(Shared {
                db,
                path: path.to_owned(),
                writer: Mutex::new(Leases::new()),
                history: History::new(revision, limits),
                reaper: Reaper::default(),
            }),
        })
    }

    /// The store file's path.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// How many watch streams are open (dropping one closes it).
    pub fn active_watches(&self) -> usize {
        self.shared.history.live_watchers()
    }

    /// Runs `f` on the blocking pool.
    async fn blocking<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Shared) -> Result<T, StoreError> + Send + 'static,
    {
        blocking(Arc::clone(&self.shared), f).await
    }
}

async fn blocking<T, F>(shared: Arc<Shared>, f: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: FnOnce(&Shared) -> Result<T, StoreError> + Send + 'static,
{
    let handle = tokio::runtime::Handle::try_current().map_err(|_| {
        StoreError::Internal("embedded store used outside a tokio runtime".to_owned())
    })?;
    match handle.spawn_blocking(move || f(&shared)).await {
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

/// Creates the tables on first open (so that reads never meet a missing
/// table), upgrades format 1, refuses files of an unknown format, and deletes
/// the keys bound to leases of an earlier process. Returns the revision.
fn init_tables(db: &Database, shown: &str) -> Result<u64, StoreError> {
    let what = format!("initialise {shown}");
    let what = what.as_str();
    let mut tx = db.begin_write().map_err(|e| redb_err(what, e))?;
    tx.set_durability(Durability::Immediate)
        .map_err(|e| redb_err(what, e))?;
    let revision = {
        let mut meta = tx.open_table(META).map_err(|e| redb_err(what, e))?;
        let format = meta
            .get(META_FORMAT)
            .map_err(|e| redb_err(what, e))?
            .map(|guard| guard.value());
        match format {
            Some(FORMAT) => {}
            Some(UPGRADABLE) | None => {
                meta.insert(META_FORMAT, FORMAT)
                    .map_err(|e| redb_err(what, e))?;
            }
            Some(other) => {
                return Err(StoreError::Corrupt(format!(
                    "{what}: file format {other} is not the supported format {FORMAT}"
                )));
            }
        }
        let current = meta
            .get(META_REVISION)
            .map_err(|e| redb_err(what, e))?
            .map(|guard| guard.value())
            .unwrap_or(0);
        let mut kv = tx.open_table(KV).map_err(|e| redb_err(what, e))?;
        let mut leased = tx.open_table(LEASED).map_err(|e| redb_err(what, e))?;
        let orphans: Vec<String> = leased
            .iter()
            .map_err(|e| redb_err(what, e))?
            .map(|entry| entry.map(|(key, _)| key.value().to_owned()))
            .collect::<Result<_, _>>()
            .map_err(|e| redb_err(what, e))?;
        let mut deleted = false;
        for key in &orphans {
            deleted |= kv
                .remove(key.as_str())
                .map_err(|e| redb_err(what, e))?
                .is_some();
            leased.remove(key.as_str()).map_err(|e| redb_err(what, e))?;
        }
        if deleted {
            meta.insert(META_REVISION, current + 1)
                .map_err(|e| redb_err(what, e))?;
            current + 1
        } else {
            current
        }
    };
    tx.commit()
        .map_err(|e| StoreError::Ambiguous(format!("{what}: commit failed: {e}")))?;
    Ok(revision)
}

/// The writable tables of one redb write transaction.
struct RedbTables<'txn> {
    kv: KvTable<'txn>,
    leased: LeasedTable<'txn>,
    what: &'txn str,
}

impl Tables for RedbTables<'_> {
    fn holds(&self, compare: &Compare) -> Result<bool, StoreError> {
        let found = self
            .kv
            .get(compare.key())
            .map_err(|e| redb_err(self.what, e))?;
        Ok(compare.holds(found.as_ref().map(|guard| guard.value())))
    }

    fn write(
        &mut self,
        key: &str,
        version: u64,
        value: &[u8],
        lease: Option<LeaseId>,
    ) -> Result<(), StoreError> {
        let what = self.what;
        self.kv
            .insert(key, (version, value))
            .map_err(|e| redb_err(what, e))?;
        match lease {
            Some(lease) => {
                self.leased
                    .insert(key, lease.0)
                    .map_err(|e| redb_err(what, e))?;
            }
            None => {
                self.leased.remove(key).map_err(|e| redb_err(what, e))?;
            }
        }
        Ok(())
    }

    fn remove(&mut self, key: &str) -> Result<bool, StoreError> {
        let what = self.what;
        self.leased.remove(key).map_err(|e| redb_err(what, e))?;
        Ok(self
            .kv
            .remove(key)
            .map_err(|e| redb_err(what, e))?
            .is_some())
    }
}

impl Shared {
    fn writer(&self) -> Result<MutexGuard<'_, Leases>, StoreError> {
        // Nothing panics while the lock is held, so poisoning means a bug.
        self.writer
            .lock()
            .map_err(|_| StoreError::Internal("embedded store writer lock poisoned".to_owned()))
    }

    /// One durable write (see [`super::local`]), with the writer lock held by
    /// the caller. Returns `decide`'s answer and the store revision after the
    /// write; a write that changes nothing is aborted and keeps the revision.
    fn write<T>(
        &self,
        leases: &mut Leases,
        what: &str,
        decide: impl FnOnce(&RedbTables<'_>, &mut Leases) -> Result<(T, Vec<Op>), StoreError>,
    ) -> Result<(T, u64), StoreError> {
        let mut tx = self.db.begin_write().map_err(|e| redb_err(what, e))?;
        tx.set_durability(Durability::Immediate)
            .map_err(|e| redb_err(what, e))?;
        let (answer, ops, events, current, next) = {
            let mut meta = tx.open_table(META).map_err(|e| redb_err(what, e))?;
            let current = meta
                .get(META_REVISION)
                .map_err(|e| redb_err(what, e))?
                .map(|guard| guard.value())
                .unwrap_or(0);
            let next = current
                .checked_add(1)
                .ok_or_else(|| StoreError::Corrupt(format!("{what}: store revision overflowed")))?;
            let mut tables = open_tables(&tx, what)?;
            let (answer, ops) = decide(&tables, leases)?;
            leases.check(&ops, Instant::now())?;
            let events = local::apply(&mut tables, &ops, next)?;
            if !events.is_empty() {
                meta.insert(META_REVISION, next)
                    .map_err(|e| redb_err(what, e))?;
            }
            (answer, ops, events, current, next)
        };
        if events.is_empty() {
            tx.abort().map_err(|e| redb_err(what, e))?;
            return Ok((answer, current));
        }
        tx.commit()
            .map_err(|e| StoreError::Ambiguous(format!("{what}: commit failed: {e}")))?;
        leases.record(&ops);
        self.history.publish(next, events)?;
        Ok((answer, next))
    }

    fn revoke(&self, leases: &mut Leases, lease: LeaseId) -> Result<(), StoreError> {
        let what = format!("revoke lease {lease}");
        self.write(leases, &what, |_, leases| {
            Ok(((), local::revoke_ops(leases, lease)?))
        })?;
        Ok(())
    }
}

fn open_tables<'txn>(
    tx: &'txn WriteTransaction,
    what: &'txn str,
) -> Result<RedbTables<'txn>, StoreError> {
    Ok(RedbTables {
        kv: tx.open_table(KV).map_err(|e| redb_err(what, e))?,
        leased: tx.open_table(LEASED).map_err(|e| redb_err(what, e))?,
        what,
    })
}

#[async_trait]
impl Expire for Shared {
    fn next_deadline(&self) -> Option<Instant> {
        self.writer().ok()?.next_deadline()
    }

    async fn expire_due(self: Arc<Self>) -> Result<(), StoreError> {
        blocking(self, |shared| {
            let mut leases = shared.writer()?;
            for lease in leases.due(Instant::now()) {
                shared.revoke(&mut leases, lease)?;
            }
            Ok(())
        })
        .await
    }
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
        self.blocking(move |shared| read_one(&shared.db, &format!("get {key:?}"), &key))
            .await
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<u64, StoreError> {
        check_key(key)?;
        let key = key.to_owned();
        self.blocking(move |shared| {
            let what = format!("put {key:?}");
            let ops = vec![Op::Put { key, value }];
            let mut leases = shared.writer()?;
            Ok(shared.write(&mut leases, &what, |_, _| Ok(((), ops)))?.1)
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        check_key(key)?;
        let key = key.to_owned();
        self.blocking(move |shared| {
            let what = format!("delete {key:?}");
            let compare = Compare::Version {
                key: key.clone(),
                version: None,
            };
            let ops = vec![Op::Delete { key }];
            let mut leases = shared.writer()?;
            let (existed, _) = shared.write(&mut leases, &what, |tables, _| {
                Ok((!tables.holds(&compare)?, ops))
            })?;
            Ok(existed)
        })
        .await
    }

    async fn range_with_revision(
        &self,
        prefix: &str,
    ) -> Result<(Vec<(String, Versioned)>, u64), StoreError> {
        let prefix = prefix.to_owned();
        self.blocking(move |shared| {
            let what = format!("range {prefix:?}");
            let err = |e: redb::StorageError| redb_err(&what, e);
            let tx = shared.db.begin_read().map_err(|e| redb_err(&what, e))?;
            let meta = tx.open_table(META).map_err(|e| redb_err(&what, e))?;
            let revision = meta
                .get(META_REVISION)
                .map_err(err)?
                .map(|guard| guard.value())
                .unwrap_or(0);
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
            Ok((out, revision))
        })
        .await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        txn.validate()?;
        self.blocking(move |shared| {
            let mut leases = shared.writer()?;
            let (succeeded, revision) =
                shared.write(&mut leases, "txn", |tables, _| local::choose(tables, txn))?;
            Ok(TxnOutcome {
                succeeded,
                revision,
            })
        })
        .await
    }

    async fn watch(
        &self,
        prefix: &str,
        start_revision: Option<u64>,
    ) -> Result<WatchStream, StoreError> {
        self.shared.history.watch(prefix, start_revision)
    }

    async fn compact(&self, revision: u64) -> Result<(), StoreError> {
        self.shared.history.compact(revision)
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let id = self
            .blocking(move |shared| shared.writer()?.grant(ttl, Instant::now()))
            .await?;
        self.shared.reaper.poke(&self.shared);
        Ok(id)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError> {
        let ttl = self
            .blocking(move |shared| {
                let mut leases = shared.writer()?;
                if let Some(ttl) = leases.refresh(lease, Instant::now()) {
                    return Ok(ttl);
                }
                if leases.exists(lease) {
                    // Past its deadline but not reaped yet: end it now, as
                    // etcd does.
                    shared.revoke(&mut leases, lease)?;
                }
                Err(StoreError::LeaseNotFound(lease))
            })
            .await?;
        self.shared.reaper.poke(&self.shared);
        Ok(ttl)
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.blocking(move |shared| {
            let mut leases = shared.writer()?;
            shared.revoke(&mut leases, lease)
        })
        .await
    }
}
