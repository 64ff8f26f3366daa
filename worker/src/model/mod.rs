//! Built-in models: the `mlp` here, the `cnn` (`cnn.rs`), `lstm`/`gru`
//! (`rnn.rs`) and the GPT `transformer` (`transformer.rs`). Parameter names
//! follow PyTorch's conventions (`fc0.weight`, `conv0.weight`,
//! `norm0.weight`, ..., `out.weight`, `out.bias`) so a saved
//! `model.safetensors` loads into the equivalent Python module unchanged.
//! Nothing here knows about data, optimizers or collectives.
//!
//! Parameters are allocated through libtorch's fallible API, so a model too
//! large for the device is an [`AllocError`] naming the parameter, not a
//! panic. Dropout masks come from [`SampleNoise`], keyed by the samples
//! themselves, so a sample gets the same mask on any rank layout.

mod alloc;
mod cnn;
mod rnn;
mod script;
mod transformer;

pub use cnn::Cnn;
pub use rnn::Rnn;
pub use script::Script;
pub use transformer::Transformer;

pub use alloc::{AllocError, allocate, device_name, from_host, torch_message, zeros};

use crate::sample_rng::{SampleNoise, Stream};
use ringmaster_common::jobspec::{Activation, ModelSpec, RnnCell};
use tch::nn::{self, Init};
use tch::{TchError, Tensor};

/// A multi-layer perceptron: `Linear -> activation -> dropout` per hidden layer,
/// then a linear classifier head.
#[derive(Debug)]
pub struct Mlp {
    hidden: Vec<Linear>,
    out: Linear,
    activation: Activation,
    dropout: f64,
}

/// One of the built-in models, as the trainer drives it.
#[derive(Debug)]
pub enum Model {
    Mlp(Mlp),
    Cnn(Cnn),
    Rnn(Rnn),
    Script(Script),
    Transformer(Transformer),
}

impl Model {
    /// Logits for a training batch whose row `i` is the sample `noise`
    /// knows as its `i`-th.
    pub fn forward_train(&self, xs: &Tensor, noise: &SampleNoise) -> Result<Tensor, TchError> {
        let rows = xs.size().first().copied().unwrap_or(0);
        if rows != noise.len() as i64 {
            return Err(TchError::Shape(format!(
                "batch of {rows} rows with noise for {} samples",
                noise.len()
            )));
        }
        match self {
            Model::Mlp(m) => m.forward(xs, Some(noise)),
            Model::Cnn(m) => m.forward(xs, Some(noise)),
            Model::Rnn(m) => m.forward(xs, Some(noise)),
            Model::Script(m) => m.forward(xs, true, Some(noise)),
            Model::Transformer(m) => m.forward(xs, Some(noise)),
        }
    }

    /// Logits for evaluation: no dropout.
    pub fn forward_eval(&self, xs: &Tensor) -> Result<Tensor, TchError> {
        match self {
            Model::Mlp(m) => m.forward(xs, None),
            Model::Cnn(m) => m.forward(xs, None),
            Model::Rnn(m) => m.forward(xs, None),
            Model::Script(m) => m.forward(xs, false, None),
            Model::Transformer(m) => m.forward(xs, None),
        }
    }

    /// The parameters by name, in name order (the order of buckets, checkpoints and
    /// `model.safetensors`): those of `vs` for the built-in models, the module's own for a
    /// TorchScript one.
    pub fn named_parameters(&self, vs: &nn::VarStore) -> Result<Vec<(String, Tensor)>, TchError> {
        match self {
            Model::Script(m) => m.named_parameters(),
            _ => Ok(named_parameters(vs)),
        }
    }
}

impl Model {
    /// The state besides the parameters that a trained model is made of (BatchNorm's running
    /// statistics and batch count, a module's registered masks), by name in name order: not trained by the optimizer, but
    /// checkpointed, transferred, kept equal on every rank and saved with the parameters.
    /// Empty for built-in models without batch normalization; a TorchScript module's own
    /// (`script.rs`).
    pub fn named_buffers(&self) -> Result<Vec<(String, Tensor)>, TchError> {
        match self {
            Model::Cnn(m) => Ok(m.named_buffers()),
            Model::Script(m) => m.named_buffers(),
            _ => Ok(Vec::new()),
        }
    }
}

/// Why a model cannot be built for a dataset.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Alloc(#[from] AllocError),
    #[error("{0}")]
    Shape(String),
}

/// The job's initial model on `device`: libtorch's generator seeded with the
/// job's seed, then the parameters built. Every rank, and anything that needs
/// to know where a run started (tests comparing against the initial
/// parameters), goes through this one function.
pub fn initial(
    seed: u64,
    inputs: i64,
    classes: i64,
    spec: &ModelSpec,
    device: tch::Device,
) -> Result<(nn::VarStore, Model), BuildError> {
    // libtorch's generator is process-wide: two runs initialising at once
    // (two jobs on one worker, tests in parallel threads) would interleave
    // their draws and each get parameters no seed describes.
    static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = INIT.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(seed as i64);
    let vs = nn::VarStore::new(device);
    let model = match spec {
        ModelSpec::Mlp {
            hidden,
            activation,
            dropout,
        } => Model::Mlp(Mlp::new(
            &vs.root(),
            inputs,
            classes,
            hidden,
            *activation,
            *dropout,
        )?),
        ModelSpec::Cnn { .. } => Model::Cnn(Cnn::new(&vs.root(), inputs, classes, spec)?),
        ModelSpec::Lstm(r) => Model::Rnn(Rnn::new(&vs.root(), inputs, classes, RnnCell::Lstm, r)?),
        ModelSpec::Gru(r) => Model::Rnn(Rnn::new(&vs.root(), inputs, classes, RnnCell::Gru, r)?),
        ModelSpec::Transformer(t) => {
            Model::Transformer(Transformer::new(&vs.root(), inputs, classes, t)?)
        }
        // The module brings its own initial parameters: the seed does not apply.
        ModelSpec::Torchscript { path, input_shape } => Model::Script(Script::load(
            path,
            device,
            inputs,
            classes,
            input_shape.as_deref(),
        )?),
    };
    Ok((vs, model))
}

/// The parameters of `vs` by name, in name order (the order of buckets,
/// checkpoints and `model.safetensors`).
pub fn named_parameters(vs: &nn::VarStore) -> Vec<(String, tch::Tensor)> {
    let mut named: Vec<(String, tch::Tensor)> = vs.variables().into_iter().collect();
    named.sort_by(|x, y| x.0.cmp(&y.0));
    named
}

impl Mlp {
    /// Creates the parameters under `root` (initialised from libtorch's RNG,
    /// so the caller seeds it first).
    pub fn new(
        root: &nn::Path,
        inputs: i64,
        classes: i64,
        hidden: &[u32],
        activation: Activation,
        dropout: f64,
    ) -> Result<Self, AllocError> {
        let mut layers = Vec::with_capacity(hidden.len());
        let mut width = inputs;
        for (i, &h) in hidden.iter().enumerate() {
            layers.push(Linear::new(root, &format!("fc{i}"), width, i64::from(h))?);
            width = i64::from(h);
        }
        let out = Linear::new(root, "out", width, classes)?;
        Ok(Mlp {
            hidden: layers,
            out,
            activation,
            dropout,
        })
    }

    /// Logits for a batch `[n, inputs]`; with `noise`, dropout masks are
    /// drawn for each sample from its own key, whatever batch or rank it is
    /// in.
    pub(crate) fn forward(
        &self,
        xs: &Tensor,
        noise: Option<&SampleNoise>,
    ) -> Result<Tensor, TchError> {
        let mut x = xs.shallow_clone();
        for (i, layer) in self.hidden.iter().enumerate() {
            x = layer.forward(&x)?;
            x = activate(&x, self.activation)?;
            if let Some(noise) = noise
                && self.dropout > 0.0
            {
                x = dropout(&x, self.dropout, noise, Stream::dropout(i as u32))?;
            }
        }
        self.out.forward(&x)
    }
}

/// `x` through `activation`, as PyTorch's `nn.ReLU`, `nn.GELU` (exact) and
/// `nn.Tanh`.
pub(crate) fn activate(x: &Tensor, activation: Activation) -> Result<Tensor, TchError> {
    match activation {
        Activation::Relu => x.f_relu(),
        Activation::Gelu => x.f_gelu("none"),
        Activation::Tanh => x.f_tanh(),
    }
}

/// Inverted dropout: each unit of `x` (`[n, ...]`, row `i` belonging to
/// `noise`'s `i`-th sample) is zeroed with probability `p` and the kept ones
/// are scaled by `1 / (1 - p)`, so evaluation needs no rescaling.
pub fn dropout(
    x: &Tensor,
    p: f64,
    noise: &SampleNoise,
    stream: Stream,
) -> Result<Tensor, TchError> {
    let width = x.size()[1..].to_vec();
    let keep = noise.at_least(stream, &width, p)?;
    let mut scale = Tensor::f_where_scalar(&keep, 1.0 / (1.0 - p), 0.0)?;
    if scale.kind() != x.kind() {
        scale = scale.f_to_kind(x.kind())?;
    }
    x.f_mul(&scale)
}

/// `y = x W^T + b`, as PyTorch's `nn.Linear`.
#[derive(Debug)]
pub(crate) struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    /// Registers `<name>.bias` then `<name>.weight` under `root`, initialised
    /// exactly as `tch::nn::linear` does (same distributions, same order of
    /// draws from libtorch's RNG), so a seed gives the parameters it always
    /// gave. Note tch's weight init is Kaiming-uniform with ReLU gain, bound
    /// `sqrt(6 / inputs)`, wider than PyTorch `nn.Linear`'s `1 / sqrt(inputs)`;
    /// the biases match PyTorch's.
    pub(crate) fn new(
        root: &nn::Path,
        name: &str,
        inputs: i64,
        outputs: i64,
    ) -> Result<Self, AllocError> {
        let (weight, bias) = weight_and_bias(&(root / name), name, inputs, &[outputs, inputs])?;
        Ok(Linear { weight, bias })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor, TchError> {
        x.f_linear(&self.weight, Some(&self.bias))
    }
}

/// `<name>.bias` then `<name>.weight` (of `weight_shape`, whose first
/// dimension is the outputs) under `path`, in the draw order of
/// `tch::nn::linear`: the bias uniform in `±1/√fan_in`, the weight
/// Kaiming-uniform.
pub(crate) fn weight_and_bias(
    path: &nn::Path,
    name: &str,
    fan_in: i64,
    weight_shape: &[i64],
) -> Result<(Tensor, Tensor), AllocError> {
    let bound = 1.0 / (fan_in as f64).sqrt();
    let bias = parameter(
        path,
        name,
        "bias",
        &weight_shape[..1],
        Init::Uniform {
            lo: -bound,
            up: bound,
        },
    )?;
    let weight = parameter(
        path,
        name,
        "weight",
        weight_shape,
        nn::init::DEFAULT_KAIMING_UNIFORM,
    )?;
    Ok((weight, bias))
}

pub(crate) fn parameter(
    path: &nn::Path,
    layer: &str,
    name: &str,
    shape: &[i64],
    init: Init,
) -> Result<Tensor, AllocError> {
    allocate(
        &format!("model parameter {layer}.{name}"),
        shape,
        path.kind(),
        path.device(),
        || path.f_var(name, shape, init),
    )
}
