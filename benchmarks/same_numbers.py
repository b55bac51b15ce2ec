"""Compare a rerun of ``forwardlearn compare`` or ``forwardlearn bench accuracy`` with a stored result, row by row.

    python benchmarks/same_numbers.py benchmarks/results/compare-digits.json runs/compare-digits/compare.json
    python benchmarks/same_numbers.py benchmarks/results/accuracy-quick.json /tmp/acc/accuracy-quick.json

The same seeds must give the same numbers: per row (a rule of ``compare``, a run of ``bench accuracy``) the
seed-determined fields (test accuracy per epoch and per seed, losses, cosine to the true gradient) are
compared exactly. Time and peak memory are measurements of the machine, not of the seeds; they are left out.
Prints ``same`` or ``moved`` (with the fields that differ) for every row in both files, and the rows only one
has (a rerun of some rules only); exit status 1 when a row moved or none is common, 2 on unreadable input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def compare_rows(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``forwardlearn compare``: one row per rule."""
    keep = ("test_acc", "test_acc_sd", "best_test_acc", "test_acc_per_epoch", "cosine", "cosine_sd")
    rows = {}
    for r in result["results"]:
        row = {k: r.get(k) for k in keep}
        row["per_seed"] = [{k: s.get(k) for k in ("seed", "test_acc", "best_test_acc", "test_acc_per_epoch", "cosine")}
                           for s in r.get("per_seed", [])]
        rows[r["rule"]] = row
    return rows


def accuracy_rows(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``forwardlearn bench accuracy``: one row per run (a rule, a setup and a seed) that ran (``--only`` lists
    the others as ``not run``)."""
    return {r["spec"]["id"]: {"status": r.get("status"), "final": r.get("final"), "best": r.get("best"),
                              "test_acc": [e.get("test_acc") for e in r.get("history") or []],
                              "loss": [e.get("loss") for e in r.get("history") or []]}
            for r in result["runs"] if r.get("status") != "not run"}


def rows_of(path: Path) -> dict[str, dict[str, Any]]:
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from e
    if "results" in result:
        return compare_rows(result)
    if "runs" in result:
        return accuracy_rows(result)
    raise ValueError(f"{path}: neither a `forwardlearn compare` nor a `bench accuracy` result")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("stored", type=Path)
    p.add_argument("rerun", type=Path)
    args = p.parse_args(argv)
    try:
        old, new = rows_of(args.stored), rows_of(args.rerun)
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"same_numbers: {e}", file=sys.stderr)
        return 2
    common, moved_rows = sorted(old.keys() & new.keys()), 0
    for name in sorted(old.keys() ^ new.keys()):
        print(f"only in {args.stored if name in old else args.rerun}: {name}")
    for name in common:
        moved = [k for k in old[name] if old[name][k] != new[name].get(k)]
        print(f"{'moved' if moved else 'same'}  {name}" + (f": {', '.join(moved)}" if moved else ""))
        moved_rows += bool(moved)
    print(f"{len(common) - moved_rows} of {len(common)} common rows the same, {moved_rows} moved")
    return 1 if moved_rows or not common else 0

if __name__ == "__main__":
    sys.exit(main())
