"""The fine-tuning benchmark: memory, time and accuracy of fine-tuning a pretrained encoder with each rule.

Rows (:data:`ROWS`): inference, ``zo_spsa`` fused full fine-tuning, ``zo_spsa`` + LoRA, ``forward_gradient``
(full), backprop + Adam full fine-tuning, backprop + Adam + LoRA.

- Memory (:func:`step_cost`, run in a fresh child process per row by :func:`~.memory.peak_memory`): the peak
  resident set above the child's baseline, taken after ``torch``, ``transformers`` and ``peft`` are imported
  and before the model is loaded, so the weights, optimizer state, activations and every temporary count
  (safetensors maps the weights from the file lazily; every weight is read once after loading, so that
  embedding rows no batch uses count too, in every row alike).
  Two steps run (the second is the steady state: Adam's state exists from the first).
- Time: in the same child, the median over ``repeats`` of one training step and of one forward pass
  (``torch.no_grad``, eval mode) on the same batch; the row's cost is their ratio, so both come from one
  process at one moment of the machine's load.
- Accuracy (:func:`accuracy_rows`): each row fine-tunes from the same pretrained start (same head seed) with
  :func:`forwardlearn.finetune.finetune` on the shared training loop and is evaluated every ``eval_every``
  steps; the floor is a linear probe (logistic regression) on the frozen pretrained features.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

#: name -> (rule, params, step); ``None`` rule: inference only
ROWS: dict[str, tuple[str | None, str, str]] = {
    "inference": (None, "full", ""),
    "zo_spsa fused, full": ("zo_spsa", "full", "fused"),
    "zo_spsa fused, LoRA": ("zo_spsa", "lora", "fused"),
    "forward_gradient, full": ("forward_gradient", "full", "grad"),
    "backprop + Adam, full": ("backprop", "full", "grad"),
    "backprop + Adam, LoRA": ("backprop", "lora", "grad"),
}


def token_batch(vocab: int, batch_size: int, max_length: int, seed: int = 0) -> tuple[dict[str, torch.Tensor],
                                                                                       torch.Tensor]:
    """A batch of random token ids (no padding) and labels: memory and time do not depend on the words."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab, (batch_size, max_length), generator=g)
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    return x, torch.randint(0, 2, (batch_size,), generator=g)


def step_cost(model_dir: str, row: str, batch_size: int, max_length: int, repeats: int = 3,
              seed: int = 0) -> dict[str, Any]:
    """Inside a fresh child: peak bytes above the baseline (see the module docstring) and the median seconds
    of a step and of a forward. Run through :func:`~.memory.peak_memory` with ``warmup=False``."""
    import peft  # noqa: F401 - imported before the baseline: code is not data
    import transformers  # noqa: F401

    from ..finetune import optimizer, settings
    from ..models import hf
    from ..rules import get_rule, trainable_parameters
    from .memory import _reset_peak, _rss_kib

    rule_name, params, _ = ROWS[row]
    base = _rss_kib("VmRSS")
    if not _reset_peak():
        raise RuntimeError("cannot reset the peak-memory counter (/proc/self/clear_refs is not writable)")
    attention = "eager" if rule_name == "forward_gradient" else "sdpa"
    model = hf.load_classifier(hf.model_dir(model_dir), params=params, attention=attention, seed=seed)
    with torch.no_grad():  # safetensors maps the weights from the file lazily: read each once, so all count
        for p in model.parameters():
            float(p.sum())
    vocab = model.encoder.get_input_embeddings().weight.shape[0]
    x, y = token_batch(vocab, batch_size, max_length, seed)

    def forward() -> None:
        model.eval()
        with torch.no_grad():
            model(**x)
        model.train()

    if rule_name is None:
        step = forward
    else:
        cfg = settings(rule_name, params)
        rule = get_rule(rule_name, seed=seed, **cfg["options"])
        model = rule.attach(model)
        if cfg["step"] == "fused":
            def step() -> None:
                rule.fused_step(model, x, y, lr=cfg["lr"])
        else:
            opt = optimizer(cfg["optimizer"], trainable_parameters(model), cfg["lr"])

            def step() -> None:
                opt.zero_grad(set_to_none=True)
                rule.grads(model, x, y)
                opt.step()

    model.train()
    step()
    step()
    peak = (_rss_kib("VmHWM") - base) * 1024
    step_s, fwd_s = [], []
    for _ in range(repeats):  # interleaved, so a change of the machine's load hits both alike
        t = time.perf_counter()
        step()
        step_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        forward()
        fwd_s.append(time.perf_counter() - t)
    return {"row": row, "peak_bytes": peak, "step_seconds": statistics.median(step_s),
            "forward_seconds": statistics.median(fwd_s), "trainable": sum(
                p.numel() for p in model.parameters() if p.requires_grad) if rule_name else 0}


def cost_rows(model_dir: str, batch_size: int = 16, max_length: int = 128, threads: int = 2,
              repeats: int = 3, rows: list[str] | None = None) -> list[dict[str, Any]]:
    """:func:`step_cost` of every row, each in its own child process."""
    from .memory import peak_memory

    out = []
    for row in rows or list(ROWS):
        _, result = peak_memory(step_cost, model_dir, row, batch_size, max_length, repeats, threads=threads,
                                warmup=False)
        out.append(result)
    return out


def cost_markdown(results: dict[str, Any]) -> str:
    """The memory and time table of ``finetune_minilm.json`` with its command; ``""`` when it has none."""
    cost = results.get("cost")
    if not cost:
        return ""
    s = cost["settings"]
    inf = next(r for r in cost["rows"] if r["row"] == "inference")
    lines = [f"Memory and time: batch {s['batch_size']}, max length {s['max_length']}, {s['threads']} threads; "
             f"`{cost['command']}`", "",
             "| row | trained parameters | peak MB above baseline | x inference | step / forward |",
             "|---|---:|---:|---:|---:|"]
    for r in cost["rows"]:
        lines.append(f"| {r['row']} | {r['trainable']:,} | {r['peak_bytes'] / 2**20:.0f} | "
                     f"{r['peak_bytes'] / inf['peak_bytes']:.2f} | {r['step_seconds'] / r['forward_seconds']:.2f} |")
    return "\n".join(lines)


def accuracy_markdown(results: dict[str, Any]) -> str:
    """The accuracy table of ``finetune_minilm.json`` (the probe first) with its commands; ``""`` when none."""
    acc = results.get("accuracy")
    p = results.get("probe")
    if not acc and not p:
        return ""
    commands = sorted({v.get("command", "") for v in (acc or {}).values()})
    lines = ["Accuracy, each row from the same linear-probe start: " + "; ".join(f"`{c}`" for c in commands),
             "", "| row | steps | training minutes | CPU minutes | lr | test acc | hard-ham acc |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    if p:
        lines.append(f"| linear probe on frozen features ({p['train_messages']} messages) | 0 | - | - | - | "
                     f"{100 * p['test_acc']:.2f} % | {100 * p['hard_ham_acc']:.1f} % |")
    order = {row: i for i, row in enumerate(ROWS)}
    for row, v in sorted((acc or {}).items(), key=lambda kv: order.get(kv[0], len(order))):
        last, cfg = v["records"][-1], v["config"]
        directions = cfg.get("options", {}).get("directions", 1)
        lr = (f"{cfg['lr']:g}{' *' if cfg.get('chosen_on') else ''}"
              f"{f' ({directions} directions)' if directions > 1 else ''}")
        cpu = sum(r.get("cpu_seconds", 0.0) for r in v["records"]) / 60
        lines.append(f"| {row} | {last.get('step')} | {train_minutes(v['records']):.1f} | {cpu:.1f} | {lr} | "
                     f"{100 * last.get('test_acc', float('nan')):.2f} % | "
                     f"{100 * last.get('hard_ham_acc', float('nan')):.1f} % |")
    if acc:
        configs = [v["config"] for v in acc.values()]
        first = configs[0]
        threads = sorted({v.get("threads") for v in acc.values()} - {None})
        chosen = sorted({c["chosen_on"] for c in configs if c.get("chosen_on")})
        lines += ["", f"Test subset: {first['test_size']} messages (seeded, stratified); max length "
                  f"{first['max_length']} tokens; batch {first['batch_size']}"
                  f"{'; ' + '/'.join(map(str, threads)) + ' thread(s)' if threads else ''}. Curves: "
                  "`finetune_minilm.png`." + (f" lr marked *: the sweep's choice on {chosen[0]}." if chosen else "")]
    return "\n".join(lines)


def train_minutes(records: list[dict[str, Any]]) -> float:
    """Training minutes of a run's records (evaluation not counted)."""
    return sum(r.get("seconds", 0.0) for r in records) / 60


def best_setting(results: dict[str, Any], row: str) -> dict[str, Any] | None:
    """The stored sweep's setting of ``row`` with the lowest final validation loss (``lr``, ``directions``,
    ``val_size``), or ``None`` when the sweep has no run of ``row``."""
    runs = [v for v in results.get("sweep", {}).values() if v["row"] == row]
    if not runs:
        return None
    best = min(runs, key=lambda v: (v["records"][-1].get("test_loss", float("inf")), -v["records"][-1]["test_acc"]))
    return {"lr": best["lr"], "directions": best["directions"], "val_size": best["config"]["val_size"]}


def sweep_markdown(results: dict[str, Any]) -> str:
    """The learning-rate sweep of ``finetune_minilm.json`` (validation messages from the training split) with
    its commands; ``""`` when there is none."""
    sweep = results.get("sweep")
    if not sweep:
        return ""
    commands = sorted({v["command"] for v in sweep.values()})
    cfg = next(iter(sweep.values()))["config"]
    lines = [f"Sweep, on {cfg['val_size']} validation messages held out of the training split (never the test "
             f"set), max length {cfg['max_length']}, batch {cfg['batch_size']}, from the linear-probe start: "
             + "; ".join(f"`{c}`" for c in commands), "",
             "| row | lr | directions | steps | training minutes | val loss (start) | val loss | val acc (start) "
             "| val acc |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in dict.fromkeys(v["row"] for v in sweep.values()):
        best = best_setting(results, row)
        for v in sorted((v for v in sweep.values() if v["row"] == row), key=lambda v: (v["directions"], v["lr"])):
            first, last = v["records"][0], v["records"][-1]
            chosen = " (chosen)" if best and (v["lr"], v["directions"]) == (best["lr"], best["directions"]) else ""
            lines.append(f"| {row}{chosen} | {v['lr']:g} | {v['directions']} | {last['step']} | "
                         f"{train_minutes(v['records']):.1f} | "
                         f"{first.get('test_loss', float('nan')):.4f} | {last.get('test_loss', float('nan')):.4f} | "
                         f"{100 * first['test_acc']:.2f} % | {100 * last['test_acc']:.2f} % |")
    return "\n".join(lines)
