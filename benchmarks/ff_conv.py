"""Scalable Forward-Forward (``ff_conv``) against backprop on the same networks: accuracy and time per epoch.

For every network (the LeNet-like ``cnn`` and a small ResNet) the script trains it with backprop, with
``ff_conv`` layer-local and with ``ff_conv`` block-local (the hybrid), from the same initial weights and
on the same batches, and prints test accuracy, training seconds per epoch and that time as a ratio to
backprop on the same network measured in the same run. Data: ``digits`` (bundled), ``mnist`` (after
``forwardlearn data fetch mnist``), ``cifar10`` (where the files are present)::

    OMP_NUM_THREADS=1 python benchmarks/ff_conv.py --data digits --epochs 12
    OMP_NUM_THREADS=1 python benchmarks/ff_conv.py --data mnist --epochs 2 --limit 10000
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import torch

import forwardlearn as fl

RUNS = [("backprop", {}), ("ff_conv", {"block_local": False}), ("ff_conv", {"block_local": True})]


def networks(shape: tuple[int, ...], classes: int, which: list[str]) -> dict[str, torch.nn.Module]:
    c, h, _ = shape
    out: dict[str, torch.nn.Module] = {}
    if "cnn" in which:
        out["cnn"] = fl.models.cnn(c, classes=classes, input_size=h)
    if "resnet" in which:
        out["resnet"] = fl.models.resnet(c, (16, 32, 64), classes, depth=(1, 1, 1))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="digits")
    p.add_argument("--models", default="cnn,resnet")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--limit", type=int, default=0, help="use only the first N training examples (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default="", help="also write the rows, with the command, to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        train = fl.data.load(args.data, "train")
        test = fl.data.load(args.data, "test")
    except ValueError as e:
        print(f"{args.data}: {e}", file=sys.stderr)
        return 2
    if args.limit:
        train = (train[0][: args.limit], train[1][: args.limit])
    info = fl.data.info(args.data)
    rows = []
    print(f"data {args.data}: {len(train[0])} train / {len(test[0])} test, {args.epochs} epochs, lr {args.lr}, "
          f"batch {args.batch_size}, {args.threads} thread(s), device {args.device}")
    print(f"{'network':<8} {'rule':<27} {'test acc':>8} {'s/epoch':>8} {'x backprop':>10} {'CPU x backprop':>14}")
    torch.manual_seed(args.seed)  # the initial weights, shared by the rows of each network
    for net_name, net in networks(info.shape, info.classes, args.models.split(",")).items():
        base_time = base_cpu = None
        for rule_name, opts in RUNS:
            torch.manual_seed(args.seed)
            model = copy.deepcopy(net)
            rule = fl.get_rule(rule_name, seed=args.seed, **opts)
            t0 = time.perf_counter()
            hist = fl.train(model, rule, train, test, lr=args.lr, epochs=args.epochs, batch_size=args.batch_size,
                            seed=args.seed, progress=False, eval_train=False, device=args.device)
            wall = time.perf_counter() - t0
            per_epoch = sum(hist.column("seconds")) / len(hist)
            cpu_per_epoch = sum(hist.column("cpu_seconds")) / len(hist)
            base_time = per_epoch if rule_name == "backprop" else base_time
            base_cpu = cpu_per_epoch if rule_name == "backprop" else base_cpu
            label = rule_name + ("" if not opts else f"(block_local={opts['block_local']})")
            row = {"data": args.data, "network": net_name, "rule": label, "test_acc": hist.final["test_acc"],
                   "seconds_per_epoch": per_epoch, "ratio_to_backprop": per_epoch / base_time, "wall": wall,
                   "cpu_seconds_per_epoch": cpu_per_epoch, "cpu_ratio_to_backprop": cpu_per_epoch / base_cpu,
                   "test_acc_per_epoch": hist.column("test_acc")}
            rows.append(row)
            print(f"{net_name:<8} {label:<27} {row['test_acc']:>8.4f} {per_epoch:>8.3f} "
                  f"{row['ratio_to_backprop']:>10.2f} {row['cpu_ratio_to_backprop']:>14.2f}", flush=True)
    if args.json:
        command = " ".join(["OMP_NUM_THREADS=1 python benchmarks/ff_conv.py", *(sys.argv[1:] if argv is None
                                                                          else argv)])
        setup = {"command": command, "data": args.data, "train_examples": len(train[0]), "test_examples":
                 len(test[0]), "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size, "seed": args.seed,
                 "threads": args.threads, "device": args.device}
        with open(args.json, "w") as f:
            json.dump({"setup": setup, "rows": rows}, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
