"""Data-parallel training by seed and scalar exchange over ``torch.distributed``.

:class:`SeedScalarTrainer` is the one training loop (:class:`forwardlearn.training.loop.Trainer`, which
brings the scheduler, callbacks, CPU timing and the checkpoint format) with the seed-and-scalar step
(:class:`~forwardlearn.distributed.step.SeedScalarStep`: every rank estimates ``(seed, scalar)`` records on
its shard, the ranks ``all_gather`` them over an :mod:`~forwardlearn.distributed.exchange`, every rank
applies all of them); :func:`train_distributed` builds the run of a config and trains it.

The same loop runs one process that *emulates* ``world_size`` ranks serially (``ranks=range(W)``,
no process group): it gives bit-identically the weights of a real ``W``-rank run.

Launch: ``torchrun --nproc-per-node 2 -m forwardlearn train --rule zo_spsa --distributed ...``
(``gloo`` on CPU, ``nccl`` on CUDA). Rank 0 writes ``checkpoint.pt`` every ``checkpoint_every``
steps and at every epoch end; a restarted run (``torchrun --max-restarts``) resumes from it with
the data order, the seeds and the optimizer state of the uninterrupted run.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..data.batches import Inputs
from ..rules.base import Rule, require_seed_scalar
from ..training.loop import Callback, Trainer
from ..training.optim import resolve_device
from .exchange import Exchange, TorchExchange, _init_process_group, init_process_group
from .step import Faults, SeedScalarStep

__all__ = [
    "Exchange",
    "Faults",
    "SeedScalarStep",
    "SeedScalarTrainer",
    "TorchExchange",
    "init_process_group",
    "train_distributed",
]


class _EpochLines(Callback):
    """One printed line per record (rank 0), instead of a progress bar."""

    def on_epoch_end(self, trainer: Trainer, record: dict[str, float]) -> None:
        acc = record.get("test_acc", record.get("train_acc", float("nan")))
        print(f"epoch {trainer.epoch}/{trainer.epochs}: loss {record['loss']:.4f}, acc {acc:.4f}, "
              f"{record['seconds']:.2f} s, {record['wire_bytes_per_step']} B/step all_gather payload", flush=True)


# --- the trainer ----------------------------------------------------------------------------------


class SeedScalarTrainer(Trainer):
    """The training loop (:class:`forwardlearn.Trainer`) with the :class:`SeedScalarStep`: each step is
    ``estimate`` on every rank, ``all_gather``, ``apply`` everywhere.

    Args:
        model, rule, optimizer: as for :class:`forwardlearn.Trainer` (the model attached, on its device);
            ``rule`` must be a :class:`~forwardlearn.rules.base.SeedScalarRule` (``zo_spsa``, ``forward_gradient``).
        epochs, batch_size: ``batch_size`` is per rank (the global batch is ``world_size`` times it).
        seed: seeds the data order and every rank's direction stream.
        exchange: the transport (``TorchExchange`` under ``torchrun``); ``None`` = this process alone.
        ranks: the ranks this process plays; default ``[exchange.rank]``. ``range(W)`` with no exchange
            emulates a ``W``-rank run serially.
        world_size: number of ranks (default the exchange's, or ``len(ranks)`` when emulating).
        out_dir: where rank 0 writes ``checkpoint.pt`` and ``metrics.jsonl``.
        checkpoint_every: also checkpoint every this many steps (0: at epoch ends only).
        checksum_every: compare the parameter checksums of all ranks every this many steps.
        update_log: path of the replayable update log (written by rank 0 beside ``base.pt``).
        max_scalar: a scalar of larger magnitude from any rank is rejected as malformed.
        progress: rank 0 prints one line per epoch.
        scheduler, callbacks, eval_train: as for :class:`forwardlearn.Trainer`.
    """

    def __init__(
        self,
        model: nn.Module,
        rule: Rule,
        optimizer: torch.optim.Optimizer,
        *,
        epochs: int,
        batch_size: int,
        seed: int = 0,
        exchange: Exchange | None = None,
        ranks: Sequence[int] | None = None,
        world_size: int | None = None,
        out_dir: str | os.PathLike | None = None,
        checkpoint_every: int = 0,
        checksum_every: int = 50,
        update_log: str | os.PathLike | None = None,
        max_scalar: float = 1e6,
        config: dict[str, Any] | None = None,
        faults: Faults | None = None,
        progress: bool = False,
        eval_train: bool = True,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        callbacks: Sequence[Callback] = (),
    ) -> None:
        step = SeedScalarStep(rule, seed=seed, exchange=exchange, ranks=ranks, world_size=world_size,
                              checksum_every=checksum_every, update_log=update_log, max_scalar=max_scalar,
                              faults=faults)
        lines = [_EpochLines()] if progress and step.is_writer else []
        device = next(model.parameters()).device
        super().__init__(model, rule, optimizer, epochs=epochs, batch_size=batch_size, strategy=step,
                         scheduler=scheduler, seed=seed, out_dir=out_dir, callbacks=[*callbacks, *lines],
                         progress=False, device=device, config=config, eval_train=eval_train,
                         checkpoint_every=checkpoint_every)

    @property
    def is_writer(self) -> bool:
        """Whether this process writes checkpoints, metrics and the log (rank 0 or the emulator)."""
        return self.strategy.is_writer

    @property
    def world_size(self) -> int:
        return self.strategy.world_size

    @property
    def wire_bytes_per_step(self) -> int:
        return self.strategy.wire_bytes_per_step

    @property
    def exchange(self) -> Exchange:
        return self.strategy.exchange

    def step(self, batches: dict[int, tuple[Inputs, Tensor]]) -> float:
        """One update from the batches of the ranks this process plays; returns the mean loss over ranks."""
        loss = self.strategy.step(self, batches)[0]
        self.global_step += 1
        return loss

    def verify(self, step: int | None = None) -> None:
        """All-gather the parameter checksums and stop with :class:`ExchangeError` if any rank differs."""
        self.strategy.verify(self.model, self.global_step if step is None else step)


# --- one run of a config ----------------------------------------------------------------------------


def train_distributed(
    config: dict[str, Any],
    out_dir: str | os.PathLike,
    *,
    resume: bool = False,
    distributed: bool = False,
    device: str | torch.device | None = "auto",
    data_dir: str | None = None,
    update_log: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
    checksum_every: int = 50,
    max_scalar: float = 1e6,
    faults: Faults | None = None,
    progress: bool = True,
) -> SeedScalarTrainer:
    """Build the run of ``config`` (:func:`~forwardlearn.training.run.build_run`) and train it by seed and scalar
    exchange: as one rank of the ``torchrun`` process group (``distributed=True``), else as one process (with
    ``update_log``, a replayable single-process run). Returns the trainer (``.history``, ``.is_writer``)."""
    from ..training.run import RESUME_KEYS, build_run, check_resume, run_directory

    device = resolve_device(device)
    created = False
    if distributed:
        created, device = _init_process_group(device)
    try:
        exchange: Exchange | None = TorchExchange(device) if distributed else None
        # an elastic restart (torchrun --max-restarts) resumes from the last checkpoint by itself
        resume = resume or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0"
        out = run_directory(out_dir, resume)  # checked on every rank, so that all of them stop
        run = build_run(config, device=device, data_dir=data_dir)
        require_seed_scalar(run.rule, "distributed training by seed exchange")
        cfg = run.config
        cfg["world_size"] = exchange.world_size if exchange is not None else 1
        cfg["directions"] = int(run.rule.directions)
        if resume:
            check_resume(out, cfg, (*RESUME_KEYS, "world_size", "directions"))
        trainer = SeedScalarTrainer(
            run.model, run.rule, run.optimizer, epochs=cfg["epochs"], batch_size=cfg["batch_size"], seed=cfg["seed"],
            exchange=exchange, out_dir=out, checkpoint_every=checkpoint_every, checksum_every=checksum_every,
            update_log=update_log, max_scalar=max_scalar, config=cfg, faults=faults, progress=progress)
        trainer.fit(run.train, run.test, resume=resume)
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()
    return trainer
