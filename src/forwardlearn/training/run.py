"""One run assembled from one config: ``build_run(config) -> Run(model, rule, optimizer, data, ...)``.

Every verb (``train``, ``train --distributed``, ``compare``, ``bench accuracy``) and ``replay`` builds its run
here, so a config stored in a checkpoint rebuilds exactly the run that wrote it. The config is a ``dict`` of
plain values (JSON-able; rule options raw, not their ``repr``)::

    rule        registered rule name              options     {name: value} for fl.get_rule(rule, ...)
    data        data set name                     shape, classes   one example's shape, number of classes
    model       "default" (the rule's default_model), "mlp" or "cnn"
    hidden      hidden widths (None: the rule's / the builder's)      activation  "relu", ...
    optimizer   "adam" | "adamw" | "sgd"          lr, epochs, batch_size, seed
    steps, eval_every                               optional: a step-based run (see Trainer)

:func:`run_config` fills what a caller leaves out from the rule's documented ``defaults``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..rules.base import Rule, build_rule, rule_class, trainable_parameters
from .checkpoint import CHECKPOINT, read_config
from .optim import make_optimizer, resolve_device

#: the settings that must match when a run is resumed (more ``epochs`` is what resuming is for)
RESUME_KEYS = ("rule", "data", "model", "hidden", "activation", "batch_size", "optimizer", "lr", "seed", "options")


def run_config(rule: str, data: str = "digits", **settings: Any) -> dict[str, Any]:
    """A complete config: ``settings`` given (``None`` = not given), the rule's ``defaults`` for the rest.

    ``model`` defaults to ``"default"`` (the rule's own model) unless ``hidden`` or a non-ReLU ``activation``
    is given, which picks the rule's default model kind with those settings."""
    d = rule_class(rule).defaults
    given = {k: v for k, v in settings.items() if v is not None}
    own = given.get("hidden") is None and given.get("activation", "relu") == "relu"
    model = given.pop("model", None) or ("default" if own else d.get("model", "mlp"))
    hidden = given.pop("hidden", None)
    cfg: dict[str, Any] = {
        "rule": rule,
        "data": data,
        "model": model,
        "hidden": list(hidden) if hidden is not None else list(d.get("hidden") or []),
        "activation": "relu",
        "epochs": d["epochs"],
        "batch_size": d["batch_size"],
        "lr": d["lr"],
        "optimizer": d["optimizer"],
        "seed": 0,
        "options": {},
    }
    cfg.update(given)
    return cfg


def _same_model(cfg: dict[str, Any]) -> str:
    """``model`` with ``"default"`` read as the rule's default model kind (for comparing configs)."""
    if cfg.get("model") == "default":
        return rule_class(cfg["rule"]).defaults.get("model", "mlp")
    return cfg.get("model")


def build_model(cfg: dict[str, Any], shape: tuple[int, ...], classes: int) -> nn.Module:
    """The (unattached) model of ``cfg``: the rule's model spec for ``model = "default"`` (with the config's
    ``hidden`` widths), else :func:`forwardlearn.models.build`."""
    from ..models import build

    if cfg["model"] == "default":
        return rule_class(cfg["rule"]).default_model(shape, classes, cfg.get("hidden") or None)
    return build(cfg["model"], shape, classes, cfg.get("hidden") or None, cfg.get("activation", "relu"))


@dataclass
class Run:
    """A run ready to train: the attached model, its rule and optimizer, the data and the config."""

    config: dict[str, Any]
    model: nn.Module
    rule: Rule
    optimizer: torch.optim.Optimizer | None
    device: torch.device
    train: tuple[Tensor, Tensor] | None = None
    test: tuple[Tensor, Tensor] | None = None
    initial_state: dict[str, Tensor] | None = field(default=None, repr=False)

    def trainer(self, **kw: Any) -> Any:
        """A :class:`~forwardlearn.training.loop.Trainer` with the config's length, batch size and seed."""
        from .loop import Trainer

        cfg = self.config
        kw.setdefault("epochs", cfg["epochs"])
        kw.setdefault("steps", cfg.get("steps"))
        kw.setdefault("eval_every", cfg.get("eval_every"))
        return Trainer(self.model, self.rule, self.optimizer, batch_size=cfg["batch_size"], seed=cfg["seed"],
                       device=self.device, config=cfg, **kw)


def build_run(config: dict[str, Any], *, device: str | torch.device | None = None, data_dir: str | None = None,
              load_data: bool = True, keep_initial: bool = False, optimizer: bool = True) -> Run:
    """Seed torch with ``config["seed"]``, build the rule, the model (moved to ``device``, attached once) and the
    optimizer over its trained parameters, and load the data (``load_data``). ``keep_initial`` keeps a copy of
    the model's weights before ``attach``; ``optimizer=False`` builds none (a fused step)."""
    from .. import data

    cfg = dict(config)
    cfg.setdefault("options", dict(cfg.pop("rule_options", {}) or {}))
    dev = resolve_device(device)
    if "shape" not in cfg or "classes" not in cfg:
        spec = data.info(cfg["data"])
        cfg["shape"], cfg["classes"] = list(spec.shape), spec.classes
    torch.manual_seed(int(cfg.get("seed", 0)))
    check_data_kind(rule_class(cfg["rule"]), cfg.get("data"))
    rule = build_rule(cfg["rule"], int(cfg.get("seed", 0)), cfg["options"])
    train = test = None
    if load_data:
        train = data.load(cfg["data"], "train", root=data_dir)
        test = data.load(cfg["data"], "test", root=data_dir)
    model = build_model(cfg, tuple(cfg["shape"]), int(cfg["classes"]))
    initial = {k: v.clone() for k, v in model.state_dict().items()} if keep_initial else None
    model = rule.attach(model.to(dev))
    opt = make_optimizer(cfg["optimizer"], trainable_parameters(model), float(cfg["lr"])) if optimizer else None
    return Run(cfg, model, rule, opt, dev, train, test, initial)


def check_data_kind(rule_cls: type[Rule], data_name: str | None) -> None:
    """Refuse a rule that needs another kind of data than the tensor data sets a run loads (a graph rule trains
    with :func:`~forwardlearn.training.graph.train_graph`)."""
    if rule_cls.data_kind != "tensor":
        given = f"the {data_name!r} data set" if data_name else "a tensor data set"
        raise ValueError(f"rule {rule_cls.name!r} needs {rule_cls.data_kind} data, not {given} "
                         f"(a run trains on tensor data sets; a graph rule trains with train_graph)")


def run_directory(out: str | Path, resume: bool) -> Path:
    """``out`` as a run directory; refuses one that holds a checkpoint unless resuming."""
    out = Path(out)
    if (out / CHECKPOINT).exists() and not resume:
        raise ValueError(f"{out} already holds a checkpoint; pass --resume to continue it or choose another --out")
    return out


def check_resume(out: str | Path, cfg: dict[str, Any], keys: tuple[str, ...] = RESUME_KEYS) -> None:
    """Refuse to resume ``out`` when one of ``keys`` of ``cfg`` differs from the setting its checkpoint was
    trained with. Configs written before the one schema (rule options as ``repr`` strings under ``options``
    or raw under ``rule_options``) compare by what they mean."""
    path = Path(out) / CHECKPOINT
    if not path.exists():
        return
    old = read_config(path)
    if "rule_options" in old and "options" not in old:
        old["options"] = old["rule_options"]
    changed = []
    for k in keys:
        if k not in old:
            continue
        a, b = old[k], cfg.get(k)
        if k == "model":
            a, b = _same_model({**old, "rule": old.get("rule", cfg["rule"])}), _same_model(cfg)
        elif k == "options" and isinstance(a, dict) and isinstance(b, dict):
            b_repr = {key: repr(v) for key, v in b.items()}
            if a == b_repr:
                continue
        if a != b:
            changed.append(k)
    if changed:
        raise ValueError(f"resuming {out} with settings that differ from its checkpoint: {', '.join(changed)}")


__all__ = ["RESUME_KEYS", "Run", "build_model", "build_run", "check_data_kind", "check_resume", "run_config",
           "run_directory"]
