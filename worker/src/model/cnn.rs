//! The `cnn` model: convolution blocks over `[C, H, W]` images, global
//! average pooling, dropout and a linear head. Each block is
//! `conv{i}` (PyTorch's `nn.Conv2d(c_in, c_out, k, padding=k // 2)`), then
//! `norm{i}` (`nn.GroupNorm(groups, c_out)`, `nn.BatchNorm2d(c_out)`, or
//! nothing), the activation and `nn.MaxPool2d(pool)`; the head is `out`
//! (`nn.Linear`). The parameter and buffer names are those of that
//! `nn.Sequential`-free module, so `model.safetensors` loads into it with a
//! strict `load_state_dict`.
//!
//! Group normalization uses each sample's own statistics, so a step's
//! gradients do not depend on how the batch is split between ranks: W
//! workers compute the same run as one. Batch normalization normalizes a
//! training batch with the statistics of the rows it is given (one rank's
//! slice, as under PyTorch DDP) and updates its running statistics from them
//! in place; the trainer makes every rank's buffers rank 0's after each step.

use super::{
    AllocError, BuildError, Linear, activate, allocate, dropout, parameter, weight_and_bias,
};
use crate::sample_rng::{SampleNoise, Stream};
use ringmaster_common::jobspec::{Activation, Augment, ModelSpec, Norm};
use tch::nn::{self, Init};
use tch::{Kind, TchError, Tensor};

/// A convolutional classifier; see the module docs.
#[derive(Debug)]
pub struct Cnn {
    input: [i64; 3],
    blocks: Vec<Block>,
    out: Linear,
    kernel: i64,
    pool: i64,
    groups: i64,
    activation: Activation,
    dropout: f64,
    augment: Augment,
}

#[derive(Debug)]
struct Block {
    weight: Tensor,
    bias: Tensor,
    norm: BlockNorm,
}

/// The normalization of one block and its state.
#[derive(Debug)]
enum BlockNorm {
    None,
    /// GroupNorm's affine weight and bias.
    Group(Tensor, Tensor),
    Batch(BatchNorm),
}

/// `nn.BatchNorm2d(c, eps=1e-5, momentum=0.1)`: affine weight and bias, and
/// the buffers PyTorch's `state_dict` holds.
#[derive(Debug)]
struct BatchNorm {
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    /// i64 scalar, as PyTorch's (a strict `load_state_dict` wants it).
    num_batches_tracked: Tensor,
}

/// PyTorch's defaults for `nn.BatchNorm2d`.
const BN_MOMENTUM: f64 = 0.1;
const NORM_EPS: f64 = 1e-5;

impl Cnn {
    /// Creates the parameters under `root` for inputs of `inputs` features
    /// (which must be `C·H·W` of the spec's `input_shape`) and `classes`
    /// classes.
    pub fn new(
        root: &nn::Path,
        inputs: i64,
        classes: i64,
        spec: &ModelSpec,
    ) -> Result<Self, BuildError> {
        let ModelSpec::Cnn {
            input_shape,
            channels,
            kernel,
            pool,
            norm,
            groups,
            activation,
            dropout,
            augment,
        } = spec
        else {
            return Err(BuildError::Shape("not a cnn spec".into()));
        };
        let input = input_shape.map(i64::from);
        let values: i64 = input.iter().product();
        if values != inputs {
            return Err(BuildError::Shape(format!(
                "model.input_shape {input_shape:?} holds {values} values per sample, but the \
                 training set has {inputs} features"
            )));
        }
        let k = i64::from(*kernel);
        let mut blocks = Vec::with_capacity(channels.len());
        let mut c_in = input[0];
        for (i, &c) in channels.iter().enumerate() {
            let c_out = i64::from(c);
            blocks.push(Block::new(root, i, c_in, c_out, k, *norm)?);
            c_in = c_out;
        }
        let out = Linear::new(root, "out", c_in, classes)?;
        Ok(Cnn {
            input,
            blocks,
            out,
            kernel: k,
            pool: i64::from(*pool),
            groups: i64::from(*groups),
            activation: *activation,
            dropout: *dropout,
            augment: *augment,
        })
    }

    /// Logits for a batch `[n, C·H·W]` (features row-major in `C, H, W`);
    /// with `noise`, dropout before the head is drawn per sample.
    pub(crate) fn forward(
        &self,
        xs: &Tensor,
        noise: Option<&SampleNoise>,
    ) -> Result<Tensor, TchError> {
        let n = xs.size().first().copied().unwrap_or(0);
        let [c, h, w] = self.input;
        let mut x = xs.f_view([n, c, h, w])?;
        if let Some(noise) = noise {
            x = augment(&x, &self.augment, noise)?;
        }
        let pad = self.kernel / 2;
        for b in &self.blocks {
            x = x.f_conv2d(&b.weight, Some(&b.bias), [1, 1], [pad, pad], [1, 1], 1)?;
            match &b.norm {
                BlockNorm::None => {}
                BlockNorm::Group(gw, gb) => {
                    x = x.f_group_norm(self.groups, Some(gw), Some(gb), NORM_EPS, false)?;
                }
                BlockNorm::Batch(bn) => x = bn.forward(&x, noise.is_some())?,
            }
            // ReLU and max pooling commute exactly, values and gradients
            // alike (a window whose maximum is not positive gets no gradient
            // either way; otherwise the same first maximum gets it), so ReLU
            // runs after the pool, on a quarter of the values. Other
            // activations keep PyTorch's order.
            let relu_after_pool = self.activation == Activation::Relu && self.pool > 1;
            if !relu_after_pool {
                x = activate(&x, self.activation)?;
            }
            if self.pool > 1 {
                // Pooling is several times faster on channels-last memory on
                // the CPU, and the next convolution then reads it without
                // oneDNN's reorder (with the ReLU move: the bench cnn went
                // from 1.06x to 1.25x PyTorch DDP). Only the layout changes,
                // and with it the convolution's summation order (values
                // agree to float rounding, not bitwise).
                x = channels_last(&x)?;
                x = x.f_max_pool2d(
                    [self.pool, self.pool],
                    [self.pool, self.pool],
                    [0, 0],
                    [1, 1],
                    false,
                )?;
            }
            if relu_after_pool {
                x = x.f_relu()?;
            }
        }
        // Global average pooling: [n, c, h', w'] -> [n, c].
        x = x.f_mean_dim(Some([2i64, 3].as_slice()), false, Kind::Float)?;
        if let Some(noise) = noise
            && self.dropout > 0.0
        {
            x = dropout(&x, self.dropout, noise, Stream::dropout(0))?;
        }
        self.out.forward(&x)
    }

    /// The batch normalizations' buffers by name (`norm{i}.num_batches_tracked`,
    /// `.running_mean`, `.running_var`), in name order; empty without them.
    pub(crate) fn named_buffers(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (i, b) in self.blocks.iter().enumerate() {
            if let BlockNorm::Batch(bn) = &b.norm {
                for (name, t) in [
                    ("num_batches_tracked", &bn.num_batches_tracked),
                    ("running_mean", &bn.running_mean),
                    ("running_var", &bn.running_var),
                ] {
                    out.push((format!("norm{i}.{name}"), t.shallow_clone()));
                }
            }
        }
        out.sort_by(|x, y| x.0.cmp(&y.0));
        out
    }
}

impl BatchNorm {
    /// In training, normalizes with the batch's own statistics and folds them
    /// into the running ones (libtorch updates them in place: the unbiased
    /// variance, with `momentum`), counting the batch; in evaluation, uses the
    /// running statistics.
    fn forward(&self, x: &Tensor, training: bool) -> Result<Tensor, TchError> {
        let size = x.size();
        if training && size.iter().enumerate().all(|(d, &v)| d == 1 || v <= 1) {
            // One value per channel has no variance: libtorch would fold a
            // NaN into the running variance; PyTorch's module refuses.
            return Err(TchError::Shape(format!(
                "batch normalization needs more than one value per channel when training, got \
                 input of size {size:?} (a worker's slice of the batch is one sample of 1x1 \
                 pixels: use a larger batch_size or norm = \"group\")"
            )));
        }
        let y = x.f_batch_norm(
            Some(&self.weight),
            Some(&self.bias),
            Some(&self.running_mean),
            Some(&self.running_var),
            training,
            BN_MOMENTUM,
            NORM_EPS,
            true,
        )?;
        if training {
            let _ = tch::no_grad(|| self.num_batches_tracked.shallow_clone().f_add_scalar_(1))?;
        }
        Ok(y)
    }
}

/// `x` (`[n, c, h, w]`) with the same shape and values in channels-last
/// memory (strides of `[n, h, w, c]`), as PyTorch's
/// `x.contiguous(memory_format=torch.channels_last)`; no copy when it already
/// is. Kernels choose their channels-last implementations from the strides.
fn channels_last(x: &Tensor) -> Result<Tensor, TchError> {
    x.f_permute([0, 2, 3, 1])?
        .f_contiguous()?
        .f_permute([0, 3, 1, 2])
}

/// Random crop (after mirror padding) and horizontal flip of each image of
/// `x` (`[n, C, H, W]`, row `i` belonging to `noise`'s `i`-th sample), drawn
/// from that sample's own numbers; the identity when `augment` does nothing.
pub(crate) fn augment(
    x: &Tensor,
    augment: &Augment,
    noise: &SampleNoise,
) -> Result<Tensor, TchError> {
    let p = i64::from(augment.crop_padding);
    if p == 0 && !augment.horizontal_flip {
        return Ok(x.shallow_clone());
    }
    let size = x.size();
    let (n, h, w) = (size[0], size[2], size[3]);
    // Three numbers per sample: the crop's row and column offsets, the flip.
    let u = noise
        .uniform(Stream::augmentation(0), &[3])?
        .f_to_device(tch::Device::Cpu)?;
    let mut draws = vec![0f32; (3 * n) as usize];
    u.f_copy_data(&mut draws, (3 * n) as usize)?;
    // Mirrored, not zero, borders: a constant border makes exact ties in
    // max pooling, whose gradient then follows float rounding, so runs with
    // another number of workers would drift apart.
    let padded = if p > 0 {
        x.f_reflection_pad2d([p, p, p, p])?
    } else {
        x.shallow_clone()
    };
    let span = (2 * p + 1) as f32;
    let mut out = Vec::with_capacity(n as usize);
    for (i, d) in draws.chunks_exact(3).enumerate() {
        let dy = ((d[0] * span) as i64).min(2 * p);
        let dx = ((d[1] * span) as i64).min(2 * p);
        let mut img = padded
            .f_select(0, i as i64)?
            .f_narrow(1, dy, h)?
            .f_narrow(2, dx, w)?;
        if augment.horizontal_flip && d[2] < 0.5 {
            img = img.f_flip([2])?;
        }
        out.push(img);
    }
    Tensor::f_stack(&out, 0)
}

impl Block {
    /// `conv{i}.bias` and `conv{i}.weight` initialised as `Linear`'s (bias
    /// uniform in ±1/√fan_in, weight Kaiming-uniform), then `norm{i}.weight`
    /// (ones) and `norm{i}.bias` (zeros) as `nn.GroupNorm`'s and
    /// `nn.BatchNorm2d`'s, and the latter's buffers (mean zeros, variance
    /// ones, count zero). None of it draws from the generator.
    fn new(
        root: &nn::Path,
        i: usize,
        c_in: i64,
        c_out: i64,
        k: i64,
        norm: Norm,
    ) -> Result<Self, AllocError> {
        let name = format!("conv{i}");
        let path = root / name.as_str();
        let (weight, bias) = weight_and_bias(&path, &name, c_in * k * k, &[c_out, c_in, k, k])?;
        let affine = || -> Result<(Tensor, Tensor), AllocError> {
            let name = format!("norm{i}");
            let path = root / name.as_str();
            let w = parameter(&path, &name, "weight", &[c_out], Init::Const(1.0))?;
            let b = parameter(&path, &name, "bias", &[c_out], Init::Const(0.0))?;
            Ok((w, b))
        };
        let norm = match norm {
            Norm::None => BlockNorm::None,
            Norm::Group => {
                let (w, b) = affine()?;
                BlockNorm::Group(w, b)
            }
            Norm::Batch => {
                let (weight, bias) = affine()?;
                let device = root.device();
                let buffer = |name: &str, shape: &[i64], kind: Kind, value: f64| {
                    allocate(
                        &format!("model buffer norm{i}.{name}"),
                        shape,
                        kind,
                        device,
                        || Tensor::f_full(shape, value, (kind, device)),
                    )
                };
                BlockNorm::Batch(BatchNorm {
                    weight,
                    bias,
                    running_mean: buffer("running_mean", &[c_out], Kind::Float, 0.0)?,
                    running_var: buffer("running_var", &[c_out], Kind::Float, 1.0)?,
                    num_batches_tracked: buffer("num_batches_tracked", &[], Kind::Int64, 0.0)?,
                })
            }
        };
        Ok(Block { weight, bias, norm })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// PyTorch's order, activation then pool, on the same parameters and
    /// memory layout.
    fn relu_then_pool(cnn: &Cnn, xs: &Tensor) -> Tensor {
        let [c, h, w] = cnn.input;
        let mut x = xs.view([-1, c, h, w]);
        for b in &cnn.blocks {
            x = x.conv2d(&b.weight, Some(&b.bias), [1, 1], [1, 1], [1, 1], 1);
            x = channels_last(&x.relu())
                .unwrap()
                .max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false);
        }
        let x = x.mean_dim(Some([2i64, 3].as_slice()), false, Kind::Float);
        cnn.out.forward(&x).unwrap()
    }

    #[test]
    fn relu_after_the_pool_gives_pytorchs_values_and_gradients_bitwise() {
        let spec = ModelSpec::Cnn {
            input_shape: [2, 8, 8],
            channels: vec![4, 6],
            kernel: 3,
            pool: 2,
            norm: Norm::None,
            groups: 1,
            activation: Activation::Relu,
            dropout: 0.0,
            augment: Augment::default(),
        };
        tch::manual_seed(3);
        let vs = nn::VarStore::new(Device::Cpu);
        let cnn = Cnn::new(&vs.root(), 128, 3, &spec).unwrap();
        // Many non-positive windows, and exact ties among positive values.
        let xs = Tensor::randn([5, 128], (Kind::Float, Device::Cpu)).round();
        let params: Vec<Tensor> = super::super::named_parameters(&vs)
            .into_iter()
            .map(|(_, p)| p)
            .collect();
        let grads = |out: Tensor| {
            Tensor::run_backward(&[out.square().sum(Kind::Float)], &params, false, false)
        };
        let ours = cnn.forward(&xs, None).unwrap();
        let theirs = relu_then_pool(&cnn, &xs);
        assert!(ours.equal(&theirs));
        let (a, b) = (grads(ours), grads(theirs));
        for (a, b) in a.iter().zip(&b) {
            assert!(a.equal(b));
        }
    }

    #[test]
    fn channels_last_keeps_shape_and_values_and_changes_strides() {
        let x = Tensor::arange(2 * 3 * 4 * 5, (Kind::Float, Device::Cpu)).view([2, 3, 4, 5]);
        let y = channels_last(&x).unwrap();
        assert_eq!(y.size(), [2, 3, 4, 5]);
        assert!(y.equal(&x));
        assert_eq!(y.stride(), [60, 1, 15, 3]);
        // Already channels-last: the same memory.
        let z = channels_last(&y).unwrap();
        assert_eq!(z.data_ptr(), y.data_ptr());
    }

    #[test]
    fn batch_norm_refuses_a_single_value_per_channel_in_training() {
        let spec = ModelSpec::Cnn {
            input_shape: [1, 1, 1],
            channels: vec![2],
            kernel: 1,
            pool: 1,
            norm: Norm::Batch,
            groups: 1,
            activation: Activation::Relu,
            dropout: 0.0,
            augment: Augment::default(),
        };
        let vs = nn::VarStore::new(Device::Cpu);
        let cnn = Cnn::new(&vs.root(), 1, 2, &spec).unwrap();
        let one = Tensor::from_slice(&[0.5f32]).view([1, 1]);
        let ids = [4u64];
        let e = cnn
            .forward(&one, Some(&SampleNoise::new(1, 0, &ids, Device::Cpu)))
            .unwrap_err();
        assert!(
            e.to_string().contains("more than one value per channel"),
            "{e}"
        );
        // Evaluation uses the running statistics: one sample is fine.
        assert!(cnn.forward(&one, None).is_ok());
        let two = Tensor::from_slice(&[0.5f32, -1.0]).view([2, 1]);
        let ids = [4u64, 9];
        let out = cnn
            .forward(&two, Some(&SampleNoise::new(1, 0, &ids, Device::Cpu)))
            .unwrap();
        assert_eq!(out.size(), [2, 2]);
        let count = &cnn.named_buffers()[0];
        assert_eq!(count.0, "norm0.num_batches_tracked");
        assert_eq!(count.1.int64_value(&[]), 1);
    }

    fn images(ids: &[u64]) -> Tensor {
        let v: Vec<f32> = ids
            .iter()
            .flat_map(|&id| (0..2 * 5 * 6).map(move |k| (id * 100 + k) as f32))
            .collect();
        Tensor::from_slice(&v).view([ids.len() as i64, 2, 5, 6])
    }

    #[test]
    fn a_sample_is_augmented_the_same_alone_or_in_any_batch() {
        let aug = Augment {
            crop_padding: 2,
            horizontal_flip: true,
        };
        let ids = [3u64, 17, 40, 41, 99, 1000];
        let batch = augment(
            &images(&ids),
            &aug,
            &SampleNoise::new(5, 9, &ids, Device::Cpu),
        )
        .unwrap();
        let mut changed = 0;
        for (i, &id) in ids.iter().enumerate() {
            let alone = augment(
                &images(&[id]),
                &aug,
                &SampleNoise::new(5, 9, &[id], Device::Cpu),
            )
            .unwrap();
            assert!(batch.get(i as i64).equal(&alone.get(0)), "sample {id}");
            if !alone.get(0).equal(&images(&[id]).get(0)) {
                changed += 1;
            }
            // Another step draws another crop or flip for some samples.
            assert_eq!(alone.size(), [1, 2, 5, 6]);
        }
        assert!(changed >= 4, "only {changed} of 6 images changed");
        let other = augment(
            &images(&ids),
            &aug,
            &SampleNoise::new(5, 10, &ids, Device::Cpu),
        )
        .unwrap();
        assert!(!other.equal(&batch), "a new step draws new augmentations");
    }

    #[test]
    fn a_crop_keeps_the_pixels_it_shifts_and_mirrors_the_border() {
        let aug = Augment {
            crop_padding: 1,
            horizontal_flip: false,
        };
        let x = images(&[7]);
        for step in 0..20 {
            let y = augment(&x, &aug, &SampleNoise::new(1, step, &[7], Device::Cpu)).unwrap();
            // Every output pixel is an input pixel (the border mirrors).
            let xs: Vec<f32> = Vec::try_from(x.flatten(0, -1)).unwrap();
            let ys: Vec<f32> = Vec::try_from(y.flatten(0, -1)).unwrap();
            assert!(ys.iter().all(|v| xs.contains(v)));
            // A shift of at most one keeps the centre 3x4 of the image.
            let centre = x.narrow(2, 1, 3).narrow(3, 1, 4);
            let kept = centre.flatten(0, -1);
            let kept: Vec<f32> = Vec::try_from(kept).unwrap();
            let common = kept.iter().filter(|v| ys.contains(v)).count();
            assert!(common >= 6, "step {step}: {common}");
        }
        let none = Augment::default();
        let same = augment(&x, &none, &SampleNoise::new(1, 0, &[7], Device::Cpu)).unwrap();
        assert!(same.equal(&x));
    }
}
