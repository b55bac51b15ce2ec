"""CIFAR-10 from the standard python pickle batches (``cifar-10-batches-py``) in a folder the user provides."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .common import DataError

TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCHES = ["test_batch"]
WHERE = (
    "download cifar-10-python.tar.gz from the CIFAR-10 page and unpack it so that "
    "<data-dir>/cifar10/cifar-10-batches-py/data_batch_1 ... test_batch exist"
)


class _NumpyOnly(pickle.Unpickler):
    """The batches hold only dicts, lists, bytes and numpy arrays: refuse anything else."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar")}

    def find_class(self, module: str, name: str):  # noqa: ANN201
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def load_cifar10(split: str, root: Path) -> tuple[Tensor, Tensor]:
    d = root / "cifar10" / "cifar-10-batches-py"
    xs, ys = [], []
    for b in TRAIN_BATCHES if split == "train" else TEST_BATCHES:
        p = d / b
        if not p.exists():
            raise DataError(f"missing file {p}; {WHERE}")
        try:
            with open(p, "rb") as f:
                batch = _NumpyOnly(f, encoding="bytes").load()
            x = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            y = np.asarray(batch[b"labels"], dtype=np.int64)
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError) as e:
            raise DataError(f"{p}: not a valid CIFAR-10 batch ({e}); download it again") from e
        if len(x) != 10000 or len(y) != 10000:
            raise DataError(f"{p}: {len(x)} images, expected 10000 (truncated); download it again")
        xs.append(x)
        ys.append(y)
    X = torch.from_numpy(np.concatenate(xs).astype(np.float32) / 255.0)
    return X, torch.from_numpy(np.concatenate(ys))
