"""Batches that are a tensor or a mapping of tensors (a tokenizer's ``BatchEncoding``, a dict of ``input_ids``,
``attention_mask``, ...), and model outputs that are a tensor or an object with ``.logits``.

Every place that slices, moves or feeds a batch goes through these five functions, so the training loop, the
evaluation and the rules handle both kinds of input the same way. They live with the data (the lowest layer)
so that rules can use them; :mod:`forwardlearn.training.batches` is the same module under the engine's name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

Inputs = Tensor | Mapping[str, Any]


def batch_len(inputs: Inputs) -> int:
    """Number of examples: ``len`` of a tensor, or of the first tensor of a mapping."""
    if isinstance(inputs, Mapping):
        for v in inputs.values():
            if isinstance(v, Tensor):
                return len(v)
        raise ValueError(f"a mapping batch needs at least one tensor, got keys {sorted(inputs)}")
    return len(inputs)


def take(inputs: Inputs, idx: Tensor | slice) -> Inputs:
    """The examples ``idx`` (an index tensor or a slice) of a tensor, or of every tensor of a mapping."""
    if isinstance(inputs, Mapping):
        return {k: v[idx] if isinstance(v, Tensor) else v for k, v in inputs.items()}
    return inputs[idx]


def to_device(inputs: Inputs, device: torch.device | str) -> Inputs:
    """``inputs`` on ``device`` (every tensor of a mapping; other values unchanged)."""
    if isinstance(inputs, Mapping):
        return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in inputs.items()}
    return inputs.to(device)


def call_model(model: nn.Module, inputs: Inputs) -> Any:
    """``model(**inputs)`` for a mapping, ``model(inputs)`` otherwise."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)


def logits_of(outputs: Any) -> Tensor:
    """The class scores of a model's output: the tensor itself, or its ``.logits``."""
    if isinstance(outputs, Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(outputs, Mapping) and isinstance(outputs.get("logits"), Tensor):
        return outputs["logits"]
    raise ValueError(f"model output of type {type(outputs).__name__} is neither a tensor nor has .logits")


__all__ = ["Inputs", "batch_len", "call_model", "logits_of", "take", "to_device"]
