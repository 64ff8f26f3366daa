//! Our optimizers (`optim.rs`) against PyTorch's `torch.optim`: the same
//! least-squares problem trained a few hundred steps on both sides must end
//! with the same parameters and the same optimizer state, for every kind of
//! update a job spec can ask for.
//!
//! The two sides share no RNG: this test writes the data, the initial
//! parameters and each step's batch rows to a safetensors file and the job
//! spec's optimizer (serialized as a job file would carry it) to JSON, then
//! runs `optim_reference.py` in the project venv. Each side computes its own
//! gradients with libtorch's autograd, as the trainer does, so the only
//! difference left is the optimizer and floating-point rounding.
//!
//! Not here: checkpointing of the state (`tests/tests/checkpoint.rs`).

use ringmaster_common::jobspec::Optimizer as Spec;
use ringmaster_worker::optim::Optimizer;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tch::{Kind, Tensor};

const SAMPLES: i64 = 60;
const FEATURES: i64 = 16;
const OUTPUTS: i64 = 8;
const BATCH: i64 = 8;
const STEPS: i64 = 300;
/// Relative L2 error allowed between ours and PyTorch's after `STEPS`: the
/// two compute each update with differently ordered (and differently fused)
/// fp32 operations, so they agree to rounding, not bitwise.
const TOLERANCE: f64 = 1e-5;
const PARAMS: [&str; 2] = ["weight", "bias"];

struct Case {
    name: &'static str,
    spec: Spec,
    lr: f64,
    weight_decay: f64,
}

fn cases() -> Vec<Case> {
    let sgd = |momentum, nesterov| Spec::Sgd { momentum, nesterov };
    let adam = |beta1, beta2, eps| Spec::Adam { beta1, beta2, eps };
    let adamw = |beta1, beta2, eps| Spec::AdamW { beta1, beta2, eps };
    let case = |name, spec, lr, weight_decay| Case {
        name,
        spec,
        lr,
        weight_decay,
    };
    vec![
        case("sgd", sgd(0.0, false), 0.05, 0.0),
        case("sgd_momentum", sgd(0.9, false), 0.02, 0.0),
        case("sgd_nesterov_wd", sgd(0.9, true), 0.02, 0.01),
        case("adam", adam(0.9, 0.999, 1e-8), 0.01, 0.0),
        // Betas other than PyTorch's defaults, so a swapped or ignored beta
        // shows, and an eps large beside sqrt(v): at 1e-8 it is lost in
        // rounding here, and where it is added (outside the square root, after
        // bias correction) would go unseen.
        case("adam_l2", adam(0.85, 0.99, 1e-3), 0.01, 0.01),
        case("adamw", adamw(0.9, 0.999, 1e-8), 0.01, 0.01),
    ]
}

/// The problem both sides train, every value a formula of its indices. The
/// targets are not linear in the inputs, so the loss never reaches zero and
/// the gradients (and Adam's second moments) stay well away from zero.
struct Problem {
    x: Tensor,
    y: Tensor,
    weight: Tensor,
    bias: Tensor,
    /// Row `k`: the sample ids step `k` trains on.
    batches: Tensor,
}

impl Problem {
    fn new() -> Self {
        let grid = |rows: i64, cols: i64, f: &dyn Fn(f64, f64) -> f64| {
            let v: Vec<f32> = (0..rows)
                .flat_map(|i| (0..cols).map(move |j| f(i as f64, j as f64) as f32))
                .collect();
            Tensor::from_slice(&v).view([rows, cols])
        };
        let batches: Vec<i64> = (0..STEPS * BATCH).map(|i| i % SAMPLES).collect();
        Problem {
            x: grid(SAMPLES, FEATURES, &|i, c| {
                (1.7 * i + 0.9 * c + 0.13 * i * c).sin()
            }),
            y: grid(SAMPLES, OUTPUTS, &|i, o| {
                (0.3 * i * (o + 1.0) + 0.7 * o).cos()
            }),
            weight: grid(OUTPUTS, FEATURES, &|o, c| {
                0.2 * (0.5 * o + 1.1 * c + 0.3).sin()
            }),
            bias: grid(1, OUTPUTS, &|_, o| 0.1 * o.cos()).view([OUTPUTS]),
            batches: Tensor::from_slice(&batches).view([STEPS, BATCH]),
        }
    }

    fn write(&self, path: &Path) {
        let tensors = [
            ("x", &self.x),
            ("y", &self.y),
            ("weight", &self.weight),
            ("bias", &self.bias),
            ("batches", &self.batches),
        ];
        Tensor::write_safetensors(&tensors, path).unwrap();
    }

    /// Trains with our optimizer; returns the parameters and the optimizer
    /// state under the names `optim_reference.py` writes PyTorch's.
    fn train(&self, case: &Case) -> BTreeMap<String, Tensor> {
        let mut params: Vec<Tensor> = [&self.weight, &self.bias]
            .map(|t| t.copy().set_requires_grad(true))
            .into();
        let mut opt = Optimizer::new(case.spec, case.lr, case.weight_decay, params.len());
        for k in 0..STEPS {
            let idx = self.batches.get(k);
            let (xb, yb) = (self.x.index_select(0, &idx), self.y.index_select(0, &idx));
            // The same expression, in the same order, as the Python side.
            let r = xb.matmul(&params[0].tr()) + &params[1] - yb;
            let loss = (&r * &r)
                .sum_dim_intlist(1, false, None::<Kind>)
                .mean(None::<Kind>)
                * 0.5;
            for p in &mut params {
                p.zero_grad();
            }
            loss.backward();
            opt.step(&params).unwrap();
        }
        assert_eq!(opt.steps(), STEPS as u64, "{}: step count", case.name);
        let names: Vec<String> = PARAMS.iter().map(|n| n.to_string()).collect();
        let mut out: BTreeMap<String, Tensor> = names
            .iter()
            .zip(&params)
            .map(|(n, p)| (n.clone(), p.detach()))
            .collect();
        out.extend(opt.state_tensors(&names));
        out
    }
}

/// Runs `optim_reference.py` on `dir` in the project venv. A missing venv or
/// torch fails the test (scripts/test bootstraps first), never skips it.
fn run_reference(dir: &Path) {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let repo = manifest
        .parent()
        .expect("the worker crate lives in the workspace");
    let python = repo.join(".venv/bin/python");
    assert!(
        python.is_file(),
        "{} not found: run scripts/bootstrap to create the project venv with torch",
        python.display()
    );
    let log_path = dir.join("python.log");
    let log = std::fs::File::create(&log_path).unwrap();
    // Output goes to a file, not a pipe, so a chatty failure cannot fill a
    // pipe buffer and hang the wait below.
    let mut child = Command::new(&python)
        .arg(manifest.join("tests/optim_reference.py"))
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("failed to start {}: {e}", python.display()));
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("optim_reference.py ran past 120 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let output = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(
        status.success(),
        "optim_reference.py failed ({status}); if torch or safetensors is missing, \
         run scripts/bootstrap:\n{output}"
    );
}

/// `|ours - theirs| / |theirs|` in f64.
fn relative_l2(ours: &Tensor, theirs: &Tensor) -> f64 {
    assert_eq!(ours.size(), theirs.size());
    let (a, b) = (ours.to_kind(Kind::Double), theirs.to_kind(Kind::Double));
    (&a - &b).norm().double_value(&[]) / b.norm().double_value(&[])
}

/// Every tensor of `case` in PyTorch's results, keyed as ours are.
fn theirs_of(torch: &HashMap<String, Tensor>, case: &str) -> BTreeMap<String, Tensor> {
    let prefix = format!("{case}/");
    torch
        .iter()
        .filter_map(|(k, t)| Some((k.strip_prefix(&prefix)?.to_string(), t.shallow_clone())))
        .collect()
}

#[test]
fn optimizers_match_torch_optim_after_300_steps() {
    let dir = tempfile::tempdir().unwrap();
    let problem = Problem::new();
    problem.write(&dir.path().join("problem.safetensors"));
    let cases = cases();
    let json: Vec<serde_json::Value> = cases
        .iter()
        .map(|c| {
            serde_json::json!({
                "name": c.name,
                "optimizer": c.spec,
                "lr": c.lr,
                "weight_decay": c.weight_decay,
            })
        })
        .collect();
    std::fs::write(
        dir.path().join("cases.json"),
        serde_json::to_vec(&json).unwrap(),
    )
    .unwrap();
    run_reference(dir.path());
    let torch: HashMap<String, Tensor> =
        Tensor::read_safetensors(dir.path().join("torch.safetensors"))
            .unwrap()
            .into_iter()
            .collect();

    let mut failures = Vec::new();
    println!("case              params rel L2   state rel L2   moved from init");
    for case in &cases {
        let ours = problem.train(case);
        let theirs = theirs_of(&torch, case.name);
        let names = |m: &BTreeMap<String, Tensor>| m.keys().cloned().collect::<Vec<_>>();
        assert_eq!(
            names(&ours),
            names(&theirs),
            "{}: our parameters and state names against PyTorch's",
            case.name
        );
        // Worst relative error over the parameters, and over the state
        // (None where the optimizer keeps none, as plain SGD).
        let (mut params, mut state) = (0f64, None::<f64>);
        for (name, t) in &ours {
            let err = relative_l2(t, &theirs[name]);
            if PARAMS.contains(&name.as_str()) {
                params = params.max(err);
            } else {
                state = Some(state.map_or(err, |s| s.max(err)));
            }
            if err.is_nan() || err > TOLERANCE {
                failures.push(format!("{}/{name}: relative L2 {err:.3e}", case.name));
            }
        }
        // A trivial problem would agree whatever the optimizer did.
        let moved = relative_l2(&ours["weight"], &problem.weight);
        let state = state.map_or("-".to_string(), |s| format!("{s:.3e}"));
        println!(
            "{:<17} {params:>13.3e} {state:>14} {moved:>17.3}",
            case.name
        );
        assert!(moved > 0.1, "{}: weights barely moved ({moved})", case.name);
    }
    assert!(
        failures.is_empty(),
        "ours and torch.optim differ beyond {TOLERANCE:e}:\n{}",
        failures.join("\n")
    );

    // The tolerance tells the cases apart: each differs from every other by
    // far more than it allows, so a mix-up (momentum ignored, decay coupled
    // instead of decoupled) could not pass as rounding.
    for (i, a) in cases.iter().enumerate() {
        for b in &cases[i + 1..] {
            let wa = &torch[&format!("{}/weight", a.name)];
            let wb = &torch[&format!("{}/weight", b.name)];
            let apart = relative_l2(wa, wb);
            assert!(
                apart > 100.0 * TOLERANCE,
                "{} and {} end {apart:.3e} apart: the test cannot tell them apart",
                a.name,
                b.name
            );
        }
    }
}
