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
import re
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.batches import Inputs, call_model, logits_of

LossFn = Callable[[Tensor, Tensor], Tensor]

_REGISTRY: dict[str, type[Rule]] = {}
#: option names that other rules or earlier versions spelled differently: one name per concept
RENAMED = {"theta": "threshold", "loss_fn": "loss"}


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
    for old, new in RENAMED.items():
        if old in options and old not in valid and new in valid:
            raise ValueError(f"option {old!r} of rule {name!r} is called {new!r}")
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for rule {name!r}; valid options: "
            f"{', '.join(sorted(valid)) or '(none)'}"
        )
    try:
        return cls(**options)
    except ValueError as e:  # the rule's own check: say which rule refused the value
        if names_rule(name, str(e)):
            raise
        raise ValueError(f"rule {name!r}: {e}") from None


def names_rule(name: str, text: str) -> bool:
    """Whether ``text`` mentions rule ``name`` as a word (``ff`` in "ff: ..." but not in "off" or "ff_conv")."""
    return re.search(rf"(?<!\w){re.escape(name)}(?!\w)", text) is not None


#: keywords every rule takes that a run sets itself (its seed); a stored option set must not repeat them
RESERVED_OPTIONS: tuple[str, ...] = ("seed",)


def build_rule(name: str, seed: int | None, options: Mapping[str, Any] | None = None, where: str = "options") -> Rule:
    """``get_rule(name, seed=seed, **options)`` for option sets read from a flag or a file.

    A reserved key (``seed``) inside ``options`` raises ``ValueError`` naming it and ``where`` it came from,
    instead of reaching the rule's constructor twice.
    """
    options = dict(options or {})
    clash = [k for k in RESERVED_OPTIONS if k in options]
    if clash:
        raise ValueError(f"{where}: {', '.join(clash)} is set by the run itself, not as a rule option of {name!r}")
    return get_rule(name, seed=seed, **options)


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


def model_first(model: Any, rule: Any, where: str) -> None:
    """``ValueError`` when ``where(model, rule, ...)`` got a rule first and a model second (the public functions
    all take the model first, as :func:`forwardlearn.train` does)."""
    if isinstance(model, Rule) or (isinstance(rule, nn.Module) and not isinstance(model, nn.Module)):
        raise ValueError(f"{where} takes the model first and the rule second: {where}(model, rule, ...)")


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
    #: what runs in reverse (the README's "backward pass" column): "none" (never backward() or autograd.grad;
    #: ``forward_only``), "local" (autograd only inside one layer or block on its own local objective),
    #: "feedback" (a backward pass through feedback matrices instead of W^T) or "global" (backprop)
    backward: ClassVar[str] = "global"
    #: what ``inputs`` are: "tensor" (a batch of examples, or a mapping of tensors such as a tokenizer's
    #: output, see ``forwardlearn.data.batches``) or "graph" (see ``forwardlearn.data.graphs``)
    data_kind: ClassVar[str] = "tensor"
    #: True for rules with ``fused_step(model, inputs, targets, lr, weight_decay)`` (the step without ``.grad``)
    supports_fused: ClassVar[bool] = False

    @classmethod
    def model_spec(cls) -> dict[str, Any]:
        """The spec of the model this rule trains by default (:mod:`forwardlearn.models.registry`):
        ``defaults["model"]`` with ``defaults["hidden"]``. Rules that need a model of their own kind (an
        energy-based net, an initialisation of their paper) override this."""
        hidden = cls.defaults.get("hidden")
        return {"name": cls.defaults.get("model", "mlp"), "hidden": list(hidden) if hidden is not None else None}

    @classmethod
    def default_model(cls, shape: tuple[int, ...], classes: int, hidden: list[int] | None = None) -> nn.Module:
        """The model of :meth:`model_spec` for inputs of ``shape`` (``hidden`` replaces its widths)."""
        from ..models.registry import from_spec

        spec = cls.model_spec()
        return from_spec(spec if hidden is None else {**spec, "hidden": list(hidden)}, shape, classes)

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

    def grads(self, model: nn.Module, inputs: Inputs, targets: Tensor) -> float:
        """Accumulate the rule's update into ``p.grad`` of every trained parameter; return the loss."""
        raise NotImplementedError

    def predict(self, model: nn.Module, inputs: Inputs) -> Tensor:
        """Class scores ``(N, C)``. Default: the model's output (``model(**inputs)`` for a mapping), or its
        ``.logits``."""
        return logits_of(call_model(model, inputs))

    def fused_step(self, model: nn.Module, inputs: Inputs, targets: Tensor, lr: float,
                   weight_decay: float = 0.0) -> float:
        """Estimate and apply an SGD step in place, without ``.grad`` (rules with ``supports_fused``)."""
        raise NotImplementedError(f"rule {self.name!r} has no fused step")

    def untrained(self, model: nn.Module) -> set[str]:
        """Names (as in ``model.named_parameters()``) of trainable parameters of the attached ``model`` that
        :meth:`grads` leaves without ``.grad`` by design, each documented by the rule. Default: none."""
        return set()

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


class SeedScalarRule(Rule):
    """A rule whose update is ``K = directions`` pairs ``(seed, scalar)``: the seed regenerates a direction
    ``v_k`` over the trained parameters, the scalar weighs it, and the update is ``mean_k scalar_k v_k``.

    This is what distributed training by seed exchange, federated BAFFLE rounds and replay logs need:

    - ``estimate(model, inputs, targets) -> (seeds, scalars, loss)``: the ``K`` seeds (drawn from the rule's
      own CPU stream) and float64 scalars; touches no ``.grad`` and leaves the weights as they were;
    - ``apply(model, seeds, scalars)``: ``p.grad += mean_k scalars[k] v_k``, each ``v_k`` regenerated from
      its seed, bit-identically on every process;
    - ``fused_apply(model, seeds, scalars, lr, weight_decay=0.0)`` (when ``supports_fused``): the SGD step
      ``p <- p - lr (mean_k scalars[k] v_k + weight_decay p)`` in place, without ``.grad``.

    ``grads`` is ``estimate`` then ``apply``.
    """

    directions: int

    def estimate(self, model: nn.Module, inputs: Inputs, targets: Tensor) -> tuple[list[int], Tensor, float]:
        raise NotImplementedError

    def apply(self, model: nn.Module, seeds: list[int], scalars: Tensor) -> None:
        raise NotImplementedError

    def fused_apply(self, model: nn.Module, seeds: list[int], scalars: Tensor, lr: float,
                    weight_decay: float = 0.0) -> None:
        raise NotImplementedError(f"rule {self.name!r} has no fused step")

    def grads(self, model: nn.Module, inputs: Inputs, targets: Tensor) -> float:
        seeds, scalars, loss = self.estimate(model, inputs, targets)
        self.apply(model, seeds, scalars)
        self.steps += 1
        return loss


def require_seed_scalar(rule: Rule, what: str) -> SeedScalarRule:
    """``rule`` if it is a :class:`SeedScalarRule`, else ``ValueError`` naming the rules that are."""
    if not isinstance(rule, SeedScalarRule):
        names = ", ".join(n for n in available_rules() if issubclass(_REGISTRY[n], SeedScalarRule))
        raise ValueError(f"rule {rule.name!r} has no seed-and-scalar API (estimate/apply); {what} needs one of: "
                         f"{names}")
    return rule
