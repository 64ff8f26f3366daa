"""PyTorch's side of worker/tests/optim_vs_torch.rs.

Usage: optim_reference.py <dir>

Reads <dir>/problem.safetensors (data `x`, `y`, initial `weight`, `bias`,
and `batches`, the rows each step uses) and <dir>/cases.json (a list of
{"name", "optimizer", "lr", "weight_decay"}, `optimizer` being the job
spec's serialized `train.optimizer`). For every case it trains a linear
least-squares model with torch.optim and writes <dir>/torch.safetensors
with `<case>/<param>` and `<case>/<param>.<state>` for each tensor in the
optimizer's state (the names our `Optimizer::state_tensors` uses).

The mapping from the job spec to torch.optim below is the contract the Rust
test checks: every argument is spelled out, so a changed PyTorch default
cannot slip in unnoticed.
"""

import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file


def make_optimizer(params, case):
    spec, lr, wd = case["optimizer"], case["lr"], case["weight_decay"]
    kind = spec["kind"]
    if kind == "sgd":
        return torch.optim.SGD(
            params,
            lr=lr,
            momentum=spec["momentum"],
            dampening=0.0,
            weight_decay=wd,
            nesterov=spec["nesterov"],
            maximize=False,
        )
    if kind in ("adam", "adam_w"):
        cls = torch.optim.Adam if kind == "adam" else torch.optim.AdamW
        return cls(
            params,
            lr=lr,
            betas=(spec["beta1"], spec["beta2"]),
            eps=spec["eps"],
            weight_decay=wd,
            amsgrad=False,
            maximize=False,
        )
    raise ValueError(f"unknown optimizer kind {kind!r}")


def train(problem, case):
    names = ("weight", "bias")
    params = [problem[n].clone().requires_grad_(True) for n in names]
    opt = make_optimizer(params, case)
    x, y = problem["x"], problem["y"]
    for idx in problem["batches"]:
        xb, yb = x.index_select(0, idx), y.index_select(0, idx)
        # The same expression, in the same order, as the Rust side.
        r = xb @ params[0].T + params[1] - yb
        loss = (r * r).sum(1).mean() * 0.5
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = {}
    for name, p in zip(names, params):
        out[f"{case['name']}/{name}"] = p.detach().clone()
        for key, value in opt.state[p].items():
            # `step` is a count, not a tensor our optimizer checkpoints per
            # parameter; the Rust side checks its own count.
            if key != "step":
                out[f"{case['name']}/{name}.{key}"] = value.detach().clone()
    return out


def main():
    d = sys.argv[1]
    problem = load_file(os.path.join(d, "problem.safetensors"))
    with open(os.path.join(d, "cases.json")) as f:
        cases = json.load(f)
    out = {}
    for case in cases:
        out.update(train(problem, case))
    save_file(out, os.path.join(d, "torch.safetensors"))


if __name__ == "__main__":
    main()
