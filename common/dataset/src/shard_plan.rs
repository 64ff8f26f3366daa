//! The shard plan: which global sample indices each rank consumes at each
//! step. Pure functions of `(seed, epoch, the manifest's shard sizes,
//! global_batch, shuffle window)`: no IO, no clock, and nothing that depends
//! on the world size except the final split of a step's batch between ranks.
//! Loading the samples is the caller's job.
//!
//! # The order of an epoch
//!
//! Samples are numbered globally in manifest order (shard 0's rows first).
//! Epoch `e`'s order is built in two stages, so that a global batch draws on
//! a bounded set of shards and a streaming reader can hold only those:
//!
//! 1. **Shard order.** The shards `0..S` are shuffled (Fisher–Yates, below)
//!    with the stream of `(seed, e, "ringmaster/shard")`.
//! 2. **Windows.** The shuffled shards are cut into consecutive windows of
//!    `w` shards (`data.shuffle_window_shards`; the last window may be
//!    shorter; `w = 0` or `w ≥ S` is one window of all shards). Window `j`
//!    lists the sample ids of its shards in shuffled shard order, and that
//!    list is shuffled with ChaCha stream `j` of the key
//!    `(seed, e, "ringmaster/order")`. The epoch's order is window 0's
//!    samples, then window 1's, and so on.
//!
//! With a single window this is a uniform shuffle of the whole dataset; a
//! one-shard dataset gets exactly the permutation of earlier versions (stream
//! 0 of the same key over `0..n`). A smaller window mixes each sample only
//! with the samples of `w - 1` other shards in that epoch, though the shard
//! order, and so which shards share a window, changes every epoch.
//!
//! Each ChaCha8 key is 32 bytes: `seed` (little-endian), then `e`
//! (little-endian), then a 16-byte ASCII tag. The bounded draws use our own
//! unbiased multiply-and-reject on `next_u64` (see [`bounded`]) rather than
//! `rand`'s range sampling, whose algorithm may change between `rand`
//! versions: the order written into a checkpoint's cursor must mean the same
//! thing after a dependency upgrade. A regression test pins the first
//! indices of one permutation.
//!
//! # Steps and ranks
//!
//! Step `k` of an epoch consumes order positions `[k·B, min((k+1)·B, n))`
//! (the last step may be short), and rank `r` of `W` takes the contiguous
//! slice `[L·r/W, L·(r+1)/W)` of that batch of length `L`, so concatenating
//! the ranks' slices gives the same global batch whatever `W` is.
//!
//! [`EpochOrder`] computes an epoch's order one window at a time, so a plan
//! over millions of samples never holds more than two windows of ids.

use std::ops::Range;
use std::sync::Arc;

use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};

/// A plan that is impossible to follow.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ShardPlanError {
    #[error("a shard plan needs at least one sample")]
    EmptyDataset,
    #[error("the global batch must hold at least one sample")]
    ZeroBatch,
}

/// The data order of one job: fixed by the dataset's shard sizes, the job's
/// global batch, its seed and its shuffle window, independent of the world
/// size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardPlan {
    /// `starts[s]..starts[s + 1]` are shard `s`'s global sample ids; the last
    /// entry is the number of samples.
    starts: Arc<[u64]>,
    global_batch: u64,
    seed: u64,
    /// Shards per window, in `1..=S`.
    window: u32,
}

/// Domain tags keep the streams drawn for different purposes from the same
/// user seed unrelated.
pub(crate) const ORDER_TAG: &[u8; 16] = b"ringmaster/order";
const SHARD_TAG: &[u8; 16] = b"ringmaster/shard";

impl ShardPlan {
    /// A plan over a single shard of `num_samples` samples in steps of
    /// `global_batch`: a uniform shuffle of the whole dataset every epoch.
    pub fn new(num_samples: u64, global_batch: u64, seed: u64) -> Result<Self, ShardPlanError> {
        Self::with_shards(&[num_samples], global_batch, seed, 0)
    }

    /// A plan over shards of `shard_samples` samples each (manifest order),
    /// shuffled within windows of `window_shards` shards (`0`: one window of
    /// every shard).
    pub fn with_shards(
        shard_samples: &[u64],
        global_batch: u64,
        seed: u64,
        window_shards: u32,
    ) -> Result<Self, ShardPlanError> {
        let mut starts = Vec::with_capacity(shard_samples.len() + 1);
        let mut total = 0u64;
        starts.push(0);
        for &n in shard_samples {
            total = total.saturating_add(n);
            starts.push(total);
        }
        if total == 0 {
            return Err(ShardPlanError::EmptyDataset);
        }
        if global_batch == 0 {
            return Err(ShardPlanError::ZeroBatch);
        }
        let shards = shard_samples.len() as u32;
        let window = if window_shards == 0 {
            shards
        } else {
            window_shards.min(shards)
        };
        Ok(ShardPlan {
            starts: starts.into(),
            global_batch,
            seed,
            window,
        })
    }

    pub fn num_samples(&self) -> u64 {
        *self.starts.last().expect("at least the leading 0")
    }

    pub fn global_batch(&self) -> u64 {
        self.global_batch
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Number of shards.
    pub fn num_shards(&self) -> usize {
        self.starts.len() - 1
    }

    /// Shards per shuffle window (at most the number of shards).
    pub fn window_shards(&self) -> u32 {
        self.window
    }

    /// Samples in shard `shard`.
    pub fn shard_samples(&self, shard: usize) -> u64 {
        self.starts[shard + 1] - self.starts[shard]
    }

    /// The global sample ids shard `shard` holds.
    pub fn shard_ids(&self, shard: usize) -> Range<u64> {
        self.starts[shard]..self.starts[shard + 1]
    }

    /// The shard holding global sample `id` and the row within it, or `None`
    /// past the end.
    pub fn locate(&self, id: u64) -> Option<(usize, u64)> {
        if id >= self.num_samples() {
            return None;
        }
        // The last start not above `id` (empty shards share a start).
        let shard = self.starts.partition_point(|&s| s <= id) - 1;
        Some((shard, id - self.starts[shard]))
    }

    /// Steps in one epoch: `ceil(num_samples / global_batch)`.
    pub fn steps_per_epoch(&self) -> u64 {
        self.num_samples().div_ceil(self.global_batch)
    }

    /// Epoch `epoch`'s order, computed a window at a time.
    pub fn epoch(&self, epoch: u64) -> EpochOrder {
        let mut shards: Vec<u32> = (0..self.num_shards() as u32).collect();
        shuffle(&mut shards, &mut stream(self.seed, epoch, SHARD_TAG));
        let mut window_ends = Vec::new();
        let mut end = 0u64;
        for window in shards.chunks(self.window as usize) {
            end += window
                .iter()
                .map(|&s| self.shard_samples(s as usize))
                .sum::<u64>();
            window_ends.push(end);
        }
        EpochOrder {
            plan: self.clone(),
            epoch,
            shards,
            window_ends,
            cached: Vec::new(),
        }
    }

    /// The order in which epoch `epoch` visits the samples: a permutation of
    /// `0..num_samples` that depends only on the plan and `epoch`. Holds
    /// every id: for tests and small datasets; the trainer uses
    /// [`Self::epoch`].
    pub fn epoch_permutation(&self, epoch: u64) -> Vec<u64> {
        let perm = self.epoch(epoch).ids(0..self.num_samples());
        debug_assert!(is_permutation(&perm), "epoch order is not a permutation");
        perm
    }

    /// Positions in the epoch's order consumed by step `step_in_epoch`:
    /// `[k·B, min((k+1)·B, n))`. The last step of an epoch may be short; a step
    /// past the end of the epoch gets an empty range at `n`.
    pub fn batch_range(&self, step_in_epoch: u64) -> Range<u64> {
        let n = self.num_samples();
        let start = step_in_epoch.saturating_mul(self.global_batch).min(n);
        let end = start.saturating_add(self.global_batch).min(n);
        debug_assert!(start <= end && end <= n && end - start <= self.global_batch);
        debug_assert!(step_in_epoch >= self.steps_per_epoch() || start < end);
        start..end
    }

    /// The global sample indices rank `rank` of `world` consumes at step
    /// `step_in_epoch`, given that epoch's permutation (from
    /// [`Self::epoch_permutation`]). Empty when the slice is empty or `perm`
    /// does not cover it.
    ///
    /// # Panics
    /// When `rank >= world`, like [`rank_range`].
    pub fn rank_indices<'p>(
        &self,
        perm: &'p [u64],
        step_in_epoch: u64,
        rank: u32,
        world: u32,
    ) -> &'p [u64] {
        debug_assert_eq!(perm.len() as u64, self.num_samples(), "foreign permutation");
        let r = rank_range(self.batch_range(step_in_epoch), rank, world);
        perm.get(r.start as usize..r.end as usize).unwrap_or(&[])
    }

    /// Splits a global step count into `(epoch, step_in_epoch)`.
    pub fn position(&self, global_step: u64) -> (u64, u64) {
        let steps = self.steps_per_epoch();
        let pos = (global_step / steps, global_step % steps);
        debug_assert_eq!(pos.0 * steps + pos.1, global_step);
        pos
    }

    /// The global step count of `(epoch, step_in_epoch)`, the inverse of
    /// [`Self::position`]; saturates at `u64::MAX`.
    pub fn global_step(&self, epoch: u64, step_in_epoch: u64) -> u64 {
        epoch
            .saturating_mul(self.steps_per_epoch())
            .saturating_add(step_in_epoch)
    }
}

/// One epoch's order, materialised a window at a time (the two most recently
/// used windows are kept, so a batch that straddles two windows costs no
/// recomputation).
#[derive(Clone, Debug)]
pub struct EpochOrder {
    plan: ShardPlan,
    epoch: u64,
    /// The epoch's shard order.
    shards: Vec<u32>,
    /// `window_ends[j]`: the order position just past window `j`.
    window_ends: Vec<u64>,
    /// Shuffled ids of recently used windows, most recent last.
    cached: Vec<(usize, Vec<u64>)>,
}

/// Windows an [`EpochOrder`] keeps shuffled.
const CACHED_WINDOWS: usize = 2;

impl EpochOrder {
    /// The epoch this order belongs to.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Number of shuffle windows.
    pub fn windows(&self) -> usize {
        self.window_ends.len()
    }

    /// The window holding order position `position` (the last window for a
    /// position at or past the end).
    pub fn window_at(&self, position: u64) -> usize {
        self.window_ends
            .partition_point(|&end| end <= position)
            .min(self.windows() - 1)
    }

    /// Order positions of window `window`.
    pub fn window_positions(&self, window: usize) -> Range<u64> {
        let start = if window == 0 {
            0
        } else {
            self.window_ends[window - 1]
        };
        start..self.window_ends[window]
    }

    /// The shards of window `window`, in the epoch's shard order.
    pub fn window_shards(&self, window: usize) -> &[u32] {
        let w = self.plan.window as usize;
        let start = window * w;
        &self.shards[start..(start + w).min(self.shards.len())]
    }

    /// The ids at order positions `positions` (clamped to the epoch).
    pub fn ids(&mut self, positions: Range<u64>) -> Vec<u64> {
        let end = positions.end.min(self.plan.num_samples());
        let mut pos = positions.start.min(end);
        let mut out = Vec::with_capacity((end - pos) as usize);
        while pos < end {
            let window = self.window_at(pos);
            let range = self.window_positions(window);
            let stop = end.min(range.end);
            let ids = self.window_ids(window);
            out.extend_from_slice(
                &ids[(pos - range.start) as usize..(stop - range.start) as usize],
            );
            pos = stop;
        }
        out
    }

    /// Rank `rank` of `world`'s ids at step `step_in_epoch` of this epoch.
    ///
    /// # Panics
    /// When `rank >= world`, like [`rank_range`].
    pub fn rank_ids(&mut self, step_in_epoch: u64, rank: u32, world: u32) -> Vec<u64> {
        let r = rank_range(self.plan.batch_range(step_in_epoch), rank, world);
        self.ids(r)
    }

    /// Window `window`'s shuffled ids.
    fn window_ids(&mut self, window: usize) -> &[u64] {
        if let Some(i) = self.cached.iter().position(|(w, _)| *w == window) {
            let hit = self.cached.remove(i);
            self.cached.push(hit);
        } else {
            let mut ids = Vec::with_capacity(self.window_positions(window).count());
            for &s in self.window_shards(window) {
                ids.extend(self.plan.shard_ids(s as usize));
            }
            let mut rng = stream(self.plan.seed, self.epoch, ORDER_TAG);
            rng.set_stream(window as u64);
            shuffle(&mut ids, &mut rng);
            if self.cached.len() == CACHED_WINDOWS {
                self.cached.remove(0);
            }
            self.cached.push((window, ids));
        }
        &self.cached.last().expect("pushed above").1
    }
}

/// Rank `rank`'s contiguous slice of `batch` when it is split among `world`
/// ranks: `[start + L·r/W, start + L·(r+1)/W)` with `L = batch.len()`. Slices
/// differ in length by at most one and, concatenated in rank order, give
/// `batch` back.
///
/// # Panics
/// When `rank >= world`: ranks come from the group the coordinator formed, so
/// a rank outside it is a bug, not bad input.
pub fn rank_range(batch: Range<u64>, rank: u32, world: u32) -> Range<u64> {
    assert!(rank < world, "rank {rank} outside a world of {world}");
    let len = u128::from(batch.end.saturating_sub(batch.start));
    let (r, w) = (u128::from(rank), u128::from(world));
    // Both offsets are at most len, which fits in u64.
    let start = batch.start + (len * r / w) as u64;
    let end = batch.start + (len * (r + 1) / w) as u64;
    debug_assert!(batch.start <= start && start <= end && end <= batch.end.max(batch.start));
    debug_assert!(u128::from(end - start) <= len / w + 1);
    start..end
}

/// A ChaCha8 stream seeded from `(seed, stream, tag)`; see the module docs.
pub(crate) fn stream(seed: u64, stream: u64, tag: &[u8; 16]) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&stream.to_le_bytes());
    key[16..].copy_from_slice(tag);
    ChaCha8Rng::from_seed(key)
}

/// A uniform draw from `0..bound` (`bound > 0`): Lemire's multiply-shift with
/// rejection of the low products that would over-represent some values, so
/// the result is exactly uniform and depends only on the `next_u64` stream.
pub(crate) fn bounded(rng: &mut impl RngCore, bound: u64) -> u64 {
    debug_assert!(bound > 0);
    // 2^64 mod bound: products whose low half falls below it are rejected.
    let threshold = bound.wrapping_neg() % bound;
    loop {
        let m = u128::from(rng.next_u64()) * u128::from(bound);
        if m as u64 >= threshold {
            return (m >> 64) as u64;
        }
    }
}

/// `0..n` in Fisher–Yates order driven by `rng`.
#[cfg(feature = "pack")]
pub(crate) fn shuffled(n: u64, rng: &mut impl RngCore) -> Vec<u64> {
    let mut perm: Vec<u64> = (0..n).collect();
    shuffle(&mut perm, rng);
    perm
}

/// Shuffles `items` in place, Fisher–Yates from the back, driven by `rng`.
pub(crate) fn shuffle<T>(items: &mut [T], rng: &mut impl RngCore) {
    for i in (1..items.len()).rev() {
        let j = bounded(rng, i as u64 + 1) as usize;
        items.swap(i, j);
    }
}

fn is_permutation(perm: &[u64]) -> bool {
    let mut seen = vec![false; perm.len()];
    perm.iter().all(|&i| {
        seen.get_mut(i as usize)
            .is_some_and(|s| !std::mem::replace(s, true))
    })
}
