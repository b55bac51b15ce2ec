"""Any learning rule inside your own PyTorch loop: optimizer, scheduler, gradient clipping, diagnostics.

    python examples/custom_loop.py --rule dfa --epochs 5

The rule only fills ``.grad``; everything else is ordinary PyTorch. Before training, the script prints how
close the rule's update is to the exact backprop gradient (``fl.diagnostics.gradient_alignment``).
"""

from __future__ import annotations

import argparse

import torch

import forwardlearn as fl


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rule", default="fa", help="any name from `forwardlearn rules` that trains an MLP")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=0.05)
    args = p.parse_args(argv)

    torch.manual_seed(0)
    X, y = fl.data.load("digits", "train")
    Xt, yt = fl.data.load("digits", "test")
    rule = fl.get_rule(args.rule, seed=0)
    model = rule.attach(fl.models.mlp(64, [128], 10))  # attach first, then build the optimizer
    params = fl.rules.trainable_parameters(model)
    opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs)

    quality = fl.diagnostics.gradient_alignment(model, rule, X[:256], y[:256], samples=4)
    print(f"{args.rule}: cosine to the backprop gradient {quality['cosine']:.3f} "
          f"(mean of 4 estimates: {quality['mean_cosine']:.3f})")

    acc = 0.0
    for epoch in range(args.epochs):
        for idx in torch.randperm(len(X)).split(64):
            opt.zero_grad()
            loss = rule.grads(model, X[idx], y[idx])     # fills .grad, no global backward for most rules
            torch.nn.utils.clip_grad_norm_(params, 5.0)  # any gradient tool works on what the rule wrote
            opt.step()
        sched.step()
        with torch.no_grad():
            acc = float((rule.predict(model, Xt).argmax(1) == yt).float().mean())
        lr = sched.get_last_lr()[0]
        print(f"epoch {epoch + 1}: last batch loss {loss:.3f}, test accuracy {acc:.3f}, lr {lr:.4f}")
    return acc


if __name__ == "__main__":
    main()
