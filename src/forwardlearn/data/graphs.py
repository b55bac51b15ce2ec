"""Graphs for node classification: a :class:`Graph` container, a Planetoid loader and a CSBM generator.

Graph rules extend the ``(inputs, targets)`` contract of :class:`forwardlearn.rules.base.Rule` this way:

- ``inputs`` is a whole :class:`Graph` (node features, edges, masks); training is full-batch;
- ``targets`` is a ``(N,)`` long tensor holding the label of every node the rule may learn from and
  :data:`IGNORE` (-100, the ``ignore_index`` of ``F.cross_entropy``) everywhere else; build it with
  :meth:`Graph.targets`. A rule never reads ``graph.y`` in ``grads``;
- ``rule.predict(model, graph)`` returns ``(N, C)`` scores for every node. Rules that use known labels as
  context at prediction time (label appending, virtual class nodes) read only the labels of
  ``graph.train_mask``.

Because ``F.cross_entropy`` skips ``IGNORE`` targets, the ordinary ``backprop`` rule trains any model
``model(graph) -> (N, C)`` (e.g. :func:`forwardlearn.models.gnn`) on the training nodes unchanged.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .common import DataError

#: target value of nodes whose label a rule may not use (``F.cross_entropy``'s default ``ignore_index``)
IGNORE = -100

ADJACENCY_KINDS = ("gcn", "mean", "sum")


@dataclass
class Graph:
    """A graph for transductive node classification.

    Attributes:
        x: ``(N, F)`` float node features.
        edge_index: ``(2, E)`` long, row 0 the source and row 1 the target of each directed edge (an
            undirected graph lists both directions); messages flow from source to target.
        y: ``(N,)`` long labels (``-1`` where unknown).
        train_mask, val_mask, test_mask: ``(N,)`` bool.
        num_classes: number of classes.
        name: a label for messages.
    """

    x: Tensor
    edge_index: Tensor
    y: Tensor
    train_mask: Tensor
    val_mask: Tensor
    test_mask: Tensor
    num_classes: int
    name: str = "graph"
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = self.x.shape[0]
        if self.x.dim() != 2:
            raise DataError(f"graph {self.name}: x must be (N, F), got shape {tuple(self.x.shape)}")
        if self.edge_index.dim() != 2 or self.edge_index.shape[0] != 2:
            raise DataError(f"graph {self.name}: edge_index must be (2, E), got {tuple(self.edge_index.shape)}")
        if self.edge_index.numel() and (int(self.edge_index.min()) < 0 or int(self.edge_index.max()) >= n):
            raise DataError(f"graph {self.name}: edge_index refers to nodes outside 0..{n - 1}")
        for what in ("y", "train_mask", "val_mask", "test_mask"):
            if getattr(self, what).shape != (n,):
                raise DataError(f"graph {self.name}: {what} must have shape ({n},)")
        if self.num_classes < 2:
            raise DataError(f"graph {self.name}: needs at least 2 classes, got {self.num_classes}")

    @property
    def num_nodes(self) -> int:
        return int(self.x.shape[0])

    @property
    def num_features(self) -> int:
        return int(self.x.shape[1])

    @property
    def num_edges(self) -> int:
        return int(self.edge_index.shape[1])

    @property
    def device(self) -> torch.device:
        return self.x.device

    def to(self, device: torch.device | str) -> Graph:
        """A copy on ``device`` (the same object when it is already there)."""
        device = torch.device(device)
        if self.x.device == device:
            return self
        return Graph(self.x.to(device), self.edge_index.to(device), self.y.to(device), self.train_mask.to(device),
                     self.val_mask.to(device), self.test_mask.to(device), self.num_classes, self.name)

    def targets(self, mask: Tensor | None = None) -> Tensor:
        """Labels of the nodes in ``mask`` (default ``train_mask``), :data:`IGNORE` elsewhere."""
        mask = self.train_mask if mask is None else mask
        t = torch.full_like(self.y, IGNORE)
        t[mask] = self.y[mask]
        return t

    def adjacency(self, kind: str = "gcn") -> Tensor:
        """The normalised sparse adjacency of this graph (cached); see :func:`normalized_adjacency`."""
        key = ("adj", kind)
        if key not in self._cache:
            self._cache[key] = normalized_adjacency(self.edge_index, self.num_nodes, kind)
        return self._cache[key]

    def __len__(self) -> int:
        return self.num_nodes

    def __repr__(self) -> str:
        return (f"Graph({self.name}: {self.num_nodes} nodes, {self.num_edges} edges, {self.num_features} features, "
                f"{self.num_classes} classes, {int(self.train_mask.sum())}/{int(self.val_mask.sum())}/"
                f"{int(self.test_mask.sum())} train/val/test)")


def normalized_adjacency(edge_index: Tensor, num_nodes: int, kind: str = "gcn") -> Tensor:
    """Sparse ``(N, N)`` matrix ``A`` with ``(A @ X)[i]`` aggregating the features of ``i``'s in-neighbours.

    - ``gcn``: ``D^-1/2 (A + I) D^-1/2`` with ``D`` the degrees of ``A + I`` (Kipf & Welling 2017, Eq. 2);
    - ``mean``: in-neighbour mean without self-loops (GraphSAGE-mean, Hamilton et al. 2017, Alg. 1);
      nodes without in-neighbours get a zero row;
    - ``sum``: plain in-neighbour sum.

    Duplicate edges are merged.
    """
    if kind not in ADJACENCY_KINDS:
        raise ValueError(f"unknown adjacency kind {kind!r}; valid: {', '.join(ADJACENCY_KINDS)}")
    device = edge_index.device
    src, dst = edge_index[0].long(), edge_index[1].long()
    if kind == "gcn":
        keep = src != dst
        loops = torch.arange(num_nodes, device=device)
        src = torch.cat([src[keep], loops])
        dst = torch.cat([dst[keep], loops])
    # merge duplicates: row = target, column = source
    a = torch.sparse_coo_tensor(torch.stack([dst, src]), torch.ones(src.numel(), device=device),
                                (num_nodes, num_nodes), check_invariants=False).coalesce()
    idx = a.indices()
    vals = torch.ones(idx.shape[1], device=device)
    deg = torch.zeros(num_nodes, device=device).index_add_(0, idx[0], vals)
    if kind == "gcn":
        inv = deg.pow(-0.5)
        vals = inv[idx[0]] * inv[idx[1]]
    elif kind == "mean":
        vals = 1.0 / deg[idx[0]]
    return torch.sparse_coo_tensor(idx, vals, (num_nodes, num_nodes), check_invariants=False, is_coalesced=True)


# --- Planetoid --------------------------------------------------------------------------------------
PLANETOID = {"cora": "cora", "citeseer": "citeseer", "pubmed": "pubmed"}
_PLANETOID_PARTS = ("x", "y", "tx", "ty", "allx", "ally", "graph")


class _PlanetoidUnpickler(pickle.Unpickler):
    """Planetoid files hold NumPy arrays, SciPy sparse matrices and a dict of lists: refuse anything else."""

    def find_class(self, module: str, name: str):  # noqa: ANN201
        if module.split(".")[0] == "numpy" or module.startswith("scipy.sparse") or (module, name) in {
            ("collections", "defaultdict"), ("builtins", "list"), ("builtins", "dict"), ("builtins", "set"),
            ("copy_reg", "_reconstructor"), ("copyreg", "_reconstructor"), ("builtins", "object"),
            ("__builtin__", "object"), ("__builtin__", "list"),
        }:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def load_planetoid(name: str, root: str | os.PathLike) -> Graph:
    """Load Cora, CiteSeer or PubMed from the files of the Planetoid release (Yang et al. 2016).

    ``root`` is a directory holding ``ind.<name>.{x,y,tx,ty,allx,ally,graph,test.index}`` (directly or
    in ``<root>/<name>/raw`` or ``<root>/<name>``), as distributed with the Planetoid and GCN code. The
    split is the standard one of Kipf & Welling (2017): 20 labelled nodes per class for training, the
    next 500 for validation, the 1000 listed test nodes for testing. Features are row-normalised to
    sum 1 as in that paper. CiteSeer's isolated test nodes get zero features and label ``-1``.

    The files are Python pickles; they are read with an unpickler that accepts only NumPy arrays,
    SciPy sparse matrices and the standard containers, and refuses anything else.
    """
    key = name.lower()
    if key not in PLANETOID:
        raise DataError(f"unknown Planetoid data set {name!r}; valid: Cora, CiteSeer, PubMed")
    base = Path(root).expanduser()
    candidates = [base, base / name / "raw", base / key / "raw", base / name, base / key]
    folder = next((c for c in candidates if (c / f"ind.{key}.graph").exists()), None)
    if folder is None:
        need = ", ".join(f"ind.{key}.{p}" for p in (*_PLANETOID_PARTS, "test.index"))
        raise DataError(f"Planetoid {name}: files not found under {base} (looked in "
                        f"{', '.join(str(c) for c in candidates)}); it needs {need} from the Planetoid release")
    missing = [p for p in (*_PLANETOID_PARTS, "test.index") if not (folder / f"ind.{key}.{p}").exists()]
    if missing:
        raise DataError(f"Planetoid {name}: missing {', '.join(f'ind.{key}.{m}' for m in missing)} in {folder}")
    parts = {}
    for p in _PLANETOID_PARTS:
        with open(folder / f"ind.{key}.{p}", "rb") as f:
            try:
                parts[p] = _PlanetoidUnpickler(f, encoding="latin1").load()
            except Exception as e:  # noqa: BLE001
                raise DataError(f"Planetoid {name}: cannot read {folder / f'ind.{key}.{p}'} ({e})") from e
    test_index = [int(line) for line in (folder / f"ind.{key}.test.index").read_text().split()]

    def dense(m: object) -> np.ndarray:
        return np.asarray(m.todense() if hasattr(m, "todense") else m, dtype=np.float32)

    x, y, tx, ty, allx, ally = (dense(parts[p]) for p in ("x", "y", "tx", "ty", "allx", "ally"))
    test_sorted = np.sort(test_index)
    if key == "citeseer":  # isolated test nodes are absent from tx/ty: pad them with zeros
        full = np.arange(test_sorted.min(), test_sorted.max() + 1)
        tx_ext = np.zeros((len(full), tx.shape[1]), dtype=np.float32)
        tx_ext[test_sorted - test_sorted.min()] = tx
        ty_ext = np.zeros((len(full), ty.shape[1]), dtype=np.float32)
        ty_ext[test_sorted - test_sorted.min()] = ty
        tx, ty = tx_ext, ty_ext
    features = np.vstack([allx, tx])
    labels_1h = np.vstack([ally, ty])
    features[test_index] = features[test_sorted]
    labels_1h[test_index] = labels_1h[test_sorted]
    n = features.shape[0]
    labels = np.where(labels_1h.sum(1) > 0, labels_1h.argmax(1), -1)
    rows = features.sum(1, keepdims=True)
    features = features / np.where(rows == 0, 1.0, rows)
    src, dst = [], []
    for i, nbrs in parts["graph"].items():
        for j in nbrs:
            if int(j) < n and int(i) < n:
                src += [int(i), int(j)]
                dst += [int(j), int(i)]
    edge_index = torch.tensor([src, dst], dtype=torch.long)
    edge_index = torch.unique(edge_index, dim=1)
    edge_index = edge_index[:, edge_index[0] != edge_index[1]]

    def mask(idx: np.ndarray | list[int] | range) -> Tensor:
        m = torch.zeros(n, dtype=torch.bool)
        m[torch.as_tensor(list(idx), dtype=torch.long)] = True
        return m

    y_t = torch.as_tensor(labels, dtype=torch.long)
    test_mask = mask(test_index) & (y_t >= 0)
    return Graph(torch.as_tensor(features), edge_index, y_t, mask(range(len(y))),
                 mask(range(len(y), min(len(y) + 500, len(allx)))), test_mask, int(labels_1h.shape[1]), name=key)


# --- contextual stochastic block model --------------------------------------------------------------
def _check_int(value: int, what: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return value


def csbm(
    nodes: int = 1000,
    classes: int = 4,
    features: int = 32,
    avg_degree: float = 8.0,
    homophily: float = 0.8,
    feature_signal: float = 1.0,
    train_per_class: int = 20,
    val_nodes: int = 200,
    seed: int = 0,
) -> Graph:
    """A contextual stochastic block model graph (Deshpande et al. 2018, "Contextual Stochastic Block Models").

    ``nodes`` nodes are split evenly over ``classes`` communities. Each unordered pair within a community
    is an edge with probability ``p_in``, each pair across communities with ``p_out``; the two are set so
    that the expected degree is ``avg_degree`` and the expected fraction of edges inside a community is
    ``homophily`` (``1/classes`` is an Erdős–Rényi graph, no structure). Node ``i`` of community ``c``
    has features ``x_i = m_c + e_i`` with ``e_i ~ N(0, I)`` and class means ``m_c`` of norm
    ``feature_signal`` in random directions, so features alone separate the classes only weakly for
    ``feature_signal`` around 1 and the edges carry the rest.

    Edge counts per community pair are drawn from their binomial distribution and the pairs uniformly
    (duplicates merged, a negligible bias for sparse graphs). Split: ``train_per_class`` training nodes
    per class, ``val_nodes`` validation nodes, the rest test. Same arguments, same graph.
    """
    _check_int(nodes, "nodes", 4)
    _check_int(classes, "classes", 2)
    _check_int(features, "features")
    _check_int(train_per_class, "train_per_class")
    _check_int(val_nodes, "val_nodes", 0)
    _check_int(seed, "seed", 0)
    if not (isinstance(avg_degree, (int, float)) and 0 < avg_degree < nodes - 1):
        raise ValueError(f"avg_degree must be in (0, nodes - 1), got {avg_degree!r}")
    if not (isinstance(homophily, (int, float)) and 0.0 <= homophily <= 1.0):
        raise ValueError(f"homophily must be in [0, 1], got {homophily!r}")
    if not (isinstance(feature_signal, (int, float)) and feature_signal >= 0):
        raise ValueError(f"feature_signal must be >= 0, got {feature_signal!r}")
    if classes * train_per_class + val_nodes >= nodes:
        raise ValueError(f"{classes} x {train_per_class} training + {val_nodes} validation nodes leave no test nodes "
                         f"among {nodes}")
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(nodes) % classes
    y = y[torch.randperm(nodes, generator=g)]
    members = [torch.nonzero(y == c).flatten() for c in range(classes)]
    sizes = [len(m) for m in members]
    # expected degree d = p_in * (n_c - 1) + p_out * (n - n_c) with n_c ~ n / classes
    n_c = nodes / classes
    p_in = min(1.0, homophily * avg_degree / max(n_c - 1, 1.0))
    p_out = min(1.0, (1 - homophily) * avg_degree / max(nodes - n_c, 1.0))
    src_parts, dst_parts = [], []
    for a in range(classes):
        for b in range(a, classes):
            pairs = sizes[a] * (sizes[a] - 1) // 2 if a == b else sizes[a] * sizes[b]
            p = p_in if a == b else p_out
            if pairs == 0 or p == 0:
                continue
            count = int(torch.binomial(torch.tensor(float(pairs)), torch.tensor(p), generator=g).item())
            if count == 0:
                continue
            i = members[a][torch.randint(sizes[a], (count,), generator=g)]
            j = members[b][torch.randint(sizes[b], (count,), generator=g)]
            keep = i != j
            src_parts.append(i[keep])
            dst_parts.append(j[keep])
    if src_parts:
        s, d = torch.cat(src_parts), torch.cat(dst_parts)
        ei = torch.cat([torch.stack([s, d]), torch.stack([d, s])], dim=1)
        ei = torch.unique(ei, dim=1)
    else:
        ei = torch.zeros(2, 0, dtype=torch.long)
    directions = torch.randn(classes, features, generator=g)
    means = feature_signal * directions / directions.norm(dim=1, keepdim=True)
    x = means[y] + torch.randn(nodes, features, generator=g)
    order = torch.randperm(nodes, generator=g)
    train = torch.zeros(nodes, dtype=torch.bool)
    for c in range(classes):
        in_c = order[y[order] == c][:train_per_class]
        train[in_c] = True
    rest = order[~train[order]]
    val = torch.zeros(nodes, dtype=torch.bool)
    val[rest[:val_nodes]] = True
    test = ~(train | val)
    return Graph(x, ei, y, train, val, test, classes, name=f"csbm(seed={seed})")


__all__ = ["ADJACENCY_KINDS", "Graph", "IGNORE", "csbm", "load_planetoid", "normalized_adjacency"]
