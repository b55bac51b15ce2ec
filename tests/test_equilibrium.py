"""Equilibrium propagation (``ep``) and the convergent network it trains."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import forwardlearn as fl
from forwardlearn.models import ConvergentNet
from forwardlearn.rules.equilibrium import homeostatic_loss_and_grads


def _flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def _cos(a, b):
    return float(a @ b / (a.norm() * b.norm()))


def _batch(n=24):
    X, y = fl.data.load("digits", "train")
    return X[:n].double(), y[:n]


def _net(symmetric=True, activation="hard_sigmoid", seed=1):
    torch.manual_seed(seed)
    # tight criterion so that "the fixed point" is exact to ~1e-12 for the gradient comparisons
    return ConvergentNet(64, [24, 16], 10, symmetric=symmetric, activation=activation, tol=1e-12,
                         max_iters=3000).double()


def implicit_gradient(net, x, y):
    """dL/dtheta at the free fixed point by the implicit function theorem, with a dense linear solve.

    Independent of the model's own adjoint iteration: per example, y_b = (I - J_b^T)^{-1} dL/da_b with
    J_b the Jacobian of one relaxation sweep at the fixed point, then dL/dtheta = (df/dtheta)^T y.
    """
    params = list(net.parameters())
    sizes = net.widths
    a_star = torch.cat(net.relax(x), 1)
    z = a_star.clone().requires_grad_(True)
    loss = F.cross_entropy(net.readout(z[:, -sizes[-1]:]), y)
    g_z, *g_direct = torch.autograd.grad(loss, [z, *params], allow_unused=True)

    def f_one(zb, xb):
        return torch.cat(net.step(xb[None], list(zb[None].split(sizes, 1))), 1)[0]

    adj = []
    for b in range(len(x)):
        J = torch.autograd.functional.jacobian(lambda zb, xb=x[b]: f_one(zb, xb), a_star[b])
        adj.append(torch.linalg.solve(torch.eye(len(J), dtype=J.dtype) - J.t(), g_z[b]))
    adj = torch.stack(adj)
    f = torch.cat(net.step(x, list(a_star.split(sizes, 1))), 1)
    g_implicit = torch.autograd.grad(f, params, adj, allow_unused=True)
    out = []
    for p, gd, gi in zip(params, g_direct, g_implicit):
        out.append((gd if gd is not None else torch.zeros_like(p)) + (gi if gi is not None else torch.zeros_like(p)))
    return out


def ep_gradient(net, x, y, **options):
    rule = fl.get_rule("ep", seed=0, **options)
    for p in net.parameters():
        p.grad = None
    rule.grads(net, x, y)
    return [p.grad.clone() for p in net.parameters()], rule


def test_model_forward_is_implicit_gradient():
    """``backprop`` on the convergent net (its adjoint iteration) equals the dense implicit gradient."""
    net = _net()
    x, y = _batch()
    truth = implicit_gradient(net, x, y)
    via_forward = torch.autograd.grad(F.cross_entropy(net(x), y), list(net.parameters()))
    assert net.last_adjoint["converged"] == 1.0
    # both solve the same linear system, one iteratively to 1e-14 per step: agreement to 1e-8 relative
    torch.testing.assert_close(_flat(via_forward), _flat(truth), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("beta,nudges", [(1e-3, 1), (1e-2, 2)])
def test_ep_matches_implicit_differentiation_small_beta(beta, nudges):
    net = _net()
    x, y = _batch()
    truth = _flat(implicit_gradient(net, x, y))
    est, rule = ep_gradient(net, x, y, beta=beta, nudges=nudges)
    # the bar: cosine >= 0.99 for a small nudge (finite-difference bias is O(beta) / O(beta^2))
    assert _cos(_flat(est), truth) >= 0.99
    assert float(_flat(est).norm() / truth.norm()) == pytest.approx(1.0, abs=0.05)
    assert not rule.forward_only  # autograd runs inside the read-out layer only (see test_forward_only.py)


def test_holomorphic_ep_is_exact_with_a_finite_beta():
    net = _net(activation="sigmoid")
    x, y = _batch()
    truth = _flat(implicit_gradient(net, x, y))
    beta = 0.5  # a large nudge: classic EP is visibly biased at this size
    classic, _ = ep_gradient(net, x, y, beta=beta, nudges=1)
    holo, _ = ep_gradient(net, x, y, beta=beta, nudges=4)
    holo6, _ = ep_gradient(net, x, y, beta=beta, nudges=6)
    c_classic, c_holo, c_holo6 = (_cos(_flat(g), truth) for g in (classic, holo, holo6))
    assert c_holo >= 0.99  # the bar
    # Cauchy-integral error is O(|beta|^N): with N=4 it is already ~1e-7 here, far below classic EP's
    assert 1 - c_holo < 1e-3 * (1 - c_classic)
    err = [float((_flat(g) - truth).norm() / truth.norm()) for g in (classic, holo, holo6)]
    assert err[2] < err[1] < err[0]


def test_nonsymmetric_ep_is_biased_by_the_jacobian_asymmetry():
    net = _net(symmetric=False, activation="sigmoid")
    assert net.jacobian_asymmetry() > 0.3  # independent random feedback: roughly half antisymmetric
    x, y = _batch()
    truth = _flat(implicit_gradient(net, x, y))
    holo, _ = ep_gradient(net, x, y, beta=0.5, nudges=4)
    # no finite-nudge bias left, yet the hidden layers' estimates are off: asymmetry bias
    assert _cos(_flat(holo), truth) < 0.99
    sym = _net(symmetric=True)
    assert sym.jacobian_asymmetry() == 0.0


def test_homeostatic_gradient_matches_autograd_and_its_expectation():
    torch.manual_seed(0)
    net = ConvergentNet(10, [6, 5, 4], 3, symmetric=False).double()
    n = sum(net.widths)
    probes = torch.randn(7, n, dtype=torch.float64)
    value, gW, gV = homeostatic_loss_and_grads(net, probes)
    # autograd on the dense Jacobian J (blocks W_l below the diagonal, feedback V_l above it)
    W = [m.weight for m in net.layers[1:]]
    V = [m.weight for m in net.feedback]
    offs = [0, 6, 11, 15]

    def dense():
        J = torch.zeros(n, n, dtype=torch.float64)
        for l in range(2):
            J = J.index_put((torch.arange(offs[l + 1], offs[l + 2])[:, None], torch.arange(offs[l], offs[l + 1])),
                            W[l])
            J = J.index_put((torch.arange(offs[l], offs[l + 1])[:, None], torch.arange(offs[l + 1], offs[l + 2])),
                            V[l])
        return J

    J = dense()
    Je = probes @ J.t()
    loss = ((Je * Je).sum() - (probes * (Je @ J.t())).sum()) / (n * len(probes))
    assert value == pytest.approx(float(loss.detach()), rel=1e-10)
    auto = torch.autograd.grad(loss, [*W, *V])
    torch.testing.assert_close(_flat(auto), _flat(gW + gV))
    # E_eps[...] = |J - J^T|_F^2 / (2n); with 20000 probes the Monte-Carlo error is ~1% (checked: 5% bound)
    big = torch.randn(20000, n, dtype=torch.float64)
    mc, _, _ = homeostatic_loss_and_grads(net, big)
    exact = float((J - J.t()).detach().pow(2).sum()) / (2 * n)
    assert mc == pytest.approx(exact, rel=0.05)


def test_homeostasis_reduces_jacobian_asymmetry(digits):
    (X, y), _ = digits
    asym = {}
    for weight in (0.0, 1.0):
        torch.manual_seed(3)
        net = ConvergentNet(64, [32, 16], 10, symmetric=False)
        start = net.jacobian_asymmetry()
        rule = fl.get_rule("ep", homeostasis=weight, seed=0)
        fl.train(net, rule, (X, y), optimizer="adam", lr=3e-3, epochs=3, batch_size=64, progress=False,
                 eval_train=False)
        asym[weight] = net.jacobian_asymmetry()
        if weight > 0:
            assert 0 <= rule.last_homeostatic_loss < 0.1
    # measured (seeded): 0.49 at the start, 0.42 after EP alone, 0.14 with homeostasis; the bound leaves
    # room for platform differences while still requiring the penalty to at least halve the asymmetry
    assert asym[1.0] < 0.5 * asym[0.0]
    assert asym[1.0] < 0.5 * start


def test_relaxation_criterion_and_cap():
    net = ConvergentNet(64, [32, 16], 10)
    x = torch.rand(8, 64)
    net.relax(x)
    r = net.last_relaxation
    assert r["converged"] == 1.0 and r["residual"] < net.tol and r["iterations"] <= net.max_iters
    net.relax(x, max_iters=2)
    assert net.last_relaxation["iterations"] == 2
    states = net.relax(x)
    assert all(((s >= 0) & (s <= 1)).all() for s in states)
    with torch.no_grad():
        again = net.step(x, states)  # a fixed point of the update, up to the criterion
    assert max(float((a - b).abs().max()) for a, b in zip(again, states)) < 10 * net.tol


def test_attach_mlp_shares_weights_and_is_idempotent():
    mlp = fl.models.mlp(64, [32, 16], 10)
    rule = fl.get_rule("ep", seed=0)
    net = rule.attach(mlp)
    assert isinstance(net, ConvergentNet) and rule.attach(mlp) is net and rule.attach(net) is net
    assert {id(p) for p in net.parameters()} == {id(p) for p in mlp.parameters()}
    assert mlp(torch.rand(3, 64)).shape == (3, 10)  # the MLP itself is unchanged
    x, y = torch.rand(5, 1, 8, 8), torch.randint(0, 10, (5,))
    rule.grads(mlp, x, y)
    assert all(p.grad is not None for p in mlp.parameters())
    assert rule.predict(mlp, x).shape == (5, 10)
    asym = fl.get_rule("ep", symmetric=False, seed=0).attach(fl.models.mlp(64, [32, 16], 10))
    assert len(asym.feedback) == 1 and not asym.symmetric


def test_grads_accumulate_and_state_roundtrip(tmp_path):
    net = ConvergentNet(64, [16, 8], 10, symmetric=False)
    x, y = torch.rand(6, 64), torch.randint(0, 10, (6,))
    rule = fl.get_rule("ep", homeostasis=1.0, seed=5)
    rule.grads(net, x, y)
    torch.save(rule.state_dict(), tmp_path / "r.pt")
    first = [p.grad.clone() for p in net.parameters()]
    other = fl.get_rule("ep", homeostasis=1.0, seed=9)
    other.load_state_dict(torch.load(tmp_path / "r.pt", weights_only=True))
    twin = copy.deepcopy(net)
    for p in twin.parameters():
        p.grad = None
    rule.grads(net, x, y)
    other.grads(twin, x, y)  # same probe stream after the round trip
    for p, q, g in zip(net.parameters(), twin.parameters(), first):
        torch.testing.assert_close(p.grad, g + q.grad)


def test_options_are_validated():
    for bad in ({"beta": 0}, {"beta": -1.0}, {"beta": math.inf}, {"nudges": 0}, {"nudges": 1.5},
                {"homeostasis": -1}, {"symmetric": "yes"}):
        with pytest.raises(ValueError, match=repr(next(iter(bad.values())))):
            fl.get_rule("ep", **bad)
    with pytest.raises(ValueError, match="custom loss"):
        fl.get_rule("ep", nudges=4, loss=F.cross_entropy)
    with pytest.raises(ValueError, match="activation='sigmoid'"):
        fl.get_rule("ep", nudges=4).attach(ConvergentNet(4, [3], 2))
    with pytest.raises(ValueError, match="'hard_sigmoid'"):
        fl.get_rule("ep", nudges=3, activation="hard_sigmoid")
    with pytest.raises(ValueError, match="'tanh'"):
        fl.get_rule("ep", activation="tanh")
    net = fl.get_rule("ep", nudges=4, activation="sigmoid").attach(ConvergentNet(4, [3], 2))
    assert net.activation == "sigmoid"
    with pytest.raises(ValueError, match="contradicts"):
        fl.get_rule("ep", symmetric=True).attach(ConvergentNet(4, [3, 3], 2, symmetric=False))
    untied = fl.get_rule("ep", symmetric=False).attach(ConvergentNet(4, [3, 3], 2))
    assert not untied.symmetric and len(untied.feedback) == 1 and untied.jacobian_asymmetry() > 0
    with pytest.raises(ValueError, match="ConvergentNet"):
        fl.get_rule("ep").attach(fl.models.cnn(1, classes=10, input_size=8))
    with pytest.raises(ValueError, match="unknown activation"):
        ConvergentNet(4, [3], 2, activation="relu")


def test_custom_loss_and_gradient_alignment():
    net = _net()
    x, y = _batch(16)

    def mse(scores, targets):
        return F.mse_loss(scores, F.one_hot(targets, 10).to(scores.dtype))

    rule = fl.get_rule("ep", beta=1e-3, nudges=2, loss=mse, seed=0)
    truth = torch.autograd.grad(mse(net(x), y), list(net.parameters()))
    for p in net.parameters():
        p.grad = None
    rule.grads(net, x, y)
    assert _cos(_flat([p.grad for p in net.parameters()]), _flat(truth)) > 0.99  # O(beta^2) bias only
    out = fl.diagnostics.gradient_alignment(net, fl.get_rule("ep", beta=1e-2, seed=0), x, y)
    assert out["cosine"] > 0.99


def test_default_model_runs_a_step():
    cls = fl.rules.rule_class("ep")
    model = cls.default_model((1, 8, 8), 10)
    assert isinstance(model, ConvergentNet)
    rule = fl.get_rule("ep", seed=0)
    model = rule.attach(model)
    loss = rule.grads(model, torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,)))
    assert math.isfinite(loss)


@pytest.mark.slow
def test_ep_trains_on_digits_with_its_defaults(digits):
    train, test = digits
    cls = fl.rules.rule_class("ep")
    d = cls.defaults
    torch.manual_seed(0)
    rule = fl.get_rule("ep", seed=0)
    model = cls.default_model((1, 8, 8), 10)
    hist = fl.train(model, rule, train, test, optimizer=d["optimizer"], lr=d["lr"], epochs=d["epochs"],
                    batch_size=d["batch_size"], progress=False, eval_train=False)
    assert hist.final["test_acc"] >= 0.90


@pytest.mark.slow
def test_holomorphic_and_homeostatic_ep_train_on_digits(digits):
    train, test = digits
    torch.manual_seed(0)
    net = ConvergentNet(64, [64, 32], 10, activation="sigmoid", symmetric=False)
    rule = fl.get_rule("ep", nudges=4, homeostasis=10.0, seed=0)
    hist = fl.train(net, rule, train, test, lr=3e-3, epochs=8, batch_size=64, progress=False, eval_train=False)
    assert hist.final["test_acc"] >= 0.85  # no weight symmetry: a lower bar than symmetric EP's 0.90
