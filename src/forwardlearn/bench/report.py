"""Tables and plots of the benchmarks, made from the stored JSON only.

``forwardlearn bench cost`` and ``bench accuracy`` write ``cost.json`` / ``accuracy-<suite>.json``;
everything a reader sees (Markdown tables, PNG plots, the README section between the markers
``<!-- bench:start -->`` and ``<!-- bench:end -->``) is rendered here from those files, so published
numbers are regenerated, never typed.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

START = "<!-- bench:start -->"
END = "<!-- bench:end -->"
MB = 2**20


# --- run metadata ---------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parents[3]
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("-dirty" if dirty else "") if sha else None


def run_meta(device: str, threads: int | None, seeds: Any, command: str | None = None) -> dict[str, Any]:
    """Where and how a benchmark ran: machine, CPU/GPU, torch, git commit, command line, seeds."""
    import torch

    gpu = None
    if str(device).startswith("cuda") and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(torch.device(device))
    if command is None:
        command = " ".join(sys.argv)
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "gpu": gpu,
        "device": str(device),
        "threads": threads if threads is not None else torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "git_commit": _git_commit(),
        "command": command,
        "seeds": seeds,
    }


def hardware(meta: dict[str, Any]) -> str:
    """One line naming the hardware and software of a run."""
    where = meta.get("gpu") or f"{meta.get('cpu')} ({meta.get('cpu_count')} cores, {meta.get('threads')} thread(s))"
    sha = meta.get("git_commit") or "unknown"
    commit = sha[:12] + ("-dirty" if sha.endswith("-dirty") else "")
    return f"{where}; torch {meta.get('torch')}, Python {meta.get('python')}; commit {commit}; {meta.get('date')}"


def write_json(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


# --- formatting -----------------------------------------------------------------------------------
def _f(v: Any, fmt: str) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    return format(v, fmt)


def _mb(v: Any) -> str:
    return "-" if v is None else f"{v / MB:.1f}"


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
    rad, gau = _f(b.get("rademacher_sweep_vs_forward"), ".2f"), _f(b.get("gaussian_sweep_vs_forward"), ".2f")
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
        f"(backprop step / forward: {_f(_ratio(b.get('backprop_seconds'), b.get('forward_seconds')), '.2f')}); "
        f"peak memory above the process baseline: inference {_mb(b['inference_peak_bytes'])} MB, backprop step "
        f"{_mb(b['backprop_peak_bytes'])} MB.",
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
            seg_s = "none fits" + (f" (least {_mb(least)} MB)" if least is not None else "")
        else:
            seg_s = "none needed" if seg == 1 else str(seg)
        out.append(
            f"| {r['name']} | {'yes' if r.get('forward_only') else 'no'} | {_f(r.get('time_vs_forward'), '.2f')} | "
            f"{_f(r.get('time_vs_backprop'), '.2f')} | {_mb(r.get('peak_bytes'))} | "
            f"{_f(r.get('memory_vs_inference'), '.1f')} | {_f(r.get('memory_vs_backprop'), '.2f')} | "
            f"{_f(r.get('cosine'), '.3f')} | {_f(r.get('mean_cosine'), '.3f')} | {seg_s} | "
            f"{_f(par.get('rule_vs_checkpoint'), '.2f')} |")
    if arch.get("checkpoints"):
        out += ["", "| backprop + activation checkpointing | step / forward | step / backprop | peak MB | "
                    "memory / backprop |", "|---|---:|---:|---:|---:|"]
        for c in arch["checkpoints"]:
            out.append(f"| {c['segments']} segments | {_f(c.get('time_vs_forward'), '.2f')} | "
                       f"{_f(c.get('time_vs_backprop'), '.2f')} | {_mb(c.get('peak_bytes'))} | "
                       f"{_f(c.get('memory_vs_backprop'), '.2f')} |")
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
            cells = [f"{_f(a, '.2f')} / {_f(b, '.2f')} / {_f(cc, '.2f')}"
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


# --- accuracy -------------------------------------------------------------------------------------
def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _setup(run: dict[str, Any]) -> str:
    s = run["spec"]
    model = s["model"] + (" " + "-".join(str(w) for w in s["hidden"]) if s.get("hidden") else "")
    opts = ", ".join(f"{k}={v}" for k, v in (s.get("options") or {}).items())
    return (f"{s['data']}, {model}, {s['optimizer']} lr {s['lr']:g}, {s['epochs']} epochs, batch {s['batch_size']}"
            + (f", {opts}" if opts else ""))


def _same_net(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Same widths, and the same model kind (a rule's ``default`` model counts as any)."""
    kinds = {a["model"], b["model"]} - {"default"}
    return a.get("hidden") == b.get("hidden") and len(kinds) <= 1


def seed_groups(runs: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Runs grouped by ``spec.group`` (the same run over several seeds, see ``bench accuracy --seeds``), in order
    of first appearance; a run without a group is a group of its own."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault(r["spec"].get("group") or r["spec"]["id"], []).append(r)
    return list(groups.values())


def mean_run(members: list[dict[str, Any]]) -> dict[str, Any]:
    """One run standing for a seed group: the first member's spec (with the group's id), its per-epoch history
    averaged over the members (as long as the shortest), ``final``/``best`` the means over the members."""
    if len(members) == 1:
        return members[0]
    hists = [r.get("history") or [] for r in members]
    n = min(len(h) for h in hists)
    hist = []
    for i in range(n):
        keys = set.intersection(*(set(h[i]) for h in hists))
        hist.append({k: sum(h[i][k] for h in hists) / len(hists) for k in sorted(keys)
                     if all(isinstance(h[i][k], (int, float)) for h in hists)})
    done = [r for r in members if r.get("final") is not None]
    status = "done" if all(r.get("status") == "done" for r in members) else next(
        r.get("status") for r in members if r.get("status") != "done")
    spec = {**members[0]["spec"], "id": members[0]["spec"].get("group") or members[0]["spec"]["id"]}
    return {"spec": spec, "status": status, "history": hist, "seeds": [r["spec"]["seed"] for r in members],
            "final": sum(r["final"] for r in done) / len(done) if done else None,
            "best": sum(r["best"] for r in done) / len(done) if done else None,
            "finals": [r.get("final") for r in members]}


def _pct_sd(run: dict[str, Any], key: str) -> str:
    """``_pct`` of a run, with `` ± sd`` (in points) when it stands for several seeds."""
    vals = [v for v in run.get(key + "s", []) if v is not None]
    if len(vals) < 2:
        return _pct(run.get(key))
    m = sum(vals) / len(vals)
    sd = (sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5
    return f"{100 * m:.2f}% ± {100 * sd:.2f}"


def accuracy_markdown(result: dict[str, Any], images: bool = True, image_prefix: str = "") -> str:
    """Per data set a results table, then the reproduction table. Runs repeated over seeds show as one row:
    the mean +/- sd of the final test accuracy, the means of the rest (every seed's run stays in the JSON)."""
    meta = result.get("meta") or {}
    out = [f"Command: `{meta.get('command', '?')}`  "]
    if meta.get("last_invocation") not in (None, meta.get("command")):
        out.append(f"(runs resume across invocations; the last one to write these results: "
                   f"`{meta['last_invocation']}`)  ")
    out += [f"Hardware: {hardware(meta)}", ""]
    groups = seed_groups(result["runs"])
    seeds = max(len(g) for g in groups) if groups else 1
    runs = [mean_run(g) for g in groups]
    for data in sorted({r["spec"]["data"] for r in runs}):
        mine = [r for r in runs if r["spec"]["data"] == data]
        xlabel, epoch_s = epoch_seconds(mine, meta.get("threads"))
        final = "final test acc" if seeds == 1 else f"final test acc (mean ± sd, {seeds} seeds)"
        best = "best test acc" if seeds == 1 else "best test acc (mean)"
        out += [f"#### {data}", "",
                f"Epoch time: {xlabel} per epoch, as a ratio to a backprop run on the same data: the one with the "
                "same widths where there is one, else the suite's first (named in the last column).", "",
                f"| run | rule | setup | {final} | {best} | epochs done | epoch time x backprop "
                "| backprop run compared with |",
                "|---|---|---|---:|---:|---:|---:|---|"]

        per_epoch = [sum(epoch_s(e) for e in h) / len(h) if (h := r.get("history")) else None for r in mine]
        bps = [(r, t) for r, t in zip(mine, per_epoch) if r["spec"]["rule"] == "backprop" and t]
        for r, t in zip(mine, per_epoch):
            h = r.get("history") or []
            same = [b for b in bps if _same_net(b[0]["spec"], r["spec"])]
            bp, t_bp = (same or bps or [(None, None)])[0]
            ratio = None if bp is None or t is None else t / t_bp
            status = "" if r.get("status") == "done" else (
                f" ({r.get('status')}" + (f": {r['error']}" if r.get("error") else "") + ")")
            ref = "-" if ratio is None else ("itself" if bp is r else bp["spec"]["id"])
            out.append(f"| {r['spec']['id']}{status} | {r['spec']['rule']} | {_setup(r)} | {_pct_sd(r, 'final')} | "
                       f"{_pct(r.get('best'))} | {len(h)}/{r['spec']['epochs']} | {_f(ratio, '.2f')} | {ref} |")
        png = (result.get("plots") or {}).get(data)
        if images and png:
            out += ["", f"![time to accuracy on {data}]({image_prefix}{png})"]
        out.append("")
    repro = reproduction_markdown(runs)
    if repro:
        out += repro
    if result.get("skipped"):
        out += ["Skipped: " + "; ".join(f"{s['rule']} ({s['why']})" for s in result["skipped"]) + ".", ""]
    return "\n".join(out) + "\n"


def reproduction_markdown(runs: list[dict[str, Any]]) -> list[str]:
    rows = [r for r in runs if r["spec"].get("paper")]
    if not rows:
        return []
    out = ["#### Reproduction: the papers' headline numbers next to ours", "",
           "| rule | paper | paper's setup | paper's test acc | our setup | our test acc | ours - paper |",
           "|---|---|---|---:|---|---:|---:|"]
    for r in rows:
        p = r["spec"]["paper"]
        ours = r.get("final") if r.get("status") == "done" else None
        diff = None if ours is None or p.get("test_acc") is None else ours - p["test_acc"]
        note = f" ({r['spec']['note']})" if r["spec"].get("note") else ""
        out.append(f"| {r['spec']['rule']} | {p.get('source', '')} | {p.get('setup', '')} | "
                   f"{_pct(p.get('test_acc'))} | {_setup(r)}{note} | {_pct(ours)} | "
                   f"{'-' if diff is None else f'{100 * diff:+.2f} pt'} |")
    out.append("")
    return out


def epoch_seconds(runs: list[dict[str, Any]], threads: int | None) -> tuple[str, Any]:
    """How the time-to-accuracy axis counts an epoch: CPU seconds / threads when every epoch of ``runs``
    recorded its CPU time (so a paused process or a busy machine does not stretch it), else wall-clock.
    Returns ``(axis label, epoch -> seconds)``."""
    n = max(int(threads or 1), 1)
    if runs and all("cpu_seconds" in e for r in runs for e in (r.get("history") or [])):
        what = "CPU seconds" if n == 1 else f"CPU seconds / {n} threads"
        return f"training time ({what}, evaluation excluded)", lambda e: e["cpu_seconds"] / n
    return "training seconds (wall clock, evaluation excluded)", lambda e: e["seconds"]


def plot_time_to_accuracy(runs: list[dict[str, Any]], data: str, path: Path, threads: int | None = 1) -> None:
    """Test accuracy against cumulative training time (evaluation excluded, see :func:`epoch_seconds`); a run
    repeated over seeds is drawn once, averaged over them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mine = [r for r in (mean_run(g) for g in seed_groups(runs)) if r["spec"]["data"] == data and r.get("history")]
    xlabel, secs = epoch_seconds(mine, threads)
    rules = [r["spec"]["rule"] for r in mine]
    fig, ax = plt.subplots(figsize=(11, 6))
    colors = plt.get_cmap("tab20").colors
    for i, r in enumerate(mine):
        t, acc, total = [], [], 0.0
        for e in r["history"]:
            total += secs(e)
            t.append(total)
            acc.append(e.get("test_acc"))
        label = r["spec"]["rule"] if rules.count(r["spec"]["rule"]) == 1 else r["spec"]["id"]
        style = "--" if r["spec"]["rule"] == "backprop" else ("-" if i % 2 == 0 else "-.")
        ax.plot(t, acc, style, marker=".", color=colors[i % len(colors)], label=label)
    ax.set(xlabel=xlabel, ylabel="test accuracy",
           title=f"{data}: time to accuracy")
    ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- compare --------------------------------------------------------------------------------------
def pm(mean: Any, sd: Any, fmt: str) -> str:
    """``mean ± sd`` (``-`` for a missing mean; the mean alone when there is no sd)."""
    if mean is None:
        return "-"
    return format(mean, fmt) + ("" if sd is None else f" ± {format(sd, fmt)}")


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
                   f"{_f(r.get('time_ratio'), '.2f')} | {_f(r.get('peak_mb'), '.1f')} | "
                   f"{_f(r.get('mem_ratio'), '.2f')} | {pm(r.get('cosine'), r.get('cosine_sd'), '.3f')} |")
    out += ["", f"`{meta['command']}` on {meta['machine']}, torch {meta['torch']}, {meta['threads']} thread(s), "
                f"device {meta['device']}; {meta['total_seconds']:.0f} s in all."]
    return "\n".join(out) + "\n"


# --- the report -----------------------------------------------------------------------------------
def cost_title(res: dict[str, Any]) -> str:
    return "Cost of one training step, and how it grows with depth and width" if res.get("sweep") else \
        "Cost of one training step"


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
