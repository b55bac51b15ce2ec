"""The training engine: one loop (:mod:`.loop`), its step strategies (:mod:`.strategies`), checkpoints and
history (:mod:`.checkpoint`), tensor-or-mapping batches (:mod:`.batches`) and the run builder (:mod:`.run`)."""

from ..rules.base import NonFiniteError
from .checkpoint import CHECKPOINT, METRICS, History, atomic_save, atomic_write_text, load_checkpoint, read_config
from .graph import node_accuracy, train_graph
from .loop import Callback, Trainer, accuracy, train
from .optim import make_optimizer, resolve_device
from .run import Run, build_run, run_config
from .strategies import FusedStep, GradStep, Strategy, make_strategy

__all__ = [
    "CHECKPOINT",
    "METRICS",
    "Callback",
    "FusedStep",
    "GradStep",
    "History",
    "NonFiniteError",
    "Strategy",
    "Run",
    "Trainer",
    "accuracy",
    "atomic_save",
    "atomic_write_text",
    "build_run",
    "load_checkpoint",
    "make_optimizer",
    "make_strategy",
    "node_accuracy",
    "read_config",
    "resolve_device",
    "run_config",
    "train",
    "train_graph",
]
