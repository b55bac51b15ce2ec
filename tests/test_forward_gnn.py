"""ForwardGNN, the GNN models and the graph data (CSBM generator, Planetoid loader)."""

from __future__ import annotations

import copy
import io
import pickle

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import forwardlearn as fl
from forwardlearn.data.common import DataError
from forwardlearn.data.graphs import IGNORE, Graph, csbm, load_planetoid, normalized_adjacency
from forwardlearn.models.gnn import GNN, GraphConv
from forwardlearn.training import train_graph

VARIANTS = [{"variant": "sf"}, {"variant": "sf", "top_down": True}, {"variant": "ff"}]


pytestmark = pytest.mark.usefixtures("one_thread")  # every test here on one CPU thread (see conftest)


@pytest.fixture(scope="module")
def graph() -> Graph:
    return csbm(nodes=600, classes=4, features=16, avg_degree=8, homophily=0.8, feature_signal=1.0, seed=0)


# --- data -----------------------------------------------------------------------------------------
def test_csbm_is_seeded_and_has_the_asked_structure():
    a, b = csbm(seed=3), csbm(seed=3)
    assert torch.equal(a.x, b.x) and torch.equal(a.edge_index, b.edge_index) and torch.equal(a.y, b.y)
    assert not torch.equal(a.edge_index, csbm(seed=4).edge_index)
    ei = a.edge_index
    homophily = float((a.y[ei[0]] == a.y[ei[1]]).float().mean())
    # ~3900 undirected edges: the std of the within-community fraction is sqrt(.8 * .2 / 3900) ~ 0.007,
    # so 0.05 is a 7-sigma band around the asked 0.8
    assert abs(homophily - 0.8) < 0.05
    # the expected degree is 8; Poisson-like count over 1000 nodes: std of the mean ~ 0.1, allow 0.8
    assert abs(ei.shape[1] / a.num_nodes - 8.0) < 0.8
    # undirected: every edge listed in both directions, no self-loops
    fwd = set(map(tuple, ei.t().tolist()))
    assert all((j, i) in fwd for i, j in fwd) and all(i != j for i, j in fwd)
    assert int(a.train_mask.sum()) == 4 * 20 and int(a.val_mask.sum()) == 200
    assert not bool((a.train_mask & a.val_mask).any() or (a.train_mask & a.test_mask).any())
    assert bool((a.train_mask | a.val_mask | a.test_mask).all())
    assert [int((a.y[a.train_mask] == c).sum()) for c in range(4)] == [20, 20, 20, 20]


@pytest.mark.parametrize("kw", [{"classes": 1}, {"homophily": 1.5}, {"avg_degree": 0}, {"feature_signal": -1},
                                {"nodes": 50, "val_nodes": 40}, {"seed": -1}])
def test_csbm_rejects_bad_arguments(kw):
    with pytest.raises(ValueError):
        csbm(**kw)


def test_targets_hide_every_label_outside_the_mask(graph):
    t = graph.targets()
    assert torch.equal(t[graph.train_mask], graph.y[graph.train_mask])
    assert bool((t[~graph.train_mask] == IGNORE).all())


def test_gcn_adjacency_matches_the_dense_formula():
    ei = torch.tensor([[0, 1, 1, 2, 2, 3], [1, 0, 2, 1, 3, 2]])  # a path 0-1-2-3
    a = torch.zeros(4, 4)
    a[ei[1], ei[0]] = 1
    a_hat = a + torch.eye(4)
    d = a_hat.sum(1).pow(-0.5)
    expected = d[:, None] * a_hat * d[None, :]
    assert torch.allclose(normalized_adjacency(ei, 4, "gcn").to_dense(), expected)
    mean = normalized_adjacency(ei, 4, "mean").to_dense()
    assert torch.allclose(mean, a / a.sum(1, keepdim=True))
    with pytest.raises(ValueError, match="unknown adjacency"):
        normalized_adjacency(ei, 4, "max")


def _write_planetoid(folder, name="cora"):
    """A tiny graph in the Planetoid file format: 6 nodes, 2 classes, 2 train, 2 other, 2 test nodes."""
    rng = np.random.default_rng(0)
    feats = rng.random((6, 5)).astype(np.float32)
    onehot = np.eye(2, dtype=np.float32)[[0, 1, 0, 1, 1, 0]]
    parts = {
        "x": sp.csr_matrix(feats[:2]), "y": onehot[:2],
        "allx": sp.csr_matrix(feats[:4]), "ally": onehot[:4],
        "tx": sp.csr_matrix(feats[[5, 4]]), "ty": onehot[[5, 4]],  # stored in sorted order of their ids
        "graph": {0: [1], 1: [0, 2], 2: [1, 3], 3: [2, 4], 4: [3, 5], 5: [4]},
    }
    for k, v in parts.items():
        buf = io.BytesIO()
        pickle.dump(v, buf)
        (folder / f"ind.{name}.{k}").write_bytes(buf.getvalue())
    (folder / f"ind.{name}.test.index").write_text("5\n4\n")
    return feats, onehot


def test_load_planetoid_reads_the_standard_format(tmp_path):
    feats, onehot = _write_planetoid(tmp_path)
    g = load_planetoid("Cora", tmp_path)
    assert g.num_nodes == 6 and g.num_classes == 2 and g.num_edges == 10
    # test nodes are reordered to their listed ids: node 5 gets the row stored for the first listed id
    expected = np.vstack([feats[:4], feats[[5, 4]]])
    expected[[5, 4]] = expected[[4, 5]]
    expected = expected / expected.sum(1, keepdims=True)
    assert torch.allclose(g.x, torch.as_tensor(expected))
    assert g.train_mask.tolist() == [True, True, False, False, False, False]
    assert g.test_mask.tolist() == [False, False, False, False, True, True]


def test_load_planetoid_names_the_missing_files(tmp_path):
    with pytest.raises(DataError, match=r"ind\.citeseer\.graph"):
        load_planetoid("CiteSeer", tmp_path)
    _write_planetoid(tmp_path, "pubmed")
    (tmp_path / "ind.pubmed.ty").unlink()
    with pytest.raises(DataError, match=r"missing ind\.pubmed\.ty"):
        load_planetoid("PubMed", tmp_path)
    with pytest.raises(DataError, match="unknown Planetoid"):
        load_planetoid("reddit", tmp_path)


# --- models -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["gcn", "sage"])
def test_gnn_shapes_and_gradients(graph, kind):
    model = fl.models.gnn(graph.num_features, [8, 8], graph.num_classes, kind=kind)
    out = model(graph)
    assert out.shape == (graph.num_nodes, graph.num_classes)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="unknown graph convolution"):
        GraphConv(3, 3, kind="gat")


def test_backprop_ignores_labels_outside_the_training_mask(graph):
    torch.manual_seed(0)
    model = fl.models.gnn(graph.num_features, [8], graph.num_classes)
    rule = fl.get_rule("backprop")
    rule.grads(model, graph, graph.targets())
    g1 = [p.grad.clone() for p in model.parameters()]
    other = copy.copy(graph)
    other.y = torch.where(graph.train_mask, graph.y, (graph.y + 1) % graph.num_classes)
    model.zero_grad()
    rule.grads(model, other, other.targets())
    assert all(torch.equal(a, p.grad) for a, p in zip(g1, model.parameters()))


# --- ForwardGNN -------------------------------------------------------------------------------------
@pytest.mark.parametrize("opts", VARIANTS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_forward_gnn_learns_well_above_chance(graph, opts):
    torch.manual_seed(0)
    if opts["variant"] == "ff":
        # 64-wide layers on unit-length inputs start with goodness far below the reference threshold 2.0,
        # which then needs hundreds of epochs (measured: 0.40 after 60, 0.76 after 150); 0.5 learns in 60
        opts = {**opts, "threshold": 0.5}
    rule = fl.get_rule("forward_gnn", seed=0, **opts)
    model = rule.build_model(graph, [64, 64])
    hist = train_graph(model, rule, graph, lr=0.01, epochs=60, eval_every=60)
    # chance is 0.25 (4 balanced classes). Measured with these seeds: sf ~0.85-0.9, ff ~0.84; the features
    # alone (class means of norm 1 under unit noise in 16 dimensions) separate the classes far less well,
    # so 0.6 needs learning that works
    assert hist.final["test_acc"] >= 0.6, hist.final
    assert hist.column("loss")[-1] < hist.column("loss")[0]


def _input_hooks(model):
    seen = []
    hooks = [c.register_forward_pre_hook(lambda m, args: seen.append(args[0].requires_grad)) for c in model.convs]
    return seen, hooks


@pytest.mark.parametrize("opts", VARIANTS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_no_gradient_crosses_a_layer(graph, opts):
    rule = fl.get_rule("forward_gnn", seed=1, **opts)
    torch.manual_seed(0)
    model = rule.attach(rule.build_model(graph, [16, 16, 16]))
    seen, hooks = _input_hooks(model)
    rule.grads(model, graph, graph.targets())
    for h in hooks:
        h.remove()
    assert seen and not any(seen), "a layer received an input that carries a gradient path to the layer below"
    assert all(p.grad is not None for p in model.parameters())
    # the gradient of layer 0 does not depend on the layers above it through backward paths: change
    # the top layer's weights. Without top-down signal nothing changes; with it, only the forward
    # signal changes (checked by the hook test above), so layer 0's update moves but stays defined.
    g0 = [p.grad.clone() for p in model.convs[0].parameters()]
    other = copy.deepcopy(model)
    other.zero_grad()
    with torch.no_grad():
        for p in other.convs[2].parameters():
            p.mul_(3.0).add_(0.1)
    rule_b = fl.get_rule("forward_gnn", seed=1, **opts)
    rule_b.grads(other, graph, graph.targets())
    same = all(torch.allclose(a, p.grad) for a, p in zip(g0, other.convs[0].parameters()))
    assert same == (not opts.get("top_down", False))


def test_each_layer_gets_exactly_its_local_gradient(graph):
    """sf: layer i's gradient equals autograd of its own loss on its detached, normalised input."""
    rule = fl.get_rule("forward_gnn", seed=2, variant="sf")
    torch.manual_seed(0)
    model = rule.attach(rule.build_model(graph, [12, 12]))
    rule.grads(model, graph, graph.targets())
    t = graph.targets()
    known = t >= 0
    x, adj = rule._augmented(graph, t, "gcn")
    h = x
    n = graph.num_nodes
    for conv in model.convs:
        out = torch.relu(conv(h / (h.norm(dim=1, keepdim=True) + 1e-8), adj))
        loss = torch.nn.functional.cross_entropy(out[:n][known] @ out[n:].t(), t[known])
        ref = torch.autograd.grad(loss, list(conv.parameters()))
        assert all(torch.allclose(r, p.grad, atol=1e-6) for r, p in zip(ref, conv.parameters()))
        h = out.detach()


def test_ff_negatives_are_never_the_true_label(graph):
    c = graph.num_classes
    labels = graph.y
    for negatives in (None, 1, 2):
        rule = fl.get_rule("forward_gnn", variant="ff", seed=0, negatives=negatives)
        for _ in range(5):
            wrong = rule.wrong_labels(labels, c)
            assert wrong.shape == (graph.num_nodes, negatives or c - 1)
            assert not bool((wrong == labels[:, None]).any())
            # distinct per node
            assert bool((wrong.sort(1).values.diff(dim=1) > 0).all()) if wrong.shape[1] > 1 else True
    # every wrong class is drawn: over 600 nodes each of the 3 wrong classes is first for ~1/3 of them
    first = fl.get_rule("forward_gnn", variant="ff", seed=0, negatives=1).wrong_labels(labels, c)[:, 0]
    for cls in range(c):
        share = float((first[labels != cls] == cls).float().mean())
        assert 0.25 < share < 0.42  # binomial(450, 1/3): std 0.022, a 3.5-sigma band


def test_forward_gnn_checks_its_options_and_model(graph):
    for bad in [{"variant": "bp"}, {"top_down": True, "variant": "ff"}, {"threshold": float("nan")}, {"negatives": 0},
                {"temperature": 0.0}, {"unlabeled": "random"}, {"top_down": 1}]:
        with pytest.raises(ValueError):
            fl.get_rule("forward_gnn", **bad)
    rule = fl.get_rule("forward_gnn")
    with pytest.raises(ValueError, match="classes=None"):
        rule.attach(fl.models.gnn(graph.num_features, [8], graph.num_classes))
    with pytest.raises(ValueError, match="same width"):
        fl.get_rule("forward_gnn", top_down=True).attach(GNN(graph.num_features, [8, 4], None))
    ff = fl.get_rule("forward_gnn", variant="ff")
    with pytest.raises(ValueError, match="appended labels"):
        ff.grads(GNN(graph.num_features, [8], None), graph, graph.targets())
    with pytest.raises(ValueError, match="no label"):
        rule.grads(rule.build_model(graph, [8]), graph, torch.full_like(graph.y, IGNORE))
    assert fl.rules.rule_class("forward_gnn").data_kind == "graph"


@pytest.mark.parametrize("opts", VARIANTS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_state_round_trip_gives_the_same_predictions(graph, opts, tmp_path):
    rule = fl.get_rule("forward_gnn", seed=5, **opts)
    torch.manual_seed(0)
    model = rule.attach(rule.build_model(graph, [8, 8]))
    rule.grads(model, graph, graph.targets())
    torch.save(rule.state_dict(), tmp_path / "r.pt")
    before = rule.predict(model, graph)
    fresh = fl.get_rule("forward_gnn", seed=99, **opts)
    fresh.load_state_dict(torch.load(tmp_path / "r.pt", weights_only=True))
    assert torch.allclose(fresh.predict(model, graph), before)
    # and the random streams continue identically
    m1, m2 = copy.deepcopy(model), copy.deepcopy(model)
    rule.grads(m1, graph, graph.targets())
    fresh.grads(m2, graph, graph.targets())
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(m1.parameters(), m2.parameters()))
