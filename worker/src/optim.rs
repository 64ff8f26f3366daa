//! Optimizers implemented over plain tensors, so that every piece of optimizer
//! state (momentum buffers, Adam moments, step counts) is owned here, by name,
//! and can be checkpointed and restored exactly. libtorch's optimizers keep
//! that state out of reach of `tch`.
//!
//! Semantics follow PyTorch's `torch.optim.SGD` (dampening 0), `Adam` (L2
//! weight decay added to the gradient) and `AdamW` (decoupled weight decay).

use ringmaster_common::jobspec::Optimizer as OptimizerSpec;
use tch::Tensor;

/// One optimizer over an ordered list of named parameters.
pub struct Optimizer {
    spec: OptimizerSpec,
    lr: f64,
    weight_decay: f64,
    /// Number of `step` calls so far (Adam's bias correction uses it).
    steps: u64,
    /// Per-parameter state, in parameter order: SGD uses `first` as the
    /// momentum buffer; Adam uses `first`/`second` as the moment estimates.
    first: Vec<Option<Tensor>>,
    second: Vec<Option<Tensor>>,
}

impl Optimizer {
    pub fn new(spec: OptimizerSpec, lr: f64, weight_decay: f64, params: usize) -> Self {
        Optimizer {
            spec,
            lr,
            weight_decay,
            steps: 0,
            first: (0..params).map(|_| None).collect(),
            second: (0..params).map(|_| None).collect(),
        }
    }

    /// Applies one update to `params` using their `.grad()`, which the caller
    /// has already averaged over the global batch. Parameters without a
    /// gradient are skipped.
    pub fn step(&mut self, params: &[Tensor]) -> Result<(), tch::TchError> {
        if params.len() != self.first.len() {
            return Err(tch::TchError::Shape(format!(
                "optimizer holds state for {} parameters, step got {}",
                self.first.len(),
                params.len()
            )));
        }
        self.steps += 1;
        let t = self.steps as f64;
        tch::no_grad(|| {
            for (i, p) in params.iter().enumerate() {
                let grad = p.grad();
                if !grad.defined() {
                    continue;
                }
                match self.spec {
                    OptimizerSpec::Sgd { momentum, nesterov } => {
                        let mut g = grad;
                        if self.weight_decay != 0.0 {
                            g = g + p * self.weight_decay;
                        }
                        if momentum != 0.0 {
                            let buf = match self.first[i].take() {
                                None => g.copy(),
                                Some(buf) => buf * momentum + &g,
                            };
                            g = if nesterov {
                                g + &buf * momentum
                            } else {
                                buf.shallow_clone()
                            };
                            self.first[i] = Some(buf);
                        }
                        let mut p = p.shallow_clone();
                        let _ = p.f_sub_(&(g * self.lr))?;
                    }
                    OptimizerSpec::Adam { beta1, beta2, eps }
                    | OptimizerSpec::AdamW { beta1, beta2, eps } => {
                        let decoupled = matches!(self.spec, OptimizerSpec::AdamW { .. });
                        let mut p = p.shallow_clone();
                        let mut g = grad;
                        if self.weight_decay != 0.0 {
                            if decoupled {
                                let _ = p.f_mul_scalar_(1.0 - self.lr * self.weight_decay)?;
                            } else {
                                g = g + &p * self.weight_decay;
                            }
                        }
                        let m = match self.first[i].take() {
                            None => &g * (1.0 - beta1),
                            Some(m) => m * beta1 + &g * (1.0 - beta1),
                        };
                        let v = match self.second[i].take() {
                            None => (&g * &g) * (1.0 - beta2),
                            Some(v) => v * beta2 + (&g * &g) * (1.0 - beta2),
                        };
                        let bias1 = 1.0 - beta1.powf(t);
                        let bias2 = 1.0 - beta2.powf(t);
                        let denom = (&v / bias2).sqrt() + eps;
                        let update = (&m / bias1) / denom * self.lr;
                        let _ = p.f_sub_(&update)?;
                        self.first[i] = Some(m);
                        self.second[i] = Some(v);
                    }
                }
            }
            Ok(())
        })
    }
}
