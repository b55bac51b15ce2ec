"""Where and how a benchmark ran (machine, CPU/GPU, torch, git commit, command line, seeds), and the atomic
JSON write every benchmark stores its results with."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["hardware", "run_meta", "write_json"]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parents[3]
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("-dirty" if dirty else "") if sha else None


def run_meta(device: str, threads: int | None, seeds: Any, command: str | None = None) -> dict[str, Any]:
    """Where and how a benchmark ran: machine, CPU/GPU, torch, git commit, command line, seeds."""
    import torch

    gpu = None
    if str(device).startswith("cuda") and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(torch.device(device))
    if command is None:
        command = " ".join(sys.argv)
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "gpu": gpu,
        "device": str(device),
        "threads": threads if threads is not None else torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "git_commit": _git_commit(),
        "command": command,
        "seeds": seeds,
    }


def hardware(meta: dict[str, Any]) -> str:
    """One line naming the hardware and software of a run."""
    where = meta.get("gpu") or f"{meta.get('cpu')} ({meta.get('cpu_count')} cores, {meta.get('threads')} thread(s))"
    sha = meta.get("git_commit") or "unknown"
    commit = sha[:12] + ("-dirty" if sha.endswith("-dirty") else "")
    return f"{where}; torch {meta.get('torch')}, Python {meta.get('python')}; commit {commit}; {meta.get('date')}"


def write_json(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)
