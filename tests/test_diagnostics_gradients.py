"""gradient_alignment: cosine and norm ratio against backprop, of one estimate and of the mean of many."""

import copy

import pytest
import torch

import forwardlearn as fl


def _problem():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 4, generator=g)
    y = torch.randint(0, 3, (16,), generator=g)
    torch.manual_seed(2)
    return fl.models.mlp(4, [5], 3, activation="tanh"), x, y


def test_backprop_is_perfectly_aligned_and_model_untouched():
    model, x, y = _problem()
    before = copy.deepcopy(model.state_dict())
    out = fl.diagnostics.gradient_alignment(model, fl.get_rule("backprop"), x, y, samples=2)
    assert out["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert out["norm_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert out["mean_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert set(out["per_parameter"]) == {"1.weight", "1.bias", "3.weight", "3.bias"}
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_mean_of_more_estimates_aligns_better():
    model, x, y = _problem()
    rule = fl.get_rule("forward_gradient", directions=1, seed=0)
    few = fl.diagnostics.gradient_alignment(model, rule, x, y, samples=4)
    many = fl.diagnostics.gradient_alignment(model, rule, x, y, samples=400)
    assert len(many["cosine_per_sample"]) == 400
    # 43 parameters: one estimate has cosine ~ 1/sqrt(43) = 0.15 on average; 400 estimates ~0.95
    assert many["mean_cosine"] > 0.85
    assert many["mean_cosine"] > few["mean_cosine"]
    assert abs(sum(many["cosine_per_sample"]) / 400) < 0.4  # single estimates stay poorly aligned
    # an unbiased estimator: the mean's norm approaches the true norm (relative error ~ sqrt(42/400) = 0.32)
    assert 0.6 < many["mean_norm_ratio"] < 1.5


def test_rules_that_wrap_the_model_are_compared_on_the_model_parameters():
    model, x, y = _problem()
    model = fl.models.mlp(4, [5, 6], 3, activation="tanh")
    out = fl.diagnostics.gradient_alignment(model, fl.get_rule("local_forward_gradient", seed=0), x, y)
    assert set(out["per_parameter"]) == {f"net.{k}" for k, _ in model.named_parameters()}  # heads left out
    # a projection of the true gradient on the local guess: cosine = |cos(guess, gradient)| = norm ratio.
    # Measured 0.275 here, 0.20-0.86 (mean 0.57) over 20 seeded problems built this way; a random direction in
    # these 82 parameters gives |cos| ~ sqrt(2 / (pi * 82)) = 0.09, so 0.2 fails if the local guesses stop
    # tracking the gradient
    assert out["cosine"] > 0.2
    assert out["cosine"] == pytest.approx(out["norm_ratio"], rel=1e-4)


def test_samples_validated():
    model, x, y = _problem()
    with pytest.raises(ValueError, match="samples"):
        fl.diagnostics.gradient_alignment(model, fl.get_rule("backprop"), x, y, samples=0)


def test_a_rule_that_widens_the_first_layer_is_compared_on_the_widened_model():
    # random inputs carry values in the first C features, so ff puts the label in front and widens the first
    # Linear inside grads: the estimate has the widened shape, and the exact gradient must be taken on that model
    model, x, y = _problem()
    model = fl.models.mlp(4, [6, 6], 3, activation="relu")
    out = fl.diagnostics.gradient_alignment(model, fl.get_rule("ff", seed=0), x, y, samples=2)
    assert model[1].weight.shape == (6, 4)  # the caller's model is not widened
    assert "1.weight" in out["per_parameter"]
    assert all(-1.0 <= c <= 1.0 for c in out["cosine_per_sample"])  # a number: NaN fails this
