"""``forwardlearn bench cost``: what a training step of every rule costs, next to honest baselines.

For one architecture and one batch, every registered rule is measured in the same run, so every figure
is a ratio taken on the same machine at the same moment:

- **time**: median wall-clock of one training step (``zero_grad``, ``rule.grads``, ``SGD.step``) after
  warm-up, as a ratio to the inference forward pass and to the backprop step. The reference forward and
  backprop steps are timed in rounds interleaved with the rule's steps, so a change in the machine's load
  hits numerator and denominator alike.
- **memory**: peak bytes a training step allocates above the state before it (model, rule buffers,
  optimizer state and batch in place; gradients freed), measured in a fresh forked process on CPU
  (:mod:`forwardlearn.bench.memory`) or with ``torch.cuda.max_memory_allocated`` on GPU, as a ratio to
  inference (``no_grad`` forward) and to the backprop step.
- **gradient quality**: cosine of one estimate, and of the mean of ``N`` estimates, to the exact gradient
  (:func:`forwardlearn.diagnostics.gradient_alignment`).
- **baselines**: ``backprop`` and backprop with activation checkpointing (``torch.utils.checkpoint``
  over ``s`` segments of the ``nn.Sequential``) for several ``s``. For every rule the fastest checkpointed
  configuration whose peak memory is no larger than the rule's is its *memory-parity* baseline, as in
  Panchal et al. 2025, The Cost of Avoiding Backpropagation (arXiv:2506.21833), Sec. 4: a rule that saves
  memory only pays off if it is faster than backprop that trades compute for the same memory.

Inputs are a seeded synthetic batch of the data's shape (uniform pixels, uniform labels): the cost of a
step does not depend on the pixel values, and the cosine is taken at initialisation.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: candidate checkpoint segment counts (those up to the number of modules are used, plus that number)
SEGMENT_CANDIDATES = (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
#: extra rows measured next to a rule's default: ``rule -> [(variant label, options)]``
VARIANTS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "zo_spsa": [("lowrank", {"perturbation": "lowrank"})],
}


@dataclass(frozen=True)
class Arch:
    """A benchmark architecture: ``fl.models.build(model, shape, classes, hidden)``."""

    model: str = "mlp"
    hidden: tuple[int, ...] | None = (2000, 2000, 2000, 2000)
    shape: tuple[int, ...] = (1, 28, 28)
    classes: int = 10

    def build(self) -> nn.Module:
        from ..models import build

        return build(self.model, self.shape, self.classes, list(self.hidden) if self.hidden else None)

    @property
    def label(self) -> str:
        inp = math.prod(self.shape)
        if self.model == "mlp":
            return "MLP " + "-".join(str(w) for w in (inp, *(self.hidden or ()), self.classes))
        return f"CNN {'x'.join(str(s) for s in self.shape)}" + (
            f" fc {'-'.join(str(w) for w in self.hidden)}" if self.hidden else "")


@dataclass(frozen=True)
class Job:
    """One contestant on one architecture; picklable, so a fresh process can rebuild it."""

    arch: Arch
    kind: str  # "forward" | "rule" | "fused" | "checkpoint"
    rule: str = "backprop"
    segments: int = 0
    batch_size: int = 256
    seed: int = 0
    lr: float = 1e-3
    variant: str = ""  #: a label of ``options`` (see :data:`VARIANTS`)
    options: tuple[tuple[str, Any], ...] = ()  #: rule options other than the defaults

    @property
    def label(self) -> str:
        if self.kind == "forward":
            return "inference forward"
        if self.kind == "checkpoint":
            return f"backprop + checkpoint ({self.segments} segments)"
        tags = [t for t in (self.variant, "fused" if self.kind == "fused" else "") if t]
        return f"{self.rule} ({', '.join(tags)})" if tags else self.rule


@dataclass
class CostConfig:
    """What :func:`bench_arch` measures and how often."""

    batch_size: int = 256
    repeats: int = 10
    warmup: int = 2
    samples: int = 16
    seed: int = 0
    lr: float = 1e-3
    memory: bool = True
    cosine: bool = True
    checkpoint: bool = True
    device: str = "cpu"
    threads: int | None = 1
    segments: Sequence[int] | None = None  # default: SEGMENT_CANDIDATES that fit the model


def synthetic_batch(arch: Arch, batch_size: int, seed: int,
                    device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """A seeded batch of the architecture's input shape: pixels uniform in [0, 1), labels uniform."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch_size, *arch.shape, generator=g)
    y = torch.randint(0, arch.classes, (batch_size,), generator=g)
    return x.to(device), y.to(device)


def checkpointed_loss(model: nn.Sequential, segments: int, x: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy of ``model(x)`` with activations kept only at the borders of ``segments`` segments.

    ``torch.utils.checkpoint.checkpoint_sequential`` (non-reentrant) recomputes each segment's forward
    during the backward pass (Chen et al. 2016, Training Deep Nets with Sublinear Memory Cost, Sec. 4).
    """
    from torch.utils.checkpoint import checkpoint_sequential

    out = checkpoint_sequential(model, segments, x, use_reentrant=False)
    return F.cross_entropy(out, y)


def prepare(job: Job, device: torch.device | str = "cpu") -> tuple[Callable[[], Any], nn.Module, Any]:
    """Build the model, batch and step function of ``job``; returns ``(step, model, rule)``.

    A training step is ``zero_grad(set_to_none=True)``, the gradient, and plain ``SGD.step`` (no
    momentum: no optimizer state blurs the memory comparison); a fused step updates in place.
    """
    from ..rules import get_rule, trainable_parameters

    device = torch.device(device)
    torch.manual_seed(job.seed)
    model = job.arch.build().to(device)
    x, y = synthetic_batch(job.arch, job.batch_size, job.seed, device)
    if job.kind == "forward":
        def forward() -> Any:
            with torch.no_grad():
                return model(x)
        return forward, model, None
    if job.kind == "checkpoint":
        if not isinstance(model, nn.Sequential):
            raise ValueError("activation checkpointing needs an nn.Sequential model")
        opt = torch.optim.SGD(trainable_parameters(model), lr=job.lr)

        def ckpt_step() -> float:
            opt.zero_grad(set_to_none=True)
            loss = checkpointed_loss(model, job.segments, x, y)
            loss.backward()
            opt.step()
            return float(loss.detach())
        return ckpt_step, model, None
    rule = get_rule(job.rule, seed=job.seed, **dict(job.options))
    model = rule.attach(model)
    if job.kind == "fused":
        if not rule.supports_fused:
            raise ValueError(f"rule {job.rule!r} has no fused_step")

        def fused_step() -> float:
            return rule.fused_step(model, x, y, job.lr)
        return fused_step, model, rule
    opt = torch.optim.SGD(trainable_parameters(model), lr=job.lr)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = rule.grads(model, x, y)
        opt.step()
        return loss
    return step, model, rule


def _drop_grads(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


def measure_peak(job: Job) -> int:
    """Peak bytes one step of ``job`` allocates above the state before it (CPU, in this process).

    Runs one unmeasured step first (lazily built rule state, kernels, pages of code), drops the
    gradients, then measures the second step with the kernel's resident-set high-water mark. Meant to
    run in a fresh process via :func:`forwardlearn.bench.memory.peak_memory`.
    """
    from .memory import _reset_peak, _rss_kib

    step, model, _ = prepare(job, "cpu")
    step()
    _drop_grads(model)
    gc.collect()
    base = _rss_kib("VmRSS")
    if not _reset_peak():
        raise RuntimeError("cannot reset the peak-memory counter (/proc/self/clear_refs is not writable)")
    step()
    return (_rss_kib("VmHWM") - base) * 1024


def _measure_peak_cuda(job: Job, device: torch.device) -> int:
    step, model, _ = prepare(job, device)
    step()
    _drop_grads(model)
    gc.collect()
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del step, model
    gc.collect()
    torch.cuda.empty_cache()
    return peak


def peak_bytes(job: Job, device: torch.device | str = "cpu", threads: int | None = None) -> int:
    """Peak memory of one step of ``job``: a fresh forked process on CPU, ``max_memory_allocated`` on CUDA."""
    device = torch.device(device)
    if device.type == "cuda":
        return _measure_peak_cuda(job, device)
    from .memory import peak_memory

    _, peak = peak_memory(measure_peak, job, threads=threads, warmup=False)
    return int(peak)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def interleaved_times(fns: Sequence[Callable[[], Any]], repeats: int, warmup: int,
                      device: torch.device | str = "cpu") -> list[list[float]]:
    """Seconds of each function over ``repeats`` rounds, each round calling every function once, in order.

    Interleaving puts numerator and denominator of a ratio under the same load; take medians.
    """
    device = torch.device(device)
    for _ in range(warmup):
        for fn in fns:
            fn()
    out: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            out[i].append(_timed(fn, device))
    return out


def perturbation_sweeps(forward: Callable[[], Any], model: nn.Module, cfg: CostConfig,
                        device: torch.device) -> dict[str, float]:
    """This machine's cost of one seeded perturbation sweep over all weights of the forward job's model
    (``Directions.add_``, Rademacher and Gaussian), as a ratio to the forward pass timed in the same rounds:
    the part of a full-perturbation ``zo_spsa`` step that moves most between machines."""
    from ..forward_only import Directions

    flats = [p.detach().view(-1) for p in model.parameters() if p.is_contiguous()]
    dirs = {d: Directions(d) for d in ("rademacher", "gaussian")}
    times = interleaved_times([forward, *(lambda d=d: dirs[d].add_(flats, 12345, 0.0) for d in dirs)],
                              max(1, cfg.repeats // 2), 1, device)
    f = statistics.median(times[0])
    return {f"{d}_sweep_vs_forward": statistics.median(t) / f for d, t in zip(dirs, times[1:])}


def segment_counts(model: nn.Module, wanted: Sequence[int] | None = None) -> list[int]:
    """Segment counts to try for a sequential model of ``n`` modules: candidates below ``n``, and ``n``."""
    n = len(model) if isinstance(model, nn.Sequential) else 0
    if n < 2:
        return []
    cands = wanted if wanted is not None else SEGMENT_CANDIDATES
    return sorted({s for s in cands if 2 <= s <= n} | ({n} if wanted is None else set()))


def parity(rule_peak: float | None, rule_time: float | None, checkpoints: Sequence[dict[str, Any]],
           backprop: dict[str, Any] | None = None) -> dict[str, Any]:
    """The memory-parity baseline of a rule: the fastest checkpointed configuration using no more memory.

    ``checkpoints`` rows carry ``segments``, ``peak_bytes`` and ``time_vs_backprop``; ``rule_time`` is the
    rule's ``time_vs_backprop``. ``backprop`` (plain backprop's row) joins the candidates as ``segments=1``
    (no checkpointing): a rule that needs at least backprop's memory is compared with plain backprop.
    Returns ``segments``, ``peak_bytes``, ``time_vs_backprop`` of the chosen
    configuration and ``rule_vs_checkpoint`` (rule step time / checkpointed step time; above 1 the rule is
    slower than backprop at equal memory), or ``segments=None`` when no configuration fits.
    """
    if backprop is not None:
        checkpoints = [{**backprop, "segments": 1}, *checkpoints]
    fits = [c for c in checkpoints if c.get("peak_bytes") is not None and c.get("time_vs_backprop") is not None
            and rule_peak is not None and c["peak_bytes"] <= rule_peak]
    if not fits:
        least = min((c["peak_bytes"] for c in checkpoints if c.get("peak_bytes") is not None), default=None)
        return {"segments": None, "peak_bytes": None, "time_vs_backprop": None, "rule_vs_checkpoint": None,
                "least_checkpoint_peak_bytes": least}
    best = min(fits, key=lambda c: (c["time_vs_backprop"], c["peak_bytes"]))
    ratio = rule_time / best["time_vs_backprop"] if rule_time is not None and best["time_vs_backprop"] else None
    return {"segments": best["segments"], "peak_bytes": best["peak_bytes"],
            "time_vs_backprop": best["time_vs_backprop"], "rule_vs_checkpoint": ratio}


def _first_line(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def jobs_for(arch: Arch, rules: Sequence[str], cfg: CostConfig) -> tuple[list[Job], list[dict[str, str]]]:
    """The contestants on ``arch``: every usable rule (and its fused step), plus skip notes for the rest."""
    from ..rules import rule_class

    jobs: list[Job] = []
    skipped: list[dict[str, str]] = []
    common = {"arch": arch, "batch_size": cfg.batch_size, "seed": cfg.seed, "lr": cfg.lr}
    for name in rules:
        cls = rule_class(name)
        if cls.data_kind != "tensor":
            skipped.append({"rule": name, "why": f"needs {cls.data_kind} data, not a batch of {arch.label} inputs"})
            continue
        for variant, options in [("", {}), *VARIANTS.get(name, [])]:
            extra = {"variant": variant, "options": tuple(sorted(options.items()))}
            jobs.append(Job(kind="rule", rule=name, **common, **extra))
            if cls.supports_fused:
                jobs.append(Job(kind="fused", rule=name, **common, **extra))
    return jobs, skipped


def bench_arch(arch: Arch, rules: Sequence[str], cfg: CostConfig, progress: bool = True,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure every rule in ``rules`` (and the baselines) on ``arch``; returns a JSON-ready dict.

    Keys: ``arch``, ``label``, ``baseline`` (forward and backprop seconds, inference and backprop peak
    bytes), ``rows`` (one per rule / fused step), ``checkpoints`` (one per segment count), ``skipped``.
    """
    from ..diagnostics import gradient_alignment

    if cfg.threads is not None and torch.device(cfg.device).type == "cpu":
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    common = {"arch": arch, "batch_size": cfg.batch_size, "seed": cfg.seed, "lr": cfg.lr}
    fwd_job = Job(kind="forward", **common)
    bp_job = Job(kind="rule", rule="backprop", **common)
    fwd_step, fwd_model, _ = prepare(fwd_job, device)
    bp_step, bp_model, _ = prepare(bp_job, device)
    rule_jobs, skipped = jobs_for(arch, rules, cfg)
    ckpt_jobs = []
    if cfg.checkpoint:
        ckpt_jobs = [Job(kind="checkpoint", segments=s, **common) for s in segment_counts(bp_model, cfg.segments)]
    torch.manual_seed(cfg.seed)
    init_model = arch.build().to(device)  # the same initialisation ``prepare`` builds
    x, y = synthetic_batch(arch, cfg.batch_size, cfg.seed, device)

    def peak(job: Job) -> int | None:
        if not cfg.memory:
            return None
        return peak_bytes(job, device, cfg.threads)

    bar = None
    todo = [fwd_job, *ckpt_jobs, *rule_jobs]
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc=arch.label, unit="run", dynamic_ncols=True, leave=False)
        log = bar.write
    fwd_times: list[float] = []
    bp_times: list[float] = []
    sweeps = perturbation_sweeps(fwd_step, fwd_model, cfg, device)
    inference_peak = peak(fwd_job)
    if bar is not None:
        bar.update(1)
    backprop_peak: int | None = None
    measured: list[tuple[Job, dict[str, Any]]] = []
    # backprop first: every other row's memory ratio refers to it
    ordered = sorted(rule_jobs, key=lambda j: (j.rule != "backprop" or j.kind != "rule"))
    for job in [*ordered, *ckpt_jobs]:
        row: dict[str, Any] = {"name": job.label, "kind": job.kind, "rule": job.rule if job.kind != "checkpoint"
                               else "backprop", "segments": job.segments or None, "options": dict(job.options)}
        try:
            step, model, rule = prepare(job, device)
            t_f, t_b, t_r = interleaved_times([fwd_step, bp_step, step], cfg.repeats, cfg.warmup, device)
            del step, model
            fwd_times += t_f
            bp_times += t_b
            mf, mb, mr = statistics.median(t_f), statistics.median(t_b), statistics.median(t_r)
            row.update({"seconds": mr, "time_vs_forward": mr / mf, "time_vs_backprop": mr / mb})
            row["peak_bytes"] = peak(job)
            if job.kind == "rule" and cfg.cosine:
                from ..rules import get_rule

                scored = get_rule(job.rule, seed=cfg.seed + 1, **dict(job.options))
                al = gradient_alignment(init_model, scored, x, y, samples=cfg.samples, names=False)
                row.update({"cosine": al["cosine"], "mean_cosine": al["mean_cosine"], "samples": cfg.samples,
                            "norm_ratio": al["norm_ratio"]})
        except Exception as e:  # noqa: BLE001 - one failing rule must not sink the benchmark
            why = _first_line(e)
            skipped.append({"rule": job.label, "why": f"raised {why}"})
            log(f"{job.label} on {arch.label}: skipped (raised {why})")
            if bar is not None:
                bar.update(1)
            continue
        if job.kind == "rule" and job.rule == "backprop":
            backprop_peak = row["peak_bytes"]
        measured.append((job, row))
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"{job.label}: x{row['time_vs_backprop']:.2f} backprop")
    if bar is not None:
        bar.close()
    if backprop_peak is None and cfg.memory:
        backprop_peak = peak(bp_job)
    for _, row in measured:
        p = row.get("peak_bytes")
        row["memory_vs_inference"] = p / inference_peak if p is not None and inference_peak else None
        row["memory_vs_backprop"] = p / backprop_peak if p is not None and backprop_peak else None
    rows = [r for j, r in measured if j.kind != "checkpoint"]
    checkpoints = [r for j, r in measured if j.kind == "checkpoint"]
    from ..rules import rule_class

    bp_row = next((r for r in rows if r["rule"] == "backprop" and r["kind"] == "rule"), None)
    for r in rows:
        cls = rule_class(r["rule"])
        r["forward_only"] = bool(cls.forward_only)
        if r is not bp_row:
            r["parity"] = parity(r.get("peak_bytes"), r.get("time_vs_backprop"), checkpoints, bp_row)
    return {
        "arch": asdict(arch),
        "label": arch.label,
        "batch_size": cfg.batch_size,
        "baseline": {
            "forward_seconds": statistics.median(fwd_times) if fwd_times else None,
            "backprop_seconds": statistics.median(bp_times) if bp_times else None,
            "inference_peak_bytes": inference_peak,
            "backprop_peak_bytes": backprop_peak,
            **sweeps,
        },
        "rows": rows,
        "checkpoints": checkpoints,
        "skipped": skipped,
    }


def sweep_archs(depths: Sequence[int], widths: Sequence[int], depth_width: int, width_depth: int,
                shape: tuple[int, ...] = (1, 28, 28), classes: int = 10) -> list[tuple[str, int, Arch]]:
    """``("depth", d, MLP with d hidden layers of depth_width)`` and ``("width", w, MLP width_depth x w)``."""
    out = [("depth", d, Arch("mlp", (depth_width,) * d, shape, classes)) for d in depths]
    out += [("width", w, Arch("mlp", (w,) * width_depth, shape, classes)) for w in widths]
    return out


def run_cost(archs: Sequence[Arch], rules: Sequence[str], cfg: CostConfig, out_dir: Any,
             sweep: Sequence[tuple[str, int, Arch]] = (), sweep_cfg: CostConfig | None = None,
             fixed: dict[str, str] | None = None, progress: bool = True, meta: dict[str, Any] | None = None,
             name: str = "cost", log: Callable[[str], None] = print) -> dict[str, Any]:
    """Benchmark ``archs`` (the tables) and ``sweep`` (the cost-over-depth/width plot); write JSON, Markdown, PNG.

    Writes ``<out_dir>/<name>.json``, ``<name>.md`` and ``<name>-sweep.png``; the JSON is rewritten after
    every architecture, so an interrupted run keeps what it measured.
    """
    from pathlib import Path

    from .report import cost_markdown, plot_sweep, write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"meta": meta or {}, "config": {**asdict(cfg), "rules": list(rules)},
                              "archs": [], "sweep": [], "sweep_png": None}
    if sweep_cfg is not None:
        result["sweep_config"] = asdict(sweep_cfg)
    for arch in archs:
        res = bench_arch(arch, rules, cfg, progress=progress, log=log)
        result["archs"].append(res)
        for s in res["skipped"]:
            log(f"{arch.label}: {s['rule']} skipped ({s['why']})")
        write_json(result, out / f"{name}.json")
    fixed = fixed or {}
    for axis, value, arch in sweep:
        res = bench_arch(arch, rules, sweep_cfg or cfg, progress=progress, log=log)
        result["sweep"].append({"axis": axis, "value": value, "fixed": fixed.get(axis, ""), "result": res})
        write_json(result, out / f"{name}.json")
    if result["sweep"]:
        result["sweep_png"] = f"{name}-sweep.png"
        plot_sweep(result["sweep"], out / result["sweep_png"])
    write_json(result, out / f"{name}.json")
    (out / f"{name}.md").write_text(cost_markdown(result))
    return result
