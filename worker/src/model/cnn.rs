//! The `cnn` model: convolution blocks over `[C, H, W]` images, global
//! average pooling, dropout and a linear head. Each block is
//! `conv{i}` (PyTorch's `nn.Conv2d(c_in, c_out, k, padding=k // 2)`), then
//! `norm{i}` (`nn.GroupNorm(groups, c_out)`, or nothing), the activation and
//! `nn.MaxPool2d(pool)`; the head is `out` (`nn.Linear`). The parameter names
//! are those of that `nn.Sequential`-free module, so `model.safetensors`
//! loads into it with `load_state_dict`.
//!
//! Group normalization uses each sample's own statistics, so a step's
//! gradients do not depend on how the batch is split between ranks: W
//! workers compute the same run as one (batch normalization would not).

use super::{AllocError, BuildError, Linear, activate, dropout, parameter};
use crate::sample_rng::{SampleNoise, Stream};
use ringmaster_common::jobspec::{Activation, ModelSpec, Norm};
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
}

#[derive(Debug)]
struct Block {
    weight: Tensor,
    bias: Tensor,
    /// GroupNorm's affine weight and bias, when the model normalizes.
    norm: Option<(Tensor, Tensor)>,
}

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
            blocks.push(Block::new(root, i, c_in, c_out, k, *norm == Norm::Group)?);
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
        let pad = self.kernel / 2;
        for b in &self.blocks {
            x = x.f_conv2d(&b.weight, Some(&b.bias), [1, 1], [pad, pad], [1, 1], 1)?;
            if let Some((gw, gb)) = &b.norm {
                x = x.f_group_norm(self.groups, Some(gw), Some(gb), 1e-5, false)?;
            }
            x = activate(&x, self.activation)?;
            if self.pool > 1 {
                x = x.f_max_pool2d(
                    [self.pool, self.pool],
                    [self.pool, self.pool],
                    [0, 0],
                    [1, 1],
                    false,
                )?;
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
}

impl Block {
    /// `conv{i}.bias` and `conv{i}.weight` initialised as `Linear`'s (bias
    /// uniform in ±1/√fan_in, weight Kaiming-uniform), then `norm{i}.weight`
    /// (ones) and `norm{i}.bias` (zeros) as `nn.GroupNorm`'s.
    fn new(
        root: &nn::Path,
        i: usize,
        c_in: i64,
        c_out: i64,
        k: i64,
        norm: bool,
    ) -> Result<Self, AllocError> {
        let name = format!("conv{i}");
        let path = root / name.as_str();
        let bound = 1.0 / ((c_in * k * k) as f64).sqrt();
        let bias = parameter(
            &path,
            &name,
            "bias",
            &[c_out],
            Init::Uniform {
                lo: -bound,
                up: bound,
            },
        )?;
        let weight = parameter(
            &path,
            &name,
            "weight",
            &[c_out, c_in, k, k],
            nn::init::DEFAULT_KAIMING_UNIFORM,
        )?;
        let norm = if norm {
            let name = format!("norm{i}");
            let path = root / name.as_str();
            let w = parameter(&path, &name, "weight", &[c_out], Init::Const(1.0))?;
            let b = parameter(&path, &name, "bias", &[c_out], Init::Const(0.0))?;
            Some((w, b))
        } else {
            None
        };
        Ok(Block { weight, bias, norm })
    }
}
