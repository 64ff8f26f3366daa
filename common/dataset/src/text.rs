//! Text as a language model's data (`dataset pack --text`): byte-level tokens (vocabulary
//! [`BYTE_VOCAB`]), the files concatenated in the order given into one token stream, the stream
//! cut into consecutive non-overlapping chunks of `context + 1` tokens. Each chunk is one
//! sample: `x` is its first `context` tokens stored as f32 features (token ids are exact in
//! f32), `y` its last `context` tokens (the next token at every position), a token sequence
//! ([`LabelKind::Tokens`]).
//!
//! The split is chronological: the last `val_fraction` of the stream is the validation text and
//! no chunk spans the split, so no validation text is trained on. The pack reports the unigram
//! baseline: the perplexity on the validation targets of the training text's byte frequencies
//! (add-one smoothed), the figure a model that ignores context gets and a real one must beat.
//! Tables are packed in `pack.rs`, series in `timeseries.rs`.

use crate::manifest::LabelKind;
use crate::shards::{LabelRows, WriteOptions, write_dataset};
use crate::{DatasetError, MANIFEST_FILE};
use std::path::{Path, PathBuf};

/// Byte-level tokens: one per byte value.
pub const BYTE_VOCAB: u32 = 256;
/// Longest context a text dataset may have: a sample is one row of `context` features.
pub const MAX_CONTEXT: usize = 1 << 16;
/// Most text bytes packed at once: all of it is held in memory, four times over as f32.
pub const MAX_TEXT_BYTES: u64 = 1 << 30;

/// Everything [`pack_text`] needs; mirrors `dataset pack --text`.
#[derive(Clone, Debug, PartialEq)]
pub struct TextOptions {
    /// The text files, concatenated in this order.
    pub files: Vec<PathBuf>,
    /// Tokens per sample (`T`): the model's context length.
    pub context: usize,
    /// Share of the stream, at its end, held out for validation, in `[0, 1)`.
    pub val_fraction: f64,
    /// `train/` and (with a validation fraction) `val/` are written inside.
    pub output: PathBuf,
    pub name: String,
    /// Samples per shard; `None`: about 32 MiB of samples per shard.
    pub shard_samples: Option<usize>,
}

/// What [`pack_text`] wrote.
#[derive(Clone, Debug, PartialEq)]
pub struct TextReport {
    pub train_dir: PathBuf,
    pub val_dir: Option<PathBuf>,
    /// Tokens in the whole stream.
    pub tokens: u64,
    /// Tokens of the training and validation parts of the stream (before chunking drops
    /// each part's tail).
    pub train_tokens: u64,
    pub val_tokens: u64,
    pub train_samples: u64,
    pub val_samples: u64,
    pub vocab: u32,
    /// `exp` of the cross entropy, on the validation samples' target tokens, of the training
    /// text's byte frequencies (add-one smoothed); `None` without validation.
    pub unigram_val_perplexity: Option<f64>,
}

/// Samples cut from one part of the stream: `x` row-major `[n, T]` as f32, `y` `[n, T]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Chunks {
    pub x: Vec<f32>,
    pub y: Vec<i64>,
}

impl Chunks {
    /// Number of samples of `context` tokens.
    pub fn samples(&self, context: usize) -> usize {
        self.y.len() / context.max(1)
    }
}

/// Cuts `tokens` into consecutive non-overlapping chunks of `context + 1`; a tail shorter
/// than a chunk is dropped.
pub fn chunk_tokens(tokens: &[u8], context: usize) -> Chunks {
    let mut x = Vec::new();
    let mut y = Vec::new();
    for chunk in tokens.chunks_exact(context + 1) {
        x.extend(chunk[..context].iter().map(|&t| f32::from(t)));
        y.extend(chunk[1..].iter().map(|&t| i64::from(t)));
    }
    Chunks { x, y }
}

/// Where the validation text starts: the last `val_fraction` of `tokens` tokens, rounded.
pub fn split_point(tokens: usize, val_fraction: f64) -> usize {
    tokens - (tokens as f64 * val_fraction).round() as usize
}

/// `exp` of the mean of `-ln p(t)` over `targets`, `p` the byte frequencies of `train`
/// with one added to every count of the vocabulary.
pub fn unigram_perplexity(train: &[u8], targets: &[i64]) -> f64 {
    let mut counts = [1u64; BYTE_VOCAB as usize];
    for &b in train {
        counts[b as usize] += 1;
    }
    let total: u64 = counts.iter().sum();
    let nll: f64 = targets
        .iter()
        .map(|&t| -(counts[t as usize] as f64 / total as f64).ln())
        .sum();
    (nll / targets.len().max(1) as f64).exp()
}

/// Reads, tokenizes, cuts and writes the files as `train/` and `val/` datasets under
/// `opts.output`. Refuses a context of 0, a validation fraction outside `[0, 1)`, empty or
/// unreadable files, too little text for one training (or, when asked, validation) sample, and
/// an output that already holds a dataset; nothing is written then.
pub fn pack_text(opts: &TextOptions) -> Result<TextReport, DatasetError> {
    let invalid = |msg: String| Err(DatasetError::InvalidInput(msg));
    let t = opts.context;
    if t == 0 || t > MAX_CONTEXT {
        return invalid(format!("--context must be 1 to {MAX_CONTEXT}, got {t}"));
    }
    if !(0.0..1.0).contains(&opts.val_fraction) {
        return invalid(format!(
            "--val-fraction must be in [0, 1), got {}",
            opts.val_fraction
        ));
    }
    if opts.files.is_empty() {
        return invalid("--text needs at least one file".into());
    }
    let mut tokens = Vec::new();
    for path in &opts.files {
        let bytes = std::fs::read(path).map_err(|source| DatasetError::Read {
            path: path.clone(),
            source,
        })?;
        if bytes.is_empty() {
            return Err(DatasetError::EmptyInput { path: path.clone() });
        }
        tokens.extend_from_slice(&bytes);
        if tokens.len() as u64 > MAX_TEXT_BYTES {
            return Err(DatasetError::TooLarge {
                what: "text bytes",
                value: tokens.len() as u64,
                limit: MAX_TEXT_BYTES,
            });
        }
    }
    let split = split_point(tokens.len(), opts.val_fraction);
    let (train_text, val_text) = tokens.split_at(split);
    let train = chunk_tokens(train_text, t);
    let val = chunk_tokens(val_text, t);
    if train.samples(t) == 0 {
        return invalid(format!(
            "the training text ({} bytes) is shorter than one sample of --context {t} + 1 tokens",
            train_text.len()
        ));
    }
    if opts.val_fraction > 0.0 && val.samples(t) == 0 {
        return invalid(format!(
            "the validation text ({} bytes, --val-fraction {}) is shorter than one sample of \
             --context {t} + 1 tokens; raise --val-fraction or lower --context",
            val_text.len(),
            opts.val_fraction
        ));
    }
    let train_dir = opts.output.join("train");
    let val_dir = (opts.val_fraction > 0.0).then(|| opts.output.join("val"));
    for dir in std::iter::once(&train_dir).chain(val_dir.as_ref()) {
        if dir.join(MANIFEST_FILE).exists() {
            return Err(DatasetError::OutputExists { path: dir.clone() });
        }
    }
    let labels = LabelKind::Tokens {
        vocab: BYTE_VOCAB,
        len: t,
    };
    let files: Vec<String> = opts.files.iter().map(|p| p.display().to_string()).collect();
    let source = format!(
        "byte-level tokens of {} ({} bytes), chunks of {t} + 1 tokens, chronological split at \
         byte {split} (validation fraction {})",
        files.join(", "),
        tokens.len(),
        opts.val_fraction
    );
    let write = |dir: &Path, split_name: &str, chunks: &Chunks| {
        let n = chunks.samples(t);
        let wo = WriteOptions {
            image: None,
            name: format!("{}-{split_name}", opts.name),
            features: t,
            labels,
            shard_samples: opts
                .shard_samples
                .unwrap_or_else(|| crate::default_shard_samples(t, labels))
                .clamp(1, n.max(1)),
            standardization: None,
            source: Some(source.clone()),
        };
        write_dataset(
            dir,
            &wo,
            &chunks.x,
            LabelRows::Tokens {
                len: t,
                values: &chunks.y,
            },
        )
    };
    let train_manifest = write(&train_dir, "train", &train)?;
    let val_manifest = match &val_dir {
        Some(dir) => Some(write(dir, "val", &val)?),
        None => None,
    };
    Ok(TextReport {
        train_dir,
        val_dir,
        tokens: tokens.len() as u64,
        train_tokens: train_text.len() as u64,
        val_tokens: val_text.len() as u64,
        train_samples: train_manifest.num_samples,
        val_samples: val_manifest.as_ref().map_or(0, |m| m.num_samples),
        vocab: BYTE_VOCAB,
        unigram_val_perplexity: val_manifest
            .is_some()
            .then(|| unigram_perplexity(train_text, &val.y)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Dataset;

    #[test]
    fn chunks_are_consecutive_and_y_is_x_shifted_by_one() {
        let text = b"abcdefghij"; // 10 bytes, context 3: chunks "abcd", "efgh", tail "ij" dropped.
        let c = chunk_tokens(text, 3);
        assert_eq!(c.samples(3), 2);
        assert_eq!(c.x, [97.0, 98.0, 99.0, 101.0, 102.0, 103.0]);
        assert_eq!(c.y, [98, 99, 100, 102, 103, 104]);
    }

    #[test]
    fn the_split_is_chronological_and_no_chunk_spans_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.txt");
        // 100 bytes: 0..=99 as bytes; val fraction 0.3: training text is bytes 0..70.
        std::fs::write(&file, (0u8..100).collect::<Vec<_>>()).unwrap();
        let report = pack_text(&TextOptions {
            files: vec![file.clone(), file],
            context: 9,
            val_fraction: 0.3,
            output: dir.path().join("out"),
            name: "t".into(),
            shard_samples: Some(4),
        })
        .unwrap();
        assert_eq!(report.tokens, 200);
        assert_eq!((report.train_tokens, report.val_tokens), (140, 60));
        assert_eq!((report.train_samples, report.val_samples), (14, 6));
        let train = Dataset::load(&report.train_dir).unwrap();
        let val = Dataset::load(report.val_dir.as_ref().unwrap()).unwrap();
        // --shard-samples 4: 14 training samples in shards of 4, 4, 4, 2.
        assert_eq!(train.manifest.shard_samples(), vec![4, 4, 4, 2]);
        assert_eq!(
            train.manifest.labels(),
            LabelKind::Tokens { vocab: 256, len: 9 }
        );
        // The last training target is byte 139 of the stream (file 2's byte 39), the first
        // validation input byte 140 (file 2's byte 40).
        assert_eq!(train.y.tokens().unwrap().last(), Some(&39));
        assert_eq!(val.x[0], 40.0);
        assert_eq!(val.y.tokens().unwrap()[..3], [41, 42, 43]);
    }

    #[test]
    fn too_little_text_and_bad_options_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.txt");
        std::fs::write(&file, b"hello world").unwrap();
        let opts = |context, val_fraction| TextOptions {
            files: vec![file.clone()],
            context,
            val_fraction,
            output: dir.path().join("out"),
            name: "t".into(),
            shard_samples: None,
        };
        let err = |o| pack_text(&o).unwrap_err().to_string();
        assert!(err(opts(0, 0.1)).contains("--context must be"));
        assert!(err(opts(4, 1.0)).contains("--val-fraction"));
        assert!(err(opts(11, 0.0)).contains("shorter than one sample"));
        assert!(err(opts(4, 0.1)).contains("validation text"));
        assert!(!dir.path().join("out").exists());
    }

    #[test]
    fn unigram_baseline_is_the_smoothed_frequencies_cross_entropy() {
        // Training "aab": counts a=3, b=2, others 1; total 256 + 3 = 259.
        let ppl = unigram_perplexity(b"aab", &[97, 98]);
        let want = (-((3.0f64 / 259.0).ln() + (2.0f64 / 259.0).ln()) / 2.0).exp();
        assert!((ppl - want).abs() < 1e-12, "{ppl} != {want}");
    }

    #[test]
    fn tokens_outside_the_vocabulary_are_refused_on_write_and_read() {
        let dir = tempfile::tempdir().unwrap();
        let kind = LabelKind::Tokens { vocab: 4, len: 2 };
        let wo = WriteOptions {
            image: None,
            name: "t".into(),
            features: 2,
            labels: kind,
            shard_samples: 8,
            standardization: None,
            source: None,
        };
        let x = [0.0f32, 1.0];
        let bad = write_dataset(
            &dir.path().join("bad"),
            &wo,
            &x,
            LabelRows::Tokens {
                len: 2,
                values: &[1, 4],
            },
        )
        .unwrap_err()
        .to_string();
        assert!(bad.contains("outside the vocabulary 0..4"), "{bad}");
        // A valid dataset whose manifest is then edited to a smaller vocabulary fails the load.
        let good = dir.path().join("good");
        write_dataset(
            &good,
            &wo,
            &x,
            LabelRows::Tokens {
                len: 2,
                values: &[1, 3],
            },
        )
        .unwrap();
        let path = good.join(MANIFEST_FILE);
        let json = std::fs::read_to_string(&path).unwrap();
        assert!(json.contains("\"num_classes\": 4"), "{json}");
        std::fs::write(
            &path,
            json.replace("\"num_classes\": 4", "\"num_classes\": 3"),
        )
        .unwrap();
        let err = Dataset::load(&good).unwrap_err().to_string();
        assert!(err.contains("label 3, outside 0..3"), "{err}");
    }
}
