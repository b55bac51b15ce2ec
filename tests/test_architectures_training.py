"""Every rule that is not bound to one architecture trains the residual CNN and the transformer on digits.

Each test is one cell of ``benchmarks/architectures.py`` (``forwardlearn.bench.architectures``: 3 epochs over
the 1437 training digits, batch 64, the rule's benchmark settings) for seed 0. ``MEASURED`` holds the test
accuracies that benchmark measured for seeds 0, 1, 2 (``benchmarks/results/architectures.json``); a test
runs seed 0 and passes at ``chance + (measured seed 0 - chance) / 2``: half its measured margin over chance
(10 %), and at least 15 %, so numerical noise from another machine or thread count does not fail it while a
rule that stopped learning does. Margins differ a lot by rule (the table shows them); the weakest are
``activity_forward_gradient``, ``ulr`` and ``pepita`` on the residual CNN (lowest seeds 0.18-0.20, at chance
before their estimates became per-example under batch norm, the output unit got its exact gradient, the stem's
conv + batch norm became one perturbed unit and pepita's convolution updates a mean over positions). ``fa`` on the
transformer had two seeds at 0.15 at its default learning rate (1e-3); the table runs it at 1e-2.
Cells measured at chance on every seed are ``xfail(strict=True)`` with the measurement: an open gap, not a hidden one.
Runs above ~10 s are ``slow``; the fast stand-in for those checks that 20 steps on one batch of 64 lower
that batch's loss.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import forwardlearn as fl
from forwardlearn.bench.architectures import run_cell, setting
from forwardlearn.training.optim import make_optimizer

CHANCE = 0.10
#: (rule, model): test accuracy of seeds 0, 1, 2 measured by benchmarks/architectures.py
MEASURED: dict[tuple[str, str], tuple[float, float, float]] = {
    ("backprop", "rescnn"): (0.803, 0.800, 0.742),
    ("fa", "rescnn"): (0.686, 0.428, 0.747),
    ("sign_symmetry", "rescnn"): (0.639, 0.597, 0.525),
    ("pfa", "rescnn"): (0.644, 0.592, 0.700),
    ("dfa", "rescnn"): (0.653, 0.733, 0.497),
    ("zo_spsa", "rescnn"): (0.336, 0.408, 0.344),
    ("forward_gradient", "rescnn"): (0.278, 0.211, 0.311),
    ("local_forward_gradient", "rescnn"): (0.375, 0.406, 0.389),
    ("activity_forward_gradient", "rescnn"): (0.197, 0.183, 0.186),
    ("ulr", "rescnn"): (0.200, 0.228, 0.311),
    ("pepita", "rescnn"): (0.183, 0.222, 0.192),
    ("backprop", "transformer"): (0.556, 0.606, 0.519),
    ("fa", "transformer"): (0.586, 0.692, 0.611),
    ("sign_symmetry", "transformer"): (0.361, 0.433, 0.422),
    ("pfa", "transformer"): (0.372, 0.489, 0.372),
    ("dfa", "transformer"): (0.356, 0.375, 0.428),
    ("zo_spsa", "transformer"): (0.325, 0.331, 0.408),
    ("forward_gradient", "transformer"): (0.228, 0.311, 0.306),
    ("activity_forward_gradient", "transformer"): (0.239, 0.292, 0.297),
    ("local_forward_gradient", "transformer"): (0.369, 0.436, 0.342),
    ("ulr", "transformer"): (0.361, 0.292, 0.350),
    ("pepita", "transformer"): (0.233, 0.414, 0.364),
}
#: cells whose one seed takes well over 10 s on a shared 2-core machine
SLOW = {("zo_spsa", "rescnn"), ("forward_gradient", "rescnn"), ("zo_spsa", "transformer"), ("ulr", "rescnn"),
        ("ulr", "transformer"), ("activity_forward_gradient", "rescnn"), ("local_forward_gradient", "rescnn")}


def _threshold(accs: tuple[float, ...]) -> float:
    return CHANCE + max((accs[0] - CHANCE) / 2, 0.05)


def _cases() -> list:
    out = []
    for (rule, model), accs in MEASURED.items():
        marks = [pytest.mark.slow] if (rule, model) in SLOW else []
        if max(accs) < CHANCE + 0.05:
            marks.append(pytest.mark.xfail(strict=True, reason=f"measured at chance: {accs}"))
        out.append(pytest.param(rule, model, accs, marks=marks, id=f"{rule}-{model}"))
    return out


@pytest.mark.parametrize(("rule", "model", "accs"), _cases())
def test_rule_trains_the_model_above_chance(rule: str, model: str, accs: tuple[float, ...], one_thread) -> None:
    result = run_cell(rule, model, seed=0)
    assert "error" not in result, result
    assert result["test_acc"] >= _threshold(accs), (rule, model, result["test_acc"], accs)


#: (rule, model): batch loss before and after 20 steps on one batch of 64, seeds 0, 1, 2 (measured)
ONE_BATCH: dict[tuple[str, str], tuple[tuple[float, float], ...]] = {
    ("zo_spsa", "transformer"): ((2.494, 2.180), (2.398, 2.098), (2.391, 2.083)),
    ("ulr", "transformer"): ((2.494, 2.165), (2.398, 2.147), (2.391, 2.099)),
    ("forward_gradient", "rescnn"): ((2.332, 2.190), (2.329, 2.184), (2.312, 2.180)),
    ("activity_forward_gradient", "rescnn"): ((2.332, 2.227), (2.329, 2.247), (2.312, 2.246)),
    ("ulr", "rescnn"): ((2.332, 2.223), (2.329, 2.227), (2.312, 2.225)),
}


@pytest.mark.parametrize(("rule", "model"), list(ONE_BATCH))
def test_twenty_steps_lower_the_loss_of_one_batch(rule: str, model: str, digits, one_thread) -> None:
    (X, y), _ = digits
    x, t = X[:64], y[:64]
    s = setting(rule)
    torch.manual_seed(0)
    net = fl.models.build(model, (1, 8, 8), 10)
    r = fl.get_rule(rule, seed=0, **s["options"])
    net = r.attach(net)
    opt = make_optimizer(s["optimizer"], [p for p in net.parameters() if p.requires_grad], s["lr"])

    def loss() -> float:
        net.eval()
        with torch.no_grad():
            value = float(F.cross_entropy(r.predict(net, x), t))
        net.train()
        return value

    before = loss()
    for _ in range(20):
        opt.zero_grad()
        r.grads(net, x, t)
        opt.step()
    drop = min(b - a for b, a in ONE_BATCH[(rule, model)])
    # the smallest measured drop over 3 seeds, halved: a rule whose estimate stopped pointing downhill fails
    assert before - loss() >= drop / 2, (rule, model, before, ONE_BATCH[(rule, model)])
