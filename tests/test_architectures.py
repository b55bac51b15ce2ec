"""Rules on models that are not flat MLPs: the residual CNN and the transformer of ``fl.models``, block
selection, the block hooks of dfa / activity_forward_gradient / ulr / local_forward_gradient / pepita, and
blocks that return tuples (as Hugging Face layers do)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo  # noqa: F401  (forward-mode AD imports it lazily; import it before anything is patched)
import torch.nn.functional as F
from torch import nn

import forwardlearn as fl
from forwardlearn.blocks import cut_forward, select_blocks
from forwardlearn.forward_only.forward_mode import jvp_loss
from forwardlearn.forward_only.local import local_grads, save_inputs
from forwardlearn.models.resnet import BasicBlock

IMAGE = (1, 8, 8)


def _batch(n: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *IMAGE, generator=g), torch.randint(0, 10, (n,), generator=g)


def _grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


# --- the models and the block choice -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["rescnn", "transformer"])
def test_model_builders(name: str) -> None:
    model = fl.models.build(name, IMAGE, 10)
    assert model(torch.rand(3, *IMAGE)).shape == (3, 10)
    with pytest.raises(ValueError, match=f"model '{name}' needs image inputs"):
        fl.models.build(name, (64,), 10)


def test_auto_blocks_are_residual_blocks_transformer_layers_and_other_weighted_layers() -> None:
    assert [n for n, _ in select_blocks(fl.models.build("rescnn", IMAGE, 10))] == ["stem.0", "blocks.0", "head"]
    assert [n for n, _ in select_blocks(fl.models.build("transformer", IMAGE, 10))] == ["embed", "encoder.0", "head"]
    assert [n for n, _ in select_blocks(fl.models.build("mlp", IMAGE, 10, [8]))] == ["1", "3"]


def test_blocks_by_name_and_type_and_errors_name_the_rule() -> None:
    model = fl.models.build("rescnn", IMAGE, 10)
    assert [n for n, _ in select_blocks(model, ["blocks.0.conv1", "head"])] == ["blocks.0.conv1", "head"]
    assert [n for n, _ in select_blocks(model, nn.BatchNorm2d)] == ["stem.1", "blocks.0.bn1", "blocks.0.bn2"]
    assert [n for n, _ in select_blocks(model, [BasicBlock, nn.Linear])] == ["blocks.0", "head"]
    with pytest.raises(ValueError, match=r"dfa: blocks= names \['nope'\]"):
        select_blocks(model, ["nope"], "dfa")
    with pytest.raises(ValueError, match="ulr: blocks= .*contain other chosen blocks"):
        select_blocks(model, ["blocks.0", "blocks.0.conv1"], "ulr")
    with pytest.raises(ValueError, match="pepita: blocks= must be"):
        select_blocks(model, 3, "pepita")
    with pytest.raises(ValueError, match="dfa: no block chosen"):
        select_blocks(nn.Sequential(nn.ReLU()), None, "dfa")


# --- dfa: hooks ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["rescnn", "transformer"])
def test_dfa_signal_reaches_every_block_and_only_its_own(name: str) -> None:
    torch.manual_seed(0)
    model = fl.models.build(name, IMAGE, 10)
    x, y = _batch()
    rule = fl.get_rule("dfa", seed=0)
    rule.attach(model)
    state = rule.state_dict()

    def run(hook) -> dict:
        r = fl.get_rule("dfa", seed=0)
        r.load_state_dict(copy.deepcopy(state))
        r.local_loss_hook = hook
        work = copy.deepcopy(model)
        r.grads(work, x, y)
        return _grads(work)

    seen: list[int] = []
    base = run(lambda k, loss: seen.append(k) or loss)
    assert seen == [0, 1, 2]  # two cuts (into the middle block and into the head) and the output loss
    assert all(g is not None and bool(g.abs().sum() > 0) for g in base.values()), "a parameter got no signal"
    owners = []
    for k in seen:
        other = run(lambda j, loss, k=k: loss * 3.0 if j == k else loss)
        owners.append({n for n in base if not torch.equal(base[n], other[n])})
    assert all(owners) and not (owners[0] & owners[1] or owners[0] & owners[2] or owners[1] & owners[2])
    # each segment: the chosen block and what runs after it up to the next chosen block
    assert owners[2] == {"head.weight", "head.bias"}
    first = "stem." if name == "rescnn" else ("embed.", "position.")
    assert all(n.startswith(first) for n in owners[0])


def test_dfa_runs_no_reverse_pass_across_blocks() -> None:
    torch.manual_seed(0)
    model = fl.models.build("rescnn", IMAGE, 10)
    x, y = _batch()
    x.requires_grad_(True)  # a reverse pass through the first block would reach the input
    rule = fl.get_rule("dfa", seed=0)
    rule.attach(model)
    rule.grads(model, x, y)
    assert x.grad is None
    # every chosen block runs on a detached input: the segment before it ends there
    _, cuts = cut_forward(model, x, select_blocks(model))
    assert [j for j, _ in cuts] == [1, 2] and all(h.grad_fn is not None for _, h in cuts)


def test_dfa_on_an_mlp_matches_the_layer_by_layer_rule() -> None:
    # nn.Sequential MLP: block hooks give exactly Nøkland's layer-wise DFA (the test of the old path, re-derived)
    torch.manual_seed(0)
    net = fl.models.mlp(64, [16, 12], 10)
    x, y = _batch()
    rule = fl.get_rule("dfa", seed=0)
    rule.attach(net)
    rule.grads(net, x, y)
    b = fl.rules.direct_feedback_alignment.dfa_feedback(net)
    assert sorted(b) == [0, 1] and b[0].shape == (10, 16) and b[1].shape == (10, 12)
    out = net(x).detach().requires_grad_(True)
    (e,) = torch.autograd.grad(F.cross_entropy(out, y), out)
    h1 = net[2](net[1](net[0](x)))
    (gw,) = torch.autograd.grad(h1, net[1].weight, e @ b[0])
    torch.testing.assert_close(net[1].weight.grad, gw)


# --- local gradients of norm layers and blocks -------------------------------------------------------------------
@pytest.mark.parametrize("make", [lambda: (nn.BatchNorm2d(3), (4, 3, 5, 5)), lambda: (nn.LayerNorm(6), (4, 7, 6)),
                                  lambda: (BasicBlock(3, 3), (4, 3, 5, 5))])
@pytest.mark.parametrize("training", [True, False])
def test_local_grads_equal_autograd_of_the_unit(make, training: bool) -> None:
    torch.manual_seed(0)
    unit, shape = make()
    unit.train(training)
    with torch.no_grad():
        for p in unit.parameters():
            p.normal_()
    x = torch.randn(shape)
    g = torch.randn_like(unit(x))
    stats = [b.clone() for b in unit.buffers()]
    est = local_grads(save_inputs(unit, (x,), {}, None), g)
    assert all(torch.equal(a, b) for a, b in zip(stats, unit.buffers()))  # a re-run leaves no statistics behind
    unit.zero_grad()
    (unit(x) * g).sum().backward()
    for k, v in est.items():
        torch.testing.assert_close(v, unit.get_parameter(k).grad, rtol=1e-4, atol=1e-5)
    assert set(est) == {k for k, _ in unit.named_parameters()}


def test_layer_norm_is_perturbed_forward_only(monkeypatch) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 3))
    def forbid(what: str):
        def forbidden(*args, **kwargs):
            raise AssertionError(f"{what} ran inside grads")

        return forbidden

    monkeypatch.setattr(torch.autograd, "backward", forbid("torch.autograd.backward"))
    monkeypatch.setattr(torch.autograd, "grad", forbid("torch.autograd.grad"))
    monkeypatch.setattr(torch.Tensor, "backward", forbid("Tensor.backward"))
    for name in ("activity_forward_gradient", "ulr"):
        model.zero_grad(set_to_none=True)
        fl.get_rule(name, seed=0).grads(model, torch.randn(3, 4), torch.tensor([0, 1, 2]))
        assert model[1].weight.grad is not None and model[1].weight.grad.isfinite().all()


# --- forward mode through attention -------------------------------------------------------------------------------
def test_forward_mode_runs_through_attention() -> None:
    torch.manual_seed(0)
    model = fl.models.build("transformer", IMAGE, 10)
    x, y = _batch(8)
    params = [p for p in model.parameters()]
    tangents = [torch.randn_like(p) for p in params]
    _, d = jvp_loss(model, x, y, F.cross_entropy, lambda i, p: tangents[i])
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
    exact = sum(float((g * t).sum()) for g, t in zip(grads, tangents))
    assert d == pytest.approx(exact, rel=1e-4, abs=1e-6)
    fl.get_rule("forward_gradient", directions=2, seed=0).grads(model, x, y)
    assert all(p.grad is not None and p.grad.isfinite().all() for p in params)


# --- blocks that return tuples ------------------------------------------------------------------------------------
class TupleLayer(nn.Module):
    """Like a Hugging Face layer: keyword arguments in, ``(hidden_states, attention weights)`` out."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(d, 2, batch_first=True)
        self.norm = nn.LayerNorm(d)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> tuple:
        a, w = self.attention(hidden_states, hidden_states, hidden_states)
        return self.norm(hidden_states + a), w


class TupleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 8)
        self.layers = nn.ModuleList([TupleLayer(8), TupleLayer(8)])
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.reshape(x.shape[0], 8, 8))
        for layer in self.layers:
            h = layer(hidden_states=h)[0]
        return self.head(h.mean(1))


@pytest.mark.parametrize("name", ["dfa", "activity_forward_gradient", "ulr", "local_forward_gradient", "pepita"])
def test_blocks_returning_tuples(name: str) -> None:
    torch.manual_seed(0)
    model = TupleNet()
    assert [n for n, _ in select_blocks(model)] == ["embed", "layers.0", "layers.1", "head"]
    rule = fl.get_rule(name, seed=0)
    model = rule.attach(model)
    x, y = _batch(6)
    loss = rule.grads(model, x, y)
    assert loss == loss
    trained = [(n, p.grad) for n, p in model.named_parameters()]
    # pepita trains Linear/Conv2d layers it can hook (attention projections and norms are not: documented)
    where = ".embed." if name == "pepita" else ".layers.1."
    assert any(g is not None and bool(g.abs().sum() > 0) for n, g in trained if where in f".{n}")
    assert all(g is None or bool(g.isfinite().all()) for _, g in trained)


def test_local_forward_gradient_gives_layers_before_the_first_block_a_head() -> None:
    # as in a Hugging Face encoder: embeddings run before the first chosen layer and are trained on their own head
    torch.manual_seed(0)
    rule = fl.get_rule("local_forward_gradient", blocks=["layers.0", "layers.1", "head"], seed=0)
    model = rule.attach(TupleNet())
    assert len(model.heads) == 3
    x, y = _batch(6)
    rule.grads(model, x, y)
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.net.embed.parameters())
    assert all(p.grad is not None for p in model.heads.parameters())
