"""The learning-rule contract and the registry.

A learning rule turns ``(model, inputs, targets)`` into ``.grad`` on the parameters it trains; any
``torch.optim`` optimizer then takes the step::

    rule = fl.get_rule("backprop")
    model = rule.attach(model)
    opt.zero_grad()
    loss = rule.grads(model, inputs, targets)
    opt.step()

A new rule is one class in its family's file under ``forwardlearn/rules/`` decorated with
:func:`register`; the package imports every module in that folder, so nothing else needs editing.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LossFn = Callable[[Tensor, Tensor], Tensor]

_REGISTRY: dict[str, type[Rule]] = {}


def register(cls: type[Rule]) -> type[Rule]:
    """Class decorator: add a rule to the registry under ``cls.name``."""
    name = getattr(cls, "name", "")
    if not name or not isinstance(name, str):
        raise ValueError(f"rule class {cls.__name__} needs a non-empty string `name`")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"rule name {name!r} is registered twice ({_REGISTRY[name].__name__}, {cls.__name__})")
    _REGISTRY[name] = cls
    return cls


def available_rules() -> list[str]:
    """Names of every registered rule, sorted."""
    return sorted(_REGISTRY)


def rule_class(name: str) -> type[Rule]:
    """The class registered as ``name``; unknown names raise ``ValueError`` listing the valid ones."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown rule {name!r}; available rules: {', '.join(available_rules())}")
    return _REGISTRY[name]


def rule_options(name: str) -> dict[str, Any]:
    """The keyword options a rule accepts, with their defaults."""
    return _options_of(rule_class(name))


def _options_of(cls: type) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        for p in inspect.signature(init).parameters.values():
            if p.name == "self" or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                continue
            opts[p.name] = None if p.default is inspect.Parameter.empty else p.default
    return opts


def get_rule(name: str, **options: Any) -> Rule:
    """Build the rule registered as ``name``.

    Unknown names and unknown options raise ``ValueError`` naming the valid ones; invalid option
    values raise ``ValueError`` from the rule's own checks.
    """
    cls = rule_class(name)
    valid = _options_of(cls)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for rule {name!r}; valid options: "
            f"{', '.join(sorted(valid)) or '(none)'}"
        )
    return cls(**options)


def accumulate_grad(param: Tensor, grad: Tensor) -> None:
    """Add ``grad`` into ``param.grad`` the way ``loss.backward()`` does (create, else add in place)."""
    grad = grad.to(dtype=param.dtype, device=param.device)
    if param.grad is None:
        param.grad = grad.detach().clone()
    else:
        param.grad.add_(grad)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``model`` that require gradients, in ``model.parameters()`` order."""
    return [p for p in model.parameters() if p.requires_grad]


def check_int(value: Any, what: str, minimum: int = 1) -> int:
    """``value`` if it is an int (not a bool) of at least ``minimum``, else ``ValueError`` naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return value


def check_positive(value: Any, what: str) -> float:
    """``value`` as a float if it is a positive finite number, else ``ValueError`` naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{what} must be a positive finite number, got {value!r}")
    return float(value)


class NonFiniteError(RuntimeError):
    """The loss or a gradient is NaN or infinite; raised before the optimizer touches the weights."""


def check_finite(value: Tensor | float, what: str) -> float:
    """Return ``value`` as a float; raise :class:`NonFiniteError` when it is NaN or infinite."""
    v = float(value)
    if v != v or v in (float("inf"), float("-inf")):
        raise NonFiniteError(f"non-finite {what} ({v}); stopping before the parameters are touched")
    return v


class Rule:
    """Base class of every learning rule.

    Subclasses set ``name``, ``description`` (one line), ``paper`` (citation) and
    ``defaults`` (the documented training hyperparameters that ``forwardlearn compare`` uses), and
    override :meth:`grads`. Rule state that must survive a checkpoint (seeds, feedback matrices,
    counters) goes into :meth:`state_dict`.

    Args:
        loss: any ``loss(outputs, targets) -> scalar tensor``; default cross-entropy. Rules that
            train on a local objective instead document what they do with it.
        seed: seed of the rule's own random stream (``None``: drawn from torch's global RNG).
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    #: the documented defaults: optimizer, lr, epochs, batch_size, hidden (MLP widths), model
    defaults: ClassVar[dict[str, Any]] = {
        "optimizer": "adam",
        "lr": 1e-3,
        "epochs": 20,
        "batch_size": 64,
        "hidden": [256],
        "model": "mlp",
    }
    #: True for rules that never run a reverse-mode pass across the network
    forward_only: ClassVar[bool] = False
    #: what ``inputs`` are: "tensor" (a batch of examples) or "graph" (see ``forwardlearn.data.graphs``)
    data_kind: ClassVar[str] = "tensor"

    @classmethod
    def default_model(cls, shape: tuple[int, ...], classes: int) -> nn.Module:
        """The model ``forwardlearn compare`` trains this rule on: ``defaults["model"]`` with ``defaults["hidden"]``.

        Rules that need a model of their own kind (an energy-based net, say) override this.
        """
        from ..models import build

        return build(cls.defaults.get("model", "mlp"), shape, classes, cls.defaults.get("hidden"))

    def __init__(self, loss: LossFn | None = None, seed: int | None = None) -> None:
        if loss is not None and not callable(loss):
            raise ValueError(f"{self.name or type(self).__name__}: loss must be callable loss(outputs, targets), "
                             f"got {type(loss).__name__}")
        self.loss: LossFn = loss if loss is not None else F.cross_entropy
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"{self.name or type(self).__name__}: seed must be a non-negative int, got {seed!r}")
        self.seed = seed
        self._generators: dict[str, torch.Generator] = {}
        self.steps = 0

    # --- the contract -------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> nn.Module:
        """Add what the rule needs to ``model`` and return it. Idempotent. Default: nothing."""
        return model

    def grads(self, model: nn.Module, inputs: Tensor, targets: Tensor) -> float:
        """Accumulate the rule's update into ``p.grad`` of every trained parameter; return the loss."""
        raise NotImplementedError

    def predict(self, model: nn.Module, inputs: Tensor) -> Tensor:
        """Class scores ``(N, C)``. Default: ``model(inputs)``."""
        return model(inputs)

    def state_dict(self) -> dict[str, Any]:
        """All rule state as tensors and plain values (loadable with ``weights_only=True``)."""
        return {
            "seed": self.seed,
            "steps": self.steps,
            "generators": {k: g.get_state() for k, g in self._generators.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.seed = int(state["seed"])
        self.steps = int(state["steps"])
        self._generators = {}
        for dev, st in state.get("generators", {}).items():
            self.generator(torch.device(dev)).set_state(st)

    # --- helpers for subclasses ---------------------------------------------------------------
    def generator(self, device: torch.device | str) -> torch.Generator:
        """The rule's random stream on ``device`` (one per device, seeded from ``seed``)."""
        device = torch.device(device)
        key = device.type if device.index is None else f"{device.type}:{device.index}"
        if key not in self._generators:
            g = torch.Generator(device=device)
            g.manual_seed(self.seed)
            self._generators[key] = g
        return self._generators[key]

    def __repr__(self) -> str:
        opts = {k: getattr(self, k) for k in _options_of(type(self)) if hasattr(self, k) and k != "loss"}
        args = ", ".join(f"{k}={v!r}" for k, v in opts.items())
        return f"{type(self).__name__}({args})"


def parameters_of(modules: Iterable[nn.Module]) -> list[nn.Parameter]:
    """Trainable parameters of several modules, each once."""
    seen: set[int] = set()
    out = []
    for m in modules:
        for p in m.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out
