"""``forwardlearn finetune``: fine-tune a pretrained Hugging Face encoder on a text corpus with a learning rule."""

from __future__ import annotations

import argparse

from ._common import parse_options, positive

NAME = "finetune"
HELP = ("fine-tune a pretrained transformer (offline, local directory) on spam-assassin with zo_spsa, "
        "forward_gradient or backprop")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="minilm", help="minilm (the bundled all-MiniLM-L6-v2) or a local Hugging "
                   "Face model directory (default minilm)")
    p.add_argument("--data", default="spam-assassin", help="text data set (default spam-assassin)")
    p.add_argument("--data-dir", default=None, help="data cache (default $FORWARDLEARN_DATA or ~/.cache/forwardlearn)")
    p.add_argument("--rule", required=True, help="zo_spsa | forward_gradient | backprop")
    p.add_argument("--params", default="full", help="full | lora | head (default full)")
    p.add_argument("--steps", type=positive(int, "--steps"), required=True)
    p.add_argument("--batch-size", type=positive(int, "--batch-size"), default=16)
    p.add_argument("--max-length", type=positive(int, "--max-length"), default=128,
                   help="tokens per message; longer messages are truncated (default 128)")
    p.add_argument("--lr", type=positive(float, "--lr"), default=None, help="default: the rule's for --params")
    p.add_argument("--step", choices=["fused", "grad"], default=None,
                   help="fused: in-place SGD without .grad (zo_spsa's default); grad: .grad + optimizer")
    p.add_argument("--optimizer", choices=["sgd", "adam", "adamw"], default=None)
    p.add_argument("--opt", action="append", metavar="KEY=VALUE", help="a rule option, repeatable")
    p.add_argument("--eval-every", type=positive(int, "--eval-every"), default=None,
                   help="evaluate and checkpoint every K steps (default: at the end)")
    p.add_argument("--test-size", type=positive(int, "--test-size"), default=None,
                   help="evaluate on a seeded, stratified subset of this many test messages (default: all)")
    p.add_argument("--val-size", type=positive(int, "--val-size"), default=None,
                   help="hold out this many training messages (seeded, stratified) and evaluate on them instead "
                   "of the test set, for choosing settings")
    p.add_argument("--attention", choices=["eager", "sdpa"], default=None,
                   help="attention kernel (default: eager for forward_gradient, sdpa otherwise)")
    p.add_argument("--head", choices=["random", "probe"], default="random",
                   help="start from a random linear head, or from the linear probe on frozen features (LP-FT)")
    p.add_argument("--probe-train", type=positive(int, "--probe-train"), default=1024,
                   help="training messages the probe is fitted on (default 1024)")
    p.add_argument("--out", default=None, help="run directory (default runs/finetune-<rule>-<params>)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive(int, "--threads"), default=None, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--distributed", action="store_true",
                   help="one rank of `torchrun --nproc-per-node N -m forwardlearn finetune --distributed ...`: "
                   "seed-and-scalar exchange (zo_spsa, forward_gradient; --batch-size per rank)")


def run(args: argparse.Namespace) -> int:
    import warnings
    from pathlib import Path

    from .. import finetune as ft
    from ..models import hf

    ft.settings(args.rule, args.params)  # the cheap checks first
    hf.quiet()
    warnings.filterwarnings("ignore", category=FutureWarning)
    out = Path(args.out or f"runs/finetune-{args.rule}-{args.params}")
    if (out / "checkpoint.pt").exists() and not args.resume:
        raise ValueError(f"{out} already holds a checkpoint; pass --resume to continue it or choose another --out")
    prep = ft.prepare(args.model, args.data, rule=args.rule, params=args.params, batch_size=args.batch_size,
                      max_length=args.max_length, lr=args.lr, step=args.step, optimizer=args.optimizer,
                      options=parse_options(args.opt), seed=args.seed, test_size=args.test_size,
                      attention=args.attention, data_dir=args.data_dir, head=args.head,
                      probe_train=args.probe_train, val_size=args.val_size)
    summary = ft.finetune(prep, steps=args.steps, eval_every=args.eval_every, out=out, resume=args.resume,
                          progress=not args.quiet, threads=args.threads, distributed=args.distributed)
    if not summary["writer"]:
        return 0
    final = summary["final"]
    print(f"{args.rule} ({args.params}) on {args.data}: step {final.get('step')}, loss {final['loss']:.4f}, "
          f"{summary['config']['eval_split']} acc {final.get('test_acc', float('nan')):.4f}, hard-ham acc "
          f"{final.get('hard_ham_acc', float('nan')):.4f}, {summary['train_seconds'] / 60:.1f} training minutes"
          f"  ->  {out}")
    return 0
