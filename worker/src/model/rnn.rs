//! The `lstm` and `gru` models: stacked recurrent layers over a sequence, a linear head on the
//! last step's output. Each sample's features are read as `[steps, input_size]` (row-major; by
//! default a univariate window, `[features, 1]`), run through PyTorch's `nn.LSTM` / `nn.GRU`
//! (`batch_first=True`, zero initial state) held as `rnn`, and the output of the last step goes
//! through dropout and `out` (`nn.Linear`) to the forecast (or the class logits). Parameter names
//! are `nn.LSTM`'s (`rnn.weight_ih_l0`, `rnn.weight_hh_l0`, `rnn.bias_ih_l0`, `rnn.bias_hh_l0`, ...
//! per layer) so `model.safetensors` loads into that module with `load_state_dict`.
//!
//! libtorch's own inter-layer dropout draws from its global generator, which would tie a run to
//! the batch split, so there is none; dropout before the head is drawn per sample.

use super::{AllocError, BuildError, Linear, dropout, parameter};
use crate::sample_rng::{SampleNoise, Stream};
use ringmaster_common::jobspec::{RnnCell, RnnSpec};
use tch::nn::{self, Init};
use tch::{Kind, TchError, Tensor};

/// A recurrent forecaster or classifier; see the module docs.
#[derive(Debug)]
pub struct Rnn {
    cell: RnnCell,
    steps: i64,
    input_size: i64,
    hidden: i64,
    layers: i64,
    /// `w_ih, w_hh, b_ih, b_hh` per layer, the order `at::lstm` / `at::gru` take them in.
    weights: Vec<Tensor>,
    out: Linear,
    dropout: f64,
}

impl Rnn {
    /// Creates the parameters under `root` for samples of `inputs` features and `outputs`
    /// values out (classes or targets).
    pub fn new(
        root: &nn::Path,
        inputs: i64,
        outputs: i64,
        cell: RnnCell,
        spec: &RnnSpec,
    ) -> Result<Self, BuildError> {
        let (steps, input_size) = match spec.input_shape {
            Some([s, i]) => (i64::from(s), i64::from(i)),
            None => (inputs, 1),
        };
        if steps * input_size != inputs {
            return Err(BuildError::Shape(format!(
                "model.input_shape [{steps}, {input_size}] holds {} values per sample, but the \
                 training set has {inputs} features",
                steps * input_size
            )));
        }
        let hidden = i64::from(spec.hidden_size);
        let layers = i64::from(spec.layers);
        let gates = match cell {
            RnnCell::Lstm => 4,
            RnnCell::Gru => 3,
        } * hidden;
        let path = root / "rnn";
        // PyTorch's initialisation of every recurrent weight and bias.
        let bound = 1.0 / (hidden as f64).sqrt();
        let init = Init::Uniform {
            lo: -bound,
            up: bound,
        };
        let mut weights = Vec::with_capacity(4 * layers as usize);
        for l in 0..layers {
            let width = if l == 0 { input_size } else { hidden };
            for (name, shape) in [
                (format!("weight_ih_l{l}"), vec![gates, width]),
                (format!("weight_hh_l{l}"), vec![gates, hidden]),
                (format!("bias_ih_l{l}"), vec![gates]),
                (format!("bias_hh_l{l}"), vec![gates]),
            ] {
                weights.push(rnn_parameter(&path, &name, &shape, init)?);
            }
        }
        let out = Linear::new(root, "out", hidden, outputs)?;
        Ok(Rnn {
            cell,
            steps,
            input_size,
            hidden,
            layers,
            weights,
            out,
            dropout: spec.dropout,
        })
    }

    /// Outputs for a batch `[n, steps · input_size]`; with `noise`, dropout before the head is
    /// drawn per sample.
    pub(crate) fn forward(
        &self,
        xs: &Tensor,
        noise: Option<&SampleNoise>,
    ) -> Result<Tensor, TchError> {
        let n = xs.size().first().copied().unwrap_or(0);
        let x = xs.f_view([n, self.steps, self.input_size])?;
        let h0 = Tensor::f_zeros([self.layers, n, self.hidden], (Kind::Float, xs.device()))?;
        let seq = match self.cell {
            RnnCell::Lstm => {
                let c0 = h0.f_zeros_like()?;
                x.f_lstm(
                    &[&h0, &c0],
                    &self.weights.iter().collect::<Vec<_>>(),
                    true,
                    self.layers,
                    0.0,
                    false,
                    false,
                    true,
                )?
                .0
            }
            RnnCell::Gru => {
                x.f_gru(
                    &h0,
                    &self.weights,
                    true,
                    self.layers,
                    0.0,
                    false,
                    false,
                    true,
                )?
                .0
            }
        };
        let mut last = seq.f_select(1, self.steps - 1)?;
        if let Some(noise) = noise
            && self.dropout > 0.0
        {
            last = dropout(&last, self.dropout, noise, Stream::dropout(0))?;
        }
        self.out.forward(&last)
    }
}

fn rnn_parameter(
    path: &nn::Path,
    name: &str,
    shape: &[i64],
    init: Init,
) -> Result<Tensor, AllocError> {
    parameter(path, "rnn", name, shape, init)
}
