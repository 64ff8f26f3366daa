//! Windowed time series (`dataset pack --timeseries`): one numeric column of a CSV, read in
//! file order as a series, cut into samples of `window` consecutive values (features) and the
//! `horizon` values that follow them (f32 regression targets).
//!
//! The split is chronological, never shuffled: the first `1 - val_fraction` of the series is
//! the training period and the rest the validation period. No training sample has a target in
//! the validation period; a validation sample's targets all lie in it, while its inputs may
//! reach back into the training period (at forecast time the past is known). Missing values
//! are an error unless `missing` says otherwise, and fills (`mean`, `median`) use the training
//! period's values only, so nothing of the validation period leaks into training data.

use crate::manifest::LabelKind;
use crate::shards::{LabelRows, WriteOptions, write_dataset};
use crate::{DatasetError, MANIFEST_FILE, Standardization};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

/// What to do with a missing value (an empty field, `NA`, `NaN` or `null`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Missing {
    /// Refuse the file, naming the first missing value's line.
    #[default]
    Error,
    /// Leave the point out (the series closes up, so the step between values changes there).
    Drop,
    /// Replace it with the mean of the training period's values.
    Mean,
    /// Replace it with the median of the training period's values.
    Median,
}

impl std::str::FromStr for Missing {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "error" => Ok(Missing::Error),
            "drop" => Ok(Missing::Drop),
            "mean" => Ok(Missing::Mean),
            "median" => Ok(Missing::Median),
            other => Err(format!(
                "unknown --missing `{other}`, expected error, drop, mean or median"
            )),
        }
    }
}

/// Everything [`pack_timeseries`] needs; mirrors `dataset pack --timeseries`.
#[derive(Clone, Debug, PartialEq)]
pub struct SeriesOptions {
    /// The CSV file (gzip detected), with a header row.
    pub csv: PathBuf,
    /// The header name of the series' column.
    pub column: String,
    /// Values per sample (features).
    pub window: usize,
    /// Values forecast per sample (targets).
    pub horizon: usize,
    /// Share of the series, at its end, held out for validation, in `[0, 1)`.
    pub val_fraction: f64,
    pub missing: Missing,
    /// Standardize the inputs with the training period's mean and std of the series (one
    /// scale for every window position, recorded in the manifest); targets stay as given.
    pub standardize: bool,
    /// Receives `train/` and, when `val_fraction > 0`, `val/`.
    pub output: PathBuf,
    pub name: String,
}

/// What [`pack_timeseries`] wrote and found.
#[derive(Clone, Debug, PartialEq)]
pub struct SeriesReport {
    pub train_dir: PathBuf,
    pub val_dir: Option<PathBuf>,
    /// Values read (missing ones included).
    pub values: usize,
    /// Missing values met, and what was done with them.
    pub missing: usize,
    pub train_samples: u64,
    pub val_samples: u64,
    /// Mean absolute error over the validation targets of the naive forecast that repeats
    /// each window's last value: the baseline a forecaster must beat. `None` without a
    /// validation split.
    pub naive_val_mae: Option<f64>,
}

/// Reads the column, cleans it, cuts it into windows and writes the two datasets.
pub fn pack_timeseries(opts: &SeriesOptions) -> Result<SeriesReport, DatasetError> {
    let invalid = |m: String| Err(DatasetError::InvalidInput(m));
    if opts.window == 0 || opts.horizon == 0 {
        return invalid("--window and --horizon must be at least 1".into());
    }
    if !(0.0..1.0).contains(&opts.val_fraction) {
        return invalid(format!(
            "validation fraction must be in [0, 1), found {}",
            opts.val_fraction
        ));
    }
    let train_dir = opts.output.join("train");
    let val_dir = (opts.val_fraction > 0.0).then(|| opts.output.join("val"));
    for dir in std::iter::once(&train_dir).chain(&val_dir) {
        if dir.join(MANIFEST_FILE).exists() {
            return Err(DatasetError::OutputExists { path: dir.clone() });
        }
    }
    let raw = read_column(&opts.csv, &opts.column)?;
    let values = raw.len();
    let split_at = |n: usize| n - ((n as f64 * opts.val_fraction).round() as usize);
    let (series, split, missing) = clean(&raw, opts.missing, split_at, &opts.csv)?;
    let cut = cut_windows(&series, split, opts.window, opts.horizon);
    if cut.train_samples() == 0 {
        return invalid(format!(
            "the training period holds {split} values, too few for one window of {} plus a \
             horizon of {}",
            opts.window, opts.horizon
        ));
    }
    if val_dir.is_some() && cut.val_samples() == 0 {
        return invalid(format!(
            "the validation period holds {} values, too few for a horizon of {}",
            series.len() - split,
            opts.horizon
        ));
    }
    let naive_val_mae = val_dir.as_ref().map(|_| cut.naive_val_mae(opts.window));
    let standardization = opts.standardize.then(|| {
        let train = &series[..split];
        let n = train.len() as f64;
        let mean = train.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let var = train
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / n;
        let std = if var.sqrt() < 1e-6 { 1.0 } else { var.sqrt() };
        Standardization {
            mean: vec![mean as f32; opts.window],
            std: vec![std as f32; opts.window],
        }
    });
    let source = format!(
        "windowed time series from column `{}` of {}: {values} values ({missing} missing, \
         --missing {:?}), windows of {} predicting the next {}; chronological split at value \
         {split} (validation fraction {}){}",
        opts.column,
        opts.csv.display(),
        opts.missing,
        opts.window,
        opts.horizon,
        opts.val_fraction,
        if opts.standardize {
            "; inputs standardized with the training period's mean and std, targets as given"
        } else {
            ""
        }
    );
    let write = |dir: &Path, split_name: &str, mut x: Vec<f32>, y: Vec<f32>| {
        if let Some(st) = &standardization {
            st.apply(&mut x);
        }
        let n = y.len() / opts.horizon;
        let wo = WriteOptions {
            image: None,
            name: format!("{}-{split_name}", opts.name),
            features: opts.window,
            labels: LabelKind::Targets(opts.horizon),
            shard_samples: crate::default_shard_samples(
                opts.window,
                LabelKind::Targets(opts.horizon),
            )
            .min(n.max(1)),
            standardization: standardization.clone(),
            source: Some(source.clone()),
            tokenizer: None,
        };
        write_dataset(
            dir,
            &wo,
            &x,
            LabelRows::Targets {
                width: opts.horizon,
                values: &y,
            },
        )
    };
    let (train_x, train_y) = cut.train;
    let train = write(&train_dir, "train", train_x, train_y)?;
    let val = match &val_dir {
        Some(dir) => Some(write(dir, "val", cut.val.0, cut.val.1)?),
        None => None,
    };
    Ok(SeriesReport {
        train_dir,
        val_dir,
        values,
        missing,
        train_samples: train.num_samples,
        val_samples: val.map_or(0, |m| m.num_samples),
        naive_val_mae,
    })
}

/// The column's values in file order, `None` where missing; errors name file and line.
fn read_column(path: &Path, column: &str) -> Result<Vec<Option<f32>>, DatasetError> {
    let read_err = |source| DatasetError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut file = BufReader::new(std::fs::File::open(path).map_err(read_err)?);
    let gzip = file
        .fill_buf()
        .map_err(read_err)?
        .starts_with(&[0x1f, 0x8b]);
    let reader: Box<dyn Read> = if gzip {
        Box::new(flate2::read::MultiGzDecoder::new(file))
    } else {
        Box::new(file)
    };
    let mut csv = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(true)
        .from_reader(reader);
    let syntax = |source| DatasetError::CsvSyntax {
        path: path.to_path_buf(),
        source,
    };
    let headers = csv.headers().map_err(syntax)?.clone();
    let Some(index) = headers.iter().position(|h| h.trim() == column) else {
        return Err(DatasetError::InvalidInput(format!(
            "{}: no column `{column}` in the header (it has {})",
            path.display(),
            headers
                .iter()
                .map(|h| format!("`{}`", h.trim()))
                .collect::<Vec<_>>()
                .join(", ")
        )));
    };
    let mut out = Vec::new();
    for (i, record) in csv.records().enumerate() {
        let record = record.map_err(syntax)?;
        let line = i + 2;
        let field = record.get(index).unwrap_or("").trim();
        if matches!(
            field.to_ascii_lowercase().as_str(),
            "" | "na" | "nan" | "null" | "none"
        ) {
            out.push(None);
            continue;
        }
        let v: f32 = field.parse().map_err(|_| {
            DatasetError::InvalidInput(format!(
                "{}:{line}: `{field}` in column `{column}` is not a number",
                path.display()
            ))
        })?;
        if !v.is_finite() {
            return Err(DatasetError::InvalidInput(format!(
                "{}:{line}: `{field}` in column `{column}` is not finite",
                path.display()
            )));
        }
        out.push(Some(v));
    }
    if out.is_empty() {
        return Err(DatasetError::InvalidInput(format!(
            "{}: no rows under the header",
            path.display()
        )));
    }
    Ok(out)
}

/// The series with missing values handled, where the validation period starts in it, and how
/// many values were missing. `split_at(n)` is the first validation index of a series of `n`.
fn clean(
    raw: &[Option<f32>],
    missing: Missing,
    split_at: impl Fn(usize) -> usize,
    path: &Path,
) -> Result<(Vec<f32>, usize, usize), DatasetError> {
    let gaps = raw.iter().filter(|v| v.is_none()).count();
    if gaps == 0 {
        let series: Vec<f32> = raw.iter().map(|v| v.unwrap_or_default()).collect();
        let split = split_at(series.len());
        return Ok((series, split, 0));
    }
    match missing {
        Missing::Error => {
            let first = raw.iter().position(Option::is_none).unwrap_or(0);
            Err(DatasetError::InvalidInput(format!(
                "{}:{}: the series has {gaps} missing values (this is the first); choose \
                 --missing drop, mean or median",
                path.display(),
                first + 2
            )))
        }
        Missing::Drop => {
            let series: Vec<f32> = raw.iter().flatten().copied().collect();
            let split = split_at(series.len());
            Ok((series, split, gaps))
        }
        Missing::Mean | Missing::Median => {
            // The split is fixed on the raw positions, and the fill comes from the training
            // period alone.
            let split = split_at(raw.len());
            let mut known: Vec<f32> = raw[..split].iter().flatten().copied().collect();
            if known.is_empty() {
                return Err(DatasetError::InvalidInput(
                    "the training period has no values to fill missing ones from".into(),
                ));
            }
            let fill = if missing == Missing::Mean {
                (known.iter().map(|&v| f64::from(v)).sum::<f64>() / known.len() as f64) as f32
            } else {
                known.sort_by(f32::total_cmp);
                let m = known.len() / 2;
                if known.len() % 2 == 1 {
                    known[m]
                } else {
                    (known[m - 1] + known[m]) / 2.0
                }
            };
            Ok((raw.iter().map(|v| v.unwrap_or(fill)).collect(), split, gaps))
        }
    }
}

/// Samples cut from a series: row-major inputs and targets of each split.
struct Cut {
    train: (Vec<f32>, Vec<f32>),
    val: (Vec<f32>, Vec<f32>),
    horizon: usize,
}

impl Cut {
    fn train_samples(&self) -> usize {
        self.train.1.len() / self.horizon
    }

    fn val_samples(&self) -> usize {
        self.val.1.len() / self.horizon
    }

    /// MAE of repeating each validation window's last input over its horizon.
    fn naive_val_mae(&self, window: usize) -> f64 {
        let (x, y) = &self.val;
        let mut sum = 0.0;
        for (inputs, targets) in x.chunks_exact(window).zip(y.chunks_exact(self.horizon)) {
            let last = f64::from(inputs[window - 1]);
            sum += targets
                .iter()
                .map(|&t| (f64::from(t) - last).abs())
                .sum::<f64>();
        }
        sum / y.len().max(1) as f64
    }
}

/// Training samples: every window whose targets end before `split`. Validation samples: every
/// window whose first target is at or after `split` (its inputs may start before it).
fn cut_windows(series: &[f32], split: usize, window: usize, horizon: usize) -> Cut {
    let span = window + horizon;
    let mut cut = Cut {
        train: (Vec::new(), Vec::new()),
        val: (Vec::new(), Vec::new()),
        horizon,
    };
    if series.len() < span {
        return cut;
    }
    for start in 0..=series.len() - span {
        let first_target = start + window;
        let part = if first_target + horizon <= split {
            &mut cut.train
        } else if first_target >= split {
            &mut cut.val
        } else {
            // Targets on both sides of the split: in neither.
            continue;
        };
        part.0.extend_from_slice(&series[start..first_target]);
        part.1
            .extend_from_slice(&series[first_target..start + span]);
    }
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_never_put_a_validation_value_in_a_training_target() {
        let series: Vec<f32> = (0..10).map(|v| v as f32).collect();
        // Split at 7: training targets end at 6 at the latest, validation targets start at 7.
        let cut = cut_windows(&series, 7, 3, 2);
        assert_eq!(
            cut.train.0,
            vec![0., 1., 2., 1., 2., 3., 2., 3., 4.],
            "inputs of the windows starting at 0, 1, 2"
        );
        assert_eq!(cut.train.1, vec![3., 4., 4., 5., 5., 6.]);
        // Windows starting at 4 and 5: targets 7-8 and 8-9; their inputs reach back to 4.
        assert_eq!(cut.val.0, vec![4., 5., 6., 5., 6., 7.]);
        assert_eq!(cut.val.1, vec![7., 8., 8., 9.]);
        assert!(cut.train.1.iter().all(|&t| t < 7.0));
        assert!(cut.val.1.iter().all(|&t| t >= 7.0));
        // The naive forecast repeats 6 then 7: |7-6| + |8-6| + |8-7| + |9-7| over 4 targets.
        assert_eq!(cut.naive_val_mae(3), 1.5);
    }

    #[test]
    fn missing_values_are_refused_dropped_or_filled_from_the_training_period() {
        let raw = [Some(1.0), None, Some(3.0), Some(5.0), None, Some(100.0)];
        let split = |n: usize| n - n / 3;
        let err = clean(&raw, Missing::Error, split, Path::new("s.csv")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid input: s.csv:3: the series has 2 missing values (this is the first); \
             choose --missing drop, mean or median"
        );
        let (s, at, n) = clean(&raw, Missing::Drop, split, Path::new("s.csv")).unwrap();
        assert_eq!((s, at, n), (vec![1.0, 3.0, 5.0, 100.0], 3, 2));
        // Split at 4: the training period holds 1, 3, 5 (mean 3, median 3); 100 is not used.
        let (s, at, _) = clean(&raw, Missing::Mean, split, Path::new("s.csv")).unwrap();
        assert_eq!((s, at), (vec![1.0, 3.0, 3.0, 5.0, 3.0, 100.0], 4));
        let raw = [
            Some(1.0),
            Some(2.0),
            None,
            Some(10.0),
            Some(50.0),
            Some(60.0),
        ];
        let (s, _, _) = clean(&raw, Missing::Median, split, Path::new("s.csv")).unwrap();
        assert_eq!(s[2], 2.0, "median of 1, 2, 10");
    }
}
