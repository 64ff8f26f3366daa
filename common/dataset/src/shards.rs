//! Shard files: writing a dataset (shards first, manifest last, each through
//! a temporary file, fsync and rename) and reading shards one at a time with
//! each one's sha256, tensor dtypes, shapes, finiteness and label range (or,
//! for regression targets, their finiteness) verified as it is read. The
//! labels of a shard are [`Labels`]: i64 classes, f32 targets or i64 token
//! sequences. Where the files live is behind [`ShardReader`]
//! (a local or shared directory today). Manifest parsing lives in
//! `manifest.rs`; turning CSV/NPY into samples in `pack.rs`.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use sha2::{Digest, Sha256};

use super::DatasetError;
use super::manifest::{
    DatasetManifest, ElementType, FORMAT_VERSION, ImageNormalization, LabelKind, MANIFEST_FILE,
    MAX_SAMPLES, MAX_TOKENIZER_BYTES, Schema, ShardEntry, Standardization, TOKENIZER_FILE,
    TokenizerEntry,
};

/// Room allowed for a shard's safetensors header on top of its tensor bytes;
/// ours is a few hundred bytes.
const MAX_SHARD_HEADER_BYTES: u64 = 1 << 20;

/// A whole dataset in memory, every shard verified against its manifest.
/// Sample `i` is `x[i * features .. (i + 1) * features]` with label (or
/// targets) `y` row `i`, numbered in manifest shard order.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    pub manifest: DatasetManifest,
    pub features: usize,
    pub x: Vec<f32>,
    pub y: Labels,
}

/// The `y` of a set of samples: class labels or regression targets.
#[derive(Clone, Debug, PartialEq)]
pub enum Labels {
    /// One label per sample.
    Classes(Vec<i64>),
    /// `width` targets per sample, row-major.
    Targets { width: usize, values: Vec<f32> },
    /// `len` tokens per sample, row-major.
    Tokens { len: usize, values: Vec<i64> },
}

/// A borrowed run of rows of [`Labels`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LabelRows<'a> {
    Classes(&'a [i64]),
    Targets { width: usize, values: &'a [f32] },
    Tokens { len: usize, values: &'a [i64] },
}

impl Labels {
    /// No rows of the given kind.
    pub fn empty(kind: LabelKind) -> Labels {
        match kind {
            LabelKind::Classes(_) => Labels::Classes(Vec::new()),
            LabelKind::Targets(width) => Labels::Targets {
                width,
                values: Vec::new(),
            },
            LabelKind::Tokens { len, .. } => Labels::Tokens {
                len,
                values: Vec::new(),
            },
        }
    }

    /// Number of samples (rows).
    pub fn len(&self) -> usize {
        self.rows().len()
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// All rows, borrowed.
    pub fn rows(&self) -> LabelRows<'_> {
        match self {
            Labels::Classes(y) => LabelRows::Classes(y),
            Labels::Targets { width, values } => LabelRows::Targets {
                width: *width,
                values,
            },
            Labels::Tokens { len, values } => LabelRows::Tokens { len: *len, values },
        }
    }

    /// Rows `start..end`, borrowed. Panics past the end, like slicing.
    pub fn slice(&self, start: usize, end: usize) -> LabelRows<'_> {
        self.rows().slice(start, end)
    }

    /// Appends `rows`; they must be of the same kind (and width).
    pub fn extend(&mut self, rows: LabelRows<'_>) -> Result<(), DatasetError> {
        match (self, rows) {
            (Labels::Classes(y), LabelRows::Classes(r)) => y.extend_from_slice(r),
            (
                Labels::Targets { width, values },
                LabelRows::Targets {
                    width: w,
                    values: r,
                },
            ) if *width == w => values.extend_from_slice(r),
            (Labels::Tokens { len, values }, LabelRows::Tokens { len: l, values: r })
                if *len == l =>
            {
                values.extend_from_slice(r)
            }
            (this, rows) => {
                return Err(DatasetError::InvalidInput(format!(
                    "cannot append {} to {}",
                    rows.describe(),
                    this.rows().describe()
                )));
            }
        }
        Ok(())
    }

    /// The class labels, if these are classes.
    pub fn classes(&self) -> Option<&[i64]> {
        match self {
            Labels::Classes(y) => Some(y),
            Labels::Targets { .. } | Labels::Tokens { .. } => None,
        }
    }

    /// The targets (row-major), if these are regression targets.
    pub fn targets(&self) -> Option<&[f32]> {
        match self {
            Labels::Targets { values, .. } => Some(values),
            Labels::Classes(_) | Labels::Tokens { .. } => None,
        }
    }

    /// The tokens (row-major), if these are token sequences.
    pub fn tokens(&self) -> Option<&[i64]> {
        match self {
            Labels::Tokens { values, .. } => Some(values),
            Labels::Classes(_) | Labels::Targets { .. } => None,
        }
    }
}

impl<'a> LabelRows<'a> {
    /// Number of samples (rows).
    pub fn len(&self) -> usize {
        match self {
            LabelRows::Classes(y) => y.len(),
            LabelRows::Targets { width, values } => values.len() / (*width).max(1),
            LabelRows::Tokens { len, values } => values.len() / (*len).max(1),
        }
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rows `start..end`. Panics past the end, like slicing.
    pub fn slice(self, start: usize, end: usize) -> LabelRows<'a> {
        match self {
            LabelRows::Classes(y) => LabelRows::Classes(&y[start..end]),
            LabelRows::Targets { width, values } => LabelRows::Targets {
                width,
                values: &values[start * width..end * width],
            },
            LabelRows::Tokens { len, values } => LabelRows::Tokens {
                len,
                values: &values[start * len..end * len],
            },
        }
    }

    /// What these rows are, for messages (a slice does not know its
    /// dataset's class count).
    fn describe(&self) -> String {
        match self {
            LabelRows::Classes(_) => "class labels".into(),
            LabelRows::Targets { width, .. } => LabelKind::Targets(*width).to_string(),
            LabelRows::Tokens { len, .. } => format!("token sequences ({len} per sample)"),
        }
    }
}

/// What [`write_dataset`] needs besides the samples themselves.
#[derive(Clone, Debug, PartialEq)]
pub struct WriteOptions {
    /// The dataset's name, recorded in the manifest.
    pub name: String,
    /// Features per sample (`d`).
    pub features: usize,
    /// Class labels in `0..classes`, or `k` regression targets per sample.
    pub labels: LabelKind,
    /// Samples per shard; the last shard holds the remainder.
    pub shard_samples: usize,
    /// Already applied to the samples being written.
    pub standardization: Option<Standardization>,
    pub source: Option<String>,
    /// A token dataset's tokenizer (`tokenizer.json` bytes), written as [`TOKENIZER_FILE`]
    /// before the manifest, which records its sha256.
    pub tokenizer: Option<Vec<u8>>,
    /// `Some` for an image dataset, whose `features` must then be `C·H·W`.
    pub image: Option<ImageLayout>,
}

/// How an image dataset's `x` is stored and read.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageLayout {
    /// `[C, H, W]` of one sample.
    pub shape: [usize; 3],
    /// [`ElementType::U8`] or [`ElementType::F32`]: what the shards hold.
    pub dtype: ElementType,
    /// Recorded in the manifest and applied by readers, not to the stored
    /// values.
    pub normalization: Option<ImageNormalization>,
}

/// Rows of features handed to a writer, in the dataset's stored element
/// type: f32 for flat features and f32 images, u8 for u8 images.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum FeatureRows<'a> {
    F32(&'a [f32]),
    U8(&'a [u8]),
}

impl FeatureRows<'_> {
    /// Number of values (samples times features).
    pub fn len(&self) -> usize {
        match self {
            FeatureRows::F32(x) => x.len(),
            FeatureRows::U8(x) => x.len(),
        }
    }

    /// Whether there are no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn dtype(&self) -> ElementType {
        match self {
            FeatureRows::F32(_) => ElementType::F32,
            FeatureRows::U8(_) => ElementType::U8,
        }
    }

    /// Values `start..end`. Panics past the end, like slicing.
    fn slice(&self, start: usize, end: usize) -> Self {
        match self {
            FeatureRows::F32(x) => FeatureRows::F32(&x[start..end]),
            FeatureRows::U8(x) => FeatureRows::U8(&x[start..end]),
        }
    }
}

/// The file name of shard `index`: `shard-00000.safetensors`, ...
pub fn shard_file_name(index: usize) -> String {
    format!("shard-{index:05}.safetensors")
}

/// Where a dataset's files are read from. A shared file system
/// ([`LocalDir`]) today; object storage fits behind the same two calls
/// without touching the trainer.
pub trait ShardReader: Send + Sync {
    /// Where `file` lives, as error messages name it (a path, or a URL).
    fn location(&self, file: &str) -> String;
    /// The whole of `file`, or an error naming its location. Reads at most
    /// `limit + 1` bytes, so a caller can tell an oversized file without
    /// holding all of it.
    fn read(&self, file: &str, limit: u64) -> Result<Vec<u8>, DatasetError>;
}

/// A dataset directory on a local or shared file system.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalDir(pub PathBuf);

impl ShardReader for LocalDir {
    fn location(&self, file: &str) -> String {
        self.0.join(file).display().to_string()
    }

    fn read(&self, file: &str, limit: u64) -> Result<Vec<u8>, DatasetError> {
        let path = self.0.join(file);
        let read_err = |source| DatasetError::Read {
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(read_err)?;
        let size = file.metadata().map_err(read_err)?.len();
        let mut bytes = Vec::with_capacity(size.min(limit.saturating_add(1)) as usize);
        file.take(limit.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(read_err)?;
        Ok(bytes)
    }
}

/// One shard's samples, decoded and verified: sample `i` of the shard is
/// `x[i * features .. (i + 1) * features]` with label (or targets) `y` row `i`.
#[derive(Clone, Debug, PartialEq)]
pub struct DecodedShard {
    pub features: usize,
    pub x: Vec<f32>,
    pub y: Labels,
}

impl DecodedShard {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.y.len()
    }

    /// Whether the shard holds no samples (never true for a verified one).
    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }

    /// Bytes of memory the decoded samples take.
    pub fn bytes(&self) -> u64 {
        let labels = match &self.y {
            Labels::Classes(_) => LabelKind::Classes(0),
            Labels::Targets { width, .. } => LabelKind::Targets(*width),
            Labels::Tokens { len, .. } => LabelKind::Tokens {
                vocab: 0,
                len: *len,
            },
        };
        decoded_bytes(self.len() as u64, self.features, labels)
    }

    /// Features of row `row`.
    pub fn features_of(&self, row: usize) -> &[f32] {
        &self.x[row * self.features..(row + 1) * self.features]
    }
}

/// Decoded bytes a shard holds by default, so that a default shuffle window
/// of shards fits a default streaming cache twice (see the job file's
/// `[data]` keys).
pub const DEFAULT_SHARD_BYTES: u64 = 32 << 20;

/// Samples per shard by default for samples of `features` features and
/// `labels`: about [`DEFAULT_SHARD_BYTES`] decoded, at least one.
pub fn default_shard_samples(features: usize, labels: LabelKind) -> usize {
    (DEFAULT_SHARD_BYTES / decoded_bytes(1, features, labels).max(1)).max(1) as usize
}

/// Bytes `samples` decoded samples of `features` features take in memory
/// (f32 features, and an i64 label or `k` f32 targets each).
pub fn decoded_bytes(samples: u64, features: usize, labels: LabelKind) -> u64 {
    samples.saturating_mul((4 * features as u64).saturating_add(labels.bytes_per_sample()))
}

/// Reads shard `index` of `manifest` through `reader` and verifies it: size
/// bound, sha256, tensor names, dtypes and shapes against the schema, every
/// feature finite, every label in range (every target finite). Errors name
/// the shard's location and the check that failed.
///
/// Features come back as f32 `[n, d]` whatever their stored type: u8 image
/// pixels are widened and an image dataset's `image_normalization` is applied
/// here, so that every consumer (training loaded whole or streamed,
/// evaluation, benchmarks) sees the same values and models need not know how
/// the pixels were stored.
pub fn read_shard(
    reader: &dyn ShardReader,
    manifest: &DatasetManifest,
    index: usize,
) -> Result<DecodedShard, DatasetError> {
    let entry = manifest.shards.get(index).ok_or_else(|| {
        DatasetError::InvalidInput(format!(
            "shard {index} is outside the manifest's {} shards",
            manifest.shards.len()
        ))
    })?;
    let d = manifest.features();
    let kind = manifest.labels();
    let shard = reader.location(&entry.file);
    // Validated bounds (samples <= 2^40, d <= 2^20, k <= 2^16) keep this
    // below u64::MAX.
    let limit = decoded_bytes(entry.samples, d, kind) + MAX_SHARD_HEADER_BYTES;
    let bytes = reader.read(&entry.file, limit)?;
    if bytes.len() as u64 > limit {
        return Err(DatasetError::ShardTooLarge {
            shard,
            size: bytes.len() as u64,
            limit,
        });
    }
    let actual = hex::encode(Sha256::digest(&bytes));
    if actual != entry.sha256 {
        return Err(DatasetError::ShardChecksum {
            shard,
            expected: entry.sha256.clone(),
            actual,
        });
    }
    let tensors = SafeTensors::deserialize(&bytes).map_err(|source| DatasetError::ShardFormat {
        shard: shard.clone(),
        source,
    })?;
    // Bounded by MAX_SAMPLES, so these fit in usize on 64-bit hosts.
    let n = entry.samples as usize;
    let image = manifest.image_shape();
    let (x_dtype, x_shape) = match (image, manifest.schema.features.dtype) {
        (Some([c, h, w]), ElementType::U8) => (Dtype::U8, vec![n, c, h, w]),
        (Some([c, h, w]), _) => (Dtype::F32, vec![n, c, h, w]),
        (None, _) => (Dtype::F32, vec![n, d]),
    };
    let xs = tensor(&tensors, &shard, "x", x_dtype, &x_shape)?;
    let ys = match kind {
        LabelKind::Classes(_) => tensor(&tensors, &shard, "y", Dtype::I64, &[n])?,
        LabelKind::Targets(k) => tensor(&tensors, &shard, "y", Dtype::F32, &[n, k])?,
        LabelKind::Tokens { len, .. } => tensor(&tensors, &shard, "y", Dtype::I64, &[n, len])?,
    };
    // Decoded first, checked after: two flat loops the compiler vectorizes
    // (a shard is tens of MiB, read on the step path when streaming).
    let mut x = vec![0f32; n * d];
    if x_dtype == Dtype::U8 {
        for (v, &b) in x.iter_mut().zip(xs.data()) {
            *v = f32::from(b);
        }
    } else {
        for (v, b) in x.iter_mut().zip(xs.data().chunks_exact(4)) {
            *v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
    }
    if let (Some([_, h, w]), Some(norm)) = (image, &manifest.image_normalization) {
        norm.apply(&mut x, h * w);
    }
    // After normalization: a finite stored value could still overflow it.
    if let Some(i) = x.iter().position(|v| !v.is_finite()) {
        return Err(DatasetError::NonFiniteFeature {
            shard,
            index: (i / d) as u64,
        });
    }
    let y = match kind {
        LabelKind::Classes(num_classes) => {
            let mut y = vec![0i64; n];
            for (v, b) in y.iter_mut().zip(ys.data().chunks_exact(8)) {
                *v = i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
            }
            if let Some(i) = y.iter().position(|&l| l < 0 || l >= i64::from(num_classes)) {
                return Err(DatasetError::LabelOutOfRange {
                    shard,
                    index: i as u64,
                    label: y[i],
                    num_classes,
                });
            }
            Labels::Classes(y)
        }
        LabelKind::Targets(k) => {
            let mut t = vec![0f32; n * k];
            for (v, b) in t.iter_mut().zip(ys.data().chunks_exact(4)) {
                *v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
            if let Some(i) = t.iter().position(|v| !v.is_finite()) {
                return Err(DatasetError::NonFiniteTarget {
                    shard,
                    index: (i / k) as u64,
                });
            }
            Labels::Targets {
                width: k,
                values: t,
            }
        }
        LabelKind::Tokens { vocab, len } => {
            let mut t = vec![0i64; n * len];
            for (v, b) in t.iter_mut().zip(ys.data().chunks_exact(8)) {
                *v = i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
            }
            if let Some(i) = t.iter().position(|&l| l < 0 || l >= i64::from(vocab)) {
                return Err(DatasetError::LabelOutOfRange {
                    shard,
                    index: (i / len) as u64,
                    label: t[i],
                    num_classes: vocab,
                });
            }
            Labels::Tokens { len, values: t }
        }
    };
    Ok(DecodedShard { features: d, x, y })
}

/// The tokenizer file `manifest` lists (a BPE token dataset's `tokenizer.json`), its size
/// bounded and its sha256 verified like a shard's; `None` when it lists none (byte-level
/// tokens, or not a token dataset). Training never needs it: decoding ids into text does.
pub fn read_tokenizer(
    reader: &dyn ShardReader,
    manifest: &DatasetManifest,
) -> Result<Option<Vec<u8>>, DatasetError> {
    let Some(entry) = &manifest.tokenizer else {
        return Ok(None);
    };
    let file = reader.location(&entry.file);
    let bytes = reader.read(&entry.file, MAX_TOKENIZER_BYTES)?;
    if bytes.len() as u64 > MAX_TOKENIZER_BYTES {
        return Err(DatasetError::TooLarge {
            what: "tokenizer file (bytes)",
            value: bytes.len() as u64,
            limit: MAX_TOKENIZER_BYTES,
        });
    }
    let actual = hex::encode(Sha256::digest(&bytes));
    if actual != entry.sha256 {
        return Err(DatasetError::TokenizerChecksum {
            file,
            expected: entry.sha256.clone(),
            actual,
        });
    }
    Ok(Some(bytes))
}

impl Dataset {
    /// Reads the manifest in `dir` and every shard it lists, each verified
    /// as [`read_shard`] does. Holds the whole dataset: a trainer streams
    /// large ones instead.
    pub fn load(dir: &Path) -> Result<Dataset, DatasetError> {
        Dataset::load_with(dir, DatasetManifest::read(dir)?)
    }

    /// [`load`](Self::load) with the manifest already read (and validated) from `dir`.
    pub fn load_with(dir: &Path, manifest: DatasetManifest) -> Result<Dataset, DatasetError> {
        let reader = LocalDir(dir.to_path_buf());
        let d = manifest.features();
        let mut x = Vec::with_capacity((manifest.num_samples as usize).saturating_mul(d));
        let mut y = Labels::empty(manifest.labels());
        for index in 0..manifest.shards.len() {
            let shard = read_shard(&reader, &manifest, index)?;
            x.extend_from_slice(&shard.x);
            y.extend(shard.y.rows())?;
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

    /// Features and label (or targets) of sample `index`, or `None` past
    /// the end.
    pub fn sample(&self, index: usize) -> Option<(&[f32], LabelRows<'_>)> {
        if index >= self.len() {
            return None;
        }
        let start = index.checked_mul(self.features)?;
        let row = self.x.get(start..start.checked_add(self.features)?)?;
        Some((row, self.y.slice(index, index + 1)))
    }
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

/// Writes `x` (row-major, `opts.features` per sample) and `y` (of the kind
/// `opts.labels` says) as a dataset in
/// `dir` (created if needed): shards of `opts.shard_samples` samples, then
/// `MANIFEST.json`, each file written under a temporary name, fsynced and
/// renamed, so the manifest appears only once every shard it names is durable.
/// Refuses a directory that already holds a manifest.
pub fn write_dataset(
    dir: &Path,
    opts: &WriteOptions,
    x: &[f32],
    y: LabelRows<'_>,
) -> Result<DatasetManifest, DatasetError> {
    write_dataset_rows(dir, opts, FeatureRows::F32(x), y)
}

/// [`write_dataset`] for features in any stored type: u8 rows for a u8 image
/// dataset (`opts.image`), f32 otherwise.
pub fn write_dataset_rows(
    dir: &Path,
    opts: &WriteOptions,
    x: FeatureRows<'_>,
    y: LabelRows<'_>,
) -> Result<DatasetManifest, DatasetError> {
    let d = opts.features;
    // All of it before anything is written: refused input leaves no files.
    let stored = opts.image.as_ref().map_or(ElementType::F32, |i| i.dtype);
    if x.dtype() != stored {
        return Err(DatasetError::InvalidInput(format!(
            "the dataset stores {stored} features, but {} values were given",
            x.dtype()
        )));
    }
    if d > 0 {
        check_samples(x, y, d, opts.labels, 0)?;
    }
    let n = y.len();
    let mut writer = DatasetWriter::create(dir, opts, n as u64)?;
    let per = opts.shard_samples.max(1);
    let mut start = 0;
    while start < n {
        let end = (start + per).min(n);
        writer.write_rows(x.slice(start * d, end * d), y.slice(start, end))?;
        start = end;
    }
    writer.finish()
}

/// Writes a dataset one shard at a time, so a dataset larger than memory
/// can be generated: [`create`](Self::create) with the total sample count,
/// [`write_shard`](Self::write_shard) for each shard in order (each of
/// `opts.shard_samples` samples, the last one the remainder), then
/// [`finish`](Self::finish), which writes the manifest last.
pub struct DatasetWriter {
    dir: PathBuf,
    manifest: DatasetManifest,
    next: usize,
    tokenizer: Option<Vec<u8>>,
}

impl DatasetWriter {
    /// Checks everything known before any sample (shape, sizes, limits, an
    /// existing dataset) and creates `dir`; nothing is written on an error.
    pub fn create(
        dir: &Path,
        opts: &WriteOptions,
        samples: u64,
    ) -> Result<DatasetWriter, DatasetError> {
        let d = opts.features;
        let invalid = |msg: String| Err(DatasetError::InvalidInput(msg));
        if d == 0 {
            return invalid("samples must have at least one feature".into());
        }
        if opts.shard_samples == 0 {
            return invalid("shard size must be at least one sample".into());
        }
        if samples == 0 {
            return invalid("a dataset needs at least one sample".into());
        }
        if samples > MAX_SAMPLES {
            return Err(DatasetError::TooLarge {
                what: "num_samples",
                value: samples,
                limit: MAX_SAMPLES,
            });
        }
        if let Some(image) = &opts.image {
            let [c, h, w] = image.shape;
            if c.checked_mul(h).and_then(|v| v.checked_mul(w)) != Some(d) {
                return invalid(format!(
                    "image shape {:?} holds {} values per sample, not the {d} features given",
                    image.shape,
                    c.saturating_mul(h).saturating_mul(w)
                ));
            }
        }
        let per_shard = opts.shard_samples as u64;
        let shards = samples.div_ceil(per_shard);
        if shards > super::manifest::MAX_SHARDS {
            return Err(DatasetError::TooLarge {
                what: "number of shards",
                value: shards,
                limit: super::manifest::MAX_SHARDS,
            });
        }
        let manifest = DatasetManifest {
            format_version: FORMAT_VERSION,
            name: opts.name.clone(),
            schema: match &opts.image {
                Some(image) => Schema::image(image.shape, image.dtype, opts.labels),
                None => Schema::new(d, opts.labels),
            },
            num_samples: samples,
            shards: (0..shards)
                .map(|i| ShardEntry {
                    file: shard_file_name(i as usize),
                    samples: per_shard.min(samples - i * per_shard),
                    sha256: "0".repeat(64),
                })
                .collect(),
            standardization: opts.standardization.clone(),
            image_normalization: opts.image.as_ref().and_then(|i| i.normalization.clone()),
            source: opts.source.clone(),
            tokenizer: opts.tokenizer.as_ref().map(|json| TokenizerEntry {
                file: TOKENIZER_FILE.into(),
                sha256: hex::encode(Sha256::digest(json)),
            }),
        };
        // Everything but the shard hashes is known: refuse before writing anything.
        manifest.validate()?;
        if dir.join(MANIFEST_FILE).exists() {
            return Err(DatasetError::OutputExists { path: dir.into() });
        }
        std::fs::create_dir_all(dir).map_err(|source| DatasetError::Write {
            path: dir.into(),
            source,
        })?;
        Ok(DatasetWriter {
            dir: dir.into(),
            manifest,
            next: 0,
            tokenizer: opts.tokenizer.clone(),
        })
    }

    /// Verifies and writes the next shard: `y.len()` must be the count its
    /// manifest entry expects, labels in range (targets finite, of the
    /// dataset's width) and features finite.
    pub fn write_shard(&mut self, x: &[f32], y: LabelRows<'_>) -> Result<(), DatasetError> {
        self.write_rows(FeatureRows::F32(x), y)
    }

    /// [`write_shard`](Self::write_shard) for features in the dataset's
    /// stored type (u8 rows for a u8 image dataset).
    pub fn write_rows(&mut self, x: FeatureRows<'_>, y: LabelRows<'_>) -> Result<(), DatasetError> {
        let d = self.manifest.features();
        let stored = self.manifest.schema.features.dtype;
        if x.dtype() != stored {
            return Err(DatasetError::InvalidInput(format!(
                "the dataset stores {stored} features, but {} values were given",
                x.dtype()
            )));
        }
        let image = self.manifest.image_shape();
        let kind = self.manifest.labels();
        let total = self.manifest.shards.len();
        let before: u64 = self.manifest.shards[..self.next.min(total)]
            .iter()
            .map(|s| s.samples)
            .sum();
        let Some(entry) = self.manifest.shards.get_mut(self.next) else {
            return Err(DatasetError::InvalidInput(format!(
                "more than the {total} shards the dataset was created with"
            )));
        };
        if y.len() as u64 != entry.samples {
            return Err(DatasetError::InvalidInput(format!(
                "shard {} must hold {} samples, got {}",
                self.next,
                entry.samples,
                y.len()
            )));
        }
        check_samples(x, y, d, kind, before)?;
        let bytes = encode_shard(&entry.file, x, y, d, image)?;
        entry.sha256 = hex::encode(Sha256::digest(&bytes));
        write_file_atomically(&self.dir.join(&entry.file), &bytes)?;
        self.next += 1;
        Ok(())
    }

    /// Writes the manifest once every shard is written, and returns it.
    pub fn finish(self) -> Result<DatasetManifest, DatasetError> {
        if self.next != self.manifest.shards.len() {
            return Err(DatasetError::InvalidInput(format!(
                "only {} of the dataset's {} shards were written",
                self.next,
                self.manifest.shards.len()
            )));
        }
        let dir = &self.dir;
        if let (Some(entry), Some(json)) = (&self.manifest.tokenizer, &self.tokenizer) {
            write_file_atomically(&dir.join(&entry.file), json)?;
        }
        sync_dir(dir)?;
        let manifest_path = dir.join(MANIFEST_FILE);
        let json = serde_json::to_vec_pretty(&self.manifest).map_err(|e| DatasetError::Write {
            path: manifest_path.clone(),
            source: e.into(),
        })?;
        write_file_atomically(&manifest_path, &json)?;
        sync_dir(dir)?;
        Ok(self.manifest)
    }
}

/// Checks that `x` holds `y.len()` rows of `d` finite features and that `y`
/// is of `kind`: every label in `0..classes`, or finite targets of its
/// width; `first` numbers the first sample in errors.
fn check_samples(
    x: FeatureRows<'_>,
    y: LabelRows<'_>,
    d: usize,
    kind: LabelKind,
    first: u64,
) -> Result<(), DatasetError> {
    if y.len().checked_mul(d) != Some(x.len()) {
        return Err(DatasetError::DataShapeMismatch {
            x_len: x.len(),
            samples: y.len(),
            features: d,
        });
    }
    match (y, kind) {
        (LabelRows::Classes(y), LabelKind::Classes(classes)) => {
            if let Some(i) = y.iter().position(|&l| l < 0 || l >= i64::from(classes)) {
                return Err(DatasetError::InvalidInput(format!(
                    "sample {} has label {}, outside 0..{classes}",
                    first + i as u64,
                    y[i]
                )));
            }
        }
        (LabelRows::Targets { width, values }, LabelKind::Targets(k))
            if width == k && values.len() % k.max(1) == 0 =>
        {
            if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                return Err(DatasetError::InvalidInput(format!(
                    "sample {} has a non-finite target",
                    first + (i / k) as u64
                )));
            }
        }
        (LabelRows::Tokens { len, values }, LabelKind::Tokens { vocab, len: l })
            if len == l && values.len() % len.max(1) == 0 =>
        {
            if let Some(i) = values.iter().position(|&t| t < 0 || t >= i64::from(vocab)) {
                return Err(DatasetError::InvalidInput(format!(
                    "sample {} has token {}, outside the vocabulary 0..{vocab}",
                    first + (i / len) as u64,
                    values[i]
                )));
            }
        }
        (y, kind) => {
            return Err(DatasetError::InvalidInput(format!(
                "the dataset holds {kind}, but the samples given have {}",
                y.describe()
            )));
        }
    }
    // u8 pixels are always finite.
    if let FeatureRows::F32(x) = x
        && let Some(i) = x.iter().position(|v| !v.is_finite())
    {
        return Err(DatasetError::InvalidInput(format!(
            "sample {} has a non-finite feature",
            first + (i / d) as u64
        )));
    }
    Ok(())
}

/// Serializes one shard; an image's `x` is stored `[n, C, H, W]`, so that
/// other tools read it as images.
fn encode_shard(
    file: &str,
    x: FeatureRows<'_>,
    y: LabelRows<'_>,
    d: usize,
    image: Option<[usize; 3]>,
) -> Result<Vec<u8>, DatasetError> {
    let n = y.len();
    let (x_dtype, x_bytes): (_, Vec<u8>) = match x {
        FeatureRows::F32(x) => (Dtype::F32, x.iter().flat_map(|v| v.to_le_bytes()).collect()),
        FeatureRows::U8(x) => (Dtype::U8, x.to_vec()),
    };
    let x_shape = match image {
        Some([c, h, w]) => vec![n, c, h, w],
        None => vec![n, d],
    };
    let (y_dtype, y_shape, y_bytes): (_, _, Vec<u8>) = match y {
        LabelRows::Classes(y) => (
            Dtype::I64,
            vec![n],
            y.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
        LabelRows::Targets { width, values } => (
            Dtype::F32,
            vec![n, width],
            values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
        LabelRows::Tokens { len, values } => (
            Dtype::I64,
            vec![n, len],
            values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
    };
    let format_err = |source| DatasetError::ShardFormat {
        shard: file.into(),
        source,
    };
    let xv = TensorView::new(x_dtype, x_shape, &x_bytes).map_err(format_err)?;
    let yv = TensorView::new(y_dtype, y_shape, &y_bytes).map_err(format_err)?;
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
