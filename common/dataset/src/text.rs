//! Text as a language model's data (`dataset pack --text`): the files concatenated in the
//! order given into one stream, tokenized either as bytes (vocabulary [`BYTE_VOCAB`], a token
//! is the byte) or, with `--bpe-vocab N`, as byte-level BPE ids (`bpe.rs`, at most `N` tokens),
//! each part's tokens cut into consecutive non-overlapping chunks of `context + 1` tokens. Each
//! chunk is one sample: `x` is its first `context` tokens stored as f32 features (token ids
//! below 2^24 are exact in f32), `y` its last `context` tokens (the next token at every
//! position), a token sequence ([`LabelKind::Tokens`]).
//!
//! The split is chronological and made on the text, before tokenizing: the last
//! `val_fraction` of the bytes is the validation text (with BPE the split moves forward to the
//! next UTF-8 character boundary, at most 3 bytes). The BPE vocabulary is trained on the
//! training text alone, then each part is encoded on its own, so no validation text shapes the
//! vocabulary or the training samples. The tokenizer is stored as `tokenizer.json` in both
//! `train/` and `val/`, listed with its sha256 in each manifest.
//!
//! The pack reports the unigram baseline: the perplexity on the validation targets of the
//! training tokens' frequencies (add-one smoothed over the vocabulary), the figure a model that
//! ignores context gets and a real one must beat. A perplexity per BPE token is not comparable
//! with one per byte, so the baseline is also given in bits per byte of validation text, with
//! the validation targets' bytes per token to convert a model's perplexity the same way.
//! Tables are packed in `pack.rs`, series in `timeseries.rs`.

use crate::bpe::{self, Bpe};
use crate::manifest::{LabelKind, TOKENIZER_FILE};
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
    /// `Some(n)`: byte-level BPE tokens, a vocabulary of at most `n` (256 to 2^20, the byte
    /// symbols included) trained on the training text; `None`: byte tokens.
    pub bpe_vocab: Option<u32>,
}

/// What [`pack_text`] wrote.
#[derive(Clone, Debug, PartialEq)]
pub struct TextReport {
    pub train_dir: PathBuf,
    pub val_dir: Option<PathBuf>,
    /// Bytes of text, and the byte where the validation text starts.
    pub bytes: u64,
    pub split_byte: u64,
    /// Tokens in the whole stream: the training and validation parts' together.
    pub tokens: u64,
    /// Tokens of the training and validation parts of the stream (before chunking drops
    /// each part's tail).
    pub train_tokens: u64,
    pub val_tokens: u64,
    pub train_samples: u64,
    pub val_samples: u64,
    /// Tokens in the vocabulary: 256 for bytes; with BPE at most the size asked for (fewer
    /// when the training text runs out of pairs to merge).
    pub vocab: u32,
    /// The tokenizer file written beside the shards ([`TOKENIZER_FILE`]); `None` for bytes.
    pub tokenizer: Option<String>,
    /// `exp` of the cross entropy, on the validation samples' target tokens, of the training
    /// tokens' frequencies (add-one smoothed); `None` without validation.
    pub unigram_val_perplexity: Option<f64>,
    /// The same cross entropy in bits per byte of the validation targets' text.
    pub unigram_val_bits_per_byte: Option<f64>,
    /// Bytes of text per validation target token (1 for bytes): a perplexity per token `p`
    /// is `log2(p) / val_bytes_per_token` bits per byte.
    pub val_bytes_per_token: Option<f64>,
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

/// Cuts `tokens` (bytes or BPE ids) into consecutive non-overlapping chunks of `context + 1`;
/// a tail shorter than a chunk is dropped.
pub fn chunk_tokens<T: Copy + Into<u32>>(tokens: &[T], context: usize) -> Chunks {
    let mut x = Vec::new();
    let mut y = Vec::new();
    for chunk in tokens.chunks_exact(context + 1) {
        // Exact: ids are below MAX_CLASSES = 2^20 < 2^24.
        x.extend(chunk[..context].iter().map(|&t| t.into() as f32));
        y.extend(chunk[1..].iter().map(|&t| i64::from(t.into())));
    }
    Chunks { x, y }
}

/// Where the validation text starts: the last `val_fraction` of `tokens` tokens, rounded.
pub fn split_point(tokens: usize, val_fraction: f64) -> usize {
    tokens - (tokens as f64 * val_fraction).round() as usize
}

/// How often each of `vocab` tokens occurs in `tokens`, plus one (add-one smoothing).
pub fn smoothed_counts<T: Copy + Into<u32>>(tokens: &[T], vocab: u32) -> Vec<u64> {
    let mut counts = vec![1u64; vocab as usize];
    for &t in tokens {
        counts[t.into() as usize] += 1;
    }
    counts
}

/// `exp` of the mean of `-ln p(t)` over `targets`, `p` the frequencies `counts`
/// ([`smoothed_counts`]) normalized.
pub fn unigram_perplexity(counts: &[u64], targets: &[i64]) -> f64 {
    let total: u64 = counts.iter().sum();
    let nll: f64 = targets
        .iter()
        .map(|&t| -(counts[t as usize] as f64 / total as f64).ln())
        .sum();
    (nll / targets.len().max(1) as f64).exp()
}

/// One part of the text, tokenized.
enum Tokens<'a> {
    Bytes(&'a [u8]),
    Bpe(Vec<u32>),
}

impl Tokens<'_> {
    fn len(&self) -> usize {
        match self {
            Tokens::Bytes(b) => b.len(),
            Tokens::Bpe(ids) => ids.len(),
        }
    }

    fn chunks(&self, context: usize) -> Chunks {
        match self {
            Tokens::Bytes(b) => chunk_tokens(b, context),
            Tokens::Bpe(ids) => chunk_tokens(ids, context),
        }
    }

    fn counts(&self, vocab: u32) -> Vec<u64> {
        match self {
            Tokens::Bytes(b) => smoothed_counts(b, vocab),
            Tokens::Bpe(ids) => smoothed_counts(ids, vocab),
        }
    }
}

/// Reads, tokenizes, cuts and writes the files as `train/` and `val/` datasets under
/// `opts.output`. Refuses a context of 0, a validation fraction outside `[0, 1)`, a BPE
/// vocabulary outside 256 to 2^20, empty or unreadable files (with BPE, files that are not
/// UTF-8), too little text for one training (or, when asked, validation) sample, and an output
/// that already holds a dataset; nothing is written then.
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
    if let Some(n) = opts.bpe_vocab {
        bpe::check_vocab(n)?;
    }
    if opts.files.is_empty() {
        return invalid("--text needs at least one file".into());
    }
    let mut text = Vec::new();
    for path in &opts.files {
        let bytes = std::fs::read(path).map_err(|source| DatasetError::Read {
            path: path.clone(),
            source,
        })?;
        if bytes.is_empty() {
            return Err(DatasetError::EmptyInput { path: path.clone() });
        }
        if opts.bpe_vocab.is_some()
            && let Err(e) = std::str::from_utf8(&bytes)
        {
            return invalid(format!(
                "{}: not UTF-8 (byte {}); --bpe-vocab needs UTF-8 text, byte-level tokens \
                 (without --bpe-vocab) take any bytes",
                path.display(),
                e.valid_up_to()
            ));
        }
        text.extend_from_slice(&bytes);
        if text.len() as u64 > MAX_TEXT_BYTES {
            return Err(DatasetError::TooLarge {
                what: "text bytes",
                value: text.len() as u64,
                limit: MAX_TEXT_BYTES,
            });
        }
    }
    let train_dir = opts.output.join("train");
    let val_dir = (opts.val_fraction > 0.0).then(|| opts.output.join("val"));
    for dir in std::iter::once(&train_dir).chain(val_dir.as_ref()) {
        if dir.join(MANIFEST_FILE).exists() {
            return Err(DatasetError::OutputExists { path: dir.clone() });
        }
    }
    let mut split = split_point(text.len(), opts.val_fraction);
    let (train_tokens, val_tokens, bpe) = match opts.bpe_vocab {
        None => {
            let (train, val) = text.split_at(split);
            (Tokens::Bytes(train), Tokens::Bytes(val), None)
        }
        Some(n) => {
            // Every file is UTF-8, so their concatenation is.
            let text = std::str::from_utf8(&text)
                .map_err(|e| DatasetError::InvalidInput(format!("the text is not UTF-8: {e}")))?;
            while !text.is_char_boundary(split) {
                split += 1;
            }
            let (train, val) = text.split_at(split);
            let bpe = Bpe::train(train, n)?;
            let train_ids = bpe.encode(train)?;
            let val_ids = bpe.encode(val)?;
            (Tokens::Bpe(train_ids), Tokens::Bpe(val_ids), Some(bpe))
        }
    };
    let vocab = bpe.as_ref().map_or(BYTE_VOCAB, Bpe::vocab_size);
    let train = train_tokens.chunks(t);
    let val = val_tokens.chunks(t);
    let unit = if bpe.is_some() { "BPE tokens" } else { "bytes" };
    if train.samples(t) == 0 {
        return invalid(format!(
            "the training text ({} {unit}) is shorter than one sample of --context {t} + 1 \
             tokens",
            train_tokens.len()
        ));
    }
    if opts.val_fraction > 0.0 && val.samples(t) == 0 {
        return invalid(format!(
            "the validation text ({} {unit}, --val-fraction {}) is shorter than one sample of \
             --context {t} + 1 tokens; raise --val-fraction or lower --context",
            val_tokens.len(),
            opts.val_fraction
        ));
    }
    let labels = LabelKind::Tokens { vocab, len: t };
    let tokenizer_json = bpe.as_ref().map(Bpe::to_json).transpose()?;
    let files: Vec<String> = opts.files.iter().map(|p| p.display().to_string()).collect();
    let tokens_are = match &bpe {
        None => "byte-level tokens".to_string(),
        Some(_) => format!(
            "byte-level BPE tokens ({TOKENIZER_FILE}, vocabulary {vocab} trained on the training \
             text only)"
        ),
    };
    let source = format!(
        "{tokens_are} of {} ({} bytes), chunks of {t} + 1 tokens, chronological split at \
         byte {split} (validation fraction {})",
        files.join(", "),
        text.len(),
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
            tokenizer: tokenizer_json.clone(),
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
    let baseline = match val_manifest {
        None => None,
        Some(_) => {
            let ppl = unigram_perplexity(&train_tokens.counts(vocab), &val.y);
            let val_bytes: u64 = match &bpe {
                None => val.y.len() as u64,
                Some(bpe) => {
                    let lens: Vec<u64> =
                        bpe.token_bytes()?.iter().map(|b| b.len() as u64).collect();
                    val.y.iter().map(|&id| lens[id as usize]).sum()
                }
            };
            let per_token = val_bytes as f64 / val.y.len().max(1) as f64;
            Some((ppl, ppl.log2() / per_token, per_token))
        }
    };
    Ok(TextReport {
        train_dir,
        val_dir,
        bytes: text.len() as u64,
        split_byte: split as u64,
        tokens: (train_tokens.len() + val_tokens.len()) as u64,
        train_tokens: train_tokens.len() as u64,
        val_tokens: val_tokens.len() as u64,
        train_samples: train_manifest.num_samples,
        val_samples: val_manifest.as_ref().map_or(0, |m| m.num_samples),
        vocab,
        tokenizer: bpe.is_some().then(|| TOKENIZER_FILE.to_string()),
        unigram_val_perplexity: baseline.map(|b| b.0),
        unigram_val_bits_per_byte: baseline.map(|b| b.1),
        val_bytes_per_token: baseline.map(|b| b.2),
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
            bpe_vocab: None,
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
            bpe_vocab: None,
        };
        let err = |o| pack_text(&o).unwrap_err().to_string();
        assert!(err(opts(0, 0.1)).contains("--context must be"));
        assert!(err(opts(4, 1.0)).contains("--val-fraction"));
        assert!(err(opts(11, 0.0)).contains("shorter than one sample"));
        assert!(err(opts(4, 0.1)).contains("validation text"));
        assert!(!dir.path().join("out").exists());
    }

    /// Packs `text` with `--bpe-vocab vocab`, context 8 and validation fraction 0.25 into
    /// `dir/out`.
    fn pack_bpe(dir: &Path, out: &str, text: &str, vocab: u32) -> Result<TextReport, DatasetError> {
        let file = dir.join("corpus.txt");
        std::fs::write(&file, text).unwrap();
        pack_text(&TextOptions {
            files: vec![file],
            context: 8,
            val_fraction: 0.25,
            output: dir.join(out),
            name: "t".into(),
            shard_samples: Some(16),
            bpe_vocab: Some(vocab),
        })
    }

    /// English-like lines: the last 70 (well inside the validation quarter of the bytes) say
    /// "zephyrquokka", the others never do.
    fn corpus() -> String {
        let words = [
            "license",
            "software",
            "copyright",
            "the",
            "of",
            "and",
            "notice",
        ];
        let mut text = String::new();
        for line in 0..400 {
            for i in 0..8 {
                text.push_str(words[(line * 3 + i * 5) % words.len()]);
                text.push(' ');
            }
            if line >= 330 {
                text.push_str("zephyrquokka ");
            }
            text.push_str("é.\n");
        }
        text
    }

    /// The token stream the samples of a dataset hold: each chunk's inputs and its last target.
    fn stream(ds: &Dataset, context: usize) -> Vec<u32> {
        let y = ds.y.tokens().unwrap();
        let mut ids = Vec::new();
        for i in 0..ds.len() {
            ids.extend(
                ds.x[i * context..(i + 1) * context]
                    .iter()
                    .map(|&v| v as u32),
            );
            ids.push(y[(i + 1) * context - 1] as u32);
        }
        ids
    }

    #[test]
    fn the_bpe_vocabulary_is_trained_on_the_training_text_only() {
        let dir = tempfile::tempdir().unwrap();
        let text = corpus();
        // More than the text has pairs for: training stops when every word is one token.
        let report = pack_bpe(dir.path(), "out", &text, 1000).unwrap();
        assert!(
            report.vocab > 280 && report.vocab < 1000,
            "{}",
            report.vocab
        );
        assert_eq!(report.tokenizer.as_deref(), Some(TOKENIZER_FILE));
        let train_dir = &report.train_dir;
        let val_dir = report.val_dir.clone().unwrap();
        let json = std::fs::read(train_dir.join(TOKENIZER_FILE)).unwrap();
        assert_eq!(std::fs::read(val_dir.join(TOKENIZER_FILE)).unwrap(), json);
        let bpe = Bpe::from_json(&json).unwrap();
        assert_eq!(bpe.vocab_size(), report.vocab);
        let single = |word: &str| bpe.encode(word).unwrap().len() == 1;
        // Words of the training text are single tokens; the validation text's own word is not.
        assert!(single(" copyright") && single(" license"));
        assert!(text[report.split_byte as usize..].contains("zephyrquokka"));
        assert!(!text[..report.split_byte as usize].contains("zephyrquokka"));
        let pieces = bpe.encode(" zephyrquokka").unwrap().len();
        assert!(pieces >= 4, "the held-out word is {pieces} tokens");

        let train = Dataset::load(train_dir).unwrap();
        assert_eq!(
            train.manifest.labels(),
            LabelKind::Tokens {
                vocab: report.vocab,
                len: 8
            }
        );
        let entry = train.manifest.tokenizer.clone().unwrap();
        assert_eq!(entry.file, TOKENIZER_FILE);
        let reader = crate::LocalDir(train_dir.clone());
        assert_eq!(
            crate::read_tokenizer(&reader, &train.manifest).unwrap(),
            Some(json.clone())
        );
        // A changed tokenizer fails its checksum, as a changed shard does.
        let mut tampered = json.clone();
        tampered.push(b' ');
        std::fs::write(train_dir.join(TOKENIZER_FILE), tampered).unwrap();
        let err = crate::read_tokenizer(&reader, &train.manifest).unwrap_err();
        assert!(
            matches!(err, DatasetError::TokenizerChecksum { .. }),
            "{err}"
        );

        // The samples decode to the text: training from its start, validation from the split.
        let decoded = bpe.decode(&stream(&train, 8)).unwrap();
        assert!(text.as_bytes().starts_with(&decoded) && decoded.len() > text.len() / 2);
        let val = Dataset::load(&val_dir).unwrap();
        let decoded = bpe.decode(&stream(&val, 8)).unwrap();
        assert!(text.as_bytes()[report.split_byte as usize..].starts_with(&decoded));
        assert!(decoded.len() > text.len() / 8);
        assert_eq!(report.train_samples, report.train_tokens / 9);
        assert_eq!(report.val_samples, report.val_tokens / 9);
    }

    #[test]
    fn the_bpe_baseline_counts_tokens_and_converts_to_bits_per_byte() {
        let dir = tempfile::tempdir().unwrap();
        let text = corpus();
        let bytes = pack_text(&TextOptions {
            files: vec![{
                let f = dir.path().join("c.txt");
                std::fs::write(&f, &text).unwrap();
                f
            }],
            context: 8,
            val_fraction: 0.25,
            output: dir.path().join("bytes"),
            name: "t".into(),
            shard_samples: None,
            bpe_vocab: None,
        })
        .unwrap();
        // Bytes: one byte per token, bits per byte is log2 of the perplexity.
        assert_eq!(bytes.val_bytes_per_token, Some(1.0));
        let ppl = bytes.unigram_val_perplexity.unwrap();
        let bpb = bytes.unigram_val_bits_per_byte.unwrap();
        assert!((bpb - ppl.log2()).abs() < 1e-12, "{bpb} vs {ppl}");

        let report = pack_bpe(dir.path(), "bpe", &text, 290).unwrap();
        assert_eq!(report.vocab, 290);
        let json = std::fs::read(report.train_dir.join(TOKENIZER_FILE)).unwrap();
        let bpe = Bpe::from_json(&json).unwrap();
        let train = Dataset::load(&report.train_dir).unwrap();
        let val = Dataset::load(report.val_dir.as_ref().unwrap()).unwrap();
        // The baseline recomputed from the packed tokens: the training part's counts (the
        // whole part, as encoded) over the validation targets.
        let train_text = &text[..report.split_byte as usize];
        let counts = smoothed_counts(&bpe.encode(train_text).unwrap(), 290);
        let targets = val.y.tokens().unwrap();
        let want = unigram_perplexity(&counts, targets);
        assert_eq!(report.unigram_val_perplexity, Some(want));
        let target_bytes: usize = targets
            .iter()
            .map(|&t| bpe.decode(&[t as u32]).unwrap().len())
            .sum();
        let per_token = target_bytes as f64 / targets.len() as f64;
        assert_eq!(report.val_bytes_per_token, Some(per_token));
        assert!(per_token > 2.0, "{per_token}");
        let bpb = report.unigram_val_bits_per_byte.unwrap();
        assert!((bpb - want.log2() / per_token).abs() < 1e-12);
        // Per token, BPE's baseline perplexity is far above the bytes'; per byte it is below.
        assert!(want > 2.0 * ppl && bpb < bytes.unigram_val_bits_per_byte.unwrap());
        assert!(!train.is_empty());
    }

    #[test]
    fn packing_with_bpe_twice_writes_identical_files() {
        let dir = tempfile::tempdir().unwrap();
        let text = corpus();
        pack_bpe(dir.path(), "a", &text, 350).unwrap();
        pack_bpe(dir.path(), "b", &text, 350).unwrap();
        for part in ["train", "val"] {
            let a = dir.path().join("a").join(part);
            let mut files: Vec<_> = std::fs::read_dir(&a)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            files.sort();
            assert!(files.len() >= 3, "{files:?}");
            for f in files {
                let b = dir.path().join("b").join(part).join(&f);
                assert!(
                    std::fs::read(a.join(&f)).unwrap() == std::fs::read(&b).unwrap(),
                    "{part}/{f:?} differs between two packs"
                );
            }
        }
    }

    #[test]
    fn bad_bpe_options_and_text_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let text = corpus();
        for n in [0, 255, (1 << 20) + 1] {
            let err = pack_bpe(dir.path(), "out", &text, n)
                .unwrap_err()
                .to_string();
            assert!(err.contains("--bpe-vocab must be 256"), "{n}: {err}");
        }
        let file = dir.path().join("latin1.txt");
        std::fs::write(&file, b"caf\xe9 au lait, caf\xe9 noir\n".repeat(50)).unwrap();
        let err = pack_text(&TextOptions {
            files: vec![file],
            context: 8,
            val_fraction: 0.1,
            output: dir.path().join("out"),
            name: "t".into(),
            shard_samples: None,
            bpe_vocab: Some(300),
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("latin1.txt: not UTF-8 (byte 3)"), "{err}");
        assert!(!dir.path().join("out").exists());
    }

    #[test]
    fn a_tokenizer_only_goes_with_token_sequences() {
        let dir = tempfile::tempdir().unwrap();
        let report = pack_bpe(dir.path(), "out", &corpus(), 300).unwrap();
        let path = report.train_dir.join(MANIFEST_FILE);
        let json = std::fs::read_to_string(&path).unwrap();
        assert!(json.contains("\"tokenizer\": {"), "{json}");
        let mut m: crate::DatasetManifest = serde_json::from_str(&json).unwrap();
        m.validate().unwrap();
        let tokens = m.schema.clone();
        m.schema = crate::Schema::new(8, LabelKind::Classes(300));
        let err = m.validate().unwrap_err().to_string();
        assert!(err.contains("only applies to token sequences"), "{err}");
        m.schema = tokens;
        m.tokenizer.as_mut().unwrap().file = "../tokenizer.json".into();
        assert!(m.validate().is_err());
        m.tokenizer.as_mut().unwrap().file = "shard-00000.safetensors".into();
        let err = m.validate().unwrap_err().to_string();
        assert!(err.contains("also a shard"), "{err}");
    }

    #[test]
    fn unigram_baseline_is_the_smoothed_frequencies_cross_entropy() {
        // Training "aab": counts a=3, b=2, others 1; total 256 + 3 = 259.
        let ppl = unigram_perplexity(&smoothed_counts(b"aab", BYTE_VOCAB), &[97, 98]);
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
            tokenizer: None,
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
