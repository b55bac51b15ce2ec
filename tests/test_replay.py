"""The update log (seed, scalar, lr per step) and its bit-exact replay from the base checkpoint."""

from __future__ import annotations

import os

import pytest
import torch

from forwardlearn.cli import main
from forwardlearn.distributed import SeedScalarTrainer, UpdateLog, read_header, read_records, replay
from forwardlearn.distributed.replay import MAGIC, build_from_config, record_size


def _run(tmp, digits, epochs=1, rule_name="zo_spsa", optimizer="adam", resume=False, world=1, **opts):
    (X, y), test = digits
    torch.manual_seed(0)
    cfg = {"rule": rule_name, "rule_options": opts, "model": "mlp", "shape": [1, 8, 8], "classes": 10,
           "hidden": [16], "activation": "relu", "lr": 0.01, "optimizer": optimizer, "seed": 0}
    model, rule, opt = build_from_config(cfg)
    tr = SeedScalarTrainer(model, rule, opt, epochs=epochs, batch_size=128, seed=0, ranks=range(world), out_dir=tmp,
                           update_log=tmp / "updates.log", config=cfg, eval_train=False)
    tr.fit((X, y), test, resume=resume)
    return model, tr


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("rule_name,optimizer,world", [("zo_spsa", "adam", 1), ("forward_gradient", "sgd", 2)])
def test_replay_rebuilds_bit_identical_weights(tmp_path, digits, rule_name, optimizer, world):
    model, tr = _run(tmp_path, digits, rule_name=rule_name, optimizer=optimizer, world=world, directions=4)
    rebuilt, steps = replay(tmp_path / "base.pt", tmp_path / "updates.log")
    assert steps == tr.global_step > 0
    assert _same(rebuilt, model)
    # and the weights really moved, so equality is not vacuous
    base = torch.load(tmp_path / "base.pt", weights_only=True)["model"]
    assert any(not torch.equal(base[k], v) for k, v in model.state_dict().items())


def test_log_size_per_step_is_independent_of_the_model(tmp_path, digits):
    _, tr = _run(tmp_path, digits, directions=4)
    header, start = read_header(tmp_path / "updates.log")
    assert header["directions_per_step"] == 4 and header["rule"] == "zo_spsa"
    assert record_size(4) == 16 + 12 * 4
    assert os.path.getsize(tmp_path / "updates.log") == start + tr.global_step * record_size(4)
    steps = list(read_records(tmp_path / "updates.log"))
    assert [s for s, *_ in steps] == list(range(1, tr.global_step + 1))
    assert all(lr == pytest.approx(0.01) and len(seeds) == 4 and sc.dtype == torch.float32
               for _, lr, seeds, sc in steps)


def test_partial_replay_equals_the_shorter_run(tmp_path, digits):
    short, tr1 = _run(tmp_path / "a", digits, epochs=1, directions=4)
    _run(tmp_path / "b", digits, epochs=2, directions=4)
    rebuilt, steps = replay(tmp_path / "b" / "base.pt", tmp_path / "b" / "updates.log", steps=tr1.global_step)
    assert steps == tr1.global_step and _same(rebuilt, short)
    with pytest.raises(ValueError, match="holds only"):
        replay(tmp_path / "a" / "base.pt", tmp_path / "a" / "updates.log", steps=10_000)


def test_resumed_run_continues_the_log(tmp_path, digits):
    """One epoch, stop, resume for a second: the log continues and replays to the two-epoch weights."""
    full, _ = _run(tmp_path / "full", digits, epochs=2, directions=4)
    _run(tmp_path / "cut", digits, epochs=1, directions=4)
    # a torn tail left by a crash after the checkpoint: the resume must cut it off
    with open(tmp_path / "cut" / "updates.log", "ab") as f:
        f.write(b"\x01" * 30)
    resumed, _ = _run(tmp_path / "cut", digits, epochs=2, resume=True, directions=4)
    assert _same(resumed, full)
    rebuilt, _ = replay(tmp_path / "cut" / "base.pt", tmp_path / "cut" / "updates.log")
    assert _same(rebuilt, full)


def test_malformed_logs_are_refused(tmp_path, digits):
    _run(tmp_path, digits, directions=4)
    log = tmp_path / "updates.log"
    bad = tmp_path / "bad.log"
    bad.write_bytes(b"not a log")
    with pytest.raises(ValueError, match="not a forwardlearn update log"):
        read_header(bad)
    torn = tmp_path / "torn.log"
    torn.write_bytes(log.read_bytes()[:-5])
    with pytest.raises(ValueError, match="torn last record"):
        list(read_records(torn))
    w = UpdateLog.create(tmp_path / "x.log", {"directions_per_step": 2})
    with pytest.raises(ValueError, match="does not follow"):
        w.append(3, 0.1, [1, 2], torch.zeros(2))
    w.close()
    assert (tmp_path / "x.log").read_bytes().startswith(MAGIC)


def test_replay_command_checks_bit_identity(tmp_path, digits, capsys):
    _run(tmp_path, digits, directions=4)
    rc = main(["replay", str(tmp_path / "base.pt"), str(tmp_path / "updates.log"),
               "--check", str(tmp_path / "checkpoint.pt"), "--out", str(tmp_path / "w.pt")])
    out = capsys.readouterr().out
    assert rc == 0 and "bit-identical" in out and "64 B/step" in out
    # against weights of another run the check fails with a clear error (exit 2)
    other = tmp_path / "other"
    _run(other, digits, directions=4, epochs=2)
    rc = main(["replay", str(tmp_path / "base.pt"), str(tmp_path / "updates.log"),
               "--check", str(other / "checkpoint.pt"), "--out", str(tmp_path / "w.pt")])
    assert rc == 2 and "replayed weights differ" in capsys.readouterr().err
    assert main(["replay", str(tmp_path / "nope.pt"), str(tmp_path / "updates.log")]) == 2


def test_train_writes_the_log_into_a_folder_that_does_not_exist_yet(tmp_path, capsys):
    log = tmp_path / "logs" / "deep" / "updates.log"
    rc = main(["train", "--rule", "zo_spsa", "--data", "digits", "--epochs", "1", "--hidden", "8", "--quiet",
               "--out", str(tmp_path / "run"), "--update-log", str(log)])
    assert rc == 0, capsys.readouterr().err
    assert log.is_file() and (log.parent / "base.pt").is_file()
    rebuilt, steps = replay(log.parent / "base.pt", log)
    assert steps > 0
