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

    /// Sets the learning rate of the next steps (a schedule moves it; the
    /// state does not depend on it, so nothing else changes).
    pub fn set_learning_rate(&mut self, lr: f64) {
        self.lr = lr;
    }

    /// The learning rate of the next step.
    pub fn learning_rate(&self) -> f64 {
        self.lr
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
                let grad = p.f_grad()?;
                if !grad.defined() {
                    continue;
                }
                match self.spec {
                    OptimizerSpec::Sgd { momentum, nesterov } => {
                        let mut g = grad;
                        if self.weight_decay != 0.0 {
                            g = g.f_add(&p.f_mul_scalar(self.weight_decay)?)?;
                        }
                        if momentum != 0.0 {
                            // In place: the buffer is updated without a new
                            // allocation of the parameter's size.
                            let buf = match self.first[i].take() {
                                // A copy, never the gradient itself: gradients are views
                                // into buckets that the next step overwrites.
                                None => g.f_detach_copy()?,
                                Some(mut buf) => {
                                    let _ = buf.f_mul_scalar_(momentum)?;
                                    let _ = buf.f_add_(&g)?;
                                    buf
                                }
                            };
                            g = if nesterov {
                                g.f_add(&buf.f_mul_scalar(momentum)?)?
                            } else {
                                buf.shallow_clone()
                            };
                            self.first[i] = Some(buf);
                        }
                        let mut p = p.shallow_clone();
                        let _ = p.f_sub_(&g.f_mul_scalar(self.lr)?)?;
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
                                g = g.f_add(&p.f_mul_scalar(self.weight_decay)?)?;
                            }
                        }
                        let mut m = match self.first[i].take() {
                            Some(m) => m,
                            None => g.f_zeros_like()?,
                        };
                        let _ = m.f_mul_scalar_(beta1)?;
                        let _ = m.f_add_(&g.f_mul_scalar(1.0 - beta1)?)?;
                        let mut v = match self.second[i].take() {
                            Some(v) => v,
                            None => g.f_zeros_like()?,
                        };
                        let _ = v.f_mul_scalar_(beta2)?;
                        let _ = v.f_addcmul_(&g, &g.f_mul_scalar(1.0 - beta2)?)?;
                        let bias1 = 1.0 - beta1.powf(t);
                        let bias2 = 1.0 - beta2.powf(t);
                        let mut denom = v.f_mul_scalar(1.0 / bias2)?;
                        let _ = denom.f_sqrt_()?;
                        let _ = denom.f_add_scalar_(eps)?;
                        let mut update = m.f_mul_scalar(self.lr / bias1)?;
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

/// The names under which a parameter's optimizer state is checkpointed,
/// following PyTorch's state names.
fn state_names(spec: &OptimizerSpec) -> (&'static str, Option<&'static str>) {
    match spec {
        OptimizerSpec::Sgd { .. } => ("momentum_buffer", None),
        OptimizerSpec::Adam { .. } | OptimizerSpec::AdamW { .. } => ("exp_avg", Some("exp_avg_sq")),
    }
}

impl Optimizer {
    /// Number of steps taken (Adam's bias correction depends on it).
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Every state tensor as `<param name>.<state name>`, for checkpoints.
    /// `names` are the parameter names in the order `step` receives them.
    pub fn state_tensors(&self, names: &[String]) -> Vec<(String, Tensor)> {
        let (first, second) = state_names(&self.spec);
        let mut out = Vec::new();
        for (i, name) in names.iter().enumerate() {
            if let Some(Some(t)) = self.first.get(i) {
                out.push((format!("{name}.{first}"), t.shallow_clone()));
            }
            if let (Some(second), Some(Some(t))) = (second, self.second.get(i)) {
                out.push((format!("{name}.{second}"), t.shallow_clone()));
            }
        }
        out
    }

    /// Restores what [`Optimizer::state_tensors`] saved. Missing entries mean
    /// "no state yet" (e.g. SGD without momentum); unexpected ones are an
    /// error so a checkpoint of another optimizer is not silently misread.
    pub fn load_state(
        &mut self,
        names: &[String],
        mut tensors: std::collections::HashMap<String, Tensor>,
        steps: u64,
        device: tch::Device,
    ) -> Result<(), String> {
        if names.len() != self.first.len() {
            return Err(format!(
                "optimizer has {} parameters, checkpoint names {}",
                self.first.len(),
                names.len()
            ));
        }
        let (first, second) = state_names(&self.spec);
        let mut take = |key: String| -> Result<Option<Tensor>, String> {
            tensors
                .remove(&key)
                .map(|t| t.f_to_device(device))
                .transpose()
                .map_err(|e| {
                    format!(
                        "moving `{key}` to the device: {}",
                        crate::model::torch_message(&e)
                    )
                })
        };
        let mut loaded = Vec::with_capacity(names.len());
        for name in names {
            let a = take(format!("{name}.{first}"))?;
            let b = match second {
                Some(second) => take(format!("{name}.{second}"))?,
                None => None,
            };
            loaded.push((a, b));
        }
        for (i, (a, b)) in loaded.into_iter().enumerate() {
            self.first[i] = a;
            self.second[i] = b;
        }
        if let Some(extra) = tensors.keys().next() {
            return Err(format!(
                "optimizer state `{extra}` does not belong to this optimizer"
            ));
        }
        self.steps = steps;
        Ok(())
    }
}
