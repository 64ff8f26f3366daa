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
                            g = g.f_add(&(p * self.weight_decay))?;
                        }
                        if momentum != 0.0 {
                            // In place: the buffer is updated without a new
                            // allocation of the parameter's size.
                            let buf = match self.first[i].take() {
                                None => g.copy(),
                                Some(mut buf) => {
                                    let _ = buf.f_mul_scalar_(momentum)?;
                                    let _ = buf.f_add_(&g)?;
                                    buf
                                }
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
                                g = g.f_add(&(&p * self.weight_decay))?;
                            }
                        }
                        let mut m = match self.first[i].take() {
                            Some(m) => m,
                            None => g.zeros_like(),
                        };
                        let _ = m.f_mul_scalar_(beta1)?;
                        let _ = m.f_add_(&(&g * (1.0 - beta1)))?;
                        let mut v = match self.second[i].take() {
                            Some(v) => v,
                            None => g.zeros_like(),
                        };
                        let _ = v.f_mul_scalar_(beta2)?;
                        let _ = v.f_addcmul_(&g, &(&g * (1.0 - beta2)))?;
                        let bias1 = 1.0 - beta1.powf(t);
                        let bias2 = 1.0 - beta2.powf(t);
                        let mut denom = &v * (1.0 / bias2);
                        let _ = denom.f_sqrt_()?;
                        let _ = denom.f_add_scalar_(eps)?;
                        let mut update = &m * (self.lr / bias1);
                        let _ = update.f_div_(&denom)?;
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
