"""scikit-learn's bundled data sets: digits (the embedded default), breast cancer, wine, iris."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

#: the fixed split every run uses: 20 % test, stratified, seed 0
TEST_FRACTION = 0.2
SPLIT_SEED = 0


@cache
def _split(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn import datasets
    from sklearn.model_selection import train_test_split

    bunch = getattr(datasets, f"load_{name}")()
    X = bunch.data.astype(np.float32)
    y = bunch.target.astype(np.int64)
    if name == "digits":
        X = X / 16.0  # pixel intensities are 0..16
    Xtr, Xte, ytr, yte = train_test_split(
        X, y, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=y
    )
    if name != "digits":  # min-max scale each feature with the training split's range only
        lo, hi = Xtr.min(0), Xtr.max(0)
        span = np.where(hi > lo, hi - lo, 1.0)
        Xtr = (Xtr - lo) / span
        Xte = np.clip((Xte - lo) / span, 0.0, 1.0)
    return Xtr, Xte, ytr, yte


def load_sklearn(name: str, split: str, root: Path) -> tuple[Tensor, Tensor]:
    Xtr, Xte, ytr, yte = _split(name)
    X, y = (Xtr, ytr) if split == "train" else (Xte, yte)
    X = torch.from_numpy(X.copy())
    if name == "digits":
        X = X.reshape(-1, 1, 8, 8)
    return X, torch.from_numpy(y.copy())
