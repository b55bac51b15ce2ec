"""Data-parallel training by seed and scalar exchange over ``torch.distributed``.

Every rank draws its own directions (seeds from :func:`~forwardlearn.distributed.wire.stream_seed`
of the run seed, the global step and the rank), evaluates them on its own shard of the data (a
``DistributedSampler``) with the rule's ``estimate``, and the ranks ``all_gather`` the
``(seed, scalar)`` records (:mod:`~forwardlearn.distributed.wire`: 12 bytes per direction). Every
rank then applies every update, regenerating the directions from the seeds with the rule's
``apply`` and stepping its own copy of the optimizer, so the parameters never travel. Weights are
snapshotted before ``estimate`` and copied back after it, so the rounding left by perturbing and
restoring (which depends on the rank's own seeds) cannot make the ranks drift apart; a parameter
checksum is compared every ``checksum_every`` steps anyway and a mismatch stops the run.

The same loop runs one process that *emulates* ``world_size`` ranks serially (``ranks=range(W)``,
no process group): it gives bit-identically the weights of a real ``W``-rank run.

Launch: ``torchrun --nproc-per-node 2 -m forwardlearn train --rule zo_spsa --distributed ...``
(``gloo`` on CPU, ``nccl`` on CUDA). Rank 0 writes ``checkpoint.pt`` every ``checkpoint_every``
steps and at every epoch end; a restarted run (``torchrun --max-restarts``) resumes from it with
the data order, the seeds and the optimizer state of the uninterrupted run.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DistributedSampler

from ..rules.base import Rule, require_seed_scalar, trainable_parameters
from ..training import History, accuracy, atomic_save, atomic_write_text, load_checkpoint, resolve_device
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

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
BASE = "base.pt"


# --- the exchange -------------------------------------------------------------------------------


class Exchange:
    """``all_gather`` of one ``uint8`` record per rank; counts the payload bytes it moves."""

    def __init__(self, world_size: int = 1, rank: int = 0) -> None:
        self.world_size = world_size
        self.rank = rank
        self.bytes_sent = 0
        self.bytes_received = 0
        self.calls = 0

    def all_gather(self, buf: Tensor) -> list[Tensor]:
        self.calls += 1
        return [buf]


class TorchExchange(Exchange):
    """The exchange over the default ``torch.distributed`` process group (gloo or nccl)."""

    def __init__(self, device: torch.device) -> None:
        import torch.distributed as dist

        super().__init__(dist.get_world_size(), dist.get_rank())
        self._dist = dist
        # nccl only moves device tensors; gloo moves CPU tensors
        self.device = device if dist.get_backend() == "nccl" else torch.device("cpu")

    def all_gather(self, buf: Tensor) -> list[Tensor]:
        buf = buf.to(self.device)
        out = [torch.empty_like(buf) for _ in range(self.world_size)]
        self._dist.all_gather(out, buf)
        self.calls += 1
        self.bytes_sent += buf.numel() * buf.element_size()
        self.bytes_received += (self.world_size - 1) * buf.numel() * buf.element_size()
        return [o.cpu() for o in out]


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


# --- the trainer ----------------------------------------------------------------------------------


class SeedScalarTrainer:
    """Mini-batch training where each step is ``estimate`` on every rank, ``all_gather``, ``apply`` everywhere.

    Args:
        model, rule, optimizer: as for :class:`forwardlearn.Trainer`; ``rule`` must have the
            seed-and-scalar API (``estimate`` and ``apply``: ``zo_spsa``, ``forward_gradient``).
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
    ) -> None:
        require_seed_scalar(rule, "distributed training by seed exchange")
        for value, what in ((epochs, "epochs"), (batch_size, "batch size")):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{what} must be a positive integer, got {value!r}")
        for value, what in ((checkpoint_every, "checkpoint_every"), (checksum_every, "checksum_every")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{what} must be a non-negative integer, got {value!r}")
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
        self.model = model
        self.rule = rule
        self.optimizer = optimizer
        self.epochs = epochs
        self.batch_size = batch_size
        self.seed = seed
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.checkpoint_every = checkpoint_every
        self.checksum_every = checksum_every
        self.update_log_path = Path(update_log) if update_log is not None else None
        self.max_scalar = float(max_scalar)
        self.config = dict(config or {})
        self.faults = faults or Faults()
        self.progress = progress
        self.eval_train = eval_train
        self.directions = int(rule.directions)
        self.history = History()
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.log: UpdateLog | None = None
        self._epoch_loss = (0.0, 0)  # running (loss sum, steps) of the current epoch

    @property
    def is_writer(self) -> bool:
        """Whether this process writes checkpoints, metrics and the log (rank 0 or the emulator)."""
        return 0 in self.ranks

    @property
    def wire_bytes_per_step(self) -> int:
        """Payload of the all_gather each rank receives per step: ``world_size`` records."""
        return self.world_size * record_bytes(self.directions)

    # --- one step -----------------------------------------------------------------------------
    def _contribution(self, rank: int, xb: Tensor, yb: Tensor,
                      snapshot: list[Tensor]) -> tuple[Tensor, BaseException | None]:
        params = trainable_parameters(self.model)
        step = self.global_step + 1
        self.rule.generator("cpu").manual_seed(stream_seed(self.seed, step, rank))
        error: BaseException | None = None
        try:
            seeds, scalars, loss = self.rule.estimate(self.model, xb, yb)
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

    def step(self, batches: dict[int, tuple[Tensor, Tensor]]) -> float:
        """One update from the batches of the ranks this process plays; returns the mean loss over ranks."""
        step = self.global_step + 1
        if self.faults.kill is not None and self.faults.kill[1] == step and self.faults.kill[0] in self.ranks \
                and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
            os.kill(os.getpid(), signal.SIGKILL)
        params = trainable_parameters(self.model)
        with torch.no_grad():
            snapshot = [p.detach().clone() for p in params]
        bufs, errors = [], {}
        for r in self.ranks:
            buf, err = self._contribution(r, *batches[r], snapshot)
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
        lr = float(self.optimizer.param_groups[0]["lr"])  # the rate this step uses, for the update log
        self.optimizer.zero_grad(set_to_none=True)
        self.rule.apply(self.model, seeds, scalars)
        self.optimizer.step()
        self.rule.steps += 1
        self.global_step = step
        if self.log is not None:
            self.log.append(step, lr, seeds, scalars.to(torch.float32))
        if self.faults.desync is not None and self.faults.desync[1] == step and self.faults.desync[0] in self.ranks:
            with torch.no_grad():
                p = params[0].view(-1)
                p[0] = torch.nextafter(p[0], p[0] + 1)
        if self.checksum_every and step % self.checksum_every == 0:
            self.verify(step)
        return sum(r.loss for r in records) / len(records)

    def verify(self, step: int | None = None) -> None:
        """All-gather the parameter checksums and stop with :class:`ExchangeError` if any rank differs."""
        step = self.global_step if step is None else step
        mine = checksum(self.model)
        if len(self.ranks) == 1 and self.world_size > 1:
            buf = mine.view(torch.uint8)
            sums = [b.clone().view(torch.int64) for b in self.exchange.all_gather(buf)]
        else:
            sums = [mine]
        compare_checksums(sums, step)

    # --- data ------------------------------------------------------------------------------------
    def _shards(self, n: int) -> dict[int, list[int]]:
        out = {}
        for r in self.ranks:
            sampler = DistributedSampler(range(n), num_replicas=self.world_size, rank=r, shuffle=True,
                                         seed=self.seed, drop_last=False)
            sampler.set_epoch(self.epoch)
            out[r] = list(sampler)
        return out

    # --- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rule": self.rule.state_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "epoch_loss": list(self._epoch_loss),
            "global_step": self.global_step,
            "history": self.history.epochs,
            "config": self.config,
            "world_size": self.world_size,
            "log_records": self.log.records if self.log is not None else 0,
        }

    def save_checkpoint(self) -> None:
        if self.out_dir is None or not self.is_writer:
            return
        if self.log is not None:
            self.log.flush()
        atomic_save(self.state_dict(), self.out_dir / CHECKPOINT)
        atomic_write_text("".join(json.dumps(r) + "\n" for r in self.history.epochs), self.out_dir / METRICS)

    def resume(self) -> bool:
        """Load ``<out_dir>/checkpoint.pt`` if it exists (every rank reads it); return whether it did."""
        if self.out_dir is None:
            raise ValueError("resume needs an output directory")
        path = self.out_dir / CHECKPOINT
        if not path.exists():
            return False
        state = load_checkpoint(path, ("model", "optimizer", "rule", "epoch", "global_step", "history"))
        if int(state.get("world_size", self.world_size)) != self.world_size:
            raise ValueError(f"{path} was written by a {state['world_size']}-rank run; this run has "
                             f"{self.world_size} ranks and would draw different seeds and shards")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.rule.load_state_dict(state["rule"])
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])
        total, count = state.get("epoch_loss", (0.0, 0))
        self._epoch_loss = (float(total), int(count))
        self.global_step = int(state["global_step"])
        self.history = History([dict(r) for r in state["history"]])
        self._resumed_log_records = int(state.get("log_records", 0))
        return True

    def _open_log(self, resumed: bool) -> None:
        if self.update_log_path is None or not self.is_writer:
            return
        base = self.update_log_path.with_name(BASE)
        if not resumed:
            if self.global_step != 0:
                raise ValueError("an update log starts with the run")
            atomic_save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                          "config": self.config}, base)
            self.log = UpdateLog.create(self.update_log_path, self._log_header())
        else:
            self.log = UpdateLog.reopen(self.update_log_path, getattr(self, "_resumed_log_records", 0))

    def _log_header(self) -> dict[str, Any]:
        group = self.optimizer.param_groups[0]
        hyper = {k: v for k, v in group.items() if k != "params" and isinstance(v, (int, float, bool, str, tuple))}
        return {
            "rule": self.rule.name,
            "rule_options": self.config.get("options", {}),
            "optimizer": type(self.optimizer).__name__,
            "optimizer_hyper": {k: list(v) if isinstance(v, tuple) else v for k, v in hyper.items()},
            "directions_per_step": self.world_size * self.directions,
            "world_size": self.world_size,
            "base": BASE,
            "config": self.config,
            "torch": torch.__version__,
        }

    # --- the loop ----------------------------------------------------------------------------------
    def fit(self, train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor] | None = None,
            resume: bool = False) -> History:
        device = next(self.model.parameters()).device
        X, y = (t.to(device) for t in train)
        Xt, yt = (t.to(device) for t in test) if test is not None else (None, None)
        if len(X) != len(y) or len(X) == 0:
            raise ValueError(f"training inputs and targets must be non-empty and equally long ({len(X)} vs {len(y)})")
        resumed = False
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if resume:
                resumed = self.resume()
        self._open_log(resumed)
        n = len(X)
        per_rank = math.ceil(n / self.world_size)
        steps_per_epoch = math.ceil(per_rank / self.batch_size)
        self.model.train()
        try:
            while self.epoch < self.epochs:
                shards = self._shards(n)
                t0 = time.perf_counter()
                total, count = self._epoch_loss
                sent0 = self.exchange.bytes_received + self.exchange.bytes_sent
                steps0 = self.global_step
                for i in range(self.step_in_epoch, steps_per_epoch):
                    batches = {}
                    for r, idx in shards.items():
                        sel = torch.tensor(idx[i * self.batch_size : (i + 1) * self.batch_size], device=device)
                        batches[r] = (X[sel], y[sel])
                    loss = self.step(batches)
                    total += loss
                    count += 1
                    self.step_in_epoch = i + 1
                    self._epoch_loss = (total, count)
                    if self.checkpoint_every and self.global_step % self.checkpoint_every == 0 \
                            and self.step_in_epoch < steps_per_epoch:
                        self.save_checkpoint()
                seconds = time.perf_counter() - t0
                self.epoch += 1
                self.step_in_epoch = 0
                self._epoch_loss = (0.0, 0)
                steps = max(self.global_step - steps0, 1)
                record: dict[str, float] = {
                    "epoch": self.epoch, "loss": total / max(count, 1), "seconds": seconds,
                    "world_size": self.world_size,
                    "wire_bytes_per_step": self.wire_bytes_per_step,
                    "measured_bytes_per_step":
                        (self.exchange.bytes_received + self.exchange.bytes_sent - sent0) / steps,
                }
                if self.is_writer:
                    if self.eval_train:
                        record["train_acc"] = accuracy(self.rule, self.model, X, y)
                    if Xt is not None:
                        record["test_acc"] = accuracy(self.rule, self.model, Xt, yt)
                self.history.epochs.append(record)
                self.save_checkpoint()
                if self.progress and self.is_writer:
                    acc = record.get("test_acc", record.get("train_acc", float("nan")))
                    print(f"epoch {self.epoch}/{self.epochs}: loss {record['loss']:.4f}, acc {acc:.4f}, "
                          f"{seconds:.2f} s, {self.wire_bytes_per_step} B/step all_gather payload", flush=True)
            self.verify()
        finally:
            if self.log is not None:
                self.log.close()
        return self.history


# --- launching under torchrun ---------------------------------------------------------------------


def _init_process_group(device: torch.device) -> tuple[bool, torch.device]:
    import torch.distributed as dist

    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        raise ValueError("--distributed needs a torchrun launch (RANK and WORLD_SIZE are not set): "
                         "torchrun --nproc-per-node N -m forwardlearn train --distributed ...")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return False, device
    # Import torch._dynamo (which the first torch.optim optimizer imports anyway) BEFORE the group exists:
    # it imports torch.distributed.nn.functional, whose default arguments (group=group.WORLD) would
    # otherwise capture the default group. destroy_process_group() then cannot free it, gloo's worker
    # threads outlive it, and the interpreter can abort (SIGABRT) at exit after a finished run.
    importlib.import_module("torch._dynamo")

    backend = "nccl" if device.type == "cuda" else "gloo"
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is not None and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # under torchrun: the agent's store, with keys private to this restart attempt, so that a restarted
        # rank can never read the address a killed peer of an earlier attempt published
        world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                              timeout=timedelta(minutes=10))
        dist.init_process_group(backend, store=dist.PrefixStore(f"forwardlearn/attempt_{attempt}/", store),
                                rank=rank, world_size=world)
    else:
        dist.init_process_group(backend)
    return True, device


def init_process_group(device: torch.device | str = "cpu") -> torch.device:
    """Join the ``torchrun`` process group (gloo on CPU, nccl on CUDA); returns this rank's device."""
    return _init_process_group(torch.device(device))[1]


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
