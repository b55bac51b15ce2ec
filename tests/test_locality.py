"""Locality of the rules the registry marks ``backward = "local"``: a change to one layer's (or block's) local
objective leaves every other layer's ``.grad`` unchanged.

The rules come from the registry, so a new rule marked local is checked too, and one that fails to construct
or has no way to change one layer's local objective fails here. How one local objective is changed:

- rules exposing ``local_loss_hook`` (``hook(k, loss_k) -> loss_k``, applied to layer ``k``'s local loss before
  its gradient is taken; ff, cff, ff_conv, forward_gnn, model_free_ff): layer ``k``'s loss is scaled and shifted;
- ``dfa``: block ``k``'s fixed feedback matrix (which defines its local objective ``h_k . B_k e``) is changed;
- ``local_forward_gradient``: block ``k``'s auxiliary head (which defines its local loss) is changed; with
  ``projection="block"`` that reaches block ``k`` and its head only; with the default global projection the
  other blocks' updates change by one common scalar (the forward-mode projection), never in direction;
- ``ep``: reverse mode runs on the read-out's own loss only: every ``torch.autograd.grad`` call differentiates
  with respect to read-out parameters, and ``backward()`` is never called.

The README's "backward pass" column is checked against the registry's ``backward`` attribute.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import forwardlearn as fl
from _rule_inputs import sample
from forwardlearn.rules import rule_class

LOCAL = [n for n in fl.available_rules() if rule_class(n).backward == "local"]
README = Path(__file__).resolve().parents[1] / "README.md"
COLUMN = {"none": "none", "global": "global", "through feedback matrices": "feedback"}

Grads = dict[str, "torch.Tensor | None"]


def _readme_backward() -> dict[str, str]:
    """``{rule: backward}`` from the README's rule table (the column headed "backward pass")."""
    lines = README.read_text().splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("| rule |") and "backward pass" in line)
    col = [c.strip() for c in lines[head].strip("|").split("|")].index("backward pass")
    out = {}
    for line in lines[head + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in re.split(r"\s\|\s", line.strip().strip("|"))]  # `a|b` inside a cell stays
        name = re.fullmatch(r"`(\w+)`", cells[0])
        assert name, f"README rule table row without a `rule` name: {line}"
        value = cells[col].split(" (")[0]  # "none (...)": a note on where the rule leaves its default path
        out[name.group(1)] = "local" if value.startswith("local") else COLUMN.get(value, value)
    return out


def test_the_readme_backward_column_is_the_registry() -> None:
    table = _readme_backward()
    assert set(table) == set(fl.available_rules()), "the README's rule table and the registry list different rules"
    mismatch = {n: (table[n], rule_class(n).backward) for n in table if table[n] != rule_class(n).backward}
    assert not mismatch, f"README says / registry says: {mismatch}"


@pytest.mark.parametrize("name", fl.available_rules())
def test_backward_attribute_is_declared_and_agrees_with_forward_only(name: str) -> None:
    cls = rule_class(name)
    assert cls.backward in ("none", "local", "feedback", "global")
    assert cls.forward_only == (cls.backward == "none"), f"{name}: forward_only and backward disagree"


def _grads(model: torch.nn.Module) -> Grads:
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def _changed(base: Grads, other: Grads) -> set[str]:
    return {n for n, g in base.items()
            if (g is None) != (other[n] is None) or (g is not None and not torch.equal(g, other[n]))}


def _model(name: str, shape: tuple[int, ...], classes: int) -> torch.nn.Module:
    """The rule's default model, with two small hidden layers where its default has fewer (several local
    objectives are needed to see that one does not reach another)."""
    cls = rule_class(name)
    if name == "model_free_ff":
        from forwardlearn.physical import physical_network

        return physical_network(shape[0] * shape[1] * shape[2], [16, 16], 32, every_layer=False)
    if cls.model_spec.__func__ is fl.rules.Rule.model_spec.__func__ and cls.defaults.get("model") == "mlp":
        return fl.models.build("mlp", shape, classes, [16, 16])
    return cls.default_model(shape, classes)


def _setup(name: str, **options) -> tuple[fl.rules.Rule, torch.nn.Module, dict, object, torch.Tensor]:
    torch.manual_seed(0)
    shape, classes, x, y = sample(name)
    rule = fl.get_rule(name, seed=0, **options)  # a rule that fails to construct fails the test
    model = rule.attach(_model(name, shape, classes))
    return rule, model, copy.deepcopy(rule.state_dict()), x, y


def _step(name: str, model: torch.nn.Module, state: dict, x, y, options: dict | None = None,
          hook: Callable | None = None) -> Grads:
    rule = fl.get_rule(name, seed=0, **(options or {}))
    rule.load_state_dict(copy.deepcopy(state))  # the same random stream (negatives, noise) every time
    if hook is not None:
        rule.local_loss_hook = hook
    work = rule.attach(copy.deepcopy(model))
    rule.grads(work, x, y)
    return _grads(work)


def _by_hook(name: str) -> tuple[Grads, dict[int, Grads]]:
    rule, model, state, x, y = _setup(name)
    seen: list[int] = []

    def record(k: int, loss: torch.Tensor) -> torch.Tensor:
        seen.append(k)
        return loss

    base = _step(name, model, state, x, y, hook=record)
    out = {}
    for k in sorted(set(seen)):
        def scaled(j: int, loss: torch.Tensor, k: int = k) -> torch.Tensor:
            return loss * 3.0 + 0.5 if j == k else loss

        out[k] = _step(name, model, state, x, y, hook=scaled)
    return base, out


def _dfa() -> tuple[Grads, dict[int, Grads]]:
    from forwardlearn.rules.direct_feedback_alignment import dfa_feedback

    rule, model, _, x, y = _setup("dfa")
    rule.grads(model, x, y)  # the feedback matrices are drawn at the first step
    model.zero_grad(set_to_none=True)
    state = copy.deepcopy(rule.state_dict())
    base = _step("dfa", model, state, x, y)
    out = {}
    for k in sorted(dfa_feedback(model)):  # stored on the model as buffers
        other = copy.deepcopy(model)
        fb = dfa_feedback(other)[k]
        fb.copy_(torch.randn(fb.shape, generator=torch.Generator().manual_seed(k)))
        out[k] = _step("dfa", other, state, x, y)
    return base, out


def _lfg_heads(options: dict) -> tuple[Grads, dict[int, Grads]]:
    name = "local_forward_gradient"
    rule, model, state, x, y = _setup(name, **options)
    base = _step(name, model, state, x, y, options)
    out = {}
    for k in range(len(model.heads)):
        other = copy.deepcopy(model)
        w = next(other.heads[k].parameters())
        with torch.no_grad():
            w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(k)))
        out[k] = _step(name, other, state, x, y, options)
    return base, out


PROBES: dict[str, Callable[[], tuple[Grads, dict[int, Grads]]]] = {
    "dfa": _dfa,
    "local_forward_gradient": lambda: _lfg_heads({"projection": "block"}),
}


def _probe(name: str) -> Callable[[], tuple[Grads, dict[int, Grads]]] | None:
    if name in PROBES:
        return PROBES[name]
    if hasattr(fl.get_rule(name, seed=0), "local_loss_hook"):
        return lambda: _by_hook(name)
    return None


@pytest.mark.parametrize("name", [n for n in LOCAL if n != "ep"])
def test_a_change_to_one_local_objective_reaches_only_its_layer(name: str, one_thread) -> None:
    probe = _probe(name)
    assert probe is not None, (f"{name} is marked backward='local' but has no locality check: give it a "
                               "local_loss_hook or add a probe here")
    base, perturbed = probe()
    assert len(perturbed) >= 2, f"{name}: expected several local objectives, saw {sorted(perturbed)}"
    owners = {}
    for k, grads in perturbed.items():
        owners[k] = _changed(base, grads)
        assert owners[k], f"{name}: changing layer {k}'s local objective changed no gradient"
    for a in owners:
        for b in owners:
            if a < b:
                assert not owners[a] & owners[b], f"{name}: layers {a} and {b} both reach {owners[a] & owners[b]}"
    if name in ("ff", "cff"):  # on the library's MLP, layer k is exactly the k-th hidden Linear
        for k, names in owners.items():
            assert names == {f"{1 + 2 * k}.weight", f"{1 + 2 * k}.bias"}, (k, names)


def test_local_forward_gradient_global_projection_only_rescales_other_blocks(one_thread) -> None:
    """With the default one-JVP projection, block k's head changes the common scale, not another block's
    direction: every parameter outside block k and its head gets ``c * (its old gradient)`` with one ``c``."""
    base_block, by_block = _lfg_heads({"projection": "block"})
    base, perturbed = _lfg_heads({})
    for k, grads in perturbed.items():
        own = _changed(base_block, by_block[k])
        others = [n for n, g in base.items() if n not in own and g is not None]
        assert any(not torch.equal(base[n], grads[n]) for n in others)  # the scale did change
        num = sum(float((grads[n].double() * base[n].double()).sum()) for n in others if n.startswith("net."))
        den = sum(float(base[n].double().pow(2).sum()) for n in others if n.startswith("net."))
        for n in others:
            if n.startswith("heads."):
                assert torch.equal(base[n], grads[n]), f"head {k} reached {n}"
            else:
                torch.testing.assert_close(grads[n], (num / den) * base[n], rtol=1e-4, atol=1e-7)


def test_ep_runs_reverse_mode_on_its_read_out_only(monkeypatch: pytest.MonkeyPatch, one_thread) -> None:
    rule, model, _, x, y = _setup("ep")
    readout = {id(p) for p in model.readout.parameters()}
    differentiated: list[set[int]] = []
    real_grad = torch.autograd.grad

    def audited(outputs, inputs, *a, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        differentiated.append({id(t) for t in ([inputs] if torch.is_tensor(inputs) else inputs)})
        return real_grad(outputs, inputs, *a, **kw)

    def forbidden(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("ep called backward()")

    monkeypatch.setattr(torch.autograd, "grad", audited)
    monkeypatch.setattr(torch.autograd, "backward", forbidden)
    monkeypatch.setattr(torch.Tensor, "backward", forbidden)
    rule.grads(model, x, y)
    assert differentiated, "ep took no read-out gradient"
    assert all(ids <= readout for ids in differentiated), "ep differentiated with respect to non-read-out tensors"
    hidden = [p for m in model.layers for p in m.parameters()]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in hidden)  # trained, by the local EP rule
