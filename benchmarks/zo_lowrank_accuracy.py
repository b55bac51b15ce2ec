"""Test accuracy of ``zo_spsa`` with full and low-rank perturbations at equal steps: mean and sd over seeds.

Every run uses ``zo_spsa``'s documented defaults (model, optimizer, lr, epochs, batch size, ``K``) and
changes only ``perturbation`` (and ``rank``); each seed sets the initialisation, the batch order and the
rule's direction stream alike for both forms::

    python benchmarks/zo_lowrank_accuracy.py --seeds 0,1,2 --out benchmarks/results/zo_lowrank_digits

writes ``<out>.json`` (every run's history) and ``<out>.md`` (the table, with the command).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

import forwardlearn as fl
from forwardlearn.bench.forward_only import lowrank_accuracy_markdown

FORMS: dict[str, dict[str, Any]] = {"full": {}, "lowrank (rank 1)": {"perturbation": "lowrank"}}


def run(data: str, seed: int, options: dict[str, Any], epochs: int | None) -> dict[str, Any]:
    cls = fl.rules.rule_class("zo_spsa")
    d = cls.defaults
    train, test = fl.data.load(data, "train"), fl.data.load(data, "test")
    shape = tuple(train[0].shape[1:])
    torch.manual_seed(seed)
    model = cls.default_model(shape, 10)
    t0 = time.perf_counter()
    h = fl.train(model, fl.get_rule("zo_spsa", seed=seed, **options), train, test, optimizer=d["optimizer"],
                 lr=d["lr"], epochs=epochs or d["epochs"], batch_size=d["batch_size"], seed=seed, progress=False,
                 eval_train=False)
    return {"seed": seed, "options": options, "test_acc": h.final["test_acc"], "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="digits")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=None, help="default: the rule's")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True, help="file stem of the JSON and Markdown outputs")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    res: dict[str, Any] = {"command": shlex.join(["python", *sys.argv]), "data": args.data,
                           "defaults": fl.rules.rule_class("zo_spsa").defaults, "runs": {}}
    for form, opts in FORMS.items():
        res["runs"][form] = [run(args.data, s, opts, args.epochs) for s in seeds]
        accs = [r["test_acc"] for r in res["runs"][form]]
        print(f"{form}: " + ", ".join(f"{a:.4f}" for a in accs), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    out.with_suffix(".md").write_text(lowrank_accuracy_markdown(res))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
