"""What exact Shapley values in one forward pass save, and what the HarsanyiNet architecture costs in accuracy.

Part 1 (cost): a trained HarsanyiNet explains test inputs (a) with its own forward pass and (b) with
model-agnostic estimators on the very same game (same model, same baseline): antithetic permutation
sampling (``forwardlearn.explain.permutation_shapley``) and, when the ``shap`` package is installed,
Kernel SHAP (``shap.KernelExplainer`` with the baseline as its only background row). The reference is
the HarsanyiNet attribution in float64 (for ``digits``, 16 variables, also brute-force enumeration of all
2^16 coalitions). For each budget the script prints the RMSE over variables and the seconds per input;
every time is measured in the same run as the one-forward time it is compared with.

Part 2 (accuracy): HarsanyiNet against an ordinary network of the same depth and width, both trained
with ``backprop`` and the same optimiser settings, over several seeds.

Run from the repository root (one thread, as the project measures)::

    OMP_NUM_THREADS=1 python benchmarks/harsanyi_cost.py            # both parts
    OMP_NUM_THREADS=1 python benchmarks/harsanyi_cost.py --part cost --inputs 5 \\
        --json benchmarks/results/harsanyi_cost.json

With ``--json PATH`` the measurements are also written there with the command; the stored runs are
``benchmarks/results/harsanyi_cost.json`` (``--part cost --inputs 5``) and
``benchmarks/results/harsanyi_accuracy.json`` (``--part accuracy --seeds 3``), shown in the README.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

import forwardlearn as fl
from forwardlearn.commands.explain import DEFAULTS
from forwardlearn.explain import brute_force_shapley, harsanyi_game, permutation_shapley
from forwardlearn.models import HarsanyiNet


def train_harsanyi(name: str, seed: int = 0) -> tuple[HarsanyiNet, float]:
    Xtr, ytr = fl.data.load(name)
    Xte, yte = fl.data.load(name, "test")
    form = "mlp" if Xtr.dim() == 2 else "cnn"
    hp = DEFAULTS[form]
    torch.manual_seed(seed)
    model = HarsanyiNet(tuple(Xtr.shape[1:]), int(ytr.max()) + 1, layers=hp["layers"], hidden=hp["hidden"],
                        channels=hp["channels"])
    if form == "mlp":
        model.set_baseline(Xtr.mean(0))
    h = fl.train(model, fl.get_rule("backprop", seed=seed), (Xtr, ytr), (Xte, yte), lr=hp["lr"],
                 epochs=hp["epochs"], batch_size=hp["batch_size"], seed=seed, progress=False, eval_train=False)
    return model.eval(), h.final["test_acc"]


def timed(fn: Callable[[], Tensor], repeat: int = 1) -> tuple[Tensor, float]:
    t0 = time.perf_counter()
    for _ in range(repeat):
        out = fn()
    return out, (time.perf_counter() - t0) / repeat


def rmse(a: Tensor, b: Tensor) -> float:
    return float(((a.double() - b.double()) ** 2).mean().sqrt())


def kernel_shap(game: Callable[[Tensor], Tensor], n: int, nsamples: int, seed: int) -> Tensor:
    """Kernel SHAP on the mask game: features are presence bits, x = all ones, background = all zeros."""
    import numpy as np
    import shap

    def f(masks: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return game(torch.from_numpy(masks > 0.5)).double().numpy()

    np.random.seed(seed)
    explainer = shap.KernelExplainer(f, np.zeros((1, n)), link="identity")
    values = explainer.shap_values(np.ones((1, n)), nsamples=nsamples, silent=True, l1_reg=False)
    return torch.as_tensor(np.asarray(values).reshape(-1), dtype=torch.float64)


def cost(name: str, inputs: int, use_shap: bool) -> dict[str, Any]:
    """Part 1 on one data set; returns what it prints (times in seconds per input, errors as RMSE)."""
    torch.manual_seed(0)
    model, acc = train_harsanyi(name)
    Xte, _ = fl.data.load(name, "test")
    x = Xte[:inputs]
    n = model.variables
    print(f"\n== cost: {name}, HarsanyiNet test acc {acc:.3f}, {n} input variables, {inputs} test inputs ==")
    with torch.no_grad():
        scores = model(x)
        target = scores.argmax(1)
        model64 = HarsanyiNet.from_config(model.config).double()
        model64.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in model.state_dict().items()})
        ref = model64.shapley(x.double(), target=target).flatten(1)
        # one forward pass per input (batch of one), and one pass for the whole batch
        _, t_one = timed(lambda: torch.stack([model.shapley(x[i : i + 1], target=int(target[i]))[0]
                                              for i in range(inputs)]), repeat=3)
        phi32, t_batch = timed(lambda: model.shapley(x, target=target), repeat=3)
        _, t_pred = timed(lambda: model(x[:1]), repeat=20)
    floor = rmse(phi32.flatten(1), ref)
    scale = float(ref.abs().mean())
    print(f"HarsanyiNet one forward: {t_one / inputs * 1e3:.3f} ms per input (batch of one; a plain prediction "
          f"takes {t_pred * 1e3:.3f} ms), {t_batch / inputs * 1e3:.4f} ms per input in a batch of {inputs}; "
          f"RMSE of float32 vs float64 = {floor:.2e} (mean |phi| = {scale:.3f})")
    rec: dict[str, Any] = {"data": name, "test_acc": acc, "variables": n, "inputs": inputs,
                           "seconds_one_forward": t_one / inputs, "seconds_prediction": t_pred,
                           "seconds_batched_forward": t_batch / inputs, "float32_rmse": floor, "mean_abs_phi": scale,
                           "estimators": {}}
    if n <= 16:  # the ground truth by definition, for the first input (2^n evaluations)
        game = harsanyi_game(model64, x[0].double(), int(target[0]))
        bf, t_bf = timed(lambda: brute_force_shapley(game, n))
        print(f"brute force over 2^{n} coalitions (float64, first input): {t_bf:.3f} s "
              f"= {t_bf / (t_one / inputs):.2g} x one forward; "
              f"max |brute force - HarsanyiNet| = {float((bf - ref[0]).abs().max()):.2e}")
        rec["brute_force"] = {"coalitions": 2 ** n, "seconds": t_bf, "vs_one_forward": t_bf / (t_one / inputs),
                              "max_abs_diff_float64": float((bf - ref[0]).abs().max())}
    games32 = [harsanyi_game(model, x[i], int(target[i])) for i in range(inputs)]
    print(f"{'estimator':<22}{'budget':>8}{'evaluations':>13}{'RMSE':>11}{'RMSE/mean|phi|':>16}"
          f"{'s per input':>13}{'x one forward':>15}")
    fits: dict[str, list[tuple[float, float]]] = {}
    budgets = [2, 8, 32, 128, 512, 2048]
    for m in budgets:
        g = torch.Generator().manual_seed(m)
        est, t = timed(lambda m=m, g=g: torch.stack([permutation_shapley(gm, n, m, generator=g) for gm in games32]))
        e = rmse(est, ref)
        fits.setdefault("permutation", []).append((t / inputs, e))
        rec["estimators"].setdefault("permutation", []).append(
            {"budget": m, "evaluations": m * (n - 1) + 2, "rmse": e, "rmse_rel": e / scale,
             "seconds_per_input": t / inputs, "vs_one_forward": t / t_one})
        print(f"{'permutation (antith.)':<22}{m:>8}{m * (n - 1) + 2:>13}{e:>11.2e}{e / scale:>16.2e}"
              f"{t / inputs:>13.4f}{t / t_one:>15.0f}")
    if use_shap:
        for m in [2 * n + 16, 256, 1024, 4096]:
            est, t = timed(lambda m=m: torch.stack([kernel_shap(gm, n, m, seed=m) for gm in games32]))
            e = rmse(est, ref)
            fits.setdefault("kernel SHAP", []).append((t / inputs, e))
            rec["estimators"].setdefault("kernel SHAP", []).append(
                {"budget": m, "evaluations": m, "rmse": e, "rmse_rel": e / scale, "seconds_per_input": t / inputs,
                 "vs_one_forward": t / t_one})
            print(f"{'kernel SHAP (shap)':<22}{m:>8}{m:>13}{e:>11.2e}{e / scale:>16.2e}"
                  f"{t / inputs:>13.4f}{t / t_one:>15.0f}")
    # Monte-Carlo error falls like budget^-1/2, i.e. time ~ error^-2: extrapolate from the largest budget
    for label, pts in fits.items():
        t_last, e_last = pts[-1]
        for goal_name, goal in [("1% of mean |phi|", 0.01 * scale), ("HarsanyiNet float32 error", floor)]:
            need = t_last * (e_last / goal) ** 2 if e_last > goal else min(t for t, e in pts if e <= goal)
            print(f"{label}: time per input to reach RMSE {goal:.1e} ({goal_name}): ~{need:.3g} s "
                  f"= {need / (t_one / inputs):.2g} x one HarsanyiNet forward "
                  f"({'measured' if e_last <= goal else 'extrapolated from the largest budget'})")
    return rec


class _SkipSum(nn.Module):
    """An ordinary CNN matched to HarsanyiNet's CNN form: stem, L 3x3 conv layers, read-out from every layer."""

    def __init__(self, classes: int, layers: int, channels: int, size: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), nn.MaxPool2d(2), nn.ReLU())
        self.convs = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in range(layers))
        self.heads = nn.ModuleList(nn.Linear(channels * (size // 2) ** 2, classes) for _ in range(layers))

    def forward(self, x: Tensor) -> Tensor:
        z = self.stem(x)
        out = 0
        for conv, head in zip(self.convs, self.heads):
            z = torch.relu(conv(z))
            out = out + head(z.flatten(1))
        return out


def accuracy(seeds: int) -> list[dict[str, Any]]:
    """Part 2; returns one record per data set and model (test accuracies per seed, parameters, time ratio)."""
    out: list[dict[str, Any]] = []
    print(f"\n== accuracy: test accuracy over {seeds} seeds (mean +- sd), same optimiser settings ==")
    for name in ["breast_cancer", "wine", "digits"]:
        Xtr, ytr = fl.data.load(name)
        Xte, yte = fl.data.load(name, "test")
        classes = int(ytr.max()) + 1
        form = "mlp" if Xtr.dim() == 2 else "cnn"
        hp = DEFAULTS[form]
        rows: dict[str, list[float]] = {}
        secs: dict[str, float] = {}
        params: dict[str, int] = {}
        for seed in range(seeds):
            for label in ("HarsanyiNet", "ordinary"):
                torch.manual_seed(seed)
                if label == "HarsanyiNet":
                    model: nn.Module = HarsanyiNet(tuple(Xtr.shape[1:]), classes, layers=hp["layers"],
                                                   hidden=hp["hidden"], channels=hp["channels"])
                    if form == "mlp":
                        model.set_baseline(Xtr.mean(0))
                elif form == "mlp":
                    model = fl.models.mlp(Xtr.shape[1], [hp["hidden"]] * hp["layers"], classes)
                else:
                    model = _SkipSum(classes, hp["layers"], hp["channels"], Xtr.shape[-1])
                params[label] = sum(p.numel() for p in model.parameters())
                t0 = time.perf_counter()
                h = fl.train(model, fl.get_rule("backprop", seed=seed), (Xtr, ytr), (Xte, yte), lr=hp["lr"],
                             epochs=hp["epochs"], batch_size=hp["batch_size"], seed=seed, progress=False,
                             eval_train=False)
                secs[label] = secs.get(label, 0.0) + time.perf_counter() - t0
                rows.setdefault(label, []).append(h.final["test_acc"])
        for label, accs in rows.items():
            sd = statistics.stdev(accs) if len(accs) > 1 else math.nan
            print(f"{name:<14}{label:<13}{params[label]:>8} params  acc {statistics.mean(accs):.3f} +- {sd:.3f}  "
                  f"train time x{secs[label] / secs['ordinary']:.1f} of ordinary  ({hp['epochs']} epochs, "
                  f"Adam lr {hp['lr']}, batch {hp['batch_size']})")
            out.append({"data": name, "model": label, "form": form, "parameters": params[label], "test_acc": accs,
                        "mean": statistics.mean(accs), "sd": sd, "time_vs_ordinary": secs[label] / secs["ordinary"],
                        "epochs": hp["epochs"], "lr": hp["lr"], "batch_size": hp["batch_size"]})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["cost", "accuracy", "all"], default="all")
    p.add_argument("--data", nargs="+", default=["breast_cancer", "digits"])
    p.add_argument("--inputs", type=int, default=5, help="test inputs explained per data set")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--no-shap", action="store_true", help="skip Kernel SHAP even if shap is installed")
    p.add_argument("--json", default="", help="also write the measurements here, with the command")
    args = p.parse_args()
    torch.set_num_threads(1)
    use_shap = not args.no_shap
    if use_shap:
        try:
            import shap  # noqa: F401
        except ImportError:
            print("shap is not installed: Kernel SHAP is skipped")
            use_shap = False
    res: dict[str, Any] = {"command": " ".join(["OMP_NUM_THREADS=1 python benchmarks/harsanyi_cost.py",
                                                *sys.argv[1:]]), "threads": 1, "kernel_shap": use_shap}
    if args.part in ("cost", "all"):
        res["cost"] = [cost(name, args.inputs, use_shap) for name in args.data]
    if args.part in ("accuracy", "all"):
        res["accuracy"] = accuracy(args.seeds)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
