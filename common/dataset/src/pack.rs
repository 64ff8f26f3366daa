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

/// Standard deviations below this count as a constant feature, which is then
/// left unscaled (std 1) instead of being blown up.
const STD_FLOOR: f64 = 1e-6;
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

/// Reads the input, splits its rows into train and validation with a seeded
/// shuffle (each split keeps input order), optionally standardizes both with
/// the training split's statistics, and writes `<output>/train` and
/// `<output>/val` as datasets. For classification `num_classes` is the
/// largest label plus one; regression targets are written as they are.
pub fn pack(opts: &PackOptions) -> Result<PackReport, DatasetError> {
    if !(0.0..1.0).contains(&opts.val_fraction) {
        return Err(DatasetError::InvalidInput(format!(
            "validation fraction must be in [0, 1), found {}",
            opts.val_fraction
        )));
    }
    if opts.shard_samples == Some(0) {
        return Err(DatasetError::InvalidInput(
            "shard size must be at least one sample".into(),
        ));
    }
    let train_dir = opts.output.join("train");
    let val_dir = (opts.val_fraction > 0.0).then(|| opts.output.join("val"));
    for dir in std::iter::once(&train_dir).chain(&val_dir) {
        if dir.join(super::MANIFEST_FILE).exists() {
            return Err(DatasetError::OutputExists { path: dir.clone() });
        }
    }

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

    let n_val = if opts.val_fraction > 0.0 {
        ((n as f64 * opts.val_fraction).round() as usize).max(1)
    } else {
        0
    };
    if n_val >= n {
        return Err(DatasetError::InvalidInput(format!(
            "validation fraction {} of {n} samples leaves none for training",
            opts.val_fraction
        )));
    }
    let perm = shuffled(n as u64, &mut stream(opts.seed, 0, SPLIT_TAG));
    let (val_rows, train_rows) = perm.split_at(n_val);
    let (mut train_x, train_y) = gather(&raw, train_rows);
    let (mut val_x, val_y) = gather(&raw, val_rows);

    let standardization = opts.standardize.then(|| {
        let st = fit_standardization(&train_x, d);
        st.apply(&mut train_x);
        st.apply(&mut val_x);
        st
    });
    let source = format!(
        "packed from {}; {n} rows: {} train, {n_val} validation (seeded split, seed {}, \
         validation fraction {}); {}",
        raw.description,
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
        name: format!("{}-{split}", opts.name),
        features: d,
        labels,
        shard_samples: opts
            .shard_samples
            .unwrap_or_else(|| crate::default_shard_samples(d, labels)),
        standardization: standardization.clone(),
        source: Some(source.clone()),
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
    })
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
