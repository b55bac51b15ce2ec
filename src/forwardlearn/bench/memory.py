"""Honest peak-memory measurement.

CPU: the measured function runs in a fresh child process (forked from a server that has already
imported torch, so a measurement costs milliseconds, not an interpreter start). The child records its
resident set size before the function runs, resets the kernel's high-water mark
(``/proc/self/clear_refs``), runs the function, and reports ``VmHWM - baseline``. ``glibc`` is told to
serve every allocation above 64 KiB with ``mmap`` (``MALLOC_MMAP_THRESHOLD_``), so freed tensors leave
the resident set at once and earlier work cannot hide in the allocator's free lists.

CUDA: ``torch.cuda.max_memory_allocated`` above ``torch.cuda.memory_allocated`` at the start.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
from collections.abc import Callable
from typing import Any

import torch

_CTX: Any = None
MMAP_THRESHOLD = "65536"


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _child(fn: Callable[..., Any], args: tuple, threads: int | None, warmup: bool) -> tuple[int, Any, bool]:
    if threads is not None:
        torch.set_num_threads(threads)
    if warmup:  # first call pages in the code and lazily built kernels; its data is freed again
        fn(*args)
        gc.collect()
    base = _rss_kib("VmRSS")
    exact = _reset_peak()
    result = fn(*args)
    peak = _rss_kib("VmHWM")
    return (peak - base) * 1024, result, exact


def _context() -> Any:
    global _CTX
    if _CTX is None:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "forwardlearn"])
        old = os.environ.get("MALLOC_MMAP_THRESHOLD_")
        os.environ["MALLOC_MMAP_THRESHOLD_"] = MMAP_THRESHOLD
        try:
            with ctx.Pool(1) as pool:  # starts the fork server with the environment above
                pool.apply(os.getpid)
        finally:
            if old is None:
                os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
            else:
                os.environ["MALLOC_MMAP_THRESHOLD_"] = old
        _CTX = ctx
    return _CTX


def peak_memory(
    fn: Callable[..., Any],
    *args: Any,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    warmup: bool = True,
) -> tuple[int, Any]:
    """Run ``fn(*args)`` and return ``(peak bytes above the starting baseline, fn's result)``.

    On CPU ``fn`` and ``args`` must be picklable (a module-level function) and everything ``fn``
    allocates counts, the model's weights included if ``fn`` builds the model. With ``warmup`` the
    function runs once unmeasured first, so code paged in on first use is not counted as data.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        if warmup:
            fn(*args)
            torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn(*args)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base, result
    if not os.path.exists("/proc/self/status"):
        raise RuntimeError("CPU peak-memory measurement needs Linux /proc")
    ctx = _context()
    with ctx.Pool(1, maxtasksperchild=1) as pool:
        peak, result, exact = pool.apply(_child, (fn, args, threads, warmup))
    if not exact:
        raise RuntimeError("cannot reset the peak-memory counter (/proc/self/clear_refs is not writable)")
    return peak, result


def _batch(shape: tuple[int, ...], classes: int, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch_size, *shape, generator=g), torch.randint(0, classes, (batch_size,), generator=g)


def train_step_peak(
    rule_name: str, options: dict[str, Any], shape: tuple[int, ...], classes: int, batch_size: int,
    optimizer: str, lr: float, seed: int = 0,
) -> None:
    """One full training step (weights, optimizer state, the rule's own buffers and temporaries) from nothing.

    Meant to run inside :func:`peak_memory`; the second of two steps is the steady state, so both run.
    """
    from ..rules import build_rule, trainable_parameters
    from ..training import make_optimizer

    torch.manual_seed(seed)
    rule = build_rule(rule_name, seed, options)
    model = rule.attach(type(rule).default_model(shape, classes))
    opt = make_optimizer(optimizer, trainable_parameters(model), lr)
    x, y = _batch(shape, classes, batch_size, seed)
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        rule.grads(model, x, y)
        opt.step()


def inference_peak(rule_name: str, options: dict[str, Any], shape: tuple[int, ...], classes: int,
                   batch_size: int, seed: int = 0) -> None:
    """Build the rule's default model and run ``rule.predict`` once without gradients."""
    from ..rules import build_rule

    torch.manual_seed(seed)
    rule = build_rule(rule_name, seed, options)
    model = rule.attach(type(rule).default_model(shape, classes))
    x, _ = _batch(shape, classes, batch_size, seed)
    with torch.no_grad():
        rule.predict(model, x)
