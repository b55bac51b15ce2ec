"""Ordinary ``nn.Module`` models built from standard layers, so learning rules can walk their layers."""

from .basic import ACTIVATIONS, activation_module, cnn, mlp

__all__ = ["ACTIVATIONS", "activation_module", "cnn", "mlp"]
