//! Packing image arrays into image datasets: pixels stored in the input's own
//! type (u8 stays one byte per value), `[n, C, H, W]` order, the same seeded
//! train/validation split as tables, and per-channel normalization fitted on
//! the training split only and *recorded* in both manifests rather than
//! applied, because u8 storage cannot hold normalized values; readers apply it
//! (`shards.rs`). Reading the NPY arrays lives in `read_npy.rs`.

use std::collections::HashSet;
use std::path::PathBuf;

use super::DatasetError;
use super::manifest::{ElementType, ImageNormalization, LabelKind};
use super::pack::{PackTask, STD_FLOOR, output_dirs, split_rows};
use super::read_npy::{Images, Pixels, read_images, read_labels, read_targets};
use super::shards::{
    FeatureRows, ImageLayout, LabelRows, Labels, WriteOptions, default_shard_samples,
    write_dataset_rows,
};

/// What [`pack_images`] needs; mirrors `dataset pack --images`.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageOptions {
    /// NPY images: u8, f32 or f64, `[n, C, H, W]`, `[n, H, W]` (one channel)
    /// or, with `channels_last`, `[n, H, W, C]`.
    pub images: PathBuf,
    /// NPY labels: 1-D integers (regression: 1-D or 2-D floats), one per image.
    pub labels: PathBuf,
    /// The images are `[n, H, W, C]`; they are transposed to `[C, H, W]`.
    pub channels_last: bool,
    /// Record per-channel normalization fitted on the training split.
    pub normalize: bool,
    /// Record this normalization instead of fitting one (`--normalization-from`: another
    /// dataset's, so a set packed on its own, such as a held-out test set, is read exactly as
    /// the training set it is scored against). Its channels and scale must fit the images.
    pub normalization_from: Option<ImageNormalization>,
    /// Class labels or regression targets.
    pub task: PackTask,
    /// Receives `train/` and, when `val_fraction > 0`, `val/`.
    pub output: PathBuf,
    pub name: String,
    /// Share of images held out for validation, in `[0, 1)`.
    pub val_fraction: f64,
    /// Images per shard; `None`: about 32 MiB of decoded (f32) samples.
    pub shard_samples: Option<usize>,
    /// Seeds the train/validation split.
    pub seed: u64,
    /// Drop images that repeat an earlier one exactly (pixels and label),
    /// before the split.
    pub dedup: bool,
}

/// What [`pack_images`] wrote, for the CLI to print.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageReport {
    pub train_dir: PathBuf,
    /// `None` when no validation split was asked for.
    pub val_dir: Option<PathBuf>,
    pub train_samples: u64,
    pub val_samples: u64,
    /// `[C, H, W]` of each image.
    pub shape: [usize; 3],
    /// How the pixels are stored: u8 or f32.
    pub dtype: ElementType,
    pub labels: LabelKind,
    /// As recorded in both manifests; `None` without normalization.
    pub normalization: Option<ImageNormalization>,
    pub train_shards: usize,
    pub val_shards: usize,
    pub duplicates_removed: u64,
}

/// Reads the images and labels, optionally drops exact repeats, splits them
/// as [`crate::pack`] splits tables (seeded, each split in input order), fits
/// per-channel normalization on the training split (values scaled by 1/255
/// for u8, 1 for floats) and writes `<output>/train` and `<output>/val` with
/// the pixels as stored in the input and the normalization in both manifests.
pub fn pack_images(opts: &ImageOptions) -> Result<ImageReport, DatasetError> {
    let (train_dir, val_dir) = output_dirs(&opts.output, opts.val_fraction, opts.shard_samples)?;

    let images = read_images(&opts.images, opts.channels_last)?;
    let y = match opts.task {
        PackTask::Classification => Labels::Classes(read_labels(&opts.labels)?),
        PackTask::Regression => read_targets(&opts.labels)?,
    };
    if y.len() != images.samples {
        return Err(DatasetError::NpyCountMismatch {
            features: opts.images.clone(),
            feature_rows: images.samples as u64,
            labels: opts.labels.clone(),
            label_count: y.len() as u64,
        });
    }
    let shape = images.shape;
    let d = shape.iter().product::<usize>();
    let read = images.samples;
    let (images, y, duplicates_removed) = if opts.dedup {
        dedup(images, y, d)
    } else {
        (images, y, 0)
    };
    let n = images.samples;
    let labels = match &y {
        Labels::Classes(c) => {
            // read_labels bounds every label below MAX_CLASSES.
            let classes = c.iter().max().map_or(0, |&m| m as u32 + 1);
            if classes < 2 {
                return Err(DatasetError::TooFewClasses);
            }
            LabelKind::Classes(classes)
        }
        Labels::Targets { width, .. } => LabelKind::Targets(*width),
        Labels::Tokens { .. } => {
            return Err(DatasetError::InvalidInput(
                "token sequences are packed from text (--text), not images".into(),
            ));
        }
    };

    let split = split_rows(n, opts.val_fraction, opts.seed)?;
    let (val_rows, train_rows) = split.rows.split_at(split.val);
    let train_rows = sorted(train_rows);
    let val_rows = sorted(val_rows);
    let (dtype, scale) = match images.pixels {
        Pixels::U8(_) => (ElementType::U8, 1.0 / 255.0),
        Pixels::F32(_) => (ElementType::F32, 1.0),
    };
    let plane = shape[1] * shape[2];
    let normalization = match &opts.normalization_from {
        Some(given) => {
            if given.mean.len() != shape[0] {
                return Err(DatasetError::InvalidInput(format!(
                    "the given normalization has {} channels, the images {}",
                    given.mean.len(),
                    shape[0]
                )));
            }
            if given.scale != scale {
                return Err(DatasetError::InvalidInput(format!(
                    "the given normalization reads pixels scaled by {} ({}), these images are \
                     {dtype} (scaled by {scale}): pack them in the same type",
                    given.scale,
                    if given.scale == 1.0 { "f32" } else { "u8" }
                )));
            }
            Some(given.clone())
        }
        None => opts.normalize.then(|| match &images.pixels {
            Pixels::U8(x) => fit_u8(x, d, plane, &train_rows, scale),
            Pixels::F32(x) => fit_f32(x, d, plane, &train_rows),
        }),
    };

    let source = format!(
        "packed from {} and {} (npy images, {read} of [C, H, W] = {shape:?} {dtype}{}); {}{n} \
         images: {} train, {} validation (seeded split, seed {}, validation fraction {}); {}",
        opts.images.display(),
        opts.labels.display(),
        if opts.channels_last {
            ", transposed from channels-last [H, W, C]"
        } else {
            ""
        },
        if duplicates_removed > 0 {
            format!("{duplicates_removed} duplicate images removed; ")
        } else {
            String::new()
        },
        n - split.val,
        split.val,
        opts.seed,
        opts.val_fraction,
        if opts.normalization_from.is_some() {
            "pixels stored as given; normalized per channel when read, with another \
             dataset's recorded mean and std (--normalization-from)"
        } else if normalization.is_some() {
            "pixels stored as given; normalized per channel when read, with the training \
             split's mean and std after scaling (std below 1e-6 replaced by 1)"
        } else {
            "pixels stored and read as given (no normalization)"
        }
    );
    let write_opts = |split: &str| WriteOptions {
        name: format!("{}-{split}", opts.name),
        features: d,
        labels,
        shard_samples: opts
            .shard_samples
            .unwrap_or_else(|| default_shard_samples(d, labels)),
        standardization: None,
        source: Some(source.clone()),
        image: Some(ImageLayout {
            shape,
            dtype,
            normalization: normalization.clone(),
        }),
        tokenizer: None,
    };
    let write = |dir: &PathBuf, split: &str, rows: &[usize]| {
        let y = gather_labels(&y, rows);
        match &images.pixels {
            Pixels::U8(x) => write_dataset_rows(
                dir,
                &write_opts(split),
                FeatureRows::U8(&gather(x, d, rows)),
                y.rows(),
            ),
            Pixels::F32(x) => write_dataset_rows(
                dir,
                &write_opts(split),
                FeatureRows::F32(&gather(x, d, rows)),
                y.rows(),
            ),
        }
    };
    let train = write(&train_dir, "train", &train_rows)?;
    let val = match &val_dir {
        Some(dir) => Some(write(dir, "val", &val_rows)?),
        None => None,
    };
    Ok(ImageReport {
        train_dir,
        val_dir,
        train_samples: train.num_samples,
        val_samples: val.as_ref().map_or(0, |m| m.num_samples),
        shape,
        dtype,
        labels,
        normalization,
        train_shards: train.shards.len(),
        val_shards: val.as_ref().map_or(0, |m| m.shards.len()),
        duplicates_removed,
    })
}

/// Rows in input order, as indices.
fn sorted(rows: &[u64]) -> Vec<usize> {
    let mut rows: Vec<usize> = rows.iter().map(|&r| r as usize).collect();
    rows.sort_unstable();
    rows
}

/// The samples of `d` values named by `rows`.
fn gather<T: Copy>(x: &[T], d: usize, rows: &[usize]) -> Vec<T> {
    let mut out = Vec::with_capacity(rows.len() * d);
    for &r in rows {
        out.extend_from_slice(&x[r * d..(r + 1) * d]);
    }
    out
}

/// The labels (or targets) of `rows`.
fn gather_labels(y: &Labels, rows: &[usize]) -> Labels {
    match y.rows() {
        LabelRows::Classes(c) => Labels::Classes(rows.iter().map(|&r| c[r]).collect()),
        LabelRows::Targets { width, values } => Labels::Targets {
            width,
            values: gather(values, width, rows),
        },
        LabelRows::Tokens { len, values } => Labels::Tokens {
            len,
            values: gather(values, len, rows),
        },
    }
}

/// Drops every image that repeats an earlier one bit for bit, label
/// included; returns what is left and how many were dropped.
fn dedup(images: Images, y: Labels, d: usize) -> (Images, Labels, u64) {
    let n = images.samples;
    let mut seen = HashSet::with_capacity(n);
    let keep: Vec<usize> = (0..n)
        .filter(|&r| {
            let mut key: Vec<u8> = match &images.pixels {
                Pixels::U8(x) => x[r * d..(r + 1) * d].to_vec(),
                Pixels::F32(x) => x[r * d..(r + 1) * d]
                    .iter()
                    .flat_map(|v| v.to_bits().to_le_bytes())
                    .collect(),
            };
            match gather_labels(&y, &[r]) {
                Labels::Classes(c) => key.extend(c[0].to_le_bytes()),
                Labels::Targets { values, .. } => {
                    key.extend(values.iter().flat_map(|v| v.to_bits().to_le_bytes()))
                }
                Labels::Tokens { values, .. } => {
                    key.extend(values.iter().flat_map(|v| v.to_le_bytes()))
                }
            }
            seen.insert(key)
        })
        .collect();
    let removed = (n - keep.len()) as u64;
    if removed == 0 {
        return (images, y, 0);
    }
    let pixels = match &images.pixels {
        Pixels::U8(x) => Pixels::U8(gather(x, d, &keep)),
        Pixels::F32(x) => Pixels::F32(gather(x, d, &keep)),
    };
    (
        Images {
            pixels,
            samples: keep.len(),
            shape: images.shape,
        },
        gather_labels(&y, &keep),
        removed,
    )
}

/// Per-channel mean and population std of the training images' u8 pixels
/// times `scale`, from a histogram of the 256 values per channel: exact, and
/// one pass.
fn fit_u8(x: &[u8], d: usize, plane: usize, rows: &[usize], scale: f32) -> ImageNormalization {
    let channels = d / plane;
    let mut counts = vec![[0u64; 256]; channels];
    for &r in rows {
        for (c, values) in x[r * d..(r + 1) * d].chunks_exact(plane).enumerate() {
            for &v in values {
                counts[c][usize::from(v)] += 1;
            }
        }
    }
    let scale64 = f64::from(scale);
    let (mean, std) = counts
        .iter()
        .map(|hist| {
            let n = hist.iter().sum::<u64>().max(1) as f64;
            let value = |v: usize| v as f64 * scale64;
            let mean = hist
                .iter()
                .enumerate()
                .map(|(v, &k)| k as f64 * value(v))
                .sum::<f64>()
                / n;
            let var = hist
                .iter()
                .enumerate()
                .map(|(v, &k)| k as f64 * (value(v) - mean).powi(2))
                .sum::<f64>()
                / n;
            (mean, var.sqrt())
        })
        .unzip();
    normalization(scale, mean, std)
}

/// Per-channel mean and population std of the training images' f32 pixels,
/// accumulated in f64 over two passes.
fn fit_f32(x: &[f32], d: usize, plane: usize, rows: &[usize]) -> ImageNormalization {
    let channels = d / plane;
    let n = (rows.len() * plane).max(1) as f64;
    let mut mean = vec![0f64; channels];
    for &r in rows {
        for (c, values) in x[r * d..(r + 1) * d].chunks_exact(plane).enumerate() {
            mean[c] += values.iter().map(|&v| f64::from(v)).sum::<f64>();
        }
    }
    mean.iter_mut().for_each(|m| *m /= n);
    let mut var = vec![0f64; channels];
    for &r in rows {
        for (c, values) in x[r * d..(r + 1) * d].chunks_exact(plane).enumerate() {
            var[c] += values
                .iter()
                .map(|&v| (f64::from(v) - mean[c]).powi(2))
                .sum::<f64>();
        }
    }
    let std = var.iter().map(|v| (v / n).sqrt()).collect();
    normalization(1.0, mean, std)
}

/// The recorded form: f32, and a constant channel's std (below
/// [`STD_FLOOR`]) replaced by 1 rather than blown up.
fn normalization(scale: f32, mean: Vec<f64>, std: Vec<f64>) -> ImageNormalization {
    ImageNormalization {
        scale,
        mean: mean.into_iter().map(|m| m as f32).collect(),
        std: std
            .into_iter()
            .map(|s| if s < STD_FLOOR { 1.0 } else { s as f32 })
            .collect(),
    }
}
