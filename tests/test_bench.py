"""The benchmark: cost measurements, memory parity, suites (resumable), and the report from stored JSON."""

import json
import sys
import time
from pathlib import Path

import pytest
import torch

import forwardlearn as fl
from forwardlearn.bench import accuracy as acc_mod
from forwardlearn.bench.accuracy import load_suite, run_suite
from forwardlearn.bench.cost import Arch, CostConfig, Job, bench_arch, checkpointed_loss, parity, peak_bytes, prepare
from forwardlearn.bench.report import END, START, regenerate
from forwardlearn.cli import main
from forwardlearn.rules import base as rules_base

# compute-bound enough that memory and time differences dominate the noise: 8 hidden layers of 256, batch 2048
DEEP = Arch("mlp", (256,) * 8, (1, 8, 8), 10)
MiB = 2**20


# --- memory parity --------------------------------------------------------------------------------
def test_parity_picks_the_fastest_configuration_within_the_rules_memory():
    cks = [{"segments": 2, "peak_bytes": 90, "time_vs_backprop": 1.2},
           {"segments": 4, "peak_bytes": 50, "time_vs_backprop": 1.4},
           {"segments": 8, "peak_bytes": 60, "time_vs_backprop": 1.3}]
    bp = {"segments": None, "peak_bytes": 100, "time_vs_backprop": 1.0}
    p = parity(65, 2.8, cks, bp)
    assert p["segments"] == 8 and p["rule_vs_checkpoint"] == pytest.approx(2.8 / 1.3)
    # a rule needing more than backprop is compared with plain backprop (segments 1: no checkpointing)
    assert parity(150, 2.0, cks, bp)["segments"] == 1
    none = parity(40, 2.0, cks, bp)
    assert none["segments"] is None and none["least_checkpoint_peak_bytes"] == 50


def test_checkpointed_step_computes_the_backprop_gradient():
    model = fl.models.mlp(64, [32, 32, 32], 10)
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    ref = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x), y), list(model.parameters()))
    for segments in (2, 3, 7):
        got = torch.autograd.grad(checkpointed_loss(model, segments, x, y), list(model.parameters()))
        for a, b in zip(ref, got):
            torch.testing.assert_close(a, b)  # recomputation is the same arithmetic: equal up to float rounding


def test_peak_memory_orders_inference_checkpointing_and_backprop():
    common = {"arch": DEEP, "batch_size": 2048, "seed": 0}
    inference = peak_bytes(Job(kind="forward", **common), threads=1)
    backprop = peak_bytes(Job(kind="rule", rule="backprop", **common), threads=1)
    ckpt = peak_bytes(Job(kind="checkpoint", segments=3, **common), threads=1)
    # backprop keeps one 2048 x 256 float tensor (2 MiB) per layer for the backward pass: 16 MiB for 8 layers;
    # inference holds about two layers' outputs (4 MiB); 3 segments keep the segment borders plus one segment's
    # activations, about half. Margins of 4 MiB leave room for allocator and RSS-counter slack (measured on
    # this machine: 3.9, 19.9 and 12.6 MiB).
    assert inference < 8 * MiB
    assert backprop > inference + 12 * MiB
    assert ckpt < backprop - 4 * MiB


@pytest.mark.skipif("zo_spsa" not in fl.available_rules(), reason="zo_spsa is not registered")
def test_fused_zeroth_order_step_costs_many_forwards():
    from forwardlearn.bench.cost import interleaved_times

    common = {"arch": DEEP, "batch_size": 512, "seed": 0}
    torch.set_num_threads(1)
    fwd, _, _ = prepare(Job(kind="forward", **common))
    step, _, _ = prepare(Job(kind="fused", rule="zo_spsa", **common))
    tf, ts = interleaved_times([fwd, step], repeats=3, warmup=1)
    # 8 central-difference directions = 16 forward passes; 4x leaves a 4-fold margin for overhead and load
    assert sorted(ts)[1] > 4 * sorted(tf)[1]


class _Broken(fl.Rule):
    name = "broken_for_bench_test"
    description = "raises"

    def grads(self, model, inputs, targets):
        raise TypeError("cannot train this model")


def test_bench_arch_covers_rules_fused_steps_baselines_and_skips(monkeypatch):
    monkeypatch.setitem(rules_base._REGISTRY, _Broken.name, _Broken)
    rules = ["backprop", _Broken.name] + [r for r in ("zo_spsa", "fa") if r in fl.available_rules()]
    # memory is measured in fresh processes (slow); the peak-memory test above covers it
    cfg = CostConfig(batch_size=32, repeats=2, warmup=1, samples=3, segments=(2, 3), memory=False)
    res = bench_arch(Arch("mlp", (32, 32), (1, 8, 8), 10), rules, cfg, progress=False, log=lambda s: None)
    names = [r["name"] for r in res["rows"]]
    assert names[0] == "backprop"
    if "zo_spsa" in rules:
        assert "zo_spsa (fused)" in names
        assert {"zo_spsa (lowrank)", "zo_spsa (lowrank, fused)"} <= set(names)
    assert res["baseline"]["rademacher_sweep_vs_forward"] > 0 and res["baseline"]["gaussian_sweep_vs_forward"] > 0
    assert [s["rule"] for s in res["skipped"]] == [_Broken.name]
    assert "TypeError: cannot train this model" in res["skipped"][0]["why"]
    assert [c["segments"] for c in res["checkpoints"]] == [2, 3]
    bp = res["rows"][0]
    assert bp["cosine"] == pytest.approx(1.0, abs=1e-6)
    for r in res["rows"]:
        assert r["time_vs_forward"] > 0 and r["time_vs_backprop"] > 0 and r["peak_bytes"] is None
        assert (r is bp) or "parity" in r
    json.dumps(res)  # JSON-ready


# --- suites ---------------------------------------------------------------------------------------
def test_builtin_suites_cover_the_registry():
    quick = load_suite("quick")
    tensor_rules = [n for n in fl.available_rules() if fl.rules.rule_class(n).data_kind == "tensor"]
    assert sorted(s["rule"] for s in quick["runs"]) == sorted(tensor_rules)
    assert all(s["data"] == "digits" for s in quick["runs"])
    assert {s["rule"] for s in quick["skipped"]} == set(fl.available_rules()) - set(tensor_rules)
    full = load_suite("full")
    assert sorted({s["rule"] for s in full["runs"]}) == sorted(tensor_rules)
    assert any(s["paper"] for s in full["runs"])


@pytest.mark.parametrize("body, needle", [
    ('rule = "backprop"\nepochs = 0', "epochs"),
    ('rule = "backprop"\nlr = -1.0', "-1.0"),
    ('rule = "no_such_rule"', "no_such_rule"),
    ('rule = "backprop"\nflavour = 1', "flavour"),
    ('rule = "backprop"\nmodel = "transformer"', "transformer"),
    ('rule = "backprop"\nactivation = "swish"', "swish"),
    ('rule = "backprop"\n[run.paper]\ntest_acc = 98.6', "98.6"),
])
def test_suite_errors_name_the_bad_value(tmp_path, body, needle):
    path = tmp_path / "s.toml"
    path.write_text(f'name = "t"\n[defaults]\ndata = "digits"\n[[run]]\n{body}\n')
    with pytest.raises(ValueError, match=needle):
        load_suite(path)


def test_duplicate_run_ids_are_refused(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('[defaults]\ndata = "digits"\n[[run]]\nrule = "backprop"\n[[run]]\nrule = "backprop"\n')
    with pytest.raises(ValueError, match="duplicate run id"):
        load_suite(path)


SUITE = """name = "tiny"
[defaults]
data = "digits"
epochs = 2
hidden = [32]
[[run]]
rule = "backprop"
[run.paper]
test_acc = 0.97
setup = "digits, 1x32"
source = "nowhere, Table 0"
"""


def _suite(tmp_path: Path) -> dict:
    (tmp_path / "tiny.toml").write_text(SUITE)
    return load_suite(tmp_path / "tiny.toml")


def test_suite_run_writes_results_and_resumes_after_an_interruption(tmp_path, monkeypatch):
    train_mod = sys.modules["forwardlearn.training.loop"]  # the module of the loop (fl.train is the function)

    suite = _suite(tmp_path)
    ref = run_suite(suite, tmp_path / "ref", tmp_path / "ref-work", progress=False, log=lambda s: None)
    done = ref["runs"][0]
    assert done["status"] == "done" and len(done["history"]) == 2
    for f in ("accuracy-tiny.json", "accuracy-tiny.md", "accuracy-tiny-digits.png"):
        assert (tmp_path / "ref" / f).stat().st_size > 0
    md = (tmp_path / "ref" / "accuracy-tiny.md").read_text()
    assert "nowhere, Table 0" in md and "97.00%" in md

    # interrupt during the evaluation of epoch 2 (epoch 1's checkpoint is on disk), then run again
    real, calls = train_mod.accuracy, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(train_mod, "accuracy", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_suite(suite, tmp_path / "res", tmp_path / "work", progress=False, log=lambda s: None)
    monkeypatch.setattr(train_mod, "accuracy", real)
    again = run_suite(suite, tmp_path / "res", tmp_path / "work", progress=False, log=lambda s: None)
    h_ref, h = done["history"], again["runs"][0]["history"]
    assert len(h) == 2
    # the resumed run restores every random stream: same accuracies as the uninterrupted run
    assert [e["test_acc"] for e in h] == [e["test_acc"] for e in h_ref]

    # a finished run is not trained again
    t0 = time.perf_counter()
    third = run_suite(suite, tmp_path / "res", tmp_path / "work", progress=False, log=lambda s: None)
    assert third["runs"][0]["history"] == h and time.perf_counter() - t0 < 20


def test_a_changed_setup_starts_afresh_and_a_foreign_run_directory_is_refused(tmp_path):
    suite = _suite(tmp_path)
    kw = {"progress": False, "log": lambda s: None}
    run_suite(suite, tmp_path / "res", tmp_path / "work", **kw)
    suite["runs"][0]["lr"] = 0.5
    out = run_suite(suite, tmp_path / "res", tmp_path / "work", **kw)
    assert out["runs"][0]["status"] == "done" and len(out["runs"][0]["history"]) == 2
    dirs = sorted((tmp_path / "work" / "tiny").iterdir())
    assert len(dirs) == 2  # the first setup's run is kept, the new one has its own directory
    # a directory holding another setup (copied by hand, say) is never resumed
    (acc_mod.run_directory(tmp_path / "work" / "tiny", suite["runs"][0]) / "spec.json").write_text(
        json.dumps({**suite["runs"][0], "lr": 0.1}))
    out = run_suite(suite, tmp_path / "res", tmp_path / "work", **kw)
    assert out["runs"][0]["status"] == "failed" and "different setup" in out["runs"][0]["error"]


def test_running_some_runs_keeps_the_others_in_the_results(tmp_path):
    (tmp_path / "two.toml").write_text('name = "two"\n[defaults]\ndata = "digits"\nepochs = 1\nhidden = [16]\n'
                                       '[[run]]\nid = "a"\nrule = "backprop"\n'
                                       '[[run]]\nid = "b"\nrule = "backprop"\nseed = 1\n')
    suite = load_suite(tmp_path / "two.toml")
    kw = {"progress": False, "log": lambda s: None}
    first = run_suite(suite, tmp_path / "res", tmp_path / "work", only=["b"], **kw)
    assert [r["status"] for r in first["runs"]] == ["not run", "done"]
    second = run_suite(suite, tmp_path / "res", tmp_path / "work", only=["a"], **kw)
    assert [r["status"] for r in second["runs"]] == ["done", "done"]
    assert second["runs"][1]["history"] == first["runs"][1]["history"]  # read back, not retrained
    stored = json.loads((tmp_path / "res" / "accuracy-two.json").read_text())
    assert [r["spec"]["id"] for r in stored["runs"]] == ["a", "b"]
    with pytest.raises(ValueError, match="no_such"):
        run_suite(suite, tmp_path / "res", tmp_path / "work", only=["no_such"], **kw)


# --- report -----------------------------------------------------------------------------------------
def test_report_regenerates_tables_plots_and_the_readme_section(tmp_path):
    suite = _suite(tmp_path)
    res_dir = tmp_path / "results"
    run_suite(suite, res_dir, tmp_path / "work", progress=False, log=lambda s: None, meta={"command": "x"})
    cost = bench_arch(Arch("mlp", (16,), (1, 8, 8), 10), ["backprop"],
                      CostConfig(batch_size=8, repeats=1, warmup=0, samples=1, memory=False, segments=(2,)),
                      progress=False)
    (res_dir / "cost.json").write_text(json.dumps({"meta": {"command": "forwardlearn bench cost"}, "config": {},
                                                   "archs": [cost], "sweep": [], "sweep_png": None}))
    (res_dir / "accuracy-tiny.md").unlink()
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nintro\n\n{START}\nold numbers\n{END}\n\nfooter\n")
    written = regenerate(res_dir, readme)
    assert (res_dir / "accuracy-tiny.md").exists() and (res_dir / "cost.md").exists()
    assert readme in written and (res_dir / "RESULTS.md") in written
    text = readme.read_text()
    assert "old numbers" not in text and text.startswith("# Title\n\nintro") and text.endswith("footer\n")
    assert "results/accuracy-tiny-digits.png" in text and "MLP 64-16-10" in text and "nowhere, Table 0" in text
    plain = tmp_path / "PLAIN.md"
    plain.write_text("no markers\n")
    with pytest.raises(ValueError, match="bench:start"):
        regenerate(res_dir, plain)


# --- command line -------------------------------------------------------------------------------------
def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["bench", "cost", "--rules", "no_such_rule", "--out", str(tmp_path)]) == 2
    assert main(["bench", "accuracy", "--suite", str(tmp_path / "missing.toml")]) == 2
    assert main(["bench", "report", "--results", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("forwardlearn: error:") for line in err)


def test_cli_cost_writes_json_markdown_and_sweep_plot(tmp_path, capsys):
    rc = main(["bench", "cost", "--rules", "backprop", "--models", "mlp", "--hidden", "16", "--batch-size", "8",
               "--repeats", "1", "--warmup", "0", "--samples", "1", "--depths", "1,2", "--widths", "8",
               "--sweep-width", "8", "--sweep-depth", "1", "--sweep-repeats", "1", "--sweep-samples", "1",
               "--no-memory", "--quiet", "--out", str(tmp_path)])
    assert rc == 0
    res = json.loads((tmp_path / "cost.json").read_text())
    assert res["meta"]["torch"] == torch.__version__
    assert res["meta"]["command"].startswith("forwardlearn bench cost --rules backprop --models mlp --hidden 16 ")
    assert [p["value"] for p in res["sweep"]] == [1, 2, 8]
    assert (tmp_path / "cost-sweep.png").stat().st_size > 0
    assert "| backprop |" in (tmp_path / "cost.md").read_text()


@pytest.mark.slow
def test_quick_suite_finishes_in_ten_minutes(tmp_path):
    t0 = time.perf_counter()
    rc = main(["bench", "accuracy", "--quick", "--quiet", "--out", str(tmp_path / "r"), "--work", str(tmp_path / "w")])
    elapsed = time.perf_counter() - t0
    assert rc == 0 and elapsed < 600
    res = json.loads((tmp_path / "r" / "accuracy-quick.json").read_text())
    assert all(r["status"] == "done" for r in res["runs"])
    assert (tmp_path / "r" / "accuracy-quick-digits.png").stat().st_size > 0
    assert acc_mod.load_suite("quick")["runs"]


def test_time_to_accuracy_counts_cpu_time_so_pauses_do_not_stretch_it():
    from forwardlearn.bench.report import epoch_seconds

    paused = {"history": [{"seconds": 1000.0, "cpu_seconds": 10.0}, {"seconds": 12.0, "cpu_seconds": 11.0}]}
    label, secs = epoch_seconds([paused], threads=1)
    assert "CPU" in label and [secs(e) for e in paused["history"]] == [10.0, 11.0]
    label, secs = epoch_seconds([paused], threads=2)
    assert "2 threads" in label and secs(paused["history"][0]) == 5.0
    old = {"history": [{"seconds": 3.0}]}  # results written before CPU time was recorded
    label, secs = epoch_seconds([paused, old], threads=1)
    assert "wall clock" in label and secs(paused["history"][0]) == 1000.0


def test_trainer_records_cpu_time_per_epoch():
    X, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    model = fl.models.mlp(4, [8], 3)
    hist = fl.train(model, fl.get_rule("backprop"), train=(X, y), epochs=2, batch_size=16, progress=False)
    for e in hist.epochs:
        assert 0 < e["cpu_seconds"] and 0 < e["seconds"]


def test_cli_accuracy_summary_tells_failed_from_not_run(tmp_path, capsys):
    (tmp_path / "two.toml").write_text(
        'name = "two"\n[defaults]\ndata = "digits"\nepochs = 1\nhidden = [8]\n'
        '[[run]]\nrule = "backprop"\n[[run]]\nrule = "fa"\n[[run]]\nrule = "dfa"\ndata = "mnist"\n')
    common = ["bench", "accuracy", "--suite", str(tmp_path / "two.toml"), "--quiet", "--out", str(tmp_path / "r"),
              "--work", str(tmp_path / "w"), "--data-dir", str(tmp_path / "empty")]
    assert main([*common, "--only", "backprop"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("1 of 3 run(s) done") and "not run: fa-digits-mlp-8-s0, dfa-mnist-mlp-8-s0" in last
    assert "failed" not in last
    assert main([*common, "--only", "dfa"]) == 1  # a run that fails (no MNIST files here): non-zero exit
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "; failed: dfa-mnist-mlp-8-s0" in last and "not run: fa-digits-mlp-8-s0" in last
    res = json.loads((tmp_path / "r" / "accuracy-two.json").read_text())
    # the table holds runs of both invocations: its command reproduces all of them, the last one is kept beside
    assert "--only" not in res["meta"]["command"] and " --only dfa " in res["meta"]["last_invocation"]
    md = (tmp_path / "r" / "accuracy-two.md").read_text()
    assert "the last one to write these results: `forwardlearn bench accuracy" in md
