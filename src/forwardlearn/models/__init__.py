"""Ordinary ``nn.Module`` models built from standard layers, so learning rules can walk their layers."""

from .basic import ACTIVATIONS, activation_module, build, cnn, mlp
from .convergent import ConvergentNet, convergent
from .gnn import GNN, GraphConv, gnn
from .harsanyi import HarsanyiNet
from .resnet import BasicBlock, ResNet, resnet, resnet18

__all__ = [
    "ACTIVATIONS",
    "BasicBlock",
    "ConvergentNet",
    "GNN",
    "GraphConv",
    "HarsanyiNet",
    "ResNet",
    "activation_module",
    "build",
    "cnn",
    "convergent",
    "gnn",
    "mlp",
    "resnet",
    "resnet18",
]
