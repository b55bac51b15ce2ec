"""The training loop: read it top to bottom.

Each step is ``opt.zero_grad(); loss = rule.grads(model, x, y); opt.step()``. The rule fills
``.grad``; the optimizer, the scheduler and everything else are plain PyTorch.

Per epoch the :class:`Trainer` evaluates, appends one JSON line to ``<out_dir>/metrics.jsonl`` and
writes ``<out_dir>/checkpoint.pt`` atomically (temp file, fsync, rename). ``resume=True`` restarts
from that checkpoint with every random stream restored, so an interrupted run ends with the same
weights as an uninterrupted one. A non-finite loss or gradient stops the run before the optimizer
touches the weights; the last good checkpoint is left as it was.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .rules.base import NonFiniteError, Rule, trainable_parameters

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


@dataclass
class History:
    """Per-epoch records: ``epoch, loss, train_acc, test_acc, seconds, cpu_seconds, eval_seconds``.

    ``seconds`` is the wall-clock time of the epoch's training steps; ``cpu_seconds`` the process CPU time
    they took (all threads), which does not count time the process was paused or waiting for a core."""

    epochs: list[dict[str, float]] = field(default_factory=list)

    def column(self, key: str) -> list[float]:
        return [r[key] for r in self.epochs if key in r]

    @property
    def final(self) -> dict[str, float]:
        return self.epochs[-1] if self.epochs else {}

    def __len__(self) -> int:
        return len(self.epochs)


class Callback:
    """Hooks into :class:`Trainer`; override what you need."""

    def on_train_begin(self, trainer: Trainer) -> None: ...

    def on_step_end(self, trainer: Trainer, step: int, loss: float) -> None: ...

    def on_epoch_end(self, trainer: Trainer, record: dict[str, float]) -> None: ...

    def on_train_end(self, trainer: Trainer) -> None: ...


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto``/``None`` -> CUDA when available, else CPU; ``cuda`` without a GPU raises ``ValueError``."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA GPU is available")
    return device


def make_optimizer(name: str, params: Sequence[nn.Parameter], lr: float, **kw: Any) -> torch.optim.Optimizer:
    """``sgd`` (momentum 0.9 unless given), ``adam`` or ``adamw`` by name."""
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"learning rate must be a positive number, got {lr!r}")
    if name == "sgd":
        kw.setdefault("momentum", 0.9)
        return torch.optim.SGD(params, lr=lr, **kw)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, **kw)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, **kw)
    raise ValueError(f"unknown optimizer {name!r}; valid: adam, adamw, sgd")


@torch.no_grad()
def accuracy(rule: Rule, model: nn.Module, X: Tensor, y: Tensor, batch_size: int = 1024) -> float:
    """Fraction of ``X`` that ``rule.predict`` classifies as ``y``."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(X), batch_size):
        scores = rule.predict(model, X[i : i + batch_size])
        correct += int((scores.argmax(1) == y[i : i + batch_size]).sum())
    model.train(was_training)
    return correct / max(len(X), 1)


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk or an interrupt: leave no half-written temp file behind
        tmp.unlink(missing_ok=True)
        raise


def _atomic_write_text(text: str, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class Trainer:
    """Mini-batch training of ``model`` with ``rule`` and a ``torch.optim`` optimizer.

    Build the optimizer *after* ``rule.attach(model)``: a rule may add trainable parts (a read-out
    head, say) as sub-modules of the model. ``eval_threads`` sets the torch CPU threads of the per-epoch
    evaluation only (it is not part of the timed ``seconds``); ``None`` keeps the current setting.
    """

    def __init__(
        self,
        model: nn.Module,
        rule: Rule,
        optimizer: torch.optim.Optimizer,
        *,
        epochs: int,
        batch_size: int,
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
    ) -> None:
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs <= 0:
            raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch size must be a positive integer, got {batch_size!r}")
        if eval_threads is not None and (isinstance(eval_threads, bool) or not isinstance(eval_threads, int)
                                         or eval_threads <= 0):
            raise ValueError(f"eval_threads must be a positive integer or None, got {eval_threads!r}")
        self.device = resolve_device(device)
        self.model = rule.attach(model.to(self.device))
        self.rule = rule
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.epochs = epochs
        self.batch_size = batch_size
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.callbacks = list(callbacks)
        self.progress = progress
        self.config = dict(config or {})
        self.eval_train = eval_train
        self.check_grads = check_grads
        self.eval_threads = eval_threads
        self.generator = torch.Generator().manual_seed(seed)  # the shuffling stream
        self.history = History()
        self.epoch = 0  # epochs completed
        self.global_step = 0

    # --- one step -------------------------------------------------------------------------
    def step(self, xb: Tensor, yb: Tensor) -> float:
        """One update. Raises :class:`NonFiniteError` before ``optimizer.step()`` if anything is not finite."""
        self.optimizer.zero_grad(set_to_none=True)
        try:
            loss = self.rule.grads(self.model, xb, yb)
        except NonFiniteError as e:
            raise NonFiniteError(f"{e} (epoch {self.epoch + 1}, step {self.global_step + 1})") from None
        if not math.isfinite(loss):
            raise NonFiniteError(f"non-finite loss {loss} at epoch {self.epoch + 1}, step {self.global_step + 1}")
        if self.check_grads:
            grads = [p.grad for p in trainable_parameters(self.model) if p.grad is not None]
            if grads and not bool(torch.stack([g.isfinite().all() for g in grads]).all()):
                raise NonFiniteError(
                    f"non-finite gradient at epoch {self.epoch + 1}, step {self.global_step + 1}"
                )
        self.optimizer.step()
        return loss

    # --- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        rng: dict[str, Any] = {"shuffle": self.generator.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "rule": self.rule.state_dict(),
            "rng": rng,
            "epoch": self.epoch,
            "global_step": self.global_step,
            "history": self.history.epochs,
            "config": self.config,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.rule.load_state_dict(state["rule"])
        self.generator.set_state(state["rng"]["shuffle"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        self.history = History([dict(r) for r in state["history"]])

    def save_checkpoint(self) -> None:
        if self.out_dir is None:
            return
        _atomic_save(self.state_dict(), self.out_dir / CHECKPOINT)
        lines = "".join(json.dumps(r) + "\n" for r in self.history.epochs)
        _atomic_write_text(lines, self.out_dir / METRICS)

    def resume(self) -> bool:
        """Load ``<out_dir>/checkpoint.pt`` if it exists; return whether it did."""
        if self.out_dir is None:
            raise ValueError("resume needs an output directory")
        path = self.out_dir / CHECKPOINT
        if not path.exists():
            return False
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{path}: cannot read the checkpoint ({e})") from e
        try:
            self.load_state_dict(state)
        except (KeyError, TypeError, AttributeError) as e:  # a foreign file that torch could read
            raise ValueError(f"{path}: not a forwardlearn checkpoint ({type(e).__name__}: {e})") from None
        return True

    # --- the loop ---------------------------------------------------------------------------
    def fit(self, train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor] | None = None,
            resume: bool = False) -> History:
        X, y = (t.to(self.device) for t in train)
        Xt, yt = (t.to(self.device) for t in test) if test is not None else (None, None)
        if len(X) != len(y) or len(X) == 0:
            raise ValueError(f"training inputs and targets must be non-empty and equally long ({len(X)} vs {len(y)})")
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if resume:
                self.resume()
        for cb in self.callbacks:
            cb.on_train_begin(self)
        n = len(X)
        steps_per_epoch = math.ceil(n / self.batch_size)
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.epochs * steps_per_epoch, initial=self.epoch * steps_per_epoch,
                       desc=self.rule.name or "train", unit="step", dynamic_ncols=True, leave=False)
        self.model.train()
        while self.epoch < self.epochs:
            perm = torch.randperm(n, generator=self.generator).to(self.device)
            t0, c0 = time.perf_counter(), time.process_time()
            total, count = 0.0, 0
            for i in range(steps_per_epoch):
                idx = perm[i * self.batch_size : (i + 1) * self.batch_size]
                loss = self.step(X[idx], y[idx])
                self.global_step += 1
                total += loss * len(idx)
                count += len(idx)
                for cb in self.callbacks:
                    cb.on_step_end(self, self.global_step, loss)
                if bar is not None:
                    bar.update(1)
                    if i % 10 == 0:
                        bar.set_postfix(epoch=self.epoch + 1, loss=f"{total / count:.4f}")
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            seconds = time.perf_counter() - t0
            cpu_seconds = time.process_time() - c0
            if self.scheduler is not None:
                self.scheduler.step()
            t1 = time.perf_counter()
            record: dict[str, float] = {"epoch": self.epoch + 1, "loss": total / count, "seconds": seconds,
                                        "cpu_seconds": cpu_seconds}
            threads = torch.get_num_threads()
            if self.eval_threads is not None:  # evaluation is not timed: it may use more cores than training
                torch.set_num_threads(self.eval_threads)
            try:
                if self.eval_train:
                    record["train_acc"] = accuracy(self.rule, self.model, X, y)
                if Xt is not None:
                    record["test_acc"] = accuracy(self.rule, self.model, Xt, yt)
            finally:
                torch.set_num_threads(threads)
            record["eval_seconds"] = time.perf_counter() - t1
            self.epoch += 1
            self.history.epochs.append(record)
            self.save_checkpoint()
            if bar is not None:
                bar.set_postfix(epoch=self.epoch, loss=f"{record['loss']:.4f}",
                                acc=f"{record.get('test_acc', record.get('train_acc', float('nan'))):.3f}")
            for cb in self.callbacks:
                cb.on_epoch_end(self, record)
        if bar is not None:
            bar.close()
        for cb in self.callbacks:
            cb.on_train_end(self)
        return self.history


def train(
    model: nn.Module,
    rule: Rule,
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor] | None = None,
    *,
    optimizer: torch.optim.Optimizer | str = "adam",
    lr: float = 1e-3,
    epochs: int = 10,
    batch_size: int = 64,
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
    """Train ``model`` with ``rule``; return the per-epoch :class:`History`.

    ``optimizer`` is a ``torch.optim.Optimizer`` built over the attached model's parameters, or a
    name (``sgd``, ``adam``, ``adamw``) built here with ``lr``. ``scheduler`` is a factory
    ``optimizer -> LRScheduler``, stepped once per epoch.
    """
    dev = resolve_device(device)
    model = rule.attach(model.to(dev))
    if isinstance(optimizer, str):
        optimizer = make_optimizer(optimizer, trainable_parameters(model), lr)
    sched = scheduler(optimizer) if scheduler is not None else None
    trainer = Trainer(model, rule, optimizer, epochs=epochs, batch_size=batch_size, scheduler=sched, seed=seed,
                      out_dir=out_dir, callbacks=callbacks, progress=progress, device=dev, config=config,
                      eval_train=eval_train)
    return trainer.fit(train, test, resume=resume)
