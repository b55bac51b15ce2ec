"""Speed and memory of the forward-only gradient estimators, as ratios measured in one run.

MLP 784-2000-2000-2000-2000-10, batch 256, plain SGD, float32 (defaults; see ``--help``)::

    python benchmarks/forward_only_cost.py --threads 2

Times are medians over ``--reps`` rounds after a warm-up, all in this process; in each round every
measured function runs once in turn, so load changes on a shared machine hit all of them alike. Peak memory is
measured by :func:`forwardlearn.bench.memory.peak_memory`: each measurement runs in a fresh child
process that builds the model itself, so weights, gradients, optimizer state and every temporary
count, above that child's own baseline. Ratios:

- ``zo_spsa`` fused step (K=1, central) / forward; also the floor ``2 forwards + 3 parameter sweeps``
  (an in-place scalar add over every weight: memory bandwidth only) and the random-number cost;
- ``zo_spsa`` low-rank fused step (``perturbation="lowrank"``, rank 1: perturbed inside the layers' forwards,
  one rank-1 update per matrix) / forward and / backprop step, timed in the same rounds as both;
- each rule's ``grads`` + SGD step / backprop's ``backward`` + SGD step; the forward-mode pass alone
  (tangents given, no ``.grad`` written) / backprop step, the floor of a weight-perturbed forward gradient;
- peak memory: ``zo_spsa`` fused step / inference, every rule / backprop.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import forwardlearn as fl
from forwardlearn.bench.forward_only import cost_markdown
from forwardlearn.forward_only import CHUNK, Directions, jvp_loss

RULES: dict[str, dict[str, Any]] = {
    "forward_gradient": {"directions": 1},
    "forward_gradient+reuse_tangents": {"directions": 1, "reuse_tangents": True},
    "forward_gradient+rank1": {"directions": 1, "tangent": "rank1"},
    "activity_forward_gradient": {"directions": 1},
    "local_forward_gradient": {},
    "ulr": {"directions": 8},  # time and activation memory grow linearly with the noisy copies
    "zo_spsa": {"directions": 1},
    "zo_spsa+lowrank": {"directions": 1, "perturbation": "lowrank"},
}


def build(widths: list[int], seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return fl.models.mlp(widths[0], widths[1:-1], widths[-1])


def batch(widths: list[int], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, widths[0], generator=g), torch.randint(0, widths[-1], (n,), generator=g)


def round_robin(fns: dict[str, Callable[[], Any]], reps: int) -> dict[str, float]:
    """Median seconds of each function, timed in turns (one call of each per round) so that a change
    of machine load during the run hits every function alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


# --- functions measured in fresh processes (module level: picklable) ----------------------------------


def mem_inference(widths: list[int], n: int) -> None:
    model = build(widths)
    x, y = batch(widths, n)
    with torch.no_grad():
        F.cross_entropy(model(x), y)


def mem_step(widths: list[int], n: int, rule: str, options: dict[str, Any]) -> None:
    r = fl.get_rule(rule.split("+")[0], seed=0, **options)
    model = r.attach(build(widths))
    x, y = batch(widths, n)
    opt = torch.optim.SGD(fl.rules.trainable_parameters(model), lr=1e-3)
    for _ in range(2):  # the second step is the steady state (gradients already allocated)
        opt.zero_grad(set_to_none=True)
        r.grads(model, x, y)
        opt.step()


def mem_fused(widths: list[int], n: int, options: dict[str, Any] | None = None) -> None:
    r = fl.get_rule("zo_spsa", directions=1, seed=0, **(options or {}))
    model = build(widths)
    x, y = batch(widths, n)
    for _ in range(2):
        r.fused_step(model, x, y, lr=1e-3)


# --- the run ----------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default="784,2000,2000,2000,2000,10")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--json", help="also write the results here, and a Markdown table beside it (same name, .md)")
    args = ap.parse_args()
    widths = [int(w) for w in args.widths.split(",")]
    torch.set_num_threads(args.threads)
    model = build(widths)
    params = fl.rules.trainable_parameters(model)
    x, y = batch(widths, args.batch)
    res: dict[str, Any] = {"command": shlex.join(["python", *sys.argv]), "widths": widths, "batch": args.batch,
                           "threads": args.threads, "parameters": sum(p.numel() for p in params),
                           "reps": args.reps, "torch": torch.__version__, "cpus": os.cpu_count(),
                           "load_average_before": os.getloadavg()[0]}

    def forward() -> None:
        with torch.no_grad():
            F.cross_entropy(model(x), y)

    def sweep() -> None:  # one pass over the weights at memory bandwidth
        with torch.no_grad():
            for p in params:
                p.add_(1e-30)

    dirs = {d: Directions(d) for d in ("rademacher", "gaussian")}
    flats = [p.detach().view(-1) for p in params]

    def perturb(d: str) -> Callable[[], None]:
        return lambda: dirs[d].add_(flats, 12345, 0.0)

    buf = torch.empty(CHUNK)

    def normal_sweep() -> None:  # the reference: drawing one Gaussian per weight with normal_
        for f in flats:
            for s in range(0, f.numel(), CHUNK):
                buf[: min(CHUNK, f.numel() - s)].normal_()

    zo = fl.get_rule("zo_spsa", directions=1, seed=0)
    zo_lr = fl.get_rule("zo_spsa", directions=1, seed=0, perturbation="lowrank")
    bp_model = build(widths)
    bp_opt = torch.optim.SGD(bp_model.parameters(), lr=1e-12)

    def backprop_step() -> None:
        bp_opt.zero_grad(set_to_none=True)
        F.cross_entropy(bp_model(x), y).backward()
        bp_opt.step()

    t = round_robin({
        "forward": forward,
        "sweep": sweep,
        "perturb_rademacher": perturb("rademacher"),
        "perturb_gaussian": perturb("gaussian"),
        "normal_draw": normal_sweep,
        "zo_fused_step": lambda: zo.fused_step(model, x, y, lr=1e-12),
        "zo_lowrank_fused_step": lambda: zo_lr.fused_step(model, x, y, lr=1e-12),
        "backprop_step_same_rounds": backprop_step,
    }, args.reps)

    def step_fn(rule: fl.Rule, m: torch.nn.Module) -> Callable[[], None]:
        opt = torch.optim.SGD(fl.rules.trainable_parameters(m), lr=1e-12)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            rule.grads(m, x, y)
            opt.step()

        return step

    tangents = [torch.randn_like(p) for p in params]

    def jvp_only() -> None:  # the forward-mode pass alone, tangents already made (no drawing, no .grad)
        jvp_loss(model, x, y, F.cross_entropy, lambda i, p: tangents[i])

    steps = {"backprop_step": step_fn(fl.get_rule("backprop", seed=0), model), "jvp_only": jvp_only}
    for name, opts in RULES.items():
        r = fl.get_rule(name.split("+")[0], seed=0, **opts)
        steps[f"{name}_step"] = step_fn(r, r.attach(build(widths)))
    t.update(round_robin(steps, args.reps))
    res["seconds"] = t
    fwd = t["forward"]
    floor = 2 * fwd + 3 * t["sweep"]
    res["ratios"] = {
        "zo_fused_step / forward": t["zo_fused_step"] / fwd,
        "floor (2 fwd + 3 sweeps) / forward": floor / fwd,
        "zo_fused_step / floor": t["zo_fused_step"] / floor,
        "rademacher perturb sweep / forward": t["perturb_rademacher"] / fwd,
        "gaussian perturb sweep / forward": t["perturb_gaussian"] / fwd,
        "normal_ draw of all weights / forward": t["normal_draw"] / fwd,
        "plain sweep / forward": t["sweep"] / fwd,
        "backprop step / forward": t["backprop_step"] / fwd,
        "zo lowrank fused step / forward": t["zo_lowrank_fused_step"] / fwd,
        "zo lowrank fused step / backprop step": t["zo_lowrank_fused_step"] / t["backprop_step_same_rounds"],
    }
    res["ratios"]["forward-mode pass alone (tangents given) / backprop step"] = t["jvp_only"] / t["backprop_step"]
    for name in RULES:
        res["ratios"][f"{name} step / backprop step"] = t[f"{name}_step"] / t["backprop_step"]
    if not args.no_memory:
        from forwardlearn.bench.memory import peak_memory

        mem: dict[str, int] = {}
        mem["inference"], _ = peak_memory(mem_inference, widths, args.batch, threads=args.threads)
        mem["zo_fused_step"], _ = peak_memory(mem_fused, widths, args.batch, threads=args.threads)
        mem["zo_lowrank_fused_step"], _ = peak_memory(mem_fused, widths, args.batch, {"perturbation": "lowrank"},
                                                      threads=args.threads)
        mem["backprop"], _ = peak_memory(mem_step, widths, args.batch, "backprop", {}, threads=args.threads)
        for name, opts in RULES.items():
            mem[name], _ = peak_memory(mem_step, widths, args.batch, name, opts, threads=args.threads)
        res["peak_bytes"] = mem
        res["ratios"]["memory: zo fused step / inference"] = mem["zo_fused_step"] / max(mem["inference"], 1)
        res["ratios"]["memory: zo lowrank fused step / inference"] = (mem["zo_lowrank_fused_step"]
                                                                       / max(mem["inference"], 1))
        for name in RULES:
            res["ratios"][f"memory: {name} / backprop"] = mem[name] / max(mem["backprop"], 1)
    for k, v in res["ratios"].items():
        print(f"{k:45s} {v:7.3f}")
    if "peak_bytes" in res:
        for k, v in res["peak_bytes"].items():
            print(f"peak MiB {k:36s} {v / 2**20:9.1f}")
    res["load_average_after"] = os.getloadavg()[0]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
        Path(args.json).with_suffix(".md").write_text(cost_markdown(res))


if __name__ == "__main__":
    main()
