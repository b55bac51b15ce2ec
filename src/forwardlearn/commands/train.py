"""``forwardlearn train``: train one model with one rule, with checkpoints and exact resume.

``--distributed`` (under ``torchrun``) and ``--update-log`` train by seed-and-scalar exchange
(:mod:`forwardlearn.distributed.trainer`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ._common import add_common, parse_hidden, parse_options, positive

NAME = "train"
HELP = "train a model with a learning rule (checkpoint every epoch, --resume continues exactly)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rule", required=True, help="learning rule (see `forwardlearn rules`)")
    p.add_argument("--model", default=None, help="mlp | cnn | rescnn | transformer (default: the rule's)")
    p.add_argument("--hidden", default=None, help="hidden widths, e.g. 500,500 (default: the rule's)")
    p.add_argument("--activation", default="relu")
    p.add_argument("--epochs", type=positive(int, "--epochs"), default=None)
    p.add_argument("--batch-size", type=positive(int, "--batch-size"), default=None)
    p.add_argument("--lr", type=positive(float, "--lr"), default=None)
    p.add_argument("--optimizer", choices=["sgd", "adam", "adamw"], default=None)
    p.add_argument("--opt", action="append", metavar="KEY=VALUE", help="a rule option, repeatable")
    p.add_argument("--out", default=None, help="run directory (default runs/<rule>-<data>)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    add_common(p)
    add_distributed_arguments(p)


def add_distributed_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``forwardlearn train --distributed``."""
    g = p.add_argument_group("seed-and-scalar distributed training (zo_spsa, forward_gradient)")
    g.add_argument("--distributed", action="store_true",
                   help="data-parallel by (seed, scalar) all_gather; launch under torchrun --nproc-per-node N")
    g.add_argument("--update-log", default=None, metavar="PATH",
                   help="write the replayable update log (seed, scalar, lr per step) here, base.pt beside it")
    g.add_argument("--checkpoint-every", type=int, default=0, metavar="STEPS",
                   help="also checkpoint every STEPS steps (default: at epoch ends only)")
    g.add_argument("--checksum-every", type=int, default=50, metavar="STEPS",
                   help="compare the parameter checksums of all ranks every STEPS steps (default 50)")
    g.add_argument("--max-scalar", type=float, default=1e6,
                   help="reject a rank's scalar larger than this in magnitude as malformed (default 1e6)")
    f = p.add_argument_group("fault injection (for testing the fault handling)")
    f.add_argument("--inject-kill", default=None, metavar="RANK:STEP", help="SIGKILL RANK at STEP (first attempt)")
    f.add_argument("--inject-nonfinite", default=None, metavar="RANK:STEP", help="RANK sends a NaN scalar at STEP")
    f.add_argument("--inject-desync", default=None, metavar="RANK:STEP", help="RANK nudges a weight after STEP")


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The run's config (:func:`forwardlearn.training.run.run_config`) from the command line."""
    from ..training.run import run_config

    return run_config(args.rule, args.data, model=args.model, hidden=parse_hidden(args.hidden),
                      activation=args.activation, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                      optimizer=args.optimizer, seed=args.seed, options=parse_options(args.opt))


def _summary(out: Path, cfg: dict[str, Any], final: dict[str, Any]) -> None:
    (out / "summary.json").write_text(json.dumps({"config": cfg, "final": final}, indent=2) + "\n")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..training.run import build_run, check_resume, run_directory

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = config_from_args(args)
    out = Path(args.out or f"runs/{args.rule}-{args.data}")
    if args.distributed or args.update_log:
        return _run_distributed(args, cfg, out)
    out = run_directory(out, args.resume)
    if args.resume:
        check_resume(out, cfg)
    r = build_run(cfg, device=args.device, data_dir=args.data_dir)
    history = r.trainer(out_dir=out, progress=not args.quiet).fit(r.train, r.test, resume=args.resume)
    final = history.final
    print(f"{args.rule} on {args.data}: epoch {final['epoch']}, loss {final['loss']:.4f}, "
          f"train acc {final.get('train_acc', float('nan')):.4f}, test acc {final['test_acc']:.4f}, "
          f"{sum(history.column('seconds')) / len(history):.2f} s/epoch  ->  {out}")
    _summary(out, r.config, final)
    return 0


def _run_distributed(args: argparse.Namespace, cfg: dict[str, Any], out: Path) -> int:
    from ..distributed.trainer import Faults, train_distributed

    faults = Faults(kill=Faults.parse(args.inject_kill, "--inject-kill"),
                    nonfinite=Faults.parse(args.inject_nonfinite, "--inject-nonfinite"),
                    desync=Faults.parse(args.inject_desync, "--inject-desync"))
    trainer = train_distributed(cfg, out, resume=args.resume, distributed=args.distributed, device=args.device,
                                data_dir=args.data_dir, update_log=args.update_log,
                                checkpoint_every=args.checkpoint_every, checksum_every=args.checksum_every,
                                max_scalar=args.max_scalar, faults=faults, progress=not args.quiet)
    if trainer.is_writer:
        final = trainer.history.final
        print(f"{args.rule} on {args.data}, {trainer.world_size} rank(s): epoch {final['epoch']}, "
              f"loss {final['loss']:.4f}, test acc {final.get('test_acc', float('nan')):.4f}, "
              f"{final['wire_bytes_per_step']} B/step gathered per rank  ->  {out}")
        _summary(out, trainer.config, final)
    return 0
