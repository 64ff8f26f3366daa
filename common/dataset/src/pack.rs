//! Packing real data into datasets: options, the seeded train/validation
//! split, standardization fitted on the training split only (features only:
//! regression targets are stored as given, so evaluation figures are in the
//! data's own units), and the report the CLI prints. Parsing the inputs lives in `read_csv.rs` and `read_npy.rs`;
//! the on-disk format in `shards.rs`.

use std::path::PathBuf;

use indicatif::{ProgressBar, ProgressStyle};

use super::DatasetError;
use super::manifest::{LabelKind, MAX_CLASSES, Standardization};
use super::read_csv::{Columns, Table, read_csv};
use super::read_npy::read_npy;
use super::shard_plan::{shuffled, stream};
use super::shards::{Labels, WriteOptions, write_dataset};
use crate::timeseries::Missing;

/// Standard deviations below this count as a constant feature, which is then
/// left unscaled (std 1) instead of being blown up.
pub(crate) const STD_FLOOR: f64 = 1e-6;
const SPLIT_TAG: &[u8; 16] = b"ringmaster/split";

/// Which CSV column holds the label (for regression: which columns hold the
/// targets).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LabelColumn {
    First,
    Last,
    /// 0-based column index.
    Index(usize),
    /// Column name in the header row (requires a header).
    Name(String),
    /// Several columns (regression targets), from a comma-separated list
    /// such as `8,9` or `weight,height`.
    Many(Vec<LabelColumn>),
}

/// What the labels are: class labels or regression targets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PackTask {
    /// One integer label column; `num_classes` is the largest label plus one.
    #[default]
    Classification,
    /// One or more float target columns, stored as f32 `[k]` per sample.
    Regression,
}

impl std::str::FromStr for LabelColumn {
    type Err = DatasetError;

    /// `first`, `last`, a 0-based index, or otherwise a header name; or a
    /// comma-separated list of those; for command lines (`--label-column
    /// last`, `--label-column 8,9`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.contains(',') {
            return s
                .split(',')
                .map(|c| c.trim().parse())
                .collect::<Result<Vec<_>, _>>()
                .map(LabelColumn::Many);
        }
        Ok(match s {
            "" => {
                return Err(DatasetError::InvalidInput(
                    "label column must not be empty".into(),
                ));
            }
            "first" => LabelColumn::First,
            "last" => LabelColumn::Last,
            _ => match s.parse() {
                Ok(i) => LabelColumn::Index(i),
                Err(_) => LabelColumn::Name(s.into()),
            },
        })
    }
}

/// Where the samples come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PackInput {
    /// A CSV table, optionally gzip-compressed (detected by content, not by
    /// name): numeric features and one integer label column (or, for
    /// regression, float target columns).
    Csv {
        path: PathBuf,
        label_column: LabelColumn,
        /// `None`: the first row is a header when any of its fields is not a
        /// number.
        has_header: Option<bool>,
        /// Lines skipped before the table (and before its header, if any),
        /// for files that open with something else: scikit-learn's
        /// `breast_cancer.csv` and `wine_data.csv` start with a line of counts
        /// and class names.
        skip_rows: usize,
        /// The field separator, e.g. `b','` or `b' '` (scikit-learn's
        /// `diabetes_data_raw.csv.gz` is space-delimited).
        delimiter: u8,
        /// The labels (or targets) in a table of their own, one row per
        /// sample in the same order, every column a label; then every
        /// column of `path` is a feature and `label_column` is not used.
        /// Read with the same delimiter, its header detected, no rows
        /// skipped.
        labels: Option<PathBuf>,
    },
    /// A 2-D float32/float64 feature array and a 1-D integer label array
    /// (for regression: a 1-D or 2-D float target array).
    Npy { features: PathBuf, labels: PathBuf },
}

/// Everything [`pack`] needs; mirrors the `dataset pack` command line.
#[derive(Clone, Debug, PartialEq)]
pub struct PackOptions {
    pub input: PackInput,
    /// Class labels or regression targets.
    pub task: PackTask,
    /// Receives `train/` and, when `val_fraction > 0`, `val/`.
    pub output: PathBuf,
    pub name: String,
    /// Share of rows held out for validation, in `[0, 1)`.
    pub val_fraction: f64,
    /// Standardize features with the training split's mean and std.
    pub standardize: bool,
    /// Samples per shard; `None`: [`default_shard_samples`] for the
    /// input's feature count.
    pub shard_samples: Option<usize>,
    /// Seeds the train/validation split.
    pub seed: u64,
    pub show_progress: bool,
    /// Missing feature values: refused (the default), rows dropped, or filled with the
    /// training split's column mean or median. Rows with a missing label are always dropped
    /// unless this is `Error`.
    pub missing: Missing,
    /// Drop rows that repeat an earlier row exactly (features and label), before the split,
    /// so no sample is in both splits.
    pub dedup: bool,
}

/// What [`pack`] wrote, for the CLI to print.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackReport {
    pub train_dir: PathBuf,
    /// `None` when no validation split was asked for.
    pub val_dir: Option<PathBuf>,
    pub train_samples: u64,
    pub val_samples: u64,
    pub features: usize,
    /// Classes, or targets per sample.
    pub labels: LabelKind,
    pub train_shards: usize,
    pub val_shards: usize,
    /// Missing feature values met (dropped with their rows, or filled).
    pub missing_values: u64,
    /// Rows dropped for a missing value (a label, or any value with `--missing drop`).
    pub rows_dropped: u64,
    /// Rows dropped as exact repeats of an earlier row.
    pub duplicates_removed: u64,
}

/// Samples as read from an input file, before splitting.
pub(crate) struct RawSamples {
    pub x: Vec<f32>,
    pub y: Labels,
    /// Samples read.
    pub rows: usize,
    pub features: usize,
    /// Where they came from, for the manifest's `source`.
    pub description: String,
}

/// A label written as a number: a non-negative integer below [`MAX_CLASSES`],
/// possibly with a zero fraction (`3.0`).
pub(crate) fn parse_label(field: &str) -> Option<i64> {
    let v: f64 = field.parse().ok()?;
    let ok = v.is_finite() && v >= 0.0 && v.fract() == 0.0 && v < f64::from(MAX_CLASSES);
    ok.then_some(v as i64)
}

/// Checks the options every packer shares and returns `<output>/train` and, with a validation
/// fraction, `<output>/val`, refusing to write over a dataset already there.
pub(crate) fn output_dirs(
    output: &std::path::Path,
    val_fraction: f64,
    shard_samples: Option<usize>,
) -> Result<(PathBuf, Option<PathBuf>), DatasetError> {
    if !(0.0..1.0).contains(&val_fraction) {
        return Err(DatasetError::InvalidInput(format!(
            "validation fraction must be in [0, 1), found {val_fraction}"
        )));
    }
    if shard_samples == Some(0) {
        return Err(DatasetError::InvalidInput(
            "shard size must be at least one sample".into(),
        ));
    }
    let train_dir = output.join("train");
    let val_dir = (val_fraction > 0.0).then(|| output.join("val"));
    for dir in std::iter::once(&train_dir).chain(&val_dir) {
        if dir.join(super::MANIFEST_FILE).exists() {
            return Err(DatasetError::OutputExists { path: dir.clone() });
        }
    }
    Ok((train_dir, val_dir))
}

/// Reads the input, splits its rows into train and validation with a seeded
/// shuffle (each split keeps input order), optionally standardizes both with
/// the training split's statistics, and writes `<output>/train` and
/// `<output>/val` as datasets. For classification `num_classes` is the
/// largest label plus one; regression targets are written as they are.
pub fn pack(opts: &PackOptions) -> Result<PackReport, DatasetError> {
    let (train_dir, val_dir) = output_dirs(&opts.output, opts.val_fraction, opts.shard_samples)?;

    let progress = progress_bar(opts.show_progress);
    let raw = match &opts.input {
        PackInput::Csv {
            path,
            label_column,
            has_header,
            skip_rows,
            delimiter,
            labels,
        } => {
            let table = |path, columns| Table {
                path,
                columns,
                has_header: *has_header,
                skip_rows: *skip_rows,
                delimiter: *delimiter,
                task: opts.task,
                keep_missing: opts.missing != Missing::Error,
            };
            match labels {
                None => read_csv(&table(path, Columns::Labels(label_column)), &progress)?,
                Some(labels) => {
                    let x = read_csv(&table(path, Columns::AllFeatures), &progress)?;
                    let y = read_csv(
                        &Table {
                            has_header: None,
                            skip_rows: 0,
                            ..table(labels, Columns::AllLabels)
                        },
                        &progress,
                    )?;
                    join_tables(x, y, path, labels)?
                }
            }
        }
        PackInput::Npy { features, labels } => {
            let raw = read_npy(features, labels, opts.task)?;
            progress.set_position(raw.rows as u64);
            raw
        }
    };
    progress.finish_and_clear();
    let (raw, cleaning) = clean_rows(raw, opts.missing, opts.dedup);

    let d = raw.features;
    let n = raw.rows;
    if n == 0 {
        return Err(DatasetError::InvalidInput("no samples".into()));
    }
    let labels = match &raw.y {
        Labels::Classes(y) => {
            // parse_label bounds every label below MAX_CLASSES.
            let num_classes = y.iter().max().map_or(0, |&m| m as u32 + 1);
            if num_classes < 2 {
                return Err(DatasetError::TooFewClasses);
            }
            LabelKind::Classes(num_classes)
        }
        Labels::Targets { width, .. } => LabelKind::Targets(*width),
        // CSV and NPY readers never produce them; `pack_text` writes tokens.
        Labels::Tokens { .. } => {
            return Err(DatasetError::InvalidInput(
                "token sequences are packed from text (--text), not tables".into(),
            ));
        }
    };

    let perm = split_rows(n, opts.val_fraction, opts.seed)?;
    let n_val = perm.val;
    let (val_rows, train_rows) = perm.rows.split_at(n_val);
    let (mut train_x, train_y) = gather(&raw, train_rows);
    let (mut val_x, val_y) = gather(&raw, val_rows);
    if cleaning.missing_values > 0 {
        let fills = fit_fills(&train_x, d, opts.missing)?;
        for x in [&mut train_x, &mut val_x] {
            for row in x.chunks_exact_mut(d) {
                for (v, f) in row.iter_mut().zip(&fills) {
                    if v.is_nan() {
                        *v = *f;
                    }
                }
            }
        }
    }

    let standardization = opts.standardize.then(|| {
        let st = fit_standardization(&train_x, d);
        st.apply(&mut train_x);
        st.apply(&mut val_x);
        st
    });
    let source = format!(
        "packed from {}; {}{n} rows: {} train, {n_val} validation (seeded split, seed {}, \
         validation fraction {}); {}",
        raw.description,
        cleaning.describe(opts.missing),
        n - n_val,
        opts.seed,
        opts.val_fraction,
        match (standardization.is_some(), labels) {
            (true, LabelKind::Classes(_) | LabelKind::Tokens { .. }) => {
                "features standardized with the training split's mean and std \
                 (std below 1e-6 replaced by 1)"
            }
            (true, LabelKind::Targets(_)) => {
                "features standardized with the training split's mean and std \
                 (std below 1e-6 replaced by 1); regression targets as given"
            }
            (false, LabelKind::Classes(_) | LabelKind::Tokens { .. }) =>
                "features not standardized",
            (false, LabelKind::Targets(_)) => "features and regression targets as given",
        }
    );
    let write_opts = |split: &str| WriteOptions {
        image: None,
        name: format!("{}-{split}", opts.name),
        features: d,
        labels,
        shard_samples: opts
            .shard_samples
            .unwrap_or_else(|| crate::default_shard_samples(d, labels)),
        standardization: standardization.clone(),
        source: Some(source.clone()),
        tokenizer: None,
    };

    let train = write_dataset(&train_dir, &write_opts("train"), &train_x, train_y.rows())?;
    let val = match &val_dir {
        Some(dir) => Some(write_dataset(
            dir,
            &write_opts("val"),
            &val_x,
            val_y.rows(),
        )?),
        None => None,
    };
    Ok(PackReport {
        train_dir,
        val_dir,
        train_samples: train.num_samples,
        val_samples: val.as_ref().map_or(0, |m| m.num_samples),
        features: d,
        labels,
        train_shards: train.shards.len(),
        val_shards: val.as_ref().map_or(0, |m| m.shards.len()),
        missing_values: cleaning.missing_values,
        rows_dropped: cleaning.rows_dropped,
        duplicates_removed: cleaning.duplicates_removed,
    })
}

/// A seeded permutation of `0..n`: its first `val` entries are the
/// validation rows, the rest the training rows.
pub(crate) struct Split {
    pub rows: Vec<u64>,
    pub val: usize,
}

/// Splits `n` rows: `round(n * val_fraction)` of them (at least one when the
/// fraction is positive) for validation, chosen by a shuffle seeded with
/// `seed`; the same for every kind of input, so a table and an image array
/// of the same rows split alike.
pub(crate) fn split_rows(n: usize, val_fraction: f64, seed: u64) -> Result<Split, DatasetError> {
    let val = if val_fraction > 0.0 {
        ((n as f64 * val_fraction).round() as usize).max(1)
    } else {
        0
    };
    if val >= n {
        return Err(DatasetError::InvalidInput(format!(
            "validation fraction {val_fraction} of {n} samples leaves none for training"
        )));
    }
    Ok(Split {
        rows: shuffled(n as u64, &mut stream(seed, 0, SPLIT_TAG)),
        val,
    })
}

/// What [`clean_rows`] did.
#[derive(Debug, Default, Clone, Copy)]
struct Cleaning {
    missing_values: u64,
    rows_dropped: u64,
    duplicates_removed: u64,
}

impl Cleaning {
    /// For the manifest's `source`: empty when nothing was cleaned.
    fn describe(&self, missing: Missing) -> String {
        let mut parts = Vec::new();
        if self.missing_values > 0 || self.rows_dropped > 0 {
            parts.push(format!(
                "{} missing feature values ({}), {} rows dropped for missing values",
                self.missing_values,
                match missing {
                    Missing::Drop | Missing::Error => "rows dropped",
                    Missing::Mean => "filled with the training split's column means",
                    Missing::Median => "filled with the training split's column medians",
                },
                self.rows_dropped
            ));
        }
        if self.duplicates_removed > 0 {
            parts.push(format!(
                "{} duplicate rows removed",
                self.duplicates_removed
            ));
        }
        if parts.is_empty() {
            String::new()
        } else {
            format!("{}; ", parts.join(", "))
        }
    }
}

/// Drops rows whose label is missing (labels are never filled), rows with any missing value
/// under `Missing::Drop`, and with `dedup` every row that repeats an earlier one bit for bit;
/// counts what it did. Missing features left in place (`Mean`, `Median`) are filled after the
/// split, from the training rows only.
fn clean_rows(raw: RawSamples, missing: Missing, dedup: bool) -> (RawSamples, Cleaning) {
    let d = raw.features;
    let mut c = Cleaning {
        missing_values: raw.x.iter().filter(|v| v.is_nan()).count() as u64,
        ..Cleaning::default()
    };
    if c.missing_values == 0 && !dedup && missing == Missing::Error {
        return (raw, c);
    }
    let label_missing = |r: usize| match &raw.y {
        Labels::Classes(y) => y[r] == crate::read_csv::MISSING_LABEL,
        Labels::Targets { width, values } => values[r * width..(r + 1) * width]
            .iter()
            .any(|v| v.is_nan()),
        // Token datasets come from `pack --text`, never from a table.
        Labels::Tokens { .. } => false,
    };
    let mut seen = std::collections::HashSet::new();
    let mut keep = Vec::with_capacity(raw.rows);
    for r in 0..raw.rows {
        let row = &raw.x[r * d..(r + 1) * d];
        if label_missing(r) || (missing == Missing::Drop && row.iter().any(|v| v.is_nan())) {
            c.rows_dropped += 1;
            continue;
        }
        if dedup {
            let mut key: Vec<u32> = row.iter().map(|v| v.to_bits()).collect();
            match &raw.y {
                Labels::Classes(y) => key.extend([y[r] as u32, (y[r] >> 32) as u32]),
                Labels::Targets { width, values } => key.extend(
                    values[r * width..(r + 1) * width]
                        .iter()
                        .map(|v| v.to_bits()),
                ),
                Labels::Tokens { len, values } => key.extend(
                    values[r * len..(r + 1) * len]
                        .iter()
                        .flat_map(|&t| [t as u32, (t >> 32) as u32]),
                ),
            }
            if !seen.insert(key) {
                c.duplicates_removed += 1;
                continue;
            }
        }
        keep.push(r as u64);
    }
    if keep.len() == raw.rows {
        return (raw, c);
    }
    let (x, y) = gather(&raw, &keep);
    let rows = keep.len();
    (
        RawSamples {
            x,
            y,
            rows,
            features: d,
            description: raw.description,
        },
        c,
    )
}

/// Per column, the value a missing feature gets: the mean or median of the column's known
/// training values.
fn fit_fills(train_x: &[f32], d: usize, missing: Missing) -> Result<Vec<f32>, DatasetError> {
    let mut fills = Vec::with_capacity(d);
    for col in 0..d {
        let mut known: Vec<f32> = train_x
            .chunks_exact(d)
            .map(|row| row[col])
            .filter(|v| !v.is_nan())
            .collect();
        if known.is_empty() {
            return Err(DatasetError::InvalidInput(format!(
                "column {} has no known value in the training split to fill missing ones from",
                col + 1
            )));
        }
        fills.push(match missing {
            Missing::Median => {
                known.sort_by(f32::total_cmp);
                let m = known.len() / 2;
                if known.len() % 2 == 1 {
                    known[m]
                } else {
                    (known[m - 1] + known[m]) / 2.0
                }
            }
            _ => (known.iter().map(|&v| f64::from(v)).sum::<f64>() / known.len() as f64) as f32,
        });
    }
    Ok(fills)
}

fn progress_bar(show: bool) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner();
    if let Ok(style) =
        ProgressStyle::with_template("{spinner} {human_pos} rows read ({per_sec}, {elapsed})")
    {
        bar.set_style(style);
    }
    bar
}

/// The samples of a features table and of a labels table of the same rows.
fn join_tables(
    x: RawSamples,
    y: RawSamples,
    features: &std::path::Path,
    labels: &std::path::Path,
) -> Result<RawSamples, DatasetError> {
    if x.rows != y.rows {
        return Err(DatasetError::InvalidInput(format!(
            "{} has {} rows but {} has {}: the labels file needs one row per sample",
            features.display(),
            x.rows,
            labels.display(),
            y.rows
        )));
    }
    Ok(RawSamples {
        x: x.x,
        y: y.y,
        rows: x.rows,
        features: x.features,
        description: format!("{}, labels from {}", x.description, y.description),
    })
}

/// The rows of `raw` named by `rows`, in input order.
fn gather(raw: &RawSamples, rows: &[u64]) -> (Vec<f32>, Labels) {
    let mut rows = rows.to_vec();
    rows.sort_unstable();
    let d = raw.features;
    let mut x = Vec::with_capacity(rows.len() * d);
    let mut y = Labels::Classes(Vec::new());
    let mut targets = Vec::new();
    for &r in &rows {
        let r = r as usize;
        x.extend_from_slice(&raw.x[r * d..(r + 1) * d]);
        match (&mut y, &raw.y) {
            (Labels::Classes(out), Labels::Classes(all)) => out.push(all[r]),
            (_, Labels::Targets { width, values }) => {
                targets.extend_from_slice(&values[r * width..(r + 1) * width])
            }
            // Tokens never reach here (refused above).
            _ => {}
        }
    }
    if let Labels::Targets { width, .. } = raw.y {
        y = Labels::Targets {
            width,
            values: targets,
        };
    }
    (x, y)
}

/// Per-feature mean and population std of row-major `x`, accumulated in f64.
fn fit_standardization(x: &[f32], d: usize) -> Standardization {
    let n = (x.len() / d).max(1) as f64;
    let mut mean = vec![0f64; d];
    for row in x.chunks_exact(d) {
        for (m, v) in mean.iter_mut().zip(row) {
            *m += f64::from(*v);
        }
    }
    mean.iter_mut().for_each(|m| *m /= n);
    let mut var = vec![0f64; d];
    for row in x.chunks_exact(d) {
        for ((s, v), m) in var.iter_mut().zip(row).zip(&mean) {
            *s += (f64::from(*v) - m).powi(2);
        }
    }
    let std = var
        .iter()
        .map(|s| {
            let sd = (s / n).sqrt();
            if sd < STD_FLOOR { 1.0 } else { sd as f32 }
        })
        .collect();
    Standardization {
        mean: mean.into_iter().map(|m| m as f32).collect(),
        std,
    }
}
