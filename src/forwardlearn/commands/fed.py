"""``forwardlearn fed``: federated learning without backprop (BAFFLE) on Dirichlet non-IID shards, vs FedAvg."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ._common import parse_hidden, parse_options, positive

NAME = "fed"
HELP = "federated training where clients run forward passes only and upload scalars (BAFFLE), vs FedAvg"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rule", default="zo_spsa", help="a seed-and-scalar rule (zo_spsa, forward_gradient)")
    p.add_argument("--clients", type=positive(int, "--clients"), default=10)
    p.add_argument("--rounds", type=positive(int, "--rounds"), default=100)
    p.add_argument("--alpha", type=positive(float, "--alpha"), default=0.5,
                   help="Dirichlet concentration of the label split (small: non-IID; default 0.5)")
    p.add_argument("--directions", type=positive(int, "--directions"), default=50,
                   help="perturbations K per round (the scalars each client uploads; default 50)")
    p.add_argument("--opt", action="append", metavar="KEY=VALUE",
                   help="a rule option, repeatable (zo_spsa default here: difference=forward, as in BAFFLE)")
    p.add_argument("--lr", type=positive(float, "--lr"), default=1e-2, help="server learning rate (default 1e-2)")
    p.add_argument("--optimizer", choices=["sgd", "adam", "adamw"], default="adam", help="server optimizer")
    p.add_argument("--batch-size", type=positive(int, "--batch-size"), default=None,
                   help="examples per client per round (default: the whole local shard)")
    p.add_argument("--hidden", default="32", help="MLP hidden widths (default 32)")
    p.add_argument("--baseline", choices=["fedavg", "none"], default="fedavg",
                   help="also run FedAvg with backprop on the same shards (default)")
    p.add_argument("--fedavg-lr", type=positive(float, "--fedavg-lr"), default=0.05, help="FedAvg client SGD lr")
    p.add_argument("--local-epochs", type=positive(int, "--local-epochs"), default=1, help="FedAvg local epochs")
    p.add_argument("--eval-every", type=positive(int, "--eval-every"), default=10)
    p.add_argument("--data", default="digits")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive(int, "--threads"), default=1)
    p.add_argument("--out", default=None, help="write fed.json (per-round records) here")


def run(args: argparse.Namespace) -> int:
    import torch

    from .. import data, models
    from ..distributed.federated import baffle, dirichlet_split, fedavg
    from ..rules import SeedScalarRule, build_rule, rule_class
    from ..training.run import check_data_kind

    torch.set_num_threads(args.threads)
    spec = data.info(args.data)
    hidden = parse_hidden(args.hidden)
    cls = rule_class(args.rule)
    if not issubclass(cls, SeedScalarRule):
        raise ValueError(f"rule {args.rule!r} has no seed-and-scalar API (estimate/apply); "
                         "BAFFLE needs one: zo_spsa or forward_gradient")
    check_data_kind(cls, args.data)
    reserved = {"seed": "--seed", "directions": "--directions"}
    options = {"directions": args.directions, **parse_options(args.opt, reserved)}
    if args.rule == "zo_spsa":
        options.setdefault("difference", "forward")
    rule = build_rule(args.rule, args.seed, options, "--opt")
    out = Path(args.out) if args.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)  # before training: an unusable --out fails now, not after it
    X, y = data.load(args.data, "train", root=args.data_dir)
    test = data.load(args.data, "test", root=args.data_dir)
    shards = dirichlet_split(y, args.clients, args.alpha, seed=args.seed)
    clients = [(X[s], y[s]) for s in shards]
    sizes = [len(s) for s in shards]
    classes = [len(torch.unique(y[s])) for s in shards]
    print(f"{args.clients} clients, Dirichlet alpha={args.alpha}: examples {sizes}, classes held {classes}")

    def show(name: str):  # noqa: ANN202
        def cb(rec: dict) -> None:
            if "test_acc" in rec:
                print(f"{name:>7} round {rec['round']:>4}: test acc {rec['test_acc']:.4f}, "
                      f"loss {rec['train_loss']:.4f}, uplink {rec['uplink_bytes_per_client']:.0f} B/client",
                      flush=True)
        return cb

    torch.manual_seed(args.seed)
    model = models.build("mlp", spec.shape, spec.classes, hidden)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    model = rule.attach(model)
    res = baffle(model, rule, clients, test, rounds=args.rounds, lr=args.lr, optimizer=args.optimizer,
                 batch_size=args.batch_size, seed=args.seed, eval_every=args.eval_every, on_round=show("baffle"))
    results = [res]
    if args.baseline == "fedavg":
        base = models.build("mlp", spec.shape, spec.classes, hidden)
        base.load_state_dict(init)
        results.append(fedavg(base, clients, test, rounds=args.rounds, lr=args.fedavg_lr,
                              local_epochs=args.local_epochs, seed=args.seed, eval_every=args.eval_every,
                              on_round=show("fedavg")))
    print(f"model: {res.model_bytes} B of float32 weights")
    for r in results:
        up = r.column("uplink_bytes_per_client")
        print(f"{r.method:>7}: final test acc {r.final['test_acc']:.4f} after {len(r.rounds)} rounds; "
              f"uplink per client {up[-1]:.0f} B/round, {sum(up):.0f} B in all; "
              f"downlink {r.final['downlink_bytes_per_client']:.0f} B/round per client")
    if out is not None:
        payload = {"config": {k: v for k, v in vars(args).items() if not k.startswith("_")},
                   "shard_sizes": sizes, "shard_classes": classes,
                   "results": {r.method: {"model_bytes": r.model_bytes, "rounds": r.rounds} for r in results}}
        (out / "fed.json").write_text(json.dumps(payload, indent=1) + "\n")
        print(f"-> {out / 'fed.json'}")
    return 0
