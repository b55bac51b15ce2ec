"""The transport of the seed-and-scalar exchange: an ``all_gather`` of one byte record per rank.

:class:`Exchange` is the single-process stand-in (one rank, or several emulated serially);
:class:`TorchExchange` gathers over the default ``torch.distributed`` process group, which
:func:`init_process_group` joins under ``torchrun`` (``gloo`` on CPU, ``nccl`` on CUDA).
"""

from __future__ import annotations

import importlib
import os
from datetime import timedelta

import torch
from torch import Tensor

__all__ = ["Exchange", "TorchExchange", "init_process_group"]


class Exchange:
    """``all_gather`` of one ``uint8`` record per rank; counts the payload bytes it moves."""

    def __init__(self, world_size: int = 1, rank: int = 0) -> None:
        self.world_size = world_size
        self.rank = rank
        self.bytes_sent = 0
        self.bytes_received = 0
        self.calls = 0

    def all_gather(self, buf: Tensor) -> list[Tensor]:
        self.calls += 1
        return [buf]


class TorchExchange(Exchange):
    """The exchange over the default ``torch.distributed`` process group (gloo or nccl)."""

    def __init__(self, device: torch.device) -> None:
        import torch.distributed as dist

        super().__init__(dist.get_world_size(), dist.get_rank())
        self._dist = dist
        # nccl only moves device tensors; gloo moves CPU tensors
        self.device = device if dist.get_backend() == "nccl" else torch.device("cpu")

    def all_gather(self, buf: Tensor) -> list[Tensor]:
        buf = buf.to(self.device)
        out = [torch.empty_like(buf) for _ in range(self.world_size)]
        self._dist.all_gather(out, buf)
        self.calls += 1
        self.bytes_sent += buf.numel() * buf.element_size()
        self.bytes_received += (self.world_size - 1) * buf.numel() * buf.element_size()
        return [o.cpu() for o in out]


# --- launching under torchrun ---------------------------------------------------------------------


def _init_process_group(device: torch.device) -> tuple[bool, torch.device]:
    import torch.distributed as dist

    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        raise ValueError("--distributed needs a torchrun launch (RANK and WORLD_SIZE are not set): "
                         "torchrun --nproc-per-node N -m forwardlearn train --distributed ...")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return False, device
    # Import torch._dynamo (which the first torch.optim optimizer imports anyway) BEFORE the group exists:
    # it imports torch.distributed.nn.functional, whose default arguments (group=group.WORLD) would
    # otherwise capture the default group. destroy_process_group() then cannot free it, gloo's worker
    # threads outlive it, and the interpreter can abort (SIGABRT) at exit after a finished run.
    importlib.import_module("torch._dynamo")

    backend = "nccl" if device.type == "cuda" else "gloo"
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is not None and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # under torchrun: the agent's store, with keys private to this restart attempt, so that a restarted
        # rank can never read the address a killed peer of an earlier attempt published
        world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                              timeout=timedelta(minutes=10))
        dist.init_process_group(backend, store=dist.PrefixStore(f"forwardlearn/attempt_{attempt}/", store),
                                rank=rank, world_size=world)
    else:
        dist.init_process_group(backend)
    return True, device


def init_process_group(device: torch.device | str = "cpu") -> torch.device:
    """Join the ``torchrun`` process group (gloo on CPU, nccl on CUDA); returns this rank's device."""
    return _init_process_group(torch.device(device))[1]
