"""``forwardlearn bench accuracy``: every rule trained to a stated budget from a suite file.

A suite is a TOML file::

    name = "mnist"
    [defaults]                     # shared by every run (a run's own keys win)
    data = "mnist"
    seed = 0

    [[run]]
    rule = "ff"                    # or "all": every registered rule not named in the suite
    model = "mlp"                  # "mlp", "cnn", or "default" (the rule's own default_model)
    hidden = [2000, 2000, 2000, 2000]
    optimizer = "adam"
    lr = 1e-3
    epochs = 60
    batch_size = 128
    options = { threshold = 2.0 }  # rule options (fl.get_rule(rule, **options))
    activation = "relu"
    note = "60 of the paper's 100 epochs"   # how our setup differs from the paper's
    [run.paper]                    # the paper's headline number and setup (reproduction table)
    test_acc = 0.9864
    setup = "MNIST, 4x2000 ReLU, ..."
    source = "Hinton 2022, Sec. 3.3"

Keys a run leaves out come from ``[defaults]``, then from the rule's documented ``defaults`` (a rule that
builds its own model gets ``model = "default"``). Each run trains with :class:`forwardlearn.Trainer` into
its own directory (``<work>/<suite>/<id>-<hash of its setup>/``), which checkpoints every epoch; running the
suite again resumes every unfinished run where it stopped and skips finished ones (a run whose setup changed
starts afresh in a new directory). Results (per-epoch test accuracy and training
seconds) go to ``<results>/accuracy-<suite>.json``, a Markdown table and one time-to-accuracy PNG per data
set, rewritten after every run.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import tomllib

RUN_KEYS = {"id", "rule", "data", "model", "hidden", "activation", "optimizer", "lr", "epochs", "batch_size", "seed",
            "options", "paper", "note"}
PAPER_KEYS = {"test_acc", "setup", "source"}
SUITE_KEYS = {"name", "description", "defaults", "run"}
BUILTIN = {"quick": "suite_quick.toml", "full": "suite.toml", "mnist": "suite.toml"}


def _bad(where: str, key: str, value: Any, want: str) -> ValueError:
    return ValueError(f"{where}: {key} must be {want}, got {value!r}")


def _check_run(spec: dict[str, Any], where: str) -> dict[str, Any]:
    from ..rules import build_rule

    unknown = sorted(set(spec) - RUN_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(RUN_KEYS))}")
    for key in ("rule", "data", "model", "optimizer"):
        if not isinstance(spec.get(key), str) or not spec[key]:
            raise _bad(where, key, spec.get(key), "a non-empty string")
    for key in ("epochs", "batch_size"):
        v = spec.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise _bad(where, key, v, "a positive integer")
    v = spec.get("seed")
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise _bad(where, "seed", v, "a non-negative integer")
    v = spec.get("lr")
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 and math.isfinite(v)):
        raise _bad(where, "lr", v, "a positive number")
    h = spec.get("hidden")
    if h is not None and (not isinstance(h, list) or not h or any(
            isinstance(w, bool) or not isinstance(w, int) or w <= 0 for w in h)):
        raise _bad(where, "hidden", h, "a non-empty list of positive integers")
    from ..models.basic import ACTIVATIONS

    if spec["activation"] not in ACTIVATIONS:
        raise _bad(where, "activation", spec["activation"], f"one of {', '.join(sorted(ACTIVATIONS))}")
    if spec["model"] not in ("mlp", "cnn", "default"):
        raise _bad(where, "model", spec["model"], "mlp, cnn or default")
    if spec["optimizer"] not in ("sgd", "adam", "adamw"):
        raise _bad(where, "optimizer", spec["optimizer"], "sgd, adam or adamw")
    if not isinstance(spec.get("options", {}), dict):
        raise _bad(where, "options", spec.get("options"), "a table of rule options")
    paper = spec.get("paper")
    if paper is not None:
        if not isinstance(paper, dict) or set(paper) - PAPER_KEYS:
            raise _bad(where, "paper", paper, f"a table with keys {', '.join(sorted(PAPER_KEYS))}")
        acc = paper.get("test_acc")
        if acc is not None and (isinstance(acc, bool) or not isinstance(acc, (int, float)) or not 0 <= acc <= 1):
            raise _bad(where, "paper.test_acc", acc, "a fraction in [0, 1]")
    from ..data import info

    try:
        info(spec["data"])
    except Exception as e:  # noqa: BLE001 - the data module's own error names the valid sets
        raise ValueError(f"{where}: {e}") from None
    build_rule(spec["rule"], 0, spec.get("options", {}), f"{where}: options")  # unknown rule/option/value, seed
    return spec


def _run_id(spec: dict[str, Any]) -> str:
    parts = [spec["rule"], spec["data"], spec["model"]]
    if spec.get("hidden") and spec["model"] != "default":
        parts.append("x".join(str(w) for w in spec["hidden"]))
    parts.append(f"s{spec['seed']}")
    return "-".join(parts)


def load_suite(source: str | Path) -> dict[str, Any]:
    """Read and validate a suite: a path, or a built-in name (``quick``, ``full``/``mnist``).

    Returns ``{"name", "description", "path", "runs": [spec, ...]}`` with ``rule = "all"`` entries expanded
    over the registry (rules named elsewhere in the suite and rules needing non-tensor data are left out)
    and every spec complete (``id``, ``options``, ``paper``, ``note``). Errors raise ``ValueError`` naming the
    run and the bad value.
    """
    from ..rules import available_rules, rule_class

    if str(source) in BUILTIN:
        ref = resources.files("forwardlearn.bench").joinpath(BUILTIN[str(source)])
        text, path = ref.read_text(), f"forwardlearn/bench/{BUILTIN[str(source)]}"
    else:
        p = Path(source)
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such suite file (built-in suites: {', '.join(sorted(BUILTIN))})")
        text, path = p.read_text(), str(p)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML ({e})") from None
    unknown = sorted(set(raw) - SUITE_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown top-level key(s) {', '.join(unknown)}; "
                         f"valid: {', '.join(sorted(SUITE_KEYS))}")
    defaults = raw.get("defaults", {})
    entries = raw.get("run", [])
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: a suite needs at least one [[run]]")
    named = {e.get("rule") for e in entries if e.get("rule") != "all"}
    runs: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry.get("rule"), str):
            raise _bad(f"{path}: run {i + 1}", "rule", entry.get("rule"), "a rule name or 'all'")
        names = [entry["rule"]]
        if entry["rule"] == "all":
            names = []
            for name in available_rules():
                if name in named:
                    continue
                if rule_class(name).data_kind != "tensor":
                    skipped.append({"rule": name, "why": f"needs {rule_class(name).data_kind} data"})
                    continue
                names.append(name)
        for name in names:
            cls = rule_class(name)  # unknown names raise ValueError listing the valid ones
            d = cls.defaults
            spec = {"model": d.get("model", "mlp"), "hidden": d.get("hidden"), "optimizer": d.get("optimizer", "adam"),
                    "lr": d.get("lr", 1e-3), "epochs": d.get("epochs", 10), "batch_size": d.get("batch_size", 64),
                    "seed": 0, "activation": "relu"}
            if own_model(cls):
                spec["model"] = "default"
            spec.update(defaults)
            spec.update({k: v for k, v in entry.items() if k != "rule"})
            spec["rule"] = name
            runs.append(spec)
    seen: set[str] = set()
    out = []
    for spec in runs:
        where = f"{path}: run {spec.get('id') or spec.get('rule', '?')}"
        spec.setdefault("options", {})
        _check_run(spec, where)
        spec.setdefault("id", _run_id(spec))
        spec.setdefault("paper", None)
        spec.setdefault("note", "")
        spec.setdefault("hidden", None)
        if spec["id"] in seen:
            raise ValueError(f"{where}: duplicate run id {spec['id']!r}; give one of them an `id`")
        seen.add(spec["id"])
        out.append(spec)
    name = raw.get("name") or Path(path).stem
    return {"name": name, "description": raw.get("description", ""), "path": path, "runs": out, "skipped": skipped}


def with_seeds(suite: dict[str, Any], seeds: int) -> dict[str, Any]:
    """``suite`` with every run repeated over ``seeds`` seeds: the run's own seed, then seed + 1, ...

    The first copy is the run itself (same id, same directory: earlier results are reused); the others get
    the seed in their id. Every copy records its run's id as ``group``: the report shows the mean +/- sd
    of a group, the JSON keeps every seed's run."""
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be a positive integer, got {seeds!r}")
    runs = []
    for spec in suite["runs"]:
        base = spec["id"]
        for k in range(seeds):
            s = {**spec, "group": base}
            if k:
                s["seed"] = spec["seed"] + k
                auto = base == _run_id(spec)
                s["id"] = _run_id(s) if auto else f"{base}-s{s['seed']}"
            runs.append(s)
    return {**suite, "runs": runs}


def own_model(cls: Any) -> bool:
    """Whether a rule's model spec is more than ``mlp``/``cnn`` with widths (a model kind or an
    initialisation of its own): the suite then trains the rule's default model."""
    spec = cls.model_spec()
    return spec["name"] not in ("mlp", "cnn") or bool(set(spec) - {"name", "hidden"})


def _training_keys(spec: dict[str, Any]) -> dict[str, Any]:
    """What decides the training (the paper's number, the note and the seed group do not)."""
    return {k: v for k, v in spec.items() if k not in ("paper", "note", "group")}


def run_directory(work: Path, spec: dict[str, Any]) -> Path:
    """``<work>/<id>-<hash of the training setup>``: a changed setup starts afresh instead of resuming."""
    digest = hashlib.sha1(json.dumps(_training_keys(spec), sort_keys=True).encode()).hexdigest()[:8]
    return Path(work) / f"{spec['id']}-{digest}"


def _stored_history(run_dir: Path) -> list[dict[str, float]]:
    metrics = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in metrics.read_text().splitlines() if line] if metrics.exists() else []


def train_run(spec: dict[str, Any], run_dir: Path, data: tuple[Any, Any], shape: tuple[int, ...], classes: int,
              device: Any, progress: bool, eval_threads: int | None = None) -> list[dict[str, float]]:
    """Train one run into ``run_dir`` (resuming from its checkpoint); returns the per-epoch history."""
    from ..training.run import build_run

    run_dir.mkdir(parents=True, exist_ok=True)
    spec_path = run_dir / "spec.json"
    if spec_path.exists():
        old = json.loads(spec_path.read_text())
        if _training_keys(old) != _training_keys(json.loads(json.dumps(spec))):
            raise ValueError(f"{run_dir}: holds a run with a different setup; delete the directory or give the run "
                             "a new id")
    else:
        spec_path.write_text(json.dumps(spec, indent=1) + "\n")
    run = build_run({**spec, "shape": list(shape), "classes": classes}, device=device, load_data=False)
    trainer = run.trainer(out_dir=run_dir, progress=progress, eval_train=False, eval_threads=eval_threads)
    (train, test) = data
    trainer.fit(train, test, resume=True)
    return trainer.history.epochs


def run_suite(suite: dict[str, Any], results: Path, work: Path, *, device: str = "auto", threads: int | None = 1,
              eval_threads: int | None = None, data_dir: str | None = None, progress: bool = True,
              meta: dict[str, Any] | None = None, only: Sequence[str] | None = None,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) every run of ``suite``; write ``accuracy-<name>.json``/``.md`` and the PNGs into ``results``.

    ``threads`` is the torch CPU thread count of training (the timed part); ``eval_threads`` that of the
    per-epoch test evaluation, which the time axis excludes (``None``: the same as training)."""
    import torch

    from .. import data as fldata
    from ..training import resolve_device
    from .report import accuracy_markdown, plot_time_to_accuracy, write_json

    if threads is not None:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    results, work = Path(results), Path(work) / suite["name"]
    runs = suite["runs"]
    chosen = [s for s in runs if not only or s["rule"] in only or s["id"] in only]
    if not chosen:
        raise ValueError(f"no run of suite {suite['name']!r} matches {', '.join(only or [])}")
    results.mkdir(parents=True, exist_ok=True)  # an unusable results directory fails now, not after training
    cache: dict[str, Any] = {}
    out: dict[str, Any] = {"meta": meta or {}, "suite": {k: suite[k] for k in ("name", "description", "path")},
                           "runs": [], "plots": {}, "skipped": list(suite.get("skipped", []))}
    json_path = results / f"accuracy-{suite['name']}.json"

    def save() -> None:
        for d in sorted({r["spec"]["data"] for r in out["runs"] if r.get("history")}):
            out["plots"][d] = f"accuracy-{suite['name']}-{d}.png"
            plot_time_to_accuracy(out["runs"], d, results / out["plots"][d], threads)
        write_json(out, json_path)
        (results / f"accuracy-{suite['name']}.md").write_text(accuracy_markdown(out))

    t_all = time.perf_counter()
    for i, spec in enumerate(runs):
        run_dir = run_directory(work, spec)
        rec: dict[str, Any] = {"spec": spec, "status": "done"}
        if spec not in chosen:  # not run now: report what an earlier session left, if anything
            hist = _stored_history(run_dir)
            rec["status"] = "done" if len(hist) >= spec["epochs"] else ("incomplete" if hist else "not run")
            rec["history"] = hist
            accs = [e["test_acc"] for e in hist if "test_acc" in e]
            rec["final"], rec["best"] = (accs[-1], max(accs)) if accs else (None, None)
            out["runs"].append(rec)
            continue
        log(f"[{i + 1}/{len(runs)}] {spec['id']}")
        try:
            if spec["data"] not in cache:
                info = fldata.info(spec["data"])
                cache[spec["data"]] = (info, (fldata.load(spec["data"], "train", root=data_dir),
                                              fldata.load(spec["data"], "test", root=data_dir)))
            info, ds = cache[spec["data"]]
            t0 = time.perf_counter()
            hist = train_run(spec, run_dir, ds, tuple(info.shape), info.classes, dev, progress, eval_threads)
            rec["wall_seconds_this_session"] = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - a failing run is recorded, the suite goes on
            msg = str(e).splitlines()[0] if str(e) else ""
            rec.update({"status": "failed", "error": f"{type(e).__name__}: {msg}"})
            log(f"{spec['id']}: failed ({rec['error']})")
            hist = _stored_history(run_dir)
        rec["history"] = hist
        accs = [e["test_acc"] for e in hist if "test_acc" in e]
        rec["final"] = accs[-1] if accs else None
        rec["best"] = max(accs) if accs else None
        out["runs"].append(rec)
        if rec["final"] is not None:
            log(f"{spec['id']}: test acc {rec['final']:.4f} after {len(hist)} epochs, "
                f"{sum(e['seconds'] for e in hist):.1f} s of training")
        save()
    out["total_seconds_this_session"] = time.perf_counter() - t_all
    save()
    return out
