"""BAFFLE against FedAvg with backprop (``forwardlearn fed``), stored as a summary with its command.

Runs ``forwardlearn fed`` with the arguments given here (its own defaults otherwise) and writes the final
test accuracy, the bytes each client uplinks per round and the per-round records of both methods::

    OMP_NUM_THREADS=1 python benchmarks/federated.py --clients 10 --rounds 100 --alpha 0.5 \\
        --json benchmarks/results/federated.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from forwardlearn.cli import main as cli


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True, help="where to write the summary")
    args, fed_args = p.parse_known_args(argv)
    if "--out" in fed_args:
        print("benchmarks/federated.py: --out is chosen here; give --json instead", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        code = cli(["fed", *fed_args, "--out", tmp])
        if code:
            return code
        payload = json.loads((Path(tmp) / "fed.json").read_text())
    payload["config"].pop("out", None)
    summary = {}
    for method, res in payload["results"].items():
        last = res["rounds"][-1]
        summary[method] = {"final_test_acc": last["test_acc"], "rounds": last["round"],
                           "uplink_bytes_per_client_round": last["uplink_bytes_per_client"],
                           "downlink_bytes_per_client_round": last["downlink_bytes_per_client"],
                           "model_bytes": res["model_bytes"]}
    command = " ".join(["forwardlearn fed", *fed_args])
    out = {"command": command, "script": " ".join(["OMP_NUM_THREADS=1 python benchmarks/federated.py", *argv]),
           "summary": summary, **payload}
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    print(f"-> {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
