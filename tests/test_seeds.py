"""Seeds: `compare` and `bench accuracy` repeat every run over seeds and report mean +/- sd, keeping every seed."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from forwardlearn.bench.accuracy import load_suite, run_suite, with_seeds
from forwardlearn.bench.report import accuracy_markdown, pm
from forwardlearn.cli import main
from forwardlearn.commands.compare import mean_sd

SUITE = """
name = "tiny"
[defaults]
data = "digits"
epochs = 2
hidden = [16]
[[run]]
rule = "backprop"
[[run]]
id = "fa-named"
rule = "fa"
"""


def test_mean_sd_and_its_format() -> None:
    assert mean_sd([0.9, None, 0.8]) == (pytest.approx(0.85), pytest.approx(statistics.stdev([0.9, 0.8])))
    assert mean_sd([0.5]) == (0.5, None) and mean_sd([None]) == (None, None)
    assert pm(0.85, 0.0707, ".3f") == "0.850 ± 0.071" and pm(0.5, None, ".2f") == "0.50" and pm(None, 1, ".2f") == "-"


def test_with_seeds_keeps_the_first_run_and_names_the_others(tmp_path: Path) -> None:
    (tmp_path / "tiny.toml").write_text(SUITE)
    suite = load_suite(tmp_path / "tiny.toml")
    runs = with_seeds(suite, 3)["runs"]
    assert [(r["id"], r["seed"], r["group"]) for r in runs] == [
        ("backprop-digits-mlp-16-s0", 0, "backprop-digits-mlp-16-s0"),
        ("backprop-digits-mlp-16-s1", 1, "backprop-digits-mlp-16-s0"),
        ("backprop-digits-mlp-16-s2", 2, "backprop-digits-mlp-16-s0"),
        ("fa-named", 0, "fa-named"), ("fa-named-s1", 1, "fa-named"), ("fa-named-s2", 2, "fa-named")]
    assert {k: v for k, v in runs[0].items() if k != "group"} == suite["runs"][0]  # the same run (same directory)
    with pytest.raises(ValueError, match="seeds"):
        with_seeds(suite, 0)


def test_suite_over_seeds_reports_mean_and_sd_and_stores_every_seed(tmp_path: Path) -> None:
    (tmp_path / "tiny.toml").write_text(SUITE)
    suite = with_seeds(load_suite(tmp_path / "tiny.toml"), 2)
    out = run_suite(suite, tmp_path / "res", tmp_path / "work", progress=False, log=lambda s: None)
    stored = json.loads((tmp_path / "res" / "accuracy-tiny.json").read_text())
    assert len(stored["runs"]) == 4 and all(r["status"] == "done" for r in stored["runs"])
    finals = [r["final"] for r in out["runs"][:2]]
    assert finals[0] != finals[1]  # two seeds, two different runs
    md = accuracy_markdown(stored)
    row = next(line for line in md.splitlines() if line.startswith("| backprop-digits-mlp-16-s0 "))
    m, sd = statistics.fmean(finals), statistics.stdev(finals)
    assert f"{100 * m:.2f}% ± {100 * sd:.2f}" in row and "mean ± sd, 2 seeds" in md
    assert "fa-named-s1" not in md  # one row per seed group


def test_compare_over_seeds_writes_every_seed(tmp_path: Path, capsys) -> None:
    out = tmp_path / "cmp"
    rc = main(["compare", "--rules", "backprop,ff", "--epochs", "1", "--seeds", "2", "--no-memory", "--quiet",
               "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "compare.json").read_text())
    rows = {r["rule"]: r for r in res["results"]}
    for r in rows.values():
        accs = [s["test_acc"] for s in r["per_seed"]]
        assert [s["seed"] for s in r["per_seed"]] == [0, 1] == r["seeds"]
        assert r["test_acc"] == pytest.approx(statistics.fmean(accs))
        assert r["test_acc_sd"] == pytest.approx(statistics.stdev(accs))
    # backprop's own update is the exact gradient; ff leaves the output layer untrained: no cosine
    assert rows["backprop"]["cosine"] == pytest.approx(1.0, abs=1e-6) and rows["ff"]["cosine"] is None
    assert "--seeds 2" in res["meta"]["command"] and "± " in (out / "compare.md").read_text()
