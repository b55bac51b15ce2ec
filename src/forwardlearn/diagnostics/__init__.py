"""Diagnostics: how close a rule's gradient estimate is to the true gradient, and what it learned."""

from .gradients import gradient_alignment, true_gradient

__all__ = ["gradient_alignment", "true_gradient"]
