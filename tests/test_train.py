"""The training loop: history, checkpoints, exact resume (also after SIGKILL), non-finite detection."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import forwardlearn as fl
from forwardlearn.cli import main
from forwardlearn.training import CHECKPOINT, METRICS, NonFiniteError, Trainer, make_optimizer


def _trainer(out_dir, epochs, seed=0):
    torch.manual_seed(seed)
    rule = fl.get_rule("backprop", seed=seed)
    model = rule.attach(fl.models.mlp(64, [32], 10))
    opt = make_optimizer("sgd", model.parameters(), 0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
    return Trainer(model, rule, opt, scheduler=sched, epochs=epochs, batch_size=32, seed=seed, out_dir=out_dir,
                   progress=False)


def test_train_learns_digits(digits):
    (X, y), (Xt, yt) = digits
    torch.manual_seed(0)
    rule = fl.get_rule("backprop", seed=0)
    hist = fl.train(fl.models.mlp(64, [128], 10), rule, (X, y), (Xt, yt), epochs=8, progress=False)
    assert len(hist) == 8
    assert hist.final["test_acc"] >= 0.9  # backprop on digits reaches ~0.97 within 8 epochs at this size
    assert hist.column("loss")[-1] < hist.column("loss")[0]


def test_checkpoint_and_metrics_written(tmp_path, digits):
    (X, y), test = digits
    tr = _trainer(tmp_path, 2)
    tr.fit((X[:300], y[:300]), (test[0][:100], test[1][:100]))
    state = torch.load(tmp_path / CHECKPOINT, weights_only=True)  # no arbitrary pickles inside
    assert state["epoch"] == 2 and set(state) >= {"model", "optimizer", "scheduler", "rule", "rng", "config"}
    lines = (tmp_path / METRICS).read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    assert not list(tmp_path.glob("*.tmp"))


def test_resume_in_process_is_exact(tmp_path, digits):
    (X, y), _ = digits
    data = (X[:400], y[:400])
    full = _trainer(tmp_path / "full", 4)
    full.fit(data)
    part = _trainer(tmp_path / "part", 2)
    part.fit(data)
    resumed = _trainer(tmp_path / "part", 4, seed=123)  # a different seed: everything must come from the checkpoint
    resumed.fit(data, resume=True)
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    assert [r["loss"] for r in full.history.epochs] == [r["loss"] for r in resumed.history.epochs]


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, digits):
    (X, y), _ = digits
    tr = _trainer(tmp_path, 1)
    tr.fit((X[:200], y[:200]))
    good = (tmp_path / CHECKPOINT).read_bytes()
    tr2 = _trainer(tmp_path, 3)
    Xbad = X[:200].clone()
    Xbad[37] = float("nan")
    with pytest.raises(NonFiniteError, match="non-finite loss"):
        tr2.fit((Xbad, y[:200]), resume=True)
    assert (tmp_path / CHECKPOINT).read_bytes() == good
    w = tr2.model.state_dict()
    assert all(torch.isfinite(v).all() for v in w.values())


def test_trainer_rejects_bad_arguments():
    rule = fl.get_rule("backprop")
    model = fl.models.mlp(4, [3], 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="epochs"):
        Trainer(model, rule, opt, epochs=0, batch_size=4)
    with pytest.raises(ValueError, match="batch size"):
        Trainer(model, rule, opt, epochs=1, batch_size=-2)
    with pytest.raises(ValueError, match="eval_threads"):
        Trainer(model, rule, opt, epochs=1, batch_size=4, eval_threads=0)
    with pytest.raises(ValueError, match="learning rate"):
        make_optimizer("sgd", model.parameters(), -1.0)
    with pytest.raises(ValueError, match="unknown optimizer"):
        make_optimizer("lion", model.parameters(), 0.1)


def test_eval_threads_apply_to_evaluation_only(digits, one_thread):
    (X, y), test = digits
    rule = fl.get_rule("backprop")
    seen = {"grads": set(), "predict": set()}

    def recording(f, where):  # the rule's method, noting the thread count of every call
        def wrapped(*a):
            where.add(torch.get_num_threads())
            return f(*a)

        return wrapped

    for name in seen:
        setattr(rule, name, recording(getattr(rule, name), seen[name]))
    model = rule.attach(fl.models.mlp(64, [16], 10))
    tr = Trainer(model, rule, make_optimizer("sgd", model.parameters(), 0.05), epochs=2, batch_size=256,
                 progress=False, eval_threads=2)
    tr.fit((X, y), test)
    assert seen == {"grads": {1}, "predict": {2}}
    assert torch.get_num_threads() == 1  # restored after every evaluation


CLI = [sys.executable, "-m", "forwardlearn"]


def _main(capsys, *args):
    """Run the command line in this process: (exit status, stderr)."""
    try:
        rc = main(list(args))
    except SystemExit as e:  # argparse's own usage errors
        rc = e.code
    return rc, capsys.readouterr().err


def _cli(*args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, timeout=300, **kw)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["train", "--rule", "nope"], "unknown rule 'nope'"),
        (["train", "--rule", "backprop", "--data", "nodata"], "unknown data set 'nodata'"),
        (["train", "--rule", "backprop", "--model", "nosuchmodel"], "unknown model 'nosuchmodel'"),
        (["train", "--rule", "backprop", "--epochs", "0"], "--epochs must be a positive int"),
        (["train", "--rule", "backprop", "--batch-size", "-4"], "--batch-size must be a positive int"),
        (["train", "--rule", "backprop", "--hidden", "10,,x"], "--hidden must be comma-separated"),
        (["train", "--rule", "backprop", "--opt", "novalue"], "--opt takes KEY=VALUE"),
        (["train", "--rule", "backprop", "--opt", "bogus=1"], "unknown option(s) bogus"),
        (["compare", "--rules", "backprop,nope"], "unknown rule 'nope'"),
        (["data", "fetch", "nodata"], "unknown data set 'nodata'"),
    ],
)
def test_cli_bad_input_one_line_exit_2(tmp_path, capsys, args, needle):
    rc, err = _main(capsys, *args, "--out", str(tmp_path / "o")) if args[0] != "data" else _main(capsys, *args)
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert needle in lines[0] and "Traceback" not in err


def test_cli_missing_mnist_is_one_line(tmp_path):
    """Through the real console entry point: exit status 2, one line, no traceback."""
    r = _cli("train", "--rule", "backprop", "--data", "mnist", "--data-dir", str(tmp_path),
             "--out", str(tmp_path / "o"))
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "forwardlearn data fetch mnist" in r.stderr


def test_cli_refuses_to_overwrite_a_run(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--rule", "backprop", "--epochs", "1", "--quiet", "--out", str(out)]
    assert _main(capsys, *args)[0] == 0
    rc, err = _main(capsys, *args)
    assert rc == 2 and "--resume" in err


def _weights(path):
    return torch.load(path / CHECKPOINT, weights_only=True)["model"]


def test_kill_and_resume_matches_uninterrupted_run(tmp_path):
    """SIGKILL a training process mid-run, resume it, and compare with a run that was never interrupted."""
    common = ["train", "--rule", "backprop", "--hidden", "512,512", "--batch-size", "16", "--epochs", "6",
              "--optimizer", "sgd", "--lr", "0.02", "--quiet", "--seed", "3", "--threads", "1"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert _cli(*common, "--out", str(ref)).returncode == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([*CLI, *common, "--out", str(run)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    metrics = run / METRICS
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed; make the epochs longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(metrics.read_text().splitlines())
    assert 2 <= done < 6
    r = _cli(*common, "--out", str(run), "--resume")
    assert r.returncode == 0, r.stderr
    a, b = _weights(ref), _weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(metrics.read_text().splitlines()) == 6


def test_resume_refuses_changed_settings(tmp_path, capsys):
    out = tmp_path / "run"
    assert _main(capsys, "train", "--rule", "backprop", "--epochs", "1", "--quiet", "--out", str(out))[0] == 0
    rc, err = _main(capsys, "train", "--rule", "backprop", "--epochs", "2", "--quiet", "--out", str(out),
                    "--resume", "--hidden", "64")
    assert rc == 2 and "hidden" in err
    rc, err = _main(capsys, "train", "--rule", "backprop", "--epochs", "2", "--quiet", "--out", str(out),
                    "--resume", "--lr", "0.5")
    assert rc == 2 and "differ from its checkpoint: lr" in err
    rc, _ = _main(capsys, "train", "--rule", "backprop", "--epochs", "2", "--quiet", "--out", str(out), "--resume")
    assert rc == 0  # more epochs, same settings: resumes


def test_compare_backprop_table_and_plot(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--rules", "backprop", "--epochs", "3", "--quiet", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "backprop" in stdout and "cosine" in stdout
    res = json.loads((out / "compare.json").read_text())["results"][0]
    assert res["rule"] == "backprop" and res["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert res["peak_mb"] > 0 and len(res["test_acc_per_epoch"]) == 3
    assert (out / "compare.png").stat().st_size > 10_000
