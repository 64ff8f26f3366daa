//! Placement: which free workers run which queued job. A pure function of its
//! inputs (no IO, no clock, no tch), so it is tested exhaustively and the
//! control loop performs whatever it decides.
//!
//! Policy: jobs are considered in submission order. A job takes the largest
//! world size `W` in `[min, max]` that the free workers of its device kind
//! allow and that divides its global batch (every rank takes an equal share).
//! A job that cannot start yet blocks later jobs of the same device kind, so a
//! large job is never starved by a stream of small ones.
//!
//! A job re-forming after a lost member ([`regroup`]) keeps the survivors
//! that hold its state and fills up from free workers first: it goes before
//! the queue, since its survivors are held busy while it waits.

use ringmaster_common::ids::{JobId, WorkerId};
use ringmaster_common::jobspec::{DeviceKind, JobSpec};
use std::collections::BTreeSet;

/// What a queued job needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Demand {
    pub job: JobId,
    pub min: u32,
    pub max: u32,
    pub device: DeviceKind,
    pub global_batch: u32,
}

impl Demand {
    /// What job `job` with `spec` needs.
    pub fn of(job: &JobId, spec: &JobSpec) -> Demand {
        Demand {
            job: job.clone(),
            min: spec.workers.min,
            max: spec.workers.max,
            device: spec.workers.device,
            global_batch: spec.train.global_batch,
        }
    }
}

/// A worker with nothing to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FreeWorker {
    pub id: WorkerId,
    pub device: DeviceKind,
}

/// A decision: `workers[r]` becomes rank `r` of `job`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub job: JobId,
    pub workers: Vec<WorkerId>,
}

/// Places queued jobs (in submission order) on free workers (in the order
/// given, which the caller keeps stable: registration order).
pub fn place(queue: &[Demand], free: &[FreeWorker]) -> Vec<Placement> {
    let mut taken: BTreeSet<&WorkerId> = BTreeSet::new();
    let mut blocked: Vec<DeviceKind> = Vec::new();
    let mut out = Vec::new();
    for d in queue {
        if blocked.contains(&d.device) {
            continue;
        }
        let available: Vec<&WorkerId> = free
            .iter()
            .filter(|w| w.device == d.device && !taken.contains(&w.id))
            .map(|w| &w.id)
            .collect();
        let cap = d.max.min(available.len() as u32);
        let world = (d.min.max(1)..=cap).rev().find(|w| d.global_batch % w == 0);
        match world {
            Some(w) => {
                let workers: Vec<WorkerId> = available[..w as usize]
                    .iter()
                    .map(|&id| id.clone())
                    .collect();
                taken.extend(available[..w as usize].iter().copied());
                out.push(Placement {
                    job: d.job.clone(),
                    workers,
                });
            }
            None => blocked.push(d.device),
        }
    }
    debug_assert!(out.iter().all(|p| {
        let d = queue.iter().find(|d| d.job == p.job);
        d.is_some_and(|d| (d.min..=d.max).contains(&(p.workers.len() as u32)))
    }));
    out
}

/// Why a queued job did not start, in words a user can act on: too few
/// workers of its kind registered, too few free, no world size in
/// `[min, max]` that divides its batch, or an earlier job of its kind that
/// holds the queue. `registered` counts every worker by device kind, busy or
/// not; `placed` is what [`place`] decided for the same inputs.
pub fn explain(
    queue: &[Demand],
    free: &[FreeWorker],
    registered: &dyn Fn(DeviceKind) -> usize,
    placed: &[Placement],
) -> Vec<(JobId, String)> {
    let taken: BTreeSet<&WorkerId> = placed.iter().flat_map(|p| &p.workers).collect();
    let mut blocker: Vec<(DeviceKind, &JobId)> = Vec::new();
    let mut out = Vec::new();
    for d in queue {
        if placed.iter().any(|p| p.job == d.job) {
            continue;
        }
        let kind = d.device.as_str();
        let total = registered(d.device);
        let idle = free
            .iter()
            .filter(|w| w.device == d.device && !taken.contains(&w.id))
            .count();
        let why = if let Some((_, first)) = blocker.iter().find(|(k, _)| *k == d.device) {
            format!("behind job {first}, which is waiting for {kind} workers")
        } else if total < d.min as usize {
            format!(
                "waiting for workers: needs {} {kind} worker{}, {total} registered",
                d.min,
                if d.min == 1 { "" } else { "s" }
            )
        } else if idle < d.min as usize {
            format!(
                "waiting for free workers: needs {} {kind} worker{}, {idle} free of {total} \
                 (the others are busy)",
                d.min,
                if d.min == 1 { "" } else { "s" }
            )
        } else {
            format!(
                "no world size from {} to {} divides the batch of {} with {idle} free {kind} workers",
                d.min, d.max, d.global_batch
            )
        };
        blocker.push((d.device, &d.job));
        out.push((d.job.clone(), why));
    }
    out
}

/// A survivor of a broken generation: the worker and the step whose state
/// it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Survivor {
    pub id: WorkerId,
    pub step: u64,
}

/// The next generation of a job that lost members: `workers[r]` becomes rank
/// `r`, and rank 0 is the survivor whose state every other rank takes over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Regroup {
    pub workers: Vec<WorkerId>,
}

/// Forms the next generation from `survivors` (in their old rank order) and
/// `free` workers of the job's device kind: the largest world size in
/// `[min, max]` that divides the batch, survivors first, the survivor with
/// the newest state always kept as rank 0, the source (ties go to the lower
/// old rank). `None` when no survivor holds state or too few workers are there.
pub fn regroup(d: &Demand, survivors: &[Survivor], free: &[FreeWorker]) -> Option<Regroup> {
    let best = survivors
        .iter()
        .enumerate()
        .max_by(|(i, a), (j, b)| a.step.cmp(&b.step).then(j.cmp(i)))
        .map(|(i, _)| i)?;
    let newcomers: Vec<&WorkerId> = free
        .iter()
        .filter(|w| w.device == d.device && survivors.iter().all(|s| s.id != w.id))
        .map(|w| &w.id)
        .collect();
    let cap = d.max.min((survivors.len() + newcomers.len()) as u32);
    let world = (d.min.max(1)..=cap)
        .rev()
        .find(|w| d.global_batch.is_multiple_of(*w))? as usize;
    // The source first among the survivors kept, then the others in their
    // old order, then newcomers.
    let mut workers: Vec<WorkerId> = vec![survivors[best].id.clone()];
    workers.extend(
        survivors
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != best)
            .map(|(_, s)| s.id.clone()),
    );
    workers.extend(newcomers.into_iter().cloned());
    workers.truncate(world);
    Some(Regroup { workers })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demand(job: &str, min: u32, max: u32, batch: u32) -> Demand {
        Demand {
            job: JobId(job.into()),
            min,
            max,
            device: DeviceKind::Cpu,
            global_batch: batch,
        }
    }

    fn free(ids: &[&str]) -> Vec<FreeWorker> {
        ids.iter()
            .map(|id| FreeWorker {
                id: WorkerId(id.to_string()),
                device: DeviceKind::Cpu,
            })
            .collect()
    }

    #[track_caller]
    fn check(queue: &[Demand], workers: &[FreeWorker], expected: &[(&str, &[&str])]) {
        let got = place(queue, workers);
        let got: Vec<(String, Vec<String>)> = got
            .into_iter()
            .map(|p| (p.job.0, p.workers.into_iter().map(|w| w.0).collect()))
            .collect();
        let want: Vec<(String, Vec<String>)> = expected
            .iter()
            .map(|(j, ws)| (j.to_string(), ws.iter().map(|w| w.to_string()).collect()))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn takes_the_largest_world_that_divides_the_batch() {
        check(
            &[demand("a", 1, 4, 64)],
            &free(&["w1", "w2", "w3"]),
            &[("a", &["w1", "w2"])],
        );
        check(
            &[demand("a", 1, 4, 60)],
            &free(&["w1", "w2", "w3"]),
            &[("a", &["w1", "w2", "w3"])],
        );
    }

    #[test]
    fn waits_for_min_workers() {
        check(&[demand("a", 2, 2, 64)], &free(&["w1"]), &[]);
        check(&[demand("a", 2, 2, 64)], &free(&[]), &[]);
    }

    #[test]
    fn fifo_blocks_later_jobs_of_the_same_device() {
        check(
            &[demand("big", 3, 3, 63), demand("small", 1, 1, 8)],
            &free(&["w1", "w2"]),
            &[],
        );
        let mut gpu = demand("gpu", 1, 1, 8);
        gpu.device = DeviceKind::Cuda;
        check(
            &[gpu, demand("cpu", 1, 2, 8)],
            &free(&["w1", "w2"]),
            &[("cpu", &["w1", "w2"])],
        );
    }

    #[test]
    fn several_jobs_share_the_free_workers_without_overlap() {
        check(
            &[demand("a", 2, 2, 8), demand("b", 1, 2, 8)],
            &free(&["w1", "w2", "w3"]),
            &[("a", &["w1", "w2"]), ("b", &["w3"])],
        );
    }

    fn survivors(list: &[(&str, u64)]) -> Vec<Survivor> {
        list.iter()
            .map(|(id, step)| Survivor {
                id: WorkerId(id.to_string()),
                step: *step,
            })
            .collect()
    }

    fn ids(r: &Regroup) -> Vec<&str> {
        r.workers.iter().map(|w| w.0.as_str()).collect()
    }

    #[test]
    fn a_regroup_keeps_the_newest_state_first_and_fills_from_free_workers() {
        let d = demand("a", 2, 3, 96);
        let r = regroup(&d, &survivors(&[("w1", 40), ("w2", 41)]), &free(&["w9"])).unwrap();
        assert_eq!(ids(&r), ["w2", "w1", "w9"]);
        // Equal steps: the lower old rank is the source.
        let r = regroup(&d, &survivors(&[("w1", 40), ("w2", 40)]), &free(&[])).unwrap();
        assert_eq!(ids(&r), ["w1", "w2"]);
        // A free worker that is also a survivor is not counted twice.
        let r = regroup(&d, &survivors(&[("w1", 7)]), &free(&["w1", "w3"])).unwrap();
        assert_eq!(ids(&r), ["w1", "w3"]);
    }

    #[test]
    fn a_regroup_waits_for_min_and_respects_the_batch() {
        let d = demand("a", 2, 2, 64);
        assert_eq!(regroup(&d, &survivors(&[("w1", 3)]), &free(&[])), None);
        assert_eq!(regroup(&d, &[], &free(&["w1", "w2"])), None);
        // 3 would not divide 64: two survivors and one newcomer make 2.
        let d = demand("a", 1, 3, 64);
        let r = regroup(&d, &survivors(&[("w1", 3), ("w2", 5)]), &free(&["w3"])).unwrap();
        assert_eq!(ids(&r), ["w2", "w1"]);
        // Another device kind is no newcomer.
        let mut gpu = free(&["g1"]);
        gpu[0].device = DeviceKind::Cuda;
        let d = demand("a", 2, 2, 64);
        assert_eq!(regroup(&d, &survivors(&[("w1", 3)]), &gpu), None);
    }
}
