"""The seed-and-scalar step of data-parallel training over ``torch.distributed``.

Every rank draws its own directions (seeds from :func:`~forwardlearn.distributed.wire.stream_seed`
of the run seed, the global step and the rank), evaluates them on its own shard of the data (a
``DistributedSampler``) with the rule's ``estimate``, and the ranks ``all_gather`` the
``(seed, scalar)`` records (:mod:`~forwardlearn.distributed.wire`: 12 bytes per direction). Every
rank then applies every update, regenerating the directions from the seeds with the rule's
``apply`` and stepping its own copy of the optimizer, so the parameters never travel. Weights are
snapshotted before ``estimate`` and copied back after it, so the rounding left by perturbing and
restoring (which depends on the rank's own seeds) cannot make the ranks drift apart; a parameter
checksum is compared every ``checksum_every`` steps anyway and a mismatch stops the run.

:class:`SeedScalarStep` is a step strategy of the one training loop
(:class:`forwardlearn.training.loop.Trainer`); :class:`Faults` injects deliberate faults to test the
fault handling.
"""

from __future__ import annotations

import math
import os
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DistributedSampler

from ..data.batches import Inputs, take
from ..rules.base import SeedScalarRule, check_int, require_seed_scalar, trainable_parameters
from ..training.checkpoint import CHECKPOINT, atomic_save
from ..training.loop import Trainer
from ..training.strategies import Strategy
from .exchange import Exchange
from .replay import UpdateLog
from .wire import (
    STATUS_FAILED,
    STATUS_OK,
    ExchangeError,
    checksum,
    compare_checksums,
    decode,
    encode,
    record_bytes,
    stream_seed,
    validate,
)

__all__ = ["BASE", "Faults", "SeedScalarStep"]

BASE = "base.pt"


# --- fault injection (for testing the fault handling) ------------------------------------------


@dataclass
class Faults:
    """Deliberate faults, each ``(rank, step)``: SIGKILL the rank at the start of the step (first attempt
    of an elastic run only), make it send a NaN scalar, or nudge one of its weights by one ulp."""

    kill: tuple[int, int] | None = None
    nonfinite: tuple[int, int] | None = None
    desync: tuple[int, int] | None = None

    @staticmethod
    def parse(text: str | None, what: str) -> tuple[int, int] | None:
        if text is None:
            return None
        rank, sep, step = text.partition(":")
        try:
            out = (int(rank), int(step))
        except ValueError:
            out = None
        if not sep or out is None or out[0] < 0 or out[1] < 1:
            raise ValueError(f"{what} takes RANK:STEP (step counted from 1), got {text!r}")
        return out


# --- the step strategy ------------------------------------------------------------------------------


class SeedScalarStep(Strategy):
    """The loop's step for seed-and-scalar exchange: each rank's shard of an epoch (a ``DistributedSampler``),
    ``estimate`` on every rank this process plays, ``all_gather`` of the records, ``apply`` of all of them and
    one optimizer step on every rank. Rank 0 alone evaluates, checkpoints and writes the update log."""

    name = "seed_scalar"

    def __init__(self, rule: SeedScalarRule, *, seed: int, exchange: Exchange | None = None,
                 ranks: Sequence[int] | None = None, world_size: int | None = None, checksum_every: int = 50,
                 update_log: str | os.PathLike | None = None, max_scalar: float = 1e6,
                 faults: Faults | None = None) -> None:
        require_seed_scalar(rule, "distributed training by seed exchange")
        check_int(checksum_every, "checksum_every", 0)
        if not (max_scalar > 0):
            raise ValueError(f"max_scalar must be positive, got {max_scalar!r}")
        self.exchange = exchange or Exchange()
        self.ranks = list(ranks) if ranks is not None else [self.exchange.rank]
        self.world_size = world_size or (self.exchange.world_size if exchange is not None else len(self.ranks))
        if exchange is not None and len(self.ranks) != 1:
            raise ValueError("a process in a process group plays exactly one rank")
        if exchange is None and len(self.ranks) != self.world_size:
            raise ValueError(f"without an exchange one process plays all {self.world_size} ranks, "
                             f"got ranks {self.ranks}")
        if any(not 0 <= r < self.world_size for r in self.ranks):
            raise ValueError(f"ranks {self.ranks} outside 0..{self.world_size - 1}")
        self.seed = seed
        self.checksum_every = checksum_every
        self.update_log_path = Path(update_log) if update_log is not None else None
        self.max_scalar = float(max_scalar)
        self.faults = faults or Faults()
        self.directions = int(rule.directions)
        self.log: UpdateLog | None = None
        self._resumed_log_records = 0
        self._bytes_mark = 0

    @property
    def is_writer(self) -> bool:
        return 0 in self.ranks

    @property
    def wire_bytes_per_step(self) -> int:
        """Payload of the all_gather each rank receives per step: ``world_size`` records."""
        return self.world_size * record_bytes(self.directions)

    def _bytes(self) -> int:
        return self.exchange.bytes_received + self.exchange.bytes_sent

    # --- batching: every rank its own shard -----------------------------------------------------------
    def steps_per_epoch(self, trainer: Trainer, n: int) -> int:
        return math.ceil(math.ceil(n / self.world_size) / trainer.batch_size)

    def batches(self, trainer: Trainer, n: int) -> list[dict[int, Tensor]]:
        bs = trainer.batch_size
        shards = {}
        for r in self.ranks:
            sampler = DistributedSampler(range(n), num_replicas=self.world_size, rank=r, shuffle=True,
                                         seed=self.seed, drop_last=False)
            sampler.set_epoch(trainer.epoch)
            shards[r] = list(sampler)
        return [{r: torch.tensor(idx[i * bs : (i + 1) * bs], device=trainer.device) for r, idx in shards.items()}
                for i in range(self.steps_per_epoch(trainer, n))]

    def gather(self, trainer: Trainer, X: Inputs, y: Tensor, item: dict[int, Tensor]) -> dict[int, Any]:
        return {r: (take(X, sel), y[sel]) for r, sel in item.items()}

    # --- one step -------------------------------------------------------------------------------------
    def _contribution(self, trainer: Trainer, rank: int, xb: Inputs, yb: Tensor,
                      snapshot: list[Tensor]) -> tuple[Tensor, BaseException | None]:
        params = trainable_parameters(trainer.model)
        step = trainer.global_step + 1
        trainer.rule.generator("cpu").manual_seed(stream_seed(self.seed, step, rank))
        error: BaseException | None = None
        try:
            seeds, scalars, loss = trainer.rule.estimate(trainer.model, xb, yb)
            status = STATUS_OK
        except (RuntimeError, ValueError) as e:
            error = e
            seeds, scalars, loss, status = [0] * self.directions, torch.zeros(self.directions), 0.0, STATUS_FAILED
        finally:
            with torch.no_grad():
                for p, s in zip(params, snapshot):
                    p.copy_(s)
        scalars = scalars.detach().to(torch.float64).clone()
        if self.faults.nonfinite == (rank, step):
            scalars[0] = float("nan")
        return encode(step, seeds, scalars, loss, status), error

    def step(self, trainer: Trainer, batches: dict[int, tuple[Inputs, Tensor]]) -> tuple[float, float]:
        step = trainer.global_step + 1
        if self.faults.kill is not None and self.faults.kill[1] == step and self.faults.kill[0] in self.ranks \
                and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
            os.kill(os.getpid(), signal.SIGKILL)
        model, rule, optimizer = trainer.model, trainer.rule, trainer.optimizer
        params = trainable_parameters(model)
        with torch.no_grad():
            snapshot = [p.detach().clone() for p in params]
        bufs, errors = [], {}
        for r in self.ranks:
            buf, err = self._contribution(trainer, r, *batches[r], snapshot)
            bufs.append(buf)
            if err is not None:
                errors[r] = err
        gathered = self.exchange.all_gather(bufs[0]) if len(self.ranks) == 1 and self.world_size > 1 else bufs
        records = [decode(b, self.directions, r) for r, b in enumerate(gathered)]
        if errors:
            r, err = next(iter(errors.items()))
            raise ExchangeError(f"rank {r} failed its estimate at step {step}: {err}") from err
        validate(records, step, self.max_scalar)
        seeds = [s for rec in records for s in rec.seeds]
        scalars = torch.cat([rec.scalars for rec in records]).to(torch.float64)
        lr = float(optimizer.param_groups[0]["lr"])  # the rate this step uses, for the update log
        optimizer.zero_grad(set_to_none=True)
        rule.apply(model, seeds, scalars)
        optimizer.step()
        rule.steps += 1
        if self.log is not None:
            self.log.append(step, lr, seeds, scalars.to(torch.float32))
        if self.faults.desync is not None and self.faults.desync[1] == step and self.faults.desync[0] in self.ranks:
            with torch.no_grad():
                p = params[0].view(-1)
                p[0] = torch.nextafter(p[0], p[0] + 1)
        if self.checksum_every and step % self.checksum_every == 0:
            self.verify(model, step)
        return sum(r.loss for r in records) / len(records), 1.0

    def verify(self, model: nn.Module, step: int) -> None:
        """All-gather the parameter checksums and stop with :class:`ExchangeError` if any rank differs."""
        mine = checksum(model)
        if len(self.ranks) == 1 and self.world_size > 1:
            buf = mine.view(torch.uint8)
            sums = [b.clone().view(torch.int64) for b in self.exchange.all_gather(buf)]
        else:
            sums = [mine]
        compare_checksums(sums, step)

    # --- the loop's hooks -----------------------------------------------------------------------------
    def evaluates(self, trainer: Trainer) -> bool:
        return self.is_writer

    def record(self, trainer: Trainer, steps: int) -> dict[str, float]:
        moved, self._bytes_mark = self._bytes() - self._bytes_mark, self._bytes()
        return {"world_size": self.world_size, "wire_bytes_per_step": self.wire_bytes_per_step,
                "measured_bytes_per_step": moved / max(steps, 1)}

    def state_dict(self) -> dict[str, Any]:
        if self.log is not None:
            self.log.flush()
        return {"world_size": self.world_size, "log_records": self.log.records if self.log is not None else 0}

    def load_state_dict(self, state: dict[str, Any], trainer: Trainer) -> None:
        if int(state.get("world_size", self.world_size)) != self.world_size:
            raise ValueError(f"{trainer.out_dir / CHECKPOINT} was written by a {state['world_size']}-rank run; this "
                             f"run has {self.world_size} ranks and would draw different seeds and shards")
        self._resumed_log_records = int(state.get("log_records", 0))

    def begin(self, trainer: Trainer, resumed: bool) -> None:
        self._bytes_mark = self._bytes()
        if self.update_log_path is None or not self.is_writer:
            return
        base = self.update_log_path.with_name(BASE)
        if not resumed:
            if trainer.global_step != 0:
                raise ValueError("an update log starts with the run")
            base.parent.mkdir(parents=True, exist_ok=True)  # the log's folder need not exist yet
            atomic_save({"model": trainer.model.state_dict(), "optimizer": trainer.optimizer.state_dict(),
                         "config": trainer.config}, base)
            self.log = UpdateLog.create(self.update_log_path, self._log_header(trainer))
        else:
            self.log = UpdateLog.reopen(self.update_log_path, self._resumed_log_records)

    def finish(self, trainer: Trainer) -> None:
        self.verify(trainer.model, trainer.global_step)

    def end(self, trainer: Trainer) -> None:
        if self.log is not None:
            self.log.close()

    def _log_header(self, trainer: Trainer) -> dict[str, Any]:
        group = trainer.optimizer.param_groups[0]
        hyper = {k: v for k, v in group.items() if k != "params" and isinstance(v, (int, float, bool, str, tuple))}
        return {
            "rule": trainer.rule.name,
            "rule_options": trainer.config.get("options", {}),
            "optimizer": type(trainer.optimizer).__name__,
            "optimizer_hyper": {k: list(v) if isinstance(v, tuple) else v for k, v in hyper.items()},
            "directions_per_step": self.world_size * self.directions,
            "world_size": self.world_size,
            "base": BASE,
            "config": trainer.config,
            "torch": torch.__version__,
        }
