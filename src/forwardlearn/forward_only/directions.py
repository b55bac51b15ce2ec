"""Random directions regenerated from integer seeds, chunk by chunk: the sampler of every
seed-and-scalar rule (``zo_spsa``, ``forward_gradient``) and of the federated and distributed exchanges.

A direction is never stored: its seed regenerates it chunk by chunk, on any device, bit for bit.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator

import torch
from torch import Tensor

_MASK64 = (1 << 64) - 1
_BITS = 31  # torch's int32 random_() fills bits 0..30
_WORDS = 16384  #: random int32 words per chunk
CHUNK = _WORDS * _BITS  #: elements per generated chunk (507904 signs, 1.9 MiB: stays in the L2/L3 cache)
_SHIFTS: dict[torch.device, Tensor] = {}
_SIGN = -(2**31)  # int32 with only the sign bit set
_ONE = 0x3F800000  # bit pattern of float32 1.0
DISTRIBUTIONS = ("rademacher", "gaussian")


def mix_seed(seed: int, index: int) -> int:
    """A 63-bit generator seed for chunk ``index`` of direction ``seed`` (SplitMix64 finaliser)."""
    z = (int(seed) * 0x9E3779B97F4A7C15 + (int(index) + 1) * 0xD1B54A32D192ED03) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def draw_seeds(generator: torch.Generator, k: int) -> list[int]:
    """``k`` per-direction integer seeds from the rule's own (CPU) stream."""
    return [int(s) for s in torch.randint(0, 2**62, (k,), generator=generator).tolist()]


def _offsets(numels: list[int]) -> list[int]:
    """Where each parameter starts in the concatenation of all of them, and the total: ``[0, n0, n0+n1, ...]``."""
    return [0, *itertools.accumulate(numels)]


def _spans(offsets: list[int], c0: int, c1: int, first: int, last: int) -> Iterator[tuple[int, int, int]]:
    """``(i, a, b)`` for each parameter ``first <= i < last`` whose range meets ``[c0, c1)``; ``[a, b)`` is the
    non-empty overlap, in positions of the concatenation."""
    i = max(first, bisect.bisect_right(offsets, c0) - 1)
    while i < last and offsets[i] < c1:
        a, b = max(offsets[i], c0), min(offsets[i + 1], c1)
        if b > a:
            yield i, a, b
        i += 1


class Directions:
    """Random directions ``z`` over the trained parameters, regenerated from an integer seed.

    ``z`` lives on the concatenation of the flattened parameters (in ``model.parameters()`` order),
    cut into chunks of :data:`CHUNK` elements; chunk ``j`` of direction ``seed`` is the stream of a
    generator seeded with ``mix_seed(seed, j)``. Nothing is stored: the same seed gives the
    bit-identical direction on the same machine and torch build, any chunk can be made on its own
    (so a parameter's slice costs only its chunks), and no temporary is larger than one chunk.

    ``rademacher`` (+-1, the symmetric Bernoulli of SPSA, Spall 1992) is made from random 31-bit
    words: each bit becomes the sign bit of a float32 ``1.0``, i.e. 1/31 of a random draw per element
    plus three integer passes over a cache-resident chunk. ``gaussian`` uses ``normal_`` (float32).
    Both have ``E[z] = 0`` and ``E[z z^T] = I``, all the unbiasedness of the estimators needs.

    Speed: a sweep over the weights costs a few kernel launches per chunk, so chunks are large enough
    (:data:`CHUNK`) for the launches to vanish and for each operation to run on every thread, yet small
    enough to stay in cache; :meth:`pieces` writes every chunk of a sweep into one buffer.
    """

    def __init__(self, distribution: str = "rademacher") -> None:
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {', '.join(DISTRIBUTIONS)}, got {distribution!r}")
        self.distribution = distribution
        self._cache: tuple[int, int, torch.device, Tensor] | None = None

    def chunk(self, seed: int, j: int, m: int, device: torch.device, out: Tensor | None = None,
              generator: torch.Generator | None = None) -> Tensor:
        """Chunk ``j`` (``m`` elements, float32) of direction ``seed``: a fresh tensor, or a view of
        ``out`` (a buffer of at least ``CHUNK`` float32-sized elements, overwritten)."""
        g = generator if generator is not None else torch.Generator(device=device)
        g.manual_seed(mix_seed(seed, j))
        if self.distribution == "gaussian":
            z = torch.empty(m, device=device) if out is None else out.view(torch.float32).view(-1)[:m]
            return z.normal_(generator=g)
        if device not in _SHIFTS:
            _SHIFTS[device] = torch.arange(1, _BITS + 1, dtype=torch.int32, device=device).unsqueeze(1)
        w = -(-m // _BITS)  # ceil(m / 31) words
        words = torch.empty(w, dtype=torch.int32, device=device).random_(generator=g)  # bits 0..30 fair
        if out is None:
            bits = torch.bitwise_left_shift(words, _SHIFTS[device])  # (31, w): bit 31-b moves to the sign bit
        else:
            bits = out.view(torch.int32).view(-1)[: _BITS * w].view(_BITS, w)
            torch.bitwise_left_shift(words, _SHIFTS[device], out=bits)
        bits.bitwise_and_(_SIGN).bitwise_or_(_ONE)
        return bits.view(torch.float32).view(-1)[:m]

    def pieces(self, seed: int, numels: list[int], device: torch.device,
               only: int | None = None) -> Iterator[tuple[int, int, int, Tensor]]:
        """Yield ``(i, start, stop, z_i[start:stop])`` (float32) covering every parameter (or only ``only``).

        Every chunk of one call is written into the same buffer: a yielded piece is valid until the
        iterator advances past its chunk (copy it to keep it)."""
        offsets = _offsets(numels)
        total = offsets[-1]
        first, last = (0, len(numels)) if only is None else (only, only + 1)
        buf: Tensor | None = None
        gen: torch.Generator | None = None
        for j in range(offsets[first] // CHUNK, -(-offsets[last] // CHUNK)):
            c0 = j * CHUNK
            m = min(CHUNK, total - c0)
            key = (seed, j, device)
            if self._cache is not None and self._cache[:3] == key:
                z = self._cache[3]
            else:
                if buf is None:
                    buf = torch.empty(_BITS * -(-min(CHUNK, total) // _BITS), device=device)  # room for any chunk
                    gen = torch.Generator(device=device)
                z = self.chunk(seed, j, m, device, out=buf, generator=gen)
                self._cache = (*key, z)
            for i, a, b in _spans(offsets, c0, c0 + m, first, last):
                yield i, a - offsets[i], b - offsets[i], z[a - c0 : b - c0]

    def add_terms_(self, flats: list[Tensor], terms: list[tuple[int, float]], decay: float = 1.0,
                   overwrite: list[bool] | None = None) -> None:
        """``flats[i] <- decay * flats[i] + sum_k alpha_k z_k`` in place for ``terms = [(seed_k, alpha_k)]``.

        One sweep over the parameters: for every chunk, each direction's piece is made in turn in a single
        shared buffer and added at once, so the temporary memory is one chunk whatever ``len(terms)``.
        Where ``overwrite[i]``, the first term is written instead of added (``flats[i]`` is a fresh buffer:
        its contents and ``decay`` are ignored)."""
        if not flats:
            return
        offsets = _offsets([f.numel() for f in flats])
        total = offsets[-1]
        device = flats[0].device
        buf = torch.empty(_BITS * -(-min(CHUNK, total) // _BITS), device=device)
        gen = torch.Generator(device=device)
        is_fresh = overwrite or [False] * len(flats)
        for j in range(-(-total // CHUNK)):
            c0 = j * CHUNK
            m = min(CHUNK, total - c0)
            slices = [(flats[i][a - offsets[i] : b - offsets[i]], a - c0, b - c0, is_fresh[i])
                      for i, a, b in _spans(offsets, c0, c0 + m, 0, len(flats))]
            if decay != 1.0:
                for f, _, _, fresh in slices:
                    if not fresh:
                        f.mul_(decay)
            for k, (seed, alpha) in enumerate(terms):
                z = self.chunk(seed, j, m, device, out=buf, generator=gen)
                for f, a, b, fresh in slices:
                    piece = z[a:b]
                    piece = piece if piece.dtype == f.dtype else piece.to(f.dtype)
                    if fresh and k == 0:
                        torch.mul(piece, alpha, out=f)
                    else:
                        f.add_(piece, alpha=alpha)

    def param(self, seed: int, numels: list[int], i: int, like: Tensor) -> Tensor:
        """The slice of direction ``seed`` on parameter ``i`` as a tensor shaped like ``like``."""
        out = torch.empty(like.numel(), dtype=like.dtype, device=like.device)
        for _, a, b, z in self.pieces(seed, numels, like.device, only=i):
            out[a:b].copy_(z)
        return out.view_as(like)

    def add_(self, flats: list[Tensor], seed: int, alpha: float, overwrite: list[bool] | None = None) -> None:
        """``flats[i] += alpha * z_i`` in place for every parameter, chunk by chunk (``flats[i] = alpha * z_i``
        where ``overwrite[i]``: no need to zero a fresh buffer first)."""
        self.add_terms_(flats, [(seed, alpha)], overwrite=overwrite)


def flat_view(t: Tensor, what: str) -> Tensor:
    """A 1-D view of a contiguous tensor (parameters and gradients are updated through it)."""
    if not t.is_contiguous():
        raise ValueError(f"{what} is not contiguous; forward-only rules update parameters in place through a flat view")
    return t.detach().view(-1)

