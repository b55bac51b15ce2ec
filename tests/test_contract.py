"""The rule contract, the registry and the backprop reference."""

import copy
import math

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


# --- the contract over the whole registry, each rule on its own default model -------------------------------------
def _registry_setup(name, seed=3):
    from _rule_inputs import sample

    torch.manual_seed(0)
    shape, classes, x, y = sample(name)
    rule = fl.get_rule(name, seed=seed)
    model = rule.attach(rule_class(name).default_model(shape, classes))
    return rule, model, classes, x, y


def _grads(model):
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", fl.available_rules())
def test_grads_fill_every_parameter_the_rule_trains(name, one_thread):
    rule, model, _, x, y = _registry_setup(name)
    loss = rule.grads(model, x, y)
    assert isinstance(loss, float) and math.isfinite(loss), f"{name} returned loss {loss!r}"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    left = {n for n, p in model.named_parameters() if p.requires_grad and p.grad is None}
    declared = rule.untrained(model)
    assert declared <= trainable, f"{name}.untrained names parameters the model does not train: {declared - trainable}"
    assert left == declared, f"{name}: without .grad {sorted(left)}, declared untrained {sorted(declared)}"
    filled = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert all(bool(g.isfinite().all()) for g in filled)
    assert any(bool(g.abs().sum() > 0) for g in filled), f"{name}: every gradient is zero"


@pytest.mark.parametrize("name", fl.available_rules())
def test_state_dict_round_trip_gives_the_identical_next_update(name, tmp_path, one_thread):
    """After one step, a fresh rule (another seed) loaded from the saved state gives bit-identical .grad."""
    rule, model, _, x, y = _registry_setup(name)
    rule.grads(model, x, y)  # state that exists only after a step (feedback matrices, counters, streams)
    model.zero_grad(set_to_none=True)
    torch.save(rule.state_dict(), tmp_path / "rule.pt")
    twin = fl.get_rule(name, seed=11)
    twin.load_state_dict(torch.load(tmp_path / "rule.pt", weights_only=True))
    copy_model = twin.attach(copy.deepcopy(model))
    rule.grads(model, x, y)
    twin.grads(copy_model, x, y)
    a, b = _grads(model), _grads(copy_model)
    assert a.keys() == b.keys()
    differ = [n for n in a if (a[n] is None) != (b[n] is None) or (a[n] is not None and not torch.equal(a[n], b[n]))]
    assert not differ, f"{name}: the loaded rule's next update differs in {differ}"


@pytest.mark.parametrize("name", fl.available_rules())
def test_predict_returns_one_score_per_class(name, one_thread):
    rule, model, classes, x, y = _registry_setup(name)
    rule.grads(model, x, y)
    scores = rule.predict(model, x)
    n = len(y)
    assert tuple(scores.shape) == (n, classes), f"{name}: predict gave {tuple(scores.shape)}, want {(n, classes)}"
    assert bool(scores.isfinite().all())


@pytest.mark.parametrize("name", [n for n in fl.available_rules() if rule_class(n).backward == "none"])
def test_forward_only_rules_run_with_reverse_mode_patched_out(name, monkeypatch, one_thread):
    import torch._dynamo  # noqa: F401  (forward-mode AD imports it lazily: before anything is patched)

    rule, model, classes, x, y = _registry_setup(name)

    def forbidden(*a, **kw):
        raise AssertionError(f"{name} ran reverse mode")

    monkeypatch.setattr(torch.Tensor, "backward", forbidden)
    monkeypatch.setattr(torch.autograd, "backward", forbidden)
    monkeypatch.setattr(torch.autograd, "grad", forbidden)
    assert math.isfinite(rule.grads(model, x, y))
    assert tuple(rule.predict(model, x).shape) == (len(y), classes)
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.parameters())


def test_model_free_ff_predicts_every_class_before_seeing_the_highest_label(one_thread):
    rule, model, classes, x, _ = _registry_setup("model_free_ff")
    rule.grads(model, x, torch.zeros(len(x), dtype=torch.long) + torch.arange(len(x)) % 3)  # labels 0-2 only
    assert tuple(rule.predict(model, x).shape) == (len(x), classes)
