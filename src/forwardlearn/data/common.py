"""Shared pieces of the data loaders."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor


class DataError(ValueError):
    """A data set is missing, truncated or corrupted; the message names the file and what to do."""


@dataclass(frozen=True)
class DatasetInfo:
    """What the command line needs to know to build a model for a data set."""

    name: str
    shape: tuple[int, ...]  # one example, e.g. (1, 28, 28) or (30,)
    classes: int
    loader: Callable[[str, Path], tuple[Tensor, Tensor]]
    fetcher: Callable[[Path, bool], Path] | None = None
    where: str = ""  # how to obtain the files when they are missing

    @property
    def features(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
