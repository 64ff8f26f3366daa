//! The scores of one evaluation, from sums every rank adds up over its slice
//! of the validation set (the sums are all-reduced, so every rank gets the
//! same figures), and `eval.json`, the file rank 0 writes in the job's output
//! folder after each evaluation.
//!
//! Classification: accuracy, per-class precision, recall and F1, macro-F1
//! and the confusion matrix, from counts. Regression: MSE, MAE and R² per
//! target and averaged uniformly over the targets (scikit-learn's default
//! `multioutput="uniform_average"`), from per-target sums of squared and
//! absolute errors and of the targets. R²'s total sum of squares is not
//! taken as `Σy² - (Σy)²/n`, which cancels catastrophically in f32 (the
//! collective's type) when the targets' mean is large beside their spread:
//! each rank keeps its own centred sum of squares, and a second all-reduce
//! adds the between-rank term `n_r·(m_r - ȳ)²` once the global mean is known.
//! Language model: the loss (mean per token) and its `exp`, the perplexity.

use super::TrainError;
use serde::Serialize;
use std::path::Path;
use tch::{Kind, Tensor};

/// Above this many classes the confusion matrix (classes² counts) is not
/// kept; per-class figures still are.
pub(super) const MAX_CONFUSION_CLASSES: i64 = 1024;

/// Counts gathered over validation chunks on one rank.
pub(super) struct Counts {
    classes: i64,
    /// `actual · classes + predicted` cells, or with many classes three
    /// rows: true positives, predicted, actual per class.
    cells: Tensor,
    pub loss_sum: f64,
}

impl Counts {
    pub fn new(classes: u32, device: tch::Device) -> Result<Counts, TrainError> {
        let k = i64::from(classes);
        let len = if k <= MAX_CONFUSION_CLASSES {
            k * k
        } else {
            3 * k
        };
        Ok(Counts {
            classes: k,
            cells: Tensor::f_zeros([len], (Kind::Int64, device))?,
            loss_sum: 0.0,
        })
    }

    /// Adds a chunk's predictions (`logits` argmax) against labels `y`.
    pub fn add(&mut self, logits: &Tensor, y: &Tensor) -> Result<(), TrainError> {
        let k = self.classes;
        let pred = logits.f_argmax(-1, false)?;
        if k <= MAX_CONFUSION_CLASSES {
            let cell = y.f_mul_scalar(k)?.f_add(&pred)?;
            self.cells = self.cells.f_add(&cell.f_bincount::<Tensor>(None, k * k)?)?;
        } else {
            let hits = y.f_masked_select(&y.f_eq_tensor(&pred)?)?;
            let rows = [
                hits.f_bincount::<Tensor>(None, k)?,
                pred.f_bincount::<Tensor>(None, k)?,
                y.f_bincount::<Tensor>(None, k)?,
            ];
            self.cells = self.cells.f_add(&Tensor::f_cat(&rows, 0)?)?;
        }
        Ok(())
    }

    /// The loss sum and the counts as one f32 vector for the all-reduce
    /// (f32 holds each count exactly up to 2^24).
    pub fn to_reduce(&self) -> Result<Tensor, TrainError> {
        let loss = Tensor::f_from_slice(&[self.loss_sum as f32])?;
        let cells = self
            .cells
            .f_to_kind(Kind::Float)?
            .f_to_device(tch::Device::Cpu)?;
        Ok(Tensor::f_cat(&[loss, cells], 0)?)
    }
}

/// Per-target sums gathered over validation chunks on one rank.
pub(super) struct RegressionSums {
    k: usize,
    pub loss_sum: f64,
    n: u64,
    /// Per target: squared errors, absolute errors, targets, and the sum of
    /// squared deviations from this rank's own mean of the targets.
    sse: Vec<f64>,
    sae: Vec<f64>,
    sum_y: Vec<f64>,
    m2: Vec<f64>,
}

/// A `[n, k]` tensor's column sums as f64 on the host.
fn column_sums(t: &Tensor) -> Result<Vec<f64>, TrainError> {
    let sums = t
        .f_sum_dim_intlist(Some(&[0i64][..]), false, Kind::Double)?
        .f_to_device(tch::Device::Cpu)?;
    Ok(Vec::<f64>::try_from(sums)?)
}

impl RegressionSums {
    pub fn new(targets: usize) -> RegressionSums {
        RegressionSums {
            k: targets,
            loss_sum: 0.0,
            n: 0,
            sse: vec![0.0; targets],
            sae: vec![0.0; targets],
            sum_y: vec![0.0; targets],
            m2: vec![0.0; targets],
        }
    }

    /// Adds a chunk's predictions `pred` against targets `y`, both `[n, k]`.
    pub fn add(&mut self, pred: &Tensor, y: &Tensor) -> Result<(), TrainError> {
        let n = y.size().first().copied().unwrap_or(0) as u64;
        if n == 0 {
            return Ok(());
        }
        let y = y.f_to_kind(Kind::Double)?;
        let diff = pred.f_to_kind(Kind::Double)?.f_sub(&y)?;
        let sse = column_sums(&diff.f_square()?)?;
        let sae = column_sums(&diff.f_abs()?)?;
        let sum_y = column_sums(&y)?;
        let mean = y.f_mean_dim(Some(&[0i64][..]), true, Kind::Double)?;
        let m2 = column_sums(&y.f_sub(&mean)?.f_square()?)?;
        // Chan et al.'s merge of two centred sums of squares.
        let (na, nb) = (self.n as f64, n as f64);
        for j in 0..self.k {
            let delta = sum_y[j] / nb - if na > 0.0 { self.sum_y[j] / na } else { 0.0 };
            self.m2[j] += m2[j] + delta * delta * na * nb / (na + nb);
            self.sse[j] += sse[j];
            self.sae[j] += sae[j];
            self.sum_y[j] += sum_y[j];
        }
        self.n += n;
        Ok(())
    }

    /// The first all-reduce: `[loss, sse, sae, Σy, m2]` (`1 + 4k` values).
    pub fn to_reduce(&self) -> Result<Tensor, TrainError> {
        let mut v = vec![self.loss_sum as f32];
        for part in [&self.sse, &self.sae, &self.sum_y, &self.m2] {
            v.extend(part.iter().map(|&x| x as f32));
        }
        Ok(Tensor::f_from_slice(&v)?)
    }

    /// The second all-reduce: per target `n_r·(m_r - ȳ)²`, this rank's
    /// share of the total sum of squares beyond its own centred sum, from
    /// the first reduce's result over `samples` validation samples.
    pub fn between(&self, first: &[f32], samples: u64) -> Result<Tensor, TrainError> {
        let n = samples.max(1) as f64;
        let sum_y = &first[1 + 2 * self.k..1 + 3 * self.k];
        let v: Vec<f32> = (0..self.k)
            .map(|j| {
                if self.n == 0 {
                    return 0.0;
                }
                let mine = self.sum_y[j] / self.n as f64;
                let all = f64::from(sum_y[j]) / n;
                (self.n as f64 * (mine - all).powi(2)) as f32
            })
            .collect();
        Ok(Tensor::f_from_slice(&v)?)
    }
}

/// A regression evaluation's scores, as written to `eval.json`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RegressionScores {
    pub step: u64,
    pub samples: u64,
    pub loss: f64,
    /// Means over the targets of the per-target figures below.
    pub mse: f64,
    pub mae: f64,
    pub r2: f64,
    /// How `r2` (and `mse`, `mae`) combine the targets.
    pub average: &'static str,
    pub targets: Vec<TargetScores>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TargetScores {
    pub target: usize,
    pub mse: f64,
    pub mae: f64,
    /// `1 - SS_res / SS_tot`; as scikit-learn, 1 when both are 0 and 0 when
    /// only `SS_tot` is (constant targets).
    pub r2: f64,
}

impl RegressionScores {
    /// Scores from the two all-reduced vectors of [`RegressionSums`] over
    /// `samples` validation samples of `k` targets.
    pub fn from_reduced(
        first: &[f32],
        between: &[f32],
        k: usize,
        samples: u64,
        step: u64,
    ) -> RegressionScores {
        let n = samples.max(1) as f64;
        let col = |part: usize, j: usize| f64::from(first[1 + part * k + j]);
        let targets: Vec<TargetScores> = (0..k)
            .map(|j| {
                let sse = col(0, j);
                let sst = col(3, j) + f64::from(between[j]);
                let r2 = if sst > 0.0 {
                    1.0 - sse / sst
                } else if sse == 0.0 {
                    1.0
                } else {
                    0.0
                };
                TargetScores {
                    target: j,
                    mse: sse / n,
                    mae: col(1, j) / n,
                    r2,
                }
            })
            .collect();
        let mean = |f: fn(&TargetScores) -> f64| {
            targets.iter().map(f).sum::<f64>() / targets.len().max(1) as f64
        };
        RegressionScores {
            step,
            samples,
            loss: f64::from(first[0]) / n,
            mse: mean(|t| t.mse),
            mae: mean(|t| t.mae),
            r2: mean(|t| t.r2),
            average: "uniform over targets (scikit-learn's multioutput=\"uniform_average\")",
            targets,
        }
    }
}

/// One evaluation's scores, of either task.
#[derive(Clone, Debug, PartialEq)]
pub enum Evaluation {
    Classification(Scores),
    Regression(RegressionScores),
    LanguageModel(LmScores),
}

/// A language model's evaluation, as written to `eval.json`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LmScores {
    pub step: u64,
    pub samples: u64,
    /// Tokens predicted: samples × context.
    pub tokens: u64,
    /// Next-token cross entropy, mean per token (nats).
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
}

impl LmScores {
    /// Scores from the all-reduced sum of per-sample losses (each the mean
    /// over its `context` positions) of `samples` validation samples.
    pub fn from_loss_sum(loss_sum: f64, samples: u64, context: usize, step: u64) -> LmScores {
        let loss = loss_sum / samples.max(1) as f64;
        LmScores {
            step,
            samples,
            tokens: samples * context as u64,
            loss,
            perplexity: loss.exp(),
        }
    }
}

impl Evaluation {
    /// The run metrics this evaluation reports (`val_*`).
    pub fn metrics(&self) -> Vec<(&'static str, f64)> {
        match self {
            Evaluation::Classification(s) => vec![
                ("val_loss", s.loss),
                ("val_accuracy", s.accuracy),
                ("val_macro_f1", s.macro_f1),
            ],
            Evaluation::Regression(s) => vec![
                ("val_loss", s.loss),
                ("val_mse", s.mse),
                ("val_mae", s.mae),
                ("val_r2", s.r2),
            ],
            Evaluation::LanguageModel(s) => {
                vec![("val_loss", s.loss), ("val_perplexity", s.perplexity)]
            }
        }
    }

    /// The scores as `eval.json` holds them.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Evaluation::Classification(s) => serde_json::to_value(s),
            Evaluation::Regression(s) => serde_json::to_value(s),
            Evaluation::LanguageModel(s) => serde_json::to_value(s),
        }
        .unwrap_or(serde_json::Value::Null)
    }

    /// Writes `<dir>/eval.json`.
    pub fn write(&self, dir: &Path) -> Result<(), TrainError> {
        match self {
            Evaluation::Classification(s) => write_json(s, dir),
            Evaluation::Regression(s) => write_json(s, dir),
            Evaluation::LanguageModel(s) => write_json(s, dir),
        }
    }
}

/// Writes `<dir>/eval.json` through a temporary file and a rename.
fn write_json(value: &impl Serialize, dir: &Path) -> Result<(), TrainError> {
    let path = dir.join("eval.json");
    let tmp = dir.join(".eval.json.tmp");
    let err = |p: &Path| {
        let p = p.display().to_string();
        move |source| TrainError::Output { path: p, source }
    };
    let json = serde_json::to_vec_pretty(value).map_err(|e| TrainError::Output {
        path: path.display().to_string(),
        source: e.into(),
    })?;
    std::fs::create_dir_all(dir).map_err(err(dir))?;
    std::fs::write(&tmp, json).map_err(err(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(err(&path))
}

/// One evaluation's scores, as written to `eval.json`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Scores {
    pub step: u64,
    pub samples: u64,
    pub loss: f64,
    pub accuracy: f64,
    /// Mean F1 over the classes that occur as a label or a prediction
    /// (scikit-learn's `average="macro"`).
    pub macro_f1: f64,
    pub classes: Vec<ClassScores>,
    /// `confusion[actual][predicted]`, up to [`MAX_CONFUSION_CLASSES`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub confusion: Option<Vec<Vec<u64>>>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ClassScores {
    pub class: u32,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    /// Samples whose label is this class.
    pub support: u64,
}

impl Scores {
    /// Scores from the all-reduced vector of [`Counts::to_reduce`] over
    /// `samples` validation samples of `classes` classes.
    pub fn from_reduced(reduced: &[f32], classes: u32, samples: u64, step: u64) -> Scores {
        let k = classes as usize;
        let cells: Vec<u64> = reduced[1..].iter().map(|&c| c.max(0.0) as u64).collect();
        let (tp, predicted, actual, confusion) = if k as i64 <= MAX_CONFUSION_CLASSES {
            let rows: Vec<Vec<u64>> = cells.chunks(k).map(<[u64]>::to_vec).collect();
            let tp = (0..k).map(|c| rows[c][c]).collect::<Vec<_>>();
            let predicted = (0..k).map(|c| rows.iter().map(|r| r[c]).sum()).collect();
            let actual = rows.iter().map(|r| r.iter().sum()).collect();
            (tp, predicted, actual, Some(rows))
        } else {
            (
                cells[..k].to_vec(),
                cells[k..2 * k].to_vec(),
                cells[2 * k..3 * k].to_vec(),
                None,
            )
        };
        let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        let mut per_class = Vec::with_capacity(k);
        let (mut f1_sum, mut present) = (0.0, 0usize);
        for c in 0..k {
            let precision = ratio(tp[c], predicted[c]);
            let recall = ratio(tp[c], actual[c]);
            let f1 = if precision + recall > 0.0 {
                2.0 * precision * recall / (precision + recall)
            } else {
                0.0
            };
            if actual[c] > 0 || predicted[c] > 0 {
                f1_sum += f1;
                present += 1;
            }
            per_class.push(ClassScores {
                class: c as u32,
                precision,
                recall,
                f1,
                support: actual[c],
            });
        }
        let n = samples.max(1) as f64;
        Scores {
            step,
            samples,
            loss: f64::from(reduced[0]) / n,
            accuracy: tp.iter().sum::<u64>() as f64 / n,
            macro_f1: if present == 0 {
                0.0
            } else {
                f1_sum / present as f64
            },
            classes: per_class,
            confusion,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Splits the samples `y_true`/`y_pred` (`[n, k]`, row-major) over
    /// `ranks` ranks as the trainer does, each rank in chunks of `chunk`,
    /// reduces the sums as the ring would and returns the scores.
    fn regression(
        y_true: &[f32],
        y_pred: &[f32],
        k: usize,
        ranks: u32,
        chunk: usize,
    ) -> RegressionScores {
        let n = y_true.len() / k;
        let mut parts: Vec<RegressionSums> = Vec::new();
        for r in 0..ranks {
            let range = ringmaster_dataset::rank_range(0..n as u64, r, ranks);
            let mut sums = RegressionSums::new(k);
            let mut start = range.start as usize;
            while start < range.end as usize {
                let stop = (start + chunk).min(range.end as usize);
                let rows = (stop - start) as i64;
                let t = Tensor::from_slice(&y_true[start * k..stop * k]).view([rows, k as i64]);
                let p = Tensor::from_slice(&y_pred[start * k..stop * k]).view([rows, k as i64]);
                sums.add(&p, &t).unwrap();
                start = stop;
            }
            parts.push(sums);
        }
        let reduce = |ts: Vec<Tensor>| -> Vec<f32> {
            let total = ts.into_iter().reduce(|a, b| a + b).unwrap();
            Vec::<f32>::try_from(total).unwrap()
        };
        let first = reduce(parts.iter().map(|p| p.to_reduce().unwrap()).collect());
        let between = reduce(
            parts
                .iter()
                .map(|p| p.between(&first, n as u64).unwrap())
                .collect(),
        );
        RegressionScores::from_reduced(&first, &between, k, n as u64, 7)
    }

    #[track_caller]
    fn close(got: f64, want: f64) {
        assert!((got - want).abs() < 1e-6, "{got} != {want}");
    }

    /// scikit-learn 1.9.1: for y_true = [[0.5, 1], [-1, 1], [7, -6]] and
    /// y_pred = [[0, 2], [-1, 2], [8, -5]], `r2_score` = 0.9368005266622779
    /// (per target 0.96543779, 0.90816327), `mean_squared_error` =
    /// 0.7083333333333334, `mean_absolute_error` = 0.75; and
    /// `r2_score([3, -0.5, 2, 7], [2.5, 0, 2, 8])` = 0.9486081370449679.
    #[test]
    fn regression_scores_match_scikit_learn_however_split() {
        let y_true = [0.5f32, 1.0, -1.0, 1.0, 7.0, -6.0];
        let y_pred = [0.0f32, 2.0, -1.0, 2.0, 8.0, -5.0];
        for (ranks, chunk) in [(1, 10), (1, 1), (2, 1), (3, 2), (4, 1)] {
            let s = regression(&y_true, &y_pred, 2, ranks, chunk);
            close(s.r2, 0.9368005266622779);
            close(s.mse, 0.7083333333333334);
            close(s.mae, 0.75);
            close(s.targets[0].r2, 0.96543779);
            close(s.targets[1].r2, 0.90816327);
            assert_eq!((s.samples, s.step), (3, 7));
        }
        let s = regression(&[3.0, -0.5, 2.0, 7.0], &[2.5, 0.0, 2.0, 8.0], 1, 2, 1);
        close(s.r2, 0.9486081370449679);
        close(s.mse, 0.375);
        close(s.mae, 0.5);
        // Constant targets: 1 when predicted exactly, else 0 (scikit-learn's
        // `r2_score([[1, 2], [1, 3]], [[1, 2.5], [1, 2.5]])` = 0.5).
        let s = regression(&[1.0, 2.0, 1.0, 3.0], &[1.0, 2.5, 1.0, 2.5], 2, 2, 1);
        close(s.r2, 0.5);
    }

    #[test]
    fn r2_keeps_its_precision_when_the_mean_dwarfs_the_spread() {
        // Targets 1e4 + {-1, 0, 1, 2}: Σy² - (Σy)²/n in f32 would lose
        // every digit of SS_tot = 5.
        let y_true = [9999.0f32, 10000.0, 10001.0, 10002.0];
        let y_pred = [9999.5f32, 10000.0, 10001.0, 10001.5];
        let s = regression(&y_true, &y_pred, 1, 2, 1);
        close(s.r2, 1.0 - 0.5 / 5.0);
    }

    /// The figures scikit-learn's `classification_report` gives for
    /// y_true = [0, 0, 1, 1, 2, 2, 2], y_pred = [0, 1, 1, 1, 2, 0, 2].
    #[test]
    fn scores_match_scikit_learn_on_a_small_case() {
        let truth = [0i64, 0, 1, 1, 2, 2, 2];
        let logits: Vec<f32> = [0usize, 1, 1, 1, 2, 0, 2]
            .iter()
            .flat_map(|&p| (0..3).map(move |c| if c == p { 1.0 } else { 0.0 }))
            .collect();
        for split in [false, true] {
            let mut counts = Counts::new(3, tch::Device::Cpu).unwrap();
            let x = Tensor::from_slice(&logits).view([7, 3]);
            let y = Tensor::from_slice(&truth);
            if split {
                counts.add(&x.narrow(0, 0, 3), &y.narrow(0, 0, 3)).unwrap();
                counts.add(&x.narrow(0, 3, 4), &y.narrow(0, 3, 4)).unwrap();
            } else {
                counts.add(&x, &y).unwrap();
            }
            counts.loss_sum = 3.5;
            let mut v = vec![0f32; 10];
            counts.to_reduce().unwrap().copy_data(&mut v, 10);
            let s = Scores::from_reduced(&v, 3, 7, 40);
            assert_eq!(
                s.confusion,
                Some(vec![vec![1, 1, 0], vec![0, 2, 0], vec![1, 0, 2]])
            );
            assert!((s.accuracy - 5.0 / 7.0).abs() < 1e-12);
            assert!((s.loss - 0.5).abs() < 1e-12);
            let p: Vec<f64> = s.classes.iter().map(|c| c.precision).collect();
            let r: Vec<f64> = s.classes.iter().map(|c| c.recall).collect();
            assert_eq!(p, [0.5, 2.0 / 3.0, 1.0]);
            assert_eq!(r, [0.5, 1.0, 2.0 / 3.0]);
            // f1: 0.5, 0.8, 0.8; macro 0.7.
            assert!((s.macro_f1 - 0.7).abs() < 1e-12, "{}", s.macro_f1);
            assert_eq!(s.classes[2].support, 3);
        }
    }

    #[test]
    fn many_classes_keep_per_class_counts_without_the_matrix() {
        let k = (MAX_CONFUSION_CLASSES + 6) as u32;
        let mut counts = Counts::new(k, tch::Device::Cpu).unwrap();
        // Labels 5, 5, 1029; predictions 5, 7, 1029.
        let mut logits = vec![0f32; 3 * k as usize];
        logits[5] = 1.0;
        logits[k as usize + 7] = 1.0;
        logits[2 * k as usize + 1029] = 1.0;
        let x = Tensor::from_slice(&logits).view([3, i64::from(k)]);
        counts
            .add(&x, &Tensor::from_slice(&[5i64, 5, 1029]))
            .unwrap();
        let n = 1 + 3 * k as usize;
        let mut v = vec![0f32; n];
        counts.to_reduce().unwrap().copy_data(&mut v, n);
        let s = Scores::from_reduced(&v, k, 3, 1);
        assert!(s.confusion.is_none());
        assert_eq!((s.classes[5].precision, s.classes[5].recall), (1.0, 0.5));
        assert_eq!(s.classes[7].precision, 0.0);
        assert_eq!(s.classes[1029].f1, 1.0);
        // Classes 5, 7 and 1029 occur: (2/3 + 0 + 1) / 3.
        assert!((s.macro_f1 - (2.0 / 3.0 + 1.0) / 3.0).abs() < 1e-12);
    }
}
