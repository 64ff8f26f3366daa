//! Datasets: the on-disk format, verified loading, packing real data into it,
//! synthetic data for tests and benchmarks, and the pure shard plan that fixes
//! which samples each rank consumes at each step. No libtorch and no network
//! here: turning samples into tensors belongs to the worker.
//!
//! # On-disk format (version 1)
//!
//! A dataset is a directory holding `MANIFEST.json` and shard files named
//! `shard-00000.safetensors`, `shard-00001.safetensors`, ... Each shard is a
//! safetensors file with exactly two tensors:
//!
//! - `x`: `F32`, shape `[n, d]`, the features of the shard's `n` samples, row-major;
//!   or, in an image dataset, `U8` or `F32` of shape `[n, C, H, W]`;
//! - `y`: either `I64`, shape `[n]`, their class labels, each in
//!   `0..num_classes` (a classification dataset), `F32`, shape `[n, k]`,
//!   their `k ≥ 1` regression targets, each finite (a regression dataset),
//!   or `I64`, shape `[n, T]`, their next tokens, each in `0..num_classes`
//!   (a language-model dataset; `num_classes` is the vocabulary).
//!
//! The manifest (JSON, unknown keys rejected) reads:
//!
//! ```json
//! {
//!   "format_version": 1,
//!   "name": "digits",
//!   "schema": {
//!     "features": { "name": "x", "dtype": "f32", "shape": [64] },
//!     "labels": { "name": "y", "dtype": "i64", "shape": [] },
//!     "num_classes": 10
//!   },
//!   "num_samples": 1617,
//!   "shards": [
//!     { "file": "shard-00000.safetensors", "samples": 1024, "sha256": "9f86d0…" },
//!     { "file": "shard-00001.safetensors", "samples": 593, "sha256": "60303a…" }
//!   ],
//!   "standardization": { "mean": [0.0, …], "std": [1.0, …] },
//!   "source": "packed from digits.csv.gz (csv, label column last, no header) …"
//! }
//! ```
//!
//! A regression dataset's schema has `"labels": { "name": "y", "dtype": "f32",
//! "shape": [k] }` and no `num_classes` (one is refused); a classification
//! one must have `num_classes`. A token dataset's labels are `{ "name": "y",
//! "dtype": "i64", "shape": [T] }` with `num_classes` its vocabulary; one of
//! BPE tokens (`dataset pack --text --bpe-vocab`) also holds its tokenizer,
//! `"tokenizer": { "file": "tokenizer.json", "sha256": "…" }`, a file beside
//! the shards that only decoding reads ([`read_tokenizer`] verifies it). All
//! are format version 1: manifests written before regression, tokens or
//! tokenizers existed read unchanged.
//!
//! An image dataset's schema has `"features": { "name": "x", "dtype": "u8",
//! "shape": [C, H, W] }` (or `"f32"`), and may record
//! `"image_normalization": { "scale": s, "mean": [C values], "std": [C values] }`:
//! *not* applied to the stored pixels (u8 cannot hold normalized values) but by
//! [`read_shard`], which reads value `v` of channel `c` as
//! `(v * scale - mean[c]) / std[c]` ([`ImageNormalization::apply`]). Every
//! reader therefore hands out f32 `[n, C·H·W]` features whatever the storage.
//!
//! `standardization` is optional; when present it has *already been applied*
//! to the stored `x` (`(raw - mean) / std`) and is recorded so that
//! evaluation and inference apply the same transform to raw data
//! ([`Standardization::apply`]). `source` is optional free text saying what the
//! dataset was packed from and which cleaning was applied.
//!
//! Samples are numbered globally in manifest order: shard 0's rows first, then
//! shard 1's, and so on. The shard plan ([`ShardPlan`]) permutes these global
//! indices, shuffling shards and then samples within windows of shards, so a
//! streaming reader ([`read_shard`] through a [`ShardReader`]) needs only a
//! window's shards at a time.
//!
//! Writers put every shard in place first and `MANIFEST.json` last, each file
//! through a temporary name, fsync and rename, so a directory with a manifest
//! is always a complete dataset. Readers verify every shard's sha256 before
//! trusting its contents.

#![forbid(unsafe_code)]

#[cfg(feature = "pack")]
mod bpe;
#[cfg(feature = "pack")]
mod images;
mod manifest;
#[cfg(feature = "pack")]
mod pack;
#[cfg(feature = "pack")]
mod read_csv;
#[cfg(feature = "pack")]
mod read_npy;
mod shard_plan;
mod shards;
mod synth;
#[cfg(feature = "pack")]
mod text;
#[cfg(feature = "pack")]
mod timeseries;

use std::path::PathBuf;

#[cfg(feature = "pack")]
pub use bpe::{Bpe, MAX_BPE_VOCAB, MIN_BPE_VOCAB};
#[cfg(feature = "pack")]
pub use images::{ImageOptions, ImageReport, pack_images};
pub use manifest::{
    DatasetManifest, ElementType, FORMAT_VERSION, ImageNormalization, LabelKind, MANIFEST_FILE,
    MAX_CHANNELS, MAX_CLASSES, MAX_FEATURES, MAX_SAMPLES, MAX_SHARDS, MAX_TARGETS,
    MAX_TOKENIZER_BYTES, Schema, ShardEntry, Standardization, TOKENIZER_FILE, TensorSpec,
    TokenizerEntry,
};
#[cfg(feature = "pack")]
pub use pack::{LabelColumn, PackInput, PackOptions, PackReport, PackTask, pack};
pub use shard_plan::{EpochOrder, ShardPlan, ShardPlanError, rank_range};
pub use shards::{
    DEFAULT_SHARD_BYTES, Dataset, DatasetWriter, DecodedShard, FeatureRows, ImageLayout, LabelRows,
    Labels, LocalDir, ShardReader, WriteOptions, decoded_bytes, default_shard_samples, read_shard,
    read_tokenizer, shard_file_name, write_dataset, write_dataset_rows,
};
pub use synth::{SynthOptions, SynthRegression, synthesize, synthesize_regression};
#[cfg(feature = "pack")]
pub use text::{
    BYTE_VOCAB, Chunks, MAX_CONTEXT, TextOptions, TextReport, chunk_tokens, pack_text,
    smoothed_counts, split_point, unigram_perplexity,
};
#[cfg(feature = "pack")]
pub use timeseries::{Missing, SeriesOptions, SeriesReport, pack_timeseries};

/// Everything that can go wrong reading, writing or packing a dataset. Each
/// variant names the contract that was broken; paths and line numbers are
/// included so that one line tells the user what to fix.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid manifest {path}: {source}")]
    ManifestSyntax {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("manifest {path} is larger than {limit} bytes")]
    ManifestTooLarge { path: PathBuf, limit: u64 },
    #[error("unsupported dataset format version {found} (this build reads version {supported})")]
    UnsupportedVersion { found: u32, supported: u32 },
    #[error("invalid manifest: {0}")]
    InvalidManifest(String),
    #[error("shard file name `{name}` must be a plain file name (no `/`, `\\` or `..`)")]
    UnsafeShardName { name: String },
    #[error("shard sample counts sum to {sum} but the manifest declares {declared} samples")]
    SampleCountMismatch { declared: u64, sum: u64 },
    #[error("{what} is {value}, above the limit of {limit}")]
    TooLarge {
        what: &'static str,
        value: u64,
        limit: u64,
    },
    #[error("shard {shard}: sha256 is {actual} but the manifest records {expected}")]
    ShardChecksum {
        shard: String,
        expected: String,
        actual: String,
    },
    #[error("tokenizer {file}: sha256 is {actual} but the manifest records {expected}")]
    TokenizerChecksum {
        file: String,
        expected: String,
        actual: String,
    },
    #[error(
        "shard {shard}: file is {size} bytes, more than the {limit} bytes its manifest entry allows"
    )]
    ShardTooLarge {
        shard: String,
        size: u64,
        limit: u64,
    },
    #[error("shard {shard}: not a valid safetensors file: {source}")]
    ShardFormat {
        shard: String,
        source: safetensors::SafeTensorError,
    },
    #[error("shard {shard}: tensor `{tensor}` is {found}, the schema requires {expected}")]
    ShardTensorMismatch {
        shard: String,
        tensor: &'static str,
        expected: String,
        found: String,
    },
    #[error("shard {shard}: sample {index} has label {label}, outside 0..{num_classes}")]
    LabelOutOfRange {
        shard: String,
        index: u64,
        label: i64,
        num_classes: u32,
    },
    #[error("shard {shard}: sample {index} has a non-finite feature")]
    NonFiniteFeature { shard: String, index: u64 },
    #[error("shard {shard}: sample {index} has a non-finite regression target")]
    NonFiniteTarget { shard: String, index: u64 },
    #[error("refusing to overwrite the existing dataset in {path}")]
    OutputExists { path: PathBuf },
    #[error("{x_len} feature values do not form {samples} samples of {features} features")]
    DataShapeMismatch {
        x_len: usize,
        samples: usize,
        features: usize,
    },
    #[error("invalid input: {0}")]
    InvalidInput(String),
    #[error("{path}: no data rows")]
    EmptyInput { path: PathBuf },
    #[error("{path}:{line}: expected {expected} fields, found {found}")]
    CsvFieldCount {
        path: PathBuf,
        line: u64,
        expected: usize,
        found: usize,
    },
    #[error(
        "{path}:{line}: expected {expected} fields like the header on line {header_line}, found \
         {found}; if the lines above the table are not column names, skip them (--skip-rows N)"
    )]
    CsvHeaderMismatch {
        path: PathBuf,
        line: u64,
        expected: usize,
        found: usize,
        header_line: u64,
    },
    #[error(
        "{path}:{line}: column {column}: missing value `{value}`; choose --missing drop, mean or \
         median to drop or fill such rows"
    )]
    CsvMissing {
        path: PathBuf,
        line: u64,
        column: usize,
        value: String,
    },
    #[error("{path}:{line}: column {column}: cannot parse `{value}` as a number")]
    CsvNotANumber {
        path: PathBuf,
        line: u64,
        column: usize,
        value: String,
    },
    #[error("{path}:{line}: column {column}: `{value}` is not a finite number")]
    CsvNonFinite {
        path: PathBuf,
        line: u64,
        column: usize,
        value: String,
    },
    #[error("{path}:{line}: column {column}: label `{value}` is not an integer in 0..{limit}")]
    CsvBadLabel {
        path: PathBuf,
        line: u64,
        column: usize,
        value: String,
        limit: u32,
    },
    #[cfg(feature = "pack")]
    #[error("{path}: {source}")]
    CsvSyntax { path: PathBuf, source: csv::Error },
    #[error("{path}: {detail}")]
    LabelColumn { path: PathBuf, detail: String },
    #[error("{path}: {detail}")]
    NpyFormat { path: PathBuf, detail: String },
    #[error("{path}: element {index} is {value}, not a label in 0..{limit}")]
    NpyBadLabel {
        path: PathBuf,
        index: u64,
        value: String,
        limit: u32,
    },
    #[error("{path}: row {row}, column {column}: not a finite number")]
    NpyNonFinite {
        path: PathBuf,
        row: u64,
        column: u64,
    },
    #[error("{features} has {feature_rows} rows but {labels} has {label_count} labels")]
    NpyCountMismatch {
        features: PathBuf,
        feature_rows: u64,
        labels: PathBuf,
        label_count: u64,
    },
    #[error("labels only use class 0; a classification dataset needs at least 2 classes")]
    TooFewClasses,
}
