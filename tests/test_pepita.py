"""PEPITA: hand-checked updates, the feedback matrix, weight decay, weight mirroring, state."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import forwardlearn as fl
from forwardlearn.rules.pepita import he_uniform_, lr_schedule


def _batch(n: int = 16, d: int = 12, classes: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)


def test_update_equals_the_papers_equations_on_a_tiny_net() -> None:
    """Two hidden layers, written out by hand: e, x_mod = x - F e, dW_l = (h_l - h_l^mod) h_{l-1}^mod^T / N."""
    torch.manual_seed(0)
    model = he_uniform_(fl.models.mlp(12, [7, 5], 4))
    with torch.no_grad():
        for m in model:
            if isinstance(m, torch.nn.Linear):
                m.bias.uniform_(-0.1, 0.1)
    rule = fl.get_rule("pepita", seed=3, feedback_scale=0.5)  # a large F so the modulation matters
    rule.attach(model)
    Fm = rule.projection().clone()
    assert Fm.shape == (12, 4)
    x, y = _batch()
    W1, b1, W2, b2, W3, b3 = (p.detach().clone() for p in model.parameters())
    h1 = torch.relu(x @ W1.T + b1)
    h2 = torch.relu(h1 @ W2.T + b2)
    out = h2 @ W3.T + b3
    e = torch.softmax(out, 1) - F.one_hot(y, 4).float()  # cross-entropy: the softmax output error
    xm = x - e @ Fm.T
    m1 = torch.relu(xm @ W1.T + b1)
    m2 = torch.relu(m1 @ W2.T + b2)
    n = x.shape[0]
    want = [(h1 - m1).T @ xm / n, (h1 - m1).mean(0), (h2 - m2).T @ m1 / n, (h2 - m2).mean(0), e.T @ m2 / n, e.mean(0)]
    loss = rule.grads(model, x, y)
    assert loss == pytest.approx(float(F.cross_entropy(out, y)), rel=1e-6)
    for p, w in zip(model.parameters(), want):
        assert torch.allclose(p.grad, w, atol=1e-6)
    # the hidden updates are not zero: the modulation reached them
    assert float(model[1].weight.grad.abs().max()) > 1e-4


def test_other_losses_give_their_output_error() -> None:
    model = fl.models.mlp(12, [6], 3)
    x, _ = _batch(classes=3)
    target = torch.rand(16, 3)
    rule = fl.get_rule("pepita", loss=lambda o, t: 0.5 * ((o - t) ** 2).sum(1).mean(), seed=0)
    rule.grads(model, x, target)
    with torch.no_grad():
        h = model[2](model[1](x))
        e = model[3](h) - target  # N * d/dy of the mean half squared error
        m = model[2](model[1](x - e @ rule.projection().T))
    assert torch.allclose(model[3].weight.grad, e.T @ m / 16, atol=1e-6)


def test_fixed_feedback_matrix_has_the_papers_scale() -> None:
    rule = fl.get_rule("pepita", seed=0)
    rule.attach(fl.models.mlp(784, [64], 10))
    Fm = rule.projection()
    limit = 0.05 * math.sqrt(6 / 784)
    assert Fm.shape == (784, 10) and float(Fm.abs().max()) <= limit
    # uniform on [-a, a] has std a/sqrt(3); 7840 draws: relative standard error of the std is about 1%
    assert float(Fm.std()) == pytest.approx(limit / math.sqrt(3), rel=0.05)
    assert rule.attach(fl.models.mlp(784, [64], 10)) is not None and torch.equal(rule.projection(), Fm)
    with pytest.raises(ValueError, match="do not fit"):
        rule.attach(fl.models.mlp(64, [8], 10))


def test_default_model_uses_he_uniform_and_zero_biases() -> None:
    model = fl.rules.rule_class("pepita").default_model((1, 8, 8), 10)
    lin = [m for m in model if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in lin] == [*fl.rules.rule_class("pepita").defaults["hidden"], 10]
    for m in lin:
        limit = math.sqrt(6 / m.in_features)
        w = m.weight.detach().abs()
        assert float(w.max()) <= limit and float(w.max()) > 0.9 * limit  # many draws reach near the bound
        assert float(m.bias.detach().abs().max()) == 0


def test_weight_decay_adds_to_the_weight_update_only() -> None:
    torch.manual_seed(0)
    model = fl.models.mlp(12, [6], 4)
    x, y = _batch()
    grads = {}
    for wd in (0.0, 0.1):
        m = fl.models.mlp(12, [6], 4)
        m.load_state_dict(model.state_dict())
        fl.get_rule("pepita", weight_decay=wd, seed=1).grads(m, x, y)
        grads[wd] = {n: p.grad.clone() for n, p in m.named_parameters()}
    for n, p in model.named_parameters():
        extra = grads[0.1][n] - grads[0.0][n]
        want = 0.1 * p.detach() if n.endswith("weight") else torch.zeros_like(p)
        assert torch.allclose(extra, want, atol=1e-6), n


def test_weight_mirroring_aligns_feedback_with_forward_weights() -> None:
    torch.manual_seed(0)
    model = fl.models.mlp(20, [16], 5)
    rule = fl.get_rule("pepita", mirror=True, premirror_steps=400, mirror_lr=0.5, seed=0)
    rule.attach(model)
    before = [b.clone() for b in rule.feedback]
    target_std = 0.05 * math.sqrt(2 / 20)
    assert float(rule.projection().std()) == pytest.approx(target_std, rel=0.3)  # random init: loose
    x, y = _batch(64, 20, 5)

    def cos(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(F.cosine_similarity(a.flatten(), b.flatten(), dim=0))

    for _ in range(400):
        rule.grads(model, x, y)
    assert all(p.grad is None for p in model.parameters())  # pre-mirroring leaves the weights alone
    for b0, b, lin in zip(before, rule.feedback, [model[1], model[3]]):
        # independent random matrices: cos has std 1/sqrt(#entries), so 3 of those is a 3-sigma bound;
        # mirroring moves B_l towards W_l^T (for the hidden layer through the ReLU, E[x relu(Wx)^T] ~ W^T / 2)
        assert abs(cos(b0, lin.weight.detach().T)) < 3 / math.sqrt(b0.numel())
        assert cos(b, lin.weight.detach().T) > 0.8
    assert float(rule.projection().std()) == pytest.approx(target_std, rel=1e-4)  # rescaled every step
    rule.grads(model, x, y)  # step 401: now the weights learn, and mirroring goes on every step
    assert model[1].weight.grad is not None


def test_state_dict_round_trip_reproduces_the_next_update() -> None:
    torch.manual_seed(0)
    model = fl.models.mlp(12, [6, 5], 4)
    x, y = _batch()
    for opts in ({}, {"mirror": True}):
        rule = fl.get_rule("pepita", seed=7, **opts)
        rule.attach(model)
        rule.grads(model, x, y)
        buf = io.BytesIO()
        torch.save(rule.state_dict(), buf)
        buf.seek(0)
        fresh = fl.get_rule("pepita", seed=99, **opts)
        fresh.load_state_dict(torch.load(buf, weights_only=True))
        assert all(torch.equal(a, b) for a, b in zip(rule.feedback, fresh.feedback)) and fresh.steps == 1
        outs = []
        for r in (rule, fresh):
            m = fl.models.mlp(12, [6, 5], 4)
            m.load_state_dict(model.state_dict())
            r.grads(m, x, y)
            outs.append([p.grad for p in m.parameters()] + [b.clone() for b in r.feedback])
        assert all(torch.equal(a, b) for a, b in zip(*outs))
        for p in model.parameters():
            p.grad = None


def test_grads_accumulate_like_backward() -> None:
    model = fl.models.mlp(12, [6], 4)
    x, y = _batch()
    rule = fl.get_rule("pepita", seed=0)
    rule.grads(model, x, y)
    once = [p.grad.clone() for p in model.parameters()]
    rule.grads(model, x, y)
    assert all(torch.allclose(p.grad, 2 * g) for p, g in zip(model.parameters(), once))


def test_lr_schedule_decays_at_60_and_90_percent() -> None:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = lr_schedule(100)(opt)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[59] == 1.0 and lrs[60] == pytest.approx(0.1) and lrs[90] == pytest.approx(0.01)


@pytest.mark.parametrize(
    "opts, match",
    [
        ({"feedback_scale": 0}, "feedback_scale"),
        ({"weight_decay": -1e-4}, "-0.0001"),
        ({"mirror": 1}, "mirror"),
        ({"mirror_lr": float("nan")}, "nan"),
        ({"mirror_every": 0}, "mirror_every"),
        ({"premirror_steps": -3}, "-3"),
    ],
)
def test_bad_options_raise_value_error_naming_the_value(opts: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fl.get_rule("pepita", **opts)


def test_non_mlp_models_take_the_hooked_passes_but_not_mirroring() -> None:
    # conv nets run through layer hooks now (tests/test_architectures.py); weight mirroring stays MLP-only
    fl.get_rule("pepita").attach(fl.models.cnn(1, classes=10, input_size=8))
    with pytest.raises(ValueError, match="pepita: mirror=True .* needs an MLP"):
        fl.get_rule("pepita", mirror=True).attach(fl.models.cnn(1, classes=10, input_size=8))


@pytest.mark.slow
@pytest.mark.parametrize("opts", [{}, {"mirror": True}, {"weight_decay": 1e-4}])
def test_defaults_reach_90_percent_on_digits(opts: dict, digits) -> None:
    (X, y), (Xt, yt) = digits
    torch.set_num_threads(1)
    cls = fl.rules.rule_class("pepita")
    d = cls.defaults
    torch.manual_seed(0)
    hist = fl.train(cls.default_model((1, 8, 8), 10), fl.get_rule("pepita", seed=0, **opts), (X, y), (Xt, yt),
                    optimizer=d["optimizer"], lr=d["lr"], epochs=d["epochs"], batch_size=d["batch_size"],
                    scheduler=lr_schedule(d["epochs"]), seed=0, progress=False, eval_train=False)
    assert hist.final["test_acc"] >= 0.90, hist.column("test_acc")


def test_a_convolution_update_is_the_mean_over_its_output_positions() -> None:
    """Dellaferrera & Kreiman 2022's convolutional code averages a kernel's update over output positions; a sum
    (the update before this was fixed) is 64 times larger on 8x8 inputs."""
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 2, 3, padding=1)
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(2 * 8 * 8, 10))
    x, y = torch.rand(5, 1, 8, 8), torch.randint(0, 10, (5,))
    rule = fl.get_rule("pepita", seed=0)
    rule.grads(model, x, y)
    with torch.no_grad():
        out = model(x)
        e = torch.softmax(out, 1) - F.one_hot(y, 10)
        xm = x - (e @ rule.feedback[0].t()).view_as(x)
        d = (conv(x) - conv(xm)) / (8 * 8 * 5)
        want = torch.nn.grad.conv2d_weight(xm, conv.weight.shape, d, padding=1)
    torch.testing.assert_close(conv.weight.grad, want)
    torch.testing.assert_close(conv.bias.grad, d.sum((0, 2, 3)))
