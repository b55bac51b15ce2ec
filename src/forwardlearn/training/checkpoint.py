"""Checkpoints, metrics and the run history: one schema, one atomic writer, one guarded reader.

A checkpoint is a ``dict`` of tensors and plain values (loadable with ``weights_only=True``)::

    model, optimizer (None for a fused step), scheduler, rule    state_dicts
    rng              {"shuffle": ..., "torch": ..., "cuda": ...} (what the strategy draws from)
    epoch            epochs completed
    step_in_epoch    steps of the current epoch done (0 at an epoch end)
    global_step      optimizer steps done
    running_loss     [loss sum, weight] since the last history record
    history          the records of :class:`History`
    config           the run's settings (plain values: see :func:`forwardlearn.training.run.build_run`)
    strategy         what the step strategy keeps (world size, update-log position, ...)

Files are written to a temporary name, fsynced and renamed, so a crash leaves the previous file whole and a
failed write (a full disk) leaves no temporary file. Every read goes through :func:`load_checkpoint`: a missing
file is ``FileNotFoundError``, anything that is not a forwardlearn checkpoint (corrupt, truncated, another
program's file) one line of ``ValueError``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
#: the keys a training checkpoint always has
TRAINING_KEYS = ("model", "optimizer", "rule", "epoch", "global_step", "history", "config")


@dataclass
class History:
    """The records of a run, one per epoch (``epoch, loss, train_acc, test_acc, seconds, cpu_seconds,
    eval_seconds``) or, with ``eval_every``, one per evaluation (the same keys and ``step``).

    ``seconds`` is the wall-clock time of the record's training steps; ``cpu_seconds`` the process CPU time
    they took (all threads), which does not count time the process was paused or waiting for a core."""

    epochs: list[dict[str, float]] = field(default_factory=list)

    @property
    def records(self) -> list[dict[str, float]]:
        return self.epochs

    def column(self, key: str) -> list[float]:
        return [r[key] for r in self.epochs if key in r]

    @property
    def final(self) -> dict[str, float]:
        return self.epochs[-1] if self.epochs else {}

    def __len__(self) -> int:
        return len(self.epochs)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` through a temporary file, fsynced and renamed."""
    path = Path(path)
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


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    """Write ``text`` to ``path`` through a temporary file, fsynced and renamed."""
    path = Path(path)
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


def write_metrics(records: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
    """One JSON line per record (``metrics.jsonl``), written atomically."""
    atomic_write_text("".join(json.dumps(r) + "\n" for r in records), path)


def load_checkpoint(path: str | os.PathLike, keys: Sequence[str] = TRAINING_KEYS,
                    map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a file written with :func:`atomic_save`; it must be a ``dict`` with every key of ``keys``.

    Only tensors and plain values are unpickled (``weights_only=True``). A file that cannot be read that way
    or lacks a key raises ``ValueError("<path>: not a forwardlearn checkpoint (<why>)")``, one line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt, truncated, foreign pickles: all the same to the caller
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: not a forwardlearn checkpoint ({type(e).__name__}: {why[:200]})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a forwardlearn checkpoint (holds a {type(state).__name__}, not a dict)")
    missing = [k for k in keys if k not in state]
    if missing:
        raise ValueError(f"{path}: not a forwardlearn checkpoint (no {', '.join(missing)})")
    return state


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The ``config`` stored in the checkpoint at ``path``."""
    return dict(load_checkpoint(path, keys=("config",))["config"] or {})


__all__ = ["CHECKPOINT", "METRICS", "TRAINING_KEYS", "History", "atomic_save", "atomic_write_text",
           "load_checkpoint", "read_config", "write_metrics"]
