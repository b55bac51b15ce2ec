"""``forwardlearn compare``: every rule on one data set with its documented defaults, side by side.

Every rule is trained with ``--seeds N`` seeds (default 3: ``--seed``, ``--seed + 1``, ...). Prints one
table (test accuracy as mean +/- sd over the seeds, CPU seconds per epoch as a ratio to backprop's, peak
training memory, cosine of the rule's update to the exact cross-entropy gradient after the first epoch)
and saves a PNG of the mean test accuracy per epoch, a JSON file (with every seed's values) and a
Markdown table in the output directory.

The cosine is measured after the first epoch rather than at initialisation: at initialisation a rule's
own objective can be saturated (Forward-Forward's, before its rescaling) or its feedback not yet aligned,
which says nothing about the updates that train the net. Rules that leave the model's output layer
untrained (Forward-Forward and its variants classify by goodness) have no end-to-end cross-entropy
gradient to compare with and get no cosine.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from ..bench.report import pm
from ._common import add_common, positive

NAME = "compare"
HELP = "train every rule with its documented defaults on one data set and compare them"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rules", default="all", help="all, or a comma-separated list of rule names")
    p.add_argument("--epochs", type=positive(int, "--epochs"), default=None, help="override every rule's epochs")
    p.add_argument("--out", default=None, help="output directory (default runs/compare-<data>)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory column")
    p.add_argument("--cosine-batch", type=positive(int, "--cosine-batch"), default=256)
    p.add_argument("--seeds", type=positive(int, "--seeds"), default=3,
                   help="seeds per rule (--seed, --seed + 1, ...); the table shows mean +/- sd (default 3)")
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


def mean_sd(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation of the values that are not ``None`` (sd ``None`` below two)."""
    v = [x for x in values if x is not None]
    if not v:
        return None, None
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else None)


def _fmt_table(rows: list[dict[str, Any]]) -> list[str]:
    head = ["rule", "test acc", "CPU s/epoch", "x backprop", "peak MB", "x backprop", "cosine after epoch 1"]
    lines = [head]
    for r in rows:
        def f(v: Any, fmt: str) -> str:
            return "-" if v is None else format(v, fmt)

        lines.append([r["rule"], pm(r["test_acc"], r.get("test_acc_sd"), ".4f"), f(r["sec_per_epoch"], ".3f"),
                      f(r["time_ratio"], ".2f"), f(r["peak_mb"], ".1f"), f(r["mem_ratio"], ".2f"),
                      pm(r["cosine"], r.get("cosine_sd"), ".3f")])
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(head))]
    return ["  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
            for row in lines]


def _markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    from ..bench.report import compare_markdown

    return compare_markdown({"meta": meta, "results": results})


class _FirstEpoch:
    """Callback: keeps copies of the model's and the rule's state after the first epoch."""

    def __init__(self) -> None:
        self.state: tuple[dict[str, Any], dict[str, Any]] | None = None

    def on_train_begin(self, trainer: Any) -> None: ...

    def on_step_end(self, trainer: Any, step: int, loss: float) -> None: ...

    def on_epoch_end(self, trainer: Any, record: dict[str, float]) -> None:
        if self.state is None:
            self.state = ({k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
                          copy.deepcopy(trainer.rule.state_dict()))

    def on_train_end(self, trainer: Any) -> None: ...


def cosine_after_first_epoch(name: str, spec: Any, state: tuple[dict[str, Any], dict[str, Any]], x: Any, y: Any,
                             seed: int, device: Any) -> tuple[float | None, str | None]:
    """Cosine of the rule's update to the exact cross-entropy gradient on the weights and rule state saved
    after the first epoch (one estimate on ``x, y``); ``(None, why)`` when there is nothing to compare with."""
    from ..diagnostics import gradient_alignment
    from ..rules import get_rule, rule_class

    cls = rule_class(name)
    probe = cls.default_model(spec.shape, spec.classes).to(device)
    model_state, rule_state = state
    rule = get_rule(name, seed=seed)
    rule.load_state_dict(copy.deepcopy(rule_state))
    try:
        probe.load_state_dict(model_state, strict=False)  # parts a rule added in attach are the rule's state
    except RuntimeError:  # a rule that reshaped the model (ff widens its input) loads it once attached
        probe = rule.attach(cls.default_model(spec.shape, spec.classes).to(device))
        probe.load_state_dict(model_state, strict=False)
    try:
        res = gradient_alignment(probe, rule, x, y, samples=1, names=True)
    except RuntimeError as e:  # no exact gradient to compare with (a black-box layer, say)
        return None, str(e).splitlines()[0] if str(e) else type(e).__name__
    per = res["per_parameter"]
    own = [n for n, p in probe.named_parameters() if p.requires_grad]
    if own and all(per.get(n, {}).get("norm_ratio") == 0 for n in own[-2:]):
        return None, "the rule does not train the output layer"
    return res["cosine"], None


def run(args: argparse.Namespace) -> int:
    import torch

    from .. import data
    from ..bench.memory import peak_memory, train_step_peak
    from ..rules import rule_class
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
    seeds = [args.seed + i for i in range(args.seeds)]
    n = min(args.cosine_batch, len(Xtr))
    for name in names:
        cls = rule_class(name)
        if cls.data_kind != "tensor":
            print(f"{name}: skipped (needs {cls.data_kind} data, not {args.data})", flush=True)
            continue
        d = dict(cls.defaults)
        epochs = args.epochs or d["epochs"]
        per_seed = []
        try:
            for seed in seeds:
                cfg = run_config(name, args.data, model="default", epochs=epochs, seed=seed)
                r = build_run(cfg, device=device, load_data=False)
                first = _FirstEpoch()
                hist = r.trainer(progress=not args.quiet, eval_train=False, callbacks=[first]).fit(
                    (Xtr, ytr), (Xte, yte))
                cos, why = cosine_after_first_epoch(name, spec, first.state, Xtr[:n].to(device), ytr[:n].to(device),
                                                    seed + 1, device)
                if why and seed == seeds[0]:
                    print(f"{name}: no cosine ({why})", flush=True)
                sec = hist.column("seconds")
                # the ratios use the process's CPU time per epoch (per thread): other jobs on a shared machine
                # stretch the wall clock, not this process's CPU time
                cpu = [c / torch.get_num_threads() for c in hist.column("cpu_seconds")]
                per_seed.append({
                    "seed": seed, "test_acc": hist.final["test_acc"], "best_test_acc": max(hist.column("test_acc")),
                    "test_acc_per_epoch": hist.column("test_acc"), "seconds_per_epoch": sec,
                    "cpu_seconds_per_epoch": cpu,
                    # median over epochs, the first left out when there are more: it carries one-off warm-up costs
                    "sec_per_epoch": statistics.median(cpu[1:] if len(cpu) > 1 else cpu), "cosine": cos,
                })
            peak = None
            if not args.no_memory:
                mem = {"device": device} if device.type == "cuda" else {"threads": torch.get_num_threads()}
                peak, _ = peak_memory(train_step_peak, name, {}, spec.shape, spec.classes, d["batch_size"],
                                      d["optimizer"], d["lr"], args.seed, **mem)
        except Exception as e:  # noqa: BLE001 - one failing rule must not sink the comparison
            print(f"{name}: skipped ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})", flush=True)
            continue
        acc, acc_sd = mean_sd([r["test_acc"] for r in per_seed])
        cos, cos_sd = mean_sd([r["cosine"] for r in per_seed])
        curves = [r["test_acc_per_epoch"] for r in per_seed]
        results.append({
            "rule": name,
            "defaults": {**d, "epochs": epochs},
            "seeds": seeds,
            "test_acc": acc,
            "test_acc_sd": acc_sd,
            "best_test_acc": statistics.fmean(r["best_test_acc"] for r in per_seed),
            "test_acc_per_epoch": [statistics.fmean(c) for c in zip(*curves)],
            "seconds_per_epoch": [statistics.fmean(c) for c in zip(*(r["seconds_per_epoch"] for r in per_seed))],
            "sec_per_epoch": statistics.fmean(r["sec_per_epoch"] for r in per_seed),
            "peak_mb": None if peak is None else max(peak, 0) / 2**20,  # below the resolution reads as 0
            "cosine": cos,
            "cosine_sd": cos_sd,
            "per_seed": per_seed,
        })
        if not args.quiet:
            r = results[-1]
            print(f"{name}: test acc {pm(r['test_acc'], r['test_acc_sd'], '.4f')} over {len(seeds)} seed(s), "
                  f"{r['sec_per_epoch']:.3f} s/epoch", flush=True)
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
        "command": "forwardlearn compare " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
            if k in ("data", "rules", "epochs", "seed", "seeds") and v is not None),
        "machine": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "device": str(device), "total_seconds": time.perf_counter() - t_start,
    }
    (out / "compare.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    (out / "compare.md").write_text(_markdown(results, meta))
    print(f"plot: {out / 'compare.png'}  table: {out / 'compare.md'}  data: {out / 'compare.json'}")
    return 0
