//! Per-sample random numbers: a counter-based generator keyed by
//! (seed, step, sample id, stream, unit), so every random number that touches
//! a sample (dropout masks today, augmentation later) is a pure function of
//! the sample and not of the rank layout, the batch it was drawn in, the
//! device or the thread count. W workers then train exactly like one, and a
//! resumed run needs no generator state.
//!
//! The scheme: the host folds (seed, step, sample id, stream) into one 64-bit
//! key per sample with the splitmix64 finaliser; the device then computes
//! unit `u` of that sample as `mix(key + (u + 1) * GAMMA)` (splitmix64's own
//! sequence, seeded with the key) using only int64 add, multiply, xor, shift
//! and mask, which wrap identically on every backend, and keeps the top 24
//! bits as a float in `[0, 1)` (or compares them with a threshold directly,
//! for masks). [`uniform_one`] is the same computation in plain Rust, one
//! number at a time, and the tests hold the two equal.
//!
//! Nothing here knows about models or data loading; callers pick a
//! [`Stream`] per consumer so consumers never share numbers.

use tch::{Device, Kind, TchError, Tensor};

/// splitmix64's increment (2^64 / golden ratio).
const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;
const MUL1: u64 = 0xBF58_476D_1CE4_E5B9;
const MUL2: u64 = 0x94D0_49BB_1331_11EB;
/// Starting value of the key fold, so an all-zero key is not a fixed point.
const KEY_IV: u64 = 0x6A09_E667_F3BC_C908;
/// Bits of each draw kept: all of them are exact in an f32 mantissa.
const UNIFORM_BITS: u32 = 24;

/// Which consumer a draw is for: different streams give independent numbers
/// for the same sample and step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Stream(u64);

impl Stream {
    /// The dropout mask after hidden layer `layer`.
    pub const fn dropout(layer: u32) -> Self {
        Stream((1 << 32) | layer as u64)
    }

    /// Parameters of augmentation `kind` (crop offsets, flips, ...).
    pub const fn augmentation(kind: u32) -> Self {
        Stream((2 << 32) | kind as u64)
    }
}

/// The randomness of one step's samples on one rank: built from the ids of
/// the samples this rank holds (their positions in the dataset), row `i` of
/// every draw belongs to `ids[i]`.
#[derive(Debug)]
pub struct SampleNoise {
    /// One key per sample, folded from (seed, step, id).
    keys: Vec<u64>,
    device: Device,
}

impl SampleNoise {
    pub fn new(seed: u64, step: u64, ids: &[u64], device: Device) -> Self {
        SampleNoise {
            keys: ids.iter().map(|&id| sample_key(seed, step, id)).collect(),
            device,
        }
    }

    /// One key for the whole batch, folded from every sample's key in order: a seed for code
    /// that draws from libtorch's own generator (a TorchScript module's dropout), so a run is
    /// reproducible and resumes bitwise, though it then depends on how the batch is split.
    pub fn batch_key(&self) -> u64 {
        self.keys.iter().fold(KEY_IV, |h, &k| absorb(h, k))
    }

    /// Number of samples (rows of every draw).
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// Uniform floats in `[0, 1)` shaped `[n, per_sample_shape...]` (f32, on
    /// this handle's device); entry `(i, unit)` depends only on the key of
    /// sample `i`, the stream and the unit's row-major index within
    /// `per_sample_shape`.
    pub fn uniform(&self, stream: Stream, per_sample_shape: &[i64]) -> Result<Tensor, TchError> {
        let mut x = self.mixed(stream, per_sample_shape)?;
        // The arithmetic shift gives the top 24 bits as a signed number in
        // [-2^23, 2^23); scaling and adding 1/2 is exact in f32.
        let _ = x.f_bitwise_right_shift_tensor_scalar_(i64::from(64 - UNIFORM_BITS))?;
        let mut u = x.f_to_kind(Kind::Float)?;
        let _ = u.f_mul_scalar_(1.0 / f64::from(1u32 << UNIFORM_BITS))?;
        let _ = u.f_add_scalar_(0.5)?;
        u.f_view(self.shape(per_sample_shape).as_slice())
    }

    /// `uniform(stream, per_sample_shape) >= p` as booleans, decided on the
    /// integers without making the floats (dropout's mask, for a third of
    /// the passes over memory).
    pub fn at_least(
        &self,
        stream: Stream,
        per_sample_shape: &[i64],
        p: f64,
    ) -> Result<Tensor, TchError> {
        let x = self.mixed(stream, per_sample_shape)?;
        // A draw is `k / 2^24` with `k = (x >> 40) + 2^23`, so `draw >= p`
        // exactly when `k >= ceil(p * 2^24)`, i.e. when `x >= (that - 2^23) << 40`.
        let scale = f64::from(1u32 << UNIFORM_BITS);
        let k = (p * scale).ceil().clamp(0.0, scale) as i64;
        let half = 1i64 << (UNIFORM_BITS - 1);
        let shape = self.shape(per_sample_shape);
        if k - half >= half {
            // p within 2^-24 of 1: no draw reaches it.
            return Tensor::f_zeros(shape.as_slice(), (Kind::Bool, self.device));
        }
        x.f_ge((k - half) << (64 - UNIFORM_BITS))?
            .f_view(shape.as_slice())
    }

    fn shape(&self, per_sample_shape: &[i64]) -> Vec<i64> {
        let mut shape = Vec::with_capacity(per_sample_shape.len() + 1);
        shape.push(self.keys.len() as i64);
        shape.extend_from_slice(per_sample_shape);
        shape
    }

    /// `[n, units]` int64: splitmix64's output for every (sample, unit),
    /// short of its last xor-shift, which only touches the low 33 bits while
    /// callers read the top 24.
    fn mixed(&self, stream: Stream, per_sample_shape: &[i64]) -> Result<Tensor, TchError> {
        let units: i64 = per_sample_shape.iter().product();
        let keys: Vec<i64> = self
            .keys
            .iter()
            .map(|&k| stream_key(k, stream) as i64)
            .collect();
        let n = keys.len() as i64;
        let keys = Tensor::f_from_slice(&keys)?
            .f_to(self.device)?
            .f_view([n, 1])?;
        // Counters 1..=units times GAMMA: multiplication wraps in int64 the
        // same way it does in u64.
        let counters = Tensor::f_arange_start(1, units + 1, (Kind::Int64, self.device))?
            .f_mul_scalar_(GAMMA as i64)?
            .f_view([1, units])?;
        let mut x = keys.f_add(&counters)?;
        // `>>` on int64 is arithmetic; masking the vacated high bits makes it
        // the logical shift splitmix64 needs. `t` is the scratch of both.
        let mut t = x.f_bitwise_right_shift_tensor_scalar(30)?;
        let _ = t.f_bitwise_and_(low_bits_mask(64 - 30))?;
        let _ = x.f_bitwise_xor_tensor_(&t)?;
        let _ = x.f_mul_scalar_(MUL1 as i64)?;
        let _ = x.f_bitwise_right_shift_tensor_scalar_out(&t, 27)?;
        let _ = t.f_bitwise_and_(low_bits_mask(64 - 27))?;
        let _ = x.f_bitwise_xor_tensor_(&t)?;
        let _ = x.f_mul_scalar_(MUL2 as i64)?;
        Ok(x)
    }
}

/// The number [`SampleNoise::uniform`] puts at `unit` of sample `id`,
/// computed on the host.
pub fn uniform_one(seed: u64, step: u64, id: u64, stream: Stream, unit: u64) -> f32 {
    let key = stream_key(sample_key(seed, step, id), stream);
    let x = mix(key.wrapping_add(unit.wrapping_add(1).wrapping_mul(GAMMA)));
    // The top 24 bits with the sign bit flipped: what the device's signed
    // arithmetic computes.
    ((x ^ (1 << 63)) >> (64 - UNIFORM_BITS)) as f32 / (1u32 << UNIFORM_BITS) as f32
}

/// The splitmix64 finaliser: a bijection on u64 with full avalanche.
fn mix(z: u64) -> u64 {
    let z = (z ^ (z >> 30)).wrapping_mul(MUL1);
    let z = (z ^ (z >> 27)).wrapping_mul(MUL2);
    z ^ (z >> 31)
}

/// Folds one more value into a key. Injective in `v` for a fixed `h`, and the
/// extra `mix` keeps related inputs (step k and k + 1) unrelated.
fn absorb(h: u64, v: u64) -> u64 {
    mix(h ^ mix(v.wrapping_add(GAMMA)))
}

fn sample_key(seed: u64, step: u64, id: u64) -> u64 {
    absorb(absorb(absorb(KEY_IV, seed), step), id)
}

fn stream_key(sample_key: u64, stream: Stream) -> u64 {
    absorb(sample_key, stream.0)
}

fn low_bits_mask(bits: u32) -> i64 {
    ((1u64 << bits) - 1) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draw(seed: u64, step: u64, ids: &[u64], stream: Stream, shape: &[i64]) -> Vec<f32> {
        draw_on(Device::Cpu, seed, step, ids, stream, shape)
    }

    fn draw_on(
        device: Device,
        seed: u64,
        step: u64,
        ids: &[u64],
        stream: Stream,
        shape: &[i64],
    ) -> Vec<f32> {
        let t = SampleNoise::new(seed, step, ids, device)
            .uniform(stream, shape)
            .unwrap()
            .to_device(Device::Cpu);
        let mut expected = vec![ids.len() as i64];
        expected.extend_from_slice(shape);
        assert_eq!(t.size(), expected);
        Vec::<f32>::try_from(t.view([-1])).unwrap()
    }

    #[test]
    fn the_device_computation_matches_the_host_reference() {
        let ids = [0, 1, 7, 1_796, u64::from(u32::MAX) + 5];
        // Every backend must wrap int64 arithmetic the same way: a GPU, where
        // there is one, is held to the same host reference.
        let mut devices = vec![Device::Cpu];
        if tch::Cuda::is_available() {
            devices.push(Device::Cuda(0));
        }
        for (device, seed, step, stream) in devices.into_iter().flat_map(|d| {
            [
                (d, 0, 0, Stream::dropout(0)),
                (d, 3, 17, Stream::dropout(2)),
                (d, u64::MAX, u64::MAX - 1, Stream::augmentation(1)),
            ]
        }) {
            let got = draw_on(device, seed, step, &ids, stream, &[3, 50]);
            for (row, &id) in ids.iter().enumerate() {
                for unit in 0..150 {
                    let want = uniform_one(seed, step, id, stream, unit);
                    assert_eq!(
                        got[row * 150 + unit as usize],
                        want,
                        "{device:?} seed {seed} step {step} id {id} unit {unit}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_same_key_gives_the_same_numbers() {
        let a = draw(5, 9, &[4, 2, 8], Stream::dropout(1), &[64]);
        let b = draw(5, 9, &[4, 2, 8], Stream::dropout(1), &[64]);
        assert_eq!(a, b);
    }

    #[test]
    fn a_sample_draws_the_same_alone_or_anywhere_in_a_batch() {
        let alone = draw(5, 9, &[42], Stream::dropout(0), &[256]);
        let ids: Vec<u64> = (0..100).rev().collect();
        let batch = draw(5, 9, &ids, Stream::dropout(0), &[256]);
        let row = ids.iter().position(|&i| i == 42).unwrap();
        assert_eq!(alone.as_slice(), &batch[row * 256..(row + 1) * 256]);
    }

    #[test]
    fn every_part_of_the_key_changes_the_numbers() {
        let base = draw(5, 9, &[42], Stream::dropout(0), &[256]);
        for (what, other) in [
            ("seed", draw(6, 9, &[42], Stream::dropout(0), &[256])),
            ("step", draw(5, 10, &[42], Stream::dropout(0), &[256])),
            ("sample", draw(5, 9, &[43], Stream::dropout(0), &[256])),
            ("stream", draw(5, 9, &[42], Stream::dropout(1), &[256])),
            ("kind", draw(5, 9, &[42], Stream::augmentation(0), &[256])),
        ] {
            let same = base.iter().zip(&other).filter(|(a, b)| a == b).count();
            // Independent 24-bit draws coincide with probability 2^-24 each.
            assert!(same <= 1, "changing the {what} left {same} of 256 equal");
        }
        // Units within one draw differ too.
        let mut sorted = base.clone();
        sorted.sort_by(f32::total_cmp);
        sorted.dedup();
        assert!(sorted.len() >= 255, "{} distinct of 256", sorted.len());
    }

    #[test]
    fn draws_are_uniform_on_the_unit_interval() {
        let ids: Vec<u64> = (0..256).collect();
        let u = draw(1, 2, &ids, Stream::dropout(0), &[1024]);
        let n = u.len() as f64;
        assert!(u.iter().all(|&x| (0.0..1.0).contains(&x)));
        let mean = u.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
        let var = u
            .iter()
            .map(|&x| (f64::from(x) - mean).powi(2))
            .sum::<f64>()
            / n;
        // 262,144 draws: the mean's standard error is 0.00056.
        assert!((mean - 0.5).abs() < 0.003, "mean {mean}");
        assert!((var - 1.0 / 12.0).abs() < 0.002, "variance {var}");
        let mut bins = [0usize; 16];
        for &x in &u {
            bins[(x * 16.0) as usize] += 1;
        }
        let expected = n / 16.0;
        for (i, &b) in bins.iter().enumerate() {
            let rel = (b as f64 - expected).abs() / expected;
            assert!(rel < 0.03, "bin {i} holds {b}, expected {expected}");
        }
        // Neighbouring samples and units are not correlated.
        let mut lag = 0.0;
        for w in u.windows(2) {
            lag += (f64::from(w[0]) - 0.5) * (f64::from(w[1]) - 0.5);
        }
        let corr = lag / (n - 1.0) / (1.0 / 12.0);
        assert!(corr.abs() < 0.01, "lag-1 correlation {corr}");
    }

    #[test]
    fn at_least_is_the_uniform_draw_compared_with_p() {
        let ids: Vec<u64> = (0..64).collect();
        let noise = SampleNoise::new(4, 1, &ids, Device::Cpu);
        let u = noise.uniform(Stream::dropout(3), &[2, 128]).unwrap();
        let tiny = 1.0 / f64::from(1u32 << 25);
        for p in [0.0, tiny, 0.2, 0.5, 0.9, 1.0 - tiny, 1.0] {
            let got = noise.at_least(Stream::dropout(3), &[2, 128], p).unwrap();
            assert_eq!(got.size(), u.size());
            assert_eq!(got.kind(), Kind::Bool);
            let want = u.ge(p);
            assert!(got.equal(&want), "p = {p}");
        }
        // A draw at exactly a threshold is kept: `>=`, not `>`.
        let v = Vec::<f32>::try_from(u.view([-1])).unwrap();
        let p = f64::from(v[17]);
        let keep = noise.at_least(Stream::dropout(3), &[2, 128], p).unwrap();
        assert!(keep.view([-1]).int64_value(&[17]) == 1);
    }

    #[test]
    fn an_empty_batch_draws_an_empty_tensor() {
        let t = SampleNoise::new(1, 2, &[], Device::Cpu)
            .uniform(Stream::dropout(0), &[8])
            .unwrap();
        assert_eq!(t.size(), vec![0, 8]);
    }
}
