"""``forwardlearn explain``: train (or load) a HarsanyiNet and write the exact Shapley values of test inputs.

Tabular data sets (MLP form) give a CSV table plus a readable text table; image data sets (CNN form) give
a CSV and a heat-map PNG. The baseline is the training mean of each feature for tabular data and the
zero feature vector of the convolutional stem for images (Chen et al., ICML 2023, Sec. 3).
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path
from typing import Any

NAME = "explain"
HELP = "train or load a HarsanyiNet and write exact Shapley values (one forward pass) for test inputs"

#: training defaults per form: the documented hyperparameters of ``forwardlearn explain``
DEFAULTS: dict[str, dict[str, Any]] = {
    "mlp": {"epochs": 30, "lr": 1e-2, "batch_size": 32, "layers": 3, "hidden": 100, "channels": 32},
    "cnn": {"epochs": 20, "lr": 3e-3, "batch_size": 32, "layers": 3, "hidden": 100, "channels": 32},
}
CHECKPOINT = "model.pt"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="breast_cancer, wine, iris (tabular) or digits, mnist (images)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--checkpoint", default=None, help="load this HarsanyiNet checkpoint instead of training")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: 30 tabular, 20 images)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default: 1e-2 tabular, 3e-3 images)")
    p.add_argument("--batch-size", type=int, default=None, help="mini-batch size (default 32)")
    p.add_argument("--layers", type=int, default=None, help="Harsanyi layers (default 3)")
    p.add_argument("--hidden", type=int, default=None, help="units per layer, tabular (default 100)")
    p.add_argument("--channels", type=int, default=None, help="channels per position, images (default 32)")
    p.add_argument("--samples", type=int, default=5, help="explain the first N test inputs (default 5)")
    p.add_argument("--indices", type=int, nargs="+", default=None, help="explain these test inputs instead")
    p.add_argument("--target", default="predicted",
                   help="output to explain: 'predicted' (default), 'label', or a class index")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")


def _feature_names(name: str, n: int) -> list[str]:
    try:
        from sklearn import datasets

        names = list(getattr(datasets, f"load_{name}")().feature_names)
        if len(names) == n:
            return [str(s) for s in names]
    except (AttributeError, ImportError):
        pass
    return [f"x{i}" for i in range(n)]


def _load_checkpoint(path: Path, device: Any) -> tuple[Any, dict[str, Any]]:

    from ..models.harsanyi import HarsanyiNet
    from ..training.checkpoint import load_checkpoint

    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    state = load_checkpoint(path, ("config", "model"), map_location=device)
    try:
        model = HarsanyiNet.from_config(state["config"])
        model.load_state_dict(state["model"])
    except Exception as e:  # noqa: BLE001 - a checkpoint of another model: say which file
        raise ValueError(f"{path}: not a HarsanyiNet checkpoint ({type(e).__name__}: {e})") from None
    return model.to(device), state


def run(args: argparse.Namespace) -> int:
    import torch

    from .. import data as fldata
    from ..models.harsanyi import HarsanyiNet
    from ..rules import get_rule
    from ..training import accuracy, resolve_device, train

    spec = fldata.info(args.data)
    form = "mlp" if len(spec.shape) == 1 else "cnn"
    hp = dict(DEFAULTS[form])
    for key in hp:
        value = getattr(args, key)
        if value is not None:
            hp[key] = value
    if args.samples <= 0:
        raise ValueError(f"--samples must be positive, got {args.samples}")
    device = resolve_device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    Xtr, ytr = fldata.load(args.data, "train")
    Xte, yte = fldata.load(args.data, "test")
    rule = get_rule("backprop", seed=args.seed)

    if args.checkpoint is not None:
        model, state = _load_checkpoint(Path(args.checkpoint), device)
        if tuple(model.input_shape) != tuple(Xte.shape[1:]) or model.classes != spec.classes:
            raise ValueError(f"checkpoint {args.checkpoint} expects inputs {model.input_shape} and "
                             f"{model.classes} classes; {args.data} has {tuple(Xte.shape[1:])} and {spec.classes}")
        trained_seconds = None
    else:
        torch.manual_seed(args.seed)
        model = HarsanyiNet(tuple(Xtr.shape[1:]), spec.classes, layers=hp["layers"], hidden=hp["hidden"],
                            channels=hp["channels"])
        if form == "mlp":
            model.set_baseline(Xtr.mean(0))  # the paper's zero baseline on standardised features
        t0 = time.perf_counter()
        train(model, rule, (Xtr, ytr), (Xte, yte), optimizer="adam", lr=hp["lr"], epochs=hp["epochs"],
              batch_size=hp["batch_size"], seed=args.seed, progress=False, device=device)
        trained_seconds = time.perf_counter() - t0
        model.eval()
        torch.save({"config": model.config, "model": model.state_dict(), "data": args.data},
                   out / CHECKPOINT)
    model.eval()
    test_acc = accuracy(model, rule, Xte.to(device), yte.to(device))

    idx = args.indices if args.indices is not None else list(range(min(args.samples, len(Xte))))
    bad = [i for i in idx if not 0 <= i < len(Xte)]
    if bad:
        raise ValueError(f"--indices {bad} out of range: the {args.data} test split has {len(Xte)} inputs")
    x, labels = Xte[idx].to(device), yte[idx].to(device)
    if args.target == "predicted":
        target = None
    elif args.target == "label":
        target = labels
    else:
        try:
            target = int(args.target)
        except ValueError:
            raise ValueError(f"--target must be 'predicted', 'label' or a class index, got {args.target!r}") from None
    t0 = time.perf_counter()
    with torch.no_grad():
        scores, phi = model(x, return_shapley=True, target=target)
    attrib_seconds = time.perf_counter() - t0
    with torch.no_grad():
        t = model.resolve_target(scores, target)
        base = model.baseline_scores()[0, t]
    rows = range(len(idx))
    score_t = scores[torch.arange(len(idx)), t]
    gap = float((phi.flatten(1).sum(1) - (score_t - base)).abs().max())

    names = _feature_names(args.data, model.variables) if form == "mlp" else [
        f"cell_{r}_{c}" for r in range(model.variable_shape[0]) for c in range(model.variable_shape[1])]
    flat = phi.flatten(1).cpu()
    with open(out / "shapley.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["test_index", "label", "predicted", "target", "score", "baseline_score", *names])
        for r in rows:
            w.writerow([idx[r], int(labels[r]), int(scores[r].argmax()), int(t[r]), f"{float(score_t[r]):.6g}",
                        f"{float(base[r]):.6g}", *(f"{float(v):.6g}" for v in flat[r])])
    written = [out / "shapley.csv"]
    if form == "mlp":
        lines = []
        for r in rows:
            lines.append(f"test input {idx[r]}: label {int(labels[r])}, predicted {int(scores[r].argmax())}, "
                         f"explaining class {int(t[r])}: score {float(score_t[r]):.4f} = baseline "
                         f"{float(base[r]):.4f} + sum of Shapley values {float(flat[r].sum()):.4f}")
            order = flat[r].abs().argsort(descending=True)
            width = max(len(n) for n in names)
            for j in order.tolist():
                lines.append(f"  {names[j]:<{width}}  value {float(x[r, j]):8.4f}  shapley {float(flat[r, j]):+.5f}")
        (out / "shapley.txt").write_text("\n".join(lines) + "\n")
        written.append(out / "shapley.txt")
        print("\n".join(lines[: min(len(lines), 12)]))
    else:
        _heat_map(x.cpu(), phi.cpu(), [int(v) for v in labels], [int(s.argmax()) for s in scores],
                  [int(v) for v in t], idx, out / "shapley.png")
        written.append(out / "shapley.png")
    summary = {
        "data": args.data, "form": form, "test_acc": test_acc, "trained_seconds": trained_seconds,
        "checkpoint": str(args.checkpoint or out / CHECKPOINT), "explained": idx,
        "attribution_seconds": attrib_seconds, "max_efficiency_gap": gap,
        "variables": model.variables, "hyperparameters": None if args.checkpoint else hp,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"test accuracy {test_acc:.4f}; Shapley values of {len(idx)} inputs in one forward pass "
          f"({attrib_seconds * 1e3:.1f} ms), max |sum(phi) - (f(x) - f(baseline))| = {gap:.2e}")
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _heat_map(x: Any, phi: Any, labels: list[int], preds: list[int], targets: list[int], idx: list[int],
              path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(idx)
    fig, axes = plt.subplots(2, n, figsize=(2.2 * n, 4.6), squeeze=False)
    h0, w0 = phi.shape[1:]
    h, w = x.shape[2:]
    # stem variables cover 2x2 pixel blocks; pixel variables cover one pixel each
    sy, sx = (2, 2) if (h0, w0) != (h, w) else (1, 1)
    for j in range(n):
        img = x[j].mean(0).numpy()
        axes[0, j].imshow(img, cmap="gray_r", interpolation="nearest")
        axes[0, j].set_title(f"#{idx[j]} label {labels[j]}\npred {preds[j]}", fontsize=8)
        lim = float(phi[j].abs().max()) or 1.0
        im = axes[1, j].imshow(phi[j].numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest",
                               extent=(-0.5, w0 * sx - 0.5, h0 * sy - 0.5, -0.5))
        axes[1, j].imshow(img, cmap="gray_r", alpha=0.25, interpolation="nearest",
                          extent=(-0.5, w - 0.5, h - 0.5, -0.5))
        axes[1, j].set_title(f"Shapley, class {targets[j]}", fontsize=8)
        fig.colorbar(im, ax=axes[1, j], fraction=0.046, pad=0.04)
        for a in axes[:, j]:
            a.set_xticks([])
            a.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
