"""Every verb, each kind of bad value: exit status 2, one line on stderr, no traceback, no partial file.

The verbs are discovered from ``forwardlearn.commands`` and the rules from the registry, so a new verb without a
row here fails :func:`test_every_verb_has_bad_input_cases`, and a new rule is covered by the per-rule rows.
Everything runs in this process (``forwardlearn.cli.main``; the distributed rows run ``train`` with
``--update-log``, the single-process path of seed-and-scalar training).
"""

from __future__ import annotations

import errno
import pkgutil
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from forwardlearn import commands
from forwardlearn.cli import main
from forwardlearn.distributed.replay import MAGIC
from forwardlearn.rules import available_rules, rule_class, rule_options

VERBS = sorted(m.name for m in pkgutil.iter_modules(commands.__path__) if not m.name.startswith("_"))
SMALL = ["--epochs", "1", "--hidden", "8", "--quiet"]


def distributed_main(argv: list[str]) -> int:
    """``forwardlearn train`` by seed and scalar exchange (what ``torchrun -m forwardlearn train --distributed``
    runs on each rank) with ``argv``."""
    return main(["train", *argv])


def _call(entry: Callable, argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    capsys.readouterr()
    try:
        rc = entry(argv)
    except SystemExit as e:  # argparse's usage errors
        rc = e.code
    return rc, capsys.readouterr().err


def _files(root: Path) -> dict[str, bytes]:
    if not root.exists():
        return {}
    if root.is_file():
        return {root.name: root.read_bytes()}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _assert_one_line_error(rc: int, err: str, needle: str = "") -> None:
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and lines[0].startswith(("forwardlearn: error:", "forwardlearn ",
                                                           "python -m forwardlearn")), err
    assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A finished one-epoch backprop run and a one-epoch zo_spsa run with an update log (both tiny)."""
    root = tmp_path_factory.mktemp("runs")
    torch.set_num_threads(1)
    assert main(["train", "--rule", "backprop", *SMALL, "--out", str(root / "bp")]) == 0
    assert main(["train", "--rule", "zo_spsa", *SMALL, "--batch-size", "512", "--opt", "directions=2",
                 "--update-log", str(root / "zo" / "updates.log"), "--out", str(root / "zo")]) == 0
    good = root / "bp" / "checkpoint.pt"
    bad = root / "bad"
    bad.mkdir()
    raw = good.read_bytes()
    (bad / "garbage.pt").write_bytes(bytes(range(256)) * 8)
    (bad / "truncated.pt").write_bytes(raw[: len(raw) // 2])
    (bad / "empty.pt").write_bytes(b"")
    torch.save({"weights": torch.zeros(3)}, bad / "foreign.pt")
    torch.save([1, 2, 3], bad / "list.pt")
    log = (root / "zo" / "updates.log").read_bytes()
    (bad / "truncated.log").write_bytes(log[: len(MAGIC) + 20])
    (bad / "torn.log").write_bytes(log[:-5])
    (bad / "foreign.log").write_bytes(MAGIC + b'{"rule": "zo_spsa"}\n')
    (bad / "binary.log").write_bytes(MAGIC + bytes(range(128, 256)) + b"\n")
    (bad / "notalog.log").write_bytes(raw)
    (bad / "afile").write_text("a regular file, so nothing can be created under it, even by root\n")
    return {"root": root, "bp": root / "bp", "zo": root / "zo", "bad": bad, "log": root / "zo" / "updates.log",
            "base": root / "zo" / "base.pt"}


CHECKPOINTS = ["garbage.pt", "truncated.pt", "empty.pt", "foreign.pt", "list.pt"]
LOGS = ["truncated.log", "torn.log", "foreign.log", "binary.log", "notalog.log", "foreign.pt"]


def _resume_dir(runs: dict[str, Path], tmp: Path, bad: str, source: str = "bp") -> Path:
    d = tmp / "run"
    shutil.copytree(runs[source], d)
    shutil.copy(runs["bad"] / bad, d / "checkpoint.pt")
    return d


# (id, entry, argv(runs, tmp) -> (argv, watched path), needle); entry None means forwardlearn.cli.main
Case = tuple[str, Callable | None, Callable[[dict[str, Path], Path], tuple[list[str], Path | None]], str]


def _cases() -> list[Case]:
    afile = "afile/sub"
    c: list[Case] = [
        # unknown names
        ("train-unknown-rule", None, lambda r, t: (["train", "--rule", "nope", "--out", str(t / "o")], t / "o"),
         "unknown rule 'nope'"),
        ("train-unknown-data", None, lambda r, t: (["train", "--rule", "backprop", "--data", "nodata", "--out",
                                                    str(t / "o")], t / "o"), "unknown data set 'nodata'"),
        ("compare-unknown-rule", None, lambda r, t: (["compare", "--rules", "nope", "--out", str(t / "o")], None),
         "unknown rule 'nope'"),
        ("data-unknown-set", None, lambda r, t: (["data", "fetch", "nodata"], None), "unknown data set 'nodata'"),
        ("bench-accuracy-unknown-suite", None, lambda r, t: (["bench", "accuracy", "--suite", str(t / "none.toml"),
                                                              "--out", str(t / "o")], t / "o"), "none.toml"),
        ("bench-accuracy-unknown-run", None, lambda r, t: (["bench", "accuracy", "--quick", "--only", "nope",
                                                            "--out", str(t / "o"), "--work", str(t / "w")],
                                                           t / "w"), "nope"),
        ("bench-cost-unknown-rule", None, lambda r, t: (["bench", "cost", "--rules", "nope", "--out", str(t / "o")],
                                                        t / "o"), "unknown rule 'nope'"),
        ("explain-unknown-data", None, lambda r, t: (["explain", "--data", "nodata", "--out", str(t / "o")], t / "o"),
         "unknown data set 'nodata'"),
        ("fed-unknown-rule", None, lambda r, t: (["fed", "--rule", "nope"], None), "unknown rule 'nope'"),
        ("fed-rule-without-seed-scalar", None, lambda r, t: (["fed", "--rule", "backprop"], None), "backprop"),
        ("replay-missing-files", None, lambda r, t: (["replay", str(t / "no.pt"), str(t / "no.log")], None),
         "does not exist"),
        ("rules-unknown-flag", None, lambda r, t: (["rules", "--nope"], None), "--nope"),
        ("distributed-unknown-rule", distributed_main,
         lambda r, t: (["--rule", "nope", "--update-log", str(t / "o" / "u.log"), "--out", str(t / "o")], t / "o"),
         "unknown rule 'nope'"),
        # reserved or malformed --opt
        ("train-opt-reserved-seed", None, lambda r, t: (["train", "--rule", "zo_spsa", "--opt", "seed=1", "--out",
                                                         str(t / "o")], t / "o"), "'seed' is set by --seed"),
        ("train-opt-malformed", None, lambda r, t: (["train", "--rule", "ff", "--opt", "=1", "--out", str(t / "o")],
                                                    t / "o"), "--opt takes KEY=VALUE"),
        ("fed-opt-reserved-seed", None, lambda r, t: (["fed", "--rule", "zo_spsa", "--opt", "seed=1"], None),
         "'seed' is set by --seed"),
        ("fed-opt-reserved-directions", None, lambda r, t: (["fed", "--rule", "zo_spsa", "--opt", "directions=3"],
                                                            None), "'directions' is set by --directions"),
        ("distributed-opt-reserved-seed", distributed_main,
         lambda r, t: (["--rule", "zo_spsa", "--opt", "seed=1", "--update-log", str(t / "o" / "u.log"),
                        "--out", str(t / "o")], t / "o"), "'seed' is set by --seed"),
        ("bench-accuracy-options-seed", None, lambda r, t: (["bench", "accuracy", "--suite", str(_suite(
            t, 'options = { seed = 1 }')), "--out", str(t / "o"), "--work", str(t / "w")], t / "w"), "seed"),
        # an output directory nothing can be created in (a path under a regular file stops root as well)
        ("train-out-unwritable", None, lambda r, t: (["train", "--rule", "backprop", *SMALL, "--out",
                                                      str(r["bad"] / afile)], r["bad"]), "afile"),
        ("compare-out-unwritable", None, lambda r, t: (["compare", "--rules", "backprop", "--epochs", "1", "--quiet",
                                                        "--no-memory", "--out", str(r["bad"] / afile)], r["bad"]),
         "afile"),
        ("fed-out-unwritable", None, lambda r, t: (["fed", "--rule", "zo_spsa", "--rounds", "1", "--out",
                                                    str(r["bad"] / afile)], r["bad"]), "afile"),
        ("explain-out-unwritable", None, lambda r, t: (["explain", "--data", "iris", "--epochs", "1", "--out",
                                                        str(r["bad"] / afile)], r["bad"]), "afile"),
        ("bench-accuracy-out-unwritable", None, lambda r, t: (["bench", "accuracy", "--suite", str(_suite(t)),
                                                               "--out", str(r["bad"] / afile), "--work",
                                                               str(t / "w"), "--quiet"], r["bad"]), "afile"),
        ("bench-report-out-unwritable", None, lambda r, t: (["bench", "report", "--results", str(r["bad"] / afile)],
                                                            r["bad"]), "afile"),
        ("replay-out-unwritable", None, lambda r, t: (["replay", str(r["base"]), str(r["log"]), "--out",
                                                       str(r["bad"] / afile)], r["bad"]), "afile"),
        ("distributed-out-unwritable", distributed_main,
         lambda r, t: (["--rule", "zo_spsa", *SMALL, "--update-log", str(t / "u.log"), "--out",
                        str(r["bad"] / afile)], r["bad"]), "afile"),
        # a learning rate that makes the loss non-finite: stopped before the weights or a checkpoint are touched
        ("train-nan-lr", None, lambda r, t: (["train", "--rule", "backprop", *SMALL, "--lr", "1e30", "--out",
                                              str(t / "o")], t / "o"), "non-finite"),
        ("fed-nan-lr", None, lambda r, t: (["fed", "--rule", "zo_spsa", "--rounds", "3", "--lr", "1e30", "--out",
                                            str(t / "o")], t / "o"), "rule 'zo_spsa': non-finite"),
        # an error a rule raises (here from attach) names the rule
        ("train-rule-error-names-the-rule", None, lambda r, t: (["train", "--rule", "ff", "--model", "cnn", *SMALL,
                                                                 "--out", str(t / "o")], t / "o"), "rule 'ff'"),
    ]
    for bad in CHECKPOINTS:
        c += [
            (f"train-resume-{bad}", None, lambda r, t, b=bad: (["train", "--rule", "backprop", *SMALL, "--epochs",
                                                                 "2", "--resume", "--out", str(_resume_dir(r, t, b))],
                                                                t / "run"), "checkpoint.pt"),
            (f"distributed-resume-{bad}", distributed_main,
             lambda r, t, b=bad: (["--rule", "zo_spsa", *SMALL, "--epochs", "2", "--batch-size", "512", "--opt",
                                   "directions=2", "--update-log", str(t / "run" / "updates.log"), "--resume",
                                   "--out", str(_resume_dir(r, t, b, "zo"))], t / "run"), "checkpoint.pt"),
            (f"explain-checkpoint-{bad}", None, lambda r, t, b=bad: (["explain", "--data", "iris", "--checkpoint",
                                                                       str(r["bad"] / b), "--out", str(t / "o")],
                                                                      t / "o"), bad),
            (f"replay-base-{bad}", None, lambda r, t, b=bad: (["replay", str(r["bad"] / b), str(r["log"]), "--out",
                                                               str(t / "w.pt")], t), bad),
            (f"replay-check-{bad}", None, lambda r, t, b=bad: (["replay", str(r["base"]), str(r["log"]), "--out",
                                                                str(t / "w.pt"), "--check", str(r["bad"] / b)],
                                                               t), bad),
        ]
    for bad in LOGS:
        c.append((f"replay-log-{bad}", None, lambda r, t, b=bad: (["replay", str(r["base"]), str(r["bad"] / b),
                                                                    "--out", str(t / "w.pt")], t), bad))
    for name in available_rules():
        cls = rule_class(name)
        c.append((f"train-{name}-unknown-option", None, lambda r, t, n=name: (
            ["train", "--rule", n, "--opt", "nosuch=1", "--out", str(t / "o")], t / "o"), f"rule {name!r}"))
        for opt in sorted(set(rule_options(name)) - {"seed", "loss"})[:3]:
            c.append((f"train-{name}-{opt}-bad-value", None, lambda r, t, n=name, o=opt: (
                ["train", "--rule", n, "--opt", f"{o}=[[]]", "--out", str(t / "o")], t / "o"), f"rule {name!r}"))
        if cls.data_kind != "tensor":
            c.append((f"train-{name}-wrong-data-kind", None, lambda r, t, n=name: (
                ["train", "--rule", n, "--data", "digits", "--out", str(t / "o")], t / "o"),
                f"needs {cls.data_kind} data"))
            c.append((f"distributed-{name}-wrong-data-kind", distributed_main, lambda r, t, n=name: (
                ["--rule", n, "--update-log", str(t / "o" / "u.log"), "--out", str(t / "o")], t / "o"),
                f"needs {cls.data_kind} data"))
    return c


def _suite(tmp: Path, options: str = "") -> Path:
    path = tmp / "suite.toml"
    path.write_text(f'name = "tiny"\n[[run]]\nrule = "backprop"\ndata = "digits"\nhidden = [8]\nepochs = 1\n'
                    f"{options}\n")
    return path


CASES = _cases()


def test_every_verb_has_bad_input_cases() -> None:
    covered = {case[0].split("-")[0] for case in CASES}
    assert set(VERBS) <= covered | {"distributed"}, f"verbs without bad-input cases: {set(VERBS) - covered}"


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_refuses_an_unknown_flag_in_one_line(verb: str, capsys: pytest.CaptureFixture) -> None:
    rc, err = _call(main, [verb, "--no-such-flag"], capsys)
    _assert_one_line_error(rc, err)  # (a verb with required arguments names those first)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_leaves_no_partial_file(case: Case, runs: dict[str, Path], tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture, one_thread) -> None:
    _, entry, build, needle = case
    argv, watched = build(runs, tmp_path)
    before = _files(watched) if watched is not None else {}
    rc, err = _call(entry or main, argv, capsys)
    _assert_one_line_error(rc, err, needle)
    if watched is not None:
        assert _files(watched) == before, f"files changed under {watched}"
    assert not list(tmp_path.rglob("*.tmp"))


def test_full_disk_while_checkpointing_leaves_no_partial_file(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                              monkeypatch: pytest.MonkeyPatch, one_thread) -> None:
    """The disk fills up half-way through the first checkpoint: one line, and neither checkpoint nor temp file."""
    real_save = torch.save

    def full(obj, f, *a, **kw):  # noqa: ANN001, ANN002, ANN003
        if hasattr(f, "write"):
            f.write(b"PK\x03\x04 half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", full)
    out = tmp_path / "o"
    rc, err = _call(main, ["train", "--rule", "backprop", *SMALL, "--out", str(out)], capsys)
    _assert_one_line_error(rc, err, "No space left on device")
    assert _files(out) == {}
