"""Where a rule acts on a model that is not a flat ``nn.Sequential``: chosen blocks, and hooks on them.

:func:`select_blocks` turns a ``blocks=`` rule option into a list of ``(name, module)``:

- ``None`` / ``"auto"``: every residual block (``BasicBlock``/``Bottleneck``), every transformer layer
  (``nn.TransformerEncoderLayer``/``nn.TransformerDecoderLayer``, or a module whose class name ends in
  ``Layer``/``Block`` and that holds an attention module, such as Hugging Face's ``BertLayer``), the
  innermost such module when they nest; then every ``nn.Linear``/``nn.Conv2d`` not inside one of them;
- a list of module names (``model.named_modules()`` names, ``""`` not allowed);
- a module type or a tuple/list of types: every module of those types not inside another one.

Blocks may return tuples (Hugging Face layers do): the hooks here act on element 0 and pass the rest on.
:func:`cut_forward` runs a model with the input of every chosen block detached, so autograd never
crosses a block boundary; the tensors entering each block are returned as the places where rules such
as DFA inject their signal.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .data.batches import call_model, logits_of
from .models.resnet import BasicBlock

BlockSpec = None | str | type | Sequence[str] | Sequence[type]
LAYERS = (nn.Linear, nn.Conv2d)
TRANSFORMER_LAYERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
RESIDUAL_BLOCKS = (BasicBlock,)
_RESIDUAL_NAMES = ("BasicBlock", "Bottleneck")


def _is_attention(m: nn.Module) -> bool:
    return isinstance(m, nn.MultiheadAttention) or "Attention" in type(m).__name__


def is_block(m: nn.Module) -> bool:
    """A residual block or a transformer layer (see the module docstring)."""
    if isinstance(m, (*RESIDUAL_BLOCKS, *TRANSFORMER_LAYERS)) or type(m).__name__ in _RESIDUAL_NAMES:
        return True
    name = type(m).__name__
    if _is_attention(m) or not name.endswith(("Layer", "Block")):
        return False
    return any(_is_attention(c) for c in m.modules() if c is not m)


def _innermost(named: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """Drop every module that contains another one of the list."""
    ids = {id(m) for _, m in named}
    return [(n, m) for n, m in named if not any(id(c) in ids for c in m.modules() if c is not m)]


def _outermost(named: list[tuple[str, nn.Module]], rule: str) -> list[tuple[str, nn.Module]]:
    inner = {id(c) for _, m in named for c in m.modules() if c is not m}
    return [(n, m) for n, m in named if id(m) not in inner]


def check_block_spec(spec: Any) -> BlockSpec:
    """``spec`` if it has the form of a ``blocks=`` option (see :func:`select_blocks`), else ``ValueError``
    (``get_rule`` names the rule)."""
    if spec is None or isinstance(spec, str) or (isinstance(spec, type) and issubclass(spec, nn.Module)):
        return spec
    if isinstance(spec, (tuple, list)) and spec and (all(isinstance(s, str) for s in spec) or all(
            isinstance(s, type) and issubclass(s, nn.Module) for s in spec)):
        return spec
    raise ValueError(f"blocks= must be None, 'auto', module names or module types, got {spec!r}")


def select_blocks(model: nn.Module, spec: BlockSpec = None, rule: str = "blocks") -> list[tuple[str, nn.Module]]:
    """The chosen blocks of ``model`` as ``(name, module)`` in ``named_modules`` order (see module docstring).

    ``rule`` names the caller in error messages. Raises ``ValueError`` for an unknown name, a bad spec
    or a selection that is empty.
    """
    named = [(n, m) for n, m in model.named_modules() if m is not model]
    if spec is None or spec == "auto":
        blocks = _innermost([(n, m) for n, m in named if is_block(m)])
        inside = {id(c) for _, b in blocks for c in b.modules()}
        chosen = {id(m) for _, m in blocks}
        chosen |= {id(m) for _, m in named if isinstance(m, LAYERS) and id(m) not in inside}
        out = [(n, m) for n, m in named if id(m) in chosen]
        if not out and isinstance(model, LAYERS):
            out = [("", model)]
    elif isinstance(spec, type) or (isinstance(spec, (tuple, list)) and spec
                                    and all(isinstance(s, type) for s in spec)):
        types = (spec,) if isinstance(spec, type) else tuple(spec)
        if not all(issubclass(t, nn.Module) for t in types):
            raise ValueError(f"{rule}: blocks= types must be nn.Module subclasses, got {types!r}")
        out = _outermost([(n, m) for n, m in named if isinstance(m, types)], rule)
    elif isinstance(spec, (str, tuple, list)) and all(isinstance(s, str) for s in ([spec] if isinstance(spec, str)
                                                                                  else spec)):
        names = [spec] if isinstance(spec, str) else list(spec)
        table = dict(named)
        missing = [s for s in names if s not in table]
        if missing:
            raise ValueError(f"{rule}: blocks= names {missing} are not modules of the model; "
                             f"valid names include {[n for n, _ in named][:12]}")
        if len(set(names)) != len(names):
            raise ValueError(f"{rule}: blocks= names repeat: {names}")
        wanted = set(names)
        out = [(n, m) for n, m in named if n in wanted]
        nested = [n for n, m in out if any(c is not m and any(c is b for _, b in out) for c in m.modules())]
        if nested:
            raise ValueError(f"{rule}: blocks= {nested} contain other chosen blocks; choose non-nested modules")
    else:
        raise ValueError(f"{rule}: blocks= must be None, 'auto', module names or module types, got {spec!r}")
    if not out:
        raise ValueError(f"{rule}: no block chosen in {type(model).__name__} by blocks={spec!r} (auto looks for "
                         "residual blocks, transformer layers, Linear and Conv2d layers)")
    return out


def first_tensor(value: Any) -> Tensor:
    """Element 0 of a block's output when it is a tuple/list, else the tensor or ``.logits``
    (:func:`~forwardlearn.data.batches.logits_of`)."""
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], Tensor):
        return value[0]
    return logits_of(value)


def replace_first(value: Any, new: Tensor) -> Any:
    """``value`` with element 0 (or the tensor itself) replaced by ``new``; tuples stay tuples."""
    if isinstance(value, Tensor):
        return new
    if isinstance(value, tuple):
        return (new, *value[1:])
    if isinstance(value, list):
        return [new, *value[1:]]
    raise TypeError(f"expected a tensor (or a tuple starting with one), got {type(value).__name__}")


def _block_input(args: tuple, kwargs: dict) -> tuple[Tensor | None, Callable[[Tensor], tuple[tuple, dict]]]:
    """The tensor a block runs on (positional 0, else ``hidden_states``/the first tensor keyword) and a
    function that puts a replacement back in its place."""
    if args and isinstance(args[0], Tensor):
        return args[0], lambda t: ((t, *args[1:]), kwargs)
    for k in ("hidden_states", "x", "src", "input"):
        if isinstance(kwargs.get(k), Tensor):
            return kwargs[k], lambda t, k=k: (args, {**kwargs, k: t})
    for k, v in kwargs.items():
        if isinstance(v, Tensor):
            return v, lambda t, k=k: (args, {**kwargs, k: t})
    return None, lambda t: (args, kwargs)


class Cuts:
    """Context manager: while active, every chosen block runs on a detached copy of its input.

    ``cuts`` collects, in execution order, ``(block index, tensor)`` for each block input computed from trained
    parameters: the end of the segment before that block, where a rule such as DFA can inject a signal.
    """

    def __init__(self, blocks: list[tuple[str, nn.Module]]) -> None:
        self.blocks = blocks
        self.cuts: list[tuple[int, Tensor]] = []
        self._handles: list[Any] = []

    def __enter__(self) -> Cuts:
        for j, (_, m) in enumerate(self.blocks):
            def pre(m: nn.Module, args: tuple, kwargs: dict, j: int = j) -> tuple[tuple, dict] | None:
                x, put = _block_input(args, kwargs)
                if x is None or not x.requires_grad:
                    return None
                if x.grad_fn is not None:  # a leaf (the data) has nothing upstream to send a signal to
                    self.cuts.append((j, x))
                return put(x.detach())

            self._handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def cut_forward(model: nn.Module, inputs: Any, blocks: list[tuple[str, nn.Module]]
                ) -> tuple[Tensor, list[tuple[int, Tensor]]]:
    """Run ``model`` with autograd cut at every chosen block's input; return ``(output, cuts)`` (see :class:`Cuts`).

    ``output`` is the model's output tensor (element 0 / ``.logits`` of a structured output).
    """
    with torch.enable_grad(), Cuts(blocks) as c:
        out = first_tensor(call_model(model, inputs))
    return out, c.cuts


__all__ = ["BlockSpec", "Cuts", "check_block_spec", "cut_forward", "first_tensor", "is_block",
           "replace_first", "select_blocks"]
