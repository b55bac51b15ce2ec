"""Ordinary ``nn.Module`` models built from standard layers, so learning rules can walk their layers."""

from .basic import ACTIVATIONS, activation_module, build, cnn, mlp
from .convergent import ConvergentNet, convergent
from .gnn import GNN, GraphConv, gnn
from .harsanyi import HarsanyiNet
from .registry import MODELS, from_spec, register_model
from .resnet import BasicBlock, ResNet, resnet, resnet18
from .zoo import PositionEmbedding, RowTransformer, rescnn, transformer

__all__ = [
    "ACTIVATIONS",
    "MODELS",
    "BasicBlock",
    "ConvergentNet",
    "GNN",
    "GraphConv",
    "HarsanyiNet",
    "PositionEmbedding",
    "ResNet",
    "RowTransformer",
    "activation_module",
    "build",
    "cnn",
    "convergent",
    "from_spec",
    "gnn",
    "mlp",
    "register_model",
    "resnet",
    "rescnn",
    "resnet18",
    "transformer",
]
