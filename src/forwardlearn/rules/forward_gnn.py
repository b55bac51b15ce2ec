"""ForwardGNN: layer-wise forward learning of graph neural networks for node classification.

Park et al., "Forward Learning of Graph Neural Networks", ICLR 2024 (arXiv:2403.11004). Every
:class:`~forwardlearn.models.gnn.GraphConv` layer of a :class:`~forwardlearn.models.gnn.GNN` learns from
a loss of its own output; its input is the detached, L2-normalised output of the layer below, so no
gradient ever crosses a layer. Two variants (``variant``):

- ``"ff"``, Forward-Forward with label appending (paper §3.1): the one-hot label is appended to the
  features of the training nodes (a uniform vector ``1/C`` to every other node). The positive graph
  carries the true labels, each negative graph a random wrong label per training node. A layer's
  goodness is the sum of its squared outputs; its loss the logistic loss of ``goodness - threshold``, target 1
  for positives and 0 for negatives (Hinton 2022, Eq. 1). Prediction appends each candidate label in
  turn to the nodes being classified and picks the label with the largest goodness (mean square,
  summed over layers). The model's first layer takes ``F + C`` inputs (:meth:`ForwardGNN.input_features`).
- ``"sf"``, single forward (paper §3.2): no negative inputs. The graph gets one virtual node per class
  (random features) joined to the training nodes of that class (both directions by default). A layer's
  logits for a training node are the dot products of its embedding with the virtual nodes'
  embeddings (divided by ``temperature``); its loss is their cross-entropy. Prediction sums the
  per-layer softmax probabilities.
- ``top_down=True`` (``"sf"`` only; paper §3.3, "top-to-loss"): a layer's loss uses the mean of its own
  output and the (detached, normalised) outputs of all layers above it, so upper layers send a
  top-down signal through the forward pass, not through gradients. The reference code carries the upper
  states over from the previous step; here they come from a no-grad bottom-up pass with the current
  weights, which differs by one optimizer step.

All layers update in the same step (the reference trains them one after the other, each to
convergence; with one optimizer step per layer per epoch the per-layer updates are the same).

Data contract (see :mod:`forwardlearn.data.graphs`): ``inputs`` is a whole
:class:`~forwardlearn.data.graphs.Graph`, ``targets = graph.targets()`` holds the labels the rule may use
and ``IGNORE`` elsewhere. ``predict(model, graph)`` scores every node and uses only the labels of
``graph.train_mask`` as context. :func:`forwardlearn.training.graph.train_graph` is the full-batch
training loop for graph rules (``backprop`` included).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.graphs import Graph, normalized_adjacency
from ..models.gnn import GNN, GraphConv
from .base import LossFn, Rule, accumulate_grad, check_finite, register

VARIANTS = ("ff", "sf")


def l2_normalize(x: Tensor, eps: float = 1e-8) -> Tensor:
    """Rows scaled to unit length (the normalisation between ForwardGNN layers)."""
    return x / (x.norm(dim=1, keepdim=True) + eps)


def graph_layers(model: nn.Module) -> list[GraphConv]:
    """The ``GraphConv`` layers a layer-wise graph rule trains: ``model.convs`` of a head-less GNN."""
    convs = getattr(model, "convs", None)
    if convs is None or not len(convs) or not all(isinstance(c, GraphConv) for c in convs):
        raise ValueError("forward_gnn needs a forwardlearn.models.gnn.GNN with at least one hidden GraphConv layer")
    if getattr(model, "head", None) is not None:
        raise ValueError("forward_gnn classifies with goodness / virtual class nodes, not an output layer: build the "
                         "model with classes=None, e.g. fl.models.gnn(in_features, [128, 128], None)")
    return list(convs)


@register
class ForwardGNN(Rule):
    """ForwardGNN (Park et al. 2024): each GNN layer trained by a local forward-learning loss.

    Args:
        variant: ``"sf"`` (single forward with virtual class nodes) or ``"ff"`` (Forward-Forward with
            label appending).
        top_down: ``"sf"`` only: each layer's loss also sees the outputs of the layers above it.
        threshold: ``"ff"``: goodness threshold (the reference calls it theta and uses 2.0).
        negatives: ``"ff"``: wrong labels per training node and step (``None``: all ``C - 1``).
        temperature: ``"sf"``: divides the node-to-class-node logits.
        bidirectional: ``"sf"``: edges run both ways between training nodes and their class node
            (``False``: node to class node only).
        unlabeled: label vector appended to nodes without a known label (``"ff"``): ``"uniform"`` or ``"zero"``.
        loss: unused (the losses are local); accepted for the common interface.
        seed: seed of the negative labels and the virtual nodes' features.
    """

    name: ClassVar[str] = "forward_gnn"
    backward: ClassVar[str] = "local"
    description: ClassVar[str] = "ForwardGNN: layer-local forward learning of GNNs (label-appending FF, single forward)"
    paper: ClassVar[str] = "Park et al. 2024, Forward Learning of Graph Neural Networks (ICLR 2024)"
    defaults: ClassVar[dict[str, Any]] = {
        "optimizer": "adam",
        "lr": 0.01,
        "epochs": 100,
        "batch_size": 0,  # full batch: the whole graph per step
        "hidden": [128, 128],
        "model": "gnn",
    }
    forward_only: ClassVar[bool] = False  # autograd runs inside each layer
    data_kind: ClassVar[str] = "graph"

    def __init__(
        self,
        variant: str = "sf",
        top_down: bool = False,
        threshold: float = 2.0,
        negatives: int | None = None,
        temperature: float = 1.0,
        bidirectional: bool = True,
        unlabeled: str = "uniform",
        loss: LossFn | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__(loss=loss, seed=seed)
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        if not isinstance(top_down, bool):
            raise ValueError(f"top_down must be True or False, got {top_down!r}")
        if top_down and variant != "sf":
            raise ValueError(f"top_down=True needs variant='sf', got variant={variant!r}")
        if not (isinstance(threshold, (int, float)) and not isinstance(threshold, bool) and math.isfinite(threshold)):
            raise ValueError(f"threshold must be a finite number, got {threshold!r}")
        if negatives is not None and (isinstance(negatives, bool) or not isinstance(negatives, int) or negatives < 1):
            raise ValueError(f"negatives must be a positive integer or None, got {negatives!r}")
        if not (isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and temperature > 0):
            raise ValueError(f"temperature must be a positive number, got {temperature!r}")
        if not isinstance(bidirectional, bool):
            raise ValueError(f"bidirectional must be True or False, got {bidirectional!r}")
        if unlabeled not in ("uniform", "zero"):
            raise ValueError(f"unlabeled must be 'uniform' or 'zero', got {unlabeled!r}")
        self.variant = variant
        self.top_down = top_down
        self.threshold = float(threshold)
        self.negatives = negatives
        self.temperature = float(temperature)
        self.bidirectional = bidirectional
        self.unlabeled = unlabeled
        self.virtual_features: Tensor | None = None
        #: ``hook(layer_index, layer_loss) -> layer_loss`` applied to every local loss before its gradient
        self.local_loss_hook: Callable[[int, Tensor], Tensor] | None = None

    # --- model ---------------------------------------------------------------------------------
    def input_features(self, graph: Graph) -> int:
        """Input width the first layer needs: ``F + C`` for ``"ff"`` (appended labels), ``F`` for ``"sf"``."""
        return graph.num_features + (graph.num_classes if self.variant == "ff" else 0)

    def build_model(self, graph: Graph, hidden: list[int] | None = None, kind: str = "gcn") -> GNN:
        """A head-less GNN that fits this rule and ``graph`` (default widths ``defaults["hidden"]``)."""
        return GNN(self.input_features(graph), hidden or list(self.defaults["hidden"]), None, kind=kind)

    @classmethod
    def model_spec(cls) -> dict[str, Any]:
        """Head-less GCN for the default ``"sf"`` variant on ``shape = (F,)`` node features."""
        return {"name": "gnn", "hidden": list(cls.defaults["hidden"]), "head": False}

    def attach(self, model: nn.Module) -> nn.Module:
        layers = graph_layers(model)
        if self.top_down and len({c.out_features for c in layers}) > 1:
            raise ValueError("top_down=True averages the outputs of all layers: every layer needs the same width, got "
                             f"{[c.out_features for c in layers]}")
        return model

    # --- helpers ---------------------------------------------------------------------------------
    def _check(self, layers: list[GraphConv], graph: Graph) -> None:
        if not isinstance(graph, Graph):
            raise ValueError(f"forward_gnn takes a forwardlearn.data.graphs.Graph as inputs, got "
                             f"{type(graph).__name__}")
        need = self.input_features(graph)
        if layers[0].in_features != need:
            extra = (f" = {graph.num_features} features + {graph.num_classes} appended labels"
                     if self.variant == "ff" else "")
            raise ValueError(f"forward_gnn(variant={self.variant!r}) needs a first layer with {need} inputs{extra}, "
                             f"the model's has {layers[0].in_features}; use rule.build_model(graph)")
        if self.top_down and len({c.out_features for c in layers}) > 1:
            raise ValueError("top_down=True needs every layer to have the same width")

    def _label_rows(self, labels: Tensor, known: Tensor, classes: int) -> Tensor:
        """One-hot ``labels`` where ``known``, the ``unlabeled`` vector elsewhere: ``(N, C)``."""
        fill = 1.0 / classes if self.unlabeled == "uniform" else 0.0
        rows = torch.full((labels.shape[0], classes), fill, device=labels.device)
        rows[known] = F.one_hot(labels[known], classes).to(rows.dtype)
        return rows

    def _virtual(self, graph: Graph) -> Tensor:
        """The virtual class nodes' features ``(C, F)``: standard normal, drawn once from the rule's stream."""
        shape = (graph.num_classes, graph.num_features)
        if self.virtual_features is None or tuple(self.virtual_features.shape) != shape:
            g = self.generator("cpu")
            self.virtual_features = torch.randn(shape, generator=g)
        return self.virtual_features.to(device=graph.device, dtype=graph.x.dtype)

    def _augmented(self, graph: Graph, labels: Tensor, kind: str) -> tuple[Tensor, Tensor]:
        """Features and adjacency of ``graph`` plus one virtual node per class (paper §3.2, Fig. 1c).

        Node ``i`` with ``labels[i] >= 0`` is joined to virtual node ``N + labels[i]``.
        """
        n, c = graph.num_nodes, graph.num_classes
        known = labels >= 0
        key = ("forward_gnn_sf", kind, self.bidirectional, hash(labels.detach().cpu().numpy().tobytes()))
        adj = graph._cache.get(key)
        if adj is None:
            nodes = torch.nonzero(known).flatten()
            virt = n + labels[known]
            extra = [torch.stack([nodes, virt])]
            if self.bidirectional:
                extra.append(torch.stack([virt, nodes]))
            edges = torch.cat([graph.edge_index, *extra], dim=1)
            adj = normalized_adjacency(edges, n + c, kind)
            graph._cache = {k: v for k, v in graph._cache.items() if k[0] != "forward_gnn_sf"}  # keep one
            graph._cache[key] = adj
        return torch.cat([graph.x, self._virtual(graph)]), adj

    def _sf_states(self, layers: list[GraphConv], x: Tensor, adj: Tensor) -> list[Tensor]:
        """No-grad bottom-up pass: ``[norm(x), norm(h_1), ..., norm(h_L)]``."""
        states = [l2_normalize(x)]
        with torch.no_grad():
            for conv in layers:
                states.append(l2_normalize(F.relu(conv(states[-1], adj))))
        return states

    def _sf_embedding(self, out: Tensor, states: list[Tensor], index: int) -> Tensor:
        """The embedding layer ``index`` is judged on: its output, averaged with the upper states if top-down."""
        if not self.top_down:
            return out
        above = states[index + 2:]
        return torch.stack([out, *above]).mean(0) if above else out

    # --- the contract ----------------------------------------------------------------------------
    def grads(self, model: nn.Module, inputs: Graph, targets: Tensor) -> float:
        layers = graph_layers(model)
        self._check(layers, inputs)
        targets = targets.to(inputs.device)
        if targets.shape != (inputs.num_nodes,):
            raise ValueError(f"targets must have shape ({inputs.num_nodes},), got {tuple(targets.shape)}")
        if not bool((targets >= 0).any()):
            raise ValueError("targets hold no label (every entry is IGNORE); use graph.targets()")
        step = self._grads_ff if self.variant == "ff" else self._grads_sf
        total = step(layers, inputs, targets)
        self.steps += 1
        return check_finite(total, "loss")

    def wrong_labels(self, labels: Tensor, classes: int) -> Tensor:
        """``(N, k)`` distinct wrong labels per node, ``k = min(negatives, C - 1)``, drawn from the rule's stream.

        Random keys per class with the true class's key pushed last, sorted: the first ``k`` are a uniform
        random ordered choice among the wrong classes.
        """
        n = labels.shape[0]
        k = min(self.negatives or (classes - 1), classes - 1)
        keys = torch.rand(n, classes, generator=self.generator("cpu")).to(labels.device)
        keys[torch.arange(n, device=labels.device), labels] = 2.0
        return keys.argsort(dim=1)[:, :k]

    def _layer_update(self, k: int, conv: GraphConv, loss: Tensor) -> float:
        if self.local_loss_hook is not None:
            loss = self.local_loss_hook(k, loss)
        params = [p for p in conv.parameters() if p.requires_grad]
        for p, g in zip(params, torch.autograd.grad(loss, params)):
            accumulate_grad(p, g)
        return float(loss.detach())

    def _grads_ff(self, layers: list[GraphConv], graph: Graph, targets: Tensor) -> float:
        c = graph.num_classes
        known = targets >= 0
        labels = targets.clamp(min=0)
        wrong = self.wrong_labels(labels, c)
        k = wrong.shape[1]
        inputs = [torch.cat([graph.x, self._label_rows(labels, known, c)], dim=1)]
        inputs += [torch.cat([graph.x, self._label_rows(wrong[:, j], known, c)], dim=1) for j in range(k)]
        adj = graph.adjacency(layers[0].adjacency_kind)
        total = 0.0
        for i, conv in enumerate(layers):
            outs = [F.relu(conv(l2_normalize(h.detach()), adj)) for h in inputs]
            logits = [o[known].pow(2).sum(1) - self.threshold for o in outs]
            loss_pos = F.binary_cross_entropy_with_logits(logits[0], torch.ones_like(logits[0]))
            loss_neg = torch.stack([F.binary_cross_entropy_with_logits(z, torch.zeros_like(z))
                                    for z in logits[1:]]).mean()
            total += self._layer_update(i, conv, loss_pos + loss_neg)
            inputs = [o.detach() for o in outs]
        return total

    def _grads_sf(self, layers: list[GraphConv], graph: Graph, targets: Tensor) -> float:
        n = graph.num_nodes
        known = targets >= 0
        x, adj = self._augmented(graph, targets, layers[0].adjacency_kind)
        states = self._sf_states(layers, x, adj) if self.top_down else None
        h = x
        total = 0.0
        for i, conv in enumerate(layers):
            inp = states[i] if states is not None else l2_normalize(h.detach())
            out = F.relu(conv(inp, adj))
            emb = self._sf_embedding(out, states, i) if states is not None else out
            logits = emb[:n][known] @ emb[n:].t() / self.temperature
            total += self._layer_update(i, conv, F.cross_entropy(logits, targets[known]))
            h = out.detach()
        return total

    @torch.no_grad()
    def predict(self, model: nn.Module, inputs: Graph) -> Tensor:
        layers = graph_layers(model)
        self._check(layers, inputs)
        context = inputs.targets()  # labels of the training nodes only
        return self._predict_ff(layers, inputs, context) if self.variant == "ff" else self._predict_sf(
            layers, inputs, context)

    def _ff_goodness(self, layers: list[GraphConv], h: Tensor, adj: Tensor) -> Tensor:
        score = torch.zeros(h.shape[0], device=h.device)
        for conv in layers:
            h = F.relu(conv(l2_normalize(h), adj))
            score += h.pow(2).mean(1) - self.threshold
        return score

    def _predict_ff(self, layers: list[GraphConv], graph: Graph, context: Tensor) -> Tensor:
        n, c = graph.num_nodes, graph.num_classes
        known = context >= 0
        adj = graph.adjacency(layers[0].adjacency_kind)
        scores = torch.empty(n, c, device=graph.device)
        for label in range(c):
            cand = torch.full((n,), label, dtype=torch.long, device=graph.device)
            # nodes to classify carry the candidate, training nodes their own label (reference evaluation)
            with_context = torch.where(known, context, cand)
            scores[:, label] = self._ff_goodness(
                layers, torch.cat([graph.x, F.one_hot(with_context, c).to(graph.x.dtype)], 1), adj)
            if bool(known.any()):  # training nodes themselves: every node carries the candidate
                all_cand = self._ff_goodness(layers, torch.cat([graph.x, F.one_hot(cand, c).to(graph.x.dtype)], 1), adj)
                scores[known, label] = all_cand[known]
        return scores

    def _predict_sf(self, layers: list[GraphConv], graph: Graph, context: Tensor) -> Tensor:
        n = graph.num_nodes
        x, adj = self._augmented(graph, context, layers[0].adjacency_kind)
        states = self._sf_states(layers, x, adj)
        probs = torch.zeros(n, graph.num_classes, device=graph.device)
        for i, conv in enumerate(layers):
            out = F.relu(conv(states[i], adj))
            emb = self._sf_embedding(out, states, i)
            probs += torch.softmax(emb[:n] @ emb[n:].t() / self.temperature, dim=1)
        return probs

    # --- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["virtual_features"] = self.virtual_features
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        v = state.get("virtual_features")
        self.virtual_features = v.detach().clone() if v is not None else None


__all__ = ["ForwardGNN", "graph_layers", "l2_normalize"]
