"""ForwardGNN against a backprop-trained GCN on the same graph: test accuracy and time per epoch.

Graphs: contextual stochastic block models from ``fl.data.graphs.csbm`` (bundled, seeded) and, with
``--planetoid-root DIR``, Cora / CiteSeer / PubMed in the Planetoid format. Every method trains
full-batch; the reported test accuracy is taken at the epoch of best validation accuracy (checked every
``--eval-every`` epochs), the time is training seconds per epoch (evaluation excluded) and its ratio to
the backprop GCN on the same graph in the same run (wall-clock and process CPU time)::

    OMP_NUM_THREADS=1 python benchmarks/forward_gnn.py
    OMP_NUM_THREADS=1 python benchmarks/forward_gnn.py --planetoid-root ~/data/planetoid --graphs cora
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import forwardlearn as fl
from forwardlearn.data.graphs import Graph, csbm, load_planetoid
from forwardlearn.training import train_graph

CSBM = {
    "csbm": {},  # 1000 nodes, 4 classes, homophily 0.8, feature signal 1
    "csbm-hard": {"homophily": 0.6, "feature_signal": 0.7},
}


def methods(hidden: int, kind: str) -> list[tuple[str, str, dict, dict]]:
    """``(label, rule, rule options, training options)``; the backprop GCN is the standard 2-layer one."""
    return [
        (f"backprop {kind} [{hidden}]+head", "backprop", {}, {"lr": 0.01, "weight_decay": 5e-4, "epochs": 200}),
        (f"forward_gnn sf {kind}", "forward_gnn", {"variant": "sf"}, {"lr": 0.01, "epochs": 200}),
        (f"forward_gnn sf top-down {kind}", "forward_gnn", {"variant": "sf", "top_down": True},
         {"lr": 0.01, "epochs": 200}),
        (f"forward_gnn ff {kind}", "forward_gnn", {"variant": "ff"}, {"lr": 0.003, "epochs": 300}),
    ]


def run(graph: Graph, label: str, rule_name: str, opts: dict, train_opts: dict, hidden: int, layers: int,
        kind: str, seed: int, eval_every: int) -> dict:
    torch.manual_seed(seed)
    rule = fl.get_rule(rule_name, seed=seed, **opts)
    if rule_name == "backprop":
        model = fl.models.gnn(graph.num_features, [hidden] * (layers - 1), graph.num_classes, kind=kind, dropout=0.5)
    else:
        model = rule.build_model(graph, [hidden] * layers, kind=kind)
    t0 = time.perf_counter()
    hist = train_graph(model, rule, graph, seed=seed, eval_every=eval_every, **train_opts)
    wall = time.perf_counter() - t0
    evals = [r for r in hist.epochs if "val_acc" in r]
    best = max(evals, key=lambda r: (r["val_acc"], -r["epoch"]))
    return {"graph": graph.name, "method": label, "test_acc": best["test_acc"], "val_acc": best["val_acc"],
            "best_epoch": best["epoch"], "final_test_acc": hist.final["test_acc"],
            "seconds_per_epoch": sum(hist.column("seconds")) / len(hist),
            "cpu_seconds_per_epoch": sum(hist.column("cpu_seconds")) / len(hist), "wall": wall}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--graphs", default="csbm,csbm-hard", help="csbm, csbm-hard, cora, citeseer, pubmed")
    p.add_argument("--planetoid-root", default=None)
    p.add_argument("--kinds", default="gcn", help="gcn,sage")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2, help="graph convolutions (backprop: the last is the head)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (graph and model)")
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    print(f"{'graph':<16} {'method':<32} {'test acc':>8} {'(epoch)':>7} {'s/epoch':>8} {'x backprop':>10} "
          f"{'CPU x backprop':>14}")
    for gname in args.graphs.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            if gname in CSBM:
                graph = csbm(seed=seed, **CSBM[gname])
                graph.name = f"{gname}/{seed}"
            else:
                if args.planetoid_root is None:
                    print(f"{gname}: needs --planetoid-root", file=sys.stderr)
                    return 2
                graph = load_planetoid(gname, args.planetoid_root)
            for kind in args.kinds.split(","):
                base = cpu_base = None
                for label, rule_name, opts, train_opts in methods(args.hidden, kind):
                    r = run(graph, label, rule_name, opts, train_opts, args.hidden, args.layers, kind, seed,
                            args.eval_every)
                    base = r["seconds_per_epoch"] if rule_name == "backprop" else base
                    cpu_base = r["cpu_seconds_per_epoch"] if rule_name == "backprop" else cpu_base
                    r["ratio_to_backprop"] = r["seconds_per_epoch"] / base
                    r["cpu_ratio_to_backprop"] = r["cpu_seconds_per_epoch"] / cpu_base
                    rows.append(r)
                    print(f"{graph.name:<16} {label:<32} {r['test_acc']:>8.4f} {r['best_epoch']:>7} "
                          f"{r['seconds_per_epoch']:>8.4f} {r['ratio_to_backprop']:>10.2f} "
                          f"{r['cpu_ratio_to_backprop']:>14.2f}", flush=True)
    if args.json:
        command = " ".join(["OMP_NUM_THREADS=1 python benchmarks/forward_gnn.py", *(argv if argv is not None
                                                                               else sys.argv[1:])])
        setup = {"command": command, "hidden": args.hidden, "layers": args.layers, "kinds": args.kinds,
                 "seeds": args.seeds, "eval_every": args.eval_every, "threads": args.threads,
                 "csbm": {g: CSBM[g] for g in args.graphs.split(",") if g in CSBM}}
        with open(args.json, "w") as f:
            json.dump({"setup": setup, "rows": rows}, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
