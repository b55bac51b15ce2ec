"""Seed-and-scalar data-parallel training: wire format, validation, checksums, and real torchrun runs.

The multi-process checks share ONE torchrun launch (2 gloo ranks on localhost, ``--max-restarts 1``):
this file is also the worker script. In that launch the worker runs, in order, (1) a normal run with
an update log, (2) a run where rank 1 sends a NaN scalar, (3) a run where rank 1's weights drift by one
ulp, (4) a run whose rank 1 SIGKILLs itself mid-epoch; torchrun then restarts both workers, which skip
the finished scenarios and resume (4) from its last checkpoint.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import forwardlearn as fl
from forwardlearn.distributed import ExchangeError, SeedScalarTrainer, checksum, record_bytes, stream_seed
from forwardlearn.distributed.wire import compare_checksums, decode, encode, validate

TORCHRUN = Path(sys.executable).with_name("torchrun")
COMMON = ["--rule", "zo_spsa", "--opt", "directions=8", "--hidden", "16", "--epochs", "2", "--batch-size", "64",
          "--lr", "0.01", "--optimizer", "adam", "--seed", "3", "--threads", "1", "--quiet", "--distributed",
          "--checksum-every", "5"]


# --- wire format and validation (no processes) -------------------------------------------------------


def _records(k: int = 3, world: int = 2, step: int = 7):
    bufs = [encode(step, [stream_seed(1, step, r) % 2**62 + i for i in range(k)], torch.randn(k, dtype=torch.float64),
                   0.5) for r in range(world)]
    return bufs, [decode(b, k, r) for r, b in enumerate(bufs)]


def test_record_is_12_bytes_per_direction_plus_header():
    bufs, recs = _records(k=5)
    assert bufs[0].numel() == record_bytes(5) == 16 + 12 * 5
    assert recs[1].rank == 1 and recs[1].step == 7 and len(recs[1].seeds) == 5
    validate(recs, 7)  # a well-formed step passes


def test_validation_names_the_offending_rank():
    k = 4
    good = encode(3, [1, 2, 3, 4], torch.ones(k), 0.1)
    nan = encode(3, [1, 2, 3, 4], torch.tensor([1.0, float("nan"), 0.0, 0.0]), 0.1)
    with pytest.raises(ExchangeError, match=r"rank 1 sent a non-finite scalar \(nan\) for direction 1 at step 3"):
        validate([decode(good, k, 0), decode(nan, k, 1)], 3)
    inf = encode(3, [1, 2, 3, 4], torch.tensor([float("inf"), 0, 0, 0]), 0.1)
    with pytest.raises(ExchangeError, match="rank 0 sent a non-finite scalar"):
        validate([decode(inf, k, 0), decode(good, k, 1)], 3)
    big = encode(3, [1, 2, 3, 4], torch.tensor([0, 0, 5e7, 0]), 0.1)
    with pytest.raises(ExchangeError, match="rank 1 sent an out-of-range scalar"):
        validate([decode(good, k, 0), decode(big, k, 1)], 3, max_scalar=1e6)
    late = encode(2, [1, 2, 3, 4], torch.ones(k), 0.1)
    with pytest.raises(ExchangeError, match="rank 1 sent a record for step 2 while the run is at step 3"):
        validate([decode(good, k, 0), decode(late, k, 1)], 3)
    neg = encode(3, [1, -5, 3, 4], torch.ones(k), 0.1)
    with pytest.raises(ExchangeError, match="rank 1 sent a malformed seed -5"):
        validate([decode(good, k, 0), decode(neg, k, 1)], 3)
    failed = encode(3, [0] * k, torch.zeros(k), 0.0, status=1)
    with pytest.raises(ExchangeError, match="rank 1 reported a failure"):
        validate([decode(good, k, 0), decode(failed, k, 1)], 3)
    with pytest.raises(ExchangeError, match="rank 1 sent a malformed record"):
        decode(good[:-3], k, 1)


def test_checksum_catches_one_ulp_and_names_the_rank():
    torch.manual_seed(0)
    m = fl.models.mlp(64, [16], 10)
    a = checksum(m)
    with torch.no_grad():
        w = m[1].weight.view(-1)
        w[7] = torch.nextafter(w[7], w[7] + 1)
    b = checksum(m)
    assert not torch.equal(a, b)
    compare_checksums([a, a.clone()], 4)
    with pytest.raises(ExchangeError, match="parameters differ across ranks at step 4: rank 1"):
        compare_checksums([a, b], 4)


def test_stream_seeds_differ_by_rank_and_step():
    seen = {stream_seed(0, s, r) for s in range(50) for r in range(4)}
    assert len(seen) == 200 and all(0 <= s < 2**63 for s in seen)


# --- serial emulation (no processes) -------------------------------------------------------------------


def _emulated(rule_name: str, world: int, steps_data, hidden=(16,), **opts):
    torch.manual_seed(0)
    model = fl.models.mlp(64, list(hidden), 10)
    rule = fl.get_rule(rule_name, seed=0, **opts)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    tr = SeedScalarTrainer(model, rule, opt, epochs=1, batch_size=16, seed=5, ranks=range(world), checksum_every=1)
    for batches in steps_data:
        tr.step(batches)
    return model, tr


@pytest.mark.parametrize("rule_name,opts,restore", [
    ("zo_spsa", {}, True),
    ("forward_gradient", {}, True),
    # the low-rank forwards never write a weight: bit for bit even without restoring the weights by hand
    ("zo_spsa", {"perturbation": "lowrank"}, False),
])
def test_step_is_the_mean_over_all_ranks_of_seeded_estimates(digits, rule_name, opts, restore):
    """A step equals, by hand: every rank estimates with its own stream seed on its own batch, scalars
    rounded to float32 (the wire), then one apply of all seeds and one Adam step -- bit for bit."""
    (X, y), _ = digits
    world = 2
    steps = [{r: (X[32 * s + 16 * r: 32 * s + 16 * r + 16], y[32 * s + 16 * r: 32 * s + 16 * r + 16])
              for r in range(world)} for s in range(2)]
    model, _ = _emulated(rule_name, world, steps, directions=3, **opts)

    torch.manual_seed(0)
    ref = fl.models.mlp(64, [16], 10)
    init = [p.detach().clone() for p in ref.parameters()]
    rule = fl.get_rule(rule_name, seed=0, directions=3, **opts)
    opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    for s, batches in enumerate(steps, start=1):
        seeds, scalars = [], []
        snap = [p.detach().clone() for p in ref.parameters()]
        for r in range(world):
            rule.generator("cpu").manual_seed(stream_seed(5, s, r))
            sd, sc, _ = rule.estimate(ref, *batches[r])
            if restore:
                with torch.no_grad():
                    for p, q in zip(ref.parameters(), snap):
                        p.copy_(q)
            seeds += sd
            scalars.append(sc.to(torch.float32))
        opt.zero_grad()
        rule.apply(ref, seeds, torch.cat(scalars).to(torch.float64))
        opt.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), init))  # the steps moved the weights


def test_wire_bytes_do_not_depend_on_the_model_size():
    small = SeedScalarTrainer(fl.models.mlp(64, [8], 10), fl.get_rule("zo_spsa", seed=0, directions=4),
                              torch.optim.SGD(fl.models.mlp(64, [8], 10).parameters(), lr=0.1),
                              epochs=1, batch_size=8, ranks=range(3))
    big_model = fl.models.mlp(64, [1024, 1024], 10)
    big = SeedScalarTrainer(big_model, fl.get_rule("zo_spsa", seed=0, directions=4),
                            torch.optim.SGD(big_model.parameters(), lr=0.1), epochs=1, batch_size=8, ranks=range(3))
    assert small.wire_bytes_per_step == big.wire_bytes_per_step == 3 * (16 + 12 * 4)


def test_rule_without_seed_api_is_refused():
    m = fl.models.mlp(64, [8], 10)
    with pytest.raises(ValueError, match="no seed-and-scalar API"):
        SeedScalarTrainer(m, fl.get_rule("backprop"), torch.optim.SGD(m.parameters(), lr=0.1), epochs=1, batch_size=8)


def test_distributed_flag_outside_torchrun_is_a_clear_error(tmp_path, monkeypatch):
    from forwardlearn.cli import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert main(["train", *COMMON, "--out", str(tmp_path / "x")]) == 2


# --- one torchrun launch for the multi-process checks ----------------------------------------------------


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "--max-restarts", "1",
           "--monitor-interval", "0.2", __file__, str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    (out / "torchrun.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, f"see {out / 'torchrun.log'}: " + proc.stderr[-3000:]
    return out


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_two_ranks_equal_one_process_running_the_same_seeds_serially(launched):
    from forwardlearn.cli import build_parser

    args = build_parser().parse_args(["train", *[a for a in COMMON if a != "--distributed"], "--out",
                                      str(launched / "x")])
    (X, y), test = fl.data.load("digits"), fl.data.load("digits", "test")
    torch.manual_seed(args.seed)
    rule = fl.get_rule("zo_spsa", seed=args.seed, directions=8)
    model = fl.models.build("mlp", (1, 8, 8), 10, [16])
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    SeedScalarTrainer(model, rule, opt, epochs=2, batch_size=64, seed=args.seed, ranks=range(2)).fit((X, y), test)
    dist = _weights(launched / "normal" / "checkpoint.pt")
    for k, v in model.state_dict().items():
        assert torch.equal(v, dist[k]), k


def test_killed_rank_restarts_from_checkpoint_with_identical_weights(launched):
    attempts = sorted(p.name for p in launched.glob("attempt-*"))
    assert "attempt-1-rank0" in attempts and "attempt-1-rank1" in attempts  # torchrun really restarted
    a, b = _weights(launched / "normal" / "checkpoint.pt"), _weights(launched / "kill" / "checkpoint.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state = torch.load(launched / "kill" / "checkpoint.pt", weights_only=True)
    normal = torch.load(launched / "normal" / "checkpoint.pt", weights_only=True)
    assert state["global_step"] == normal["global_step"] == state["strategy"]["log_records"]  # none lost or repeated
    from forwardlearn.distributed import replay

    model, steps = replay(launched / "kill" / "base.pt", launched / "kill" / "updates.log")
    assert steps == state["global_step"]
    assert all(torch.equal(v, a[k]) for k, v in model.state_dict().items())


def test_replay_of_the_two_rank_log_is_bit_identical(launched):
    from forwardlearn.distributed import read_header, replay

    header, _ = read_header(launched / "normal" / "updates.log")
    assert header["world_size"] == 2 and header["directions_per_step"] == 2 * 8
    model, _ = replay(launched / "normal" / "base.pt", launched / "normal" / "updates.log")
    ref = _weights(launched / "normal" / "checkpoint.pt")
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())


def test_bytes_per_step_are_world_times_directions_times_12(launched):
    import json

    final = json.loads((launched / "normal" / "summary.json").read_text())["final"]
    assert final["wire_bytes_per_step"] == 2 * (16 + 12 * 8)
    # measured per rank: its own record out, the other rank's in, plus a 16-byte checksum gather every 5 steps
    assert 2 * (16 + 12 * 8) <= final["measured_bytes_per_step"] <= 2 * (16 + 12 * 8) + 2 * 16


def test_nonfinite_scalar_is_rejected_naming_the_rank(launched):
    for r in (0, 1):
        msg = (launched / f"nonfinite-rank{r}.txt").read_text()
        assert "rank 1 sent a non-finite scalar (nan)" in msg and "at step 4" in msg, msg


def test_checksum_mismatch_stops_the_run(launched):
    for r in (0, 1):
        msg = (launched / f"desync-rank{r}.txt").read_text()
        assert "parameters differ across ranks at step 5: rank 1" in msg, msg


def test_process_group_is_freed_when_destroyed(launched):
    if not os.path.isdir("/proc/self/task"):
        pytest.skip("counts threads through /proc")
    for r in (0, 1):
        before, after = map(int, (launched / f"threads-rank{r}.txt").read_text().split())
        assert after <= before, f"rank {r}: {after} threads after destroy_process_group, {before} before init"


# --- the worker -------------------------------------------------------------------------------------------


def _threads() -> int:
    return len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else 0


def _worker(out: Path) -> None:
    import torch.distributed as dist

    from forwardlearn.cli import build_parser
    from forwardlearn.commands.train import run
    from forwardlearn.distributed.trainer import init_process_group

    def main(argv: list[str]) -> int:
        from forwardlearn.cli import main as cli_main

        return cli_main(["train", *argv])

    threads_before = _threads()
    init_process_group("cpu")
    rank = dist.get_rank()
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    (out / f"attempt-{attempt}-rank{rank}").touch()

    def done(name: str) -> bool:
        return (out / f"{name}.done").exists()

    def finish(name: str) -> None:
        dist.barrier()
        if rank == 0:
            (out / f"{name}.done").touch()

    if not done("normal"):
        assert main(COMMON + ["--out", str(out / "normal"), "--update-log", str(out / "normal" / "updates.log")]) == 0
        finish("normal")
    for name, flag in (("nonfinite", "--inject-nonfinite=1:4"), ("desync", "--inject-desync=1:3")):
        if done(name):
            continue
        args = build_parser().parse_args(["train", *COMMON, "--out", str(out / name), flag])
        try:
            run(args)
            msg = "no error"
        except ExchangeError as e:
            msg = str(e)
        (out / f"{name}-rank{rank}.txt").write_text(msg)
        finish(name)
    # rank 1 dies at the start of step 19 (epoch 2, after a checkpoint at step 15); torchrun restarts both
    rc = main(COMMON + ["--out", str(out / "kill"), "--update-log", str(out / "kill" / "updates.log"),
                        "--checkpoint-every", "5", "--inject-kill", "1:19"])
    if rc:  # the survivor of the kill: its collective failed; exit so that torchrun restarts both workers
        sys.exit(rc)
    dist.destroy_process_group()
    # gloo's worker threads must be gone now: a group that outlives destroy_process_group() can abort the
    # interpreter at exit (a torch module imported after init captures it in default arguments)
    (out / f"threads-rank{rank}.txt").write_text(f"{threads_before} {_threads()}")


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
