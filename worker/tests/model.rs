//! The built-in MLP as the trainer uses it: PyTorch parameter names, the
//! initialisation a seed has always given, and dropout whose masks belong to
//! the samples (so a sample is treated the same in any batch, on any rank).
//!
//! Not here: the generator's own statistics (`sample_rng.rs`) and allocation
//! failures (`model_alloc.rs`).

use ringmaster_common::jobspec::Activation;
use ringmaster_worker::model::{self, Mlp, Model};
use ringmaster_worker::sample_rng::{SampleNoise, Stream};
use std::sync::Mutex;
use tch::{Device, Kind, Tensor, nn};

/// libtorch's generator is global: tests that seed it and then draw from it
/// take turns.
static RNG: Mutex<()> = Mutex::new(());

fn mlp(hidden: Vec<u32>, activation: Activation, dropout: f64) -> (nn::VarStore, Model) {
    let _turn = RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(3);
    let vs = nn::VarStore::new(Device::Cpu);
    let m = Mlp::new(&vs.root(), 20, 10, &hidden, activation, dropout).unwrap();
    (vs, Model::Mlp(m))
}

/// Deterministic inputs without touching the RNG: row `i` is a function of `i`.
fn inputs(rows: &[u64]) -> Tensor {
    let rows: Vec<f32> = rows
        .iter()
        .flat_map(|&r| (0..20).map(move |c| ((r * 31 + c * 7) % 13) as f32 / 6.0 - 1.0))
        .collect();
    Tensor::from_slice(&rows).view([-1, 20])
}

fn values(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.contiguous().view([-1])).unwrap()
}

#[test]
fn parameters_have_pytorch_names_and_the_init_a_seed_always_gave() {
    let (vs, _) = mlp(vec![32, 16], Activation::Relu, 0.0);
    let mut ours: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    ours.sort_by(|a, b| a.0.cmp(&b.0));
    let names: Vec<&str> = ours.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "fc0.bias",
            "fc0.weight",
            "fc1.bias",
            "fc1.weight",
            "out.bias",
            "out.weight"
        ]
    );
    // The same seed through tch's own `nn::linear`, which the model used
    // before its parameters were built fallibly.
    let reference = {
        let _turn = RNG.lock().unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(3);
        let vs = nn::VarStore::new(Device::Cpu);
        let root = vs.root();
        let _ = nn::linear(&root / "fc0", 20, 32, Default::default());
        let _ = nn::linear(&root / "fc1", 32, 16, Default::default());
        let _ = nn::linear(&root / "out", 16, 10, Default::default());
        vs.variables()
    };
    for (name, t) in &ours {
        assert!(t.requires_grad(), "{name} is not trainable");
        assert_eq!(values(t), values(&reference[name]), "{name} differs");
    }
}

#[test]
fn a_sample_gets_the_same_output_alone_or_anywhere_in_a_batch() {
    let (_vs, m) = mlp(vec![64, 32], Activation::Tanh, 0.3);
    let ids = [17u64, 4, 99, 5];
    let batch = m
        .forward_train(&inputs(&ids), &SampleNoise::new(1, 7, &ids, Device::Cpu))
        .unwrap();
    for (row, &id) in ids.iter().enumerate() {
        let alone = m
            .forward_train(&inputs(&[id]), &SampleNoise::new(1, 7, &[id], Device::Cpu))
            .unwrap();
        let (a, b) = (values(&alone), values(&batch.get(row as i64)));
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-6, "sample {id}: {a:?} vs {b:?}");
        }
    }
    // The masks are really per step: another step changes the outputs.
    let next = m
        .forward_train(&inputs(&ids), &SampleNoise::new(1, 8, &ids, Device::Cpu))
        .unwrap();
    assert!((&next - &batch).abs().max().double_value(&[]) > 1e-3);
    // Evaluation has no dropout, and training without dropout is evaluation.
    let eval = m.forward_eval(&inputs(&ids)).unwrap();
    assert!((&eval - &batch).abs().max().double_value(&[]) > 1e-3);
    let (_vs, plain) = mlp(vec![64, 32], Activation::Tanh, 0.0);
    let train = plain
        .forward_train(&inputs(&ids), &SampleNoise::new(1, 7, &ids, Device::Cpu))
        .unwrap();
    assert_eq!(
        values(&train),
        values(&plain.forward_eval(&inputs(&ids)).unwrap())
    );
}

#[test]
fn dropout_zeroes_p_of_the_units_and_scales_the_rest() {
    let ids: Vec<u64> = (0..200).collect();
    let x = Tensor::ones([200, 500], (Kind::Float, Device::Cpu));
    let noise = SampleNoise::new(9, 0, &ids, Device::Cpu);
    let y = model::dropout(&x, 0.2, &noise, Stream::dropout(0)).unwrap();
    let v = values(&y);
    let zeros = v.iter().filter(|&&e| e == 0.0).count() as f64 / v.len() as f64;
    assert!((zeros - 0.2).abs() < 0.005, "dropped {zeros}");
    assert!(v.iter().all(|&e| e == 0.0 || (e - 1.25).abs() < 1e-6));
    // Gradients flow through the kept units only, with the same scale.
    let xg = x.set_requires_grad(true);
    let y = model::dropout(&xg, 0.2, &noise, Stream::dropout(0)).unwrap();
    y.sum(Kind::Float).backward();
    assert_eq!(values(&xg.grad()), v);
}

#[test]
fn a_batch_and_its_noise_must_agree_on_the_sample_count() {
    let (_vs, m) = mlp(vec![8], Activation::Relu, 0.5);
    let err = m
        .forward_train(
            &inputs(&[1, 2, 3]),
            &SampleNoise::new(1, 0, &[1, 2], Device::Cpu),
        )
        .unwrap_err();
    assert!(err.to_string().contains("3 rows"), "{err}");
}
