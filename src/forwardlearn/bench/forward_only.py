"""Markdown of the forward-only cost measurement (``benchmarks/forward_only_cost.py``) and of the full against
low-rank ``zo_spsa`` accuracy (``benchmarks/zo_lowrank_accuracy.py``), shared by those scripts and the README."""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable
from typing import Any

#: the targets of the low-rank step (ratio name -> bound), shown beside the measured values
TARGETS = {
    "zo lowrank fused step / forward": 2.2,
    "zo lowrank fused step / backprop step": 0.85,
    "memory: zo lowrank fused step / inference": 1.05,
}


def cost_markdown(res: dict[str, Any], keys: Iterable[str] | None = None, memory: bool = True) -> str:
    """The ratios of ``res`` (only ``keys``, in that order, when given) as a Markdown table with their targets,
    the command and the machine's load; then the peak memory table when ``memory``."""
    w = "-".join(str(v) for v in res["widths"])
    out = [f"Command: `{res['command']}`  ",
           f"MLP {w}, batch {res['batch']}, {res['threads']} threads, medians of {res['reps']} interleaved rounds; "
           f"torch {res['torch']}, {res['cpus']} CPUs, load average {res['load_average_before']:.1f} before and "
           f"{res['load_average_after']:.1f} after the run (a shared machine: ratios, not seconds, carry over).",
           "", "| ratio | measured | target |", "|---|---:|---:|"]
    for k in res["ratios"] if keys is None else keys:
        out.append(f"| {k} | {res['ratios'][k]:.3f} | {'<= ' + str(TARGETS[k]) if k in TARGETS else ''} |")
    if memory and "peak_bytes" in res:
        out += ["", "| peak memory above the process baseline | MiB |", "|---|---:|"]
        out += [f"| {k} | {v / 2**20:.1f} |" for k, v in res["peak_bytes"].items()]
    return "\n".join(out) + "\n"


def lowrank_accuracy_markdown(res: dict[str, Any]) -> str:
    """Test accuracy of every perturbation form over seeds (mean +- sd, per seed, seconds), with the command."""
    seeds = ",".join(str(r["seed"]) for r in next(iter(res["runs"].values())))
    lines = [f"Command: `{res['command']}`  ",
             f"`{res.get('rule', 'zo_spsa')}` on {res['data']} with its defaults ({json.dumps(res['defaults'])}), "
             f"seeds {seeds}; equal steps for both forms.", "",
             f"| {res.get('option', 'perturbation')} | test accuracy, mean +- sd (%) | per seed (%) | "
             "seconds per run (mean) |",
             "|---|---:|---:|---:|"]
    for form, runs in res["runs"].items():
        accs = [100 * r["test_acc"] for r in runs]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        lines.append(f"| {form} | {statistics.mean(accs):.2f} +- {sd:.2f} | {', '.join(f'{a:.2f}' for a in accs)} | "
                     f"{statistics.mean(r['seconds'] for r in runs):.1f} |")
    return "\n".join(lines) + "\n"
