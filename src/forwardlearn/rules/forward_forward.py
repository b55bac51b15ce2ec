"""Forward-Forward (Hinton 2022) and collaborative Forward-Forward (Lorberbom et al. 2024).

Supervised Forward-Forward (Hinton 2022, "The Forward-Forward Algorithm: Some Preliminary
Investigations", sections 2 and 3.3): the one-hot label is written into the input; *positive* data
carry the true label, *negative* data the same input with a wrong label. Every layer has its own
objective, a logistic "is this positive?" on its goodness (section 2, eq. 1)::

    p(positive) = sigmoid((G - theta) / T),        G = sum_j y_j ** 2

and each layer's input is length-normalised (section 2.1) so that a layer cannot read the previous
layer's goodness off the length of its input. Autograd runs only inside one layer: the input of every
layer is detached, so no gradient crosses a layer boundary.

Scale. With ``theta`` equal to the number of units ``D`` (as in Hinton's Matlab code and Loewe's
PyTorch reference, ``sum_of_squares - z.shape[1]``) and ``T = 1``, a freshly initialised layer has a
goodness far below ``theta`` (on digits about 12 against 256), so ``sigmoid`` is exactly 0 on negative
data and the loss is saturated: positive and negative data are pushed up alike until the goodness
reaches ``theta``. The rule's default ``T = D / 4`` makes the logit ``4 * (mean_j y_j ** 2 - threshold)``:
the per-unit (mean of squares) goodness of the widely copied PyTorch implementation
``mohammadpz/pytorch_forward_forward`` (``h.pow(2).mean(1)`` against a threshold of 2), with a slope of 4
that keeps the first step away from 0 and 1 (``p`` about 0.03-0.05 on digits) whatever the width. That is
still far from 0.5: PyTorch's default ``nn.Linear`` initialisation gives a length-normalised input a mean
squared ReLU activity of about 1/6 against the threshold of 1, so the first epochs go into raising all
activity. ``calibrate=True`` (the default) removes that phase: the first step scales each layer so its mean
squared activity on that batch is the threshold (a data-dependent initialisation in the spirit of LSUV,
Mishkin & Matas 2016), and ``p`` starts at about 0.5. On digits the first epoch then ends at 0.88 test
accuracy instead of 0.31 (backprop: 0.85, means of 3 seeds), and on the wine and breast-cancer tables, never
used to choose a setting, ff and cff stay within 5 points of backprop from the third epoch on, where without
it they sat at the majority class or fell back (``tests/test_forward_forward.py``).

Label placement. ``label_mode="auto"`` overwrites the first ``C`` input features with the label only
where they are blank (MNIST's top row, as in the paper); when they carry signal (the 8x8 digits have ink
in 12 % of them) the label goes in front and the first ``Linear`` is widened by ``C`` input columns.

The building blocks are module-level functions in :mod:`forwardlearn.rules.forward_forward_parts`
(:func:`goodness`, :func:`positive_logits`, :func:`ff_layer_loss`, :func:`collaborative_logits`,
:func:`length_normalize`, :func:`embed_label`, :func:`random_negative_labels`,
:func:`hard_negative_labels`, :func:`mlp_blocks`) and the rule classes
split the network walk into overridable methods (:meth:`ForwardForward.blocks`,
:meth:`ForwardForward.embed`, :meth:`ForwardForward.normalize`), so variants for other architectures
subclass :class:`ForwardForward` and replace only those.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import LossFn, Rule, check_finite, register
from .forward_forward_parts import (
    _accept_widened_state,
    _widen_input,
    collaborative_logits,
    embed_label,
    goodness,
    hard_negative_labels,
    length_normalize,
    mlp_blocks,
    positive_logits,
    random_negative_labels,
    scale_to_mean_square,
)

__all__ = ["CollaborativeForwardForward", "ForwardForward"]

#: ``hook(layer_index, layer_loss) -> layer_loss``: applied to every local loss before its gradient is taken
LocalLossHook = Callable[[int, Tensor], Tensor]


# --- the rules ------------------------------------------------------------------------------------
@register
class ForwardForward(Rule):
    """Supervised Forward-Forward (Hinton 2022) on the library's MLP.

    Every hidden ``Linear -> activation`` pair is one layer with its own logistic loss (eq. 1); the
    final ``Linear`` of the MLP is not used. Positive and negative data go through the net in one
    batched pass per layer; each layer's input is detached and length-normalised.

    Args:
        threshold: ``theta`` per unit: a layer of ``D`` units uses ``theta = threshold * D`` (so with
            the default 1 the layer is "positive" when its mean squared activity exceeds 1, the scale its
            length-normalised input has).
        minus: use ``-G`` as the goodness (positive data then have low activity).
        temperature: ``T`` in ``sigmoid((G - theta) / T)``; ``None`` (default): ``D / 4`` for a layer of
            ``D`` units, so the logit is ``4 * (mean squared activity - threshold)`` and the loss is not
            saturated at initialisation (see the module docstring); ``1`` is the paper's ``sigmoid(G - theta)``.
        negatives: ``"hard"`` (default: a wrong label drawn in proportion to the model's own prediction,
            as in section 3.3: from the read-out's softmax on a neutral-label pass when ``readout=True``,
            else from the summed goodness of every label, which costs one extra forward pass per class) or
            ``"random"`` (a uniformly drawn wrong label).
        label_mode: ``"overwrite"`` the first ``C`` input features, ``"concat"`` the one-hot code in front
            (the first ``Linear`` must then take ``C`` more inputs), or ``"auto"`` (default), chosen from the
            data: concat when the first ``Linear`` already takes ``D + C`` inputs; else, at the first batch
            the rule sees, overwrite when the first ``C`` features are zero in every example of it (MNIST's
            blank top row), otherwise concat after widening the first ``Linear`` by ``C`` input columns in
            place (new columns drawn like ``nn.Linear``'s own from the rule's seed, the old ones kept; the
            optimizer's ``Parameter`` objects stay the same, so it must not have stepped yet). The choice is
            part of the rule's state (``label_placement``); a widened model still runs ``model(x)`` on
            ``D``-feature inputs (the neutral label is put in front) and loads a widened checkpoint after
            ``attach``.
        label_scale: value written for the label's "hot" entry.
        readout: also train a linear softmax read-out (``ff_readout``, kept on the MLP's unused final
            ``Linear`` so ``model(x)`` still works and optimizers see it) on the detached,
            normalised activities of the scoring layers of a neutral-label pass (section 3.3's "quick but
            sub-optimal" classifier); ``rule.loss`` is its loss. With ``negatives="hard"`` the read-out's
            softmax picks the hard negatives, as in the paper, for one extra forward pass.
        predict_by: ``"goodness"`` (run every label, sum the goodness of the scoring layers) or
            ``"readout"`` (one neutral-label pass through the read-out; needs ``readout=True``).
        skip_first: leave the first hidden layer out of the goodness sum at prediction (and out of the
            read-out), as the paper does; ignored for one-hidden-layer nets.
        normalize_input: length-normalise (root-mean-square) the label-carrying input of the first layer
            too (default ``True``), as Hinton's released Matlab code for section 3.3 does (``ffnormrows`` of
            the data) and Loewe's reference (``_layer_norm`` of the input); ``False`` feeds the raw input,
            which on MNIST with that reference's setup ends at 7.4 % test accuracy against 95.5 %.
        peer_normalization: strength ``lambda`` of peer normalisation (Hinton 2022, section 3.3 and his
            Matlab code, ``lambdamean = 0.03``), a regulariser against dead and "hysterical" units:
            a running mean ``m_j`` of every unit's activity on positive data is kept, and each unit's
            pre-activation on positive data is pushed towards the layer's average, with gradient
            ``2 * lambda * (m_j - mean(m)) / N`` per example (not gated by the ReLU, so units that are
            always off revive). The factor 2 keeps the Matlab code's ratio to the goodness gradient, our
            loss being twice its goodness gradient. The term adds zero to the reported loss. ``0``: off.
        peer_momentum: decay of the running mean ``m`` per step, in ``[0, 1)`` (the Matlab code's 0.9).
        calibrate: at the rule's first step, scale every layer's first ``Linear`` (weight and bias) so that its
            mean squared activity on that batch's positive data equals ``threshold`` (a data-dependent
            initialisation in the spirit of LSUV, Mishkin & Matas 2016: exact in one pass for ReLU layers, which
            are positively homogeneous; other activations get up to five passes). Every layer then starts at
            ``p(positive)`` about 0.5 instead of spending its first epochs raising all activity towards the
            threshold (see the module docstring). Done once per rule (``calibrated`` is in its state, so a
            resumed run does not rescale); pass ``False`` to keep the model's weights as given.
        loss, seed: see :class:`~forwardlearn.rules.base.Rule`. ``loss`` is used only by the read-out.

    ``local_loss_hook`` (attribute, default ``None``): ``hook(k, loss_k) -> loss_k`` applied to layer
    ``k``'s local loss before its gradient is taken; the locality tests use it.
    """

    name: ClassVar[str] = "ff"
    backward: ClassVar[str] = "local"
    description: ClassVar[str] = "Forward-Forward: per-layer logistic goodness loss, positive vs wrong-label data"
    paper: ClassVar[str] = "Hinton 2022, The Forward-Forward Algorithm: Some Preliminary Investigations"
    defaults: ClassVar[dict[str, Any]] = {
        "optimizer": "adam",
        "lr": 0.003,
        "epochs": 20,
        "batch_size": 64,
        "hidden": [256, 256],
        "model": "mlp",
    }
    forward_only: ClassVar[bool] = False  # autograd inside each layer on its own local loss, never across layers
    #: the per-layer probability each layer is trained with: "local" (FF) or "collaborative" (CFF)
    objective: ClassVar[str] = "local"

    def __init__(
        self,
        threshold: float = 1.0,
        minus: bool = False,
        temperature: float | None = None,
        negatives: str = "hard",
        label_mode: str = "auto",
        label_scale: float = 1.0,
        readout: bool = False,
        predict_by: str = "goodness",
        skip_first: bool = True,
        normalize_input: bool = True,
        peer_normalization: float = 0.0,
        peer_momentum: float = 0.9,
        calibrate: bool = True,
        loss: LossFn | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__(loss=loss, seed=seed)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 0:
            raise ValueError(f"threshold must be a number >= 0, got {threshold!r}")
        if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                                        or not 0 < temperature < float("inf")):
            raise ValueError(f"temperature must be a positive number or None, got {temperature!r}")
        if negatives not in ("random", "hard"):
            raise ValueError(f"negatives must be 'random' or 'hard', got {negatives!r}")
        if label_mode not in ("auto", "overwrite", "concat"):
            raise ValueError(f"label_mode must be 'auto', 'overwrite' or 'concat', got {label_mode!r}")
        if isinstance(label_scale, bool) or not isinstance(label_scale, (int, float)) or not label_scale > 0:
            raise ValueError(f"label_scale must be a positive number, got {label_scale!r}")
        if predict_by not in ("goodness", "readout"):
            raise ValueError(f"predict_by must be 'goodness' or 'readout', got {predict_by!r}")
        if predict_by == "readout" and not readout:
            raise ValueError("predict_by='readout' needs readout=True")
        for key, val in (("minus", minus), ("readout", readout), ("skip_first", skip_first),
                         ("normalize_input", normalize_input), ("calibrate", calibrate)):
            if not isinstance(val, bool):
                raise ValueError(f"{key} must be True or False, got {val!r}")
        if (isinstance(peer_normalization, bool) or not isinstance(peer_normalization, (int, float))
                or not 0 <= peer_normalization < float("inf")):
            raise ValueError(f"peer_normalization must be a finite number >= 0, got {peer_normalization!r}")
        if isinstance(peer_momentum, bool) or not isinstance(peer_momentum, (int, float)) or not 0 <= peer_momentum < 1:
            raise ValueError(f"peer_momentum must be a number in [0, 1), got {peer_momentum!r}")
        self.threshold = float(threshold)
        self.minus = minus
        self.temperature = None if temperature is None else float(temperature)
        self.negatives = negatives
        self.label_mode = label_mode
        self.label_scale = float(label_scale)
        self.readout = readout
        self.predict_by = predict_by
        self.skip_first = skip_first
        self.normalize_input = normalize_input
        self.peer_normalization = float(peer_normalization)
        self.peer_momentum = float(peer_momentum)
        self.calibrate = calibrate
        #: whether the first-step calibration has run (or is not wanted): part of the state
        self.calibrated = not calibrate
        #: running mean activity of every unit on positive data, per layer (peer normalisation)
        self.peer_means: list[Tensor] = []
        self.local_loss_hook: LocalLossHook | None = None
        #: where ``label_mode="auto"`` put the label: ``None`` until the first batch, then "overwrite" or "concat"
        self.label_placement: str | None = None
        self._walk: tuple[Any, tuple[list[nn.Module], int], nn.Module] | None = None

    # --- the network walk (override these for other architectures) ------------------------------
    def blocks(self, model: nn.Module) -> tuple[list[nn.Module], int]:
        """The Forward-Forward layers of ``model`` in order, and the number of classes.

        The walk is cached for the last model seen (checked by identity and by its list of modules).
        """
        key = (id(model), tuple(id(m) for m in model.children()))
        if self._walk is None or self._walk[0] != key:
            blocks, head = mlp_blocks(model, exclude=("ff_readout",))
            self._walk = (key, (list(blocks), head.out_features), head)
        return self._walk[1]

    def readout_host(self, model: nn.Module) -> nn.Module:
        """The module that carries the read-out as its child ``ff_readout``: one whose ``forward`` ignores
        it (the MLP's final ``Linear``, which Forward-Forward does not use). Subclasses that override
        :meth:`blocks` override this too."""
        self.blocks(model)
        return self._walk[2]

    def readout_module(self, model: nn.Module) -> nn.Linear:
        """The read-out ``Linear``; ``RuntimeError`` when ``attach`` has not added it."""
        head = getattr(self.readout_host(model), "ff_readout", None)
        if head is None:
            raise RuntimeError("readout=True: call rule.attach(model) first")
        return head

    def embed(self, model: nn.Module, x: Tensor, labels: Tensor | None, classes: int) -> Tensor:
        """The first layer's input: ``x`` with ``labels`` (``None``: neutral) written in, length-normalised
        when ``normalize_input``."""
        h = embed_label(x, labels, classes, self._label_mode(model, x, classes), self.label_scale)
        return length_normalize(h) if self.normalize_input else h

    def normalize(self, h: Tensor) -> Tensor:
        """What a layer passes on: its activity, length-normalised and detached (no gradient crosses)."""
        return length_normalize(h.detach())

    def layer_threshold(self, h: Tensor) -> float:
        """``theta`` of a layer with activities ``h``: ``threshold`` times its number of units."""
        return self.threshold * h[0].numel()

    def layer_temperature(self, h: Tensor) -> float:
        """``T`` of a layer with activities ``h``: ``temperature``, or a quarter of its number of units."""
        return h[0].numel() / 4 if self.temperature is None else self.temperature

    def scoring_layers(self, n: int) -> list[int]:
        """Indices of the layers whose goodness is summed at prediction (all but the first, as in 3.3)."""
        return list(range(1 if self.skip_first and n > 1 else 0, n))

    # --- internals ------------------------------------------------------------------------------
    def _first_linear(self, model: nn.Module) -> nn.Linear:
        blocks, _ = self.blocks(model)
        return next(m for m in blocks[0].modules() if isinstance(m, nn.Linear))

    def _label_mode(self, model: nn.Module, x: Tensor, classes: int) -> str:
        if self.label_mode != "auto":
            return self.label_mode
        first = self._first_linear(model)
        features = x[0].numel()
        if first.in_features == features + classes:
            return "concat"
        if first.in_features != features:
            return "overwrite"  # the first Linear's own shape error names the mismatch
        if self.label_placement is None:
            blank = features >= classes and not bool(x.flatten(1)[:, :classes].any())
            self.label_placement = "overwrite" if blank else "concat"
        if self.label_placement == "concat":
            _widen_input(first, classes, self.label_scale, self.seed)
        return self.label_placement

    def activities(self, model: nn.Module, inputs: Tensor, labels: Tensor | None = None) -> list[Tensor]:
        """Every layer's activity (before normalisation) for ``inputs`` labelled ``labels`` (``None``: neutral)."""
        blocks, classes = self.blocks(model)
        with torch.no_grad():
            h = self.embed(model, inputs, labels, classes)
            out = []
            for i, block in enumerate(blocks):
                h = block(self.normalize(h) if i else h)
                out.append(h)
        return out

    def _readout_features(self, acts: Sequence[Tensor]) -> Tensor:
        idx = self.scoring_layers(len(acts))
        return torch.cat([length_normalize(acts[i].detach()).flatten(1) for i in idx], 1)

    def _goodness_scores(self, model: nn.Module, inputs: Tensor) -> Tensor:
        """``(N, C)``: summed goodness of the scoring layers with each label written in (one batched pass)."""
        blocks, classes = self.blocks(model)
        n = inputs.shape[0]
        labels = torch.arange(classes, device=inputs.device).repeat_interleave(n)
        rep = inputs.repeat(classes, *([1] * (inputs.dim() - 1)))
        keep = set(self.scoring_layers(len(blocks)))
        score = torch.zeros(classes * n, device=inputs.device)
        with torch.no_grad():
            h = self.embed(model, rep, labels, classes)
            for i, block in enumerate(blocks):
                h = block(self.normalize(h) if i else h)
                if i in keep:
                    score = score + goodness(h, self.minus).float()
        return score.view(classes, n).t()

    def attach(self, model: nn.Module) -> nn.Module:
        blocks, classes = self.blocks(model)  # validates the architecture
        if self.label_mode == "auto":
            _accept_widened_state(self._first_linear(model), classes, self.label_scale)
        host = self.readout_host(model)
        if self.readout and not hasattr(host, "ff_readout"):
            p = next(model.parameters())
            width = self._readout_width(model, blocks)
            host.add_module("ff_readout", nn.Linear(width, classes).to(device=p.device, dtype=p.dtype))
        return model

    def _readout_width(self, model: nn.Module, blocks: Sequence[nn.Module]) -> int:
        widths = []
        for block in blocks:
            lin = [m for m in block.modules() if isinstance(m, nn.Linear)]
            if not lin:
                raise ValueError("readout needs the width of every layer; override _readout_width")
            widths.append(lin[0].out_features)
        return sum(widths[i] for i in self.scoring_layers(len(widths)))

    def negative_labels(self, model: nn.Module, inputs: Tensor, targets: Tensor,
                        scores: Tensor | None = None) -> Tensor:
        """Wrong labels for the negative data (never the true one), by ``self.negatives``."""
        _, classes = self.blocks(model)
        gen = self.generator(targets.device)
        if self.negatives == "random":
            return random_negative_labels(targets, classes, gen)
        if scores is None:
            scores = self._goodness_scores(model, inputs)
        return hard_negative_labels(scores, targets, gen)

    def _logits(self, hs: Sequence[Tensor]) -> list[Tensor]:
        """Each layer's ``p(positive)`` logit for every row of the stacked positive + negative batch."""
        zs = [positive_logits(h, self.layer_threshold(h), self.minus, self.layer_temperature(h)) for h in hs]
        return collaborative_logits(zs) if self.objective == "collaborative" else zs

    def _peer_term(self, k: int, pre: Tensor, post: Tensor, n: int) -> Tensor:
        """Peer normalisation of layer ``k`` (see the class docstring): updates the running means from the
        positive rows ``post[:n]`` and returns a term of value zero whose gradient w.r.t. the positive
        pre-activations ``pre[:n]`` is ``2 * lambda * (m - mean(m)) / n``."""
        mean_now = post[:n].detach().float().mean(0)
        while len(self.peer_means) <= k:
            self.peer_means.append(torch.full_like(mean_now, 0.5))  # the Matlab code's starting value
        m = self.peer_means[k].to(mean_now.device)
        if m.shape != mean_now.shape:
            raise ValueError(f"peer normalisation: layer {k} has shape {tuple(mean_now.shape)}, "
                             f"its running mean {tuple(m.shape)} (a different model?)")
        m = self.peer_momentum * m + (1 - self.peer_momentum) * mean_now
        self.peer_means[k] = m
        centred = (m - m.mean()).to(pre.dtype)
        a = pre[:n]
        return 2 * self.peer_normalization * ((a - a.detach()) * centred).flatten(1).sum(1).mean()

    @staticmethod
    def _pre_and_post(block: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(pre-activation, activity)`` of a block ``Sequential(Linear, activation, ...)``; for any other
        block both are its output."""
        if isinstance(block, nn.Sequential) and len(block) > 1:
            pre = block[0](x)
            return pre, block[1:](pre)
        out = block(x)
        return out, out

    @torch.no_grad()
    def calibrate_layers(self, model: nn.Module, inputs: Tensor, targets: Tensor) -> list[float]:
        """Scale each layer's first ``Linear`` so its mean squared activity on ``inputs`` with their true labels
        is ``threshold`` (see ``calibrate``); return the factors applied. A layer's input is length-normalised,
        so scaling one layer leaves the next one's input unchanged and each layer is set on its own."""
        blocks, classes = self.blocks(model)
        h = self.embed(model, inputs, targets, classes)
        factors = []
        for i, block in enumerate(blocks):
            x = self.normalize(h) if i else h
            factors.append(scale_to_mean_square(block, x, self.threshold))
            h = block(x)
        self.calibrated = True
        return factors

    # --- the contract ---------------------------------------------------------------------------
    def grads(self, model: nn.Module, inputs: Tensor, targets: Tensor) -> float:
        """Accumulate every layer's local-loss gradient; return the summed local losses (plus the read-out's)."""
        blocks, classes = self.blocks(model)
        if not self.calibrated:
            self.calibrate_layers(model, inputs, targets)
        n = inputs.shape[0]
        total: Tensor = torch.zeros((), device=inputs.device)
        scores = None
        if self.readout:
            acts = self.activities(model, inputs, None)  # neutral label, no gradient
            logits = self.readout_module(model)(self._readout_features(acts))
            total = total + self.loss(logits, targets)
            scores = logits.detach()
        neg = self.negative_labels(model, inputs, targets, scores)
        # positive and negative data in one batch: rows [:n] carry the true label, rows [n:] a wrong one
        h = self.embed(model, torch.cat([inputs, inputs]), torch.cat([targets, neg]), classes)
        hs, pres = [], []
        peer = self.peer_normalization > 0
        for i, block in enumerate(blocks):
            x_i = self.normalize(h) if i else h.detach()
            if peer:
                pre, h = self._pre_and_post(block, x_i)
                pres.append(pre)
            else:
                h = block(x_i)
            hs.append(h)
        # ff_layer_loss(z[:n], z[n:]) for all rows at once: softplus(-z) on positives, softplus(z) on negatives
        sign = torch.ones(2, n, device=inputs.device)
        sign[0] = -1.0
        for k, z in enumerate(self._logits(hs)):
            lk = F.softplus(z.view(2, n) * sign).mean(1).sum()
            if peer:
                lk = lk + self._peer_term(k, pres[k], hs[k], n)
            if self.local_loss_hook is not None:
                lk = self.local_loss_hook(k, lk)
            total = total + lk
        value = check_finite(total.detach(), "Forward-Forward loss")
        total.backward()  # every layer's input is detached: each loss reaches only its own layer
        self.steps += 1
        return value

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["peer_means"] = [m.detach().cpu().clone() for m in self.peer_means]
        state["label_placement"] = self.label_placement
        state["calibrated"] = self.calibrated
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.peer_means = [m.clone() for m in state.get("peer_means", [])]
        self.label_placement = state.get("label_placement")
        self.calibrated = bool(state.get("calibrated", True))  # states from before calibration: never rescale

    def untrained(self, model: nn.Module) -> set[str]:
        """The MLP's final ``Linear``: Forward-Forward predicts from the layers' goodness, not from it (the
        optional read-out is a separate module, ``ff_readout``, which is trained)."""
        self.blocks(model)
        own = {id(p) for p in self._walk[2].parameters(recurse=False)}
        return {n for n, p in model.named_parameters() if id(p) in own}

    def predict(self, model: nn.Module, inputs: Tensor) -> Tensor:
        if self.predict_by == "readout":
            with torch.no_grad():
                return self.readout_module(model)(self._readout_features(self.activities(model, inputs, None)))
        return self._goodness_scores(model, inputs)


@register
class CollaborativeForwardForward(ForwardForward):
    """Collaborative Forward-Forward (Lorberbom et al. 2024): every layer's ``p(positive)`` uses the
    goodness of all layers, ``sigmoid(sum_l (G_l - theta_l) / T)``, the other layers' terms held
    constant (stop-gradient), so each layer still receives only its own gradient. Prediction sums the
    goodness of all layers (``skip_first=False`` by default). Options as :class:`ForwardForward`.
    """

    name: ClassVar[str] = "cff"
    backward: ClassVar[str] = "local"
    description: ClassVar[str] = "collaborative Forward-Forward: each layer's loss uses the whole net's goodness"
    paper: ClassVar[str] = (
        "Lorberbom, Gat, Adi, Schwing & Hazan 2024 (AAAI), Layer Collaboration in the Forward-Forward Algorithm"
    )
    defaults: ClassVar[dict[str, Any]] = {
        "optimizer": "adam",
        "lr": 0.003,
        "epochs": 20,
        "batch_size": 64,
        "hidden": [256, 256],
        "model": "mlp",
    }
    objective: ClassVar[str] = "collaborative"

    def __init__(self, *, skip_first: bool = False, **options: Any) -> None:
        # only the default of skip_first differs; every other option (and its check) is ForwardForward's
        super().__init__(skip_first=skip_first, **options)
