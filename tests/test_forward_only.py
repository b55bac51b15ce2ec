"""Every rule that declares ``forward_only = True`` fills ``.grad`` with reverse mode switched off.

``torch.Tensor.backward``, ``torch.autograd.backward`` and ``torch.autograd.grad`` are patched to raise
while ``rule.grads`` runs (``torch.func.grad``/``vjp`` go through ``torch.autograd.grad`` too). The
registry is iterated, so rules added later with ``forward_only = True`` are covered automatically.
"""

import pytest
import torch
import torch._dynamo  # noqa: F401  (forward-mode AD imports it lazily; import it before anything is patched)

import forwardlearn as fl
from forwardlearn.rules import rule_class, rule_options

FORWARD_ONLY = [n for n in fl.available_rules() if rule_class(n).forward_only]


class ReverseModeUsed(AssertionError):
    pass


def _forbid(what):
    def forbidden(*args, **kwargs):
        raise ReverseModeUsed(f"{what} ran inside grads")

    return forbidden


@pytest.fixture
def no_reverse_mode(monkeypatch):
    def patch():
        monkeypatch.setattr(torch.Tensor, "backward", _forbid("Tensor.backward"))
        monkeypatch.setattr(torch.autograd, "backward", _forbid("torch.autograd.backward"))
        monkeypatch.setattr(torch.autograd, "grad", _forbid("torch.autograd.grad"))

    return patch


def _setup(name, digits):
    cls = rule_class(name)
    (X, y), _ = digits
    torch.manual_seed(0)
    model = cls.default_model((1, 8, 8), 10)
    rule = fl.get_rule(name, seed=0) if "seed" in rule_options(name) else fl.get_rule(name)
    model = rule.attach(model)
    return rule, model, X[:32], y[:32]


def test_the_forward_only_list_holds_this_family():
    for name in ("forward_gradient", "activity_forward_gradient", "zo_spsa", "ulr"):
        assert name in FORWARD_ONLY
    assert "local_forward_gradient" not in FORWARD_ONLY  # backprop inside each block, documented


def test_the_patch_catches_backprop(no_reverse_mode, digits):
    rule, model, x, y = _setup("backprop", digits)
    no_reverse_mode()
    with pytest.raises(ReverseModeUsed):
        rule.grads(model, x, y)


@pytest.mark.parametrize("name", FORWARD_ONLY)
def test_grads_runs_without_reverse_mode(name, no_reverse_mode, digits):
    cls = rule_class(name)
    if cls.data_kind != "tensor":
        pytest.skip(f"{name} takes {cls.data_kind} inputs, not a batch of digits")
    rule, model, x, y = _setup(name, digits)
    no_reverse_mode()
    with torch.no_grad():
        at_weights = float(torch.nn.functional.cross_entropy(rule.predict(model, x), y))
    loss = rule.grads(model, x, y)
    # the reported loss is the batch's loss at the current weights: exact for the forward-mode rules and
    # pepita; zo_spsa's mean of the +-eps evaluations is within 3e-6 (relative), ulr's mean over its noisy
    # copies within 4.5e-3 (5 seeds measured); 1e-2 fails a rule reporting a perturbed or stale loss
    assert abs(loss - at_weights) <= 1e-2 * at_weights, (loss, at_weights)
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads, f"{name} filled no .grad"
    assert any(bool(g.abs().sum() > 0) for g in grads)
    assert all(bool(g.isfinite().all()) for g in grads)
