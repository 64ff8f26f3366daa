"""Byte-level BPE in pure Python, for the `tokenizer.json` that `coordinator dataset pack --text
--bpe-vocab N` writes (HuggingFace `tokenizers`' own format, GPT-2's scheme): decoding ids to
the exact bytes, and encoding text by GPT-2's pre-tokenizer split and the merges applied in
rank order. No `tokenizers` package is needed (none is installed, and nothing is downloaded).

Decoding is exact. Encoding is exact for text whose letters and digits Python's `re` classes
the way Unicode's \\p{L} and \\p{N} do (all of ASCII, and most letters); the GPT-2 regex needs
\\p{L}, which `re` lacks, so `[^\\W\\d_]` stands in for it. It is meant for prompts.

Usage (a check of a packed dataset against its text, for the tests):
  byte_bpe.py check DATASET_DIR START_BYTE TEXT_FILE...
reads the dataset's token stream (each sample's inputs and its last target, in shard order) and
prints one JSON line: {"tokens": its length, "decodes_to_text": whether it decodes to the text's
bytes from START_BYTE on (the files concatenated), "encode_agrees": whether encoding that text
here gives the same ids}.
"""

import hashlib
import json
import pathlib
import re
import sys

# GPT-2's pre-tokenizer, with \p{L} as [^\W\d_] and \p{N} as \d: contractions, an optional
# space and a run of letters, digits or other symbols, then whitespace runs.
PRETOKENIZE = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+""")


def bytes_to_unicode():
    """GPT-2's map of the 256 bytes onto printable characters: `!`..`~`, `¡`..`¬` and `®`..`ÿ`
    stand for themselves, the other 68 bytes, in order, for U+0100 onwards."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shifted = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def read_tokenizer(path):
    """The tokenizer JSON at `path`, or, for a dataset directory, the one its MANIFEST.json
    lists, its sha256 checked against the manifest's."""
    path = pathlib.Path(path)
    if not path.is_dir():
        return json.loads(path.read_bytes())
    manifest = json.loads((path / "MANIFEST.json").read_bytes())
    entry = manifest.get("tokenizer")
    if entry is None:
        sys.exit(f"{path}: the dataset lists no tokenizer (its tokens are bytes)")
    data = (path / entry["file"]).read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != entry["sha256"]:
        sys.exit(f"{path / entry['file']}: sha256 is {actual} but the manifest records {entry['sha256']}")
    return json.loads(data)


class ByteBpe:
    """A byte-level BPE vocabulary: ids 0..vocab_size, each a string of byte symbols."""

    def __init__(self, tokenizer):
        model = tokenizer["model"]
        if model.get("type") != "BPE":
            raise ValueError(f"not a BPE tokenizer: model type {model.get('type')!r}")
        self.vocab = model["vocab"]
        self.id_to_token = {i: t for t, i in self.vocab.items()}
        # Older files write a merge as "a b", newer ones as ["a", "b"].
        self.ranks = {tuple(m.split(" ", 1) if isinstance(m, str) else m): r for r, m in enumerate(model["merges"])}
        self.byte_to_char = bytes_to_unicode()
        self.char_to_byte = {c: b for b, c in self.byte_to_char.items()}

    @property
    def vocab_size(self):
        return len(self.vocab)

    def encode(self, text):
        ids = []
        for word in PRETOKENIZE.findall(text):
            symbols = [self.byte_to_char[b] for b in word.encode()]
            while len(symbols) > 1:
                ranked = [(self.ranks[p], p) for p in zip(symbols, symbols[1:]) if p in self.ranks]
                if not ranked:
                    break
                a, b = min(ranked)[1]
                merged, i = [], 0
                while i < len(symbols):
                    if i + 1 < len(symbols) and symbols[i] == a and symbols[i + 1] == b:
                        merged.append(a + b)
                        i += 2
                    else:
                        merged.append(symbols[i])
                        i += 1
                symbols = merged
            ids.extend(self.vocab[s] for s in symbols)
        return ids

    def decode(self, ids):
        return bytes(self.char_to_byte[c] for i in ids for c in self.id_to_token[i])


def dataset_tokens(data_dir):
    """The token stream of a packed text dataset: chunk i is sample i's inputs and last target."""
    from safetensors.torch import load_file

    manifest = json.loads((pathlib.Path(data_dir) / "MANIFEST.json").read_bytes())
    ids = []
    for shard in manifest["shards"]:
        t = load_file(str(pathlib.Path(data_dir) / shard["file"]))
        for x, y in zip(t["x"].long().tolist(), t["y"].tolist()):
            ids.extend(x)
            ids.append(y[-1])
    return ids


def main():
    mode, data_dir, start, *files = sys.argv[1:]
    if mode != "check":
        sys.exit(f"unknown mode {mode!r}: expected check")
    bpe = ByteBpe(read_tokenizer(data_dir))
    text = b"".join(pathlib.Path(f).read_bytes() for f in files)[int(start) :]
    ids = dataset_tokens(data_dir)
    decoded = bpe.decode(ids)
    encoded = bpe.encode(text.decode("utf-8"))
    print(
        json.dumps(
            {
                "tokens": len(ids),
                "decodes_to_text": decoded == text[: len(decoded)],
                "encode_agrees": encoded[: len(ids)] == ids,
            }
        )
    )


if __name__ == "__main__":
    main()
