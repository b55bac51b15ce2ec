"""Full-batch training of graph rules (node classification): one step on the whole graph per epoch."""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor, nn

from ..data.graphs import Graph
from ..rules.base import NonFiniteError, Rule, trainable_parameters
from .checkpoint import History
from .optim import make_optimizer, resolve_device


# --- full-batch training of graph rules ----------------------------------------------------------
@torch.no_grad()
def node_accuracy(rule: Rule, model: nn.Module, graph: Graph, mask: Tensor) -> float:
    """Fraction of the nodes in ``mask`` that ``rule.predict`` classifies as ``graph.y``."""
    was = model.training
    model.eval()
    pred = rule.predict(model, graph).argmax(1)
    model.train(was)
    m = mask & (graph.y >= 0)
    return float((pred[m] == graph.y[m]).float().mean()) if bool(m.any()) else float("nan")


def train_graph(
    model: nn.Module,
    rule: Rule,
    graph: Graph,
    *,
    optimizer: torch.optim.Optimizer | str = "adam",
    lr: float = 0.01,
    weight_decay: float = 0.0,
    epochs: int = 100,
    seed: int = 0,
    device: str | torch.device | None = None,
    eval_every: int = 1,
) -> History:
    """Full-batch node classification: one ``rule.grads(model, graph, graph.targets())`` step per epoch.

    Works for every rule that accepts a :class:`Graph` (``backprop`` with a ``GNN`` that has a head,
    ``forward_gnn`` with a head-less one). Returns a :class:`~forwardlearn.train.History` with ``loss``,
    ``seconds`` (training time of the epoch) and, every ``eval_every`` epochs, ``train_acc``,
    ``val_acc``, ``test_acc``. ``seed`` seeds dropout (torch's global stream, restored afterwards).
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs <= 0:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    if isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every <= 0:
        raise ValueError(f"eval_every must be a positive integer, got {eval_every!r}")
    dev = resolve_device(device)
    graph = graph.to(dev)
    model = rule.attach(model.to(dev))
    if isinstance(optimizer, str):
        optimizer = make_optimizer(optimizer, trainable_parameters(model), lr, weight_decay=weight_decay)
    targets = graph.targets()
    history = History()
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        model.train()
        for epoch in range(1, epochs + 1):
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss = rule.grads(model, graph, targets)
            if not math.isfinite(loss):
                raise NonFiniteError(f"non-finite loss {loss} at epoch {epoch}")
            optimizer.step()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            record: dict[str, float] = {"epoch": epoch, "loss": loss, "seconds": time.perf_counter() - t0}
            if epoch % eval_every == 0 or epoch == epochs:
                for split, mask in (("train", graph.train_mask), ("val", graph.val_mask), ("test", graph.test_mask)):
                    record[f"{split}_acc"] = node_accuracy(rule, model, graph, mask)
            history.epochs.append(record)
    return history


__all__ = ["node_accuracy", "train_graph"]
