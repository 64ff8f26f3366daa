//! The training objective of a job's `[task]`: cross entropy (with label
//! smoothing) for classification; mean squared error, mean absolute error
//! or Huber for regression. Each returns the *sum* of per-sample losses over
//! a batch, which the trainer adds over micro-batches and ranks and divides
//! by the global batch's sample count, so W workers compute the same step as
//! one (the step contract in `run.rs`). A regression sample's loss is the
//! mean of its `k` element losses, so that sum divided by the global count
//! is exactly PyTorch's `F.mse_loss` / `F.l1_loss` / `F.huber_loss` with
//! `reduction="mean"` over the global batch. A language model's sample loss
//! is the mean over its `T` positions of the next-token cross entropy, so the
//! same division gives `F.cross_entropy` averaged over every token of the
//! global batch. Evaluation scores live in `evaluation.rs`.

use super::TrainError;
use ringmaster_common::jobspec::{RegressionLoss, TaskSpec};
use tch::{Reduction, Tensor};

/// A job's loss, from its `[task]`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Loss {
    CrossEntropy { label_smoothing: f64 },
    Regression(RegressionLoss),
    NextToken,
}

impl Loss {
    pub fn of(task: &TaskSpec) -> Loss {
        match *task {
            TaskSpec::Classification { label_smoothing } => Loss::CrossEntropy { label_smoothing },
            TaskSpec::Regression { loss } => Loss::Regression(loss),
            TaskSpec::LanguageModel => Loss::NextToken,
        }
    }

    /// Sum over the batch of the per-sample losses of model outputs `out`
    /// (`[n, C]` logits, `[n, k]` predictions or `[n, T, V]` logits) against
    /// `y` (i64 labels `[n]`, f32 targets `[n, k]` or i64 next tokens
    /// `[n, T]`). Shapes are checked first: PyTorch's
    /// element-wise losses would broadcast `[n, 1]` against `[n]` into an
    /// `[n, n]` loss without a word.
    pub fn sum(&self, out: &Tensor, y: &Tensor) -> Result<Tensor, TrainError> {
        match *self {
            Loss::CrossEntropy { label_smoothing } => Ok(out.f_cross_entropy_loss::<Tensor>(
                y,
                None,
                Reduction::Sum,
                -100,
                label_smoothing,
            )?),
            Loss::Regression(loss) => {
                if out.size() != y.size() {
                    return Err(TrainError::Invalid(format!(
                        "the model outputs {:?} values per batch but the regression targets are \
                         {:?}: the model's output layer must have one unit per target",
                        out.size(),
                        y.size()
                    )));
                }
                let k = out.size().get(1).copied().unwrap_or(1).max(1) as f64;
                let total = match loss {
                    RegressionLoss::Mse => out.f_mse_loss(y, Reduction::Sum)?,
                    RegressionLoss::Mae => out.f_l1_loss(y, Reduction::Sum)?,
                    RegressionLoss::Huber { delta } => {
                        out.f_huber_loss(y, Reduction::Sum, delta)?
                    }
                };
                Ok(total.f_div_scalar(k)?)
            }
            Loss::NextToken => {
                let (o, t) = (out.size(), y.size());
                if o.len() != 3 || t.len() != 2 || o[..2] != t[..] {
                    return Err(TrainError::Invalid(format!(
                        "a language model must output [batch, T, vocabulary] logits for \
                         [batch, T] next tokens, got {o:?} for {t:?} (model.kind must be \
                         \"transformer\")"
                    )));
                }
                let positions = t[1].max(1) as f64;
                let total = out.f_reshape([-1, o[2]])?.f_cross_entropy_loss::<Tensor>(
                    &y.f_reshape([-1])?,
                    None,
                    Reduction::Sum,
                    -100,
                    0.0,
                )?;
                Ok(total.f_div_scalar(positions)?)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    fn value(loss: Loss, out: &[f32], out_shape: &[i64], y: &Tensor) -> f64 {
        let out = Tensor::from_slice(out).view(out_shape);
        loss.sum(&out, y).unwrap().double_value(&[])
    }

    #[track_caller]
    fn close(got: f64, want: f64) {
        assert!(
            (got - want).abs() <= 1e-6 * want.abs().max(1.0),
            "{got} != {want}"
        );
    }

    /// Predictions [[1, 2], [3, 5]] against targets [[1.5, 0], [3, 2]]:
    /// differences -0.5, 2, 0, 3. PyTorch with `reduction="mean"` over the
    /// 4 elements gives mse 3.3125, l1 1.375, huber(1.0) 1.03125,
    /// huber(2.5) 2.0; summed per sample (mean over k = 2) that is twice
    /// those.
    #[test]
    fn regression_losses_match_pytorch_formulas() {
        let y = Tensor::from_slice(&[1.5f32, 0.0, 3.0, 2.0]).view([2, 2]);
        let out = [1.0f32, 2.0, 3.0, 5.0];
        let sum = |l| value(Loss::Regression(l), &out, &[2, 2], &y);
        // mse: (0.25 + 4 + 0 + 9) / 4 = 3.3125.
        close(sum(RegressionLoss::Mse) / 2.0, 3.3125);
        // l1: (0.5 + 2 + 0 + 3) / 4 = 1.375.
        close(sum(RegressionLoss::Mae) / 2.0, 1.375);
        // huber δ=1: 0.5·0.25 = 0.125, 1·(2 - 0.5) = 1.5, 0, 1·(3 - 0.5) = 2.5
        // → 4.125 / 4 = 1.03125.
        close(sum(RegressionLoss::Huber { delta: 1.0 }) / 2.0, 1.03125);
        // huber δ=2.5: 0.125, 0.5·4 = 2, 0, 2.5·(3 - 1.25) = 4.375 → 6.5 / 4.
        close(sum(RegressionLoss::Huber { delta: 2.5 }) / 2.0, 1.625);
    }

    #[test]
    fn the_sum_over_a_split_batch_is_the_sum_over_the_whole() {
        // The contract that keeps W workers on one run: per-sample losses
        // summed, so splitting the batch only changes summation order.
        let y = Tensor::from_slice(&[0.5f32, -1.0, 2.0]).view([3, 1]);
        let out = Tensor::from_slice(&[0.0f32, 1.0, 4.0]).view([3, 1]);
        for l in [
            RegressionLoss::Mse,
            RegressionLoss::Mae,
            RegressionLoss::Huber { delta: 1.0 },
        ] {
            let loss = Loss::Regression(l);
            let whole = loss.sum(&out, &y).unwrap().double_value(&[]);
            let parts = loss.sum(&out.narrow(0, 0, 1), &y.narrow(0, 0, 1)).unwrap()
                + loss.sum(&out.narrow(0, 1, 2), &y.narrow(0, 1, 2)).unwrap();
            close(parts.double_value(&[]), whole);
        }
    }

    /// Logits [[2, 0, -1], [0.5, 0.5, 3]], labels [0, 2], 3 classes.
    /// PyTorch: `F.cross_entropy(reduction="sum")` = Σ -log softmax[label];
    /// with `label_smoothing=ε` each sample's loss is
    /// `(1 - ε)·(-log p_label) + ε/C · Σ_c -log p_c`.
    #[test]
    fn cross_entropy_with_label_smoothing_matches_pytorch_formula() {
        let logits = [2.0f32, 0.0, -1.0, 0.5, 0.5, 3.0];
        let y = Tensor::from_slice(&[0i64, 2]);
        let rows = [[2.0f64, 0.0, -1.0], [0.5, 0.5, 3.0]];
        let labels = [0usize, 2];
        let expected = |eps: f64| -> f64 {
            rows.iter()
                .zip(labels)
                .map(|(r, l)| {
                    let lse = r.iter().map(|v| v.exp()).sum::<f64>().ln();
                    let nll: Vec<f64> = r.iter().map(|v| lse - v).collect();
                    (1.0 - eps) * nll[l] + eps / 3.0 * nll.iter().sum::<f64>()
                })
                .sum()
        };
        for eps in [0.0, 0.1, 0.5] {
            let got = value(
                Loss::CrossEntropy {
                    label_smoothing: eps,
                },
                &logits,
                &[2, 3],
                &y,
            );
            close(got, expected(eps));
        }
        // Hand figure for ε = 0: -log softmax([2, 0, -1])[0] + -log softmax([.5, .5, 3])[2].
        close(expected(0.0), 0.169_846_02 + 0.152_008_38);
    }

    /// Two samples of T = 2 positions over a vocabulary of 3. Per token
    /// -log softmax(logits)[next]; a sample's loss is the mean of its two, the
    /// batch sum the sum of the samples'.
    #[test]
    fn next_token_loss_is_the_per_sample_mean_over_positions() {
        let logits = [
            2.0f32, 0.0, -1.0, // sample 0, position 0
            0.5, 0.5, 3.0, // sample 0, position 1
            0.0, 0.0, 0.0, // sample 1, position 0
            1.0, -1.0, 0.0, // sample 1, position 1
        ];
        let y = Tensor::from_slice(&[0i64, 2, 1, 1]).view([2, 2]);
        let nll = |r: [f64; 3], l: usize| r.iter().map(|v| v.exp()).sum::<f64>().ln() - r[l];
        let s0 = (nll([2.0, 0.0, -1.0], 0) + nll([0.5, 0.5, 3.0], 2)) / 2.0;
        let s1 = (nll([0.0, 0.0, 0.0], 1) + nll([1.0, -1.0, 0.0], 1)) / 2.0;
        // Hand figures: 0.169846, 0.152008; ln 3 = 1.098612; ln(e + e⁻¹ + 1) + 1 = 2.407606.
        close(s0, (0.169_846_02 + 0.152_008_38) / 2.0);
        close(s1, (1.098_612_29 + 2.407_605_96) / 2.0);
        let got = value(Loss::NextToken, &logits, &[2, 2, 3], &y);
        close(got, s0 + s1);
        // Split by sample, the sums add up: W workers compute the same step.
        let out = Tensor::from_slice(&logits).view([2, 2, 3]);
        let parts = Loss::NextToken
            .sum(&out.narrow(0, 0, 1), &y.narrow(0, 0, 1))
            .unwrap()
            + Loss::NextToken
                .sum(&out.narrow(0, 1, 1), &y.narrow(0, 1, 1))
                .unwrap();
        close(parts.double_value(&[]), s0 + s1);
        // A classifier's [n, C] output is refused, not silently reshaped.
        let flat = Tensor::zeros([2, 3], (Kind::Float, tch::Device::Cpu));
        let err = Loss::NextToken.sum(&flat, &y).unwrap_err().to_string();
        assert!(err.contains("must be \"transformer\""), "{err}");
    }

    #[test]
    fn a_model_of_the_wrong_width_is_refused_not_broadcast() {
        let loss = Loss::Regression(RegressionLoss::Mse);
        let out = Tensor::zeros([4, 1], (Kind::Float, tch::Device::Cpu));
        let y = Tensor::zeros([4, 2], (Kind::Float, tch::Device::Cpu));
        let err = loss.sum(&out, &y).unwrap_err().to_string();
        assert!(err.contains("one unit per target"), "{err}");
    }
}
