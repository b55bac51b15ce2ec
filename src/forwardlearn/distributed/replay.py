"""The replayable update log: a zeroth-order run as a base checkpoint plus (seed, scalar, lr) per step.

File layout (little-endian)::

    b"FLUPDLOG1\\n" | one line of JSON (the header) | records

    record = int64 step | float64 lr | D x int64 seed | D x float32 scalar      (D = directions per step)

A record is ``16 + 12 D`` bytes, independent of the model size. ``replay(base, log)`` loads the model
and optimizer state of ``base.pt`` and, for every record, regenerates the directions from the seeds
(the rule's ``apply``), sets the learning rate and takes the optimizer step, exactly as the training
run did, so the final weights are bit-identical on the same machine and torch build.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

MAGIC = b"FLUPDLOG1\n"


def record_size(directions: int) -> int:
    """Bytes of one step's record with ``directions`` directions."""
    return 16 + 12 * directions


class UpdateLog:
    """Append-only writer of an update log (use :meth:`create` or :meth:`reopen`)."""

    def __init__(self, path: Path, header: dict[str, Any], f: Any, data_start: int, records: int) -> None:
        self.path = path
        self.header = header
        self.directions = int(header["directions_per_step"])
        self._f = f
        self._data_start = data_start
        self.records = records

    @classmethod
    def create(cls, path: str | os.PathLike, header: dict[str, Any]) -> UpdateLog:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        head = MAGIC + (json.dumps(header, sort_keys=True) + "\n").encode()
        f = open(path, "wb")
        f.write(head)
        f.flush()
        return cls(path, header, f, len(head), 0)

    @classmethod
    def reopen(cls, path: str | os.PathLike, records: int) -> UpdateLog:
        """Open an existing log to append after its first ``records`` records; later bytes (steps applied
        after the checkpoint that is being resumed, or a torn last record) are cut off."""
        path = Path(path)
        header, start = read_header(path)
        size = record_size(int(header["directions_per_step"]))
        end = start + records * size
        if path.stat().st_size < end:
            raise ValueError(f"{path} holds fewer than the {records} records the checkpoint expects")
        f = open(path, "r+b")
        f.truncate(end)
        f.seek(end)
        return cls(path, header, f, start, records)

    def append(self, step: int, lr: float, seeds: list[int], scalars: Tensor) -> None:
        if len(seeds) != self.directions or scalars.numel() != self.directions:
            raise ValueError(f"a record of this log has {self.directions} directions, got {len(seeds)}")
        if step != self.records + 1:
            raise ValueError(f"update log {self.path}: step {step} does not follow step {self.records}")
        parts = [torch.tensor([step], dtype=torch.int64), torch.tensor([lr], dtype=torch.float64),
                 torch.tensor(seeds, dtype=torch.int64), scalars.detach().cpu().to(torch.float32).reshape(-1)]
        self._f.write(b"".join(p.numpy().tobytes() for p in parts))
        self.records += 1

    def flush(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        if not self._f.closed:
            self.flush()
            self._f.close()


def read_header(path: str | os.PathLike) -> tuple[dict[str, Any], int]:
    """``(header, offset of the first record)``; a file that is not an update log raises ``ValueError``."""
    path = Path(path)
    with open(path, "rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            raise ValueError(f"{path} is not a forwardlearn update log")
        line = f.readline()
        try:
            header = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: unreadable header ({e})") from None
        d = header.get("directions_per_step") if isinstance(header, dict) else None
        if isinstance(d, bool) or not isinstance(d, int) or d < 1 or not isinstance(header.get("config"), dict):
            raise ValueError(f"{path}: header lacks a positive directions_per_step or a config table")
        return header, f.tell()


def read_records(path: str | os.PathLike) -> Iterator[tuple[int, float, list[int], Tensor]]:
    """Yield ``(step, lr, seeds, scalars)`` for every complete record."""
    header, start = read_header(path)
    d = int(header["directions_per_step"])
    size = record_size(d)
    with open(path, "rb") as f:
        f.seek(start)
        expected = 1
        while True:
            raw = f.read(size)
            if len(raw) < size:
                if raw:
                    raise ValueError(f"{path}: torn last record ({len(raw)} of {size} bytes)")
                return
            buf = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
            step = int(buf[0:8].view(torch.int64))
            if step != expected:
                raise ValueError(f"{path}: record {expected} holds step {step}")
            lr = float(buf[8:16].view(torch.float64))
            seeds = buf[16 : 16 + 8 * d].view(torch.int64).tolist()
            scalars = buf[16 + 8 * d :].view(torch.float32).clone()
            expected += 1
            yield step, lr, seeds, scalars


def build_from_config(cfg: dict[str, Any]) -> tuple[nn.Module, Any, torch.optim.Optimizer]:
    """Model, rule and optimizer as the run that wrote ``cfg`` built them (before loading any state)."""
    from ..training.run import build_run

    run = build_run(cfg, device="cpu", load_data=False)
    return run.model, run.rule, run.optimizer


def replay(base: str | os.PathLike, log: str | os.PathLike, steps: int | None = None) -> tuple[nn.Module, int]:
    """Rebuild the weights at the end of ``log`` (or after ``steps`` steps) from the base checkpoint.

    Returns ``(model, steps replayed)``.
    """
    header, _ = read_header(log)
    from ..rules.base import require_seed_scalar
    from ..training.checkpoint import load_checkpoint

    state = load_checkpoint(base, ("model", "optimizer"))
    cfg = state.get("config") or header["config"]
    model, rule, optimizer = build_from_config(cfg)
    require_seed_scalar(rule, "replay")
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except (KeyError, TypeError, AttributeError, RuntimeError, ValueError) as e:  # a checkpoint of another run
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{base}: not the base checkpoint of this update log ({type(e).__name__}: {why[:200]})") \
            from None
    done = 0
    for step, lr, seeds, scalars in read_records(log):
        if steps is not None and step > steps:
            break
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        rule.apply(model, seeds, scalars.to(torch.float64))
        optimizer.step()
        done = step
    if steps is not None and done < steps:
        raise ValueError(f"{log} holds only {done} steps, {steps} were asked for")
    return model, done
