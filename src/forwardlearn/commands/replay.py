"""``forwardlearn replay BASE LOG``: rebuild a run's final weights from its base checkpoint and update log."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

NAME = "replay"
HELP = "rebuild the exact final weights of a zeroth-order run from BASE (base.pt) and its update LOG"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("base", help="the base checkpoint written beside the log (base.pt)")
    p.add_argument("log", help="the update log (forwardlearn train --update-log PATH)")
    p.add_argument("--steps", type=int, default=None, help="replay only the first STEPS steps")
    p.add_argument("--out", default=None, help="write the rebuilt model state_dict here (default: LOG.weights.pt)")
    p.add_argument("--check", default=None, metavar="CHECKPOINT",
                   help="compare the rebuilt weights bit for bit with this checkpoint's model (error if they differ)")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..distributed.replay import read_header, record_size, replay
    from ..training.checkpoint import atomic_save, load_checkpoint

    for path in (args.base, args.log):
        if not Path(path).exists():
            raise FileNotFoundError(f"{path} does not exist")
    if args.steps is not None and args.steps < 0:
        raise ValueError(f"--steps must be >= 0, got {args.steps}")
    header, _ = read_header(args.log)
    ref = None
    if args.check:  # read before replaying, so that a bad reference leaves no weights file behind
        ref = load_checkpoint(args.check, keys=())
        ref = ref.get("model", ref)
    model, steps = replay(args.base, args.log, args.steps)
    state = model.state_dict()
    if ref is not None:  # compared before anything is written: a failed check leaves no weights file
        bad = [k for k in state if k not in ref or not torch.equal(state[k], ref[k])]
        if bad or set(ref) != set(state):
            raise RuntimeError(f"replayed weights differ from {args.check} in {', '.join(bad) or 'the key set'}")
    out = Path(args.out or f"{args.log}.weights.pt")
    atomic_save(state, out)
    per_step = record_size(int(header["directions_per_step"]))
    ckpt_bytes = sum(t.numel() * t.element_size() for t in state.values())
    print(f"replayed {steps} steps of {header.get('rule')} ({header['directions_per_step']} directions/step, "
          f"{header.get('world_size')} rank(s)) -> {out}")
    print(f"update log: {per_step} B/step ({os.path.getsize(args.log)} B in all); "
          f"model weights: {ckpt_bytes} B ({ckpt_bytes / per_step:.0f}x one step's record)")
    if ref is not None:
        print(f"bit-identical to {args.check}")
    return 0
