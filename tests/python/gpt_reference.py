"""nanoGPT's decoder-only GPT as a PyTorch module with Ringmaster's `transformer` parameter
names, for the tests and the text example: loads a model.safetensors with a strict
`load_state_dict`, and either scores a Ringmaster token dataset directory or samples text.

Scoring prints one JSON line {"samples", "tokens", "loss", "perplexity"}: next-token cross
entropy averaged over every token of the dataset, and its exp.

Usage:
  gpt_reference.py score MODEL.safetensors DATASET_DIR LAYERS HEADS WIDTH CONTEXT
  gpt_reference.py sample MODEL.safetensors LAYERS HEADS WIDTH CONTEXT PROMPT CHARS [SEED]
"""

import json
import math
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn


class SelfAttention(nn.Module):
    def __init__(self, width, heads, context):
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(width, 3 * width)
        self.c_proj = nn.Linear(width, width)
        self.register_buffer("mask", torch.tril(torch.ones(context, context, dtype=torch.bool)), persistent=False)

    def forward(self, x):
        n, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(n, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(c // self.heads)
        att = att.masked_fill(~self.mask[:t, :t], float("-inf")).softmax(dim=-1)
        return self.c_proj((att @ v).transpose(1, 2).contiguous().view(n, t, c))


class Mlp(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.c_proj = nn.Linear(4 * width, width)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, width, heads, context):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads, context)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = Mlp(width)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Gpt(nn.Module):
    def __init__(self, vocab, layers, heads, width, context, tied):
        super().__init__()
        self.wte = nn.Embedding(vocab, width)
        self.wpe = nn.Embedding(context, width)
        self.h = nn.ModuleList(Block(width, heads, context) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = None if tied else nn.Linear(width, vocab, bias=False)

    def forward(self, idx):
        t = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        for block in self.h:
            x = block(x)
        x = self.ln_f(x)
        return x @ self.wte.weight.T if self.lm_head is None else self.lm_head(x)


def load(model_path, layers, heads, width, context):
    state = load_file(model_path)
    vocab = state["wte.weight"].shape[0]
    model = Gpt(vocab, layers, heads, width, context, tied="lm_head.weight" not in state)
    model.load_state_dict(state, strict=True)
    return model.eval()


def score(model_path, data_dir, layers, heads, width, context):
    model = load(model_path, layers, heads, width, context)
    manifest = json.load(open(f"{data_dir}/MANIFEST.json"))
    total, tokens, samples = 0.0, 0, 0
    with torch.no_grad():
        for shard in manifest["shards"]:
            t = load_file(f"{data_dir}/{shard['file']}")
            x, y = t["x"].long(), t["y"]
            logits = model(x)
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"))
            tokens += y.numel()
            samples += y.shape[0]
    loss = total / tokens
    print(json.dumps({"samples": samples, "tokens": tokens, "loss": loss, "perplexity": math.exp(loss)}))


def sample(model_path, layers, heads, width, context, prompt, chars, seed=0, tokenizer=None):
    """`prompt` followed by `chars` tokens drawn one at a time (bytes for a byte-level model),
    as text. `tokenizer`: a byte_bpe.ByteBpe for a model trained on BPE tokens, None for bytes."""
    model = load(model_path, layers, heads, width, context)
    vocab = model.wte.weight.shape[0]
    if tokenizer is None and vocab != 256:
        raise ValueError(f"the model has {vocab} outputs, not 256 bytes: give its dataset's tokenizer.json")
    if tokenizer is not None and tokenizer.vocab_size != vocab:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model {vocab} outputs")
    gen = torch.Generator().manual_seed(seed)
    idx = list(prompt.encode()) if tokenizer is None else tokenizer.encode(prompt)
    with torch.no_grad():
        for _ in range(chars):
            window = torch.tensor([idx[-context:]])
            probs = model(window)[0, -1].softmax(dim=-1)
            idx.append(int(torch.multinomial(probs, 1, generator=gen)))
    text = bytes(idx) if tokenizer is None else tokenizer.decode(idx)
    return text.decode("utf-8", errors="replace")


def main():
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "score":
        model_path, data_dir, *dims = args
        score(model_path, data_dir, *map(int, dims))
    elif mode == "sample":
        model_path, layers, heads, width, context, prompt, chars, *seed = args
        dims = map(int, (layers, heads, width, context))
        print(sample(model_path, *dims, prompt, int(chars), int(seed[0]) if seed else 0))
    else:
        sys.exit(f"unknown mode {mode!r}: expected score or sample")


if __name__ == "__main__":
    main()
