"""Tensor or mapping batches: :func:`batch_len`, :func:`take`, :func:`to_device`, :func:`call_model`,
:func:`logits_of` (defined in :mod:`forwardlearn.data.batches`, the lowest layer, so that rules use them too)."""

from ..data.batches import Inputs, batch_len, call_model, logits_of, take, to_device

__all__ = ["Inputs", "batch_len", "call_model", "logits_of", "take", "to_device"]
