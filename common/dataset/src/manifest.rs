//! The dataset manifest: its serde types, the bounds and checks that make an
//! untrusted `MANIFEST.json` safe to act on, and reading it from a directory.
//! Shard contents are checked elsewhere (`shards.rs`), against this manifest.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::DatasetError;

/// The only format version this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;
/// The manifest's file name inside a dataset directory.
pub const MANIFEST_FILE: &str = "MANIFEST.json";
/// The tokenizer's file name inside a BPE token dataset: the `tokenizers` crate's own JSON
/// serialization (HuggingFace's `tokenizer.json`).
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// Largest tokenizer file a reader accepts; one of [`MAX_CLASSES`] tokens is well within it.
pub const MAX_TOKENIZER_BYTES: u64 = 1 << 28;
/// Most features per sample a manifest may declare.
pub const MAX_FEATURES: u64 = 1 << 20;
/// Most shards a manifest may list.
pub const MAX_SHARDS: u64 = 1 << 20;
/// Most classes a manifest may declare.
pub const MAX_CLASSES: u32 = 1 << 20;
/// Most channels an image dataset's `x` may declare (`C` of `[C, H, W]`).
pub const MAX_CHANNELS: u64 = 1 << 12;
/// Most regression targets per sample a manifest may declare.
pub const MAX_TARGETS: u64 = 1 << 16;
/// Most samples a manifest may declare: keeps every byte count below `u64::MAX`
/// even at [`MAX_FEATURES`] features.
pub const MAX_SAMPLES: u64 = 1 << 40;
/// A manifest for [`MAX_SHARDS`] shards fits well within this.
const MAX_MANIFEST_BYTES: u64 = 256 << 20;
const MAX_NAME_BYTES: usize = 256;
const MAX_SOURCE_BYTES: usize = 1 << 20;

/// A dataset's manifest, as stored in `MANIFEST.json`. See the module docs of
/// [`crate::dataset`] for the format. Values read from disk are only
/// trustworthy after [`DatasetManifest::validate`] (which
/// [`DatasetManifest::read`] runs).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetManifest {
    pub format_version: u32,
    pub name: String,
    pub schema: Schema,
    pub num_samples: u64,
    pub shards: Vec<ShardEntry>,
    /// Already applied to the stored features; recorded so that raw data can
    /// be transformed the same way at evaluation and inference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standardization: Option<Standardization>,
    /// Per-channel normalization of an image dataset, applied when shards
    /// are *read* (u8 storage cannot hold normalized values); see
    /// [`ImageNormalization`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_normalization: Option<ImageNormalization>,
    /// Free text: what the dataset was packed from and how it was cleaned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// The tokenizer that maps text to a token dataset's ids (`dataset pack --text
    /// --bpe-vocab`); absent for byte-level tokens, whose id is the byte, and for every
    /// other kind of data. Optional, so manifests written before it read unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<TokenizerEntry>,
}

/// A tokenizer file stored beside the shards, verified like one: the trainer never reads it,
/// whoever turns ids back into text does ([`crate::read_tokenizer`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizerEntry {
    /// A plain file name inside the dataset directory: [`TOKENIZER_FILE`] as packed.
    pub file: String,
    /// Lowercase hex sha256 of the whole file.
    pub sha256: String,
}

/// Names, element types and per-sample shapes of the two tensors in every
/// shard, and the number of classes of a classification dataset.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schema {
    /// Either `{name: "x", dtype: "f32", shape: [d]}` with `d > 0`, or an
    /// image, `{name: "x", dtype: "u8" | "f32", shape: [C, H, W]}` with every
    /// side positive (readers see its `C·H·W` values as f32 features).
    pub features: TensorSpec,
    /// Either class labels, `{name: "y", dtype: "i64", shape: []}`,
    /// regression targets, `{name: "y", dtype: "f32", shape: [k]}` with
    /// `k > 0`, or token sequences, `{name: "y", dtype: "i64", shape: [T]}`
    /// with `T > 0` (a language model's next tokens).
    pub labels: TensorSpec,
    /// Class labels (or tokens) lie in `0..num_classes`; at least 2. Required
    /// with i64 labels and refused with f32 targets (a regression dataset has
    /// no classes), so every classification manifest written before
    /// regression existed reads unchanged. For token sequences it is the
    /// vocabulary size: a next token is a class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_classes: Option<u32>,
}

/// What a dataset's `y` holds, as its validated schema says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LabelKind {
    /// One i64 class label per sample, in `0..classes`.
    Classes(u32),
    /// `k` f32 regression targets per sample (`Targets(k)`).
    Targets(usize),
    /// `len` i64 tokens per sample, each in `0..vocab`: the next token at
    /// each of a language model's `len` positions.
    Tokens { vocab: u32, len: usize },
}

impl LabelKind {
    /// Bytes one sample's label or targets take decoded.
    pub fn bytes_per_sample(self) -> u64 {
        match self {
            LabelKind::Classes(_) => 8,
            LabelKind::Targets(k) => 4 * k as u64,
            LabelKind::Tokens { len, .. } => 8 * len as u64,
        }
    }

    /// Width of a model's output for this data: classes, targets or (per
    /// position) the vocabulary.
    pub fn outputs(self) -> usize {
        match self {
            LabelKind::Classes(c) => c as usize,
            LabelKind::Targets(k) => k,
            LabelKind::Tokens { vocab, .. } => vocab as usize,
        }
    }
}

impl std::fmt::Display for LabelKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LabelKind::Classes(c) => write!(f, "class labels ({c} classes)"),
            LabelKind::Targets(1) => f.write_str("regression targets (1 per sample)"),
            LabelKind::Targets(k) => write!(f, "regression targets ({k} per sample)"),
            LabelKind::Tokens { vocab, len } => {
                write!(f, "token sequences ({len} per sample, vocabulary {vocab})")
            }
        }
    }
}

/// One tensor's name, element type and per-sample shape (without the leading
/// sample dimension).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: ElementType,
    pub shape: Vec<u64>,
}

/// Element types a shard tensor may have.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ElementType {
    F32,
    I64,
    /// Image pixels only: one byte per value on disk.
    U8,
}

impl std::fmt::Display for ElementType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ElementType::F32 => "f32",
            ElementType::I64 => "i64",
            ElementType::U8 => "u8",
        })
    }
}

/// One shard file and what it must contain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardEntry {
    /// A plain file name inside the dataset directory.
    pub file: String,
    pub samples: u64,
    /// Lowercase hex sha256 of the whole file.
    pub sha256: String,
}

/// Per-feature affine transform `(raw - mean) / std`, computed on the training
/// split when the dataset was packed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Standardization {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl Standardization {
    /// Applies the transform in place to row-major samples of
    /// `self.mean.len()` features, e.g. raw inputs at inference time. A
    /// trailing partial row is left as is.
    pub fn apply(&self, x: &mut [f32]) {
        let d = self.mean.len();
        if d == 0 {
            return;
        }
        for row in x.chunks_exact_mut(d) {
            for ((v, m), s) in row.iter_mut().zip(&self.mean).zip(&self.std) {
                *v = (*v - m) / s;
            }
        }
    }
}

/// Per-channel normalization of an image dataset's `x`: a stored value `v`
/// of channel `c` is read as `(v * scale - mean[c]) / std[c]`. `scale` is
/// `1/255` for u8 pixels (as torchvision's `ToTensor`) and 1 for f32 ones;
/// `mean` and `std` are those of the training split after scaling, recorded
/// identically in the train and validation manifests.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageNormalization {
    pub scale: f32,
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl ImageNormalization {
    /// Normalizes row-major samples of `[C, H, W]` values in place, where
    /// `C` is `self.mean.len()` and `plane` is `H·W`. A trailing partial
    /// sample is left as is.
    pub fn apply(&self, x: &mut [f32], plane: usize) {
        let c = self.mean.len();
        if c == 0 || plane == 0 {
            return;
        }
        for sample in x.chunks_exact_mut(c * plane) {
            for ((channel, m), s) in sample
                .chunks_exact_mut(plane)
                .zip(&self.mean)
                .zip(&self.std)
            {
                for v in channel {
                    *v = (*v * self.scale - m) / s;
                }
            }
        }
    }
}

impl Schema {
    /// The schema of a dataset of `d` f32 features in `x` and, in `y`, a
    /// scalar i64 class label, `k` f32 targets or `T` i64 tokens per sample.
    pub fn new(features: usize, labels: LabelKind) -> Schema {
        let (dtype, shape, num_classes) = match labels {
            LabelKind::Classes(c) => (ElementType::I64, vec![], Some(c)),
            LabelKind::Targets(k) => (ElementType::F32, vec![k as u64], None),
            LabelKind::Tokens { vocab, len } => (ElementType::I64, vec![len as u64], Some(vocab)),
        };
        Schema {
            features: TensorSpec {
                name: "x".into(),
                dtype: ElementType::F32,
                shape: vec![features as u64],
            },
            labels: TensorSpec {
                name: "y".into(),
                dtype,
                shape,
            },
            num_classes,
        }
    }

    /// The schema of an image dataset: `x` of `shape` `[C, H, W]` stored as
    /// `dtype` (u8 or f32), and labels as in [`Schema::new`].
    pub fn image(shape: [usize; 3], dtype: ElementType, labels: LabelKind) -> Schema {
        let mut schema = Schema::new(1, labels);
        schema.features.dtype = dtype;
        schema.features.shape = shape.iter().map(|&s| s as u64).collect();
        schema
    }

    /// `[C, H, W]` of an image dataset, `None` for flat features. Meaningful
    /// once validated.
    pub fn image_shape(&self) -> Option<[usize; 3]> {
        match *self.features.shape.as_slice() {
            [c, h, w] => Some([c as usize, h as usize, w as usize]),
            _ => None,
        }
    }

    /// What `y` holds. Meaningful once validated.
    pub fn label_kind(&self) -> LabelKind {
        match self.labels.dtype {
            ElementType::I64 => match self.labels.shape.first() {
                None => LabelKind::Classes(self.num_classes.unwrap_or(0)),
                Some(&len) => LabelKind::Tokens {
                    vocab: self.num_classes.unwrap_or(0),
                    len: len as usize,
                },
            },
            // Refused for labels by validation.
            ElementType::F32 | ElementType::U8 => {
                LabelKind::Targets(self.labels.shape.first().copied().unwrap_or(0) as usize)
            }
        }
    }
}

impl DatasetManifest {
    /// Reads `<dir>/MANIFEST.json` and validates it (see [`Self::validate`]).
    pub fn read(dir: &Path) -> Result<DatasetManifest, DatasetError> {
        Self::read_from(&crate::LocalDir(dir.to_path_buf()))
    }

    /// Reads `MANIFEST.json` through `reader` and validates it.
    pub fn read_from(reader: &dyn crate::ShardReader) -> Result<DatasetManifest, DatasetError> {
        let path = PathBuf::from(reader.location(MANIFEST_FILE));
        let bytes = reader.read(MANIFEST_FILE, MAX_MANIFEST_BYTES)?;
        if bytes.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(DatasetError::ManifestTooLarge {
                path,
                limit: MAX_MANIFEST_BYTES,
            });
        }
        let manifest: DatasetManifest =
            serde_json::from_slice(&bytes).map_err(|source| DatasetError::ManifestSyntax {
                path: path.clone(),
                source,
            })?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// Bytes the decoded training samples take in memory.
    pub fn decoded_bytes(&self) -> u64 {
        crate::decoded_bytes(self.num_samples, self.features(), self.labels())
    }

    /// What `y` holds: class labels or regression targets. Meaningful once
    /// validated.
    pub fn labels(&self) -> LabelKind {
        self.schema.label_kind()
    }

    /// Sample counts of the shards, in manifest order.
    pub fn shard_samples(&self) -> Vec<u64> {
        self.shards.iter().map(|s| s.samples).collect()
    }

    /// Number of features per sample: `d`, or `C·H·W` for images (what a
    /// reader hands a model, as f32). Meaningful once validated.
    pub fn features(&self) -> usize {
        self.schema
            .features
            .shape
            .iter()
            .try_fold(1u64, |a, &s| a.checked_mul(s))
            .unwrap_or(0) as usize
    }

    /// `[C, H, W]` of an image dataset, `None` for flat features.
    pub fn image_shape(&self) -> Option<[usize; 3]> {
        self.schema.image_shape()
    }

    /// Checks every contract a reader relies on: the format version, the one
    /// schema this version supports, bounded sizes, shard names that cannot
    /// escape the directory, distinct shards whose sample counts sum to
    /// `num_samples`, well-formed hashes, a standardization of the right
    /// length with positive finite scales, and a tokenizer only on token
    /// sequences, under a plain file name that is not a shard's.
    pub fn validate(&self) -> Result<(), DatasetError> {
        let invalid = |msg: String| Err(DatasetError::InvalidManifest(msg));
        if self.format_version != FORMAT_VERSION {
            return Err(DatasetError::UnsupportedVersion {
                found: self.format_version,
                supported: FORMAT_VERSION,
            });
        }
        if self.name.is_empty() || self.name.len() > MAX_NAME_BYTES {
            return invalid(format!(
                "name must be 1 to {MAX_NAME_BYTES} bytes, found {}",
                self.name.len()
            ));
        }
        if let Some(source) = &self.source
            && source.len() > MAX_SOURCE_BYTES
        {
            return Err(too_large(
                "source text (bytes)",
                source.len() as u64,
                MAX_SOURCE_BYTES as u64,
            ));
        }
        self.validate_schema()?;
        if self.num_samples > MAX_SAMPLES {
            return Err(too_large("num_samples", self.num_samples, MAX_SAMPLES));
        }
        if self.shards.len() as u64 > MAX_SHARDS {
            return Err(too_large(
                "number of shards",
                self.shards.len() as u64,
                MAX_SHARDS,
            ));
        }
        if self.shards.is_empty() {
            return invalid("a dataset needs at least one shard".into());
        }
        let mut seen = HashSet::with_capacity(self.shards.len());
        let mut sum: u64 = 0;
        for shard in &self.shards {
            check_shard_name(&shard.file)?;
            if !seen.insert(shard.file.as_str()) {
                return invalid(format!("shard `{}` is listed twice", shard.file));
            }
            if shard.samples == 0 {
                return invalid(format!("shard `{}` holds no samples", shard.file));
            }
            if !is_sha256_hex(&shard.sha256) {
                return invalid(format!(
                    "shard `{}`: sha256 must be 64 lowercase hex digits",
                    shard.file
                ));
            }
            // Saturating: a sum past MAX_SAMPLES is reported as a mismatch.
            sum = sum.saturating_add(shard.samples);
        }
        if sum != self.num_samples {
            return Err(DatasetError::SampleCountMismatch {
                declared: self.num_samples,
                sum,
            });
        }
        if let Some(tok) = &self.tokenizer {
            if !matches!(self.labels(), LabelKind::Tokens { .. }) {
                return invalid(format!(
                    "a tokenizer (`{}`) only applies to token sequences, not {}",
                    tok.file,
                    self.labels()
                ));
            }
            check_shard_name(&tok.file)?;
            if seen.contains(tok.file.as_str()) {
                return invalid(format!("tokenizer `{}` is also a shard", tok.file));
            }
            if !is_sha256_hex(&tok.sha256) {
                return invalid(format!(
                    "tokenizer `{}`: sha256 must be 64 lowercase hex digits",
                    tok.file
                ));
            }
        }
        if let Some(st) = &self.standardization {
            let d = self.features();
            if st.mean.len() != d || st.std.len() != d {
                return invalid(format!(
                    "standardization has {} means and {} stds for {d} features",
                    st.mean.len(),
                    st.std.len()
                ));
            }
            if !st.mean.iter().all(|m| m.is_finite()) {
                return invalid("standardization mean is not finite".into());
            }
            if !st.std.iter().all(|s| s.is_finite() && *s > 0.0) {
                return invalid("standardization std must be finite and positive".into());
            }
            if self.schema.features.dtype == ElementType::U8 {
                return invalid(
                    "standardization does not apply to u8 images (their stored values cannot \
                     hold standardized ones); record image_normalization instead"
                        .into(),
                );
            }
        }
        if let Some(norm) = &self.image_normalization {
            self.validate_image_normalization(norm)?;
        }
        Ok(())
    }

    fn validate_image_normalization(&self, norm: &ImageNormalization) -> Result<(), DatasetError> {
        let invalid = |msg: String| Err(DatasetError::InvalidManifest(msg));
        let Some([c, _, _]) = self.image_shape() else {
            return invalid(
                "image_normalization applies only to images (`x` of shape [C, H, W])".into(),
            );
        };
        if norm.mean.len() != c || norm.std.len() != c {
            return invalid(format!(
                "image_normalization has {} means and {} stds for {c} channels",
                norm.mean.len(),
                norm.std.len()
            ));
        }
        if !(norm.scale.is_finite() && norm.scale > 0.0) {
            return invalid(format!(
                "image_normalization scale must be finite and positive, found {}",
                norm.scale
            ));
        }
        if let Some(i) = norm.mean.iter().position(|m| !m.is_finite()) {
            return invalid(format!(
                "image_normalization mean of channel {i} is {}, not a finite number",
                norm.mean[i]
            ));
        }
        if let Some(i) = norm.std.iter().position(|s| !(s.is_finite() && *s > 0.0)) {
            return invalid(format!(
                "image_normalization std of channel {i} is {}; it must be finite and positive",
                norm.std[i]
            ));
        }
        Ok(())
    }

    fn validate_schema(&self) -> Result<(), DatasetError> {
        let s = &self.schema;
        let expect = |spec: &TensorSpec, name: &str, dtype: ElementType, rank: usize| {
            if spec.name != name || spec.dtype != dtype || spec.shape.len() != rank {
                Err(DatasetError::InvalidManifest(format!(
                    "schema tensor `{}` ({}, {} dims) must be `{name}` ({dtype}, {rank} dims)",
                    spec.name,
                    spec.dtype,
                    spec.shape.len()
                )))
            } else {
                Ok(())
            }
        };
        self.validate_features()?;
        match s.labels.dtype {
            ElementType::I64 => {
                // Rank 0: one class label per sample; rank 1: a token sequence.
                let rank = s.labels.shape.len().min(1);
                expect(&s.labels, "y", ElementType::I64, rank)?;
                if let Some(&len) = s.labels.shape.first() {
                    if len == 0 {
                        return Err(DatasetError::InvalidManifest(
                            "token sequences (i64 `y` of shape [T]) need T > 0".into(),
                        ));
                    }
                    if len > MAX_FEATURES {
                        return Err(too_large("tokens per sample", len, MAX_FEATURES));
                    }
                }
                let Some(classes) = s.num_classes else {
                    return Err(DatasetError::InvalidManifest(if rank == 0 {
                        "class labels (i64 `y`) need num_classes".into()
                    } else {
                        "token sequences (i64 `y` of shape [T]) need num_classes (the vocabulary)"
                            .into()
                    }));
                };
                if classes < 2 {
                    return Err(DatasetError::InvalidManifest(format!(
                        "num_classes must be at least 2, found {classes}"
                    )));
                }
                if classes > MAX_CLASSES {
                    return Err(too_large("num_classes", classes.into(), MAX_CLASSES.into()));
                }
            }
            ElementType::F32 => {
                expect(&s.labels, "y", ElementType::F32, 1)?;
                let k = s.labels.shape[0];
                if k == 0 {
                    return Err(DatasetError::InvalidManifest(
                        "regression targets (f32 `y`) need at least one target per sample".into(),
                    ));
                }
                if k > MAX_TARGETS {
                    return Err(too_large("targets per sample", k, MAX_TARGETS));
                }
                if let Some(classes) = s.num_classes {
                    return Err(DatasetError::InvalidManifest(format!(
                        "num_classes ({classes}) does not apply to regression targets (f32 `y`)"
                    )));
                }
            }
            ElementType::U8 => {
                return Err(DatasetError::InvalidManifest(
                    "schema tensor `y` must be i64 (class labels, tokens) or f32 (regression \
                     targets), not u8"
                        .into(),
                ));
            }
        }
        Ok(())
    }
}

impl DatasetManifest {
    /// `x` is `[d]` f32, or an image `[C, H, W]` of u8 or f32; either way at
    /// most [`MAX_FEATURES`] values per sample.
    fn validate_features(&self) -> Result<(), DatasetError> {
        let invalid = |msg: String| Err(DatasetError::InvalidManifest(msg));
        let x = &self.schema.features;
        if x.name != "x" {
            return invalid(format!("schema tensor `{}` must be named `x`", x.name));
        }
        match (x.dtype, x.shape.len()) {
            (ElementType::F32, 1) => {}
            (ElementType::F32 | ElementType::U8, 3) => {
                if let Some(i) = x.shape.iter().position(|&s| s == 0) {
                    return invalid(format!(
                        "image shape {:?} has a zero side (dimension {i}); [C, H, W] must all \
                         be positive",
                        x.shape
                    ));
                }
                if x.shape[0] > MAX_CHANNELS {
                    return Err(too_large("image channels", x.shape[0], MAX_CHANNELS));
                }
            }
            (ElementType::U8, 1) => {
                return invalid(
                    "u8 features need an image shape [C, H, W]; flat features `[d]` are f32".into(),
                );
            }
            (ElementType::I64, _) => {
                return invalid("schema tensor `x` must be f32 (or u8 for images), not i64".into());
            }
            (_, rank) => {
                return invalid(format!(
                    "schema tensor `x` must have shape [d] or, for images, [C, H, W]; found \
                     {rank} dims {:?}",
                    x.shape
                ));
            }
        }
        // Saturating: an overflowing product is reported as too large.
        let d = x.shape.iter().fold(1u64, |a, &s| a.saturating_mul(s));
        if d == 0 {
            return invalid("samples must have at least one feature".into());
        }
        if d > MAX_FEATURES {
            return Err(too_large("features per sample", d, MAX_FEATURES));
        }
        Ok(())
    }
}

fn too_large(what: &'static str, value: u64, limit: u64) -> DatasetError {
    DatasetError::TooLarge { what, value, limit }
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A shard (or tokenizer) name must name a file directly inside the dataset directory.
fn check_shard_name(name: &str) -> Result<(), DatasetError> {
    let plain = !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\', '\0'])
        && !name.contains("..")
        && name != MANIFEST_FILE;
    if plain {
        Ok(())
    } else {
        Err(DatasetError::UnsafeShardName { name: name.into() })
    }
}
