//! Byte-level BPE for `dataset pack --text --bpe-vocab N`: training a vocabulary with
//! HuggingFace's `tokenizers` crate (GPT-2's scheme: the text's bytes mapped one to one onto
//! 256 printable characters, split by GPT-2's pre-tokenizer regex, then merged), encoding text
//! with it, and decoding ids back to the exact bytes. The vocabulary holds the 256 byte symbols
//! first, so any UTF-8 text is encodable and decoding is lossless. Deciding what to train on
//! (the training part only) is `text.rs`'s business.
//!
//! Text is handed to the crate in pieces of about [`PIECE_BYTES`], cut only where GPT-2's
//! pre-tokenizer would cut anyway (see [`pieces`]): a piece's tokens are then exactly those
//! the whole text would get, while the crate's per-token bookkeeping (offsets, strings) stays
//! bounded by a piece rather than the whole text.

use crate::DatasetError;
use crate::manifest::MAX_CLASSES;
use tokenizers::Tokenizer;
use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;

/// The fewest BPE tokens: the 256 byte symbols, no merges.
pub const MIN_BPE_VOCAB: u32 = 256;
/// The most BPE tokens: a dataset's vocabulary bound.
pub const MAX_BPE_VOCAB: u32 = MAX_CLASSES;
/// About this many bytes of text go to the tokenizer at once.
pub const PIECE_BYTES: usize = 1 << 16;

/// A trained byte-level BPE tokenizer.
pub struct Bpe {
    tokenizer: Tokenizer,
}

impl std::fmt::Debug for Bpe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bpe {{ vocab: {} }}", self.vocab_size())
    }
}

fn tokenizer_error(what: &str, e: tokenizers::Error) -> DatasetError {
    DatasetError::InvalidInput(format!("{what}: {e}"))
}

/// The pre-tokenizer and decoder both: no space added in front of the text (GPT-2's
/// `add_prefix_space`), since that would make decoding add a byte; offsets are not used.
fn byte_level() -> ByteLevel {
    ByteLevel::new(false, false, true)
}

impl Bpe {
    /// Trains a vocabulary of at most `vocab` tokens on `text`: the 256 byte symbols, then
    /// merges of the most frequent adjacent pair (ties to the lowest ids, so the result is
    /// deterministic) until `vocab` tokens or no pair is left to merge. Refuses `vocab`
    /// outside `MIN_BPE_VOCAB..=MAX_BPE_VOCAB`.
    pub fn train(text: &str, vocab: u32) -> Result<Bpe, DatasetError> {
        check_vocab(vocab)?;
        let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
            .show_progress(false)
            .vocab_size(vocab as usize)
            .min_frequency(0)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build()
            .into();
        let mut tokenizer = Tokenizer::new(BPE::default());
        tokenizer.with_pre_tokenizer(Some(byte_level()));
        tokenizer.with_decoder(Some(byte_level()));
        tokenizer
            .train(&mut trainer, pieces(text, PIECE_BYTES))
            .map_err(|e| tokenizer_error("training the BPE vocabulary failed", e))?;
        Ok(Bpe { tokenizer })
    }

    /// Reads a `tokenizer.json` as [`Bpe::to_json`] writes it.
    pub fn from_json(json: &[u8]) -> Result<Bpe, DatasetError> {
        let tokenizer =
            Tokenizer::from_bytes(json).map_err(|e| tokenizer_error("not a tokenizer.json", e))?;
        Ok(Bpe { tokenizer })
    }

    /// The `tokenizers` crate's own serialization (`tokenizer.json`, which HuggingFace's
    /// Python `tokenizers` also reads). Deterministic: the vocabulary is written in id order
    /// and the merges in rank order.
    pub fn to_json(&self) -> Result<Vec<u8>, DatasetError> {
        let json = self
            .tokenizer
            .to_string(true)
            .map_err(|e| tokenizer_error("serializing the tokenizer failed", e))?;
        Ok(json.into_bytes())
    }

    /// Tokens in the vocabulary: ids are `0..vocab_size()`.
    pub fn vocab_size(&self) -> u32 {
        self.tokenizer.get_vocab_size(true) as u32
    }

    /// The ids of `text`, identical to encoding it whole (see [`pieces`]).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, DatasetError> {
        let mut ids = Vec::with_capacity(text.len() / 3);
        let pieces: Vec<&str> = pieces(text, PIECE_BYTES).collect();
        // A few pieces at a time: the crate encodes a batch in parallel.
        for batch in pieces.chunks(16) {
            let encodings = self
                .tokenizer
                .encode_batch_fast(batch.to_vec(), false)
                .map_err(|e| tokenizer_error("BPE encoding failed", e))?;
            for e in encodings {
                ids.extend_from_slice(e.get_ids());
            }
        }
        Ok(ids)
    }

    /// The bytes each id stands for, indexed by id: a byte-level token's characters are one
    /// byte each.
    pub fn token_bytes(&self) -> Result<Vec<Vec<u8>>, DatasetError> {
        let unicode_to_byte = unicode_to_byte();
        (0..self.vocab_size())
            .map(|id| {
                let token = self.tokenizer.id_to_token(id).ok_or_else(|| {
                    DatasetError::InvalidInput(format!("the BPE vocabulary has no id {id}"))
                })?;
                token
                    .chars()
                    .map(|c| {
                        unicode_to_byte(c).ok_or_else(|| {
                            DatasetError::InvalidInput(format!(
                                "BPE token {id} ({token:?}) is not byte-level"
                            ))
                        })
                    })
                    .collect()
            })
            .collect()
    }

    /// The exact bytes `ids` stand for. Refuses an id outside the vocabulary.
    pub fn decode(&self, ids: &[u32]) -> Result<Vec<u8>, DatasetError> {
        let table = self.token_bytes()?;
        let mut bytes = Vec::new();
        for &id in ids {
            let token = table.get(id as usize).ok_or_else(|| {
                DatasetError::InvalidInput(format!(
                    "id {id} is outside the BPE vocabulary 0..{}",
                    table.len()
                ))
            })?;
            bytes.extend_from_slice(token);
        }
        Ok(bytes)
    }
}

/// Refuses a vocabulary size outside `MIN_BPE_VOCAB..=MAX_BPE_VOCAB`.
pub fn check_vocab(vocab: u32) -> Result<(), DatasetError> {
    if (MIN_BPE_VOCAB..=MAX_BPE_VOCAB).contains(&vocab) {
        Ok(())
    } else {
        Err(DatasetError::InvalidInput(format!(
            "--bpe-vocab must be {MIN_BPE_VOCAB} (the byte symbols, which it includes) to \
             {MAX_BPE_VOCAB}, got {vocab}"
        )))
    }
}

/// GPT-2's byte-to-character map, inverted: the printable bytes `!`..`~`, `¡`..`¬` and
/// `®`..`ÿ` stand for themselves, the other 68 bytes, in order, for U+0100 onwards.
fn unicode_to_byte() -> impl Fn(char) -> Option<u8> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut table = std::collections::HashMap::with_capacity(256);
    let mut shifted = 0u32;
    for b in 0..=255u8 {
        let c = if printable(b) {
            char::from(b)
        } else {
            shifted += 1;
            char::from_u32(255 + shifted).unwrap_or(char::REPLACEMENT_CHARACTER)
        };
        table.insert(c, b);
    }
    move |c| table.get(&c).copied()
}

/// `text` cut into consecutive pieces of at least `target` bytes (the last one shorter), each
/// ending with a `\n` that has a printable ASCII character on both sides. GPT-2's
/// pre-tokenizer always isolates such a newline (`\s+` is the only alternative that matches it,
/// and the character after it is not whitespace), so each piece pre-tokenizes, and BPE merges
/// only within pre-tokens, exactly as in the whole text. A text with no such newline is one
/// piece.
pub fn pieces(text: &str, target: usize) -> impl Iterator<Item = &str> + Send {
    let bytes = text.as_bytes();
    let mut start = 0;
    std::iter::from_fn(move || {
        if start >= bytes.len() {
            return None;
        }
        let mut end = (start + target.max(1)).max(start + 2);
        while end < bytes.len()
            && !(bytes[end - 1] == b'\n'
                && bytes[end - 2].is_ascii_graphic()
                && bytes[end].is_ascii_graphic())
        {
            end += 1;
        }
        let end = end.min(bytes.len());
        // ASCII on both sides of the cut: a char boundary.
        let piece = &text[start..end];
        start = end;
        Some(piece)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// English-like text with newlines, runs of spaces and a few non-ASCII characters.
    fn corpus(lines: usize) -> String {
        let words = [
            "the",
            "licence",
            "software",
            "copyright",
            "holder",
            "shall",
            "not",
            "be",
            "liable",
            "naïve",
            "Straße",
            "—",
            "€5",
            "2024",
            "you're",
            "it's",
            "(c)",
            "  ",
            "\t",
            "",
        ];
        let mut state = 12345u64;
        let mut text = String::new();
        for _ in 0..lines {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let n = 3 + (state >> 60) as usize;
            for i in 0..n {
                let w = words[((state >> (7 * i as u64 % 50)) % words.len() as u64) as usize];
                text.push_str(w);
                text.push(' ');
            }
            text.push_str(if state.is_multiple_of(7) {
                "\n\n"
            } else {
                ".\n"
            });
        }
        text
    }

    #[test]
    fn pieces_cover_the_text_and_encode_as_the_whole_does() {
        let text = corpus(400);
        let bpe = Bpe::train(&text, 300).unwrap();
        let whole = bpe.tokenizer.encode_fast(text.as_str(), false).unwrap();
        for target in [1, 7, 100, 1 << 20] {
            let cut: Vec<&str> = pieces(&text, target).collect();
            assert_eq!(cut.concat(), text);
            if target == 100 {
                assert!(cut.len() > 20, "{}", cut.len());
            }
            let ids: Vec<u32> = cut
                .iter()
                .flat_map(|p| {
                    bpe.tokenizer
                        .encode_fast(*p, false)
                        .unwrap()
                        .get_ids()
                        .to_vec()
                })
                .collect();
            assert_eq!(ids, whole.get_ids(), "pieces of {target} bytes");
        }
    }

    #[test]
    fn decoding_is_lossless_and_the_byte_symbols_come_first() {
        let text = corpus(300);
        let bpe = Bpe::train(&text, 350).unwrap();
        assert_eq!(bpe.vocab_size(), 350);
        let ids = bpe.encode(&text).unwrap();
        assert!(ids.len() < text.len() / 2, "{} ids", ids.len());
        assert_eq!(bpe.decode(&ids).unwrap(), text.as_bytes());
        // Text the vocabulary never saw still encodes, byte by byte at worst.
        let unseen = "Zürich 北京 \u{1F600}\r\n\0\x7f";
        assert_eq!(
            bpe.decode(&bpe.encode(unseen).unwrap()).unwrap(),
            unseen.as_bytes()
        );
        let table = bpe.token_bytes().unwrap();
        let mut singles: Vec<u8> = table[..256].iter().map(|t| t[0]).collect();
        assert!(table[..256].iter().all(|t| t.len() == 1));
        singles.sort_unstable();
        assert_eq!(singles, (0..=255).collect::<Vec<u8>>());
        assert!(table[256..].iter().all(|t| t.len() >= 2));
        assert!(bpe.decode(&[350]).is_err());
    }

    #[test]
    fn training_is_deterministic_and_the_json_reads_back() {
        let text = corpus(300);
        let a = Bpe::train(&text, 350).unwrap().to_json().unwrap();
        let b = Bpe::train(&text, 350).unwrap().to_json().unwrap();
        assert!(a == b, "two trainings on the same text differ");
        let back = Bpe::from_json(&a).unwrap();
        assert_eq!(back.to_json().unwrap(), a);
        assert_eq!(back.vocab_size(), 350);
    }

    #[test]
    fn a_vocabulary_outside_the_bounds_is_refused() {
        #[track_caller]
        fn check(vocab: u32, ok: bool) {
            let got = check_vocab(vocab);
            assert_eq!(got.is_ok(), ok, "{vocab}: {got:?}");
            if let Err(e) = got {
                assert!(e.to_string().contains("--bpe-vocab must be 256"), "{e}");
            }
        }
        check(0, false);
        check(255, false);
        check(256, true);
        check(1 << 20, true);
        check((1 << 20) + 1, false);
        assert!(Bpe::train("abc", 10).is_err());
    }

    #[test]
    fn training_stops_when_no_pair_is_left() {
        // "ab ab ab": pre-tokens "ab", " ab"; merges a+b, then space+ab; nothing after.
        let bpe = Bpe::train("ab ab ab", 1000).unwrap();
        assert_eq!(bpe.vocab_size(), 258);
    }
}
