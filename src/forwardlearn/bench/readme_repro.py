"""The README's "Reproductions and rule-specific measurements" blocks, each read from its stored results file
(registered in :data:`forwardlearn.bench.readme.BLOCKS` on import)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .readme import _load, _pct, block

FORWARD_ONLY = "python benchmarks/forward_only_cost.py --threads 2 --reps 7"
BIOTORCH = "python benchmarks/biotorch_lenet.py --epochs 10 --rules backprop fa dfa usf"
FF_MNIST = "python benchmarks/ff_mnist.py --recipe hinton"
DISTRIBUTED = ("OMP_NUM_THREADS=1 python benchmarks/distributed_bytes.py --nproc 2 --hidden 256,256 "
               "--hidden 1024,1024 --steps 20")

#: forward_only_cost.json rows: (label, time ratio, its unit, time target, memory ratio, its unit, memory target)
_FORWARD_ROWS = [
    ("`zo_spsa` fused step", "zo_fused_step / forward", "forward", "≤ 3.0",
     "memory: zo fused step / inference", "inference", "≤ 1.1"),
    ("measured floor: 2 forwards + 3 plain parameter sweeps", "floor (2 fwd + 3 sweeps) / forward", "forward", "",
     None, "", ""),
    ("fused step / its floor", "zo_fused_step / floor", "floor", "", None, "", ""),
    ("one plain parameter sweep", "plain sweep / forward", "forward", "", None, "", ""),
    ("one Rademacher perturbation sweep", "rademacher perturb sweep / forward", "forward", "", None, "", ""),
    ("one Gaussian perturbation sweep", "gaussian perturb sweep / forward", "forward", "", None, "", ""),
    ("backprop step", "backprop step / forward", "forward", "", None, "", ""),
    ("`forward_gradient`, `tangent=\"rank1\"`", "forward_gradient+rank1 step / backprop step", "backprop step",
     "≤ 1.0", "memory: forward_gradient+rank1 / backprop", "backprop", "below backprop"),
    ("`forward_gradient` (i.i.d. tangent, the default)", "forward_gradient step / backprop step", "backprop step",
     "≤ 1.0", "memory: forward_gradient / backprop", "backprop", "below backprop"),
    ("the forward-mode pass alone, tangents given", "forward-mode pass alone (tangents given) / backprop step",
     "backprop step", "", None, "", ""),
    ("`forward_gradient`, `reuse_tangents=True`", "forward_gradient+reuse_tangents step / backprop step",
     "backprop step", "", "memory: forward_gradient+reuse_tangents / backprop", "backprop", ""),
    ("`activity_forward_gradient`", "activity_forward_gradient step / backprop step", "backprop step", "",
     "memory: activity_forward_gradient / backprop", "backprop", ""),
    ("`local_forward_gradient`", "local_forward_gradient step / backprop step", "backprop step", "",
     "memory: local_forward_gradient / backprop", "backprop", ""),
    ("`ulr` (8 copies)", "ulr step / backprop step", "backprop step", "", "memory: ulr / backprop", "backprop", ""),
]


def _met(value: float, target: str) -> str:
    if not target:
        return ""
    bound = 1.0 if target == "below backprop" else float(target.split()[-1])
    ok = value < bound if target == "below backprop" else value <= bound
    return f"{target} ({'met' if ok else 'missed'})"


@block("forward-only-cost")
def forward_only_cost(results: Path, prefix: str) -> str:
    """``forward_only_cost.json``: each forward-only estimator's step time and peak memory against a forward,
    a backprop step or inference, with the targets."""
    res = _load(results, "forward_only_cost.json", FORWARD_ONLY)
    r = res["ratios"]
    lines = [f"Command: `{FORWARD_ONLY}`  ",
             f"MLP {'-'.join(str(w) for w in res['widths'])}, batch {res['batch']}, {res['threads']} threads, "
             f"{res['parameters']:,} weights; one direction per step; peak memory above the process baseline, "
             "weights included.", "",
             "| rule | time | target | peak memory | target |", "|---|---:|---:|---:|---:|"]
    for label, t, tu, tt, m, mu, mt in _FORWARD_ROWS:
        mem = f"{r[m]:.3f} × {mu}" if m else ""
        lines.append(f"| {label} | {r[t]:.2f} × {tu} | {_met(r[t], tt)} | {mem} | {_met(r[m], mt) if m else ''} |")
    return "\n".join(lines) + "\n"


@block("biotorch-lenet")
def biotorch_lenet(results: Path, prefix: str) -> str:
    """``biotorch_lenet_10ep.json``: top-1 test error of every rule on BioTorch's LeNet after the run's epochs,
    beside BioTorch's reference after 100."""
    res = _load(results, "biotorch_lenet_10ep.json", BIOTORCH)
    setup = res["setup"]
    lines = [f"Command: `{setup['command']}`  ",
             f"{setup['model']}, {setup['optimizer']} (momentum {setup['momentum']}, weight decay "
             f"{setup['weight_decay']}), batch {setup['batch_size']}, {setup['threads']} thread.", "",
             f"| rule | learning rate | test error after epoch {setup['epochs']} (%) | best (%) | "
             "BioTorch, 100 epochs (%) |", "|---|---:|---:|---:|---:|"]
    for name, run in res["runs"].items():
        lines.append(f"| {name} | {run['lr']:g} | {run['final_error']:.2f} | {run['best_error']:.2f} | "
                     f"{run['biotorch_error_100_epochs']:.2f} |")
    return "\n".join(lines) + "\n"


def _ff_sentence(res: dict[str, Any], epochs: list[int]) -> str:
    s = res["summary"]
    curve = {e["epoch"]: e["goodness_test_error"] for e in res["epochs"] if "goodness_test_error" in e}
    at = ", ".join(f"{_pct(curve[e])} after {e}" for e in epochs if e in curve)
    hidden = s["config"]["hidden"]
    shape = f"{len(hidden)}×{hidden[0]}" if len(set(hidden)) == 1 else "×".join(str(h) for h in hidden)
    return (f"{shape}: **{_pct(s['final_goodness_test_error'])} test error after {s['epochs_done']} epochs** from "
            f"the goodness summed over the ten labels ({_pct(s['final_readout_test_error'])} with the read-out; "
            f"the paper: {_pct(s['paper_test_error'])})" + (f"; goodness test error {at} epochs" if at else "")
            + f". Command: `{s['command']}`.")


@block("ff-mnist")
def ff_mnist(results: Path, prefix: str) -> str:
    """``ff_mnist_4x2000_hinton.json`` and ``ff_mnist_4x500_hinton.json``: Forward-Forward's final test errors
    with Hinton's recipe, a few points of the curve, and the commands."""
    big = _load(results, "ff_mnist_4x2000_hinton.json", f"{FF_MNIST} --eval-every 5")
    small = _load(results, "ff_mnist_4x500_hinton.json", f"{FF_MNIST} --hidden 500 500 500 500 --eval-every 2")
    return f"- {_ff_sentence(big, [20, 35, 50])}\n- {_ff_sentence(small, [])}\n"


@block("distributed-bytes")
def distributed_bytes(results: Path, prefix: str) -> str:
    """``distributed_bytes.json``: bytes per rank per step and step time, seed-and-scalar exchange against DDP."""
    rows = _load(results, "distributed_bytes.json", DISTRIBUTED)
    lines = [f"Command: `{DISTRIBUTED}`", "",
             "| MLP hidden | weights | ranks | directions | seed-and-scalar bytes / rank / step | "
             "DDP all-reduce bytes / rank / step | step time / DDP's |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ss, ddp = r["seed_scalar"], r["ddp_backprop"]
        lines.append(f"| {'-'.join(str(h) for h in r['hidden'])} | {r['parameters']:,} | {r['world_size']} | "
                     f"{r['directions']} | {ss['payload_bytes_per_rank_step']:,.0f} | "
                     f"{ddp['allreduce_bytes_per_rank_step']:,} | "
                     f"{ss['seconds_per_step'] / ddp['seconds_per_step']:.2f} × |")
    return "\n".join(lines) + "\n"


@block("ep-cost")
def ep_cost(results: Path, prefix: str) -> str:
    """``cost.json``: the ``ep`` step against a backprop step on the first architecture of the cost table."""
    arch = _load(results, "cost.json", "forwardlearn bench cost")["archs"][0]
    row = next(r for r in arch["rows"] if r["name"] == "ep")
    return (f"On the {arch['label']} `ep`'s step costs {row['time_vs_backprop']:.1f} × a backprop step of the "
            "feed-forward MLP (`forwardlearn bench cost`).\n")
