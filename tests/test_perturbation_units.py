"""Where activity_forward_gradient and ulr perturb a model with batch norm, and what the output unit gets.

- a ``Linear``/``Conv2d`` and the normalisation after it in one ``nn.Sequential`` are one unit (perturbed after the
  normalisation), so the residual CNN's units are its stem, its block and its head;
- the unit that produces the model's output gets the exact gradient of the loss (no estimate), and its own
  perturbation is kept out of every other unit's estimate;
- under batch norm in training mode every example keeps its own directional derivative / loss (no batch sum).

Together these take the two estimators' alignment with backprop on the residual CNN from zero to clearly positive
(the last test; the numbers are measured, see there).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import forwardlearn as fl
from forwardlearn.forward_only.local import output_gradient, perturbed_units

IMAGE = (1, 8, 8)
RULES = ["activity_forward_gradient", "ulr"]


def _batch(n: int = 64, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *IMAGE, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_a_layer_and_its_normalisation_are_one_unit() -> None:
    rescnn = fl.models.build("rescnn", IMAGE, 10)
    assert [n for n, _ in perturbed_units(rescnn, "x")] == ["stem", "blocks.0", "head"]
    assert [n for n, _ in perturbed_units(rescnn, "x", ["stem.0", "blocks.0"])] == ["stem.0", "stem.1", "blocks.0",
                                                                                   "head"]  # as chosen
    nested = nn.Sequential(nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU()), nn.Linear(5, 3))
    assert [n for n, _ in perturbed_units(nested, "x")] == ["0", "1"]
    flat = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))  # the model itself: kept apart
    assert [n for n, _ in perturbed_units(flat, "x")] == ["0", "1", "3"]
    two = nn.Sequential(nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 5)), nn.Linear(5, 3))  # two layers: not grouped
    assert [n for n, _ in perturbed_units(two, "x")] == ["0.0", "0.1", "1"]


@pytest.mark.parametrize("loss", [F.cross_entropy, lambda y, t: F.mse_loss(y, F.one_hot(t, 10).float())])
def test_output_gradient_is_the_derivative_of_the_loss(loss) -> None:
    y, t = torch.randn(6, 10), torch.randint(0, 10, (6,))
    yy = y.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(loss(yy, t), yy)
    torch.testing.assert_close(output_gradient(loss, y, t), want)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("model", ["rescnn", "mlp"])
def test_the_output_unit_gets_the_exact_gradient(rule: str, model: str) -> None:
    x, t = _batch(32)
    net = fl.models.build(model, IMAGE, 10, [16] if model == "mlp" else None)
    net.eval()  # running statistics: the reference gradient below is then the same function's
    head = net.head if model == "rescnn" else net[-1]
    F.cross_entropy(net(x), t).backward()
    want = head.weight.grad.clone()
    net.zero_grad(set_to_none=True)
    options = {"sigma": 1e-5} if rule == "ulr" else {}  # ulr's head sees its input's noise: tiny noise, tiny change
    fl.get_rule(rule, seed=0, directions=4, **options).grads(net, x, t)
    # ulr: the mean over noisy copies of the exact gradient, a relative change of ~1e-5 at sigma 1e-5
    torch.testing.assert_close(head.weight.grad, want, rtol=1e-3, atol=1e-6)


def _alignment(rule: str, options: dict, draws: int, seed: int) -> float:
    """Cosine between backprop's gradient of every non-head parameter of the residual CNN (batch norm in training
    mode) and the mean of ``draws`` estimates."""
    x, t = _batch()
    torch.manual_seed(seed)
    net = fl.models.build("rescnn", IMAGE, 10)
    state = copy.deepcopy(net.state_dict())
    F.cross_entropy(net(x), t).backward()
    names = [n for n, _ in net.named_parameters() if not n.startswith("head")]
    true = torch.cat([net.get_parameter(n).grad.flatten() for n in names])
    net.load_state_dict(state)
    net.zero_grad(set_to_none=True)
    r = fl.get_rule(rule, seed=seed, **options)
    for _ in range(draws):
        r.grads(net, x, t)
        net.load_state_dict(state)  # the same weights and running statistics for every draw
    return float(F.cosine_similarity(torch.cat([net.get_parameter(n).grad.flatten() for n in names]), true, 0))


@pytest.mark.parametrize(("rule", "options", "least"), [
    # measured at 20 draws, seeds 0-2: before these fixes -0.013, -0.035, 0.006 (afg) and 0.025, -0.020, -0.031
    # (ulr); after them 0.064, 0.092, 0.049 and 0.221, 0.215, 0.198. Thresholds: about half the smallest.
    ("activity_forward_gradient", {"directions": 1}, 0.025),
    ("ulr", {"directions": 8}, 0.1),
])
def test_estimates_on_the_residual_cnn_point_downhill(rule: str, options: dict, least: float, one_thread) -> None:
    assert _alignment(rule, options, 20, seed=0) >= least
