"""The README's rule-specific measurement blocks (ForwardGNN, conv Forward-Forward, rank-one forward gradient,
LeNet step times, federated, replay log, HarsanyiNet), each read from its stored results file, which records
the command that made it (registered in :data:`forwardlearn.bench.readme.BLOCKS` on import)."""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from .readme import _load, _pct, block

FORWARD_GNN = ("OMP_NUM_THREADS=1 python benchmarks/forward_gnn.py --seeds 0,1,2 "
               "--json benchmarks/results/forward_gnn.json")
FF_CONV = ("OMP_NUM_THREADS=1 python benchmarks/ff_conv.py --data mnist --models cnn --epochs 3 --limit 10000 "
           "--json benchmarks/results/ff_conv_mnist.json")
RANK1 = ("python benchmarks/zo_lowrank_accuracy.py --rule forward_gradient --seeds 0,1,2 "
         "--out benchmarks/results/forward_gradient_rank1_digits")
LENET_TIMING = ("python benchmarks/biotorch_lenet.py --timing 20 --clock cpu --rules backprop fa dfa usf brsf frsf pfa "
                "pfa-x1 --out benchmarks/results/biotorch_lenet_timing.json")
FEDERATED = ("OMP_NUM_THREADS=1 python benchmarks/federated.py --clients 10 --rounds 100 --alpha 0.5 "
             "--json benchmarks/results/federated.json")
REPLAY = ("OMP_NUM_THREADS=1 python benchmarks/replay_bytes.py --hidden 256,256 --directions 8 --epochs 1 "
          "--json benchmarks/results/replay_bytes.json")
HARSANYI_COST = ("OMP_NUM_THREADS=1 python benchmarks/harsanyi_cost.py --part cost --inputs 5 "
                 "--json benchmarks/results/harsanyi_cost.json")
HARSANYI_ACCURACY = ("OMP_NUM_THREADS=1 python benchmarks/harsanyi_cost.py --part accuracy --seeds 3 "
                     "--json benchmarks/results/harsanyi_accuracy.json")
SHARED = "a shared 2-core machine: time ratios within the run, not seconds, carry over"
CPU = "process CPU time, which the machine's other jobs disturb far less than wall-clock time"


def _table(head: list[str], rows: list[list[str]], left: int = 1) -> list[str]:
    """A Markdown table: the first ``left`` columns left-aligned, the rest right-aligned."""
    rule = "|" + "|".join(["---"] * left + ["---:"] * (len(head) - left)) + "|"
    return [f"| {' | '.join(head)} |", rule, *(f"| {' | '.join(r)} |" for r in rows)]


def _mean_sd(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{scale * statistics.mean(values):.{digits}f} ± {scale * sd:.{digits}f}"


@block("forward-gnn")
def forward_gnn(results: Path, prefix: str) -> str:
    """``forward_gnn.json``: test accuracy (at the best validation epoch) of the backprop GCN and ForwardGNN's
    variants on each generated graph over seeds, and training time per epoch against the GCN in the same run."""
    res = _load(results, "forward_gnn.json", FORWARD_GNN)
    setup = res["setup"]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in res["rows"]:
        groups[(row["graph"].split("/")[0], row["method"])].append(row)
    seeds = sorted({row["graph"].split("/")[-1] for row in res["rows"]})
    lines = [f"Command: `{setup['command']}`  ",
             f"Contextual SBM graphs (`fl.data.graphs.csbm` with its defaults; `csbm-hard`: "
             f"{', '.join(f'`{k}={v}`' for k, v in setup['csbm'].get('csbm-hard', {}).items())}), "
             f"hidden width {setup['hidden']}, {setup['layers']} graph convolutions, full batch, seeds "
             f"{', '.join(seeds)} (graph and model), test accuracy at the epoch of best validation accuracy "
             f"(checked every {setup['eval_every']} epochs); CPU time per training epoch over the GCN's in the same "
             f"run, median over seeds ({setup['threads']} thread; {CPU}; {SHARED}).", ""]
    head = ["graph", "method", "test accuracy, mean ± sd (%)", "per seed (%)", "CPU time per epoch / GCN backprop"]
    lines += _table(head,
                    [[graph, method, _mean_sd([r["test_acc"] for r in rows]),
                      ", ".join(f"{100 * r['test_acc']:.2f}" for r in rows),
                      f"{statistics.median(r['cpu_ratio_to_backprop'] for r in rows):.2f} ×"]
                     for (graph, method), rows in groups.items()], left=2)
    return "\n".join(lines) + "\n"


@block("ff-conv")
def ff_conv(results: Path, prefix: str) -> str:
    """``ff_conv_mnist.json``: conv Forward-Forward, layer-local and block-local, against backprop on the same CNN."""
    res = _load(results, "ff_conv_mnist.json", FF_CONV)
    s = res["setup"]
    lines = [f"Command: `{s['command']}`  ",
             f"{s['data']}: first {s['train_examples']:,} training images, {s['test_examples']:,} test images, "
             f"{s['epochs']} epochs, Adam lr {s['lr']:g}, batch {s['batch_size']}, seed {s['seed']}, same initial "
             f"weights and batches for every row; {s['threads']} thread ({CPU}; {SHARED}).", ""]
    lines += _table(["network", "rule", "test accuracy (%)", "training CPU time per epoch / backprop"],
                    [[r["network"], r["rule"], f"{100 * r['test_acc']:.2f}", f"{r['cpu_ratio_to_backprop']:.2f} ×"]
                     for r in res["rows"]], left=2)
    return "\n".join(lines) + "\n"


@block("forward-gradient-rank1")
def forward_gradient_rank1(results: Path, prefix: str) -> str:
    """``forward_gradient_rank1_digits.json``: ``forward_gradient`` with i.i.d. and rank-one tangents over seeds."""
    from .forward_only import lowrank_accuracy_markdown

    return lowrank_accuracy_markdown(_load(results, "forward_gradient_rank1_digits.json", RANK1))


@block("lenet-timing")
def lenet_timing(results: Path, prefix: str) -> str:
    """``biotorch_lenet_timing.json``: each feedback-alignment rule's step time over backprop's on BioTorch's LeNet."""
    res = _load(results, "biotorch_lenet_timing.json", LENET_TIMING)
    s = res["setup"]
    lines = [f"Command: `{s['command']}`  ",
             f"{s['model']}, SGD, batch {s['batch_size']}; median over {s['rounds']} interleaved rounds of "
             f"{s['steps_per_round']} steps after a warm-up round, {s['threads']} thread ("
             + (f"{CPU}; " if s.get("clock") == "cpu" else "wall-clock time; ") + f"{SHARED}).", ""]
    lines += _table(["row", "rule and options", "step time / backprop's"],
                    [[key, f"`{res['rules'][key]}`" + "".join(f", `{k}={v}`" for k, v in res["options"][key].items()),
                      f"{ratio:.2f} ×"] for key, ratio in res["ratios"].items() if key in res["options"]], left=2)
    return "\n".join(lines) + "\n"


@block("federated")
def federated(results: Path, prefix: str) -> str:
    """``federated.json``: BAFFLE against FedAvg with backprop, final test accuracy and bytes per client per round."""
    res = _load(results, "federated.json", FEDERATED)
    c, s = res["config"], res["summary"]
    names = {"baffle": f"BAFFLE (`{c['rule']}`, K = {c['directions']}, forward passes only)",
             "fedavg": "FedAvg with backprop"}
    lines = [f"Command: `{res['command']}` (stored by `{res['script']}`)  ",
             f"{c['data']}, MLP hidden {c['hidden']}, {c['clients']} clients on Dirichlet(α = {c['alpha']:g}) "
             f"label shards, seed {c['seed']}.", ""]
    lines += _table(["method", "test accuracy after the last round (%)", "rounds", "uplink bytes / client / round",
                     "downlink bytes / client / round"],
                    [[names.get(method, method), f"{100 * r['final_test_acc']:.2f}", str(r["rounds"]),
                      f"{r['uplink_bytes_per_client_round']:,.0f}", f"{r['downlink_bytes_per_client_round']:,}"]
                     for method, r in s.items()])
    return "\n".join(lines) + "\n"


@block("replay-bytes")
def replay_bytes(results: Path, prefix: str) -> str:
    """``replay_bytes.json``: a replay log's bytes per step against the weights', and the bit-for-bit check."""
    r = _load(results, "replay_bytes.json", REPLAY)
    hidden = "-".join(str(h) for h in r["hidden"])
    same = "rebuild" if r["replay_bit_identical"] else "do not rebuild"
    return (f"A replay log of `zo_spsa` with {r['directions']} directions per step costs "
            f"{r['record_bytes_per_step']:,} bytes per step (plus a {r['header_bytes']:,}-byte header) against "
            f"{r['weight_bytes']:,} bytes of float32 weights (MLP 64-{hidden}-10, {r['parameters']:,} weights), and "
            f"its {r['steps']} steps {same} the run's final weights bit for bit (`forwardlearn replay --check`). "
            f"Command: `{r['command']}`.\n")


@block("harsanyi-cost")
def harsanyi_cost(results: Path, prefix: str) -> str:
    """``harsanyi_cost.json``: HarsanyiNet's one-forward Shapley values against brute force and permutation
    sampling (RMSE relative to mean |phi|, time over one forward in the same run)."""
    res = _load(results, "harsanyi_cost.json", HARSANYI_COST)
    lines = [f"Command: `{res['command']}`  ",
             f"{res['cost'][0]['inputs']} test inputs per data set, 1 thread ({SHARED}); the reference is "
             "HarsanyiNet's own attribution in float64"
             + ("" if res["kernel_shap"] else "; Kernel SHAP was not run (the `shap` package is not installed)")
             + ".", ""]
    for c in res["cost"]:
        bf = c.get("brute_force")
        exact = (f" Brute-force enumeration over {bf['coalitions']:,} coalitions agrees to "
                 f"{bf['max_abs_diff_float64']:.1e} in float64 and takes {bf['vs_one_forward']:.2g} × one forward."
                 if bf else "")
        lines += [f"- {c['data']} ({c['variables']} input variables, HarsanyiNet test accuracy {_pct(c['test_acc'])}): "
                  f"one forward's float32 Shapley values are off by RMSE {c['float32_rmse']:.1e} (mean |φ| "
                  f"{c['mean_abs_phi']:.3f}).{exact}"]
    lines += [""] + _table(["data", "estimator", "budget", "model evaluations", "RMSE / mean abs φ",
                            "wall-clock time / one forward"],
                           [[c["data"], name, str(p["budget"]), f"{p['evaluations']:,}", f"{100 * p['rmse_rel']:.1f} %",
                             f"{p['vs_one_forward']:,.0f} ×"]
                            for c in res["cost"] for name, points in c["estimators"].items() for p in points], left=2)
    return "\n".join(lines) + "\n"


@block("harsanyi-accuracy")
def harsanyi_accuracy(results: Path, prefix: str) -> str:
    """``harsanyi_accuracy.json``: HarsanyiNet against an ordinary network of the same depth and width."""
    res = _load(results, "harsanyi_accuracy.json", HARSANYI_ACCURACY)
    rows = res["accuracy"]
    lines = [f"Command: `{res['command']}`  ",
             f"Both trained with backprop and the same Adam settings, seeds 0–{len(rows[0]['test_acc']) - 1}; "
             f"training time over the ordinary network's in the same run ({SHARED}).", ""]
    lines += _table(["data", "model", "parameters", "test accuracy, mean ± sd (%)",
                     "wall-clock training time / ordinary"],
                    [[r["data"], r["model"] if r["model"] == "HarsanyiNet" else f"ordinary {r['form'].upper()}",
                      f"{r['parameters']:,}", _mean_sd(r["test_acc"]), f"{r['time_vs_ordinary']:.1f} ×"]
                     for r in rows], left=2)
    return "\n".join(lines) + "\n"
