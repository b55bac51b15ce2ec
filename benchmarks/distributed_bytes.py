"""Bytes on the wire and step time: seed-and-scalar exchange vs DDP backprop, same model, same processes.

    python benchmarks/distributed_bytes.py --nproc 2 --hidden 256,256 --hidden 1024,1024 --steps 30

launches itself under ``torchrun --standalone --nproc-per-node N`` (gloo on CPU, one thread per rank)
and, for every model, times ``steps`` training steps of

- ``zo_spsa`` by seed exchange (:class:`forwardlearn.distributed.SeedScalarTrainer`): every rank
  estimates ``K`` directions on its own batch, ``all_gather`` of the 12-byte-per-direction records,
  every rank applies every update;
- backprop under ``DistributedDataParallel``: forward, backward, gradient all-reduce, Adam step.

Bytes are counted twice: the payload handed to the collectives per rank per step (what the protocol
needs), and the loopback interface's transmitted bytes (``/proc/net/dev``, all ranks together,
TCP/IP headers and gloo framing included; any other loopback traffic on the machine adds to it).
Prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def lo_tx_bytes() -> int:
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == "lo":
            return int(rest.split()[8])
    return -1


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    import forwardlearn as fl
    from forwardlearn.distributed import SeedScalarTrainer, TorchExchange
    from forwardlearn.distributed.trainer import init_process_group

    torch.set_num_threads(1)
    init_process_group("cpu")
    rank, world = dist.get_rank(), dist.get_world_size()
    X, y = fl.data.load("digits", "train")
    results = []
    for hidden in args.hidden:
        widths = [int(w) for w in hidden.split(",")]
        g = torch.Generator().manual_seed(rank)
        batches = []
        for _ in range(args.steps + 2):
            idx = torch.randint(0, len(X), (args.batch_size,), generator=g)
            batches.append((X[idx], y[idx]))

        # seed-and-scalar
        torch.manual_seed(0)
        model = fl.models.mlp(64, widths, 10)
        params = sum(p.numel() for p in model.parameters())
        rule = fl.get_rule("zo_spsa", directions=args.directions, seed=0)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        ex = TorchExchange(torch.device("cpu"))
        tr = SeedScalarTrainer(model, rule, opt, epochs=1, batch_size=args.batch_size, exchange=ex,
                               checksum_every=0)
        for b in batches[:2]:
            tr.step({rank: b})
        dist.barrier()
        b0, lo0, t0 = ex.bytes_sent + ex.bytes_received, lo_tx_bytes(), time.perf_counter()
        for b in batches[2:]:
            tr.step({rank: b})
        dist.barrier()
        zo_time, zo_lo = (time.perf_counter() - t0) / args.steps, (lo_tx_bytes() - lo0) / args.steps
        zo_payload = (ex.bytes_sent + ex.bytes_received - b0) / args.steps
        tr.verify()

        # DDP backprop
        torch.manual_seed(0)
        net = DistributedDataParallel(fl.models.mlp(64, widths, 10))
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)

        def bp_step(b, net=net, opt=opt) -> None:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(b[0]), b[1]).backward()
            opt.step()

        for b in batches[:2]:
            bp_step(b)
        dist.barrier()
        lo0, t0 = lo_tx_bytes(), time.perf_counter()
        for b in batches[2:]:
            bp_step(b)
        dist.barrier()
        bp_time, bp_lo = (time.perf_counter() - t0) / args.steps, (lo_tx_bytes() - lo0) / args.steps
        # all-reduce input per rank: every gradient, float32 (the ring moves ~2 (W-1)/W of it each way)
        bp_payload = 4 * params
        results.append({
            "hidden": widths, "parameters": params, "world_size": world, "directions": args.directions,
            "batch_size_per_rank": args.batch_size, "steps": args.steps,
            "seed_scalar": {"payload_bytes_per_rank_step": zo_payload, "loopback_bytes_per_step": zo_lo,
                            "seconds_per_step": zo_time},
            "ddp_backprop": {"allreduce_bytes_per_rank_step": bp_payload, "loopback_bytes_per_step": bp_lo,
                             "seconds_per_step": bp_time},
        })
    if rank == 0:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    dist.destroy_process_group()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--hidden", action="append", default=None, help="MLP widths, repeatable (default 256,256)")
    p.add_argument("--directions", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--out", default="benchmarks/results/distributed_bytes.json")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.hidden = args.hidden or ["256,256"]
    if args.worker:
        worker(args)
        return 0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", str(args.nproc), __file__, "--worker",
           "--directions", str(args.directions), "--batch-size", str(args.batch_size), "--steps", str(args.steps),
           "--out", args.out] + [f"--hidden={h}" for h in args.hidden]
    subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    rows = json.loads(Path(args.out).read_text())
    print(f"{'model':>22} {'params':>9} | {'seed+scalar B/step':>18} {'lo B/step':>10} {'s/step':>8} | "
          f"{'DDP B/step':>11} {'lo B/step':>10} {'s/step':>8} | {'time ratio':>10}")
    for r in rows:
        z, d = r["seed_scalar"], r["ddp_backprop"]
        name = "mlp 64-" + "-".join(map(str, r["hidden"])) + "-10"
        print(f"{name:>22} {r['parameters']:>9} | {z['payload_bytes_per_rank_step']:>18.0f} "
              f"{z['loopback_bytes_per_step']:>10.0f} {z['seconds_per_step']:>8.4f} | "
              f"{d['allreduce_bytes_per_rank_step']:>11} {d['loopback_bytes_per_step']:>10.0f} "
              f"{d['seconds_per_step']:>8.4f} | {z['seconds_per_step'] / d['seconds_per_step']:>10.2f}")
    print(f"({rows[0]['world_size']} ranks, gloo on CPU, {rows[0]['directions']} directions/rank, batch "
          f"{rows[0]['batch_size_per_rank']}/rank; payload = bytes handed to the collectives per rank; lo = loopback "
          "bytes sent by all ranks together)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
