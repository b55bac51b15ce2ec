"""``forwardlearn compare``: every rule on one data set with its documented defaults, side by side.

Prints one table (test accuracy, seconds per epoch as a ratio to backprop's, peak training memory,
cosine of the rule's gradient estimate to the exact gradient at initialisation) and saves a PNG of test
accuracy per epoch, a JSON file and a Markdown table in the output directory.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from ._common import add_common, positive

NAME = "compare"
HELP = "train every rule with its documented defaults on one data set and compare them"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rules", default="all", help="all, or a comma-separated list of rule names")
    p.add_argument("--epochs", type=positive(int, "--epochs"), default=None, help="override every rule's epochs")
    p.add_argument("--out", default=None, help="output directory (default runs/compare-<data>)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory column")
    p.add_argument("--cosine-batch", type=positive(int, "--cosine-batch"), default=256)
    add_common(p)


def select_rules(spec: str) -> list[str]:
    from ..rules import available_rules, rule_class

    if spec == "all":
        return available_rules()
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise ValueError("--rules needs 'all' or at least one rule name")
    for n in names:
        rule_class(n)  # raises ValueError naming the valid rules
    return names


def _plot(results: list[dict[str, Any]], data: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.get_cmap("tab20").colors
    for i, r in enumerate(results):
        style = {"color": colors[i % len(colors)], "linestyle": "-" if i < len(colors) else "--", "marker": "."}
        acc = r["test_acc_per_epoch"]
        ax[0].plot(range(1, len(acc) + 1), acc, label=r["rule"], **style)
        t = [sum(r["seconds_per_epoch"][: j + 1]) for j in range(len(acc))]
        ax[1].plot(t, acc, label=r["rule"], **style)
    ax[0].set(xlabel="epoch", ylabel="test accuracy", title=f"{data}: test accuracy per epoch")
    ax[1].set(xlabel="training seconds (this machine)", ylabel="test accuracy", title="time to accuracy")
    ax[1].set_xscale("log")
    for a in ax:
        a.grid(alpha=0.3)
        a.set_ylim(0, 1)
    ax[1].legend(fontsize=7, loc="lower right", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fmt_table(rows: list[dict[str, Any]]) -> list[str]:
    head = ["rule", "test acc", "s/epoch", "x backprop", "peak MB", "x backprop", "cosine"]
    lines = [head]
    for r in rows:
        def f(v: Any, fmt: str) -> str:
            return "-" if v is None else format(v, fmt)

        lines.append([r["rule"], f(r["test_acc"], ".4f"), f(r["sec_per_epoch"], ".3f"), f(r["time_ratio"], ".2f"),
                      f(r["peak_mb"], ".1f"), f(r["mem_ratio"], ".2f"), f(r["cosine"], ".3f")])
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(head))]
    return ["  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
            for row in lines]


def _markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    def f(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    rows = [
        "| rule | test acc | time per epoch x backprop | peak MB | memory x backprop | cosine to true gradient |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        rows.append(f"| {r['rule']} | {f(r['test_acc'], '.4f')} | {f(r['time_ratio'], '.2f')} | "
                    f"{f(r['peak_mb'], '.1f')} | {f(r['mem_ratio'], '.2f')} | {f(r['cosine'], '.3f')} |")
    rows.append("")
    rows.append(f"`{meta['command']}` on {meta['machine']}, torch {meta['torch']}, {meta['threads']} thread(s), "
                f"device {meta['device']}; {meta['total_seconds']:.0f} s in all.")
    return "\n".join(rows) + "\n"


def run(args: argparse.Namespace) -> int:
    import torch

    from .. import data
    from ..bench.memory import peak_memory, train_step_peak
    from ..diagnostics import gradient_alignment
    from ..rules import get_rule, rule_class
    from ..training import resolve_device
    from ..training.run import build_run, run_config

    torch.set_num_threads(args.threads or 1)  # small models: one thread is fastest and least disturbed by load
    names = select_rules(args.rules)
    spec = data.info(args.data)
    device = resolve_device(args.device)
    Xtr, ytr = data.load(args.data, "train", root=args.data_dir)
    Xte, yte = data.load(args.data, "test", root=args.data_dir)
    out = Path(args.out or f"runs/compare-{args.data}")
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    for name in names:
        cls = rule_class(name)
        if cls.data_kind != "tensor":
            print(f"{name}: skipped (needs {cls.data_kind} data, not {args.data})", flush=True)
            continue
        d = dict(cls.defaults)
        epochs = args.epochs or d["epochs"]
        try:
            cfg = run_config(name, args.data, model="default", epochs=epochs, seed=args.seed)
            r = build_run(cfg, device=device, load_data=False, keep_initial=True)
            hist = r.trainer(progress=not args.quiet, eval_train=False).fit((Xtr, ytr), (Xte, yte))
            # gradient quality at initialisation, against the exact gradient of the rule's loss
            probe = cls.default_model(spec.shape, spec.classes).to(device)
            probe.load_state_dict(r.initial_state, strict=False)
            n = min(args.cosine_batch, len(Xtr))
            try:
                cos = gradient_alignment(probe, get_rule(name, seed=args.seed + 1), Xtr[:n].to(device),
                                         ytr[:n].to(device), samples=1, names=False)["cosine"]
            except RuntimeError as e:  # no exact gradient to compare with (a black-box layer, say)
                cos = None
                print(f"{name}: no cosine ({str(e).splitlines()[0] if str(e) else type(e).__name__})", flush=True)
            peak = None
            if not args.no_memory:
                if device.type == "cuda":
                    peak, _ = peak_memory(train_step_peak, name, {}, spec.shape, spec.classes, d["batch_size"],
                                          d["optimizer"], d["lr"], args.seed, device=device)
                else:
                    peak, _ = peak_memory(train_step_peak, name, {}, spec.shape, spec.classes, d["batch_size"],
                                          d["optimizer"], d["lr"], args.seed, threads=torch.get_num_threads())
        except Exception as e:  # noqa: BLE001 - one failing rule must not sink the comparison
            print(f"{name}: skipped ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})", flush=True)
            continue
        sec = hist.column("seconds")
        results.append({
            "rule": name,
            "defaults": {**d, "epochs": epochs},
            "test_acc": hist.final["test_acc"],
            "best_test_acc": max(hist.column("test_acc")),
            "test_acc_per_epoch": hist.column("test_acc"),
            "seconds_per_epoch": sec,
            # median over epochs, the first left out when there are more: it carries one-off warm-up costs
            "sec_per_epoch": statistics.median(sec[1:] if len(sec) > 1 else sec),
            "peak_mb": None if peak is None else max(peak, 0) / 2**20,  # below the resolution reads as 0
            "cosine": cos,
        })
        if not args.quiet:
            r = results[-1]
            print(f"{name}: test acc {r['test_acc']:.4f}, {r['sec_per_epoch']:.3f} s/epoch", flush=True)
    if not results:
        raise RuntimeError("no rule could be compared")
    ref = next((r for r in results if r["rule"] == "backprop"), None)
    for r in results:
        r["time_ratio"] = r["sec_per_epoch"] / ref["sec_per_epoch"] if ref else None
        r["mem_ratio"] = (r["peak_mb"] / ref["peak_mb"]) if ref and r["peak_mb"] and ref["peak_mb"] else None
    lines = _fmt_table(results)
    print("\n".join(lines))
    _plot(results, args.data, out / "compare.png")
    meta = {
        "command": "forwardlearn compare " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                                                       if k in ("data", "rules", "epochs", "seed") and v is not None),
        "machine": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "device": str(device), "total_seconds": time.perf_counter() - t_start,
    }
    (out / "compare.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    (out / "compare.md").write_text(_markdown(results, meta))
    print(f"plot: {out / 'compare.png'}  table: {out / 'compare.md'}  data: {out / 'compare.json'}")
    return 0
