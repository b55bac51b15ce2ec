"""Tables and plots of the benchmarks, made from the stored JSON only.

``forwardlearn bench cost`` and ``bench accuracy`` write ``cost.json`` / ``accuracy-<suite>.json``;
everything a reader sees (Markdown tables, PNG plots, the README section between the markers
``<!-- bench:start -->`` and ``<!-- bench:end -->``) is rendered here from those files, so published
numbers are regenerated, never typed.

The cost tables and plot are in :mod:`.report_cost`, the accuracy tables and plot in :mod:`.report_accuracy`,
run metadata and the JSON write in :mod:`.meta`, table cells in :mod:`.cells` (all re-exported here); this
module renders the ``compare`` table and regenerates everything under a results directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .cells import MB, num, pm
from .meta import hardware, run_meta, write_json
from .report_accuracy import (
    accuracy_markdown,
    epoch_seconds,
    mean_run,
    plot_time_to_accuracy,
    reproduction_markdown,
    seed_groups,
)
from .report_cost import arch_markdown, cost_markdown, cost_title, plot_sweep, sweep_markdown

__all__ = [
    "END",
    "MB",
    "START",
    "accuracy_markdown",
    "arch_markdown",
    "compare_markdown",
    "cost_markdown",
    "cost_title",
    "epoch_seconds",
    "hardware",
    "mean_run",
    "plot_sweep",
    "plot_time_to_accuracy",
    "pm",
    "readme_text",
    "regenerate",
    "reproduction_markdown",
    "run_meta",
    "seed_groups",
    "sweep_markdown",
    "write_json",
]

START = "<!-- bench:start -->"
END = "<!-- bench:end -->"


# --- compare --------------------------------------------------------------------------------------
def compare_markdown(result: dict[str, Any]) -> str:
    """The table of a ``forwardlearn compare`` JSON: mean +/- sd over its seeds, then the command line."""
    meta = result["meta"]
    rows = result["results"]
    seeds = max((len(r.get("seeds") or [0]) for r in rows), default=1)
    out = [
        f"| rule | test acc (mean ± sd, {seeds} seed{'s' if seeds != 1 else ''}) | CPU time per epoch x backprop "
        "| peak MB | memory x backprop "
        "| cosine to true gradient after epoch 1 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(f"| {r['rule']} | {pm(r['test_acc'], r.get('test_acc_sd'), '.4f')} | "
                   f"{num(r.get('time_ratio'), '.2f')} | {num(r.get('peak_mb'), '.1f')} | "
                   f"{num(r.get('mem_ratio'), '.2f')} | {pm(r.get('cosine'), r.get('cosine_sd'), '.3f')} |")
    out += ["", f"`{meta['command']}` on {meta['machine']}, torch {meta['torch']}, {meta['threads']} thread(s), "
                f"device {meta['device']}; {meta['total_seconds']:.0f} s in all."]
    return "\n".join(out) + "\n"


# --- the report -----------------------------------------------------------------------------------
def readme_text(results: Path, readme: Path) -> str:
    """The text ``readme`` should have: its generated blocks (see :mod:`forwardlearn.bench.readme`) rewritten
    from the JSON in ``results``; nothing is written."""
    from .readme import render

    readme = Path(readme)
    prefix = os.path.relpath(Path(results).resolve(), readme.resolve().parent).replace(os.sep, "/") + "/"
    return render(readme.read_text() if readme.exists() else "", Path(results), prefix, str(readme))


def regenerate(results: Path, readme: Path | None = None) -> list[Path]:
    """Re-render every Markdown table and PNG under ``results`` from its JSON; optionally the README section.

    Returns the paths written. The README keeps everything outside its generated blocks (see
    :mod:`forwardlearn.bench.readme`); a README without any raises ``ValueError``.
    """
    results = Path(results)
    if not results.is_dir():
        raise FileNotFoundError(f"{results}: no such results directory (run `forwardlearn bench cost` first)")
    written: list[Path] = []
    sections: list[str] = []
    cost_files = sorted(results.glob("cost*.json"), key=lambda p: (p.stem != "cost", p.name))  # cost.json first
    for path in cost_files:
        res = json.loads(path.read_text())
        if res.get("sweep") and res.get("sweep_png"):
            plot_sweep(res["sweep"], results / res["sweep_png"])
            written.append(results / res["sweep_png"])
        md = path.with_suffix(".md")
        md.write_text(cost_markdown(res))
        written.append(md)
        sections.append(path.name)
    for path in sorted(results.glob("accuracy-*.json")):
        res = json.loads(path.read_text())
        for data, png in (res.get("plots") or {}).items():
            plot_time_to_accuracy(res["runs"], data, results / png, (res.get("meta") or {}).get("threads"))
            written.append(results / png)
        md = path.with_suffix(".md")
        md.write_text(accuracy_markdown(res))
        written.append(md)
        sections.append(path.name)
    for path in sorted(results.glob("compare-*.json")):
        md = path.with_suffix(".md")
        md.write_text(compare_markdown(json.loads(path.read_text())))
        written.append(md)
    if not sections:
        raise FileNotFoundError(f"{results}: no cost*.json or accuracy-*.json to report")
    summary = results / "RESULTS.md"
    summary.write_text("# Benchmark results\n\nRegenerated by `forwardlearn bench report` from the JSON files "
                       "in this directory.\n\n" + "\n".join(s for s in [
                           *(f"### {cost_title(r)}\n\n{cost_markdown(r)}"
                             for r in (json.loads(p.read_text()) for p in cost_files)),
                           *(f"### Accuracy: suite `{json.loads(p.read_text())['suite']['name']}`\n\n"
                             f"{accuracy_markdown(json.loads(p.read_text()))}"
                             for p in sorted(results.glob("accuracy-*.json")))]))
    written.append(summary)
    if readme is not None:
        readme = Path(readme)
        readme.write_text(readme_text(results, readme))
        written.append(readme)
    return written
