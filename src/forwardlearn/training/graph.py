"""Full-batch training of graph rules (node classification): the one loop with :class:`GraphStep`, one step on
the whole graph per epoch."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..data.graphs import Graph
from ..rules.base import Rule, check_int, model_first, trainable_parameters
from .checkpoint import History
from .loop import Trainer
from .optim import make_optimizer, resolve_device
from .strategies import GradStep


@torch.no_grad()
def node_accuracy(model: nn.Module, rule: Rule, graph: Graph, mask: Tensor) -> float:
    """Fraction of the nodes in ``mask`` that ``rule.predict`` classifies as ``graph.y``."""
    model_first(model, rule, "node_accuracy")
    was = model.training
    model.eval()
    pred = rule.predict(model, graph).argmax(1)
    model.train(was)
    m = mask & (graph.y >= 0)
    return float((pred[m] == graph.y[m]).float().mean()) if bool(m.any()) else float("nan")


class GraphStep(GradStep):
    """The optimizer step with the whole graph as the one batch of every epoch; records carry the
    ``train_acc``, ``val_acc`` and ``test_acc`` of the node masks every ``eval_every`` epochs (and at the end)."""

    name = "graph"

    def __init__(self, eval_every: int = 1) -> None:
        super().__init__()
        self.eval_every = check_int(eval_every, "eval_every")

    def steps_per_epoch(self, trainer: Trainer, n: int) -> int:
        return 1

    def batches(self, trainer: Trainer, n: int) -> list[None]:
        return [None]

    def gather(self, trainer: Trainer, X: Graph, y: Tensor, item: None) -> tuple[Graph, Tensor]:
        return X, y

    def step(self, trainer: Trainer, batch: tuple[Graph, Tensor]) -> tuple[float, float]:
        return super().step(trainer, batch)[0], 1.0

    def evaluate(self, trainer: Trainer, X: Graph, y: Tensor, Xt: object, yt: object) -> dict[str, float]:
        if trainer.epoch % self.eval_every and trainer.epoch != trainer.epochs:
            return {}
        return {f"{split}_acc": node_accuracy(trainer.model, trainer.rule, X, mask)
                for split, mask in (("train", X.train_mask), ("val", X.val_mask), ("test", X.test_mask))}


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
    ``forward_gnn`` with a head-less one). Returns a :class:`~forwardlearn.training.checkpoint.History` with
    ``loss``, ``seconds`` (training time of the epoch) and, every ``eval_every`` epochs, ``train_acc``,
    ``val_acc``, ``test_acc``. ``seed`` seeds dropout (torch's global stream, restored afterwards).
    """
    check_int(epochs, "epochs")
    step = GraphStep(eval_every)
    dev = resolve_device(device)
    graph = graph.to(dev)
    model = rule.attach(model.to(dev))
    if isinstance(optimizer, str):
        optimizer = make_optimizer(optimizer, trainable_parameters(model), lr, weight_decay=weight_decay)
    trainer = Trainer(model, rule, optimizer, epochs=epochs, batch_size=1, strategy=step, progress=False,
                      device=dev, eval_train=False)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        return trainer.fit((graph, graph.targets()))


__all__ = ["GraphStep", "node_accuracy", "train_graph"]
