//! Synthetic datasets for tests and benchmarks. Classification: each class
//! is a unit-variance Gaussian blob around its own random mean, so a small
//! model can learn it but not perfectly. Regression: standard normal
//! features and targets that are a random smooth non-linear function of them
//! plus noise, so an MLP beats a linear model but not the noise.
//! Deterministic in the seed; the on-disk format is the same as for packed
//! data (`shards.rs`).

use std::path::PathBuf;

use rand_core::RngCore;

use super::DatasetError;
use super::manifest::{DatasetManifest, LabelKind, MAX_CLASSES, MAX_FEATURES, MAX_TARGETS};
use super::shard_plan::{bounded, stream};
use super::shards::{DatasetWriter, LabelRows, WriteOptions};

const SYNTH_TAG: &[u8; 16] = b"ringmaster/synth";
/// Class means are drawn with per-feature scale `SEPARATION / sqrt(d)`, which
/// keeps the expected distance between two means near `SEPARATION·√2`
/// noise standard deviations whatever the number of features.
const SEPARATION: f64 = 3.0;
/// Caps the table of class means (`classes × features` values).
const MAX_MEAN_VALUES: u64 = 1 << 28;

/// What [`synthesize`] generates; mirrors the `dataset synth` command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SynthOptions {
    /// The dataset directory to create.
    pub output: PathBuf,
    pub name: String,
    pub samples: usize,
    pub features: usize,
    pub classes: u32,
    pub seed: u64,
    pub shard_samples: usize,
}

/// Generates `samples` samples with labels uniform in `0..classes` and
/// features `mean[label] + N(0, 1)`, and writes them as a dataset.
pub fn synthesize(opts: &SynthOptions) -> Result<DatasetManifest, DatasetError> {
    let d = opts.features;
    let k = opts.classes;
    if !(2..=MAX_CLASSES).contains(&k) {
        return Err(DatasetError::InvalidInput(format!(
            "classes must be in 2..={MAX_CLASSES}, found {k}"
        )));
    }
    if d == 0 || d as u64 > MAX_FEATURES {
        return Err(DatasetError::InvalidInput(format!(
            "features must be in 1..={MAX_FEATURES}, found {d}"
        )));
    }
    if u64::from(k) * d as u64 > MAX_MEAN_VALUES {
        return Err(DatasetError::TooLarge {
            what: "classes × features",
            value: u64::from(k) * d as u64,
            limit: MAX_MEAN_VALUES,
        });
    }
    if opts.shard_samples.checked_mul(d).is_none() {
        return Err(DatasetError::InvalidInput(format!(
            "shards of {} samples of {d} features do not fit in memory",
            opts.shard_samples
        )));
    }

    let mut rng = stream(opts.seed, 0, SYNTH_TAG);
    let mut normal = Normal::default();
    let scale = SEPARATION / (d as f64).sqrt();
    let means: Vec<f64> = (0..k as usize * d)
        .map(|_| normal.sample(&mut rng) * scale)
        .collect();
    let write = WriteOptions {
        image: None,
        name: opts.name.clone(),
        features: d,
        labels: LabelKind::Classes(k),
        shard_samples: opts.shard_samples,
        standardization: None,
        source: Some(format!(
            "synthetic: {k} classes, features = class mean + N(0, 1) noise, means drawn \
             N(0, ({SEPARATION}/sqrt({d}))^2) per feature, labels uniform, seed {}",
            opts.seed
        )),
        tokenizer: None,
    };
    // One shard in memory at a time: a dataset larger than memory can be
    // generated, and the draws are the same as for one big array.
    let mut writer = DatasetWriter::create(&opts.output, &write, opts.samples as u64)?;
    let mut left = opts.samples;
    while left > 0 {
        let n = left.min(opts.shard_samples);
        let mut x = Vec::with_capacity(n * d);
        let mut y = Vec::with_capacity(n);
        for _ in 0..n {
            let label = bounded(&mut rng, u64::from(k)) as usize;
            let mean = &means[label * d..(label + 1) * d];
            x.extend(mean.iter().map(|m| (m + normal.sample(&mut rng)) as f32));
            y.push(label as i64);
        }
        writer.write_shard(&x, LabelRows::Classes(&y))?;
        left -= n;
    }
    writer.finish()
}

/// What [`synthesize_regression`] generates; mirrors `dataset synth
/// --targets`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SynthRegression {
    /// The dataset directory to create.
    pub output: PathBuf,
    pub name: String,
    pub samples: usize,
    pub features: usize,
    /// Targets per sample (`k`).
    pub targets: usize,
    pub seed: u64,
    pub shard_samples: usize,
}

/// Noise added to every synthetic regression target (standard deviation).
const TARGET_NOISE: f64 = 0.1;

/// Generates `samples` samples with features `x ~ N(0, 1)` and targets
/// `y_j = Σ_i a_ji·x_i + Σ_i b_ji·tanh(2·x_i) + N(0, 0.1²)`, with weights drawn
/// `N(0, 1/d)` once per dataset, and writes them as a regression dataset.
pub fn synthesize_regression(opts: &SynthRegression) -> Result<DatasetManifest, DatasetError> {
    let (d, k) = (opts.features, opts.targets);
    if d == 0 || d as u64 > MAX_FEATURES {
        return Err(DatasetError::InvalidInput(format!(
            "features must be in 1..={MAX_FEATURES}, found {d}"
        )));
    }
    if k == 0 || k as u64 > MAX_TARGETS {
        return Err(DatasetError::InvalidInput(format!(
            "targets must be in 1..={MAX_TARGETS}, found {k}"
        )));
    }
    if k as u64 * d as u64 > MAX_MEAN_VALUES {
        return Err(DatasetError::TooLarge {
            what: "targets × features",
            value: k as u64 * d as u64,
            limit: MAX_MEAN_VALUES,
        });
    }
    if opts.shard_samples.checked_mul(d.max(k)).is_none() {
        return Err(DatasetError::InvalidInput(format!(
            "shards of {} samples of {d} features do not fit in memory",
            opts.shard_samples
        )));
    }
    let mut rng = stream(opts.seed, 0, SYNTH_TAG);
    let mut normal = Normal::default();
    let scale = 1.0 / (d as f64).sqrt();
    let linear: Vec<f64> = (0..k * d)
        .map(|_| normal.sample(&mut rng) * scale)
        .collect();
    let bent: Vec<f64> = (0..k * d)
        .map(|_| normal.sample(&mut rng) * scale)
        .collect();
    let write = WriteOptions {
        image: None,
        name: opts.name.clone(),
        features: d,
        labels: LabelKind::Targets(k),
        shard_samples: opts.shard_samples,
        standardization: None,
        source: Some(format!(
            "synthetic regression: {k} targets of {d} features x ~ N(0, 1), \
             y_j = sum_i a_ji x_i + sum_i b_ji tanh(2 x_i) + N(0, {TARGET_NOISE}^2), \
             a, b ~ N(0, 1/{d}), seed {}",
            opts.seed
        )),
        tokenizer: None,
    };
    let mut writer = DatasetWriter::create(&opts.output, &write, opts.samples as u64)?;
    let mut left = opts.samples;
    while left > 0 {
        let n = left.min(opts.shard_samples);
        let mut x = Vec::with_capacity(n * d);
        let mut y = Vec::with_capacity(n * k);
        for _ in 0..n {
            let row: Vec<f64> = (0..d).map(|_| normal.sample(&mut rng)).collect();
            for j in 0..k {
                let (a, b) = (&linear[j * d..(j + 1) * d], &bent[j * d..(j + 1) * d]);
                let v: f64 = row
                    .iter()
                    .zip(a.iter().zip(b))
                    .map(|(xi, (ai, bi))| ai * xi + bi * (2.0 * xi).tanh())
                    .sum();
                y.push((v + TARGET_NOISE * normal.sample(&mut rng)) as f32);
            }
            x.extend(row.iter().map(|&v| v as f32));
        }
        writer.write_shard(
            &x,
            LabelRows::Targets {
                width: k,
                values: &y,
            },
        )?;
        left -= n;
    }
    writer.finish()
}

/// Standard normal draws by the Box–Muller transform, built on raw `next_u64`
/// so that the data, like the shard plan, does not depend on `rand`'s
/// distribution code.
#[derive(Default)]
struct Normal {
    spare: Option<f64>,
}

impl Normal {
    fn sample(&mut self, rng: &mut impl RngCore) -> f64 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        // 53 random bits each; u1 in (0, 1] so that ln(u1) is finite.
        let unit = |v: u64| (v >> 11) as f64 / (1u64 << 53) as f64;
        let u1 = 1.0 - unit(rng.next_u64());
        let u2 = unit(rng.next_u64());
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = std::f64::consts::TAU * u2;
        self.spare = Some(r * theta.sin());
        r * theta.cos()
    }
}
