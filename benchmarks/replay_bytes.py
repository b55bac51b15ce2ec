"""Size of a replayable update log against the weights it rebuilds, and a bit-for-bit replay check.

Trains ``zo_spsa`` on digits with ``forwardlearn train --update-log`` (seed, scalar and learning rate per
step), rebuilds the final weights with ``forwardlearn replay --check`` (an error unless they equal the
run's checkpoint bit for bit) and writes the log's bytes per step beside the bytes of the float32
weights::

    OMP_NUM_THREADS=1 python benchmarks/replay_bytes.py --hidden 256,256 --directions 8 --epochs 1 \\
        --json benchmarks/results/replay_bytes.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from forwardlearn.cli import main as cli
from forwardlearn.distributed.replay import read_header, record_size


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", default="256,256")
    p.add_argument("--directions", type=int, default=8)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        run, log = Path(tmp) / "run", Path(tmp) / "log" / "updates.log"
        log.parent.mkdir()  # train writes base.pt there before it creates the log
        train = ["train", "--rule", "zo_spsa", "--data", "digits", "--hidden", args.hidden, "--epochs",
                 str(args.epochs), "--opt", f"directions={args.directions}", "--seed", str(args.seed),
                 "--update-log", str(log), "--out", str(run), "--threads", "1", "--quiet"]
        if cli(train):
            return 1
        replay = ["replay", str(log.with_name("base.pt")), str(log), "--check", str(run / "checkpoint.pt"),
                  "--out", str(Path(tmp) / "rebuilt.pt")]
        identical = cli(replay) == 0  # --check exits non-zero unless every tensor is equal bit for bit
        _, header_bytes = read_header(log)
        total = log.stat().st_size
        per_step = record_size(args.directions)
        steps = (total - header_bytes) // per_step
        weights = torch.load(Path(tmp) / "rebuilt.pt", weights_only=True) if identical else {}
        weight_bytes = sum(t.numel() * t.element_size() for t in weights.values())
        base_bytes = log.with_name("base.pt").stat().st_size
    res = {"command": " ".join(["OMP_NUM_THREADS=1 python benchmarks/replay_bytes.py", *argv]),
           "train_command": " ".join(["forwardlearn", *train[:train.index("--update-log")], "--update-log LOG"]),
           "hidden": [int(h) for h in args.hidden.split(",")], "directions": args.directions, "steps": steps,
           "log_bytes": total, "header_bytes": header_bytes, "record_bytes_per_step": per_step,
           "records_match_file": header_bytes + steps * per_step == total,
           "weight_bytes": weight_bytes, "parameters": sum(t.numel() for t in weights.values()),
           "base_checkpoint_bytes": base_bytes, "replay_bit_identical": identical}
    Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
