"""Rule x architecture table on digits: MLP, CNN, residual CNN + BatchNorm, transformer encoder.

    python benchmarks/architectures.py --threads 1
    python benchmarks/architectures.py --threads 1 --rules ulr --models rescnn --update   # rerun some cells

Writes ``benchmarks/results/architectures.json`` and ``architectures.md`` (the table the README includes);
see :mod:`forwardlearn.bench.architectures` for the budget and the settings of every rule.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from forwardlearn.bench.architectures import MODELS, SETTINGS, markdown, merge, run_table
from forwardlearn.bench.report import hardware, run_meta, write_json
from forwardlearn.rules import available_rules


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rules", nargs="*", default=[r for r in SETTINGS if r in available_rules()]
                   + [r for r in available_rules() if r not in SETTINGS])
    p.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--update", action="store_true", help="replace only these cells in the stored JSON, keep the rest")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    seeds = list(range(a.seeds))
    result = run_table(a.rules, a.models, seeds, log=lambda s: print(s, flush=True))
    result["meta"] = run_meta("cpu", a.threads, seeds, "python benchmarks/architectures.py " + " ".join(sys.argv[1:]))
    if a.update and (a.out / "architectures.json").exists():
        result = merge(json.loads((a.out / "architectures.json").read_text()), result)
    write_json(result, a.out / "architectures.json")
    md = markdown(result, hardware(result["meta"]), result["meta"]["command"])
    (a.out / "architectures.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
