"""Zeroth-order training with no gradient buffers, and the seed-and-scalar log that rebuilds it exactly.

    python examples/seed_and_scalar.py --steps 400

``zo_spsa.fused_step`` perturbs the weights along directions regenerated from integer seeds, measures
loss differences and applies the SGD update in place: no ``.grad`` ever exists, so training needs the
memory of inference. Each step is fully described by ``K`` seeds and ``K`` scalars; the script records
them, replays them on a copy of the initial weights with ``fused_apply`` and checks that the replayed
weights are bit-identical -- what a federated client or a data-parallel worker would send instead of a
gradient (``forwardlearn fed``, ``forwardlearn train --distributed``).
"""

from __future__ import annotations

import argparse
import copy

import torch

import forwardlearn as fl


def main(argv: list[str] | None = None) -> bool:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--directions", type=int, default=16)
    p.add_argument("--lr", type=float, default=0.1)
    args = p.parse_args(argv)

    torch.manual_seed(0)
    X, y = fl.data.load("digits", "train")
    Xt, yt = fl.data.load("digits", "test")
    model = fl.models.mlp(64, [32], 10)
    start = copy.deepcopy(model)
    rule = fl.get_rule("zo_spsa", directions=args.directions, seed=0)

    log: list[tuple[list[int], torch.Tensor]] = []
    g = torch.Generator().manual_seed(0)
    for step in range(args.steps):
        idx = torch.randint(0, len(X), (64,), generator=g)
        seeds, scalars, loss = rule.estimate(model, X[idx], y[idx])   # K seeds, K loss differences
        rule.fused_apply(model, seeds, scalars, lr=args.lr)            # p -= lr * mean_k s_k z_k, in place
        log.append((seeds, scalars))
        if (step + 1) % 50 == 0:
            with torch.no_grad():
                acc = float((model(Xt).argmax(1) == yt).float().mean())
            print(f"step {step + 1}: loss {loss:.3f}, test accuracy {acc:.3f}")
    assert all(q.grad is None for q in model.parameters()), "fused steps never create .grad"

    n_bytes = sum(len(s) * 8 + sc.numel() * 8 for s, sc in log)
    replayed = start
    for seeds, scalars in log:
        rule.fused_apply(replayed, seeds, scalars, lr=args.lr)
    same = all(torch.equal(a, b) for a, b in zip(model.parameters(), replayed.parameters()))
    print(f"log of {len(log)} steps: {n_bytes} bytes; replayed weights bit-identical: {same}")
    return same


if __name__ == "__main__":
    raise SystemExit(0 if main() else 1)
