"""Graph neural networks in plain torch with a sparse adjacency: GCN and GraphSAGE-mean layers.

``model(graph)`` takes a :class:`forwardlearn.data.graphs.Graph` and returns ``(N, C)`` node scores, so
the ``backprop`` rule trains it with ``targets = graph.targets()`` (see ``forwardlearn.data.graphs``).
Layer-wise rules (``forward_gnn``) call each :class:`GraphConv` of ``model.convs`` themselves.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .basic import activation_module

GNN_KINDS = ("gcn", "sage")


class GraphConv(nn.Module):
    """One graph convolution ``(x, graph) -> (N, out_features)``.

    - ``gcn`` (Kipf & Welling 2017, Eq. 2): ``Â X W + b`` with ``Â = D^-1/2 (A + I) D^-1/2``;
    - ``sage`` (Hamilton et al. 2017, GraphSAGE-mean without sampling): ``X W_self + mean_{N(i)}(X) W_neigh + b``.

    ``adj`` is a sparse matrix from :func:`forwardlearn.data.graphs.normalized_adjacency` of the kind
    :attr:`adjacency_kind` (``gcn`` or ``mean``); ``Graph.adjacency(conv.adjacency_kind)`` gives it.
    """

    def __init__(self, in_features: int, out_features: int, kind: str = "gcn", bias: bool = True) -> None:
        super().__init__()
        if kind not in GNN_KINDS:
            raise ValueError(f"unknown graph convolution {kind!r}; valid: {', '.join(GNN_KINDS)}")
        for v, what in ((in_features, "in_features"), (out_features, "out_features")):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{what} must be a positive integer, got {v!r}")
        self.kind = kind
        self.in_features = in_features
        self.out_features = out_features
        self.lin = nn.Linear(in_features, out_features, bias=bias)
        self.lin_self = nn.Linear(in_features, out_features, bias=False) if kind == "sage" else None

    @property
    def adjacency_kind(self) -> str:
        return "gcn" if self.kind == "gcn" else "mean"

    def forward(self, x: Tensor, adj: Tensor) -> Tensor:
        if self.kind == "gcn":
            # aggregate on the narrower side: Â (X W) when the layer shrinks, (Â X) W otherwise
            if self.out_features <= self.in_features:
                return torch.sparse.mm(adj, x @ self.lin.weight.t()) + (
                    self.lin.bias if self.lin.bias is not None else 0.0)
            return self.lin(torch.sparse.mm(adj, x))
        assert self.lin_self is not None
        return self.lin(torch.sparse.mm(adj, x)) + self.lin_self(x)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, kind={self.kind!r}"


class GNN(nn.Module):
    """``[GraphConv -> activation -> dropout] * len(hidden)``, then a ``GraphConv`` to ``classes`` (if given).

    ``forward(graph)`` (or ``forward(x, adj)``) returns ``(N, classes)`` scores, or the last hidden
    representation when ``classes`` is ``None``. ``convs`` holds the hidden layers, ``head`` the output
    layer.
    """

    def __init__(self, in_features: int, hidden: Sequence[int], classes: int | None, kind: str = "gcn",
                 activation: str = "relu", dropout: float = 0.0) -> None:
        super().__init__()
        if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if not hidden and classes is None:
            raise ValueError("a GNN needs hidden layers or an output layer")
        widths = [in_features, *hidden]
        self.convs = nn.ModuleList(GraphConv(a, b, kind) for a, b in zip(widths[:-1], widths[1:]))
        self.acts = nn.ModuleList(activation_module(activation) for _ in hidden)
        self.head = GraphConv(widths[-1], classes, kind) if classes is not None else None
        self.dropout = nn.Dropout(dropout)
        self.kind = kind

    @property
    def adjacency_kind(self) -> str:
        return "gcn" if self.kind == "gcn" else "mean"

    def forward(self, graph: object, adj: Tensor | None = None) -> Tensor:
        if adj is None:
            x, adj = graph.x, graph.adjacency(self.adjacency_kind)  # type: ignore[attr-defined]
        else:
            x = graph  # type: ignore[assignment]
        for conv, act in zip(self.convs, self.acts):
            x = act(conv(self.dropout(x), adj))
        if self.head is not None:
            x = self.head(self.dropout(x), adj)
        return x


def gnn(in_features: int, hidden: Sequence[int], classes: int | None, kind: str = "gcn",
        activation: str = "relu", dropout: float = 0.0) -> GNN:
    """A GCN (``kind="gcn"``) or GraphSAGE-mean (``kind="sage"``) network; see :class:`GNN`."""
    return GNN(in_features, hidden, classes, kind, activation, dropout)


__all__ = ["GNN", "GNN_KINDS", "GraphConv", "gnn"]
