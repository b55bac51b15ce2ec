"""Tiny stand-ins for fine-tuning tests: a randomly initialised 2-layer BERT with a 30-word tokenizer saved as a
Hugging Face model directory, and a fake SpamAssassin messages file whose spam and ham use different words."""

from __future__ import annotations

import json
from pathlib import Path

import torch

SPAM_WORDS = ["free", "money", "offer", "click", "win", "cash", "cheap", "now"]
HAM_WORDS = ["meeting", "linux", "patch", "list", "thanks", "code", "kernel", "review"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *SPAM_WORDS, *HAM_WORDS, "the", "a", "re", "hello"]
#: per group: how many fake messages (the real corpus has 2500/1400/250/500/1396)
FAKE_COUNTS = {"easy-ham-1": 20, "easy-ham-2": 10, "hard-ham-1": 10, "spam-1": 10, "spam-2": 10}


def tiny_bert_dir(d: Path, vocab: list[str] = VOCAB, vocab_size: int | None = None) -> Path:
    """Save a random tiny BERT (hidden 16, 2 layers, 2 heads) and a word-piece tokenizer of ``vocab`` in ``d``."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, model_max_length=64)
    tok.save_pretrained(d)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=vocab_size or len(vocab), hidden_size=16, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=32, max_position_embeddings=64)
        BertModel(cfg).save_pretrained(d)
    return d


def fake_messages(root: Path, counts: dict[str, int] = FAKE_COUNTS) -> dict[str, tuple[int, str]]:
    """Write ``<root>/spam-assassin/messages.jsonl`` and return the ``EXPECTED`` record that checks it."""
    from forwardlearn.data.common import sha256
    from forwardlearn.data.spam_assassin import FILE, NAME

    g = torch.Generator().manual_seed(0)
    d = root / NAME
    d.mkdir(parents=True, exist_ok=True)
    rows = []
    for group, n in counts.items():
        words = SPAM_WORDS if group.startswith("spam") else HAM_WORDS
        for i in range(n):
            pick = [words[int(j)] for j in torch.randint(len(words), (6,), generator=g)]
            raw = f"From: x@example.com\nSubject: {' '.join(pick[:2])}\n\n{' '.join(pick[2:])}\n"
            rows.append({"group": group, "id": f"{i:05d}", "text": raw})
    path = d / FILE
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {FILE: (path.stat().st_size, sha256(path))}
