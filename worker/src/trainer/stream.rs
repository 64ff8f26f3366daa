//! Rank-local streaming of a training set larger than memory: the rank
//! reads the shards its batches draw on as it needs them, verifies each one
//! as it reads it, and keeps at most `data.cache_bytes` of decoded shards.
//! A background thread reads ahead in the order the shard plan will need
//! the shards (the windows from the trainer's cursor on, into the next
//! epoch), so reads overlap training.
//!
//! The plan is a pure function, so the reader needs nothing from the
//! coordinator but the cursor the run already holds: a rank that restarts,
//! or joins a re-formed group of another size, asks for the samples of its
//! next step and gets the same ones a rank that never stopped would have.
//!
//! Correctness never depends on the read-ahead: a shard the trainer needs
//! and does not find is read on the trainer's thread (and the trainer waits
//! for a read the prefetcher has in flight rather than reading twice). The
//! cache holds the shards of the step being assembled even past its limit,
//! so a window larger than the cache is slow (shards are re-read), never
//! wrong.

use super::TrainError;
use ringmaster_dataset::{
    DatasetManifest, DecodedShard, Labels, ShardPlan, ShardReader, read_shard,
};
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Shards of a training set, read on demand and ahead of time.
pub(super) struct StreamedData {
    plan: ShardPlan,
    shared: Arc<Shared>,
    prefetcher: Option<JoinHandle<()>>,
}

/// What the trainer and the read-ahead thread share.
struct Shared {
    manifest: DatasetManifest,
    reader: Box<dyn ShardReader>,
    limit: u64,
    state: Mutex<CacheState>,
    changed: Condvar,
}

#[derive(Default)]
struct CacheState {
    shards: HashMap<usize, Arc<DecodedShard>>,
    /// Decoded bytes of `shards`.
    bytes: u64,
    /// Decoded bytes of the shard the read-ahead thread is reading: room
    /// kept for it, so the cache stays within its limit when it lands.
    reserved: u64,
    /// Shards being read (by either thread): the other waits rather than
    /// reading one twice.
    loading: BTreeSet<usize>,
    /// Where the trainer is: `(epoch, order position)` of its next batch.
    cursor: Option<(u64, u64)>,
    /// Shards the read-ahead thread has found unreadable; the trainer reads
    /// them itself when it needs them, and fails with the reason.
    failed: BTreeSet<usize>,
    /// Shards the next steps need, in order of need: never evicted for
    /// read-ahead.
    wanted: Vec<usize>,
    stats: StreamStats,
    shutdown: bool,
}

/// What streaming did over a run, for the run's log.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(super) struct StreamStats {
    /// Shards read and verified (by either thread).
    pub reads: u64,
    pub bytes_read: u64,
    /// Time the trainer spent waiting for shards.
    pub stalled: Duration,
    /// Most decoded bytes held at once.
    pub peak_bytes: u64,
}

impl StreamedData {
    /// Streams the training set described by `manifest` through `reader`,
    /// in `plan`'s order, within `limit` bytes of decoded shards. Reads
    /// nothing yet: the first step's shards are read when it asks for them
    /// (or ahead of it, once [`advance`](Self::advance) says where it is).
    pub fn open(
        manifest: DatasetManifest,
        reader: Box<dyn ShardReader>,
        plan: ShardPlan,
        limit: u64,
    ) -> Result<StreamedData, TrainError> {
        let shared = Arc::new(Shared {
            manifest,
            reader,
            limit,
            state: Mutex::new(CacheState::default()),
            changed: Condvar::new(),
        });
        let worker = {
            let shared = shared.clone();
            let plan = plan.clone();
            std::thread::Builder::new()
                .name("prefetch-shards".into())
                .spawn(move || read_ahead(&shared, &plan))
                .map_err(|e| TrainError::Invalid(format!("cannot start the shard reader: {e}")))?
        };
        Ok(StreamedData {
            plan,
            shared,
            prefetcher: Some(worker),
        })
    }

    /// The bytes one shuffle window of the largest shards decodes to: the
    /// least cache that lets a window stay resident.
    pub fn window_bytes(&self) -> u64 {
        let mut sizes: Vec<u64> = (0..self.plan.num_shards())
            .map(|s| self.shard_bytes(s))
            .collect();
        sizes.sort_unstable_by(|a, b| b.cmp(a));
        sizes.iter().take(self.plan.window_shards() as usize).sum()
    }

    fn shard_bytes(&self, shard: usize) -> u64 {
        ringmaster_dataset::decoded_bytes(
            self.plan.shard_samples(shard),
            self.shared.manifest.features(),
            self.shared.manifest.labels(),
        )
    }

    /// Tells the read-ahead thread that the next batch starts at order
    /// position `position` of epoch `epoch`.
    pub fn advance(&self, epoch: u64, position: u64) {
        let mut st = self.shared.lock();
        if st.cursor != Some((epoch, position)) {
            st.cursor = Some((epoch, position));
            self.shared.changed.notify_all();
        }
    }

    /// Features (row-major) and labels (or targets) of the samples `ids`,
    /// in that order.
    pub fn gather(&self, ids: &[u64]) -> Result<(Vec<f32>, Labels), TrainError> {
        let d = self.shared.manifest.features();
        let mut located = Vec::with_capacity(ids.len());
        let mut needed = BTreeSet::new();
        for &id in ids {
            let (shard, row) = self.plan.locate(id).ok_or_else(|| {
                TrainError::Invalid(format!("sample {id} is outside the training set"))
            })?;
            located.push((shard, row as usize));
            needed.insert(shard);
        }
        let mut held: HashMap<usize, Arc<DecodedShard>> = HashMap::new();
        for &shard in &needed {
            held.insert(shard, self.shard(shard, &needed)?);
        }
        let mut x = Vec::with_capacity(ids.len() * d);
        let mut y = Labels::empty(self.shared.manifest.labels());
        for (shard, row) in located {
            let s = &held[&shard];
            x.extend_from_slice(s.features_of(row));
            y.extend(s.y.slice(row, row + 1))?;
        }
        Ok((x, y))
    }

    /// Shard `shard`: from the cache, from the read in flight, or read now.
    fn shard(
        &self,
        shard: usize,
        needed: &BTreeSet<usize>,
    ) -> Result<Arc<DecodedShard>, TrainError> {
        let started = Instant::now();
        let mut st = self.shared.lock();
        loop {
            if let Some(s) = st.shards.get(&shard) {
                let s = s.clone();
                st.stats.stalled += started.elapsed();
                return Ok(s);
            }
            if !st.loading.contains(&shard) {
                break;
            }
            st = self
                .shared
                .changed
                .wait(st)
                .unwrap_or_else(|e| e.into_inner());
        }
        st.loading.insert(shard);
        drop(st);
        let read = read_shard(self.shared.reader.as_ref(), &self.shared.manifest, shard);
        let mut st = self.shared.lock();
        st.loading.remove(&shard);
        let decoded = match read {
            Ok(d) => Arc::new(d),
            Err(e) => {
                self.shared.changed.notify_all();
                return Err(e.into());
            }
        };
        st.failed.remove(&shard);
        st.stats.reads += 1;
        st.stats.bytes_read += decoded.bytes();
        self.shared.make_room(&mut st, decoded.bytes(), needed);
        st.insert(shard, decoded.clone());
        st.stats.stalled += started.elapsed();
        self.shared.changed.notify_all();
        Ok(decoded)
    }

    /// Streaming figures so far.
    pub fn stats(&self) -> StreamStats {
        self.shared.lock().stats
    }
}

impl Drop for StreamedData {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.changed.notify_all();
        if let Some(t) = self.prefetcher.take() {
            let _ = t.join();
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, CacheState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Evicts shards that are neither wanted soon nor in `keep` until
    /// `incoming` more bytes fit under the limit (or nothing else can go).
    fn make_room(&self, st: &mut CacheState, incoming: u64, keep: &BTreeSet<usize>) {
        if st.bytes + st.reserved + incoming <= self.limit {
            return;
        }
        // Evict what is needed last (or not at all) first.
        let rank_of = |s: &usize| st.wanted.iter().position(|w| w == s);
        let mut victims: Vec<(Option<usize>, usize)> = st
            .shards
            .keys()
            .filter(|s| !keep.contains(s))
            .map(|s| (rank_of(s), *s))
            .collect();
        // Unwanted (None) first, then the furthest need.
        victims.sort_by_key(|(rank, _)| std::cmp::Reverse(rank.unwrap_or(usize::MAX)));
        for (_, s) in victims {
            if st.bytes + st.reserved + incoming <= self.limit {
                break;
            }
            if let Some(gone) = st.shards.remove(&s) {
                st.bytes -= gone.bytes();
            }
        }
    }
}

impl CacheState {
    fn insert(&mut self, shard: usize, decoded: Arc<DecodedShard>) {
        let bytes = decoded.bytes();
        if let Some(old) = self.shards.insert(shard, decoded) {
            self.bytes -= old.bytes();
        }
        self.bytes += bytes;
        self.stats.peak_bytes = self.stats.peak_bytes.max(self.bytes);
    }
}

/// The read-ahead loop: whenever the cursor moves, lists the shards the
/// coming windows need (within the cache's limit) and reads the first one
/// not held, evicting only shards needed later than it or not at all.
fn read_ahead(shared: &Shared, plan: &ShardPlan) {
    let (d, labels) = (shared.manifest.features(), shared.manifest.labels());
    let bytes_of = |s: usize| ringmaster_dataset::decoded_bytes(plan.shard_samples(s), d, labels);
    let mut seen_cursor = None;
    let mut orders: Vec<ringmaster_dataset::EpochOrder> = Vec::new();
    loop {
        let mut st = shared.lock();
        let next = loop {
            if st.shutdown {
                return;
            }
            if let Some(cursor) = st.cursor {
                if seen_cursor != Some(cursor) {
                    seen_cursor = Some(cursor);
                    st.wanted = wanted(plan, &mut orders, cursor, shared.limit, &bytes_of);
                }
                let todo = st.wanted.iter().copied().find(|s| {
                    !st.shards.contains_key(s) && !st.failed.contains(s) && !st.loading.contains(s)
                });
                if let Some(s) = todo {
                    // Room only at the expense of shards needed after `s`.
                    let pos = st.wanted.iter().position(|&w| w == s).unwrap_or(0);
                    let keep: BTreeSet<usize> = st.wanted[..pos].iter().copied().collect();
                    shared.make_room(&mut st, bytes_of(s), &keep);
                    if st.bytes + st.reserved + bytes_of(s) <= shared.limit || st.shards.is_empty()
                    {
                        break s;
                    }
                }
            }
            st = shared.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        };
        st.loading.insert(next);
        st.reserved += bytes_of(next);
        drop(st);
        let read = read_shard(shared.reader.as_ref(), &shared.manifest, next);
        let mut st = shared.lock();
        st.loading.remove(&next);
        st.reserved -= bytes_of(next);
        match read {
            Ok(decoded) => {
                st.stats.reads += 1;
                st.stats.bytes_read += decoded.bytes();
                st.insert(next, Arc::new(decoded));
            }
            Err(e) => {
                tracing::debug!("read-ahead of shard {next} failed: {e}");
                st.failed.insert(next);
            }
        }
        shared.changed.notify_all();
    }
}

/// The shards the windows from `cursor` on need, in order of need, up to
/// `limit` bytes (always at least one), continuing into the next epoch.
fn wanted(
    plan: &ShardPlan,
    orders: &mut Vec<ringmaster_dataset::EpochOrder>,
    (epoch, position): (u64, u64),
    limit: u64,
    bytes_of: &dyn Fn(usize) -> u64,
) -> Vec<usize> {
    // Shard orders are cheap (no sample shuffles), but keep this epoch's
    // and the next's rather than recomputing them at every step.
    orders.retain(|o| o.epoch() >= epoch && o.epoch() <= epoch + 1);
    for e in [epoch, epoch + 1] {
        if !orders.iter().any(|o| o.epoch() == e) {
            orders.push(plan.epoch(e));
        }
    }
    orders.sort_by_key(|o| o.epoch());
    let mut out = Vec::new();
    let mut total = 0u64;
    for order in orders.iter() {
        let first = if order.epoch() == epoch {
            order.window_at(position)
        } else {
            0
        };
        for window in first..order.windows() {
            for &s in order.window_shards(window) {
                let s = s as usize;
                if out.contains(&s) {
                    continue;
                }
                let b = bytes_of(s);
                if !out.is_empty() && total + b > limit {
                    return out;
                }
                total += b;
                out.push(s);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringmaster_dataset::{Dataset, LocalDir, SynthOptions, synthesize};

    fn dataset(dir: &std::path::Path, samples: usize, shard: usize) -> Dataset {
        synthesize(&SynthOptions {
            output: dir.into(),
            name: "stream".into(),
            samples,
            features: 3,
            classes: 4,
            seed: 9,
            shard_samples: shard,
        })
        .unwrap();
        Dataset::load(dir).unwrap()
    }

    fn open(dir: &std::path::Path, plan: &ShardPlan, limit: u64) -> StreamedData {
        let manifest = DatasetManifest::read(dir).unwrap();
        StreamedData::open(
            manifest,
            Box::new(LocalDir(dir.into())),
            plan.clone(),
            limit,
        )
        .unwrap()
    }

    #[test]
    fn streamed_batches_are_the_samples_asked_for_within_the_cache_limit() {
        let tmp = tempfile::tempdir().unwrap();
        let all = dataset(tmp.path(), 500, 37);
        let plan = ShardPlan::with_shards(&all.manifest.shard_samples(), 64, 5, 3).unwrap();
        let shard_bytes =
            ringmaster_dataset::decoded_bytes(37, 3, ringmaster_dataset::LabelKind::Classes(4));
        // Two windows and a shard: windows never have to be read twice.
        let roomy = sweep(tmp.path(), &plan, &all, shard_bytes * 7);
        assert!(roomy.peak_bytes <= shard_bytes * 7, "{roomy:?}");
        // 14 shards: each read at least once and at most once per epoch (a
        // shard in the last window of one epoch and the first of the next
        // is read once for both).
        assert!((14..=3 * 14).contains(&roomy.reads), "{roomy:?}");
        // A window and a half: the read-ahead must evict, batches that
        // straddle two windows need more than the limit for a moment, and
        // the samples are still the right ones.
        let tight = sweep(tmp.path(), &plan, &all, shard_bytes * 9 / 2);
        assert!(tight.peak_bytes <= 7 * shard_bytes, "{tight:?}");
    }

    /// Streams three epochs of `plan` for 3 ranks within `limit`, checking
    /// every sample against `all`.
    fn sweep(dir: &std::path::Path, plan: &ShardPlan, all: &Dataset, limit: u64) -> StreamStats {
        let data = open(dir, plan, limit);
        for epoch in 0..3 {
            let mut order = plan.epoch(epoch);
            for step in 0..plan.steps_per_epoch() {
                let range = plan.batch_range(step);
                data.advance(epoch, range.start);
                for rank in 0..3 {
                    let ids = order.rank_ids(step, rank, 3);
                    let (x, y) = data.gather(&ids).unwrap();
                    for (i, &id) in ids.iter().enumerate() {
                        let (row, label) = all.sample(id as usize).unwrap();
                        assert_eq!(&x[i * 3..i * 3 + 3], row);
                        assert_eq!(y.slice(i, i + 1), label);
                    }
                }
            }
        }
        data.stats()
    }

    #[test]
    fn a_corrupt_shard_fails_the_step_that_needs_it_naming_its_path() {
        let tmp = tempfile::tempdir().unwrap();
        let all = dataset(tmp.path(), 100, 25);
        let shard = tmp.path().join("shard-00002.safetensors");
        let mut bytes = std::fs::read(&shard).unwrap();
        let n = bytes.len();
        bytes[n - 1] ^= 1;
        std::fs::write(&shard, bytes).unwrap();
        std::fs::remove_file(tmp.path().join("shard-00003.safetensors")).unwrap();
        let plan = ShardPlan::with_shards(&all.manifest.shard_samples(), 10, 1, 1).unwrap();
        let data = open(tmp.path(), &plan, 1 << 20);
        data.advance(0, 0);
        // Samples of an intact shard still come.
        assert!(data.gather(&[0, 1, 30]).is_ok());
        let err = data.gather(&[51]).unwrap_err().to_string();
        assert!(
            err.contains(&format!("shard {}: sha256 is", shard.display())),
            "{err}"
        );
        let err = data.gather(&[99]).unwrap_err().to_string();
        assert!(err.contains("shard-00003.safetensors"), "{err}");
    }
}
