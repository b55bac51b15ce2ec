"""The seed-and-scalar wire format, its validation, per-step seed streams and parameter checksums.

One rank's contribution to one step is a fixed-size byte record::

    int64 step | float32 loss | int32 status | K x int64 seed | K x float32 scalar

16 bytes of header plus 12 bytes per direction, whatever the model size. Scalars travel as float32
and every rank (the sender included) applies the float32 value, so all ranks apply the same update
bit for bit. ``status`` is 0, or :data:`STATUS_FAILED` when the rank's own estimate failed: the rank
still takes part in the collective, so every rank stops together with an error naming it instead of
waiting forever on a peer that left.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

HEADER_BYTES = 16
BYTES_PER_DIRECTION = 12
STATUS_OK = 0
STATUS_FAILED = 1
SEED_LIMIT = 2**62  # seeds drawn by the forward-only rules lie in [0, 2**62)
_MASK64 = (1 << 64) - 1


class ExchangeError(RuntimeError):
    """A rank sent a malformed, non-finite or out-of-step contribution, or the ranks' parameters differ."""


def record_bytes(directions: int) -> int:
    """Size of one rank's record for ``directions`` directions."""
    return HEADER_BYTES + BYTES_PER_DIRECTION * directions


def stream_seed(seed: int, step: int, rank: int) -> int:
    """The seed of rank ``rank``'s direction stream at global step ``step`` (SplitMix64 of the three).

    A pure function of its arguments: a resumed run (or a single process emulating the ranks) draws
    the same directions without any saved generator state.
    """
    z = (int(seed) * 0x9E3779B97F4A7C15 + (int(step) + 1) * 0xBF58476D1CE4E5B9
         + (int(rank) + 1) * 0x94D049BB133111EB) & _MASK64
    for a, b in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        z = ((z ^ (z >> a)) * b) & _MASK64
    return (z ^ (z >> 31)) >> 1


def _bytes_of(t: Tensor) -> Tensor:
    return t.contiguous().view(torch.uint8)


def encode(step: int, seeds: list[int], scalars: Tensor, loss: float, status: int = STATUS_OK) -> Tensor:
    """One rank's record as a ``uint8`` tensor of :func:`record_bytes` ``(len(seeds))`` bytes."""
    if len(seeds) != len(scalars):
        raise ValueError(f"got {len(seeds)} seeds but {len(scalars)} scalars")
    parts = [
        torch.tensor([step], dtype=torch.int64),
        torch.tensor([loss], dtype=torch.float32),
        torch.tensor([status], dtype=torch.int32),
        torch.tensor(list(seeds), dtype=torch.int64),
        scalars.detach().to(device="cpu", dtype=torch.float32),
    ]
    return torch.cat([_bytes_of(p.reshape(-1)) for p in parts])


@dataclass
class Record:
    """A decoded record: what one rank contributed to one step."""

    rank: int
    step: int
    loss: float
    status: int
    seeds: list[int]
    scalars: Tensor  # float32, (K,)


def decode(buf: Tensor, directions: int, rank: int) -> Record:
    """Parse one rank's record; a wrong size raises :class:`ExchangeError` naming ``rank``."""
    buf = buf.detach().to("cpu").reshape(-1)
    if buf.dtype != torch.uint8 or buf.numel() != record_bytes(directions):
        raise ExchangeError(f"rank {rank} sent a malformed record ({buf.numel()} bytes of {buf.dtype}; "
                            f"expected {record_bytes(directions)} uint8 for {directions} directions)")
    k = directions
    step = int(buf[0:8].clone().view(torch.int64))
    loss = float(buf[8:12].clone().view(torch.float32))
    status = int(buf[12:16].clone().view(torch.int32))
    seeds = buf[16 : 16 + 8 * k].clone().view(torch.int64).tolist()
    scalars = buf[16 + 8 * k :].clone().view(torch.float32)
    return Record(rank, step, loss, status, seeds, scalars)


def validate(records: list[Record], step: int, max_scalar: float = 1e6) -> None:
    """Reject the step unless every rank sent a finite, in-range, in-step record.

    Raises :class:`ExchangeError` naming the first offending rank; nothing has been applied yet.
    """
    for r in records:
        if r.status != STATUS_OK:
            raise ExchangeError(f"rank {r.rank} reported a failure of its own estimate at step {step} "
                                "(see that rank's error above); stopping before the update")
        if r.step != step:
            raise ExchangeError(f"rank {r.rank} sent a record for step {r.step} while the run is at step {step}; "
                                "the ranks are out of step")
        bad = [s for s in r.seeds if not 0 <= s < SEED_LIMIT]
        if bad:
            raise ExchangeError(f"rank {r.rank} sent a malformed seed {bad[0]} at step {step} "
                                "(seeds lie in [0, 2**62))")
        finite = torch.isfinite(r.scalars)
        if not bool(finite.all()):
            k = int((~finite).nonzero()[0])
            raise ExchangeError(f"rank {r.rank} sent a non-finite scalar ({float(r.scalars[k])}) for direction {k} "
                                f"at step {step}; stopping before the update")
        big = r.scalars.abs() > max_scalar
        if bool(big.any()):
            k = int(big.nonzero()[0])
            raise ExchangeError(f"rank {r.rank} sent an out-of-range scalar ({float(r.scalars[k])}, limit "
                                f"{max_scalar:g}) for direction {k} at step {step}; stopping before the update")
        if not math.isfinite(r.loss):
            raise ExchangeError(f"rank {r.rank} sent a non-finite loss ({r.loss}) at step {step}")


@torch.no_grad()
def checksum(model: nn.Module) -> Tensor:
    """Two int64 sums over the bit patterns of every parameter and buffer (plain and position-weighted).

    Any single flipped bit changes the first sum; the second catches values swapped between places.
    Integer arithmetic wraps deterministically, so equal parameters give equal checksums everywhere.
    """
    total = torch.zeros(2, dtype=torch.int64)
    for t in list(model.parameters()) + list(model.buffers()):
        flat = t.detach().reshape(-1)
        if flat.is_floating_point():
            bits = {8: torch.int64, 4: torch.int32, 2: torch.int16}[flat.element_size()]
            flat = flat.view(bits)
        v = flat.to(torch.int64)
        pos = torch.arange(1, v.numel() + 1, dtype=torch.int64, device=v.device) % 65521 + 1
        total[0] += int(v.sum())
        total[1] += int((v * pos).sum())
    return total


def compare_checksums(sums: list[Tensor], step: int) -> None:
    """Raise :class:`ExchangeError` naming the first rank whose checksum differs from rank 0's."""
    for rank, s in enumerate(sums[1:], start=1):
        if not torch.equal(s, sums[0]):
            raise ExchangeError(f"parameters differ across ranks at step {step}: rank {rank} has checksum "
                                f"{s.tolist()}, rank 0 {sums[0].tolist()}; stopping")
