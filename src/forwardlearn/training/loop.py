"""The training loop: read :meth:`Trainer.fit` top to bottom.

Each step hands one batch to the step strategy (default: ``opt.zero_grad(); loss = rule.grads(model, x, y);
opt.step()``, see :mod:`.strategies`). The rule fills ``.grad``; the optimizer, the scheduler and everything
else are plain PyTorch. Inputs are a tensor or a mapping of tensors (:mod:`.batches`).

A run lasts ``epochs`` epochs or ``steps`` optimizer steps. It writes one history record per epoch, or one per
``eval_every`` steps: the record is evaluated, appended to ``<out_dir>/metrics.jsonl``, and
``<out_dir>/checkpoint.pt`` is written atomically (:mod:`.checkpoint`). ``resume=True`` restarts from that
checkpoint with every random stream restored, so an interrupted run ends with the same weights as an
uninterrupted one. A non-finite loss or gradient stops the run before the weights are touched; the last good
checkpoint is left as it was.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..data.batches import Inputs, batch_len, take, to_device
from ..rules.base import NonFiniteError, Rule, check_int, get_rule, model_first, trainable_parameters
from .checkpoint import CHECKPOINT, METRICS, TRAINING_KEYS, History, atomic_save, load_checkpoint, write_metrics
from .optim import make_optimizer, resolve_device
from .strategies import Strategy, make_strategy


class Callback:
    """Hooks into :class:`Trainer`; override what you need."""

    def on_train_begin(self, trainer: Trainer) -> None: ...

    def on_step_end(self, trainer: Trainer, step: int, loss: float) -> None: ...

    def on_epoch_end(self, trainer: Trainer, record: dict[str, float]) -> None:
        """Called after every history record (per epoch, or per ``eval_every`` steps)."""

    def on_train_end(self, trainer: Trainer) -> None: ...


@torch.no_grad()
def accuracy(model: nn.Module, rule: Rule, X: Inputs, y: Tensor, batch_size: int = 1024) -> float:
    """Fraction of ``X`` that ``rule.predict`` classifies as ``y``."""
    model_first(model, rule, "accuracy")
    was_training = model.training
    model.eval()
    correct = 0
    n = batch_len(X)
    for i in range(0, n, batch_size):
        scores = rule.predict(model, take(X, slice(i, i + batch_size)))
        correct += int((scores.argmax(1) == y[i : i + batch_size]).sum())
    model.train(was_training)
    return correct / max(n, 1)


def _optional_int(value: Any, what: str, minimum: int = 1) -> int | None:
    return None if value is None else check_int(value, what, minimum)


class Trainer:
    """Mini-batch training of ``model`` with ``rule`` and a ``torch.optim`` optimizer (or another strategy).

    ``model`` must already be attached (``rule.attach(model)``), and the optimizer built over its parameters
    after that: a rule may add trainable parts (a read-out head, say) as sub-modules of the model.

    Args:
        epochs / steps: the run's length; ``steps`` (optimizer steps in all) wins when both are given.
        eval_every: evaluate, record and checkpoint every this many steps (default: at every epoch end).
        strategy: a :class:`~.strategies.Strategy` (default :class:`~.strategies.GradStep`).
        scheduler: stepped at every epoch end.
        eval_threads: the torch CPU threads of the evaluation only (it is not part of the timed
            ``seconds``); ``None`` keeps the current setting.
        checkpoint_every: also checkpoint every this many steps between records (0: only with a record).
    """

    def __init__(
        self,
        model: nn.Module,
        rule: Rule,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        epochs: int | None = None,
        batch_size: int,
        steps: int | None = None,
        eval_every: int | None = None,
        strategy: Strategy | None = None,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        seed: int = 0,
        out_dir: str | os.PathLike | None = None,
        callbacks: Sequence[Callback] = (),
        progress: bool = True,
        device: str | torch.device | None = None,
        config: dict[str, Any] | None = None,
        eval_train: bool = True,
        check_grads: bool = True,
        eval_threads: int | None = None,
        checkpoint_every: int = 0,
    ) -> None:
        if steps is None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs <= 0):
            raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch size must be a positive integer, got {batch_size!r}")
        if eval_threads is not None and (isinstance(eval_threads, bool) or not isinstance(eval_threads, int)
                                         or eval_threads <= 0):
            raise ValueError(f"eval_threads must be a positive integer or None, got {eval_threads!r}")
        self.steps = _optional_int(steps, "steps")
        self.eval_every = _optional_int(eval_every, "eval_every")
        self.checkpoint_every = check_int(checkpoint_every, "checkpoint_every", 0)
        self.strategy = strategy if strategy is not None else make_strategy("grad", check_grads=check_grads)
        if self.strategy.needs_optimizer and optimizer is None:
            raise ValueError(f"the {self.strategy.name!r} step needs an optimizer")
        self.device = resolve_device(device)
        self.model = model.to(self.device)
        self.rule = rule
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.epochs = epochs
        self.batch_size = batch_size
        self.seed = seed
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.callbacks = list(callbacks)
        self.progress = progress
        self.config = dict(config or {})
        self.eval_train = eval_train
        self.eval_threads = eval_threads
        self.generator = torch.Generator().manual_seed(seed)  # the shuffling stream
        self.history = History()
        self.epoch = 0  # epochs completed
        self.step_in_epoch = 0  # steps of the current epoch completed
        self.global_step = 0
        self.running_loss = (0.0, 0.0)  # (weighted loss sum, weight) since the last record
        self._epoch_rng: Tensor | None = None  # the shuffling stream's state before this epoch's permutation

    # --- one step -------------------------------------------------------------------------
    def step(self, *batch: Any) -> float:
        """One update from one batch (``trainer.step(x, y)`` for the default strategies); returns the loss.
        Raises :class:`NonFiniteError` before the weights are touched if anything is not finite."""
        return self.strategy.step(self, batch[0] if len(batch) == 1 else batch)[0]

    # --- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The checkpoint (schema in :mod:`.checkpoint`)."""
        mid_epoch = self.step_in_epoch > 0 and self._epoch_rng is not None
        shuffle = self._epoch_rng if mid_epoch else self.generator.get_state()
        rng: dict[str, Any] = {"shuffle": shuffle, "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "rule": self.rule.state_dict(),
            "rng": rng,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "running_loss": list(self.running_loss),
            "history": self.history.epochs,
            "config": self.config,
            "strategy": self.strategy.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.strategy.load_state_dict(state.get("strategy") or {}, self)
        self.model.load_state_dict(state["model"])
        if self.optimizer is not None and state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.rule.load_state_dict(state["rule"])
        rng = state.get("rng") or {}
        if "shuffle" in rng:
            self.generator.set_state(rng["shuffle"])
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state.get("step_in_epoch", 0))
        self.global_step = int(state["global_step"])
        total, weight = state.get("running_loss", (0.0, 0.0))
        self.running_loss = (float(total), float(weight))
        self.history = History([dict(r) for r in state["history"]])

    def save_checkpoint(self) -> None:
        if self.out_dir is None or not self.strategy.evaluates(self):
            return
        atomic_save(self.state_dict(), self.out_dir / CHECKPOINT)
        write_metrics(self.history.epochs, self.out_dir / METRICS)

    def resume(self) -> bool:
        """Load ``<out_dir>/checkpoint.pt`` if it exists; return whether it did. A file that is not a checkpoint
        raises one line of ``ValueError``."""
        if self.out_dir is None:
            raise ValueError("resume needs an output directory")
        path = self.out_dir / CHECKPOINT
        if not path.exists():
            return False
        state = load_checkpoint(path, TRAINING_KEYS, map_location=self.device)
        try:
            self.load_state_dict(state)
        except (KeyError, RuntimeError, TypeError, IndexError, AttributeError) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{path}: does not fit this run ({type(e).__name__}: {msg[:200]})") from None
        return True

    # --- evaluation and records -----------------------------------------------------------------
    def _record(self, data: tuple[Inputs, Tensor, Inputs | None, Tensor | None], seconds: float,
                cpu_seconds: float, steps: int) -> dict[str, float]:
        X, y, Xt, yt = data
        total, weight = self.running_loss
        record: dict[str, float] = {}
        if self.eval_every is not None:
            record["step"] = self.global_step
        record.update({"epoch": self.epoch if self.eval_every is None else self.epoch + self.step_in_epoch / max(
            self._steps_per_epoch, 1), "loss": total / weight if weight else float("nan"),
            "seconds": seconds, "cpu_seconds": cpu_seconds})
        record.update(self.strategy.record(self, steps))
        t1 = time.perf_counter()
        if self.strategy.evaluates(self):
            threads = torch.get_num_threads()
            if self.eval_threads is not None:  # evaluation is not timed: it may use more cores than training
                torch.set_num_threads(self.eval_threads)
            try:
                own = self.strategy.evaluate(self, X, y, Xt, yt)
                if own is not None:
                    record.update(own)
                else:
                    if self.eval_train:
                        record["train_acc"] = accuracy(self.model, self.rule, X, y)
                    if Xt is not None:
                        record["test_acc"] = accuracy(self.model, self.rule, Xt, yt)
            finally:
                torch.set_num_threads(threads)
        record["eval_seconds"] = time.perf_counter() - t1
        self.running_loss = (0.0, 0.0)
        self.history.epochs.append(record)
        self.save_checkpoint()
        for cb in self.callbacks:
            cb.on_epoch_end(self, record)
        return record

    # --- the loop ---------------------------------------------------------------------------
    def fit(self, train: tuple[Inputs, Tensor], test: tuple[Inputs, Tensor] | None = None,
            resume: bool = False) -> History:
        X, y = to_device(train[0], self.device), train[1].to(self.device)
        Xt, yt = (to_device(test[0], self.device), test[1].to(self.device)) if test is not None else (None, None)
        n = batch_len(X)
        if n != len(y) or n == 0:
            raise ValueError(f"training inputs and targets must be non-empty and equally long ({n} vs {len(y)})")
        resumed = False
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if resume:
                resumed = self.resume()
        self._steps_per_epoch = per_epoch = self.strategy.steps_per_epoch(self, n)
        total_steps = self.steps if self.steps is not None else self.epochs * per_epoch
        self.strategy.begin(self, resumed)
        for cb in self.callbacks:
            cb.on_train_begin(self)
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total_steps, initial=self.global_step, desc=self.rule.name or "train", unit="step",
                       dynamic_ncols=True, leave=False)
        data = (X, y, Xt, yt)
        self.model.train()
        try:
            while self.global_step < total_steps:
                self._epoch_rng = self.generator.get_state()
                order = self.strategy.batches(self, n)  # this epoch's batches (a fresh shuffle)
                t0, c0, steps0 = time.perf_counter(), time.process_time(), self.global_step
                due = False  # an eval_every record is due
                for i in range(self.step_in_epoch, per_epoch):
                    if self.global_step >= total_steps:
                        break
                    loss, weight = self.strategy.step(self, self.strategy.gather(self, X, y, order[i]))
                    self.global_step += 1
                    self.step_in_epoch = i + 1
                    total, w = self.running_loss
                    self.running_loss = (total + loss * weight, w + weight)
                    for cb in self.callbacks:
                        cb.on_step_end(self, self.global_step, loss)
                    if bar is not None:
                        bar.update(1)
                        if i % 10 == 0:
                            total, w = self.running_loss
                            bar.set_postfix(epoch=self.epoch + 1, loss=f"{total / (w or 1.0):.4f}")
                    due = self.eval_every is not None and (self.global_step % self.eval_every == 0
                                                           or self.global_step == total_steps)
                    if due and self.step_in_epoch < per_epoch:  # at an epoch's end: after its bookkeeping
                        seconds, cpu = self._elapsed(t0, c0)
                        self._record(data, seconds, cpu, self.global_step - steps0)
                        t0, c0, steps0 = time.perf_counter(), time.process_time(), self.global_step
                    elif self.checkpoint_every and self.global_step % self.checkpoint_every == 0 \
                            and self.step_in_epoch < per_epoch:
                        self.save_checkpoint()
                if self.step_in_epoch < per_epoch:  # stopped after `steps` steps, mid-epoch
                    break
                seconds, cpu = self._elapsed(t0, c0)
                if self.scheduler is not None:
                    self.scheduler.step()
                self.epoch += 1
                self.step_in_epoch = 0
                if self.eval_every is None or due:
                    record = self._record(data, seconds, cpu, self.global_step - steps0)
                    if bar is not None:
                        bar.set_postfix(epoch=self.epoch, loss=f"{record['loss']:.4f}",
                                        acc=f"{record.get('test_acc', record.get('train_acc', float('nan'))):.3f}")
            self.strategy.finish(self)
        finally:
            if bar is not None:
                bar.close()
            self.strategy.end(self)
        for cb in self.callbacks:
            cb.on_train_end(self)
        return self.history

    def _elapsed(self, t0: float, c0: float) -> tuple[float, float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0, time.process_time() - c0


def train(
    model: nn.Module,
    rule: Rule | str,
    train: tuple[Inputs, Tensor],
    test: tuple[Inputs, Tensor] | None = None,
    *,
    optimizer: torch.optim.Optimizer | str | None = None,
    lr: float | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    steps: int | None = None,
    eval_every: int | None = None,
    strategy: str | Strategy | None = None,
    weight_decay: float = 0.0,
    scheduler: Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler] | None = None,
    seed: int = 0,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    callbacks: Sequence[Callback] = (),
    device: str | torch.device | None = None,
    config: dict[str, Any] | None = None,
    eval_train: bool = True,
) -> History:
    """Train ``model`` with ``rule``; return the :class:`History`.

    ``rule`` is a :class:`Rule` or a registered name (built with ``seed``). Every setting left out
    (``optimizer``, ``lr``, ``epochs``, ``batch_size``) comes from the rule's documented ``defaults``.
    ``optimizer`` is a ``torch.optim.Optimizer`` built over the attached model's parameters, or a name
    (``sgd``, ``adam``, ``adamw``) built here with ``lr`` and ``weight_decay``. ``strategy="fused"`` steps
    with ``rule.fused_step`` instead (no optimizer, no ``.grad``; ``lr`` and ``weight_decay`` are its SGD
    step). ``steps`` (optimizer steps in all) overrides ``epochs``; ``eval_every`` records every that many
    steps. ``scheduler`` is a factory ``optimizer -> LRScheduler``, stepped once per epoch.
    """
    if isinstance(rule, str):
        rule = get_rule(rule, seed=seed)
    d = type(rule).defaults
    lr = d["lr"] if lr is None else lr
    epochs = d["epochs"] if epochs is None else epochs
    batch_size = d["batch_size"] if batch_size is None else batch_size
    dev = resolve_device(device)
    model = rule.attach(model.to(dev))
    step = make_strategy(strategy, lr=lr, weight_decay=weight_decay)
    opt = None
    if step.needs_optimizer:
        opt = optimizer if optimizer is not None else d["optimizer"]
        if isinstance(opt, str):
            extra = {"weight_decay": weight_decay} if weight_decay else {}
            opt = make_optimizer(opt, trainable_parameters(model), lr, **extra)
    elif optimizer is not None:
        raise ValueError(f"the {step.name!r} step takes no optimizer, got {optimizer!r}")
    sched = scheduler(opt) if scheduler is not None else None
    trainer = Trainer(model, rule, opt, epochs=epochs, batch_size=batch_size, steps=steps, eval_every=eval_every,
                      strategy=step, scheduler=sched, seed=seed, out_dir=out_dir, callbacks=callbacks,
                      progress=progress, device=dev, config=config, eval_train=eval_train)
    return trainer.fit(train, test, resume=resume)


__all__ = ["Callback", "NonFiniteError", "Trainer", "accuracy", "train"]
