//! Shard files: writing a dataset (shards first, manifest last, each through
//! a temporary file, fsync and rename) and loading one with every shard's
//! sha256, tensor dtypes, shapes, finiteness and label range verified.
//! Manifest parsing lives in `manifest.rs`; turning CSV/NPY into samples in
//! `pack.rs`.

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use sha2::{Digest, Sha256};

use super::DatasetError;
use super::manifest::{
    DatasetManifest, FORMAT_VERSION, MANIFEST_FILE, MAX_SAMPLES, Schema, ShardEntry,
    Standardization,
};

/// Room allowed for a shard's safetensors header on top of its tensor bytes;
/// ours is a few hundred bytes.
const MAX_SHARD_HEADER_BYTES: u64 = 1 << 20;

/// A whole dataset in memory, every shard verified against its manifest.
/// Sample `i` is `x[i * features .. (i + 1) * features]` with label `y[i]`,
/// numbered in manifest shard order.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    pub manifest: DatasetManifest,
    pub features: usize,
    pub x: Vec<f32>,
    pub y: Vec<i64>,
}

/// What [`write_dataset`] needs besides the samples themselves.
#[derive(Clone, Debug, PartialEq)]
pub struct WriteOptions {
    /// The dataset's name, recorded in the manifest.
    pub name: String,
    /// Features per sample (`d`).
    pub features: usize,
    /// Labels must lie in `0..num_classes`.
    pub num_classes: u32,
    /// Samples per shard; the last shard holds the remainder.
    pub shard_samples: usize,
    /// Already applied to the samples being written.
    pub standardization: Option<Standardization>,
    pub source: Option<String>,
}

/// The file name of shard `index`: `shard-00000.safetensors`, ...
pub fn shard_file_name(index: usize) -> String {
    format!("shard-{index:05}.safetensors")
}

impl Dataset {
    /// Reads the manifest in `dir` and every shard it lists, verifying each
    /// shard's sha256 before decoding it, its tensors against the schema, that
    /// every feature is finite and every label lies in `0..num_classes`.
    pub fn load(dir: &Path) -> Result<Dataset, DatasetError> {
        let manifest = DatasetManifest::read(dir)?;
        let d = manifest.features();
        let num_classes = manifest.schema.num_classes;
        let mut x = Vec::new();
        let mut y = Vec::new();
        for entry in &manifest.shards {
            let bytes = read_shard(dir, entry, d)?;
            let shard = &entry.file;
            let tensors =
                SafeTensors::deserialize(&bytes).map_err(|source| DatasetError::ShardFormat {
                    shard: shard.clone(),
                    source,
                })?;
            // Bounded by MAX_SAMPLES, so these fit in usize on 64-bit hosts.
            let n = entry.samples as usize;
            let xs = tensor(&tensors, shard, "x", Dtype::F32, &[n, d])?;
            let ys = tensor(&tensors, shard, "y", Dtype::I64, &[n])?;
            x.reserve(n * d);
            y.reserve(n);
            for (i, row) in xs.data().chunks_exact(4 * d).enumerate() {
                for v in row.chunks_exact(4) {
                    let v = f32::from_le_bytes([v[0], v[1], v[2], v[3]]);
                    if !v.is_finite() {
                        return Err(DatasetError::NonFiniteFeature {
                            shard: shard.clone(),
                            index: i as u64,
                        });
                    }
                    x.push(v);
                }
            }
            for (i, v) in ys.data().chunks_exact(8).enumerate() {
                let label = i64::from_le_bytes([v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]]);
                if label < 0 || label >= i64::from(num_classes) {
                    return Err(DatasetError::LabelOutOfRange {
                        shard: shard.clone(),
                        index: i as u64,
                        label,
                        num_classes,
                    });
                }
                y.push(label);
            }
        }
        Ok(Dataset {
            manifest,
            features: d,
            x,
            y,
        })
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.y.len()
    }

    /// Whether the dataset holds no samples (never true for a loaded one).
    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }

    /// Features and label of sample `index`, or `None` past the end.
    pub fn sample(&self, index: usize) -> Option<(&[f32], i64)> {
        let label = *self.y.get(index)?;
        let start = index.checked_mul(self.features)?;
        let row = self.x.get(start..start.checked_add(self.features)?)?;
        Some((row, label))
    }
}

/// Reads a shard file, refusing files larger than its entry allows, and
/// checks its sha256.
fn read_shard(dir: &Path, entry: &ShardEntry, d: usize) -> Result<Vec<u8>, DatasetError> {
    let path = dir.join(&entry.file);
    let read_err = |source| DatasetError::Read {
        path: path.clone(),
        source,
    };
    // Validated bounds (samples <= 2^40, d <= 2^20) keep this below u64::MAX.
    let limit = entry.samples * (4 * d as u64 + 8) + MAX_SHARD_HEADER_BYTES;
    let file = File::open(&path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    if size > limit {
        return Err(DatasetError::ShardTooLarge {
            shard: entry.file.clone(),
            size,
            limit,
        });
    }
    let mut bytes = Vec::with_capacity(size as usize);
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    let actual = hex::encode(Sha256::digest(&bytes));
    if actual != entry.sha256 {
        return Err(DatasetError::ShardChecksum {
            shard: entry.file.clone(),
            expected: entry.sha256.clone(),
            actual,
        });
    }
    Ok(bytes)
}

fn tensor<'a>(
    tensors: &SafeTensors<'a>,
    shard: &str,
    name: &'static str,
    dtype: Dtype,
    shape: &[usize],
) -> Result<TensorView<'a>, DatasetError> {
    let expected = format!("{dtype:?} {shape:?}");
    let view = tensors
        .tensor(name)
        .map_err(|_| DatasetError::ShardTensorMismatch {
            shard: shard.into(),
            tensor: name,
            expected: expected.clone(),
            found: "missing".into(),
        })?;
    if view.dtype() != dtype || view.shape() != shape {
        return Err(DatasetError::ShardTensorMismatch {
            shard: shard.into(),
            tensor: name,
            expected,
            found: format!("{:?} {:?}", view.dtype(), view.shape()),
        });
    }
    Ok(view)
}

/// Writes `x` (row-major, `opts.features` per sample) and `y` as a dataset in
/// `dir` (created if needed): shards of `opts.shard_samples` samples, then
/// `MANIFEST.json`, each file written under a temporary name, fsynced and
/// renamed, so the manifest appears only once every shard it names is durable.
/// Refuses a directory that already holds a manifest.
pub fn write_dataset(
    dir: &Path,
    opts: &WriteOptions,
    x: &[f32],
    y: &[i64],
) -> Result<DatasetManifest, DatasetError> {
    let d = opts.features;
    let invalid = |msg: String| Err(DatasetError::InvalidInput(msg));
    if d == 0 {
        return invalid("samples must have at least one feature".into());
    }
    if opts.shard_samples == 0 {
        return invalid("shard size must be at least one sample".into());
    }
    if y.is_empty() {
        return invalid("a dataset needs at least one sample".into());
    }
    if y.len().checked_mul(d) != Some(x.len()) {
        return Err(DatasetError::DataShapeMismatch {
            x_len: x.len(),
            samples: y.len(),
            features: d,
        });
    }
    if let Some(i) = y
        .iter()
        .position(|&l| l < 0 || l >= i64::from(opts.num_classes))
    {
        return invalid(format!(
            "sample {i} has label {}, outside 0..{}",
            y[i], opts.num_classes
        ));
    }
    if let Some(i) = x.iter().position(|v| !v.is_finite()) {
        return invalid(format!("sample {} has a non-finite feature", i / d));
    }
    if y.len() as u64 > MAX_SAMPLES {
        return Err(DatasetError::TooLarge {
            what: "num_samples",
            value: y.len() as u64,
            limit: MAX_SAMPLES,
        });
    }

    let mut manifest = DatasetManifest {
        format_version: FORMAT_VERSION,
        name: opts.name.clone(),
        schema: Schema::new(d, opts.num_classes),
        num_samples: y.len() as u64,
        shards: y
            .chunks(opts.shard_samples)
            .enumerate()
            .map(|(i, ys)| ShardEntry {
                file: shard_file_name(i),
                samples: ys.len() as u64,
                sha256: "0".repeat(64),
            })
            .collect(),
        standardization: opts.standardization.clone(),
        source: opts.source.clone(),
    };
    // Everything but the hashes is known: refuse before writing anything.
    manifest.validate()?;

    let manifest_path = dir.join(MANIFEST_FILE);
    if manifest_path.exists() {
        return Err(DatasetError::OutputExists { path: dir.into() });
    }
    std::fs::create_dir_all(dir).map_err(|source| DatasetError::Write {
        path: dir.into(),
        source,
    })?;

    let rows = x
        .chunks(opts.shard_samples * d)
        .zip(y.chunks(opts.shard_samples));
    for (entry, (xs, ys)) in manifest.shards.iter_mut().zip(rows) {
        let bytes = encode_shard(&entry.file, xs, ys, d)?;
        entry.sha256 = hex::encode(Sha256::digest(&bytes));
        write_file_atomically(&dir.join(&entry.file), &bytes)?;
    }
    sync_dir(dir)?;
    let json = serde_json::to_vec_pretty(&manifest).map_err(|e| DatasetError::Write {
        path: manifest_path.clone(),
        source: e.into(),
    })?;
    write_file_atomically(&manifest_path, &json)?;
    sync_dir(dir)?;
    Ok(manifest)
}

fn encode_shard(file: &str, x: &[f32], y: &[i64], d: usize) -> Result<Vec<u8>, DatasetError> {
    let x_bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
    let y_bytes: Vec<u8> = y.iter().flat_map(|v| v.to_le_bytes()).collect();
    let format_err = |source| DatasetError::ShardFormat {
        shard: file.into(),
        source,
    };
    let xv = TensorView::new(Dtype::F32, vec![y.len(), d], &x_bytes).map_err(format_err)?;
    let yv = TensorView::new(Dtype::I64, vec![y.len()], &y_bytes).map_err(format_err)?;
    safetensors::serialize([("x", xv), ("y", yv)], None).map_err(format_err)
}

/// Writes `bytes` to a hidden temporary file next to `path`, fsyncs it and
/// renames it over `path`, so readers see either nothing or the whole file.
fn write_file_atomically(path: &Path, bytes: &[u8]) -> Result<(), DatasetError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let write_err = |source| DatasetError::Write {
        path: path.into(),
        source,
    };
    let mut file = File::create(&tmp).map_err(write_err)?;
    file.write_all(bytes).map_err(write_err)?;
    file.sync_all().map_err(write_err)?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(write_err)
}

/// Makes renames inside `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), DatasetError> {
    #[cfg(unix)]
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| DatasetError::Write {
            path: dir.into(),
            source,
        })?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}
