"""Forward-Forward (ff), collaborative Forward-Forward (cff) and the activity-sparsity diagnostic."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

import forwardlearn as fl
from forwardlearn.rules.forward_forward_parts import (
    collaborative_logits,
    embed_label,
    ff_layer_loss,
    goodness,
    hard_negative_labels,
    length_normalize,
    mlp_blocks,
    positive_logits,
    random_negative_labels,
)

#: the settings the hand-checks below recompute: raw input, label over the first pixels, random negatives, the
#: weights as given (no first-step calibration)
PLAIN = {"normalize_input": False, "label_mode": "overwrite", "negatives": "random", "calibrate": False}


def _batch(n: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


# --- layer-wise helpers --------------------------------------------------------------------------
def test_goodness_is_sum_of_squares_and_minus_negates() -> None:
    h = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 3.0]])
    assert torch.allclose(goodness(h), torch.tensor([5.25, 9.0]))
    assert torch.allclose(goodness(h, minus=True), -torch.tensor([5.25, 9.0]))
    conv = torch.ones(2, 3, 4, 4)
    assert torch.allclose(goodness(conv), torch.full((2,), 48.0))


def test_positive_logits_and_layer_loss_follow_eq1() -> None:
    h = torch.tensor([[2.0, 0.0], [1.0, 1.0]])  # G = 4, 2
    z = positive_logits(h, threshold=3.0, temperature=2.0)
    assert torch.allclose(z, torch.tensor([0.5, -0.5]))
    assert torch.allclose(positive_logits(h, 3.0, minus=True), torch.tensor([-1.0, 1.0]))
    zp, zn = torch.tensor([0.3, -1.2]), torch.tensor([2.0])
    want = -torch.log(torch.sigmoid(zp)).mean() - torch.log(1 - torch.sigmoid(zn)).mean()
    assert torch.allclose(ff_layer_loss(zp, zn), want, atol=1e-6)


def test_length_normalize_keeps_direction_and_sets_rms_one() -> None:
    h = torch.randn(5, 7) * 10
    n = length_normalize(h)
    assert torch.allclose(n.pow(2).mean(1), torch.ones(5), atol=1e-5)
    assert torch.allclose(F.normalize(n, dim=1), F.normalize(h, dim=1), atol=1e-6)


def test_embed_label_overwrite_concat_and_neutral() -> None:
    x = torch.rand(3, 1, 4, 4)
    y = torch.tensor([0, 2, 1])
    ow = embed_label(x, y, 3, "overwrite", scale=2.0)
    assert ow.shape == (3, 16)
    assert torch.equal(ow[:, :3], F.one_hot(y, 3).float() * 2)
    assert torch.equal(ow[:, 3:], x.flatten(1)[:, 3:])
    cat = embed_label(x, y, 3, "concat")
    assert cat.shape == (3, 19) and torch.equal(cat[:, 3:], x.flatten(1))
    neutral = embed_label(x, None, 4, "overwrite")
    assert torch.allclose(neutral[:, :4], torch.full((3, 4), 0.25))
    with pytest.raises(ValueError, match="label mode"):
        embed_label(x, y, 3, "append")


def test_collaborative_logits_value_is_total_gradient_is_own() -> None:
    a = torch.tensor([1.0, -2.0], requires_grad=True)
    b = torch.tensor([0.5, 4.0], requires_grad=True)
    za, zb = collaborative_logits([a, b])
    assert torch.allclose(za, torch.tensor([1.5, 2.0])) and torch.allclose(zb, za)
    (ga,) = torch.autograd.grad(za.sum(), a, retain_graph=True)
    assert torch.equal(ga, torch.ones(2))
    assert torch.autograd.grad(za.sum(), b, allow_unused=True)[0] is None


# --- the property: a negative example never carries its true label -------------------------------
def test_negative_labels_never_the_true_label_property() -> None:
    """Randomised property check over many batches, class counts and adversarial score patterns."""
    g = torch.Generator().manual_seed(123)
    for trial in range(300):
        classes = int(torch.randint(2, 13, (1,), generator=g))
        n = int(torch.randint(1, 65, (1,), generator=g))
        y = torch.randint(0, classes, (n,), generator=g)
        neg = random_negative_labels(y, classes, g)
        assert ((neg >= 0) & (neg < classes)).all() and not (neg == y).any()
        kind = trial % 4
        if kind == 0:  # ordinary scores
            scores = torch.randn(n, classes, generator=g) * 5
        elif kind == 1:  # the model is certain of the true label
            scores = F.one_hot(y, classes).float() * 1e4
        elif kind == 2:  # every score equal, or all but the true one hugely negative
            scores = torch.full((n, classes), -1e30).scatter(1, y.view(-1, 1), 0.0)
        else:  # non-finite scores
            scores = torch.full((n, classes), float("nan"))
        hard = hard_negative_labels(scores, y, g)
        assert ((hard >= 0) & (hard < classes)).all() and not (hard == y).any(), (trial, kind)


@pytest.mark.parametrize("negatives", ["random", "hard"])
def test_rule_negative_labels_never_the_true_label(negatives: str) -> None:
    x, y = _batch(64)
    for readout in (False, True):
        rule = fl.get_rule("ff", negatives=negatives, readout=readout, seed=1)
        model = rule.attach(fl.models.mlp(64, [32, 32], 10))
        for _ in range(5):
            assert not (rule.negative_labels(model, x, y) == y).any()
            rule.grads(model, x, y)  # and the labels used in training come from the same method


def test_hard_negatives_follow_the_model_belief() -> None:
    # almost all mass off the true label sits on label 3, so nearly every hard negative is 3
    y = torch.zeros(2000, dtype=torch.long)
    scores = torch.zeros(2000, 4)
    scores[:, 3] = 10.0
    neg = hard_negative_labels(scores, y, torch.Generator().manual_seed(0))
    # P(3) = e^10 / (e^10 + 2) > 0.9999; 2000 draws: expected < 0.2 others, allow 5 (Poisson tail ~1e-6)
    assert int((neg != 3).sum()) <= 5


# --- the rule -------------------------------------------------------------------------------------
def test_each_layer_gradient_is_its_own_local_loss_gradient() -> None:
    """Hand-check: recompute every layer's loss from the helpers with detached inputs."""
    torch.manual_seed(0)
    model = fl.models.mlp(64, [16, 12, 8], 10)
    ref = fl.models.mlp(64, [16, 12, 8], 10)
    ref.load_state_dict(model.state_dict())
    x, y = _batch(20)
    rule = fl.get_rule("ff", seed=5, threshold=0.5, temperature=3.0, **PLAIN)
    state = rule.state_dict()
    rule.grads(model, x, y)
    rule.load_state_dict(state)
    neg = random_negative_labels(y, 10, rule.generator("cpu"))
    blocks, head = mlp_blocks(ref)
    h = torch.cat([embed_label(x, y, 10, "overwrite"), embed_label(x, neg, 10, "overwrite")])
    for i, block in enumerate(blocks):
        inp = h.detach() if i == 0 else length_normalize(h.detach())
        h = block(inp)
        z = positive_logits(h, 0.5 * h.shape[1], temperature=3.0)
        lin = block[0]
        gw, gb = torch.autograd.grad(ff_layer_loss(z[:20], z[20:]), [lin.weight, lin.bias])
        got = dict(model.named_parameters())
        name = [n for n, p in ref.named_parameters() if p is lin.weight][0]
        assert torch.allclose(got[name].grad, gw, atol=1e-6)
        assert torch.allclose(got[name.replace("weight", "bias")].grad, gb, atol=1e-6)
    assert model[-1].weight.grad is None  # the MLP's own output layer is not trained by FF
    assert head.weight.grad is None


def test_grads_accumulate_like_backward_and_state_restores_the_stream() -> None:
    model = fl.models.mlp(64, [16, 16], 10)
    x, y = _batch()
    rule = fl.get_rule("ff", seed=3, negatives="hard")
    state = rule.state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    l1 = rule.grads(model, x, y)
    once = _grads(model)
    rule.load_state_dict(loaded)
    l2 = rule.grads(model, x, y)
    assert l1 == l2
    for n, g in _grads(model).items():
        if once[n] is not None:
            assert torch.allclose(g, 2 * once[n], atol=1e-6), n
    assert rule.steps == 1


def test_predict_sums_goodness_of_all_but_first_layer() -> None:
    torch.manual_seed(1)
    model = fl.models.mlp(64, [16, 12, 8], 10)
    rule = fl.get_rule("ff")
    x, _ = _batch(6)
    scores = rule.predict(model, x)
    assert scores.shape == (6, 10)
    for c in (0, 7):
        acts = rule.activities(model, x, torch.full((6,), c))
        assert len(acts) == 3
        assert torch.allclose(scores[:, c], goodness(acts[1]) + goodness(acts[2]), rtol=1e-5)
    all_layers = fl.get_rule("ff", skip_first=False).predict(model, x)
    acts = rule.activities(model, x, torch.full((6,), 4))
    assert torch.allclose(all_layers[:, 4], sum(goodness(a) for a in acts), rtol=1e-5)
    minus = fl.get_rule("ff", minus=True).predict(model, x)
    assert torch.allclose(minus, -scores)


def test_activities_normalise_between_layers() -> None:
    torch.manual_seed(2)
    model = fl.models.mlp(64, [16, 12], 10)
    rule = fl.get_rule("ff", **PLAIN)
    x, y = _batch(4)
    a0, a1 = rule.activities(model, x, y)
    assert torch.allclose(a0, model[2](model[1](embed_label(x, y, 10, "overwrite"))))
    assert torch.allclose(a1, model[4](model[3](length_normalize(a0))))
    # scaling layer 1's activity does not change what layer 2 sees
    with torch.no_grad():
        model[1].weight.mul_(5)
        model[1].bias.mul_(5)
    assert torch.allclose(rule.activities(model, x, y)[1], a1, atol=1e-5)


def test_normalize_input_length_normalises_the_first_layer_input() -> None:
    torch.manual_seed(2)
    model = fl.models.mlp(64, [16, 12], 10)
    x, y = _batch(4)
    a0, a1 = fl.get_rule("ff", label_mode="overwrite").activities(model, x, y)
    assert torch.allclose(a0, model[2](model[1](length_normalize(embed_label(x, y, 10, "overwrite")))))
    assert torch.allclose(a1, model[4](model[3](length_normalize(a0))))
    raw = fl.get_rule("ff", label_mode="overwrite", normalize_input=False).activities(model, x, y)[0]
    assert not torch.allclose(raw, a0)  # normalize_input=True (the default) normalises, False feeds the raw input


def test_peer_normalization_adds_the_matlab_gradient_and_nothing_to_the_loss() -> None:
    """Hand-check against the analytic term: on positive rows, d/d(pre-activation_j) = 2 lambda (m_j - mean m) / n."""
    torch.manual_seed(0)
    model = fl.models.mlp(64, [16, 12], 10)
    with torch.no_grad():
        model[1].bias[3] = -100.0  # unit 3 of layer 0 is off on every input: only the peer term reaches it
    x, y = _batch(20)
    lam, beta = 0.05, 0.8
    plain = fl.get_rule("ff", seed=4, temperature=1.0, **PLAIN)
    peer = fl.get_rule("ff", seed=4, peer_normalization=lam, peer_momentum=beta, temperature=1.0, **PLAIN)
    l_plain = plain.grads(model, x, y)
    g_plain = _grads(model)
    model.zero_grad(set_to_none=True)
    l_peer = peer.grads(model, x, y)
    g_peer = _grads(model)
    assert l_peer == pytest.approx(l_plain, rel=1e-6)  # the term's value is zero
    assert len(peer.peer_means) == 2
    h = embed_label(x, y, 10, "overwrite")
    for k, lin in enumerate([model[1], model[3]]):
        with torch.no_grad():
            post = model[2 * k + 2](lin(h))
        m = beta * 0.5 + (1 - beta) * post.mean(0)  # the running mean starts at 0.5
        assert torch.allclose(peer.peer_means[k], m, atol=1e-6)
        c = m - m.mean()
        want_b = 2 * lam * c  # summed over the n positive rows, each 2 lam c / n
        want_w = 2 * lam * c[:, None] * h.mean(0)[None, :]
        assert torch.allclose(g_peer[f"{2 * k + 1}.bias"] - g_plain[f"{2 * k + 1}.bias"], want_b, atol=1e-5)
        assert torch.allclose(g_peer[f"{2 * k + 1}.weight"] - g_plain[f"{2 * k + 1}.weight"], want_w, atol=1e-5)
        h = length_normalize(post)
    assert g_plain["1.bias"][3] == 0 and g_peer["1.bias"][3] != 0  # not gated by the ReLU: a dead unit revives
    # the running means travel with the rule's state, through a weights_only round trip
    buf = io.BytesIO()
    torch.save(peer.state_dict(), buf)
    buf.seek(0)
    again = fl.get_rule("ff", peer_normalization=lam, peer_momentum=beta, **PLAIN)
    again.load_state_dict(torch.load(buf, weights_only=True))
    assert all(torch.equal(a, b) for a, b in zip(again.peer_means, peer.peer_means))
    with pytest.raises(ValueError, match="shape"):  # means of another model are refused, not broadcast
        again.grads(fl.models.mlp(64, [8, 12], 10), x, y)


def test_label_mode_auto_concatenates_when_the_first_layer_has_room() -> None:
    model = fl.models.mlp(64 + 10, [16, 16], 10)
    rule = fl.get_rule("ff")
    x, y = _batch(8)
    rule.grads(model, x, y)
    assert rule.predict(model, x).shape == (8, 10)
    with pytest.raises(RuntimeError):  # a 64-input net cannot take 74 features
        fl.get_rule("ff", label_mode="concat").grads(fl.models.mlp(64, [16, 16], 10), x, y)


def test_readout_is_trained_on_detached_activities_and_predicts() -> None:
    torch.manual_seed(0)
    rule = fl.get_rule("ff", readout=True, predict_by="readout", seed=0, **PLAIN)
    model = rule.attach(fl.models.mlp(64, [16, 12, 8], 10))
    head = rule.readout_module(model)
    assert rule.attach(model) is model and rule.readout_module(model) is head  # idempotent
    assert head.in_features == 12 + 8  # the scoring layers: all but the first
    assert model(torch.rand(3, 64)).shape == (3, 10)  # the model's own forward is untouched
    x, y = _batch(16)
    rule.grads(model, x, y)
    assert head.weight.grad is not None
    assert any(p is head.weight for p in model.parameters())  # an optimizer built after attach sees it
    assert rule.predict(model, x).shape == (16, 10)
    # the read-out's loss reaches no hidden layer: without it the hidden grads are the same
    g_with = _grads(model)
    model2 = fl.rules.get_rule("ff", seed=0).attach(fl.models.mlp(64, [16, 12, 8], 10))
    model2.load_state_dict({k: v for k, v in model.state_dict().items() if "ff_readout" not in k})
    plain = fl.get_rule("ff", seed=0, **PLAIN)
    plain.grads(model2, x, y)
    for n, g in _grads(model2).items():
        if g is not None:
            assert torch.allclose(g, g_with[n], atol=1e-6), n


@pytest.mark.parametrize(
    "opts, match",
    [
        ({"threshold": -1.0}, "-1.0"),
        ({"temperature": 0}, "temperature"),
        ({"negatives": "hardest"}, "hardest"),
        ({"label_mode": "append"}, "append"),
        ({"label_scale": 0.0}, "label_scale"),
        ({"readout": "yes"}, "yes"),
        ({"predict_by": "votes"}, "votes"),
        ({"predict_by": "readout"}, "readout=True"),
        ({"normalize_input": 1}, "normalize_input"),
        ({"peer_normalization": -0.1}, "-0.1"),
        ({"peer_normalization": float("nan")}, "nan"),
        ({"peer_normalization": True}, "True"),
        ({"peer_momentum": 1.0}, "peer_momentum"),
        ({"peer_momentum": -0.5}, "-0.5"),
    ],
)
def test_bad_options_raise_value_error_naming_the_value(opts: dict, match: str) -> None:
    for name in ("ff", "cff"):
        with pytest.raises(ValueError, match=match):
            fl.get_rule(name, **opts)


def test_non_mlp_models_are_refused() -> None:
    with pytest.raises(ValueError, match="MLP"):
        fl.get_rule("ff").attach(fl.models.cnn(1, classes=10, input_size=8))


def test_cff_gradient_uses_collective_probability() -> None:
    """Hand-check of cff: layer k's loss is softplus(-(sum_l z_l)) with only z_k carrying gradient."""
    torch.manual_seed(0)
    model = fl.models.mlp(64, [10, 9], 10)
    ref = fl.models.mlp(64, [10, 9], 10)
    ref.load_state_dict(model.state_dict())
    x, y = _batch(12)
    rule = fl.get_rule("cff", seed=2, temperature=1.0, **PLAIN)
    state = rule.state_dict()
    rule.grads(model, x, y)
    rule.load_state_dict(state)
    neg = random_negative_labels(y, 10, rule.generator("cpu"))
    blocks, _ = mlp_blocks(ref)
    h = torch.cat([embed_label(x, y, 10, "overwrite"), embed_label(x, neg, 10, "overwrite")])
    zs = []
    for i, block in enumerate(blocks):
        h = block(h.detach() if i == 0 else length_normalize(h.detach()))
        zs.append(positive_logits(h, float(h.shape[1])))
    total = (zs[0] + zs[1]).detach()
    for k, block in enumerate(blocks):
        zk = zs[k] + (total - zs[k].detach())
        gw = torch.autograd.grad(ff_layer_loss(zk[:12], zk[12:]), block[0].weight, retain_graph=True)[0]
        assert torch.allclose(model[1 + 2 * k].weight.grad, gw, atol=1e-6)
    assert rule.skip_first is False and not rule.forward_only  # layer-local autograd: not literally forward-only


def test_short_training_beats_chance_on_digits(digits) -> None:
    (X, y), (Xt, yt) = digits
    torch.manual_seed(0)
    # ff scores with every layer here: with only two layers, "all but the first" is the slow-starting second one
    for name in ("ff", "cff"):
        hist = fl.train(fl.models.mlp(64, [64, 64], 10), fl.get_rule(name, seed=0, skip_first=False),
                        (X[:600], y[:600]),
                        (Xt, yt), optimizer="adam", lr=0.01, epochs=8, batch_size=32, progress=False,
                        eval_train=False)
        # chance is 0.10. Measured with seeds 0-4 (torch and rule seed s): ff 0.62-0.74 (mean 0.68), cff
        # 0.59-0.76 (mean 0.66); 0.5 sits below the lowest seed with room for other torch builds' rounding
        assert hist.final["test_acc"] > 0.5, (name, hist.column("test_acc"))


# --- activity sparsity ----------------------------------------------------------------------------
def test_sparsity_statistics_on_hand_made_activities() -> None:
    from forwardlearn.diagnostics.sparsity import sparsity_of

    one_hot = torch.tensor([[0.0, 5.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0]])
    s = sparsity_of(one_hot)
    assert s["silent"] == pytest.approx(0.75) and s["hoyer"] == pytest.approx(1.0)
    assert s["dead"] == pytest.approx(0.5)  # units 0 and 2 silent on both
    flat = torch.ones(3, 9)
    s = sparsity_of(flat)
    assert s["silent"] == 0 and s["dead"] == 0 and s["hoyer"] == pytest.approx(0.0, abs=1e-12)
    # relative to each example's strongest unit: 0.005 of the peak is silent at tol 0.01, 0.02 is not
    s = sparsity_of(torch.tensor([[1.0, 0.005, 0.02]]))
    assert s["silent"] == pytest.approx(1 / 3)


def test_activity_sparsity_on_models_and_through_the_rule() -> None:
    torch.manual_seed(0)
    model = fl.models.mlp(64, [32, 16], 10)
    x, y = _batch(40)
    out = fl.diagnostics.activity_sparsity(model, x)
    assert list(out) == ["2", "4"]
    with torch.no_grad():
        h1 = model[2](model[1](model[0](x)))
    assert out["2"]["silent"] == pytest.approx(float((h1 <= 0.01 * h1.max(1, keepdim=True).values).float().mean()))
    rule = fl.get_rule("ff")
    via_rule = fl.diagnostics.activity_sparsity(model, x, y, rule=rule)
    assert list(via_rule) == ["layer0", "layer1"]
    assert all(0 <= v["silent"] <= 1 and 0 <= v["hoyer"] <= 1 for v in via_rule.values())
    cnn = fl.models.cnn(1, classes=10, input_size=8)
    assert len(fl.diagnostics.activity_sparsity(cnn, x)) == 4  # two conv and two dense activations
    with pytest.raises(ValueError, match="tol"):
        fl.diagnostics.activity_sparsity(model, x, tol=1.5)


# --- out of the box: label placement, scale -------------------------------------------------------
def test_auto_label_placement_overwrites_blank_pixels_only() -> None:
    x, y = _batch(16)
    blank = x.clone()
    blank.view(16, -1)[:, :10] = 0  # like MNIST's top row
    rule = fl.get_rule("ff", seed=0)
    model = rule.attach(fl.models.mlp(64, [16, 16], 10))
    rule.grads(model, blank, y)
    assert rule.label_placement == "overwrite" and model[1].in_features == 64
    assert torch.allclose(rule.activities(model, blank, y)[0],
                          model[2](model[1](length_normalize(embed_label(blank, y, 10, "overwrite")))))


def test_auto_label_placement_puts_the_label_in_front_of_inked_pixels(digits) -> None:
    (X, y), _ = digits
    assert bool(X.flatten(1)[:, :10].any())  # the 8x8 digits carry ink in their first ten pixels
    torch.manual_seed(0)
    model = fl.models.mlp(64, [16, 16], 10)
    old_w = model[1].weight.detach().clone()
    rule = fl.get_rule("ff", seed=0)
    model = rule.attach(model)
    param = model[1].weight
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)  # built after attach, before the first batch
    rule.grads(model, X[:32], y[:32])
    assert rule.label_placement == "concat"
    assert model[1].weight is param and param.shape == (16, 74) and param.grad.shape == (16, 74)
    # the image's own weights are kept (up to the first step's calibration factor); 10 label columns in front
    c = param[:, 10:].norm() / old_w.norm()
    assert torch.allclose(param[:, 10:], c * old_w, rtol=1e-5, atol=1e-7)
    opt.step()
    x = X[:5]
    want = model[2](model[1](length_normalize(embed_label(x, y[:5], 10, "concat"))))
    assert torch.allclose(rule.activities(model, x, y[:5])[0], want)
    assert model(x).shape == (5, 10)  # the model's own forward still takes 64 features (neutral label in front)
    # resuming: a fresh 64-input model and rule take the widened checkpoint after attach
    again = fl.get_rule("ff", seed=0)
    fresh = again.attach(fl.models.mlp(64, [16, 16], 10))
    fresh.load_state_dict(model.state_dict())
    again.load_state_dict(rule.state_dict())
    assert again.label_placement == "concat"
    assert torch.equal(again.predict(fresh, x), rule.predict(model, x))


def test_first_step_is_not_saturated(digits) -> None:
    """At initialisation every layer's p(positive) is strictly inside (0, 1) on positive and negative data,
    so negative data get a gradient too (the paper's sum-of-squares logit gives sigmoid exactly 0 here)."""
    (X, y), _ = digits
    x, t = X[:256], y[:256]

    def probabilities(rule: fl.rules.Rule) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = rule.attach(fl.models.mlp(64, [256, 256], 10))
        neg = random_negative_labels(t, 10, torch.Generator().manual_seed(1))
        acts = rule.activities(model, torch.cat([x, x]), torch.cat([t, neg]))
        return [torch.sigmoid(positive_logits(h, rule.layer_threshold(h), temperature=rule.layer_temperature(h)))
                for h in acts]

    for p in probabilities(fl.get_rule("ff", seed=0)):
        # measured over five init seeds: p between 0.026 and 0.053 on every row of both layers; 1e-3 leaves a
        # wide margin and still fails the saturated scale (p exactly 0 in float32)
        assert float(p.min()) > 1e-3 and float(p.max()) < 1 - 1e-3
    old = probabilities(fl.get_rule("ff", seed=0, temperature=1.0, normalize_input=False, label_mode="overwrite"))
    assert all(float(p.max()) == 0.0 for p in old)  # the saturation this scale removes
    # and the first step's gradient reaches every hidden layer, from negative data as well as positive
    rule = fl.get_rule("ff", seed=0, negatives="random")
    model = fl.models.mlp(64, [256, 256], 10)
    rule.grads(model, x, t)
    for lin in (model[1], model[3]):
        assert lin.weight.grad is not None and float(lin.weight.grad.abs().sum()) > 0


# --- accuracy (slow): means over three seeds -------------------------------------------------------
def _digits_curve(name: str, digits, seed: int, defaults: bool, **rule_opts) -> list[float]:
    (X, y), (Xt, yt) = digits
    cls = fl.rules.rule_class(name)
    d = cls.defaults if defaults else {"optimizer": "adam", "lr": 1e-3, "epochs": 20, "batch_size": 64}
    torch.manual_seed(seed)
    model = cls.default_model((1, 8, 8), 10) if defaults else fl.models.mlp(64, [256, 256], 10)
    hist = fl.train(model, fl.get_rule(name, seed=seed, **rule_opts), (X, y), (Xt, yt), optimizer=d["optimizer"],
                    lr=d["lr"], epochs=d["epochs"], batch_size=d["batch_size"], seed=seed, progress=False,
                    eval_train=False)
    return hist.column("test_acc")


def _digits_acc(name: str, digits, seed: int, defaults: bool, **rule_opts) -> float:
    return _digits_curve(name, digits, seed, defaults, **rule_opts)[-1]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ff", "cff"])
def test_adam_1e3_for_20_epochs_reaches_85_percent_on_every_seed(name: str, digits, one_thread) -> None:
    # measured (seeds 0, 1, 2): ff 0.978 / 0.975 / 0.975, cff 0.975 / 0.967 / 0.978 (first-step calibration on;
    # without it ff 0.939 / 0.936 / 0.947; before the mean-of-squares logit: ff 0.40 with seed 0)
    accs = [_digits_acc(name, digits, s, defaults=False) for s in range(3)]
    assert min(accs) >= 0.85, accs


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ff", "cff"])
def test_defaults_within_two_points_of_backprop_on_digits(name: str, digits, one_thread) -> None:
    # measured means over seeds 0-2: backprop 0.969, ff 0.984, cff 0.970 (ff 0.971 before the first-step
    # calibration); first epoch: ff 0.88 / cff 0.87 against backprop's 0.85 (0.31 / 0.18 before it)
    ours = [sum(c) / 3 for c in zip(*(_digits_curve(name, digits, s, defaults=True) for s in range(3)), strict=True)]
    bp = [sum(c) / 3 for c in zip(*(_digits_curve("backprop", digits, s, defaults=True) for s in range(3)),
                                  strict=True)]
    assert ours[-1] >= bp[-1] - 0.02, (ours, bp)
    assert ours[0] >= bp[0] - 0.05, (ours[0], bp[0])


# --- first-step calibration ------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["ff", "cff"])
def test_first_step_calibrates_every_layer_to_the_threshold(name: str, digits) -> None:
    """With the defaults, the first step scales each layer so that its mean squared activity on that batch's
    positive data is the threshold: p(positive) starts at about 0.5 (PyTorch's default init gives about 0.17
    against a threshold of 1, p about 0.04). The scaling happens once, is part of the rule's state, and
    ``calibrate=False`` leaves the weights as given."""
    (X, y), _ = digits
    x, t = X[:128], y[:128]
    torch.manual_seed(0)
    model = fl.models.mlp(64, [256, 256], 10)
    rule = fl.get_rule(name, seed=0)
    before = [m.weight.detach().clone() for m in (model[1], model[3])]
    rule.attach(model)
    rule.grads(model, x, t)
    assert rule.calibrated and rule.state_dict()["calibrated"] is True
    for h in rule.activities(model, x, t):
        # ReLU layers are positively homogeneous: one scaling puts the mean square at the threshold (1.0)
        # up to float32 rounding; the uncalibrated layers measure 0.15-0.2 here
        assert abs(float(h.pow(2).mean()) - rule.threshold) < 1e-3
        p = torch.sigmoid(positive_logits(h, rule.layer_threshold(h), temperature=rule.layer_temperature(h)))
        assert 0.35 < float(p.mean()) < 0.65
    after = [m.weight.detach().clone() for m in (model[1], model[3])]
    assert not torch.equal(after[1], before[1])
    rule.grads(model, x[:64], t[:64])  # a second step does not rescale
    assert all(torch.equal(m.weight, w) for m, w in zip((model[1], model[3]), after, strict=True))
    again = fl.get_rule(name, seed=0)
    again.load_state_dict(rule.state_dict())
    assert again.calibrated  # a resumed rule does not rescale the restored model
    old = {k: v for k, v in rule.state_dict().items() if k != "calibrated"}
    again.load_state_dict(old)
    assert again.calibrated  # a state from before calibration existed: never rescale a trained model
    plain = fl.get_rule(name, seed=0, calibrate=False)
    torch.manual_seed(0)
    m2 = plain.attach(fl.models.mlp(64, [256, 256], 10))
    w2 = m2[3].weight.detach().clone()
    plain.grads(m2, x, t)
    assert torch.equal(m2[3].weight, w2)
    with pytest.raises(ValueError, match="calibrate"):
        fl.get_rule(name, calibrate="yes")


def _curve(name: str, data: str, seed: int, epochs: int) -> list[float]:
    train, test = fl.data.load(data, "train"), fl.data.load(data, "test")
    cls = fl.rules.rule_class(name)
    classes = int(train[1].max()) + 1
    torch.manual_seed(seed)
    model = fl.models.mlp(train[0][0].numel(), cls.defaults["hidden"], classes)
    hist = fl.train(model, fl.get_rule(name, seed=seed), train, test, epochs=epochs, seed=seed, progress=False,
                    eval_train=False)
    return hist.column("test_acc")


@pytest.mark.parametrize("name", ["ff", "cff"])
@pytest.mark.parametrize("data", ["wine", "breast_cancer"])
def test_near_backprop_after_two_epochs_on_data_it_was_never_tuned_on(name: str, data: str, one_thread) -> None:
    """Every setting of ff/cff was chosen on digits and MNIST; on the bundled wine and breast-cancer tables
    their defaults stay within 5 points of backprop's defaults (mean of 3 seeds) at every epoch from the third.
    Measured (means over seeds 0-2, epochs 3-8; ``calibrate=False`` gives the "before"):
    wine ff 0.96-0.98, cff 0.95-0.99, backprop 0.67-0.97 (largest gap 0.00); breast cancer ff 0.93-0.95,
    cff 0.93-0.96, backprop 0.91-0.93 (gap <= -0.006). Without the first-step calibration the gaps were
    0.31 (wine ff, stuck at 0.64-0.71), 0.21 (wine cff), 0.28 (breast cancer ff: the majority class, 0.63,
    for three epochs) and 0.053 (breast cancer cff)."""
    epochs = 8
    ours = [sum(c) / 3 for c in zip(*(_curve(name, data, s, epochs) for s in range(3)), strict=True)]
    bp = [sum(c) / 3 for c in zip(*(_curve("backprop", data, s, epochs) for s in range(3)), strict=True)]
    gaps = [round(b - o, 3) for o, b in zip(ours[2:], bp[2:], strict=True)]
    assert max(gaps) <= 0.05, (ours, bp)
