"""``forwardlearn train``: train one model with one rule, with checkpoints and exact resume."""

from __future__ import annotations

import argparse
import json

from ._common import (
    RESUME_KEYS,
    add_common,
    check_resume,
    parse_hidden,
    parse_options,
    positive,
    run_directory,
    training_config,
)

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
    from ..distributed import add_distributed_arguments

    add_distributed_arguments(p)  # --distributed, --update-log, --checkpoint-every, --checksum-every, ...


def run(args: argparse.Namespace) -> int:
    if args.distributed or args.update_log:
        from ..distributed import train_distributed

        return train_distributed(args)
    import torch

    from .. import data, models
    from ..rules import get_rule, trainable_parameters
    from ..train import Trainer, make_optimizer, resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    hidden = parse_hidden(args.hidden)
    options = parse_options(args.opt)
    spec = data.info(args.data)
    device = resolve_device(args.device)
    out = run_directory(args, args.resume)
    torch.manual_seed(args.seed)
    rule = get_rule(args.rule, seed=args.seed, **options)
    cfg = {**training_config(args, type(rule).defaults, hidden), "options": {k: repr(v) for k, v in options.items()}}
    if args.resume:
        check_resume(out, cfg, (*RESUME_KEYS, "options"))
    Xtr, ytr = data.load(args.data, "train", root=args.data_dir)
    Xte, yte = data.load(args.data, "test", root=args.data_dir)
    if args.model is None and hidden is None:
        model = type(rule).default_model(spec.shape, spec.classes)
    else:
        model = models.build(cfg["model"], spec.shape, spec.classes, cfg["hidden"] or None, args.activation)
    model = rule.attach(model.to(device))
    optimizer = make_optimizer(cfg["optimizer"], trainable_parameters(model), cfg["lr"])
    trainer = Trainer(model, rule, optimizer, epochs=cfg["epochs"], batch_size=cfg["batch_size"], seed=args.seed,
                      out_dir=out, progress=not args.quiet, device=device, config=cfg)
    history = trainer.fit((Xtr, ytr), (Xte, yte), resume=args.resume)
    final = history.final
    print(f"{args.rule} on {args.data}: epoch {final['epoch']}, loss {final['loss']:.4f}, "
          f"train acc {final.get('train_acc', float('nan')):.4f}, test acc {final['test_acc']:.4f}, "
          f"{sum(history.column('seconds')) / len(history):.2f} s/epoch  ->  {out}")
    (out / "summary.json").write_text(json.dumps({"config": cfg, "final": final}, indent=2) + "\n")
    return 0
