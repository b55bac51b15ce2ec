"""The rule contract, the registry and the backprop reference."""

import copy

import pytest
import torch
import torch.nn.functional as F

import forwardlearn as fl
from forwardlearn.rules import accumulate_grad, rule_class


def test_available_rules_sorted_and_backprop_present():
    names = fl.available_rules()
    assert names == sorted(names)
    assert "backprop" in names


def test_unknown_rule_names_valid_ones():
    with pytest.raises(ValueError, match="available rules: .*backprop"):
        fl.get_rule("no-such-rule")


def test_unknown_option_names_valid_ones():
    with pytest.raises(ValueError, match="unknown option.*bogus.*valid options"):
        fl.get_rule("backprop", bogus=1)


def test_bad_loss_and_seed_rejected():
    with pytest.raises(ValueError, match="loss must be callable"):
        fl.get_rule("backprop", loss=3)
    with pytest.raises(ValueError, match="seed"):
        fl.get_rule("backprop", seed=-1)


@pytest.mark.parametrize("name", fl.available_rules())
def test_every_rule_documents_itself(name):
    cls = rule_class(name)
    assert cls.description and cls.paper, f"{name} needs a description and a paper"
    for key in ("optimizer", "lr", "epochs", "batch_size"):
        assert key in cls.defaults, f"{name}.defaults lacks {key}"


def test_backprop_equals_loss_backward_and_accumulates():
    model = fl.models.mlp(8, [16], 3)
    x, y = torch.randn(10, 8), torch.randint(0, 3, (10,))
    ref = copy.deepcopy(model)
    F.cross_entropy(ref(x), y).backward()
    rule = fl.get_rule("backprop", seed=0)
    loss = rule.grads(model, x, y)
    assert loss == pytest.approx(float(F.cross_entropy(model(x), y).detach()))
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    rule.grads(model, x, y)  # a second call adds, like a second backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, 2 * q.grad)


def test_custom_loss_regression():
    model = torch.nn.Linear(3, 1)
    x = torch.randn(32, 3)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]])
    rule = fl.get_rule("backprop", loss=F.mse_loss, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    first = None
    for _ in range(200):
        opt.zero_grad()
        loss = rule.grads(model, x, y)
        first = first if first is not None else loss
        opt.step()
    assert loss < 1e-3 * first


def test_accumulate_grad_creates_then_adds():
    p = torch.nn.Parameter(torch.zeros(3))
    accumulate_grad(p, torch.ones(3))
    accumulate_grad(p, torch.ones(3))
    torch.testing.assert_close(p.grad, torch.full((3,), 2.0))


def test_rule_state_roundtrip_with_weights_only(tmp_path):
    rule = fl.get_rule("backprop", seed=7)
    g = rule.generator("cpu")
    torch.rand(5, generator=g)
    rule.steps = 3
    torch.save(rule.state_dict(), tmp_path / "r.pt")
    other = fl.get_rule("backprop", seed=1)
    other.load_state_dict(torch.load(tmp_path / "r.pt", weights_only=True))
    assert other.seed == 7 and other.steps == 3
    torch.testing.assert_close(torch.rand(5, generator=other.generator("cpu")), torch.rand(5, generator=g))


def test_models_shapes():
    assert fl.models.mlp(64, [32, 16], 10)(torch.rand(4, 1, 8, 8)).shape == (4, 10)
    assert fl.models.cnn(1, classes=10, input_size=8)(torch.rand(4, 1, 8, 8)).shape == (4, 10)
    assert fl.models.cnn(1, classes=10)(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    assert fl.models.build("cnn", (3, 32, 32), 10)(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="hidden width"):
        fl.models.mlp(4, [0], 2)
    with pytest.raises(ValueError, match="unknown activation"):
        fl.models.mlp(4, [3], 2, activation="swishy")
    with pytest.raises(ValueError, match="needs image inputs"):
        fl.models.build("cnn", (30,), 2)
