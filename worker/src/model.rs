//! Built-in models. Parameter names follow PyTorch's `nn.Linear` convention
//! (`fc0.weight`, `fc0.bias`, ..., `out.weight`, `out.bias`) so a saved
//! `model.safetensors` loads into the equivalent Python module unchanged.
//! Nothing here knows about data, optimizers or collectives.

use ringmaster_common::jobspec::{Activation, ModelSpec};
use tch::Tensor;
use tch::nn::{self, Module};

/// A multi-layer perceptron: `Linear -> activation -> dropout` per hidden layer,
/// then a linear classifier head.
#[derive(Debug)]
pub struct Mlp {
    hidden: Vec<nn::Linear>,
    out: nn::Linear,
    activation: Activation,
    dropout: f64,
}

impl Mlp {
    /// Creates the parameters under `root` (initialised from libtorch's RNG,
    /// so the caller seeds it first).
    pub fn new(root: &nn::Path, inputs: i64, classes: i64, spec: &ModelSpec) -> Self {
        let ModelSpec::Mlp {
            hidden,
            activation,
            dropout,
        } = spec;
        let mut layers = Vec::with_capacity(hidden.len());
        let mut width = inputs;
        for (i, &h) in hidden.iter().enumerate() {
            layers.push(nn::linear(
                root / format!("fc{i}"),
                width,
                i64::from(h),
                Default::default(),
            ));
            width = i64::from(h);
        }
        let out = nn::linear(root / "out", width, classes, Default::default());
        Mlp {
            hidden: layers,
            out,
            activation: *activation,
            dropout: *dropout,
        }
    }

    /// Logits for a batch `[n, inputs]`; dropout is active only when `train`.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let mut x = xs.shallow_clone();
        for layer in &self.hidden {
            x = layer.forward(&x);
            x = match self.activation {
                Activation::Relu => x.relu(),
                Activation::Gelu => x.gelu("none"),
                Activation::Tanh => x.tanh(),
            };
            if self.dropout > 0.0 {
                x = x.dropout(self.dropout, train);
            }
        }
        self.out.forward(&x)
    }
}
