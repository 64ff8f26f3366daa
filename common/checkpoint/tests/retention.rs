//! Checkpoint retention's pure plan: table cases with the exact steps kept,
//! and properties over random histories (partition, the newest committed
//! checkpoint survives, the kept count is bounded, planning is idempotent).

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use ringmaster_checkpoint::{
    CheckpointInfo, KeepBest, Mode, RetentionPlan, RetentionPolicy, plan_retention,
};

fn info(step: u64, committed: bool, metric: Option<(&str, f64)>) -> CheckpointInfo {
    CheckpointInfo {
        step,
        committed,
        metrics: metric
            .map(|(k, v)| (k.to_string(), v))
            .into_iter()
            .collect(),
    }
}

fn committed_with(metric: &str, values: &[(u64, f64)]) -> Vec<CheckpointInfo> {
    values
        .iter()
        .map(|&(step, v)| info(step, true, Some((metric, v))))
        .collect()
}

fn policy(keep_last: Option<u32>, best: Option<(&str, Mode, u32)>) -> RetentionPolicy {
    RetentionPolicy {
        keep_last,
        keep_best: best.map(|(metric, mode, count)| KeepBest {
            metric: metric.to_string(),
            mode,
            count,
        }),
    }
}

#[track_caller]
fn check(policy: &RetentionPolicy, checkpoints: &[CheckpointInfo], keep: &[u64]) {
    let plan = plan_retention(policy, checkpoints);
    let all: BTreeSet<u64> = checkpoints.iter().map(|c| c.step).collect();
    let keep: BTreeSet<u64> = keep.iter().copied().collect();
    let delete: BTreeSet<u64> = all.difference(&keep).copied().collect();
    assert_eq!(plan, RetentionPlan { keep, delete });
}

/// Steps 10..=60 with val_accuracy peaking at step 20.
fn accuracy_run() -> Vec<CheckpointInfo> {
    committed_with(
        "val_accuracy",
        &[
            (10, 0.50),
            (20, 0.91),
            (30, 0.80),
            (40, 0.85),
            (50, 0.88),
            (60, 0.87),
        ],
    )
}

#[test]
fn keep_last_two_and_best_one_keeps_the_best_and_the_newest_two() {
    check(
        &policy(Some(2), Some(("val_accuracy", Mode::Max, 1))),
        &accuracy_run(),
        &[20, 50, 60],
    );
}

#[test]
fn keep_best_by_minimum_and_by_count() {
    let run = committed_with(
        "val_loss",
        &[(10, 0.9), (20, 0.3), (30, 0.5), (40, 0.2), (50, 0.7)],
    );
    check(
        &policy(None, Some(("val_loss", Mode::Min, 2))),
        &run,
        &[20, 40, 50],
    );
    check(
        &policy(None, Some(("val_loss", Mode::Max, 1))),
        &run,
        &[10, 50],
    );
    check(
        &policy(Some(0), Some(("val_loss", Mode::Min, 0))),
        &run,
        &[50],
    );
    check(&policy(Some(10), None), &run, &[10, 20, 30, 40, 50]);
}

#[test]
fn ties_go_to_the_newer_step_and_missing_or_nan_metrics_never_win() {
    let run = vec![
        info(10, true, Some(("acc", 0.9))),
        info(20, true, Some(("acc", 0.9))),
        info(30, true, Some(("acc", f64::NAN))),
        info(40, true, None),
        info(50, true, Some(("loss", 99.0))),
        info(60, true, Some(("acc", 0.1))),
    ];
    check(&policy(None, Some(("acc", Mode::Max, 1))), &run, &[20, 60]);
    check(
        &policy(None, Some(("acc", Mode::Max, 2))),
        &run,
        &[10, 20, 60],
    );
    // Only three candidates have a number: asking for more keeps just those.
    check(
        &policy(None, Some(("acc", Mode::Min, 5))),
        &run,
        &[10, 20, 60],
    );
}

#[test]
fn uncommitted_older_than_newest_committed_go_newer_stay() {
    let run = vec![
        info(10, true, None),
        info(15, false, None),
        info(20, true, None),
        info(25, false, None),
        info(30, true, None),
        info(35, false, None),
        info(40, false, None),
    ];
    check(&policy(Some(1), None), &run, &[30, 35, 40]);
    check(&policy(Some(2), None), &run, &[20, 30, 35, 40]);
}

#[test]
fn without_a_policy_or_a_commit_everything_stays() {
    let run = vec![
        info(10, true, None),
        info(15, false, None),
        info(20, true, None),
    ];
    check(&RetentionPolicy::default(), &run, &[10, 15, 20]);
    let uncommitted = vec![info(10, false, None), info(20, false, None)];
    check(&policy(Some(0), None), &uncommitted, &[10, 20]);
    check(&policy(Some(1), None), &[], &[]);
}

#[test]
fn the_newest_committed_survives_keep_last_zero_and_a_bad_metric() {
    let run = committed_with("acc", &[(10, 0.9), (20, 0.1)]);
    check(
        &policy(Some(0), Some(("acc", Mode::Max, 1))),
        &run,
        &[10, 20],
    );
    check(&policy(Some(0), None), &run, &[20]);
}

#[test]
fn a_duplicated_step_counts_as_committed_if_any_entry_is() {
    let run = vec![
        info(10, false, None),
        info(10, true, Some(("acc", 0.5))),
        info(20, true, Some(("acc", 0.1))),
        info(30, true, Some(("acc", 0.2))),
    ];
    check(
        &policy(Some(1), Some(("acc", Mode::Max, 1))),
        &run,
        &[10, 30],
    );
}

fn arb_policy() -> impl Strategy<Value = RetentionPolicy> {
    (
        proptest::option::of(0u32..5),
        proptest::option::of((prop_oneof![Just(Mode::Min), Just(Mode::Max)], 0u32..4)),
    )
        .prop_map(|(keep_last, best)| RetentionPolicy {
            keep_last,
            keep_best: best.map(|(mode, count)| KeepBest {
                metric: "m".to_string(),
                mode,
                count,
            }),
        })
}

fn arb_checkpoints() -> impl Strategy<Value = Vec<CheckpointInfo>> {
    let metric = prop_oneof![
        3 => (0u8..6).prop_map(|v| Some(f64::from(v) / 4.0)),
        1 => Just(Some(f64::NAN)),
        1 => Just(None),
    ];
    proptest::collection::btree_map(0u64..200, (any::<bool>(), metric), 0..25).prop_map(|m| {
        m.into_iter()
            .map(|(step, (committed, metric))| CheckpointInfo {
                step,
                committed,
                metrics: metric
                    .map(|v| ("m".to_string(), v))
                    .into_iter()
                    .collect::<BTreeMap<_, _>>(),
            })
            .collect()
    })
}

proptest! {
    #[test]
    fn keep_and_delete_partition_the_input(policy in arb_policy(), cps in arb_checkpoints()) {
        let plan = plan_retention(&policy, &cps);
        let all: BTreeSet<u64> = cps.iter().map(|c| c.step).collect();
        prop_assert!(plan.keep.is_disjoint(&plan.delete));
        let union: BTreeSet<u64> = plan.keep.union(&plan.delete).copied().collect();
        prop_assert_eq!(union, all);
    }

    #[test]
    fn the_newest_committed_is_always_kept(policy in arb_policy(), cps in arb_checkpoints()) {
        let plan = plan_retention(&policy, &cps);
        let has_policy = policy.keep_last.is_some() || policy.keep_best.is_some();
        match cps.iter().filter(|c| c.committed).map(|c| c.step).max() {
            Some(newest) if has_policy => {
                prop_assert!(plan.keep.contains(&newest));
                // Crash leftovers go, possibly in-flight checkpoints stay.
                for c in cps.iter().filter(|c| !c.committed) {
                    prop_assert_eq!(plan.keep.contains(&c.step), c.step > newest, "step {}", c.step);
                }
            }
            // Nothing committed, or no policy: nothing to delete.
            _ => prop_assert!(plan.delete.is_empty()),
        }
    }

    #[test]
    fn kept_committed_are_bounded_by_the_policy(policy in arb_policy(), cps in arb_checkpoints()) {
        prop_assume!(policy.keep_last.is_some() || policy.keep_best.is_some());
        let plan = plan_retention(&policy, &cps);
        let kept_committed = cps
            .iter()
            .filter(|c| c.committed && plan.keep.contains(&c.step))
            .count();
        let bound = policy.keep_last.unwrap_or(0) as usize
            + policy.keep_best.as_ref().map_or(0, |b| b.count as usize)
            + 1;
        prop_assert!(kept_committed <= bound, "{} > {}", kept_committed, bound);
        // And keep_last is honoured: the newest keep_last committed are kept.
        let mut committed: Vec<u64> = cps.iter().filter(|c| c.committed).map(|c| c.step).collect();
        committed.sort_unstable_by(|a, b| b.cmp(a));
        for step in committed.iter().take(policy.keep_last.unwrap_or(0) as usize) {
            prop_assert!(plan.keep.contains(step), "step {}", step);
        }
    }

    #[test]
    fn planning_again_after_applying_deletes_nothing(policy in arb_policy(), cps in arb_checkpoints()) {
        let plan = plan_retention(&policy, &cps);
        let remaining: Vec<CheckpointInfo> = cps
            .iter()
            .filter(|c| plan.keep.contains(&c.step))
            .cloned()
            .collect();
        let again = plan_retention(&policy, &remaining);
        prop_assert_eq!(again.delete, BTreeSet::new());
        prop_assert_eq!(again.keep, plan.keep);
    }
}
