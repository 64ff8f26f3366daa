"""Prints text sampled from the `text-gpt` example's trained model: loads its model.safetensors
into nanoGPT's PyTorch module (tests/python/gpt_reference.py, strict load_state_dict) and draws
bytes one at a time from the softmax of the last position's logits, feeding back the last 64.

Usage: .venv/bin/python examples/text-gpt/sample.py [MODEL.safetensors] [PROMPT] [CHARS] [SEED]
(defaults: run/out/text-gpt/model.safetensors, "This License ", 400, 0). The model shape must
match examples/text-gpt.toml (2 layers, 4 heads, width 128, context 64).
"""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "python"))

from gpt_reference import sample  # noqa: E402

LAYERS, HEADS, WIDTH, CONTEXT = 2, 4, 128, 64


def main():
    args = sys.argv[1:]
    model = args[0] if len(args) > 0 else str(ROOT / "run/out/text-gpt/model.safetensors")
    prompt = args[1] if len(args) > 1 else "This License "
    chars = int(args[2]) if len(args) > 2 else 400
    seed = int(args[3]) if len(args) > 3 else 0
    print(sample(model, LAYERS, HEADS, WIDTH, CONTEXT, prompt, chars, seed))


if __name__ == "__main__":
    main()
