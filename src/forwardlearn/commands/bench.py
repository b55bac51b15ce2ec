"""``forwardlearn bench cost|accuracy|report``: the benchmark of every rule, and the README's tables from it.

- ``bench cost``: time, peak memory and gradient quality of one training step of every registered rule
  next to backprop and checkpointed backprop at memory parity, on the MLP 784-2000x4-10 and the library
  CNN (batch 256), plus cost over depth and width as a plot.
- ``bench accuracy``: a suite of training runs (TOML) to a stated budget; resumes where it stopped.
  ``--quick``: the reduced suite on digits.
- ``bench report``: Markdown tables, plots and the README section, regenerated from the stored JSON.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import parse_hidden, positive

NAME = "bench"
_OPTIONS: dict[str, list[tuple[str, str, object, bool]]] = {}  # verb -> (dest, flag, default, is_switch)
HELP = "benchmark every rule: step cost (time, memory, gradient quality), accuracy suites, and the report"


def _ints(what: str):  # noqa: ANN202 - argparse type factory
    def convert(text: str) -> list[int]:
        try:
            return parse_hidden(text) or []
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be comma-separated positive integers, got {text!r}") \
                from None

    return convert


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench_verb", metavar="{cost,accuracy,report}")
    sub.required = True

    c = sub.add_parser("cost", help="time, memory and gradient cosine of one step of every rule",
                       description="Time, peak memory and gradient cosine of one training step of every rule, "
                                   "as ratios to inference and to backprop, with checkpointed backprop at memory "
                                   "parity; then the same over depth and width.")
    c.add_argument("--rules", default="all", help="all, or a comma-separated list of rule names")
    c.add_argument("--models", default="mlp,cnn", help="tables to make: mlp, cnn or mlp,cnn (default)")
    c.add_argument("--hidden", type=_ints("--hidden"), default=[2000, 2000, 2000, 2000],
                   help="widths of the MLP's hidden layers (default 2000,2000,2000,2000)")
    c.add_argument("--batch-size", type=positive(int, "--batch-size"), default=256)
    c.add_argument("--repeats", type=positive(int, "--repeats"), default=10, help="timed rounds (median)")
    c.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    c.add_argument("--samples", type=positive(int, "--samples"), default=16,
                   help="N of the cosine of the mean of N estimates")
    c.add_argument("--lr", type=positive(float, "--lr"), default=1e-3, help="SGD step size of the timed steps")
    c.add_argument("--depths", type=_ints("--depths"), default=[2, 4, 8, 16], help="hidden layer counts of the sweep")
    c.add_argument("--widths", type=_ints("--widths"), default=[250, 500, 1000, 2000], help="widths of the sweep")
    c.add_argument("--sweep-width", type=positive(int, "--sweep-width"), default=1000,
                   help="width of the depth sweep (default 1000)")
    c.add_argument("--sweep-depth", type=positive(int, "--sweep-depth"), default=4,
                   help="hidden layers of the width sweep (default 4)")
    c.add_argument("--sweep-repeats", type=positive(int, "--sweep-repeats"), default=5)
    c.add_argument("--sweep-samples", type=positive(int, "--sweep-samples"), default=4)
    c.add_argument("--no-sweep", action="store_true", help="skip the depth/width sweep")
    c.add_argument("--no-memory", action="store_true", help="skip peak-memory measurements")
    c.add_argument("--no-cosine", action="store_true", help="skip gradient cosines")
    c.add_argument("--out", default="benchmarks/results", help="results directory (default benchmarks/results)")
    c.add_argument("--name", default="cost", help="file stem of the outputs (default cost)")
    _common(c)

    a = sub.add_parser("accuracy", help="train every rule of a suite to its budget (resumable)",
                       description="Train the runs of a suite file to their budgets; per-epoch test accuracy and "
                                   "wall-clock, time-to-accuracy plots and the reproduction table. Interrupted "
                                   "runs resume from their last epoch.")
    a.add_argument("--suite", default="full", help="suite file, or a built-in: full (MNIST, default), quick")
    a.add_argument("--quick", action="store_true", help="the reduced suite on digits (a few minutes)")
    a.add_argument("--only", default=None, help="comma-separated rule names or run ids to run")
    a.add_argument("--out", default="benchmarks/results", help="results directory (default benchmarks/results)")
    a.add_argument("--work", default="runs/bench", help="per-run checkpoints (default runs/bench)")
    a.add_argument("--list", action="store_true", help="print the suite's runs and exit")
    a.add_argument("--seeds", type=positive(int, "--seeds"), default=1,
                   help="seeds per run (its seed, seed + 1, ...); the tables show mean +/- sd (default 1)")
    a.add_argument("--eval-threads", type=positive(int, "--eval-threads"), default=None,
                   help="torch CPU threads of the per-epoch evaluation, which is not timed (default: --threads)")
    a.add_argument("--data-dir", default=None, help="data cache (default $FORWARDLEARN_DATA or ~/.cache/forwardlearn)")
    _common(a)

    r = sub.add_parser("report", help="regenerate tables, plots and the README section from stored JSON",
                       description="Regenerate the Markdown tables and PNG plots from the JSON in the results "
                                   "directory; with --readme, also the README's section between "
                                   "<!-- bench:start --> and <!-- bench:end -->.")
    r.add_argument("--results", default="benchmarks/results", help="results directory (default benchmarks/results)")
    r.add_argument("--readme", default=None, help="README to update between the bench markers")
    for verb, parser in (("cost", c), ("accuracy", a), ("report", r)):
        _OPTIONS[verb] = [(x.dest, x.option_strings[-1], x.default, x.nargs == 0) for x in parser._actions
                          if x.option_strings and x.dest != "help"]


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces ``args``: ``forwardlearn bench VERB`` and every option not at its default."""
    parts = ["forwardlearn", "bench", args.bench_verb]
    for dest, flag, default, switch in _OPTIONS.get(args.bench_verb, []):
        value = getattr(args, dest, default)
        if value == default:
            continue
        if switch:
            parts.append(flag)
        else:
            parts += [flag, ",".join(str(v) for v in value) if isinstance(value, list) else str(value)]
    return " ".join(parts)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--threads", type=positive(int, "--threads"), default=1, help="torch CPU threads (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _rules(spec: str) -> list[str]:
    """``all`` or named rules (validated as ``forwardlearn compare`` does), always with the backprop reference."""
    from .compare import select_rules

    names = select_rules(spec)
    return names if "backprop" in names else ["backprop", *names]


def _cost(args: argparse.Namespace) -> int:
    from ..bench.cost import Arch, CostConfig, run_cost, sweep_archs
    from ..bench.report import run_meta
    from ..training import resolve_device

    device = str(resolve_device(args.device))
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in ("mlp", "cnn")]
    if bad or not models:
        raise ValueError(f"--models takes mlp, cnn or mlp,cnn, got {args.models!r}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    archs = [Arch("mlp", tuple(args.hidden)) if m == "mlp" else Arch("cnn", None) for m in models]
    base = dict(batch_size=args.batch_size, warmup=args.warmup, seed=args.seed, lr=args.lr,
                memory=not args.no_memory, cosine=not args.no_cosine, device=device, threads=args.threads)
    cfg = CostConfig(repeats=args.repeats, samples=args.samples, **base)
    sweep_cfg = CostConfig(repeats=args.sweep_repeats, samples=args.sweep_samples, **base)
    sweep = [] if args.no_sweep else sweep_archs(args.depths, args.widths, args.sweep_width, args.sweep_depth)
    fixed = {"depth": f"width {args.sweep_width}", "width": f"{args.sweep_depth} hidden layers"}
    rules = _rules(args.rules)
    meta = run_meta(device, args.threads, {"seed": args.seed}, command=command_line(args))
    res = run_cost(archs, rules, cfg, Path(args.out), sweep=sweep, sweep_cfg=sweep_cfg, fixed=fixed,
                   progress=not args.quiet, meta=meta, name=args.name)
    out = Path(args.out)
    print((out / f"{args.name}.md").read_text())
    files = [out / f"{args.name}.json", out / f"{args.name}.md"]
    if res.get("sweep_png"):
        files.append(out / res["sweep_png"])
    print("written: " + "  ".join(str(f) for f in files))
    return 0


def _accuracy(args: argparse.Namespace) -> int:
    from ..bench.accuracy import load_suite, run_suite, with_seeds
    from ..bench.report import run_meta
    from ..training import resolve_device

    suite = with_seeds(load_suite("quick" if args.quick else args.suite), args.seeds)
    if args.list:
        for s in suite["runs"]:
            print(f"{s['id']}: {s['rule']} on {s['data']}, {s['model']} {s.get('hidden') or ''}, {s['optimizer']} "
                  f"lr {s['lr']:g}, {s['epochs']} epochs, batch {s['batch_size']}, seed {s['seed']}")
        for s in suite["skipped"]:
            print(f"{s['rule']}: skipped ({s['why']})")
        return 0
    for s in suite["skipped"]:
        print(f"{s['rule']}: skipped ({s['why']})")
    only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else None
    device = str(resolve_device(args.device))
    # the table gathers runs trained by several invocations (each resumes where the last stopped): its
    # command is the one that reproduces all of it; the invocation that last wrote it is kept beside
    meta = run_meta(device, args.threads, {"suite": "per run (see runs[].spec.seed)", "per_run": args.seeds},
                    command=command_line(argparse.Namespace(**{**vars(args), "only": None})))
    meta["last_invocation"] = command_line(args)
    out = run_suite(suite, Path(args.out), Path(args.work), device=device, threads=args.threads,
                    eval_threads=args.eval_threads, data_dir=args.data_dir, progress=not args.quiet, meta=meta,
                    only=only)
    by_status: dict[str, list[str]] = {}
    for r in out["runs"]:
        by_status.setdefault(r["status"], []).append(r["spec"]["id"])
    name = suite["name"]
    print(f"written: {Path(args.out) / f'accuracy-{name}.json'}  {Path(args.out) / f'accuracy-{name}.md'}  "
          + "  ".join(str(Path(args.out) / p) for p in out["plots"].values()))
    print(f"{len(by_status.get('done', []))} of {len(out['runs'])} run(s) done "
          f"({out['total_seconds_this_session']:.0f} s this session)"
          + "".join(f"; {status}: {', '.join(by_status[status])}"
                    for status in ("failed", "incomplete", "not run") if by_status.get(status)))
    return 1 if by_status.get("failed") else 0


def _report(args: argparse.Namespace) -> int:
    from ..bench.report import regenerate

    written = regenerate(Path(args.results), Path(args.readme) if args.readme else None)
    print("written: " + "  ".join(str(p) for p in written))
    return 0


def run(args: argparse.Namespace) -> int:
    return {"cost": _cost, "accuracy": _accuracy, "report": _report}[args.bench_verb](args)
