"""The CPU peak-memory measurement counts what a function allocates, and only that."""

import pytest
import torch

from forwardlearn.bench.memory import peak_memory


def _alloc(n):
    x = torch.ones(n)
    y = x * 2
    return float(y[0])


def _nothing():
    return 0


@pytest.mark.parametrize("mib", [40, 120])
def test_peak_counts_two_live_tensors(mib):
    n = mib * 2**20 // 4
    peak, result = peak_memory(_alloc, n)
    assert result == 2.0
    # x and y are live together: 2 * mib MiB. Allow 6 MiB above for interpreter and allocator overhead, and
    # 1 MiB below: the kernel's RSS counters are batched per CPU (up to 64 pages each) and may lag.
    assert (2 * mib - 1) * 2**20 <= peak <= (2 * mib + 6) * 2**20


def test_peak_of_nothing_is_small():
    peak, _ = peak_memory(_nothing)
    assert peak < 4 * 2**20
