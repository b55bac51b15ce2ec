"""Step strategies: how the loop cuts an epoch into batches and turns one batch into a weight update.

- :class:`GradStep` (default): ``optimizer.zero_grad(); loss = rule.grads(model, x, y); optimizer.step()``.
  The rule fills ``.grad``, any ``torch.optim`` optimizer steps.
- :class:`FusedStep`: ``rule.fused_step(model, x, y, lr=..., weight_decay=...)`` updates the weights in place,
  with no optimizer and no ``.grad`` buffers (rules with ``supports_fused``, e.g. ``zo_spsa``: training memory
  is inference memory).
- The seed-and-scalar step of :mod:`forwardlearn.distributed.step`: every rank estimates ``(seed, scalar)``
  pairs on its shard, the ranks exchange them, every rank applies them all.

A strategy is an object with the methods of :class:`Strategy`; the loop calls :meth:`Strategy.batches` once
per epoch, :meth:`Strategy.gather` and :meth:`Strategy.step` once per step.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..data.batches import Inputs, batch_len, take
from ..rules.base import NonFiniteError, check_positive, trainable_parameters

if TYPE_CHECKING:
    from .loop import Trainer


class Strategy:
    """The default batching (a fresh permutation of the examples per epoch from the trainer's shuffling stream)
    and the hooks a strategy may override."""

    name = "strategy"
    #: whether this strategy needs ``trainer.optimizer``
    needs_optimizer = True

    def steps_per_epoch(self, trainer: Trainer, n: int) -> int:
        return math.ceil(n / trainer.batch_size)

    def batches(self, trainer: Trainer, n: int) -> list[Any]:
        """One epoch's index batches, in order."""
        perm = torch.randperm(n, generator=trainer.generator).to(trainer.device)
        bs = trainer.batch_size
        return [perm[i * bs : (i + 1) * bs] for i in range(self.steps_per_epoch(trainer, n))]

    def gather(self, trainer: Trainer, X: Inputs, y: Tensor, item: Any) -> Any:
        """The batch that :meth:`step` gets for the index batch ``item``."""
        return take(X, item), y[item]

    def step(self, trainer: Trainer, batch: Any) -> tuple[float, float]:
        """One update; returns ``(loss, weight)`` (the record's loss is the weighted mean)."""
        raise NotImplementedError

    # optional hooks
    def begin(self, trainer: Trainer, resumed: bool) -> None:
        """Before the first step (after a resume)."""

    def finish(self, trainer: Trainer) -> None:
        """After the last step of a run that ended normally."""

    def end(self, trainer: Trainer) -> None:
        """When the run stops, normally or by an exception."""

    def evaluate(self, trainer: Trainer, X: Inputs, y: Tensor, Xt: Inputs | None,
                 yt: Tensor | None) -> dict[str, float] | None:
        """The evaluation fields of a record; ``None``: the loop's own (train and test accuracy)."""
        return None

    def record(self, trainer: Trainer, steps: int) -> dict[str, float]:
        """Extra fields of a history record covering ``steps`` steps."""
        return {}

    def evaluates(self, trainer: Trainer) -> bool:
        """Whether this process evaluates and writes checkpoints (all but rank 0 of a process group do not)."""
        return True

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any], trainer: Trainer) -> None: ...


def _where(trainer: Trainer) -> str:
    return f"epoch {trainer.epoch + 1}, step {trainer.global_step + 1}"


class GradStep(Strategy):
    """``rule.grads`` fills ``.grad``, the optimizer steps; a non-finite loss or gradient raises
    :class:`NonFiniteError` before the optimizer touches the weights (``check_grads=False`` skips the
    gradient check)."""

    name = "grad"

    def __init__(self, check_grads: bool = True) -> None:
        self.check_grads = check_grads

    def step(self, trainer: Trainer, batch: tuple[Inputs, Tensor]) -> tuple[float, float]:
        xb, yb = batch
        trainer.optimizer.zero_grad(set_to_none=True)
        try:
            loss = trainer.rule.grads(trainer.model, xb, yb)
        except NonFiniteError as e:
            raise NonFiniteError(f"{e} ({_where(trainer)})") from None
        if not math.isfinite(loss):
            raise NonFiniteError(f"non-finite loss {loss} at {_where(trainer)}")
        if self.check_grads:
            grads = [p.grad for p in trainable_parameters(trainer.model) if p.grad is not None]
            if grads and not bool(torch.stack([g.isfinite().all() for g in grads]).all()):
                raise NonFiniteError(f"non-finite gradient at {_where(trainer)}")
        trainer.optimizer.step()
        return loss, batch_len(xb)


class FusedStep(Strategy):
    """``rule.fused_step(model, x, y, lr=lr, weight_decay=weight_decay)``: the rule updates the weights in
    place (plain SGD), no optimizer, no ``.grad``. Needs a rule with ``supports_fused``."""

    name = "fused"
    needs_optimizer = False

    def __init__(self, lr: float, weight_decay: float = 0.0) -> None:
        self.lr = check_positive(lr, "lr")
        if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not weight_decay >= 0:
            raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
        self.weight_decay = float(weight_decay)

    def begin(self, trainer: Trainer, resumed: bool) -> None:
        if not getattr(trainer.rule, "supports_fused", False):
            raise ValueError(f"rule {trainer.rule.name!r} has no fused step (supports_fused is False); "
                             "use the default optimizer step")

    def step(self, trainer: Trainer, batch: tuple[Inputs, Tensor]) -> tuple[float, float]:
        xb, yb = batch
        try:
            loss = trainer.rule.fused_step(trainer.model, xb, yb, lr=self.lr, weight_decay=self.weight_decay)
        except NonFiniteError as e:
            raise NonFiniteError(f"{e} ({_where(trainer)})") from None
        if not math.isfinite(loss):
            raise NonFiniteError(f"non-finite loss {loss} at {_where(trainer)}")
        return loss, batch_len(xb)


def make_strategy(name: str | Strategy | None, *, lr: float | None = None, weight_decay: float = 0.0,
                  check_grads: bool = True) -> Strategy:
    """A strategy by name: ``grad`` (default) or ``fused`` (with ``lr``, ``weight_decay``); objects pass through."""
    if isinstance(name, Strategy):
        return name
    if name is None or name == "grad":
        return GradStep(check_grads)
    if name == "fused":
        if lr is None:
            raise ValueError("the fused step needs a learning rate")
        return FusedStep(lr, weight_decay)
    raise ValueError(f"unknown step strategy {name!r}; valid: fused, grad")


__all__ = ["FusedStep", "GradStep", "Strategy", "make_strategy"]
