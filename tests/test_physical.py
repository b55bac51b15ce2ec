"""Black-box physical layers and the ``model_free_ff`` rule."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import forwardlearn as fl
from forwardlearn.physical import BlackBox, SimulatedPhysicalLayer, physical_network
from forwardlearn.rules.model_free import blocks_of
from forwardlearn.training import accuracy


def test_blackbox_wraps_torch_and_numpy_functions():
    x = torch.rand(5, 7)
    t = BlackBox(torch.sin)
    torch.testing.assert_close(t(x), torch.sin(x))
    n = BlackBox(lambda a: np.tanh(a) * 2, numpy=True, name="amplifier")
    out = n(x.double())
    assert out.dtype == torch.float64 and out.shape == (5, 7)
    torch.testing.assert_close(out, torch.tanh(x.double()) * 2)
    assert "amplifier" in repr(n)
    with pytest.raises(ValueError, match="callable"):
        BlackBox(3)
    with pytest.raises(ValueError, match="needs a function"):
        BlackBox()


def test_blackbox_rejects_backward_naming_the_layer():
    model = nn.Sequential(nn.Linear(4, 6), BlackBox(np.cos, numpy=True, name="lens"), nn.Linear(6, 3))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    with pytest.raises(RuntimeError, match="black-box physical layer 'lens'"):
        F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="'lens'"):
        fl.get_rule("backprop", seed=0).grads(model, x, y)
    with pytest.raises(RuntimeError, match="no gradient can pass"):
        torch.autograd.grad(model(x).sum(), model[0].weight)
    # a black box whose input needs no gradient blocks nothing: the layers after it still train
    front = nn.Sequential(BlackBox(np.cos, numpy=True), nn.Linear(4, 3))
    F.cross_entropy(front(x), y).backward()
    assert front[1].weight.grad is not None


def test_simulated_layer_is_a_nonlinear_noisy_black_box():
    quiet = SimulatedPhysicalLayer(16, 32, noise=0.0, seed=3)
    again = SimulatedPhysicalLayer(16, 32, noise=0.0, seed=3)
    a, b = torch.rand(64, 16), torch.rand(64, 16)
    torch.testing.assert_close(quiet(a), again(a))  # a fixed medium, set by the seed
    assert quiet(a).shape == (64, 32) and (quiet(a) >= 0).all()  # intensities
    assert float((quiet(a) + quiet(b) - quiet(a + b)).abs().mean()) > 0.1  # not additive: nonlinear
    wide = SimulatedPhysicalLayer(16, 1024, noise=0.0, seed=3)
    # intensities of a random medium have mean 1 (|T e|^2 / in_features); each of the 1024 outputs has
    # its own exponential-like mean (sd ~1), so the average is 1 +- 0.03: 0.15 is a 5-sigma bound
    assert float(wide(a).mean()) == pytest.approx(1.0, abs=0.15)
    noisy = SimulatedPhysicalLayer(16, 32, noise=0.05, seed=3)
    diff = noisy(a) - quiet(a)
    # std of 2048 Gaussian samples is within 10% of 0.05 with overwhelming probability
    assert float(diff.std()) == pytest.approx(0.05, rel=0.1)
    assert "t_real" in noisy.state_dict() and "t_imag" in noisy.state_dict()
    with pytest.raises(ValueError, match="expected 16 input features"):
        quiet(torch.rand(2, 15))
    for bad in ({"noise": -1.0}, {"drift": 2.0}):
        with pytest.raises(ValueError, match=repr(next(iter(bad.values())))):
            SimulatedPhysicalLayer(4, 4, **bad)


def test_drift_decorrelates_the_medium_at_the_stated_rate():
    layer = SimulatedPhysicalLayer(32, 64, noise=0.0, drift=0.05, seed=0)
    t0 = torch.complex(layer.t_real.clone(), layer.t_imag.clone())
    x = torch.rand(4, 32)
    for _ in range(200):
        layer(x)
    t1 = torch.complex(layer.t_real, layer.t_imag)
    corr = float((t0.conj() * t1).sum().real / (t0.abs().pow(2).sum().sqrt() * t1.abs().pow(2).sum().sqrt()))
    expected = math.sqrt(1 - 0.05**2) ** 200  # 0.78
    # 2048 complex entries: the sample correlation is within ~0.03 of its expectation; 0.06 bound
    assert corr == pytest.approx(expected, abs=0.06)
    assert layer.calls == 200


def test_blocks_are_split_at_trainable_layers():
    model = physical_network(64, [32, 16], 48, every_layer=True)
    blocks = blocks_of(model)
    assert len(blocks) == 2
    (p0, l0, a0), (p1, l1, a1) = blocks
    assert isinstance(p0[0], nn.Flatten) and isinstance(p0[1], SimulatedPhysicalLayer)
    assert isinstance(p1[0], SimulatedPhysicalLayer) and isinstance(a0, nn.ReLU)
    assert l0.out_features == 32 and l1.in_features == 48
    with pytest.raises(ValueError, match="trainable layers"):
        blocks_of(nn.Sequential(BlackBox(torch.sin)))


def _train(model, rule, digits, epochs):
    train, test = digits
    hist = fl.train(model, rule, train, test, lr=3e-3, epochs=epochs, batch_size=64, progress=False, eval_train=False)
    return hist.final["test_acc"]


def test_model_free_ff_trains_through_black_box_layers(digits):
    torch.manual_seed(0)
    # the bundled optical layer in front, a user's own NumPy "physical" transform between the digital
    # layers: backprop cannot train this model
    model = nn.Sequential(nn.Flatten(), SimulatedPhysicalLayer(64, 256, seed=0), nn.Linear(256, 256), nn.ReLU(),
                          BlackBox(lambda a: np.tanh(2 * a) + 0.2 * np.sin(5 * a), numpy=True, name="numpy medium"),
                          nn.Linear(256, 256), nn.ReLU())
    with pytest.raises(RuntimeError, match="numpy medium"):
        fl.get_rule("backprop", seed=0).grads(model, torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,)))
    rule = fl.get_rule("model_free_ff", seed=0)
    acc = _train(model, rule, digits, epochs=4)
    # chance is 0.10; measured 0.919 after 4 epochs (seeded); 0.80 leaves room for platform differences
    assert acc >= 0.80
    assert not rule.forward_only  # autograd inside each digital layer only


def test_training_tracks_a_drifting_physical_layer(digits):
    """Deep optical network (a physical layer before every digital one). With the media drifting all along,
    training keeps up; the same drift after training ruins the frozen network."""
    _, test = digits
    drift = 0.08  # per call: the media decorrelate to ~0.74 of their start over the 96 calls of 4 epochs
    torch.manual_seed(0)
    drifting = physical_network(64, [256, 256], 256, every_layer=True, noise=0.01, drift=drift)
    acc_drift = _train(drifting, fl.get_rule("model_free_ff", seed=0), digits, epochs=4)
    torch.manual_seed(0)
    frozen = physical_network(64, [256, 256], 256, every_layer=True, noise=0.01, drift=0.0)
    rule = fl.get_rule("model_free_ff", seed=0)
    acc_fixed = _train(frozen, rule, digits, epochs=4)
    for m in frozen.modules():  # as many drift steps as the drifting run saw, now without training
        if isinstance(m, SimulatedPhysicalLayer):
            m.drift = drift
            for _ in range(m.calls):
                m.measure(torch.zeros(1, m.in_features))
            m.drift = 0.0
    acc_after = accuracy(frozen, rule, *test)
    # measured (seeded): 0.889 without drift, 0.750 trained under drift, 0.333 for the frozen network
    # once its media have drifted as much (chance: 0.10); the bounds keep wide margins around these
    assert acc_fixed >= 0.80
    assert acc_drift >= 0.65
    assert acc_after < acc_drift - 0.25


def test_energy_goodness_variant_learns(digits):
    (X, y), _ = digits
    torch.manual_seed(0)
    model = physical_network(64, [128], 128, every_layer=False)
    rule = fl.get_rule("model_free_ff", goodness="energy", seed=0)
    fl.train(model, rule, (X, y), lr=3e-3, epochs=2, batch_size=64, progress=False, eval_train=False)
    acc = accuracy(model, rule, X, y)
    assert acc >= 0.6  # Hinton's objective also learns: measured 0.765 train accuracy after 2 epochs, chance 0.1


def test_rule_state_options_and_prediction():
    rule = fl.get_rule("model_free_ff", seed=4)
    model = physical_network(64, [16], 32)
    with pytest.raises(ValueError, match="cannot predict"):
        rule.predict(model, torch.rand(2, 64))
    x, y = torch.rand(10, 1, 8, 8), torch.arange(10)
    rule.grads(model, x, y)
    first = [p.grad.clone() for p in model.parameters()]
    rule.grads(model, x, y)  # accumulates like backward()
    assert any(not torch.equal(p.grad, g) for p, g in zip(model.parameters(), first))
    assert rule.predict(model, x).shape == (10, 10)
    state = rule.state_dict()
    other = fl.get_rule("model_free_ff", seed=9)
    other.load_state_dict(state)
    assert other.classes == 10 and torch.equal(other.patterns, rule.patterns)
    assert len(other.directions) == 1 and torch.equal(other.directions[0], rule.directions[0])
    for bad in ({"threshold": 0}, {"label_scale": -1.0}, {"classes": 1}, {"goodness": "joy"}, {"sharpness": -2.0}):
        with pytest.raises(ValueError, match=repr(next(iter(bad.values())))):
            fl.get_rule("model_free_ff", **bad)


def test_default_model_supports_the_compare_diagnostics():
    cls = fl.rules.rule_class("model_free_ff")
    model = cls.default_model((1, 8, 8), 10)
    x, y = torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,))
    out = fl.diagnostics.gradient_alignment(model, fl.get_rule("model_free_ff", seed=0), x, y)
    assert math.isfinite(out["cosine"])


@pytest.mark.slow
def test_model_free_ff_defaults_reach_090_on_digits(digits):
    cls = fl.rules.rule_class("model_free_ff")
    d = cls.defaults
    torch.manual_seed(0)
    model = cls.default_model((1, 8, 8), 10)
    train, test = digits
    hist = fl.train(model, fl.get_rule("model_free_ff", seed=0), train, test, optimizer=d["optimizer"], lr=d["lr"],
                    epochs=d["epochs"], batch_size=d["batch_size"], progress=False, eval_train=False)
    assert hist.final["test_acc"] >= 0.90
