//! Watches: the backend-neutral [`WatchEvent`] and [`WatchStream`] every
//! [`super::StateStore::watch`] returns, and `History`, the bounded change
//! history the in-process backends (memory, embedded) serve watches from.
//! etcd's watches are translated in [`super::etcd`], not here.
//!
//! # The in-process history
//!
//! Every committed change is appended to one history, in revision order (the
//! backends publish under the lock that orders their commits). A watcher is a
//! cursor into that history: it pulls the next matching event when polled
//! and parks its waker otherwise, so there is no per-watcher buffer and no
//! task, and a slow watcher costs nothing until it falls off the end.
//!
//! The history is bounded ([`HistoryLimits`], by default the latest 10,000
//! events and at most 64 MiB of keys and values). Trimming drops whole
//! revisions from the front, which raises the compaction point; a watch that
//! asks for, or a watcher whose cursor still needs, a trimmed revision gets
//! [`StoreError::Compacted`], exactly like an etcd watcher overtaken by
//! compaction. `History::compact` trims on request (the trait's `compact`).
//! An embedded store that reopens at revision `R` has no history: its
//! compaction point starts at `R + 1`.

use super::StoreError;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use tokio_stream::Stream;

/// One change seen by a watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchEvent {
    /// The key was written; `version` is the revision of that write (the
    /// version a `get` right after it returns).
    Put {
        key: String,
        value: Vec<u8>,
        version: u64,
    },
    /// The key was deleted (by a delete, a txn, or its lease ending) at
    /// revision `version`.
    Delete { key: String, version: u64 },
}

impl WatchEvent {
    /// The key that changed.
    pub fn key(&self) -> &str {
        match self {
            WatchEvent::Put { key, .. } | WatchEvent::Delete { key, .. } => key,
        }
    }

    /// The revision of the change.
    pub fn version(&self) -> u64 {
        match self {
            WatchEvent::Put { version, .. } | WatchEvent::Delete { version, .. } => *version,
        }
    }

    /// Key and value bytes, which is what the history's byte bound counts.
    fn weight(&self) -> usize {
        match self {
            WatchEvent::Put { key, value, .. } => key.len() + value.len(),
            WatchEvent::Delete { key, .. } => key.len(),
        }
    }
}

/// The changes under one prefix, as returned by
/// [`super::StateStore::watch`]. After an error item the stream ends. Drop it
/// to cancel the watch.
pub struct WatchStream {
    inner: Pin<Box<dyn Stream<Item = Result<WatchEvent, StoreError>> + Send>>,
}

impl WatchStream {
    /// Wraps a backend's stream.
    pub fn new(inner: impl Stream<Item = Result<WatchEvent, StoreError>> + Send + 'static) -> Self {
        WatchStream {
            inner: Box::pin(inner),
        }
    }

    /// The next change; `None` once the stream has ended (after an error).
    pub async fn next(&mut self) -> Option<Result<WatchEvent, StoreError>> {
        std::future::poll_fn(|cx| self.inner.as_mut().poll_next(cx)).await
    }
}

impl Stream for WatchStream {
    type Item = Result<WatchEvent, StoreError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

impl fmt::Debug for WatchStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WatchStream").finish_non_exhaustive()
    }
}

/// Refuses `Some(0)`: revisions start at 1, and etcd would read 0 as "now".
pub(crate) fn check_start_revision(start: Option<u64>) -> Result<(), StoreError> {
    if start == Some(0) {
        return Err(StoreError::InvalidRequest(
            "watch start revision 0 does not exist; use None to watch from now".to_owned(),
        ));
    }
    Ok(())
}

/// How much change history an in-process store keeps for watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HistoryLimits {
    /// At most this many events.
    pub max_events: usize,
    /// At most this many bytes of keys and values.
    pub max_bytes: usize,
}

impl Default for HistoryLimits {
    fn default() -> Self {
        HistoryLimits {
            max_events: 10_000,
            max_bytes: 64 << 20,
        }
    }
}

/// The bounded change history of an in-process store; see the module doc.
#[derive(Clone)]
pub(crate) struct History {
    shared: Arc<Mutex<State>>,
}

struct Recorded {
    revision: u64,
    event: WatchEvent,
}

struct State {
    limits: HistoryLimits,
    /// Oldest first; revisions never decrease.
    events: VecDeque<Recorded>,
    /// Sequence number of `events[0]`; sequence numbers count every event
    /// ever published, so a cursor survives trimming in front of it.
    first_seq: u64,
    bytes: usize,
    /// The oldest revision a watch can start from.
    compacted: u64,
    /// The revision of the last published change (the store's revision).
    last_revision: u64,
    /// Parked watchers, by watcher id.
    wakers: HashMap<u64, Waker>,
    next_watcher: u64,
    live_watchers: usize,
}

impl State {
    fn end_seq(&self) -> u64 {
        self.first_seq + self.events.len() as u64
    }

    fn pop_front_revision(&mut self) {
        let Some(front) = self.events.front().map(|r| r.revision) else {
            return;
        };
        while self.events.front().is_some_and(|r| r.revision == front) {
            if let Some(r) = self.events.pop_front() {
                self.bytes -= r.event.weight();
                self.first_seq += 1;
            }
        }
        self.compacted = self
            .events
            .front()
            .map(|r| r.revision)
            .unwrap_or(self.last_revision + 1);
    }

    fn wake_all(&mut self) {
        for (_, waker) in self.wakers.drain() {
            waker.wake();
        }
    }
}

impl fmt::Debug for History {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.shared.lock() {
            Ok(state) => f
                .debug_struct("History")
                .field("events", &state.events.len())
                .field("compacted", &state.compacted)
                .field("last_revision", &state.last_revision)
                .field("live_watchers", &state.live_watchers)
                .finish(),
            Err(_) => f.write_str("History(poisoned)"),
        }
    }
}

impl History {
    /// An empty history for a store whose last write has revision
    /// `revision`: watches can start at `revision + 1` or later.
    pub(crate) fn new(revision: u64, limits: HistoryLimits) -> Self {
        History {
            shared: Arc::new(Mutex::new(State {
                limits,
                events: VecDeque::new(),
                first_seq: 0,
                bytes: 0,
                compacted: revision + 1,
                last_revision: revision,
                wakers: HashMap::new(),
                next_watcher: 0,
                live_watchers: 0,
            })),
        }
    }

    fn lock(&self) -> Result<MutexGuard<'_, State>, StoreError> {
        // Nothing panics while the lock is held, so poisoning means a bug.
        self.shared
            .lock()
            .map_err(|_| StoreError::Internal("watch history lock poisoned".to_owned()))
    }

    /// Records the changes of one committed revision and wakes watchers.
    /// Callers publish in commit order; an out-of-order revision is a bug.
    pub(crate) fn publish(&self, revision: u64, events: Vec<WatchEvent>) -> Result<(), StoreError> {
        let mut state = self.lock()?;
        if revision <= state.last_revision {
            return Err(StoreError::Internal(format!(
                "watch history got revision {revision} after {}",
                state.last_revision
            )));
        }
        state.last_revision = revision;
        for event in events {
            state.bytes += event.weight();
            state.events.push_back(Recorded { revision, event });
        }
        while state.events.len() > state.limits.max_events || state.bytes > state.limits.max_bytes {
            state.pop_front_revision();
        }
        state.wake_all();
        Ok(())
    }

    /// Drops the history before `revision`; see `StateStore::compact`.
    pub(crate) fn compact(&self, revision: u64) -> Result<(), StoreError> {
        let mut state = self.lock()?;
        if revision > state.last_revision {
            return Err(StoreError::InvalidRequest(format!(
                "cannot compact at revision {revision}, the store is at {}",
                state.last_revision
            )));
        }
        if revision <= state.compacted {
            return Ok(());
        }
        while state.events.front().is_some_and(|r| r.revision < revision) {
            state.pop_front_revision();
        }
        state.compacted = revision;
        state.wake_all();
        Ok(())
    }

    /// How many watch streams are alive (for leak checks).
    pub(crate) fn live_watchers(&self) -> usize {
        self.lock().map(|s| s.live_watchers).unwrap_or(0)
    }

    /// A watch on `prefix`; see `StateStore::watch`.
    pub(crate) fn watch(
        &self,
        prefix: &str,
        start: Option<u64>,
    ) -> Result<WatchStream, StoreError> {
        check_start_revision(start)?;
        let mut state = self.lock()?;
        let id = state.next_watcher;
        state.next_watcher += 1;
        state.live_watchers += 1;
        let (cursor, min_revision, pending_error) = match start {
            None => (state.end_seq(), state.last_revision + 1, None),
            Some(requested) if requested < state.compacted => (
                state.end_seq(),
                requested,
                Some(StoreError::Compacted {
                    requested,
                    compacted: state.compacted,
                }),
            ),
            Some(requested) => {
                let index = state.events.partition_point(|r| r.revision < requested);
                (state.first_seq + index as u64, requested, None)
            }
        };
        drop(state);
        Ok(WatchStream::new(LocalWatch {
            history: self.clone(),
            id,
            prefix: prefix.to_owned(),
            cursor,
            min_revision,
            pending_error,
            done: false,
        }))
    }
}

/// One in-process watcher: a cursor into the [`History`].
struct LocalWatch {
    history: History,
    id: u64,
    prefix: String,
    /// Sequence number of the next event to look at.
    cursor: u64,
    /// Events below this revision are skipped. After a delivery it is that
    /// event's revision: a compaction error reports it as the revision the
    /// watcher needed, which may be one too old but never too new.
    min_revision: u64,
    pending_error: Option<StoreError>,
    done: bool,
}

impl LocalWatch {
    fn poll_locked(
        &mut self,
        state: &mut State,
        cx: &mut Context<'_>,
    ) -> Poll<Option<<Self as Stream>::Item>> {
        if self.cursor < state.first_seq {
            return Poll::Ready(Some(Err(StoreError::Compacted {
                requested: self.min_revision,
                compacted: state.compacted,
            })));
        }
        while self.cursor < state.end_seq() {
            let recorded = &state.events[(self.cursor - state.first_seq) as usize];
            self.cursor += 1;
            if recorded.revision >= self.min_revision
                && recorded.event.key().starts_with(self.prefix.as_str())
            {
                self.min_revision = recorded.revision;
                return Poll::Ready(Some(Ok(recorded.event.clone())));
            }
        }
        state.wakers.insert(self.id, cx.waker().clone());
        Poll::Pending
    }
}

impl Stream for LocalWatch {
    type Item = Result<WatchEvent, StoreError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        if let Some(err) = this.pending_error.take() {
            this.done = true;
            return Poll::Ready(Some(Err(err)));
        }
        let history = this.history.clone();
        let mut state = match history.lock() {
            Ok(state) => state,
            Err(err) => {
                this.done = true;
                return Poll::Ready(Some(Err(err)));
            }
        };
        let poll = this.poll_locked(&mut state, cx);
        if matches!(poll, Poll::Ready(Some(Err(_)))) {
            this.done = true;
        }
        poll
    }
}

impl Drop for LocalWatch {
    fn drop(&mut self) {
        if let Ok(mut state) = self.history.shared.lock() {
            state.wakers.remove(&self.id);
            state.live_watchers -= 1;
        }
    }
}
