//! The sample audit (`[debug] audit_samples = true`) seen from a real `Run`
//! with a real ring: the files must name exactly the samples the shard plan
//! gives each rank, across a regroup to a larger world, and must never claim
//! a step that did not apply. The end-to-end tests trust these files to
//! prove exactly-once training, so the files themselves are checked here
//! against the plan rather than against the trainer's own bookkeeping.

use ringmaster_common::jobspec::JobSpec;
use ringmaster_dataset::{ShardPlan, SynthOptions, synthesize};
use ringmaster_worker::collective::{Collective, DataPlaneListener, RingBackend, RingConfig};
use ringmaster_worker::trainer::{
    AUDIT_DIR, Assignment, Run, StateSource, TrainError, TrainerControl, TrainerOptions,
    audit_file_name,
};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tch::Device;

const JOB: &str = "audit-1";
const SEED: u64 = 9;
/// 240 samples in batches of 36: 7 steps an epoch, the last one short
/// (24 samples), so the audit must follow the plan's ragged edge.
const SAMPLES: u64 = 240;
const BATCH: u64 = 36;

fn dataset(dir: &Path) -> PathBuf {
    let out = dir.join("data");
    synthesize(&SynthOptions {
        output: out.clone(),
        name: "audit".into(),
        samples: SAMPLES as usize,
        features: 12,
        classes: 3,
        seed: 5,
        shard_samples: 100,
    })
    .unwrap();
    out
}

fn spec(data: &Path, out: &Path, audit: bool, train: &str) -> JobSpec {
    let toml = format!(
        r#"
name = "audit"
seed = {SEED}
[model]
kind = "mlp"
hidden = [16]
dropout = 0.1
[data]
train = "{}"
[train]
batch_size = {BATCH}
{train}
[output]
dir = "{}"
[debug]
audit_samples = {audit}
"#,
        data.display(),
        out.display()
    );
    JobSpec::from_toml(&toml, &out.join("job.toml")).unwrap()
}

fn start(spec: &JobSpec, rank: u32, world: usize) -> Run {
    let a = Assignment {
        job_id: JOB.into(),
        generation: 1,
        rank,
        peers: vec!["unused".into(); world],
        spec: spec.clone(),
        progress_every: 1,
        resume_candidates: Vec::new(),
        output_dir: spec.output.job_dir(JOB),
        state_source: None,
        cursor: None,
    };
    let opts = TrainerOptions {
        device: Device::Cpu,
        threads: 1,
        connect_timeout: Duration::from_secs(30),
    };
    Run::start(&a, &opts, &TrainerControl::default(), &mut |_| {}).unwrap()
}

/// Joins the runs into generation `generation` (one thread each), rebinds
/// them with `source` and steps each `steps` times or until its first error.
fn regroup(
    runs: Vec<Run>,
    generation: u64,
    source: StateSource,
    steps: u64,
) -> Vec<(Run, Result<(), TrainError>)> {
    let listeners: Vec<DataPlaneListener> = runs
        .iter()
        .map(|_| DataPlaneListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let peers: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().to_string())
        .collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = runs
            .into_iter()
            .enumerate()
            .map(|(rank, mut run)| {
                let cfg = RingConfig::new(JOB, generation, rank as u32, peers.clone());
                let listener = &listeners[rank];
                s.spawn(move || {
                    let result = (|| -> Result<(), TrainError> {
                        let group: Box<dyn Collective> =
                            Box::new(RingBackend::connect(listener, cfg)?);
                        run.rebind(group, source)?;
                        let control = TrainerControl::default();
                        for _ in 0..steps {
                            run.step(&control)?;
                        }
                        Ok(())
                    })();
                    (run, result)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// One parsed audit line.
#[derive(Debug, PartialEq)]
struct Line {
    generation: u64,
    rank: u32,
    world: u32,
    epoch: u64,
    step: u64,
    event: String,
    ids: Vec<u64>,
}

fn read(spec: &JobSpec, generation: u64, rank: u32) -> Vec<Line> {
    let path = spec
        .output
        .job_dir(JOB)
        .join(AUDIT_DIR)
        .join(audit_file_name(generation, rank));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(text.starts_with("# "), "a header first: {text}");
    assert!(text.ends_with('\n'), "whole lines only: {text}");
    text.lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            assert_eq!(f.len(), 7, "seven fields: {l:?}");
            Line {
                generation: f[0].parse().unwrap(),
                rank: f[1].parse().unwrap(),
                world: f[2].parse().unwrap(),
                epoch: f[3].parse().unwrap(),
                step: f[4].parse().unwrap(),
                event: f[5].to_string(),
                ids: if f[6].is_empty() {
                    Vec::new()
                } else {
                    f[6].split(',').map(|i| i.parse().unwrap()).collect()
                },
            }
        })
        .collect()
}

/// The lines a rank of `world` must have written in `generation` for the
/// applied global steps `steps`, straight from the shard plan.
fn expected(generation: u64, rank: u32, world: u32, steps: std::ops::Range<u64>) -> Vec<Line> {
    // 240 samples in shards of 100, the default window (all three shards).
    let plan = ShardPlan::with_shards(&[100, 100, 40], BATCH, SEED, 8).unwrap();
    let mut out = Vec::new();
    for step in steps {
        let (epoch, k) = plan.position(step);
        let perm = plan.epoch_permutation(epoch);
        let line = |event: &str, ids: Vec<u64>| Line {
            generation,
            rank,
            world,
            epoch,
            step,
            event: event.into(),
            ids,
        };
        out.push(line(
            "contributes",
            plan.rank_indices(&perm, k, rank, world).to_vec(),
        ));
        out.push(line("applied", Vec::new()));
    }
    out
}

#[test]
fn each_rank_audits_the_plans_slice_of_every_applied_step_across_a_regroup() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path());
    let spec = spec(
        &data,
        &tmp.path().join("out"),
        true,
        "steps = 12\nlearning_rate = 0.01",
    );

    // Two ranks for 5 steps, then the pair and a newcomer for 7 more,
    // crossing into the second epoch with three ranks.
    let pair = regroup(
        vec![start(&spec, 0, 2), start(&spec, 1, 2)],
        1,
        StateSource::Rank(0),
        5,
    );
    let mut runs: Vec<Run> = pair
        .into_iter()
        .map(|(run, r)| {
            r.unwrap();
            run
        })
        .collect();
    runs.push(start(&spec, 2, 3));
    for (run, r) in regroup(runs, 2, StateSource::Rank(1), 7) {
        r.unwrap();
        assert_eq!(run.step_count(), 12);
    }

    for rank in 0..2 {
        assert_eq!(
            read(&spec, 1, rank),
            expected(1, rank, 2, 0..5),
            "rank {rank}"
        );
    }
    for rank in 0..3 {
        assert_eq!(
            read(&spec, 2, rank),
            expected(2, rank, 3, 5..12),
            "rank {rank}"
        );
    }
    // The complete first epoch (7 steps) names every sample once.
    let mut epoch0 = Vec::new();
    for (g, world) in [(1, 2), (2, 3)] {
        for rank in 0..world {
            epoch0.extend(
                read(&spec, g, rank)
                    .into_iter()
                    .filter(|l| l.epoch == 0 && l.event == "contributes")
                    .flat_map(|l| l.ids),
            );
        }
    }
    assert_eq!(epoch0.len() as u64, SAMPLES);
    assert_eq!(
        epoch0.into_iter().collect::<BTreeSet<_>>().len() as u64,
        SAMPLES
    );
}

#[test]
fn a_diverged_step_is_audited_as_contributed_but_never_as_applied() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path());
    let spec = spec(
        &data,
        &tmp.path().join("out"),
        true,
        "steps = 100\noptimizer = \"sgd\"\nlearning_rate = 1e30",
    );
    let (run, result) = regroup(vec![start(&spec, 0, 1)], 1, StateSource::Rank(0), 100)
        .pop()
        .unwrap();
    let Err(TrainError::Diverged { step, .. }) = result else {
        panic!("a learning rate of 1e30 diverges: {result:?}");
    };
    // `step` counts steps completed after the failed one.
    let failed = step - 1;
    assert_eq!(run.step_count(), failed);
    let lines = read(&spec, 1, 0);
    let mut want = expected(1, 0, 1, 0..step);
    assert_eq!(want.pop().map(|l| l.event), Some("applied".to_string()));
    assert_eq!(
        lines, want,
        "the diverged step {failed} ends the file unapplied"
    );
}

#[test]
fn the_audit_is_off_by_default_and_a_generations_file_is_never_written_twice() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path());
    let off = spec(
        &data,
        &tmp.path().join("off"),
        false,
        "steps = 3\nlearning_rate = 0.01",
    );
    for (_, r) in regroup(vec![start(&off, 0, 1)], 1, StateSource::Rank(0), 3) {
        r.unwrap();
    }
    assert!(!off.output.job_dir(JOB).join(AUDIT_DIR).exists());

    // A second writer of generation 1, rank 0 (which the coordinator never
    // produces) is refused rather than interleaved with the first.
    let on = spec(
        &data,
        &tmp.path().join("on"),
        true,
        "steps = 3\nlearning_rate = 0.01",
    );
    for (_, r) in regroup(vec![start(&on, 0, 1)], 1, StateSource::Rank(0), 1) {
        r.unwrap();
    }
    let (_, again) = regroup(vec![start(&on, 0, 1)], 1, StateSource::Rank(0), 1)
        .pop()
        .unwrap();
    let err = again.expect_err("the file exists").to_string();
    assert!(
        err.contains("sample audit") && err.contains("already exists"),
        "{err}"
    );
    assert_eq!(read(&on, 1, 0), expected(1, 0, 1, 0..1));
}
