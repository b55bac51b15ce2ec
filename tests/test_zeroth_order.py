"""zo_spsa: unbiasedness, the seed-and-scalar API, the fused SGD step, checkpoint/resume."""

import copy

import pytest
import torch
import torch.nn.functional as F

import forwardlearn as fl
import forwardlearn.rules.zeroth_order as zo
from _zo_checks import (
    apply_reproduces_grads,
    fused_apply_is_sgd_without_grad,
    fused_step_equals_grads_plus_sgd,
    mlp_problem,
)


@pytest.fixture(params=["inplace", "batched"])
def mode(request, monkeypatch):
    """Both evaluation paths: in-place perturbation (large models) and one vmapped pass (small models)."""
    if request.param == "inplace":
        monkeypatch.setattr(zo, "BATCHED_LIMIT", 0)
    return request.param


def _assert_close(a, b, atol=1e-12, rtol=1e-9):
    """|a - b| <= atol + rtol |b| elementwise (cheaper to import than torch.testing)."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    bad = (a - b).abs() > atol + rtol * b.abs()
    assert not bool(bad.any()), f"max |a - b| = {float((a - b).abs().max())}"


def _true_grad(model, x, y):
    gs = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    return torch.cat([g.reshape(-1) for g in gs])


def _flat_grad(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def _weights(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("difference", ["central", "forward"])
def test_mean_of_estimates_converges_to_backprop_like_one_over_sqrt_n(difference, mode):
    model, x, y = mlp_problem()
    g = _true_grad(model, x, y)
    # float64 and eps 1e-6: the finite-difference bias is O(eps^2) (central) or O(eps) (forward),
    # orders of magnitude below the sampling error studied here
    rule = fl.get_rule("zo_spsa", directions=2000, eps=1e-6, difference=difference, seed=0)
    seeds, scalars, _ = rule.estimate(model, x, y)
    errs = {}
    for n in (125, 2000):
        for p in model.parameters():
            p.grad = None
        rule.apply(model, seeds[:n], scalars[:n])
        est = _flat_grad(model)
        errs[n] = float((est - g).norm() / g.norm())
        if n == 2000:
            # Rademacher SPSA: relative error^2 about (d - 1)/N = 42/2000 -> cosine about 0.99
            cos = float(torch.dot(est, g) / (est.norm() * g.norm()))
            assert cos >= 0.98
    # 16x the directions: error / 4; the error sums 43 squared components, so one run stays inside [2.67, 6]
    assert 4 / 1.5 < errs[125] / errs[2000] < 4 * 1.5


def test_estimate_touches_no_grad_and_restores_the_weights(mode):
    model, x, y = mlp_problem()
    w0 = _weights(model)
    rule = fl.get_rule("zo_spsa", directions=5, eps=1e-3, seed=0)
    seeds, scalars, loss = rule.estimate(model, x, y)
    assert len(seeds) == 5 and scalars.shape == (5,) and scalars.dtype == torch.float64
    assert all(p.grad is None for p in model.parameters())
    # in place: +eps z, -2 eps z, +eps z in float64 is back up to a few ulps; batched: never touched
    _assert_close(_weights(model), w0, rtol=0.0, atol=1e-15)
    assert loss == pytest.approx(float(F.cross_entropy(model(x), y).detach()), rel=1e-5)  # central: L + O(eps^2)


def test_estimate_is_the_finite_difference_along_the_regenerated_direction():
    model, x, y = mlp_problem()
    rule = fl.get_rule("zo_spsa", directions=1, eps=1e-4, seed=3)
    seeds, scalars, _ = rule.estimate(model, x, y)
    z = [rule._dirs.param(seeds[0], [p.numel() for p in model.parameters()], i, p.detach())
         for i, p in enumerate(model.parameters())]
    assert set(torch.cat([t.reshape(-1) for t in z]).unique().tolist()) == {-1.0, 1.0}
    g = _true_grad(model, x, y)
    dd = float(torch.dot(g, torch.cat([t.reshape(-1) for t in z])))
    assert float(scalars[0]) == pytest.approx(dd, rel=1e-6)  # central difference error O(eps^2) = 1e-8


def test_apply_reproduces_grads_bit_identically(mode):
    apply_reproduces_grads(*mlp_problem())


@pytest.mark.parametrize("difference,directions,wd", [("central", 1, 0.0), ("central", 3, 0.01),
                                                      ("forward", 2, 0.1)])
def test_fused_step_equals_grads_plus_sgd(difference, directions, wd, mode):
    fused_step_equals_grads_plus_sgd(*mlp_problem(), wd, directions=directions, difference=difference)


def test_fused_apply_is_sgd_without_grad():
    fused_apply_is_sgd_without_grad(*mlp_problem())


def test_chunking_spans_parameters_larger_than_a_chunk(mode):
    from forwardlearn.forward_only import CHUNK

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1100, 470), torch.nn.ReLU(), torch.nn.Linear(470, 3)).double()
    assert model[0].weight.numel() > CHUNK
    x, y = torch.randn(4, 1100, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    fl.get_rule("zo_spsa", directions=2, seed=1).fused_step(a, x, y, lr=0.1)
    opt = torch.optim.SGD(b.parameters(), lr=0.1)
    fl.get_rule("zo_spsa", directions=2, seed=1).grads(b, x, y)
    opt.step()
    _assert_close(_weights(a), _weights(b), rtol=0.0, atol=1e-13)


def test_non_finite_loss_restores_weights_and_raises(mode):
    model, x, y = mlp_problem()
    w0 = _weights(model)
    x = x.clone()
    x[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="non-finite"):
        fl.get_rule("zo_spsa", directions=3, seed=0).fused_step(model, x, y, lr=0.1)
    _assert_close(_weights(model), w0, rtol=0.0, atol=1e-15)


def test_options_validated():
    for bad in ({"eps": 0}, {"eps": float("nan")}, {"difference": "backward"}, {"directions": -1},
                {"distribution": "uniform"}):
        with pytest.raises(ValueError, match=str(list(bad.values())[0])):
            fl.get_rule("zo_spsa", **bad)


def test_checkpoint_resume_reproduces_the_uninterrupted_run(tmp_path, digits):
    (X, y), (Xt, yt) = digits
    X, y = X[:256], y[:256]

    def run(epochs, out, resume=False, seed=11):
        torch.manual_seed(0)
        model = fl.models.mlp(64, [8], 10)
        rule = fl.get_rule("zo_spsa", directions=2, seed=seed)
        fl.train(model, rule, (X, y), (Xt[:50], yt[:50]), optimizer="sgd", lr=0.05, epochs=epochs,
                 batch_size=64, seed=3, out_dir=out, resume=resume, progress=False)
        return model

    full = run(3, tmp_path / "full")
    run(1, tmp_path / "cut")
    # a fresh rule with another seed: the resumed run must take the seed stream from the checkpoint
    resumed = run(3, tmp_path / "cut", resume=True, seed=999)
    for p, q in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


@pytest.mark.slow
def test_digits_accuracy_with_defaults(digits):
    (X, y), (Xt, yt) = digits
    cls = fl.rules.rule_class("zo_spsa")
    d = cls.defaults
    torch.manual_seed(0)
    model = cls.default_model((1, 8, 8), 10)
    h = fl.train(model, fl.get_rule("zo_spsa", seed=0), (X, y), (Xt, yt), optimizer=d["optimizer"], lr=d["lr"],
                 epochs=d["epochs"], batch_size=d["batch_size"], seed=0, progress=False, eval_train=False)
    assert h.final["test_acc"] >= 0.90
