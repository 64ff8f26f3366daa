//! Reading a pair of NPY files — 2-D float32/float64 features, 1-D integer
//! labels of any width (or, for regression, 1-D or 2-D float targets) — into
//! raw samples, refusing headers that promise more
//! data than the file holds. Splitting, standardizing and writing happen in
//! `pack.rs`.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use npyz::{DType, NpyFile, Order, TypeChar, TypeStr};

use super::DatasetError;
use super::manifest::{MAX_CLASSES, MAX_FEATURES, MAX_TARGETS};
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
fn read_targets(path: &Path) -> Result<Labels, DatasetError> {
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

fn read_labels(path: &Path) -> Result<Vec<i64>, DatasetError> {
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
