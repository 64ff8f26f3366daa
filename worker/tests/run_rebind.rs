//! A `Run` outlives its group: a rank trains alone, a newcomer joins in a new
//! generation and receives the full state (parameters, optimizer state,
//! cursor, metrics) from it over the data plane, and the pair goes on to
//! compute the same run as an undisturbed one.

use ringmaster_common::jobspec::JobSpec;
use ringmaster_dataset::{SynthOptions, synthesize};
use ringmaster_worker::collective::{Collective, DataPlaneListener, RingBackend, RingConfig};
use ringmaster_worker::trainer::{
    Assignment, Run, StateSource, TrainError, TrainerControl, TrainerOptions,
};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tch::{Device, Kind, Tensor};

fn dataset(dir: &Path) -> PathBuf {
    let out = dir.join("data");
    synthesize(&SynthOptions {
        output: out.clone(),
        name: "rebind".into(),
        samples: 240,
        features: 12,
        classes: 3,
        seed: 5,
        shard_samples: 100,
    })
    .unwrap();
    out
}

fn spec(data: &Path, out: &Path, hidden: u32) -> JobSpec {
    let toml = format!(
        r#"
name = "rebind"
seed = 9
[model]
kind = "mlp"
hidden = [{hidden}]
dropout = 0.1
[data]
train = "{}"
[train]
batch_size = 24
steps = 12
optimizer = "adam"
learning_rate = 0.01
[output]
dir = "{}"
"#,
        data.display(),
        out.display()
    );
    JobSpec::from_toml(&toml, &out.join("job.toml")).unwrap()
}

fn assignment(spec: &JobSpec, generation: u64, rank: u32, world: usize) -> Assignment {
    Assignment {
        job_id: "rebind-1".into(),
        generation,
        rank,
        peers: vec!["unused".into(); world],
        spec: spec.clone(),
        progress_every: 1,
        resume_candidates: Vec::new(),
        output_dir: spec.output.job_dir("rebind-1"),
        state_source: None,
        cursor: None,
    }
}

fn opts() -> TrainerOptions {
    TrainerOptions {
        device: Device::Cpu,
        threads: 1,
        connect_timeout: Duration::from_secs(30),
    }
}

fn start(spec: &JobSpec, rank: u32, world: usize) -> Run {
    Run::start(
        &assignment(spec, 1, rank, world),
        &opts(),
        &TrainerControl::default(),
        &mut |_| {},
    )
    .unwrap()
}

/// Joins `runs.len()` ranks into generation `generation` (one thread each)
/// and rebinds each run with `source`, then steps every run `steps` times.
fn regroup(
    runs: Vec<Run>,
    generation: u64,
    source: StateSource,
    steps: u64,
) -> Vec<Result<Run, TrainError>> {
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
                let cfg = RingConfig::new("rebind-1", generation, rank as u32, peers.clone());
                let listener = &listeners[rank];
                s.spawn(move || -> Result<Run, TrainError> {
                    let group: Box<dyn Collective> = Box::new(RingBackend::connect(listener, cfg)?);
                    run.rebind(group, source)?;
                    let control = TrainerControl::default();
                    for _ in 0..steps {
                        run.step(&control)?;
                    }
                    Ok(run)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn params(run: &Run) -> Tensor {
    let flat: Vec<Tensor> = run
        .named_parameters()
        .iter()
        .map(|(_, t)| t.detach().view([-1]))
        .collect();
    Tensor::cat(&flat, 0)
}

fn rel_l2(a: &Tensor, b: &Tensor) -> f64 {
    let diff = (a - b).norm().double_value(&[]);
    diff / b.norm().double_value(&[]).max(1e-30)
}

#[test]
fn a_newcomer_takes_over_a_survivors_state_and_the_run_matches_an_undisturbed_one() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path());
    let spec = spec(&data, &tmp.path().join("out"), 16);

    // Undisturbed: one rank, 12 steps.
    let solo = start(&spec, 0, 1);
    let mut solo = regroup(vec![solo], 1, StateSource::Rank(0), 12);
    let solo = solo.remove(0).unwrap();
    assert_eq!(solo.step_count(), 12);

    // Disturbed: one rank for 5 steps, then it and a newcomer (which has
    // taken no step and holds different parameters) form generation 2.
    let first = start(&spec, 0, 1);
    let survivor = regroup(vec![first], 1, StateSource::Rank(0), 5)
        .remove(0)
        .unwrap();
    assert_eq!(survivor.step_count(), 5);
    let newcomer = start(&spec, 1, 2);
    assert_eq!(newcomer.step_count(), 0);
    let moved = rel_l2(&params(&newcomer), &params(&survivor));
    assert!(
        moved > 1e-3,
        "the survivor's parameters have moved ({moved})"
    );

    let pair = regroup(vec![newcomer, survivor], 2, StateSource::Rank(1), 7);
    let pair: Vec<Run> = pair.into_iter().map(Result::unwrap).collect();
    for run in &pair {
        assert_eq!(run.step_count(), 12);
        let d = rel_l2(&params(run), &params(&solo));
        assert!(d < 1e-5, "relative L2 to the undisturbed run: {d}");
    }
    // The two ranks hold one state, bit for bit.
    assert!(params(&pair[0]).equal(&params(&pair[1])));
    assert!(params(&pair[0]).kind() == Kind::Float);
}

#[test]
fn state_for_another_model_is_refused_naming_the_parameter() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path());
    let wide = spec(&data, &tmp.path().join("out"), 16);
    let narrow = spec(&data, &tmp.path().join("out"), 8);
    let results = regroup(
        vec![start(&wide, 0, 2), start(&narrow, 1, 2)],
        1,
        StateSource::Rank(0),
        0,
    );
    let err = results
        .into_iter()
        .filter_map(Result::err)
        .map(|e| e.to_string())
        .find(|e| e.contains("state transfer"))
        .expect("the receiver refuses");
    assert!(
        err.contains("fc0.bias") && err.contains("[16]") && err.contains("[8]"),
        "{err}"
    );
}
