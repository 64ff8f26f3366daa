//! Classification scores of one evaluation: accuracy, per-class precision,
//! recall and F1, macro-F1 and the confusion matrix, from counts every rank
//! adds up over its slice of the validation set (the sums are all-reduced,
//! so every rank gets the same figures), and `eval.json`, the file rank 0
//! writes in the job's output folder after each evaluation.

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

    /// Writes `<dir>/eval.json` through a temporary file and a rename.
    pub fn write(&self, dir: &Path) -> Result<(), TrainError> {
        let path = dir.join("eval.json");
        let tmp = dir.join(".eval.json.tmp");
        let err = |p: &Path| {
            let p = p.display().to_string();
            move |source| TrainError::Output { path: p, source }
        };
        let json = serde_json::to_vec_pretty(self).map_err(|e| TrainError::Output {
            path: path.display().to_string(),
            source: e.into(),
        })?;
        std::fs::create_dir_all(dir).map_err(err(dir))?;
        std::fs::write(&tmp, json).map_err(err(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(err(&path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
