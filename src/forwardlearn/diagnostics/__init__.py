"""Diagnostics: how close a rule's gradient estimate is to the true gradient, and what it learned."""

from .alignment import weight_alignment
from .gradients import gradient_alignment, true_gradient
from .sparsity import activity_sparsity

__all__ = ["activity_sparsity", "gradient_alignment", "true_gradient", "weight_alignment"]
