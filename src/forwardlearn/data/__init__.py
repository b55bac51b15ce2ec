"""Data sets as in-memory tensors: ``load(name, split) -> (X, y)``, inputs scaled to [0, 1].

Image sets come as ``(N, C, H, W)`` float tensors, tabular sets as ``(N, F)``; labels are ``long``.
``digits`` (scikit-learn's bundled 8x8 digits) is the embedded default and needs no download.
Graphs for node classification (Planetoid files, generated stochastic block models) are in :mod:`.graphs`.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import Tensor

from . import graphs
from .common import DataError, DatasetInfo
from .registry import DATASETS, info

__all__ = ["DATASETS", "graphs", "DataError", "DatasetInfo", "available", "data_dir", "fetch", "info", "load"]


def data_dir(override: str | os.PathLike | None = None) -> Path:
    """Where downloaded data lives: ``override``, else ``$FORWARDLEARN_DATA``, else ``~/.cache/forwardlearn``."""
    if override is not None:
        return Path(override).expanduser()
    env = os.environ.get("FORWARDLEARN_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "forwardlearn"


def available() -> list[str]:
    """Names of every data set ``load`` knows."""
    return sorted(DATASETS)


def load(name: str, split: str = "train", root: str | os.PathLike | None = None) -> tuple[Tensor, Tensor]:
    """Load a data set split as ``(X, y)`` tensors. ``root`` overrides :func:`data_dir`."""
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    return info(name).loader(split, data_dir(root))


def fetch(name: str, root: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Download a data set into the cache directory, verifying every file; return its folder."""
    spec = info(name)
    if spec.fetcher is None:
        raise DataError(f"data set {name!r} cannot be fetched automatically: {spec.where}")
    return spec.fetcher(data_dir(root), progress)
