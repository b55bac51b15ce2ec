"""Fine-tuning MiniLM (all-MiniLM-L6-v2, bundled) on SpamAssassin: memory, time and accuracy of every rule.

    forwardlearn data fetch spam-assassin
    python benchmarks/finetune_minilm.py --threads 2            # everything (hours on a small CPU)
    python benchmarks/finetune_minilm.py --part cost            # memory and time only (minutes)
    python benchmarks/finetune_minilm.py --part sweep --val-size 200 --zo-lrs 1e-5 1e-4   # learning rates
    python benchmarks/finetune_minilm.py --part accuracy --lr-from-sweep ...                # then accuracy

Writes ``benchmarks/results/finetune_minilm.json`` / ``.md`` / ``.png`` (``--results`` to change), with the
command that made them. ``--part cost`` and ``--part accuracy`` update their own half of an existing JSON.
Memory and time (:mod:`forwardlearn.bench.finetune`): one child process per row, batch ``--batch-size``,
``--max-length`` tokens, ``--threads`` threads; the time of a step is a ratio to one forward pass measured in
the same child. Accuracy: every row starts from the same pretrained encoder and head seed, trains on the shared
training loop (run directories under ``--runs``, resumed when they exist) and is evaluated every
``--eval-every`` steps on a seeded stratified subset of ``--test-size`` test messages; the floor is a linear
probe on the frozen pretrained features of ``--probe-train`` training messages.
Sweep (``--part sweep``): the ``zo_spsa`` and ``forward_gradient`` full rows at each of ``--zo-lrs`` /
``--fg-lrs`` (and ``--zo-directions``) for ``--sweep-steps`` steps, from the same kind of linear-probe start,
evaluated on ``--val-size`` messages held out of the *training* split (never the test set); ``--lr-from-sweep``
then runs those accuracy rows with the stored setting of lowest final validation loss.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from forwardlearn.bench.finetune import ROWS, accuracy_markdown, best_setting, cost_markdown, cost_rows, sweep_markdown


def accuracy_part(args: argparse.Namespace, results: dict[str, Any]) -> None:
    import torch

    from forwardlearn import finetune as ft

    torch.set_num_threads(args.threads)
    steps = {"zo_spsa": args.zo_steps, "forward_gradient": args.steps, "backprop": args.steps}
    acc = results.setdefault("accuracy", {})
    runs = Path(args.runs)
    head: str | dict = "probe"  # LP-FT: every row starts from the same linear probe, fitted once
    for row, (rule, params, _) in ROWS.items():
        if rule is None or (args.rows and row not in args.rows):
            continue
        tuned = best_setting(results, row) if args.lr_from_sweep else None
        lr = args.zo_lr if row == "zo_spsa fused, full" and args.zo_lr else tuned and tuned["lr"]
        if lr != (tuned and tuned["lr"]):
            tuned = None
        prep = ft.prepare(args.model, rule=rule, params=params, batch_size=args.batch_size,
                          max_length=args.acc_max_length, test_size=args.test_size, seed=0, head=head,
                          probe_train=args.probe_train, lr=lr,
                          options=tuned and {"directions": tuned["directions"]})
        head = {k: v.clone() for k, v in prep.model.head.state_dict().items()}
        n_steps = steps[rule]
        if tuned:
            prep.config["chosen_on"] = f"validation ({tuned['val_size']} training messages), lowest loss"
        summary = ft.finetune(prep, steps=n_steps, eval_every=max(1, n_steps // args.evals), resume=True,
                              out=runs / row.replace(" ", "").replace(",", "-").replace("+", "-"),
                              progress=not args.quiet, threads=args.threads)
        results["probe"] = {**summary["start"], "train_messages": summary["config"]["probe_train"]}
        key = f"{row}, {args.tag}" if args.tag else row
        args.own |= {"probe", ("accuracy", key)}
        acc[key] = {"config": summary["config"], "command": args.command, "threads": args.threads,
                    "records": [{"step": 0, "seconds": 0.0, **summary["start"]}, *summary["records"]]}
        write(results, args)


def sweep_part(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """Each (row, lr, directions) of the sweep, evaluated on messages held out of the training split."""
    import torch

    from forwardlearn import finetune as ft

    torch.set_num_threads(args.threads)
    grid = {"zo_spsa fused, full": [(lr, d) for lr in args.zo_lrs for d in args.zo_directions],
            "forward_gradient, full": [(lr, 1) for lr in args.fg_lrs]}
    sweep = results.setdefault("sweep", {})
    head: str | dict = "probe"
    for row, settings in grid.items():
        rule, params, _ = ROWS[row]
        for lr, directions in settings:
            prep = ft.prepare(args.model, rule=rule, params=params, batch_size=args.batch_size,
                              max_length=args.acc_max_length, seed=0, head=head, probe_train=args.probe_train,
                              lr=lr, options={"directions": directions}, val_size=args.val_size)
            head = {k: v.clone() for k, v in prep.model.head.state_dict().items()}
            key = f"{row}, lr {lr:g}, directions {directions}"
            summary = ft.finetune(prep, steps=args.sweep_steps, eval_every=max(1, args.sweep_steps // args.evals),
                                  resume=True, progress=not args.quiet, threads=args.threads,
                                  out=Path(args.runs) / "sweep" / key.replace(" ", "").replace(",", "-"))
            args.own.add(("sweep", key))
            sweep[key] = {"row": row, "lr": lr, "directions": directions, "config": summary["config"],
                          "command": args.command,
                          "records": [{"step": 0, "seconds": 0.0, **summary["start"]}, *summary["records"]]}
            write(results, args)


def write(results: dict[str, Any], args: argparse.Namespace) -> None:
    """Write ``results`` into the stored file: what this process made (``args.own``: top-level keys and
    ``(part, row)`` pairs) replaces the stored entries, everything else is taken from the file as it is now (so
    several processes, each running some rows, can share one file)."""
    import os

    base = Path(args.results)
    base.parent.mkdir(parents=True, exist_ok=True)
    path = base.with_suffix(".json")
    own = getattr(args, "own", set())
    if path.exists():  # rows another process finished meanwhile are kept, rows it replaced are taken
        stored = json.loads(path.read_text())
        for k, v in stored.items():
            if k not in own and k not in ("accuracy", "sweep"):
                results[k] = v
        for part in ("accuracy", "sweep"):  # in place: the callers hold these dicts
            mine = {row: v for row, v in results.get(part, {}).items() if (part, row) in own}
            merged = {**({} if part in own else stored.get(part, {})), **mine}
            results.setdefault(part, {}).clear()
            results[part].update(merged)
    tmp = base.with_name(f"{base.name}.{os.getpid()}.json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(base.with_suffix(".json"))
    base.with_suffix(".md").write_text(markdown(results))
    if results.get("accuracy"):
        from forwardlearn.finetune import plot_accuracy

        plot_accuracy({k: v["records"] for k, v in results["accuracy"].items()}, base.with_suffix(".png"),
                      floor=results.get("probe", {}).get("test_acc"))


def markdown(results: dict[str, Any]) -> str:
    cost, sweep = cost_markdown(results), sweep_markdown(results)
    return "\n".join(["# Fine-tuning MiniLM on SpamAssassin", "", *([cost, ""] if cost else []),
                      *([sweep, ""] if sweep else []), accuracy_markdown(results)]).rstrip("\n") + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["cost", "sweep", "accuracy", "all"], default="all",
                    help="all: cost and accuracy (the sweep runs only when asked)")
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--acc-max-length", type=int, default=None, help="max length of the accuracy runs "
                    "(default --max-length)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--zo-steps", type=int, default=2000, help="steps of the zo_spsa rows")
    ap.add_argument("--steps", type=int, default=500, help="steps of the forward_gradient and backprop rows")
    ap.add_argument("--evals", type=int, default=5, help="evaluations per run")
    ap.add_argument("--test-size", type=int, default=None, help="test subset (default: the whole test split)")
    ap.add_argument("--probe-train", type=int, default=1024, help="training messages of the linear probe")
    ap.add_argument("--val-size", type=int, default=200, help="sweep: training messages held out for validation")
    ap.add_argument("--sweep-steps", type=int, default=100, help="sweep: steps of each setting")
    ap.add_argument("--zo-lrs", type=float, nargs="*", default=[], help="sweep: zo_spsa full learning rates")
    ap.add_argument("--zo-directions", type=int, nargs="*", default=[1], help="sweep: zo_spsa directions")
    ap.add_argument("--fg-lrs", type=float, nargs="*", default=[], help="sweep: forward_gradient full rates")
    ap.add_argument("--lr-from-sweep", action="store_true", help="accuracy: the zo_spsa and forward_gradient "
                    "full rows take the stored sweep's setting of lowest final validation loss")
    ap.add_argument("--zo-lr", type=float, default=None, help="accuracy: this rate for the zo_spsa full row")
    ap.add_argument("--tag", default=None, help="accuracy: stored rows are named '<row>, <tag>'")
    ap.add_argument("--rows", nargs="*", default=None, help="only these accuracy rows (default: all)")
    ap.add_argument("--runs", default="runs/bench-finetune")
    ap.add_argument("--results", default="benchmarks/results/finetune_minilm")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    args.acc_max_length = args.acc_max_length or args.max_length
    command = args.command = "python benchmarks/finetune_minilm.py " + shlex.join(sys.argv[1:])
    args.own = set()
    path = Path(args.results).with_suffix(".json")
    results = json.loads(path.read_text()) if path.exists() else {}
    results.setdefault("accuracy", {})
    if args.part in ("cost", "all"):
        rows = cost_rows(args.model, args.batch_size, args.max_length, args.threads, args.repeats)
        results["cost"] = {"command": command, "rows": rows, "settings": {
            "batch_size": args.batch_size, "max_length": args.max_length, "threads": args.threads,
            "repeats": args.repeats}}
        args.own.add("cost")
        write(results, args)
    if args.part == "sweep":
        sweep_part(args, results)
    if args.part in ("accuracy", "all"):
        if not args.rows:
            results.pop("probe", None)
            results["accuracy"] = {}
            args.own |= {"probe", "accuracy"}  # a run of every row replaces the stored accuracy part
        accuracy_part(args, results)
    print(markdown(results))


if __name__ == "__main__":
    main()
