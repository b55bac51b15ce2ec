"""The tables and the plot of ``forwardlearn bench accuracy``, made from its stored ``accuracy-<suite>.json`` only:
per data set a results table and a time-to-accuracy plot, then the papers' headline numbers next to ours."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .cells import num, pct
from .meta import hardware

__all__ = [
    "accuracy_markdown",
    "epoch_seconds",
    "mean_run",
    "plot_time_to_accuracy",
    "reproduction_markdown",
    "seed_groups",
]


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
        return pct(run.get(key))
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
                       f"{pct(r.get('best'))} | {len(h)}/{r['spec']['epochs']} | {num(ratio, '.2f')} | {ref} |")
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
                   f"{pct(p.get('test_acc'))} | {_setup(r)}{note} | {pct(ours)} | "
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
