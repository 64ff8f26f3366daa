//! Learning-rate schedules (`train.lr_schedule` and its keys): the rate of
//! each optimizer step is a pure function of the step and the run's length,
//! so a resumed or re-formed run needs no schedule state, and W workers use
//! the same rate at the same step.

use serde::{Deserialize, Serialize};

/// The shape of the rate after warm-up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    /// `learning_rate` throughout.
    #[default]
    Constant,
    /// `learning_rate · gamma^⌊t / step_every⌋`, `t` the steps after warm-up
    /// (PyTorch's `StepLR`).
    Step,
    /// From `learning_rate` down to `final_learning_rate` in a straight line
    /// over the steps after warm-up.
    Linear,
    /// From `learning_rate` down to `final_learning_rate` along half a cosine
    /// (PyTorch's `CosineAnnealingLR` with `T_max` the steps after warm-up).
    Cosine,
}

/// A learning-rate schedule, with optional linear warm-up.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    #[serde(default)]
    pub kind: ScheduleKind,
    /// Steps whose rate rises linearly to `learning_rate`: step `s` (from 0)
    /// of them uses `learning_rate · (s + 1) / warmup_steps`.
    #[serde(default)]
    pub warmup_steps: u64,
    /// `step`: steps between decays.
    #[serde(default)]
    pub step_every: Option<u64>,
    /// `step`: the factor of each decay.
    #[serde(default = "default_gamma")]
    pub gamma: f64,
    /// `linear`, `cosine`: the rate the schedule ends at.
    #[serde(default)]
    pub final_learning_rate: f64,
}

/// Default of `train.lr_gamma`.
pub const DEFAULT_GAMMA: f64 = 0.1;

fn default_gamma() -> f64 {
    DEFAULT_GAMMA
}

impl Default for LrSchedule {
    /// A constant rate, no warm-up.
    fn default() -> Self {
        LrSchedule {
            kind: ScheduleKind::Constant,
            warmup_steps: 0,
            step_every: None,
            gamma: DEFAULT_GAMMA,
            final_learning_rate: 0.0,
        }
    }
}

impl LrSchedule {
    /// The rate of optimizer step `step` (0-based: the steps completed
    /// before it) of a run of `total` steps whose peak rate is `base`.
    pub fn rate(&self, base: f64, step: u64, total: u64) -> f64 {
        if step < self.warmup_steps {
            return base * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let t = step - self.warmup_steps;
        let span = total.saturating_sub(self.warmup_steps).max(1);
        let progress = (t as f64 / span as f64).min(1.0);
        let end = self.final_learning_rate;
        match self.kind {
            ScheduleKind::Constant => base,
            ScheduleKind::Step => {
                let decays = t / self.step_every.unwrap_or(u64::MAX).max(1);
                base * self.gamma.powf(decays as f64)
            }
            ScheduleKind::Linear => end + (base - end) * (1.0 - progress),
            ScheduleKind::Cosine => {
                end + (base - end) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }

    /// One line for checkpoints' `state.json` and logs.
    pub fn describe(&self, base: f64) -> String {
        let kind = match self.kind {
            ScheduleKind::Constant => format!("constant {base}"),
            ScheduleKind::Step => format!(
                "step {base} x {} every {} steps",
                self.gamma,
                self.step_every.unwrap_or(0)
            ),
            ScheduleKind::Linear => format!("linear {base} to {}", self.final_learning_rate),
            ScheduleKind::Cosine => format!("cosine {base} to {}", self.final_learning_rate),
        };
        if self.warmup_steps > 0 {
            format!("{kind}, linear warm-up over {} steps", self.warmup_steps)
        } else {
            kind
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 * a.abs().max(b.abs()).max(1.0)
    }

    #[test]
    fn warmup_rises_to_the_peak_then_each_kind_takes_over() {
        let s = |kind, warmup| LrSchedule {
            kind,
            warmup_steps: warmup,
            step_every: Some(10),
            gamma: 0.5,
            final_learning_rate: 0.01,
        };
        let w = s(ScheduleKind::Constant, 4);
        let rates: Vec<f64> = (0..6).map(|k| w.rate(0.1, k, 100)).collect();
        assert!(close(rates[0], 0.025) && close(rates[3], 0.1) && close(rates[5], 0.1));

        let step = s(ScheduleKind::Step, 0);
        assert!(close(step.rate(0.1, 9, 100), 0.1));
        assert!(close(step.rate(0.1, 10, 100), 0.05));
        assert!(close(step.rate(0.1, 25, 100), 0.025));

        let lin = s(ScheduleKind::Linear, 10);
        assert!(close(lin.rate(0.1, 10, 110), 0.1));
        assert!(close(lin.rate(0.1, 60, 110), 0.055));
        assert!(close(lin.rate(0.1, 110, 110), 0.01));

        let cos = s(ScheduleKind::Cosine, 0);
        assert!(close(cos.rate(0.1, 0, 100), 0.1));
        assert!(close(cos.rate(0.1, 50, 100), 0.055));
        assert!(close(cos.rate(0.1, 100, 100), 0.01));
        // Past the end (a run extended on resume) the rate stays at the end.
        assert!(close(cos.rate(0.1, 500, 100), 0.01));
    }

    #[test]
    fn cosine_matches_pytorchs_closed_form() {
        // torch.optim.lr_scheduler.CosineAnnealingLR's closed form:
        // eta_min + (base - eta_min) * (1 + cos(pi * t / T_max)) / 2.
        let cos = LrSchedule {
            kind: ScheduleKind::Cosine,
            final_learning_rate: 0.001,
            ..LrSchedule::default()
        };
        for t in 0..=40 {
            let expected = 0.001
                + (0.2 - 0.001) * (1.0 + (std::f64::consts::PI * t as f64 / 40.0).cos()) / 2.0;
            assert!(close(cos.rate(0.2, t, 40), expected), "step {t}");
        }
    }
}
