"""Fine-tune a pretrained Hugging Face encoder on a text corpus with a learning rule, on the shared training loop.

:func:`prepare` loads and checks everything a run needs (model directory, tokenizer, corpus, token tensors)
before anything is written; :func:`finetune` then trains with :class:`forwardlearn.training.Trainer`
(evaluation every ``eval_every`` steps, atomic checkpoints, exact resume) and writes ``summary.json``,
``summary.md`` and ``accuracy.png`` (test accuracy against steps and against training time).

The rules that take token batches (:data:`RULES`) and their settings (:data:`DEFAULTS`): ``zo_spsa``
steps with its fused in-place SGD update (MeZO, Malladi et al. 2023, Algorithm 1: no ``.grad`` buffers, one
direction, ``eps = 1e-3``); ``forward_gradient`` (Baydin et al. 2022, one tangent) with plain SGD;
``backprop`` with Adam. The learning rates depend on the parameter choice (``full``, ``lora``, ``head``): for the
two estimators the SGD step's noise grows with the number of trained weights ``d`` (MeZO, Sec. 2.1/Lemma 2), so
``full`` takes 10x less than ``lora``; MeZO's rates for RoBERTa-large (350 M weights) are 1e-6/1e-7, and
MiniLM has 15x fewer weights; backprop + Adam takes the usual BERT fine-tuning rate 2e-5 (5e-4 for LoRA).
These are starting points, not tuned on this corpus; ``benchmarks/finetune_minilm.py --part sweep`` chooses the
full rows' rates on validation messages held out of the training split (:func:`prepare`'s ``val_size``).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .models import hf
from .rules import get_rule, trainable_parameters

RULES = ("zo_spsa", "forward_gradient", "backprop")
#: per rule: the step (``fused``: the rule's in-place SGD step; ``grad``: ``.grad`` + optimizer), the
#: optimizer, the rule's options and the learning rate for each parameter choice
DEFAULTS: dict[str, dict[str, Any]] = {
    "zo_spsa": {"step": "fused", "optimizer": "sgd", "options": {"directions": 1, "eps": 1e-3},
                "lr": {"full": 1e-5, "lora": 1e-4, "head": 1e-3}},
    "forward_gradient": {"step": "grad", "optimizer": "sgd", "options": {"directions": 1},
                         "lr": {"full": 1e-5, "lora": 1e-4, "head": 1e-3}},
    "backprop": {"step": "grad", "optimizer": "adam", "options": {},
                 "lr": {"full": 2e-5, "lora": 5e-4, "head": 1e-3}},
}
#: settings that a resumed run must share with its checkpoint
RESUME_KEYS = ("model", "data", "rule", "params", "batch_size", "max_length", "lr", "step", "optimizer",
               "options", "seed", "test_size", "val_size", "eval_every", "attention", "head", "probe_train",
               "world_size")


@dataclass
class Prepared:
    """Everything a fine-tuning run needs, checked: the model, the rule and the token tensors."""

    config: dict[str, Any]
    model: torch.nn.Module
    train: tuple[dict[str, Tensor], Tensor]
    test: tuple[dict[str, Tensor], Tensor]
    test_groups: list[str]
    tokenize_seconds: float = 0.0


def check_rule(rule: str) -> None:
    """``ValueError`` unless ``rule`` can train on token batches."""
    if rule not in RULES:
        raise ValueError(f"rule {rule!r} cannot take mapping inputs (token batches); fine-tuning takes "
                         f"{', '.join(RULES)}")


def settings(rule: str, params: str = "full", lr: float | None = None, step: str | None = None,
             optimizer: str | None = None, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run's training settings: the given values, else :data:`DEFAULTS` for ``rule`` and ``params``."""
    check_rule(rule)
    if params not in hf.PARAMS:
        raise ValueError(f"unknown --params {params!r}; valid: {', '.join(hf.PARAMS)}")
    d = DEFAULTS[rule]
    step = step or d["step"]
    if step not in ("fused", "grad"):
        raise ValueError(f"unknown step {step!r}; valid: fused, grad")
    if step == "fused" and rule != "zo_spsa":
        raise ValueError(f"rule {rule!r} has no fused step; use --step grad")
    return {"rule": rule, "params": params, "lr": float(lr if lr is not None else d["lr"][params]), "step": step,
            "optimizer": optimizer or d["optimizer"], "options": {**d["options"], **(options or {})}}


def optimizer(name: str, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """``sgd`` (plain, no momentum: the rules' estimates are used as they are), ``adam`` or ``adamw``."""
    kinds = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    if name not in kinds:
        raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(kinds)}")
    return kinds[name](params, lr=lr)


def _test_subset(groups: list[str], size: int | None, seed: int) -> list[int]:
    """A seeded random ``size`` of a split, stratified by group (all of it for ``None``)."""
    n = len(groups)
    if size is None or size >= n:
        return list(range(n))
    from .data.spam_assassin import split_indices

    keep = split_indices(groups, "test", size / n, seed)
    return keep


def _hold_out(groups: list[str], size: int, seed: int) -> tuple[list[int], list[int]]:
    """``(train, validation)`` indices of the training split: a seeded random ``size`` of it, stratified by
    group, is validation (never trained on, never the test set), the rest train."""
    if not 0 < size < len(groups):
        raise ValueError(f"val_size must be between 1 and {len(groups) - 1} (the training messages), got {size}")
    val = set(_test_subset(groups, size, seed + 1))  # seed + 1: not the same draw as the test subset
    return [i for i in range(len(groups)) if i not in val], sorted(val)


def prepare(model: str = hf.MINILM, data: str = "spam-assassin", *, rule: str = "zo_spsa", params: str = "full",
            batch_size: int = 16, max_length: int = 128, lr: float | None = None, step: str | None = None,
            optimizer: str | None = None, options: dict[str, Any] | None = None, seed: int = 0,
            test_size: int | None = None, attention: str | None = None, data_dir: str | Path | None = None,
            head: str | dict[str, Tensor] = "random", probe_train: int = 1024, val_size: int | None = None) -> Prepared:
    """Load and check the model, the tokenizer and the corpus, tokenise once; raise ``ValueError`` on bad input.

    ``head``: ``random`` (a fresh linear head from ``seed``), ``probe`` (the linear probe on the frozen features
    of a seeded random ``probe_train`` training messages, :func:`~forwardlearn.models.hf.fit_probe_head`: training
    then starts at the zero-training floor), or a head ``state_dict`` (a probe fitted before).

    ``val_size``: hold out a seeded, stratified ``val_size`` of the *training* messages as a validation set;
    the run then trains on the rest and evaluates on the validation set instead of the test set (``test``
    and ``test_groups`` hold the validation messages; ``config["eval_split"]`` says which): for choosing
    settings without looking at the test set."""
    from . import data as fldata
    from .data.spam_assassin import NAME, load_split

    cfg = settings(rule, params, lr, step, optimizer, options)
    if not isinstance(head, dict) and head not in ("random", "probe"):
        raise ValueError(f"unknown head {head!r}; valid: random, probe")
    if data != NAME:
        raise ValueError(f"fine-tuning takes the text data set {NAME!r}, got {data!r}")
    if attention is None:  # forward-mode AD has no rule for the fused CPU attention kernel
        attention = "eager" if rule == "forward_gradient" else "sdpa"
    if rule == "forward_gradient" and attention != "eager":
        raise ValueError("forward_gradient needs forward-mode AD through attention, which the fused sdpa kernel "
                         "does not have on CPU; use --attention eager")
    path = hf.model_dir(model)
    tokenizer = hf.load_tokenizer(path)
    hf.check_max_length(tokenizer, max_length)
    root = fldata.data_dir(data_dir)
    train_split, test_split = load_split("train", root), load_split("test", root)
    if val_size:
        kept, held = _hold_out(train_split.groups, val_size, seed)
        train_split, test_split = train_split.subset(kept), train_split.subset(held)
    else:
        test_split = test_split.subset(_test_subset(test_split.groups, test_size, seed))
    net = hf.load_classifier(path, classes=2, params=params, attention=attention, seed=seed)
    hf.check_tokenizer(tokenizer, net, path)
    t0 = time.perf_counter()
    xtr = hf.tokenize(tokenizer, train_split.texts, max_length)
    xte = hf.tokenize(tokenizer, test_split.texts, max_length)
    tokenize_seconds = time.perf_counter() - t0
    if head == "probe":
        n = min(probe_train, len(train_split))
        keep = torch.randperm(len(train_split), generator=torch.Generator().manual_seed(seed))[:n]
        hf.fit_probe_head(net, ({k: v[keep] for k, v in xtr.items()}, train_split.labels[keep]))
    elif isinstance(head, dict):
        net.head.load_state_dict(head)
    cfg.update({"model": str(model), "model_dir": str(path), "data": data, "batch_size": batch_size,
                "max_length": max_length, "seed": seed, "test_size": None if val_size else len(test_split),
                "val_size": len(test_split) if val_size else None,
                "eval_split": "validation" if val_size else "test", "attention": attention,
                "head": "probe" if isinstance(head, dict) else head,
                "probe_train": min(probe_train, len(train_split)) if head != "random" else 0,
                "trainable": sum(p.numel() for p in trainable_parameters(net)),
                "parameters": sum(p.numel() for p in net.parameters())})
    return Prepared(cfg, net, (xtr, train_split.labels), (xte, test_split.labels), test_split.groups,
                    tokenize_seconds)


def _slice_scores(model: torch.nn.Module, inputs: dict[str, Tensor], y: Tensor, batch: int = 64) -> tuple[float,
                                                                                                         float]:
    """``(accuracy, mean cross-entropy)`` of ``model`` on a slice, in eval mode."""
    was = model.training
    model.eval()
    correct, loss = 0, 0.0
    with torch.no_grad():
        for i in range(0, len(y), batch):
            out = model(**{k: v[i:i + batch] for k, v in inputs.items()})
            correct += int((out.argmax(1) == y[i:i + batch]).sum())
            loss += float(torch.nn.functional.cross_entropy(out, y[i:i + batch], reduction="sum"))
    model.train(was)
    return correct / max(len(y), 1), loss / max(len(y), 1)


def _slice_accuracy(model: torch.nn.Module, inputs: dict[str, Tensor], y: Tensor, batch: int = 64) -> float:
    return _slice_scores(model, inputs, y, batch)[0]


def finetune(prep: Prepared, *, steps: int, eval_every: int | None = None, out: str | Path | None = None,
             resume: bool = False, progress: bool = True, threads: int | None = None,
             distributed: bool = False) -> dict[str, Any]:
    """Train ``prep.model`` with the shared :class:`~forwardlearn.training.Trainer`; return the summary (also
    written to ``out``: ``summary.json``, ``summary.md``, ``accuracy.png``).

    ``distributed``: this process is one rank of a ``torchrun`` launch; the step is the seed-and-scalar
    exchange (:class:`~forwardlearn.distributed.trainer.SeedScalarStep`: each rank estimates on its shard,
    the ranks ``all_gather`` (seed, scalar) pairs only and every rank applies all of them with plain SGD);
    ``batch_size`` is per rank. Rank 0 evaluates and writes."""
    from .training import Callback, Trainer, make_strategy, read_config

    cfg = dict(prep.config)
    eval_every = eval_every or steps
    cfg.update({"steps": steps, "eval_every": eval_every})
    created = False
    if distributed:
        import torch.distributed as dist

        from .distributed.trainer import SeedScalarStep, TorchExchange, init_process_group

        if cfg["rule"] not in ("zo_spsa", "forward_gradient"):
            raise ValueError(f"rule {cfg['rule']!r} has no seed-and-scalar form; --distributed takes zo_spsa or "
                             "forward_gradient")
        created = not dist.is_initialized()
        exchange = TorchExchange(init_process_group("cpu"))
        cfg.update({"step": "seed_scalar", "optimizer": "sgd", "world_size": exchange.world_size})
    out_dir = Path(out) if out is not None else None
    if out_dir is not None:
        ckpt = out_dir / "checkpoint.pt"
        if ckpt.exists() and not resume:
            raise ValueError(f"{out_dir} already holds a checkpoint; pass --resume to continue it or choose "
                             f"another --out")
        if resume and ckpt.exists():
            old = read_config(ckpt)
            changed = [k for k in RESUME_KEYS if k in old and old[k] != cfg.get(k)]
            if changed:
                raise ValueError(f"resuming {out_dir} with settings that differ from its checkpoint: "
                                 f"{', '.join(changed)}")
    if threads:
        torch.set_num_threads(threads)
    rule = get_rule(cfg["rule"], seed=cfg["seed"], **cfg["options"])
    model = rule.attach(prep.model)
    if distributed:
        strategy = SeedScalarStep(rule, seed=cfg["seed"], exchange=exchange)
    else:
        strategy = make_strategy(cfg["step"], lr=cfg["lr"])
    opt = None
    if strategy.needs_optimizer:
        opt = optimizer(cfg["optimizer"], trainable_parameters(model), cfg["lr"])
    hard = [i for i, g in enumerate(prep.test_groups) if g == "hard-ham-1"]
    hard_x = {k: v[hard] for k, v in prep.test[0].items()}
    hard_y = prep.test[1][hard]

    class Slices(Callback):  # the evaluation set's loss (the finer signal for choosing settings), hard ham
        def on_epoch_end(self, trainer: Trainer, record: dict[str, float]) -> None:
            if trainer.strategy.evaluates(trainer):
                record["test_loss"] = _slice_scores(trainer.model, *prep.test)[1]
                if hard:
                    record["hard_ham_acc"] = _slice_accuracy(trainer.model, hard_x, hard_y)

    writer = not distributed or exchange.rank == 0
    start = dict(zip(("test_acc", "test_loss"), _slice_scores(model, *prep.test))) if writer else {}
    if hard and writer:
        start["hard_ham_acc"] = _slice_accuracy(model, hard_x, hard_y)
    try:
        trainer = Trainer(model, rule, opt, batch_size=cfg["batch_size"], steps=steps, eval_every=eval_every,
                          strategy=strategy, seed=cfg["seed"], out_dir=out_dir, progress=progress and writer,
                          config=cfg, eval_train=False, callbacks=[Slices()], device="cpu")
        history = trainer.fit(prep.train, prep.test, resume=resume)
        if writer and history.epochs and "test_loss" not in history.epochs[-1]:
            # resumed at its last checkpoint, which is written before the callbacks add their columns: the model is
            # still in that record's state, so they are measured now
            Slices().on_epoch_end(trainer, history.epochs[-1])
    finally:
        if created:
            dist.destroy_process_group()
    summary = {"config": cfg, "start": start, "records": history.epochs, "final": history.final,
               "train_seconds": sum(history.column("seconds")), "writer": writer}
    if out_dir is not None and writer:
        write_reports(summary, out_dir)
    return summary


def write_reports(summary: dict[str, Any], out_dir: Path) -> None:
    """``summary.json``, ``summary.md`` and ``accuracy.png`` of a run (each written atomically)."""
    from .training import atomic_write_text

    atomic_write_text(json.dumps(summary, indent=2) + "\n", out_dir / "summary.json")
    cfg, records = summary["config"], summary["records"]
    lines = [f"# Fine-tuning {cfg['model']} on {cfg['data']} with {cfg['rule']} ({cfg['params']})", "",
             f"{cfg['trainable']:,} of {cfg['parameters']:,} parameters trained; batch {cfg['batch_size']}, "
             f"max length {cfg['max_length']}, lr {cfg['lr']:g}, {cfg['step']} step"
             f"{'' if cfg['step'] == 'fused' else ' with ' + cfg['optimizer']}"
             f"{', ' + str(cfg['world_size']) + ' ranks' if 'world_size' in cfg else ''}; test set {cfg['test_size']} "
             "messages.", "", "| step | train minutes | loss | test acc | hard-ham acc |", "|---:|---:|---:|---:|---:|"]
    start = summary.get("start", {})
    lines.append(f"| 0 | 0.0 | - | {100 * start.get('test_acc', math.nan):.2f} % | "
                 f"{100 * start.get('hard_ham_acc', math.nan):.1f} % |")
    elapsed = 0.0
    for r in records:
        elapsed += r.get("seconds", 0.0)
        lines.append(f"| {r.get('step', '')} | {elapsed / 60:.1f} | {r['loss']:.4f} | "
                     f"{100 * r.get('test_acc', math.nan):.2f} % | {100 * r.get('hard_ham_acc', math.nan):.1f} % |")
    atomic_write_text("\n".join(lines) + "\n", out_dir / "summary.md")
    plot_accuracy({f"{cfg['rule']} ({cfg['params']})": [{"step": 0, **start}, *records]}, out_dir / "accuracy.png")


def plot_accuracy(runs: dict[str, list[dict[str, Any]]], path: Path, floor: float | None = None) -> None:
    """Test accuracy against steps (left) and against cumulative training time (right), one line per run."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for label, records in runs.items():
        steps = [r.get("step", 0) for r in records]
        acc = [100 * r.get("test_acc", math.nan) for r in records]
        minutes, t = [], 0.0
        for r in records:
            t += r.get("seconds", 0.0)
            minutes.append(t / 60)
        a.plot(steps, acc, marker="o", label=label)
        b.plot(minutes, acc, marker="o", label=label)
    for ax, xl in ((a, "steps"), (b, "training minutes")):
        if floor is not None:
            ax.axhline(100 * floor, color="grey", linestyle="--", label="linear probe")
        ax.set_xlabel(xl)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    a.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
