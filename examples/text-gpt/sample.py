"""Prints text sampled from the `text-gpt` example's trained model: loads its model.safetensors
into nanoGPT's PyTorch module (tests/python/gpt_reference.py, strict load_state_dict) and draws
tokens one at a time from the softmax of the last position's logits, feeding back the last
`context`.

Usage: .venv/bin/python examples/text-gpt/sample.py [--heads H] [--tokenizer PATH]
           [MODEL.safetensors] [PROMPT] [TOKENS] [SEED]
(defaults: run/out/text-gpt/model.safetensors, "This License ", 400, 0). Layers, width and
context are read from the weights; the heads are not in them (default 4, the example's). A model
trained on bytes needs nothing more. One trained on `dataset pack --text --bpe-vocab N` tokens
needs `--tokenizer` with its dataset's directory (its MANIFEST.json lists tokenizer.json and its
sha256, which is checked) or the tokenizer.json itself: the prompt is encoded and the tokens
decoded with it in pure Python (tests/python/byte_bpe.py).
"""

import argparse
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "python"))

from byte_bpe import ByteBpe, read_tokenizer  # noqa: E402
from gpt_reference import sample  # noqa: E402
from safetensors import safe_open  # noqa: E402


def shape(model):
    """Layers, width and context of a model.safetensors, from its tensor names and shapes."""
    with safe_open(model, framework="pt") as f:
        names = list(f.keys())
        width = f.get_slice("wte.weight").get_shape()[1]
        context = f.get_slice("wpe.weight").get_shape()[0]
    layers = len({n.split(".")[1] for n in names if n.startswith("h.")})
    return layers, width, context


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--tokenizer", help="the BPE dataset's directory, or its tokenizer.json")
    p.add_argument("model", nargs="?", default=str(ROOT / "run/out/text-gpt/model.safetensors"))
    p.add_argument("prompt", nargs="?", default="This License ")
    p.add_argument("tokens", nargs="?", type=int, default=400)
    p.add_argument("seed", nargs="?", type=int, default=0)
    a = p.parse_args()
    layers, width, context = shape(a.model)
    tokenizer = ByteBpe(read_tokenizer(a.tokenizer)) if a.tokenizer else None
    try:
        print(sample(a.model, layers, a.heads, width, context, a.prompt, a.tokens, a.seed, tokenizer))
    except ValueError as e:
        sys.exit(f"sample.py: {e}")


if __name__ == "__main__":
    main()
