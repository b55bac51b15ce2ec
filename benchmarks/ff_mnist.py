"""Reproduce Hinton 2022, section 3.3: supervised Forward-Forward on permutation-invariant MNIST.

The paper: a 4 x 2000 ReLU MLP, the label in the first 10 pixels, hard negatives picked from the net's
own predictions, 60 epochs, 1.36% test error with the goodness of all but the first hidden layer summed
over every label. This script trains the library's ``ff`` rule the same way (``negatives="hard"`` with
the linear read-out choosing the negatives from a neutral-label pass, as in the paper) and records the
test error per epoch: the read-out's every epoch (one cheap pass), the goodness one every
``--eval-every`` epochs and at the end.

    python benchmarks/ff_mnist.py                      # the full run (hours on a CPU)
    python benchmarks/ff_mnist.py --max-minutes 50     # stop cleanly after the epoch that passes 50 min
    python benchmarks/ff_mnist.py --resume             # go on from runs/ff_mnist/checkpoint.pt

Needs ``forwardlearn data fetch mnist``. Results: ``<out>/ff_mnist.jsonl`` (one line per epoch) and
``<out>/summary.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

import forwardlearn as fl
from forwardlearn.train import Callback, Trainer, accuracy, make_optimizer, resolve_device


class _Stop(Exception):
    pass


class _Monitor(Callback):
    def __init__(self, args: argparse.Namespace, test: tuple[torch.Tensor, torch.Tensor], t0: float) -> None:
        self.args, self.test, self.t0 = args, test, t0
        self.log = Path(args.out) / "ff_mnist.jsonl"

    def on_epoch_end(self, trainer: Trainer, record: dict[str, float]) -> None:
        rule, model = trainer.rule, trainer.model
        Xt, yt = self.test
        t = time.perf_counter()
        rule.predict_by = "readout"
        record["readout_test_error"] = 1 - accuracy(rule, model, Xt, yt)
        rule.predict_by = "goodness"
        last = trainer.epoch == trainer.epochs
        over = (time.perf_counter() - self.t0) / 60 > self.args.max_minutes
        if last or over or trainer.epoch % self.args.eval_every == 0:
            record["goodness_test_error"] = 1 - accuracy(rule, model, Xt, yt, batch_size=500)
        record["test_eval_seconds"] = time.perf_counter() - t
        record["wall_minutes"] = (time.perf_counter() - self.t0) / 60
        print(json.dumps(record), flush=True)
        with open(self.log, "a") as f:
            f.write(json.dumps(record) + "\n")
        if over and not last:
            raise _Stop


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--hidden", type=int, nargs="+", default=[2000, 2000, 2000, 2000])
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--optimizer", default="adam")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--negatives", default="hard", choices=["hard", "random"])
    p.add_argument("--threshold", type=float, default=1.0)
    p.add_argument("--train-limit", type=int, default=None, help="use only the first N training images (pilots)")
    p.add_argument("--eval-every", type=int, default=5, help="goodness test error every K epochs (costly)")
    p.add_argument("--max-minutes", type=float, default=float("inf"), help="stop after the epoch passing this")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/ff_mnist")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    X, y = fl.data.load("mnist", "train")
    Xt, yt = fl.data.load("mnist", "test")
    if args.train_limit:
        X, y = X[: args.train_limit], y[: args.train_limit]
    torch.manual_seed(args.seed)
    rule = fl.get_rule("ff", negatives=args.negatives, readout=True, threshold=args.threshold, seed=args.seed)
    model = rule.attach(fl.models.mlp(784, args.hidden, 10))
    device = resolve_device(args.device)
    model = model.to(device)
    opt = make_optimizer(args.optimizer, fl.rules.trainable_parameters(model), args.lr)
    config = {k: v for k, v in vars(args).items() if k not in ("resume",)}
    t0 = time.perf_counter()
    mon = _Monitor(args, (Xt.to(device), yt.to(device)), t0)
    trainer = Trainer(model, rule, opt, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                      out_dir=out, callbacks=[mon], progress=False, device=device, config=config, eval_train=False)
    stopped = False
    try:
        trainer.fit((X, y), None, resume=args.resume)
    except _Stop:
        stopped = True
    hist = trainer.history.epochs
    good = [r for r in hist if "goodness_test_error" in r]
    summary = {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "epochs_done": trainer.epoch,
        "epochs_planned": args.epochs,
        "stopped_by_time_budget": stopped,
        "final_goodness_test_error": good[-1]["goodness_test_error"] if good else None,
        "final_readout_test_error": hist[-1]["readout_test_error"] if hist else None,
        "train_seconds_per_epoch": sum(r["seconds"] for r in hist) / max(len(hist), 1),
        "wall_minutes": (time.perf_counter() - t0) / 60,
        "paper_test_error": 0.0136,
        "machine": platform.platform(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "config": config,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
