//! Checkpoint retention as a pure function: given a policy and what is known
//! about each checkpoint (step, committed, metrics), which steps to keep and
//! which to delete. No IO here: the coordinator feeds it from the store and
//! hands the delete set to [`super::gc`].

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};

/// How many checkpoints to keep. With both fields `None` everything is kept.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RetentionPolicy {
    /// Keep the newest `n` committed checkpoints.
    pub keep_last: Option<u32>,
    /// Also keep the best committed checkpoints by a metric.
    pub keep_best: Option<KeepBest>,
}

/// Keep the `count` committed checkpoints with the best value of `metric`.
#[derive(Clone, Debug, PartialEq)]
pub struct KeepBest {
    pub metric: String,
    pub mode: Mode,
    pub count: u32,
}

/// Whether a smaller or a larger metric value is better.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Min,
    Max,
}

/// What retention needs to know about one checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckpointInfo {
    pub step: u64,
    /// Recorded as committed in the store (every rank acknowledged).
    pub committed: bool,
    pub metrics: BTreeMap<String, f64>,
}

/// The steps to keep and to delete; together they are exactly the input's
/// steps, and no step is in both.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetentionPlan {
    pub keep: BTreeSet<u64>,
    pub delete: BTreeSet<u64>,
}

/// Decides which checkpoints to keep:
///
/// - with no policy (both fields `None`) everything is kept;
/// - the newest committed checkpoint is always kept;
/// - the newest `keep_last` committed checkpoints are kept;
/// - the best `count` committed checkpoints by the metric are kept; those
///   without the metric or with a NaN value are not candidates, and of equal
///   values the newer step wins;
/// - uncommitted checkpoints older than the newest committed one are deleted
///   (leftovers of a crash or an aborted commit), newer ones are kept (they
///   may still be committing);
/// - every other committed checkpoint is deleted.
///
/// A step listed more than once counts as committed if any entry says so, and
/// then takes the metrics of the first committed entry.
pub fn plan_retention(policy: &RetentionPolicy, checkpoints: &[CheckpointInfo]) -> RetentionPlan {
    let mut by_step: BTreeMap<u64, &CheckpointInfo> = BTreeMap::new();
    for info in checkpoints {
        by_step
            .entry(info.step)
            .and_modify(|seen| {
                if !seen.committed && info.committed {
                    *seen = info;
                }
            })
            .or_insert(info);
    }
    let all: BTreeSet<u64> = by_step.keys().copied().collect();
    if policy.keep_last.is_none() && policy.keep_best.is_none() {
        return RetentionPlan {
            keep: all,
            delete: BTreeSet::new(),
        };
    }

    // Ascending by step.
    let committed: Vec<&CheckpointInfo> =
        by_step.values().copied().filter(|c| c.committed).collect();
    let newest_committed = committed.last().map(|c| c.step);
    let mut keep = BTreeSet::new();
    if let Some(newest) = newest_committed {
        keep.insert(newest);
    }
    if let Some(n) = policy.keep_last {
        keep.extend(committed.iter().rev().take(n as usize).map(|c| c.step));
    }
    if let Some(best) = &policy.keep_best {
        let mut candidates: Vec<(f64, u64)> = committed
            .iter()
            .filter_map(|c| {
                let v = *c.metrics.get(&best.metric)?;
                (!v.is_nan()).then_some((v, c.step))
            })
            .collect();
        candidates.sort_by(|a, b| better_first(best.mode, *a, *b));
        keep.extend(
            candidates
                .iter()
                .take(best.count as usize)
                .map(|&(_, step)| step),
        );
    }
    for info in by_step.values().filter(|c| !c.committed) {
        if newest_committed.is_none_or(|newest| info.step > newest) {
            keep.insert(info.step);
        }
    }
    let delete: BTreeSet<u64> = all.difference(&keep).copied().collect();

    debug_assert!(keep.is_disjoint(&delete), "a step both kept and deleted");
    debug_assert_eq!(
        keep.len() + delete.len(),
        all.len(),
        "plan is not a partition"
    );
    debug_assert!(keep.is_subset(&all), "kept a step that was not given");
    debug_assert!(
        newest_committed.is_none_or(|n| keep.contains(&n)),
        "the newest committed checkpoint must be kept"
    );
    debug_assert!(
        by_step
            .values()
            .filter(|c| !c.committed && newest_committed.is_none_or(|n| c.step > n))
            .all(|c| keep.contains(&c.step)),
        "an uncommitted checkpoint newer than every committed one was deleted"
    );
    RetentionPlan { keep, delete }
}

/// Orders (value, step) pairs best first: by value per `mode`, then newer
/// step first. Values are never NaN here, so `total_cmp` is the usual order.
fn better_first(mode: Mode, (va, sa): (f64, u64), (vb, sb): (f64, u64)) -> Ordering {
    let by_value = match mode {
        Mode::Min => va.total_cmp(&vb),
        Mode::Max => vb.total_cmp(&va),
    };
    by_value.then(sb.cmp(&sa))
}
