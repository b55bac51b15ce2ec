"""Locality of layer-local rules: a change to one layer's local loss leaves every other layer's ``.grad`` unchanged.

Every registered rule whose instances expose ``local_loss_hook`` (``hook(k, loss_k) -> loss_k``, applied
to layer ``k``'s local loss before its gradient is taken) is checked, whichever file it lives in: scaling
layer ``k``'s loss must change the ``.grad`` of one group of parameters only, leave every other
parameter's ``.grad`` bit-identical, and different layers must own disjoint groups.
"""

from __future__ import annotations

import copy

import pytest
import torch

import forwardlearn as fl

IMAGE = (1, 8, 8)


def _local_rules() -> list[str]:
    out = []
    for name in fl.available_rules():
        cls = fl.rules.rule_class(name)
        if cls.data_kind != "tensor":
            continue
        try:
            rule = fl.get_rule(name, seed=0)
        except Exception:  # noqa: BLE001 - a rule that needs options is not a candidate here
            continue
        if hasattr(rule, "local_loss_hook"):
            out.append(name)
    return out


LOCAL = _local_rules()


def test_the_forward_forward_rules_are_covered() -> None:
    assert {"ff", "cff"} <= set(LOCAL)


def _run(name: str, model: torch.nn.Module, state: dict, x: torch.Tensor, y: torch.Tensor, hook) -> dict:
    rule = fl.get_rule(name, seed=0)
    rule.load_state_dict(copy.deepcopy(state))  # the same random stream (negatives, noise) every time
    rule.local_loss_hook = hook
    work = copy.deepcopy(model)
    rule.grads(work, x, y)
    return {n: None if p.grad is None else p.grad.clone() for n, p in work.named_parameters()}


def _changed(base: dict, other: dict) -> set[str]:
    out = set()
    for n, g in base.items():
        h = other[n]
        if (g is None) != (h is None) or (g is not None and not torch.equal(g, h)):
            out.add(n)
    return out


@pytest.mark.parametrize("name", LOCAL)
def test_a_change_to_one_local_loss_reaches_only_its_layer(name: str) -> None:
    torch.manual_seed(0)
    cls = fl.rules.rule_class(name)
    rule = fl.get_rule(name, seed=0)
    model = rule.attach(cls.default_model(IMAGE, 10))
    state = rule.state_dict()
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(16, *IMAGE, generator=g), torch.randint(0, 10, (16,), generator=g)

    seen: list[int] = []

    def record(k: int, loss: torch.Tensor) -> torch.Tensor:
        seen.append(k)
        return loss

    base = _run(name, model, state, x, y, record)
    layers = sorted(set(seen))
    assert len(layers) >= 2, f"{name}: expected several local losses, saw {layers}"
    owners: dict[int, set[str]] = {}
    for k in layers:
        def scaled(j: int, loss: torch.Tensor, k: int = k) -> torch.Tensor:
            return loss * 3.0 + 0.5 if j == k else loss

        changed = _changed(base, _run(name, model, state, x, y, scaled))
        assert changed, f"{name}: scaling layer {k}'s loss changed no gradient"
        owners[k] = changed
    for a in layers:
        for b in layers:
            if a < b:
                assert not owners[a] & owners[b], f"{name}: layers {a} and {b} both reach {owners[a] & owners[b]}"
    if name in ("ff", "cff"):  # on the library's MLP, layer k is exactly the k-th hidden Linear
        for k, names in owners.items():
            assert names == {f"{1 + 2 * k}.weight", f"{1 + 2 * k}.bias"}, (k, names)
