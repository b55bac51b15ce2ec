"""Accuracy smoke, run in CI: every registered rule learns on bundled data in a reduced budget.

Each rule trains its own default model with its own defaults (optimizer, learning rate, batch size) for
``EPOCHS`` epochs on digits (graph rules: ``GRAPH_EPOCHS`` full-graph epochs on a generated CSBM graph), seed 0,
one CPU thread. The thresholds come from ``MEASURED``: the final test accuracy of seeds 0, 1 and 2, printed by
``OMP_NUM_THREADS=1 PYTHONPATH=src python tests/test_accuracy_smoke.py``; the threshold is the lowest seed minus
0.08, rounded down to 0.05 (room for other torch builds' rounding, while a rule that stops learning, at 0.10
chance, fails). A rule without a row fails: measure it and add one.
"""

from __future__ import annotations

import math
import sys
import time

import pytest
import torch

import forwardlearn as fl
from forwardlearn.rules import rule_class

EPOCHS = 4
#: rules that need more than EPOCHS in the smoke (none since Forward-Forward calibrates its first step)
OWN_EPOCHS: dict[str, int] = {}
GRAPH_EPOCHS = 20
SEEDS = (0, 1, 2)

# final test accuracy for seeds 0, 1, 2 (digits: 360 test images; graph: the CSBM's test nodes).
# Shared machine, 1 thread, torch CPU; the whole smoke took about 40 s of training there.
MEASURED: dict[str, tuple[float, float, float]] = {
    "activity_forward_gradient": (0.8583, 0.8194, 0.7806),  # mean 0.819
    "backprop": (0.9389, 0.9222, 0.9389),  # mean 0.933
    "cff": (0.9583, 0.9528, 0.95),  # mean 0.954
    "dfa": (0.8972, 0.8778, 0.8917),  # mean 0.889
    "ep": (0.925, 0.9194, 0.9167),  # mean 0.920
    "fa": (0.8833, 0.8833, 0.8944),  # mean 0.887
    "ff": (0.9528, 0.9361, 0.9556),  # mean 0.948
    "ff_conv": (0.8972, 0.8806, 0.7944),  # mean 0.857
    "forward_gnn": (0.8687, 0.8687, 0.8344),  # mean 0.857 (CSBM, chance 0.25)
    "forward_gradient": (0.7361, 0.7472, 0.6972),  # mean 0.727
    "local_forward_gradient": (0.9139, 0.9, 0.9083),  # mean 0.907
    "model_free_ff": (0.9167, 0.9028, 0.9056),  # mean 0.908
    "pepita": (0.95, 0.9444, 0.9472),  # mean 0.947
    "pfa": (0.9417, 0.9417, 0.9472),  # mean 0.944
    "sign_symmetry": (0.9111, 0.8944, 0.9056),  # mean 0.904
    "ulr": (0.9111, 0.8778, 0.8722),  # mean 0.887
    "zo_spsa": (0.7306, 0.75, 0.6889),  # mean 0.723
}


def threshold(name: str) -> float:
    return math.floor((min(MEASURED[name]) - 0.08) * 20) / 20


def final_accuracy(name: str, seed: int) -> float:
    """Train rule ``name`` with its defaults in the smoke's budget; return the final test accuracy."""
    cls = rule_class(name)
    d = cls.defaults
    torch.manual_seed(seed)
    rule = fl.get_rule(name, seed=seed)
    if cls.data_kind == "graph":
        from forwardlearn.data.graphs import csbm
        from forwardlearn.training.graph import train_graph

        graph = csbm(nodes=600, classes=4, features=16, avg_degree=8, homophily=0.8, feature_signal=1.0, seed=seed)
        model = cls.default_model((graph.num_features,), graph.num_classes)  # attached by train_graph
        hist = train_graph(model, rule, graph, optimizer=d["optimizer"], lr=d["lr"], epochs=GRAPH_EPOCHS, seed=seed,
                           eval_every=GRAPH_EPOCHS)
        return hist.final["test_acc"]
    assert cls.data_kind == "tensor", f"{name}: no smoke setup for {cls.data_kind!r} data"
    spec = fl.data.info("digits")
    train, test = fl.data.load("digits", "train"), fl.data.load("digits", "test")
    model = cls.default_model(spec.shape, spec.classes)  # attached by fl.train
    hist = fl.train(model, rule, train, test, optimizer=d["optimizer"], lr=d["lr"], epochs=OWN_EPOCHS.get(name, EPOCHS),
                    batch_size=d["batch_size"], seed=seed, progress=False, eval_train=False)
    return hist.final["test_acc"]


def test_every_rule_has_a_measured_row() -> None:
    missing = set(fl.available_rules()) - set(MEASURED)
    assert not missing, f"no measured smoke accuracy for {sorted(missing)}: run this file as a script and add rows"


@pytest.mark.parametrize("name", fl.available_rules())
def test_rule_learns_in_a_reduced_budget(name: str, one_thread) -> None:
    if name not in MEASURED:
        pytest.fail(f"{name}: no measured row (see test_every_rule_has_a_measured_row)")
    acc = final_accuracy(name, 0)
    assert acc >= threshold(name), f"{name}: test accuracy {acc:.4f} < {threshold(name):.2f} ({MEASURED[name]})"


if __name__ == "__main__":  # print the MEASURED table (seeds 0, 1, 2) and the time it took
    torch.set_num_threads(1)
    names = sys.argv[1:] or fl.available_rules()
    start = time.perf_counter()
    for rule_name in names:
        accs = tuple(round(final_accuracy(rule_name, s), 4) for s in SEEDS)
        print(f'    "{rule_name}": {accs},  # mean {sum(accs) / len(accs):.3f}', flush=True)
    print(f"# {time.perf_counter() - start:.0f} s for {len(SEEDS)} seeds", file=sys.stderr)
