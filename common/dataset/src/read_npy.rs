//! Reading a pair of NPY files — 2-D float32/float64 features, 1-D integer
//! labels of any width (or, for regression, 1-D or 2-D float targets) — into
//! raw samples, refusing headers that promise more
//! data than the file holds; and image arrays (`[n, C, H, W]`, `[n, H, W]` or
//! channels-last `[n, H, W, C]`, u8 or float) into `[n, C, H, W]` pixels.
//! Splitting, standardizing and writing happen in `pack.rs` and `images.rs`.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use npyz::{DType, NpyFile, Order, TypeChar, TypeStr};

use super::DatasetError;
use super::manifest::{MAX_CHANNELS, MAX_CLASSES, MAX_FEATURES, MAX_TARGETS};
use super::pack::{PackTask, RawSamples};
use super::shards::Labels;

type Npy = NpyFile<BufReader<File>>;

pub(crate) fn read_npy(
    features: &Path,
    labels: &Path,
    task: PackTask,
) -> Result<RawSamples, DatasetError> {
    let (x, rows, d) = read_features(features)?;
    let y = match task {
        PackTask::Classification => Labels::Classes(read_labels(labels)?),
        PackTask::Regression => read_targets(labels)?,
    };
    if y.len() as u64 != rows {
        return Err(DatasetError::NpyCountMismatch {
            features: features.into(),
            feature_rows: rows,
            labels: labels.into(),
            label_count: y.len() as u64,
        });
    }
    Ok(RawSamples {
        x,
        y,
        rows: rows as usize,
        features: d,
        description: format!(
            "{} and {} (npy, {rows} rows of {d} features)",
            features.display(),
            labels.display()
        ),
    })
}

fn format_err(path: &Path, detail: String) -> DatasetError {
    DatasetError::NpyFormat {
        path: path.into(),
        detail,
    }
}

/// Opens `path` and returns it with its element type, having checked
/// that the data the header promises fits in the file, so that reading
/// never allocates for data that is not there.
fn open(path: &Path) -> Result<(Npy, TypeStr), DatasetError> {
    let read_err = |source| DatasetError::Read {
        path: path.into(),
        source,
    };
    let file = File::open(path).map_err(read_err)?;
    let file_len = file.metadata().map_err(read_err)?.len();
    let npy = NpyFile::new(BufReader::new(file))
        .map_err(|e| format_err(path, format!("not a valid npy file: {e}")))?;
    let DType::Plain(ty) = npy.dtype() else {
        return Err(format_err(
            path,
            format!("structured dtype {} is not supported", npy.dtype().descr()),
        ));
    };
    let size = ty.num_bytes().unwrap_or(0);
    let data_len = npy.len().checked_mul(size as u64);
    if data_len.is_none_or(|n| n > file_len) {
        return Err(format_err(
            path,
            format!(
                "header promises {} elements of {size} bytes but the file is {file_len} bytes",
                npy.len()
            ),
        ));
    }
    Ok((npy, ty))
}

fn read_features(path: &Path) -> Result<(Vec<f32>, u64, usize), DatasetError> {
    let (npy, ty) = open(path)?;
    let shape = npy.shape().to_vec();
    let &[rows, d] = shape.as_slice() else {
        return Err(format_err(
            path,
            format!("features must be a 2-D array, found shape {shape:?}"),
        ));
    };
    if d == 0 || d > MAX_FEATURES {
        return Err(format_err(
            path,
            format!("features must have 1 to {MAX_FEATURES} columns, found {d}"),
        ));
    }
    read_floats(path, npy, ty, rows, d)
}

/// Regression targets: a 1-D array (one target per sample) or a 2-D array
/// of `k` targets per sample, float32 or float64, every value finite.
pub(crate) fn read_targets(path: &Path) -> Result<Labels, DatasetError> {
    let (npy, ty) = open(path)?;
    let shape = npy.shape().to_vec();
    let (rows, k) = match *shape.as_slice() {
        [rows] => (rows, 1),
        [rows, k] => (rows, k),
        _ => {
            return Err(format_err(
                path,
                format!("regression targets must be a 1-D or 2-D array, found shape {shape:?}"),
            ));
        }
    };
    if k == 0 || k > MAX_TARGETS {
        return Err(format_err(
            path,
            format!("targets must have 1 to {MAX_TARGETS} columns, found {k}"),
        ));
    }
    let (values, _, width) = read_floats(path, npy, ty, rows, k)?;
    Ok(Labels::Targets { width, values })
}

/// A `rows` × `d` float32/float64 array as row-major f32, every value finite.
fn read_floats(
    path: &Path,
    npy: Npy,
    ty: TypeStr,
    rows: u64,
    d: u64,
) -> Result<(Vec<f32>, u64, usize), DatasetError> {
    if rows == 0 {
        return Err(DatasetError::EmptyInput { path: path.into() });
    }
    let order = npy.order();
    let io_err = |e: std::io::Error| format_err(path, format!("cannot read data: {e}"));
    let flat: Vec<f32> = match (ty.type_char(), ty.num_bytes()) {
        (TypeChar::Float, Some(4)) => npy.into_vec::<f32>().map_err(io_err)?,
        (TypeChar::Float, Some(8)) => npy
            .into_vec::<f64>()
            .map_err(io_err)?
            .into_iter()
            .map(|v| v as f32)
            .collect(),
        _ => {
            return Err(format_err(
                path,
                format!("values must be float32 or float64, found {ty}"),
            ));
        }
    };
    // Both dimensions are bounded by the file length checked in `open`.
    let (r, c) = (rows as usize, d as usize);
    let x = match order {
        Order::C => flat,
        // Column-major on disk: element (i, j) is at j * rows + i.
        Order::Fortran => (0..r * c).map(|k| flat[(k % c) * r + k / c]).collect(),
    };
    if let Some(k) = x.iter().position(|v| !v.is_finite()) {
        return Err(DatasetError::NpyNonFinite {
            path: path.into(),
            row: (k / c) as u64,
            column: (k % c) as u64,
        });
    }
    Ok((x, rows, c))
}

pub(crate) fn read_labels(path: &Path) -> Result<Vec<i64>, DatasetError> {
    let (npy, ty) = open(path)?;
    let shape = npy.shape().to_vec();
    if shape.len() != 1 {
        return Err(format_err(
            path,
            format!("labels must be a 1-D array, found shape {shape:?}"),
        ));
    }
    let io_err = |e: std::io::Error| format_err(path, format!("cannot read data: {e}"));
    // Widened to i128 so that every integer type converts losslessly before
    // the range check.
    let wide: Vec<i128> = match (ty.type_char(), ty.num_bytes()) {
        (TypeChar::Int, Some(1)) => widen(npy.into_vec::<i8>().map_err(io_err)?),
        (TypeChar::Int, Some(2)) => widen(npy.into_vec::<i16>().map_err(io_err)?),
        (TypeChar::Int, Some(4)) => widen(npy.into_vec::<i32>().map_err(io_err)?),
        (TypeChar::Int, Some(8)) => widen(npy.into_vec::<i64>().map_err(io_err)?),
        (TypeChar::Uint, Some(1)) => widen(npy.into_vec::<u8>().map_err(io_err)?),
        (TypeChar::Uint, Some(2)) => widen(npy.into_vec::<u16>().map_err(io_err)?),
        (TypeChar::Uint, Some(4)) => widen(npy.into_vec::<u32>().map_err(io_err)?),
        (TypeChar::Uint, Some(8)) => widen(npy.into_vec::<u64>().map_err(io_err)?),
        _ => {
            return Err(format_err(
                path,
                format!("labels must be integers, found {ty}"),
            ));
        }
    };
    wide.into_iter()
        .enumerate()
        .map(|(i, v)| {
            if (0..i128::from(MAX_CLASSES)).contains(&v) {
                Ok(v as i64)
            } else {
                Err(DatasetError::NpyBadLabel {
                    path: path.into(),
                    index: i as u64,
                    value: v.to_string(),
                    limit: MAX_CLASSES,
                })
            }
        })
        .collect()
}

fn widen<T: Into<i128>>(values: Vec<T>) -> Vec<i128> {
    values.into_iter().map(Into::into).collect()
}

/// Image pixels as stored: u8 stays u8 (a quarter of f32's bytes on disk),
/// float64 becomes f32.
pub(crate) enum Pixels {
    U8(Vec<u8>),
    F32(Vec<f32>),
}

/// Images read from an NPY file, in `[n, C, H, W]` order.
pub(crate) struct Images {
    pub pixels: Pixels,
    pub samples: usize,
    /// `[C, H, W]`.
    pub shape: [usize; 3],
}

/// Reads an image array: `[n, C, H, W]`, `[n, H, W]` (one channel) or, with
/// `channels_last`, `[n, H, W, C]` (transposed here to `[n, C, H, W]`), of
/// uint8, float32 or float64, every float finite.
pub(crate) fn read_images(path: &Path, channels_last: bool) -> Result<Images, DatasetError> {
    let (npy, ty) = open(path)?;
    let dims = npy.shape().to_vec();
    // Bounded by the file length checked in `open`, so these fit in usize.
    let dims: Vec<usize> = dims.iter().map(|&v| v as usize).collect();
    let (n, shape) = match (dims.as_slice(), channels_last) {
        (&[n, h, w], false) => (n, [1, h, w]),
        (&[n, c, h, w], false) => (n, [c, h, w]),
        (&[n, h, w, c], true) => (n, [c, h, w]),
        (_, false) => {
            return Err(format_err(
                path,
                format!(
                    "images must be a 4-D [n, C, H, W] or 3-D [n, H, W] array, found shape \
                     {dims:?} (channels-last [n, H, W, C] needs --channels-last)"
                ),
            ));
        }
        (_, true) => {
            return Err(format_err(
                path,
                format!("--channels-last needs a 4-D [n, H, W, C] array, found shape {dims:?}"),
            ));
        }
    };
    if n == 0 {
        return Err(DatasetError::EmptyInput { path: path.into() });
    }
    if shape.contains(&0) {
        return Err(format_err(
            path,
            format!("images of shape [C, H, W] = {shape:?} have a zero side"),
        ));
    }
    if shape[0] as u64 > MAX_CHANNELS {
        return Err(format_err(
            path,
            format!(
                "images have {} channels, at most {MAX_CHANNELS} are allowed",
                shape[0]
            ),
        ));
    }
    let d = shape.iter().product::<usize>() as u64;
    if d > MAX_FEATURES {
        return Err(format_err(
            path,
            format!(
                "images of shape [C, H, W] = {shape:?} hold {d} values each, at most \
                 {MAX_FEATURES} are allowed"
            ),
        ));
    }
    let order = npy.order();
    let io_err = |e: std::io::Error| format_err(path, format!("cannot read data: {e}"));
    let pixels = match (ty.type_char(), ty.num_bytes()) {
        (TypeChar::Uint, Some(1)) => Pixels::U8(npy.into_vec::<u8>().map_err(io_err)?),
        (TypeChar::Float, Some(4)) => Pixels::F32(npy.into_vec::<f32>().map_err(io_err)?),
        (TypeChar::Float, Some(8)) => Pixels::F32(
            npy.into_vec::<f64>()
                .map_err(io_err)?
                .into_iter()
                .map(|v| v as f32)
                .collect(),
        ),
        _ => {
            return Err(format_err(
                path,
                format!("images must be uint8, float32 or float64, found {ty}"),
            ));
        }
    };
    // To C order (a Fortran-order array is the C-order array of the reversed
    // shape), then channels to the front.
    let rank = dims.len();
    let mut pixels = match order {
        Order::C => pixels,
        Order::Fortran => {
            let reversed: Vec<usize> = dims.iter().rev().copied().collect();
            let axes: Vec<usize> = (0..rank).rev().collect();
            pixels.permute(&reversed, &axes)
        }
    };
    if channels_last {
        pixels = pixels.permute(&dims, &[0, 3, 1, 2]);
    }
    if let Pixels::F32(x) = &pixels
        && let Some(k) = x.iter().position(|v| !v.is_finite())
    {
        let (per, plane) = (d as usize, shape[1] * shape[2]);
        let i = k % per;
        let (c, row, col) = (i / plane, (i % plane) / shape[2], i % shape[2]);
        return Err(format_err(
            path,
            format!(
                "image {} has a non-finite value at channel {c}, row {row}, column {col}",
                k / per
            ),
        ));
    }
    Ok(Images {
        pixels,
        samples: n,
        shape,
    })
}

impl Pixels {
    /// The array of `shape` (C order) with its axes reordered: axis `i` of
    /// the result is axis `axes[i]` of this one.
    fn permute(self, shape: &[usize], axes: &[usize]) -> Pixels {
        match self {
            Pixels::U8(x) => Pixels::U8(permute(&x, shape, axes)),
            Pixels::F32(x) => Pixels::F32(permute(&x, shape, axes)),
        }
    }
}

/// `data`, a C-order array of `shape`, with its axes reordered (axis `i` of
/// the result is axis `axes[i]` of `data`), in C order. Walks the result in
/// order, stepping the source offset by each axis's stride, so the cost is
/// one add per element.
pub(crate) fn permute<T: Copy>(data: &[T], shape: &[usize], axes: &[usize]) -> Vec<T> {
    let rank = shape.len();
    if data.is_empty() || rank == 0 {
        return data.to_vec();
    }
    let mut stride = vec![1usize; rank];
    for i in (0..rank - 1).rev() {
        stride[i] = stride[i + 1] * shape[i + 1];
    }
    let out_shape: Vec<usize> = axes.iter().map(|&a| shape[a]).collect();
    let out_stride: Vec<usize> = axes.iter().map(|&a| stride[a]).collect();
    let mut out = Vec::with_capacity(data.len());
    let mut index = vec![0usize; rank];
    let mut offset = 0usize;
    for _ in 0..data.len() {
        out.push(data[offset]);
        for k in (0..rank).rev() {
            index[k] += 1;
            offset += out_stride[k];
            if index[k] < out_shape[k] {
                break;
            }
            offset -= out_stride[k] * out_shape[k];
            index[k] = 0;
        }
    }
    out
}
