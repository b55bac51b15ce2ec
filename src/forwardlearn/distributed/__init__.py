"""Scale-out for the seed-and-scalar rules (``zo_spsa``, ``forward_gradient``).

- :mod:`.trainer`: data-parallel training over ``torch.distributed`` where ranks exchange only
  ``(seed, scalar)`` pairs (``forwardlearn train --distributed`` under ``torchrun``), the loop with the
  step of :mod:`.step` over the transport of :mod:`.exchange`;
- :mod:`.federated`: BAFFLE, federated learning where clients run forward passes only and upload
  scalars, against FedAvg with backprop (``forwardlearn fed``);
- :mod:`.replay`: the update log (seed, scalar, lr per step) and its bit-exact replay
  (``forwardlearn replay BASE LOG``);
- :mod:`.wire`: the 12-bytes-per-direction record, its validation and the parameter checksum.
"""

from .exchange import Exchange, TorchExchange
from .federated import FedResult, baffle, dirichlet_split, fedavg
from .replay import UpdateLog, read_header, read_records, replay
from .step import Faults
from .trainer import SeedScalarTrainer, train_distributed
from .wire import ExchangeError, checksum, record_bytes, stream_seed

__all__ = [
    "Exchange",
    "ExchangeError",
    "Faults",
    "FedResult",
    "SeedScalarTrainer",
    "TorchExchange",
    "UpdateLog",
    "baffle",
    "checksum",
    "dirichlet_split",
    "fedavg",
    "read_header",
    "read_records",
    "record_bytes",
    "replay",
    "stream_seed",
    "train_distributed",
]
