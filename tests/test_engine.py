"""The training engine: mapping batches, step-based runs, the fused step, rule names and their defaults,
the guarded checkpoint reader."""

import types

import pytest
import torch
from torch import nn

import forwardlearn as fl
from forwardlearn.cli import main
from forwardlearn.training import CHECKPOINT, Callback, FusedStep, Trainer, load_checkpoint, make_optimizer
from forwardlearn.training.batches import batch_len, call_model, logits_of, take, to_device


class TokenClassifier(nn.Module):
    """A tiny stand-in for a Hugging Face sequence classifier: ``model(input_ids=, attention_mask=)`` returns an
    object with ``.logits``."""

    def __init__(self, vocab: int = 20, width: int = 16, classes: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.head = nn.Linear(width, classes)

    def forward(self, input_ids, attention_mask):
        m = attention_mask.unsqueeze(-1).float()
        pooled = (self.embed(input_ids) * m).sum(1) / m.sum(1).clamp(min=1)
        return types.SimpleNamespace(logits=self.head(pooled))


def _token_data(n=256, length=8, seed=0):
    """Class 1 iff token 3 occurs in the unmasked part; padding (token 0) masked out."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 20, (n, length), generator=g)
    lengths = torch.randint(2, length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    ids = ids * mask
    y = ((ids == 3) & (mask == 1)).any(1).long()
    return {"input_ids": ids, "attention_mask": mask}, y


def test_batch_helpers_on_tensors_and_mappings():
    x = torch.arange(12.0).view(6, 2)
    enc = {"input_ids": torch.arange(6).view(6, 1), "attention_mask": torch.ones(6, 1), "name": "keep"}
    idx = torch.tensor([4, 1])
    assert batch_len(x) == 6 and batch_len(enc) == 6
    assert torch.equal(take(x, idx), x[idx])
    part = take(enc, idx)
    assert torch.equal(part["input_ids"], enc["input_ids"][idx]) and part["name"] == "keep"
    assert to_device(enc, "cpu")["attention_mask"].device.type == "cpu"
    out = types.SimpleNamespace(logits=torch.ones(2, 3))
    assert logits_of(out) is out.logits and logits_of(x) is x
    with pytest.raises(ValueError, match="neither a tensor nor has .logits"):
        logits_of("text")
    model = TokenClassifier()
    ids = {k: v for k, v in part.items() if k != "name"}
    ids["input_ids"] = ids["input_ids"].repeat(1, 3)
    ids["attention_mask"] = ids["attention_mask"].repeat(1, 3).long()
    assert call_model(model, ids).logits.shape == (2, 2)


def test_backprop_trains_a_mapping_input_model():
    X, y = _token_data(512, seed=0)
    Xt, yt = _token_data(256, seed=1)
    torch.manual_seed(0)
    model = TokenClassifier()
    hist = fl.train(model, "backprop", (X, y), (Xt, yt), epochs=15, lr=1e-2, batch_size=32, progress=False)
    # the majority class is ~0.35 of the test set (token 3 in 2..8 of 19 tokens); backprop reaches ~0.95 here
    assert hist.final["test_acc"] >= 0.85
    assert hist.column("loss")[-1] < hist.column("loss")[0]


def _small_trainer(out_dir, steps=None, epochs=None, eval_every=None, seed=0):
    torch.manual_seed(seed)
    rule = fl.get_rule("backprop", seed=seed)
    model = rule.attach(fl.models.mlp(64, [16], 10))
    opt = make_optimizer("sgd", model.parameters(), 0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.8)  # stepped at epoch ends
    return Trainer(model, rule, opt, epochs=epochs, steps=steps, eval_every=eval_every, batch_size=50, seed=seed,
                   out_dir=out_dir, progress=False, scheduler=sched)


def test_steps_and_eval_every(tmp_path, digits):
    (X, y), test = digits
    data = (X[:300], y[:300])  # 6 steps per epoch
    tr = _small_trainer(tmp_path / "a", steps=14, epochs=100, eval_every=5)
    hist = tr.fit(data, (test[0][:100], test[1][:100]))
    assert tr.global_step == 14 and tr.epoch == 2 and tr.step_in_epoch == 2
    assert hist.column("step") == [5, 10, 14]
    assert all("test_acc" in r and "train_acc" in r for r in hist.epochs)
    # the same 14 steps as an epoch-based run cut short: identical weights (the same shuffles, the same steps)
    ref = _small_trainer(tmp_path / "b", steps=14)
    ref.fit(data)
    assert all(torch.equal(a, b) for a, b in zip(tr.model.state_dict().values(), ref.model.state_dict().values()))
    assert [r.get("step") for r in ref.history.epochs] == [None, None]  # no eval_every: one record per epoch


@pytest.mark.parametrize("stop", [8, 6])  # 8: mid-epoch 2; 6: exactly at the end of epoch 1
def test_step_based_resume_mid_epoch_is_exact(tmp_path, digits, stop):
    (X, y), _ = digits
    data = (X[:300], y[:300])  # 6 steps per epoch
    full = _small_trainer(tmp_path / "full", steps=16, eval_every=2)
    full.fit(data)
    part = _small_trainer(tmp_path / "part", steps=stop, eval_every=2)
    part.fit(data)
    assert part.global_step == stop
    resumed = _small_trainer(tmp_path / "part", steps=16, eval_every=2, seed=99)
    resumed.fit(data, resume=True)
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    assert full.history.column("loss") == resumed.history.column("loss")


def test_fused_strategy_needs_no_grad_buffers(digits):
    (X, y), test = digits
    torch.manual_seed(0)
    model = fl.models.mlp(64, [16], 10)
    rule = fl.get_rule("zo_spsa", seed=0, directions=8)
    hist = fl.train(model, rule, (X, y), test, strategy="fused", lr=0.1, epochs=3, batch_size=64, progress=False)
    assert all(p.grad is None for p in model.parameters())
    # chance is 0.1; three epochs of fused SPSA (K=8, lr 0.1) reached 0.38-0.61 over seeds 0-4 (0.49 here)
    assert hist.final["test_acc"] > 0.3
    with pytest.raises(ValueError, match="no fused step"):
        fl.train(fl.models.mlp(64, [8], 10), "backprop", (X[:64], y[:64]), strategy="fused", epochs=1,
                 progress=False)


def test_fused_strategy_equals_the_rules_fused_steps(digits):
    """The loop with FusedStep does exactly what calling rule.fused_step on its batches does."""
    (X, y), _ = digits
    X, y = X[:200], y[:200]
    torch.manual_seed(0)
    m1 = fl.models.mlp(64, [8], 10)
    m2 = fl.models.mlp(64, [8], 10)
    m2.load_state_dict(m1.state_dict())
    r1, r2 = fl.get_rule("zo_spsa", seed=1, directions=2), fl.get_rule("zo_spsa", seed=1, directions=2)
    Trainer(m1, r1, strategy=FusedStep(0.1), epochs=1, batch_size=50, seed=4, progress=False).fit((X, y))
    perm = torch.randperm(200, generator=torch.Generator().manual_seed(4))
    for i in range(4):
        idx = perm[i * 50 : (i + 1) * 50]
        r2.fused_step(m2, X[idx], y[idx], lr=0.1)
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))


class _Seen(Callback):
    def on_train_begin(self, trainer):
        self.optimizer = trainer.optimizer
        self.batch_size = trainer.batch_size
        self.epochs = trainer.epochs


def test_train_takes_a_rule_name_and_its_defaults(digits):
    (X, y), _ = digits
    seen = _Seen()
    fl.train(fl.models.mlp(64, [8], 10), "ff", (X[:64], y[:64]), epochs=1, progress=False, callbacks=[seen])
    d = fl.rules.rule_class("ff").defaults
    assert type(seen.optimizer).__name__.lower() == d["optimizer"]
    assert seen.optimizer.param_groups[0]["lr"] == d["lr"] and seen.batch_size == d["batch_size"]
    assert seen.epochs == 1  # what the caller gives wins
    seen2 = _Seen()
    fl.train(fl.models.mlp(64, [8], 10), fl.get_rule("zo_spsa"), (X[:64], y[:64]), lr=0.5, optimizer="sgd",
             steps=1, progress=False, callbacks=[seen2])
    assert isinstance(seen2.optimizer, torch.optim.SGD) and seen2.optimizer.param_groups[0]["lr"] == 0.5
    assert seen2.epochs == fl.rules.rule_class("zo_spsa").defaults["epochs"]


def test_train_attaches_once(digits):
    (X, y), _ = digits
    rule = fl.get_rule("backprop")
    calls = []
    attach = rule.attach
    rule.attach = lambda m: (calls.append(1), attach(m))[1]
    fl.train(fl.models.mlp(64, [8], 10), rule, (X[:64], y[:64]), epochs=1, progress=False)
    assert len(calls) == 1


@pytest.mark.parametrize("kind", ["corrupt", "truncated", "foreign", "not a dict"])
def test_guarded_checkpoint_load(tmp_path, kind):
    good = tmp_path / "good.pt"
    torch.save({"model": {"w": torch.ones(3)}, "optimizer": {}, "rule": {}, "epoch": 1, "global_step": 1,
                "history": [], "config": {}}, good)
    path = tmp_path / f"{kind}.pt"
    if kind == "corrupt":
        path.write_bytes(b"\x00garbage" * 50)
    elif kind == "truncated":
        path.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    elif kind == "foreign":
        torch.save({"weights": torch.ones(2)}, path)
    else:
        torch.save(torch.ones(2), path)
    with pytest.raises(ValueError, match="not a forwardlearn checkpoint") as e:
        load_checkpoint(path)
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)
    assert load_checkpoint(good)["epoch"] == 1
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


def test_cli_resume_on_a_corrupt_checkpoint_is_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / CHECKPOINT).write_bytes(b"PK\x03\x04 not really a zip")
    rc = main(["train", "--rule", "backprop", "--epochs", "1", "--quiet", "--out", str(out), "--resume"])
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and "not a forwardlearn checkpoint" in err and "Traceback" not in err


def test_one_argument_order_and_one_name_per_concept(digits):
    (X, y), _ = digits
    model, rule = fl.models.mlp(64, [8], 10), fl.get_rule("backprop")
    with pytest.raises(ValueError, match=r"model first.*gradient_alignment\(model, rule"):
        fl.diagnostics.gradient_alignment(rule, model, X[:8], y[:8])
    with pytest.raises(ValueError, match="model first"):
        fl.training.accuracy(rule, model, X[:8], y[:8])
    assert 0 <= fl.training.accuracy(model, rule, X[:8], y[:8]) <= 1
    with pytest.raises(ValueError, match="hidden widths second"):
        fl.models.cnn(1, 10, input_size=8)  # the order before: (in_channels, classes, ...)
    assert fl.models.cnn(1, (8,), 3, input_size=8)(torch.rand(2, 1, 8, 8)).shape == (2, 3)
    with pytest.raises(ValueError, match="stage widths second"):
        fl.models.resnet(1, 10)
    with pytest.raises(ValueError, match="option 'theta' of rule 'forward_gnn' is called 'threshold'"):
        fl.get_rule("forward_gnn", theta=1.0)
    from forwardlearn.distributed import fedavg

    with pytest.raises(ValueError, match="loss="):
        fedavg(model, [(X[:8], y[:8])], None, rounds=1, lr=0.1, loss_fn=torch.nn.functional.cross_entropy)


def test_seed_scalar_trainer_takes_a_scheduler_and_times_cpu(digits):
    """The distributed trainer is the one loop: a scheduler steps per epoch, records carry CPU seconds."""
    from forwardlearn.distributed import SeedScalarTrainer

    (X, y), _ = digits
    model = fl.models.mlp(64, [8], 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    tr = SeedScalarTrainer(model, fl.get_rule("zo_spsa", seed=0, directions=2), opt, epochs=2, batch_size=64,
                           ranks=range(2), scheduler=sched)
    hist = tr.fit((X[:256], y[:256]))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)
    assert all(r["cpu_seconds"] >= 0 and r["world_size"] == 2 for r in hist.epochs)


def test_models_from_a_spec_and_rules_say_theirs():
    spec = fl.rules.rule_class("ep").model_spec()
    assert spec["name"] == "convergent"
    assert isinstance(fl.models.from_spec(spec, (1, 8, 8), 10), fl.models.ConvergentNet)
    assert fl.rules.rule_class("pepita").model_spec()["init"] == "he_uniform"
    m = fl.rules.rule_class("backprop").default_model((1, 8, 8), 10, hidden=[7])
    assert m(torch.rand(2, 1, 8, 8)).shape == (2, 10) and m[1].out_features == 7
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        fl.models.from_spec({"name": "nope"}, (4,), 2)
