"""The forward-only parts on their own: samplers, estimators, variance reduction, applicators, and the four rules
as compositions of them."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import forwardlearn as fl
from forwardlearn.forward_only import (
    ActivityForwardMode,
    Evaluator,
    FiniteDifference,
    ForwardMode,
    FusedSGD,
    ScoreFunction,
    ToGrad,
    UnitNoise,
    antithetic,
    chain,
    draw_seeds,
    leave_one_out,
    local_to_grad,
    sampler,
)
from forwardlearn.forward_only import variance as vr
from forwardlearn.forward_only.local import perturbed_units

SAMPLERS = [("rademacher", "full"), ("gaussian", "full"), ("rademacher", "lowrank"), ("gaussian", "lowrank"),
            ("rademacher", "rank1"), ("gaussian", "rank1")]


def _linear(n=8):
    """A float64 linear model 3 -> 2 (8 parameters) under the mean squared error: its loss is quadratic."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 2)).double()
    return model, torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randn(n, 2, generator=g,
                                                                                   dtype=torch.float64)


def _true_grad(model, x, y, loss=F.mse_loss):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss(model(x), y), list(model.parameters()))])


def _flat_grad(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _mlp():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (12,), generator=g)
    torch.manual_seed(2)
    return fl.models.mlp(4, [5], 3, activation="tanh").double(), x, y


# --- samplers ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dist,tangent", SAMPLERS)
def test_sampler_second_moment_is_the_identity(dist, tangent):
    """E[v v^T] = I for every sampler (what the unbiasedness of every estimator rests on)."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))  # 26 parameters, two low-rank layers
    s = sampler(dist, tangent, rank=2 if tangent == "lowrank" else 1)
    frame = s.frame(model)
    n = 4000
    z = s.dense(frame, draw_seeds(torch.Generator().manual_seed(0), n))
    v = torch.cat([t.reshape(n, -1) for t in z], 1).double()
    m = v.T @ v / n
    # an entry of the empirical second moment has standard deviation <= sqrt(2 / 4000) = 0.022 (Gaussian
    # diagonal; products of +-1 or of two Gaussians: 0.016); the largest of 26^2 entries stays below 5 of those
    assert float((m - torch.eye(v.shape[1], dtype=m.dtype)).abs().max()) < 0.11
    assert float(v.mean(0).abs().max()) < 0.08  # E[v] = 0: mean of 4000 unit-variance draws, sd 0.016


@pytest.mark.parametrize("dist,tangent", SAMPLERS)
def test_sampler_regenerates_the_same_direction_everywhere(dist, tangent):
    """A seed gives one direction: formed densely, written by add_ (with and without overwrite) and, for forward
    mode, as per-parameter tangents."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    s = sampler(dist, tangent)
    frame = s.frame(model)
    dense = [t[0] for t in s.dense(frame, [12345])]
    written = [torch.full_like(p, 7.0) for p in frame.params]
    s.add_(frame, written, [(12345, 1.0)], overwrite=[True] * len(written))
    added = [torch.zeros_like(p) for p in frame.params]
    s.add_(frame, added, [(12345, 2.0), (999, 0.0)])
    for d, w, a in zip(dense, written, added):
        assert torch.equal(d, w)
        torch.testing.assert_close(a, 2 * d, rtol=0, atol=0)
    with torch.no_grad():  # in place: from zero weights, +v on the parameters the sampler writes (lowrank: the rest)
        for p in frame.params:
            p.zero_()
        s.perturb_(frame, 12345, 1.0)
        for i, (p, d) in enumerate(zip(frame.params, dense)):
            assert torch.equal(p, d if i in frame.inplace else torch.zeros_like(p))
        assert (tangent == "lowrank") == (len(frame.inplace) < len(frame.params))
        # the rest inside the layers' forward: the model then computes at weights v (lowrank: U (V^T x) instead of
        # (U V^T) x, equal up to float64 rounding)
        x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        with s.inside(frame, 12345, 1.0):
            out = model(x)
        at_v = torch.func.functional_call(model, {n: d for (n, _), d in zip(model.named_parameters(), dense)}, (x,))
        torch.testing.assert_close(out, at_v, rtol=1e-12, atol=1e-12)
    if tangent == "lowrank":
        with pytest.raises(ValueError, match="no forward-mode tangent"):
            s.tangent_of(frame, 12345)
    else:
        of = s.tangent_of(frame, 12345)
        for i, (p, d) in enumerate(zip(frame.params, dense)):
            t = of(i, p)
            assert torch.equal(t.full(p) if hasattr(t, "full") else t, d)


def test_sampler_rejects_unknown_kinds():
    with pytest.raises(ValueError, match="tangent must be one of full, lowrank, rank1"):
        sampler("rademacher", "rank3")
    with pytest.raises(ValueError, match="distribution"):
        sampler("uniform")


# --- estimators: unbiased on a linear model --------------------------------------------------------------------


def _weight_estimate(estimator, tangent, k=2000, seed=0):
    model, x, y = _linear()
    s = sampler("rademacher", tangent)
    frame = s.frame(model)
    seeds = draw_seeds(torch.Generator().manual_seed(seed), k)
    scalars = estimator.scalars(Evaluator(F.mse_loss), model, x, y, s, frame, seeds, batched_limit=2**22)[0]
    ToGrad().apply(s, frame, seeds, scalars)
    return _rel(_flat_grad(model), _true_grad(model, x, y))


@pytest.mark.parametrize("tangent", ["full", "lowrank", "rank1"])
@pytest.mark.parametrize("difference", ["central", "forward"])
def test_finite_difference_mean_is_the_gradient(tangent, difference):
    err = _weight_estimate(FiniteDifference(1e-4, difference), tangent)
    # 8 parameters, 2000 Rademacher directions: relative error^2 of (grad . v) v about (d - 1) / K = 0.0035
    # (rms error 0.059); measured 0.046-0.097 over seeds 0-3 and the three samplers (the forward difference's
    # bias O(eps) = 1e-4 does not show). 0.2 is over 3 times the rms; a dropped or flipped layer gives >= 0.5
    assert err < 0.2


@pytest.mark.parametrize("tangent", ["full", "rank1"])
def test_forward_mode_mean_is_the_gradient(tangent):
    err = _weight_estimate(ForwardMode(), tangent)
    assert err < 0.2  # the same directions and scalars as the central difference above (measured 0.046-0.097)


def _activity_estimate(estimator, k, seed=0, reduce=None):
    model, x, y = _linear()
    # the identity as a new tensor: the unit's output is then not the model's output, which would get its exact
    # gradient instead of an estimate (tests/test_perturbation_units.py)
    model.append(nn.Softshrink(0.0))
    units = perturbed_units(model, "test")
    noise = UnitNoise(torch.Generator().manual_seed(seed), k, pairs=reduce is not None and reduce.pairs)
    if isinstance(estimator, ScoreFunction):
        local_to_grad(estimator.estimate(Evaluator(F.mse_loss), model, x, y, units, noise))
    else:
        for _ in range(k):
            local_to_grad(estimator.estimate(Evaluator(F.mse_loss), model, x, y, units, noise, k, "test"))
    return _flat_grad(model), _true_grad(model, x, y)


def test_activity_forward_mode_mean_is_the_gradient():
    est, g = _activity_estimate(ActivityForwardMode(), 500)
    # 500 passes: measured relative errors 0.038-0.092 over seeds 0-3 (the noise lives on 2 outputs per
    # example, far fewer dimensions than the weights'); 0.25 is well above that and well below a biased 1.0
    assert _rel(est, g) < 0.25


@pytest.mark.parametrize("reduce", [vr.none(), antithetic(), leave_one_out()], ids=["none", "antithetic", "loo"])
def test_score_function_mean_is_the_gradient(reduce):
    """Under a quadratic loss the Gaussian-smoothed loss has the exact gradient: the score function estimates it."""
    est, g = _activity_estimate(ScoreFunction(0.1, reduce), 20000, reduce=reduce)
    # expected rms relative errors at 20000 copies, scaled from the 64-copy runs of the next test: 0.092 (none),
    # 0.014 (antithetic), 0.0095 (leave-one-out); measured 0.041, 0.016, 0.012. Bounds over 3 times the rms
    assert _rel(est, g) < (0.3 if type(reduce) is vr.Reduction else 0.05)


# --- variance reduction -----------------------------------------------------------------------------------------


def test_antithetic_and_baseline_reduce_the_variance_measurably():
    errs = {}
    for name, reduce in {"none": vr.none(), "antithetic": antithetic(), "loo": leave_one_out()}.items():
        e = [_rel(*_activity_estimate(ScoreFunction(0.1, reduce), 64, seed=s, reduce=reduce)) for s in range(8)]
        errs[name] = sum(x * x for x in e) / len(e)
    # mean squared relative error over 8 seeds at 64 copies; measured none 2.66, antithetic 0.059, loo 0.028:
    # the loss's mean is large against sigma times its slope, and only the plain estimator multiplies it in
    assert errs["antithetic"] < errs["none"] / 10
    assert errs["loo"] < errs["none"] / 10


def test_reductions_compose_and_refuse_a_biased_chain():
    with pytest.raises(ValueError, match="biased"):
        chain(antithetic(), leave_one_out())
    with pytest.raises(ValueError, match="even number"):
        antithetic().check(3)
    with pytest.raises(ValueError, match="directions >= 2"):
        leave_one_out().check(1)
    losses = torch.tensor([[1.0, 2.0], [3.0, 6.0], [5.0, 1.0]])
    assert torch.equal(chain(leave_one_out()).centre(losses), leave_one_out().centre(losses))
    assert torch.equal(chain().centre(losses), losses) and chain(antithetic()).pairs
    # leave-one-out: each copy minus the mean of the others
    assert torch.equal(leave_one_out().centre(losses)[0], torch.tensor([1.0 - 4.0, 2.0 - 3.5]))


# --- the rules are compositions of the parts ----------------------------------------------------------------------


@pytest.mark.parametrize("opts", [{}, {"perturbation": "lowrank", "difference": "forward"},
                                  {"distribution": "gaussian", "directions": 2}])
@pytest.mark.parametrize("limit", [0, 2**22], ids=["in-place", "batched"])
def test_zo_spsa_is_the_composition(opts, limit, monkeypatch):
    import forwardlearn.rules.zeroth_order as zo

    monkeypatch.setattr(zo, "BATCHED_LIMIT", limit)
    model, x, y = _mlp()
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    rule = fl.get_rule("zo_spsa", seed=5, **opts)
    loss = rule.grads(a, x, y)
    s = sampler(rule.distribution, rule.perturbation, rule.rank)
    frame = s.frame(b)
    seeds = draw_seeds(torch.Generator().manual_seed(5), rule.directions)
    scalars, loss2, _ = FiniteDifference(rule.eps, rule.difference).scalars(Evaluator(F.cross_entropy), b, x, y, s,
                                                                             frame, seeds, limit)
    ToGrad().apply(s, frame, seeds, scalars)
    assert loss == loss2
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p.grad, q.grad)
    # the fused step: the last perturbation put back in the update's sweep
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    fl.get_rule("zo_spsa", seed=5, **opts).fused_step(a, x, y, lr=0.1, weight_decay=0.01)
    frame = s.frame(b)
    scalars, _, pending = FiniteDifference(rule.eps, rule.difference).scalars(
        Evaluator(F.cross_entropy), b, x, y, s, frame, seeds, limit, defer_last=True)
    FusedSGD(0.1, 0.01).apply(s, frame, seeds, scalars, restore=pending)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("tangent", ["full", "rank1"])
def test_forward_gradient_is_the_composition(tangent):
    model, x, y = _mlp()
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    rule = fl.get_rule("forward_gradient", seed=6, directions=3, tangent=tangent)
    loss = rule.grads(a, x, y)
    s = sampler("rademacher", tangent)
    frame = s.frame(b)
    seeds = draw_seeds(torch.Generator().manual_seed(6), 3)
    scalars, loss2 = ForwardMode().scalars(Evaluator(F.cross_entropy), b, x, y, s, frame, seeds, 2**22)
    ToGrad().apply(s, frame, seeds, scalars)
    assert loss == loss2
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p.grad, q.grad)


def test_activity_rules_are_the_composition():
    model, x, y = _mlp()
    for name, opts in [("activity_forward_gradient", {"directions": 2}), ("ulr", {"directions": 4}),
                       ("ulr", {"directions": 4, "antithetic": True}), ("ulr", {"directions": 3, "baseline": False})]:
        a, b = copy.deepcopy(model), copy.deepcopy(model)
        rule = fl.get_rule(name, seed=7, **opts)
        loss = rule.grads(a, x, y)
        units = perturbed_units(b, name)
        gen = torch.Generator().manual_seed(7)
        ev = Evaluator(F.cross_entropy)
        if name == "ulr":
            reduce = antithetic() if rule.antithetic else leave_one_out() if rule.baseline else vr.none()
            est = ScoreFunction(rule.sigma, reduce).estimate(ev, b, x, y, units, UnitNoise(gen, rule.directions,
                                                                                            reduce.pairs))
            local_to_grad(est)
        else:
            for _ in range(rule.directions):
                est = ActivityForwardMode().estimate(ev, b, x, y, units, UnitNoise(gen), rule.directions, name)
                local_to_grad(est)
        assert loss == est.loss, name
        for p, q in zip(a.parameters(), b.parameters()):
            assert torch.equal(p.grad, q.grad), (name, opts)


def test_parts_run_no_backward_pass(monkeypatch):
    import torch._dynamo  # noqa: F401  (forward-mode AD imports it lazily: before anything is patched)

    def forbidden(*a, **k):
        raise AssertionError("reverse mode used")

    monkeypatch.setattr(torch.Tensor, "backward", forbidden)
    monkeypatch.setattr(torch.autograd, "backward", forbidden)
    monkeypatch.setattr(torch.autograd, "grad", forbidden)
    model, x, y = _mlp()
    ev = Evaluator(F.cross_entropy)
    for estimator, tangent in [(FiniteDifference(), "lowrank"), (ForwardMode(), "rank1")]:
        s = sampler("rademacher", tangent)
        frame = s.frame(model)
        seeds = draw_seeds(torch.Generator().manual_seed(0), 2)
        ToGrad().apply(s, frame, seeds, estimator.scalars(ev, model, x, y, s, frame, seeds, 0)[0])
    units = perturbed_units(model, "test")
    local_to_grad(ScoreFunction(0.1, leave_one_out()).estimate(ev, model, x, y, units,
                                                               UnitNoise(torch.Generator(), 4)))
    local_to_grad(ActivityForwardMode().estimate(ev, model, x, y, units, UnitNoise(torch.Generator()), 1, "t"))
    assert all(p.grad is not None and bool(p.grad.isfinite().all()) for p in model.parameters())


def test_applicators_validate():
    s = sampler()
    model, _, _ = _mlp()
    with pytest.raises(ValueError, match="got 2 seeds but 1 scalars"):
        ToGrad().apply(s, s.frame(model), [1, 2], torch.ones(1))
    with pytest.raises(ValueError, match="lr"):
        FusedSGD(0.0)
    with pytest.raises(ValueError, match="weight_decay"):
        FusedSGD(0.1, -1.0)
    with pytest.raises(ValueError, match="difference"):
        FiniteDifference(1e-3, "backward")
    with pytest.raises(ValueError, match="sigma"):
        ScoreFunction(-1.0)
