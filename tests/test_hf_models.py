"""Pretrained-model loading and the rules on token batches, with a tiny random BERT (no 90 MB load here)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

import forwardlearn as fl  # noqa: E402
from forwardlearn.models import hf  # noqa: E402
from hf_fixtures import VOCAB, tiny_bert_dir  # noqa: E402


@pytest.fixture
def batch(tiny_dir):
    tok = hf.load_tokenizer(tiny_dir)
    texts = ["free money now", "linux kernel patch review", "click win cash", "thanks for the code"]
    return hf.tokenize(tok, texts, 12), torch.tensor([1, 0, 1, 0])


def test_model_dir_is_offline_and_names_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="not a local directory; loading is offline"):
        hf.model_dir("sentence-transformers/all-MiniLM-L6-v2")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a Hugging Face model directory"):
        hf.model_dir(tmp_path / "empty")


def test_parameter_choices_train_what_they_say(tiny_dir):
    full = hf.load_classifier(tiny_dir, params="full")
    n = sum(p.numel() for p in full.parameters())
    assert sum(p.numel() for p in fl.rules.trainable_parameters(full)) == n
    head = hf.load_classifier(tiny_dir, params="head")
    assert [p.shape for p in fl.rules.trainable_parameters(head)] == [torch.Size([2, 16]), torch.Size([2])]
    lora = hf.load_classifier(tiny_dir, params="lora", lora_rank=2)
    names = [k for k, p in lora.named_parameters() if p.requires_grad]
    # 2 layers x (query, value) x (A, B), plus the head's weight and bias
    assert len(names) == 2 * 2 * 2 + 2 and all("lora_" in k or k.startswith("head.") for k in names)
    with pytest.raises(ValueError, match="unknown --params 'bias'"):
        hf.load_classifier(tiny_dir, params="bias")
    # the same seed gives the same head, and dropout is off (two forwards in train mode agree)
    assert torch.equal(full.head.weight, hf.load_classifier(tiny_dir, seed=0).head.weight)


def test_tokenizer_mismatch_and_bad_text_are_refused(tmp_path, tiny_dir):
    small = tiny_bert_dir(tmp_path / "small", VOCAB, vocab_size=10)
    with pytest.raises(ValueError, match="tokenizer does not match the model"):
        hf.check_tokenizer(hf.load_tokenizer(small), hf.load_classifier(small), small)
    tok = hf.load_tokenizer(tiny_dir)
    with pytest.raises(ValueError, match="text 1 is empty"):
        hf.tokenize(tok, ["free", "  "], 8)
    with pytest.raises(ValueError, match="longer than the model takes"):
        hf.tokenize(tok, ["free"], 65)
    enc = hf.tokenize(tok, ["free " * 100], 8)  # over-long text: truncated to max_length tokens
    assert enc["input_ids"].shape == (1, 8)


def test_rules_take_mapping_batches(tiny_dir, batch):
    x, y = batch
    model = hf.load_classifier(tiny_dir, attention="eager")
    model.train()
    assert torch.equal(model(**x), model(**x))  # dropout is off: the forward-only differences need this
    loss = fl.get_rule("backprop").grads(model, x, y)
    exact = [p.grad.clone() for p in model.parameters()]
    with torch.no_grad():
        assert loss == pytest.approx(float(torch.nn.functional.cross_entropy(model(**x), y)))
    model.zero_grad(set_to_none=True)
    # forward_gradient: d = grad . v exactly (forward-mode AD through eager attention), so the estimate's
    # projection on v equals the true gradient's projection (float32 rounding: rel 1e-4)
    rule = fl.get_rule("forward_gradient", directions=1, seed=3)
    seeds, d, _ = rule.estimate(model, x, y)
    rule.apply(model, seeds, torch.ones(1, dtype=torch.float64))  # .grad = v
    v = [p.grad for p in model.parameters()]
    true = sum(float((g * t).sum()) for g, t in zip(exact, v))
    assert float(d[0]) == pytest.approx(true, rel=1e-4)
    # zo_spsa: the central difference approximates the same directional derivative (eps 1e-3 in float32:
    # measured within 2 % here) and the weights come back to within rounding after estimate()
    before = [p.detach().clone() for p in model.parameters()]
    zo = fl.get_rule("zo_spsa", directions=1, seed=3, eps=1e-3)
    model.zero_grad(set_to_none=True)
    s, scal, _ = zo.estimate(model, x, y)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(before, model.parameters()))
    zo.apply(model, s, torch.ones(1, dtype=torch.float64))
    z = [p.grad for p in model.parameters()]
    true_z = sum(float((g * t).sum()) for g, t in zip(exact, z))
    assert float(scal[0]) == pytest.approx(true_z, rel=2e-2)
    # the fused step moves the weights by -lr * s * z
    model.zero_grad(set_to_none=True)
    zo.fused_step(model, x, y, lr=1e-2)
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_forward_gradient_through_sdpa_attention_works_or_names_the_layer(tiny_dir, batch):
    x, y = batch
    eager = fl.get_rule("forward_gradient", directions=1, seed=0).estimate(
        hf.load_classifier(tiny_dir, attention="eager"), x, y)[1]
    model = hf.load_classifier(tiny_dir, attention="sdpa")
    try:  # torch's fused CPU sdpa kernel has no forward-mode rule; the math kernel has
        d = fl.get_rule("forward_gradient", directions=1, seed=0).estimate(model, x, y)[1]
    except RuntimeError as e:
        assert "forward-mode AD cannot go through layer 'encoder.encoder.layer.0.attention" in str(e)
    else:
        assert float(d[0]) == pytest.approx(float(eager[0]), rel=1e-4)


def test_probe_head_predicts_what_the_logistic_regression_predicts(tiny_dir, batch):
    from sklearn.linear_model import LogisticRegression

    x, y = batch
    model = hf.load_classifier(tiny_dir)
    hf.fit_probe_head(model, (x, y))
    with torch.no_grad():
        feats = model.features(**x)
        ours = model(**x).argmax(1)
    theirs = LogisticRegression(max_iter=2000).fit(feats.numpy(), y.numpy())
    assert ours.tolist() == theirs.predict(feats.numpy()).tolist()
    p = torch.softmax(model(**x), 1)[:, 1].detach()  # the same probabilities, not only the same labels
    assert torch.allclose(p, torch.from_numpy(theirs.predict_proba(feats.numpy())[:, 1]).float(), atol=1e-5)
