"""The tables and the plot of ``forwardlearn bench cost``, made from its stored ``cost*.json`` only: per architecture
a rule table and a checkpointing table, then the cost over depth and width."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .cells import mb, num
from .meta import hardware

__all__ = ["arch_markdown", "cost_markdown", "cost_title", "plot_sweep", "sweep_markdown"]


def cost_markdown(result: dict[str, Any], images: bool = True, image_prefix: str = "") -> str:
    """The Markdown of a ``cost.json``: per architecture a rule table and a checkpointing table, then the sweep."""
    meta = result.get("meta") or {}
    out = [f"Command: `{meta.get('command', '?')}`  ", f"Hardware: {hardware(meta)}", ""]
    for arch in result["archs"]:
        out += arch_markdown(arch, result["config"].get("samples"))
    sweep = result.get("sweep")
    if sweep:
        out += sweep_markdown(sweep)
        if images and result.get("sweep_png"):
            out += [f"![cost over depth and width]({image_prefix}{result['sweep_png']})", ""]
    return "\n".join(out) + "\n"


def _sweep_line(b: dict[str, Any]) -> list[str]:
    """The machine's cost of one seeded perturbation sweep over all weights (why full-perturbation rows move)."""
    if b.get("rademacher_sweep_vs_forward") is None:
        return []
    rad, gau = num(b.get("rademacher_sweep_vs_forward"), ".2f"), num(b.get("gaussian_sweep_vs_forward"), ".2f")
    return [f"One seeded perturbation sweep over all weights on this machine: Rademacher {rad}, Gaussian {gau} x "
            "the forward pass (a full-perturbation `zo_spsa` fused step makes three sweeps, the low-rank one none).",
            ""]


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def arch_markdown(arch: dict[str, Any], samples: int | None) -> list[str]:
    b = arch["baseline"]
    n = samples or "N"
    out = [
        f"#### {arch['label']}, batch {arch['batch_size']}",
        "",
        f"Times are medians, as ratios to the inference forward pass and to the backprop step of the same run "
        f"(backprop step / forward: {num(_ratio(b.get('backprop_seconds'), b.get('forward_seconds')), '.2f')}); "
        f"peak memory above the process baseline: inference {mb(b['inference_peak_bytes'])} MB, backprop step "
        f"{mb(b['backprop_peak_bytes'])} MB.",
        "",
        *_sweep_line(b),
        f"| rule | forward-only | step / forward | step / backprop | peak MB | memory / inference | memory / backprop "
        f"| cosine | cosine of mean of {n} | parity: checkpoint segments | step / checkpointed step at parity |",
        "|---|:-:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in arch["rows"]:
        par = r.get("parity") or {}
        seg = par.get("segments")
        if not par:
            seg_s = "-"
        elif seg is None:
            least = par.get("least_checkpoint_peak_bytes")
            seg_s = "none fits" + (f" (least {mb(least)} MB)" if least is not None else "")
        else:
            seg_s = "none needed" if seg == 1 else str(seg)
        out.append(
            f"| {r['name']} | {'yes' if r.get('forward_only') else 'no'} | {num(r.get('time_vs_forward'), '.2f')} | "
            f"{num(r.get('time_vs_backprop'), '.2f')} | {mb(r.get('peak_bytes'))} | "
            f"{num(r.get('memory_vs_inference'), '.1f')} | {num(r.get('memory_vs_backprop'), '.2f')} | "
            f"{num(r.get('cosine'), '.3f')} | {num(r.get('mean_cosine'), '.3f')} | {seg_s} | "
            f"{num(par.get('rule_vs_checkpoint'), '.2f')} |")
    if arch.get("checkpoints"):
        out += ["", "| backprop + activation checkpointing | step / forward | step / backprop | peak MB | "
                    "memory / backprop |", "|---|---:|---:|---:|---:|"]
        for c in arch["checkpoints"]:
            out.append(f"| {c['segments']} segments | {num(c.get('time_vs_forward'), '.2f')} | "
                       f"{num(c.get('time_vs_backprop'), '.2f')} | {mb(c.get('peak_bytes'))} | "
                       f"{num(c.get('memory_vs_backprop'), '.2f')} |")
    if arch.get("skipped"):
        out += ["", "Skipped: " + "; ".join(f"{s['rule']} ({s['why']})" for s in arch["skipped"]) + "."]
    out.append("")
    return out


def _sweep_series(sweep: list[dict[str, Any]], axis: str, key: str) -> tuple[list[int], dict[str, list[Any]]]:
    points = [p for p in sweep if p["axis"] == axis]
    xs = [p["value"] for p in points]
    series: dict[str, list[Any]] = {}
    for i, p in enumerate(points):
        rows = list(p["result"]["rows"])
        cks = [c for c in p["result"].get("checkpoints", []) if c.get("peak_bytes") is not None]
        if cks:  # the least-memory checkpointed configuration, as one more line
            best = min(cks, key=lambda c: c["peak_bytes"])
            rows.append({**best, "name": "backprop + checkpoint (least memory)"})
        for r in rows:
            series.setdefault(r["name"], [None] * len(points))[i] = r.get(key)
    return xs, series


def sweep_markdown(sweep: list[dict[str, Any]]) -> list[str]:
    out: list[str] = []
    for axis in ("depth", "width"):
        pts = [p for p in sweep if p["axis"] == axis]
        if not pts:
            continue
        fixed = pts[0]["fixed"]
        xs, t = _sweep_series(sweep, axis, "time_vs_backprop")
        _, m = _sweep_series(sweep, axis, "memory_vs_backprop")
        _, c = _sweep_series(sweep, axis, "cosine")
        what = "hidden layers" if axis == "depth" else "hidden width"
        out += [f"#### Cost over {axis} ({fixed}; step time / backprop, memory / backprop, cosine)", "",
                "| rule | " + " | ".join(f"{what} {x}" for x in xs) + " |",
                "|---|" + "---:|" * len(xs)]
        for name in t:
            cells = [f"{num(a, '.2f')} / {num(b, '.2f')} / {num(cc, '.2f')}"
                     for a, b, cc in zip(t[name], m.get(name, []), c.get(name, [None] * len(xs)))]
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        out.append("")
    return out


def plot_sweep(sweep: list[dict[str, Any]], path: Path) -> None:
    """Step time, peak memory (both / backprop) and cosine over depth and over width: a 2 x 3 grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_present = [a for a in ("depth", "width") if any(p["axis"] == a for p in sweep)]
    fig, axs = plt.subplots(len(axes_present), 3, figsize=(16, 4.8 * len(axes_present)), squeeze=False)
    for row, axis in enumerate(axes_present):
        fixed = next(p["fixed"] for p in sweep if p["axis"] == axis)
        for col, (key, ylabel, log) in enumerate([("time_vs_backprop", "step time / backprop step", True),
                                                  ("memory_vs_backprop", "peak memory / backprop", True),
                                                  ("cosine", "cosine to backprop gradient", False)]):
            xs, series = _sweep_series(sweep, axis, key)
            ax = axs[row][col]
            colors = plt.get_cmap("tab20").colors
            for i, (name, ys) in enumerate(series.items()):
                pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
                if pts:
                    style = "--" if name.startswith("backprop") else ("-" if i % 2 == 0 else "-.")
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker=".", color=colors[i % len(colors)],
                            label=name)
            ax.set(xlabel=f"{'hidden layers' if axis == 'depth' else 'hidden width'} ({fixed})", ylabel=ylabel)
            ax.set_xscale("log", base=2)
            if log:
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
    # the legend from the time panel: it has every series (a checkpointed baseline has no cosine)
    handles, labels = axs[0][0].get_legend_handles_labels()
    axs[0][-1].legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cost_title(res: dict[str, Any]) -> str:
    return "Cost of one training step, and how it grows with depth and width" if res.get("sweep") else \
        "Cost of one training step"
