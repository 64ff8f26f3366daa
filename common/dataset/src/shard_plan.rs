//! The shard plan: which global sample indices each rank consumes at each
//! step. Pure functions of `(seed, epoch, num_samples, global_batch)`: no IO,
//! no clock, and nothing that depends on the world size except the final
//! split of a step's batch between ranks. Loading the samples is the caller's
//! job.
//!
//! Epoch `e`'s order is a Fisher–Yates shuffle of `0..n` driven by a
//! `ChaCha8Rng` whose 32-byte seed is `seed` (little-endian), then `e`
//! (little-endian), then the 16 ASCII bytes `ringmaster/order`. The bounded
//! draws use our own unbiased multiply-and-reject on `next_u64` (see
//! [`bounded`]) rather than `rand`'s range sampling, whose algorithm may
//! change between `rand` versions: the order written into a checkpoint's
//! cursor must mean the same thing after a dependency upgrade. A regression
//! test pins the first indices of one permutation.
//!
//! Step `k` of an epoch consumes permutation positions `[k·B, min((k+1)·B, n))`
//! (the last step may be short), and rank `r` of `W` takes the contiguous
//! slice `[L·r/W, L·(r+1)/W)` of that batch of length `L`, so concatenating
//! the ranks' slices gives the same global batch whatever `W` is.

use std::ops::Range;

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

/// The data order of one job: fixed by the dataset size, the job's global
/// batch and its seed, independent of the world size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardPlan {
    num_samples: u64,
    global_batch: u64,
    seed: u64,
}

/// Domain tags keep the streams drawn for different purposes from the same
/// user seed unrelated.
pub(crate) const ORDER_TAG: &[u8; 16] = b"ringmaster/order";

impl ShardPlan {
    /// A plan over `num_samples` samples in steps of `global_batch`.
    pub fn new(num_samples: u64, global_batch: u64, seed: u64) -> Result<Self, ShardPlanError> {
        if num_samples == 0 {
            return Err(ShardPlanError::EmptyDataset);
        }
        if global_batch == 0 {
            return Err(ShardPlanError::ZeroBatch);
        }
        Ok(ShardPlan {
            num_samples,
            global_batch,
            seed,
        })
    }

    pub fn num_samples(&self) -> u64 {
        self.num_samples
    }

    pub fn global_batch(&self) -> u64 {
        self.global_batch
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Steps in one epoch: `ceil(num_samples / global_batch)`.
    pub fn steps_per_epoch(&self) -> u64 {
        self.num_samples.div_ceil(self.global_batch)
    }

    /// The order in which epoch `epoch` visits the samples: a permutation of
    /// `0..num_samples` that depends only on `(seed, epoch, num_samples)`.
    pub fn epoch_permutation(&self, epoch: u64) -> Vec<u64> {
        let perm = shuffled(self.num_samples, &mut stream(self.seed, epoch, ORDER_TAG));
        debug_assert!(is_permutation(&perm), "epoch order is not a permutation");
        perm
    }

    /// Positions in the epoch's permutation consumed by step `step_in_epoch`:
    /// `[k·B, min((k+1)·B, n))`. The last step of an epoch may be short; a step
    /// past the end of the epoch gets an empty range at `n`.
    pub fn batch_range(&self, step_in_epoch: u64) -> Range<u64> {
        let n = self.num_samples;
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
        debug_assert_eq!(perm.len() as u64, self.num_samples, "foreign permutation");
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
pub(crate) fn shuffled(n: u64, rng: &mut impl RngCore) -> Vec<u64> {
    let mut perm: Vec<u64> = (0..n).collect();
    for i in (1..perm.len()).rev() {
        let j = bounded(rng, i as u64 + 1) as usize;
        perm.swap(i, j);
    }
    perm
}

fn is_permutation(perm: &[u64]) -> bool {
    let mut seen = vec![false; perm.len()];
    perm.iter().all(|&i| {
        seen.get_mut(i as usize)
            .is_some_and(|s| !std::mem::replace(s, true))
    })
}
