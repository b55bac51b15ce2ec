"""``forwardlearn finetune`` end to end on a tiny random BERT and a fake corpus; one slow test on the real MiniLM."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from forwardlearn.cli import main  # noqa: E402
from forwardlearn.data import spam_assassin as sa  # noqa: E402
from hf_fixtures import fake_messages  # noqa: E402


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    root = tmp_path / "data"
    monkeypatch.setattr(sa, "EXPECTED", {**sa.EXPECTED, **fake_messages(root)})
    return root


def _args(tiny_dir, corpus, out, *extra: str) -> list[str]:
    return ["finetune", "--model", str(tiny_dir), "--data-dir", str(corpus), "--out", str(out), "--quiet",
            "--batch-size", "8", "--max-length", "12", *extra]


@pytest.mark.parametrize("extra, message", [
    (["--rule", "zo_spsa", "--params", "bias"], "unknown --params 'bias'"),
    (["--rule", "ff"], "rule 'ff' cannot take mapping inputs"),
    (["--rule", "backprop", "--step", "fused"], "has no fused step"),
    (["--rule", "forward_gradient", "--attention", "sdpa"], "use --attention eager"),
    (["--rule", "backprop", "--max-length", "100"], "longer than the model takes"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tiny_dir, corpus, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    assert main([*_args(tiny_dir, corpus, out), "--steps", "2", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()


def test_not_a_model_directory_and_hub_names_are_refused(corpus, tmp_path, capsys):
    for model, message in ((str(tmp_path), "not a Hugging Face model directory"),
                           ("bert-base-uncased", "loading is offline")):
        assert main(_args(model, corpus, tmp_path / "run", "--rule", "backprop", "--steps", "1")) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("rule, params", [("zo_spsa", "full"), ("forward_gradient", "lora"), ("backprop", "head")])
def test_finetune_writes_records_reports_and_resumes_exactly(tiny_dir, corpus, tmp_path, rule, params):
    pytest.importorskip("forwardlearn.training")
    full, split = tmp_path / "full", tmp_path / "split"
    common = ["--rule", rule, "--params", params, "--eval-every", "2", "--lr", "1e-2"]
    assert main([*_args(tiny_dir, corpus, full), *common, "--steps", "6"]) == 0
    summary = json.loads((full / "summary.json").read_text())
    assert [r["step"] for r in summary["records"]] == [2, 4, 6]
    assert all(0 <= r["test_acc"] <= 1 and "hard_ham_acc" in r for r in summary["records"])
    assert (full / "accuracy.png").stat().st_size > 0 and "| 6 |" in (full / "summary.md").read_text()
    # 4 steps, then resumed to 6: the same weights as 6 in one go
    assert main([*_args(tiny_dir, corpus, split), *common, "--steps", "4"]) == 0
    # resumed at its last checkpoint (as after an interrupted run): nothing to train, the last record is complete
    assert main([*_args(tiny_dir, corpus, split), *common, "--steps", "4", "--resume"]) == 0
    last = json.loads((split / "summary.json").read_text())["records"][-1]
    assert last["step"] == 4 and {"test_loss", "hard_ham_acc"} <= last.keys()
    assert main([*_args(tiny_dir, corpus, split), *common, "--steps", "6", "--resume"]) == 0
    a = torch.load(full / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(split / "checkpoint.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_changed_settings_is_refused(tiny_dir, corpus, tmp_path, capsys):
    pytest.importorskip("forwardlearn.training")
    out = tmp_path / "run"
    assert main([*_args(tiny_dir, corpus, out), "--rule", "backprop", "--params", "head", "--steps", "2"]) == 0
    assert main([*_args(tiny_dir, corpus, out), "--rule", "backprop", "--params", "head", "--steps", "2"]) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err
    assert main([*_args(tiny_dir, corpus, out), "--rule", "backprop", "--params", "head", "--steps", "4",
                 "--lr", "0.5", "--resume"]) == 2
    assert "differ from its checkpoint: lr" in capsys.readouterr().err


def test_zo_full_finetuning_uses_the_fused_step_without_grad_buffers(tiny_dir, corpus, tmp_path):
    pytest.importorskip("forwardlearn.training")
    from forwardlearn import finetune as ft

    prep = ft.prepare(str(tiny_dir), rule="zo_spsa", params="full", batch_size=8, max_length=12,
                      data_dir=corpus)
    assert prep.config["step"] == "fused"
    ft.finetune(prep, steps=3, progress=False)
    assert all(p.grad is None for p in prep.model.parameters())


def test_validation_split_is_held_out_of_the_training_messages(tiny_dir, corpus, tmp_path, capsys):
    """``val_size``: the evaluation set is drawn from the training split (stratified), removed from training, and
    not the test split; the records carry the evaluation loss."""
    pytest.importorskip("forwardlearn.training")
    from forwardlearn import finetune as ft
    from forwardlearn.models import hf

    train = sa.load_split("train", corpus)
    prep = ft.prepare(str(tiny_dir), rule="backprop", params="head", batch_size=8, max_length=12,
                      data_dir=corpus, val_size=10, head="probe", probe_train=16)
    n_train, n_val = len(prep.train[1]), len(prep.test[1])
    assert prep.config["eval_split"] == "validation" and prep.config["val_size"] == n_val
    assert prep.config["test_size"] is None
    # per group round(share * n): 5 groups, each off by at most 1/2
    assert abs(n_val - 10) <= 2 and n_train + n_val == len(train)
    assert set(prep.test_groups) == set(train.groups)  # stratified: every group has validation messages
    # the validation and training token rows together are exactly the training split's (as multisets)
    ids = hf.tokenize(hf.load_tokenizer(tiny_dir), train.texts, 12)["input_ids"]
    rows = sorted(map(tuple, torch.cat([prep.train[0]["input_ids"], prep.test[0]["input_ids"]]).tolist()))
    assert rows == sorted(map(tuple, ids.tolist()))
    s = ft.finetune(prep, steps=2, progress=False)
    assert s["start"]["test_loss"] > 0 and all(r["test_loss"] > 0 for r in s["records"])
    out = tmp_path / "run"
    capsys.readouterr()
    assert main([*_args(tiny_dir, corpus, out), "--rule", "backprop", "--steps", "1", "--val-size", "1000"]) == 2
    err = capsys.readouterr().err
    assert "val_size must be between 1 and" in err and err.count("\n") == 1 and not out.exists()


def test_sweep_choice_is_the_lowest_validation_loss_and_its_table_marks_it():
    from forwardlearn.bench.finetune import best_setting, sweep_markdown

    def run(lr: float, loss: float, acc: float, directions: int = 1) -> dict:
        return {"row": "zo_spsa fused, full", "lr": lr, "directions": directions, "command": "python sweep",
                "config": {"val_size": 200, "max_length": 32, "batch_size": 16},
                "records": [{"step": 0, "test_acc": 0.9, "test_loss": 0.3},
                            {"step": 100, "seconds": 60.0, "test_acc": acc, "test_loss": loss}]}

    res = {"sweep": {"a": run(1e-5, 0.29, 0.95), "b": run(1e-4, 0.20, 0.91), "c": run(1e-3, 0.9, 0.5)}}
    assert best_setting(res, "zo_spsa fused, full") == {"lr": 1e-4, "directions": 1, "val_size": 200}
    assert best_setting(res, "forward_gradient, full") is None
    md = sweep_markdown(res)
    assert md.count("(chosen)") == 1 and "| zo_spsa fused, full (chosen) | 0.0001 | 1 | 100 | 1.0 |" in md
    assert sweep_markdown({}) == ""


def test_benchmark_processes_sharing_a_results_file_keep_each_others_rows(tmp_path, monkeypatch):
    """``benchmarks/finetune_minilm.py``'s ``write``: each process replaces only the rows it made, takes the rest
    from the file as it is, and keeps adding to the dicts its caller holds."""
    import argparse
    import importlib.util
    from pathlib import Path

    from forwardlearn import finetune as ft

    path = Path(__file__).parents[1] / "benchmarks" / "finetune_minilm.py"
    spec = importlib.util.spec_from_file_location("finetune_minilm_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "markdown", lambda results: "")
    monkeypatch.setattr(ft, "plot_accuracy", lambda *a, **k: None)
    base = tmp_path / "res"
    stale = {"accuracy": {"A": {"records": ["old"]}, "B": {"records": ["old"]}}, "probe": {"test_acc": 0.1}}
    base.with_suffix(".json").write_text(json.dumps(stale))
    one, two = json.loads(json.dumps(stale)), json.loads(json.dumps(stale))
    args_one = argparse.Namespace(results=str(base), own={("accuracy", "A"), "probe"})
    args_two = argparse.Namespace(results=str(base), own={("accuracy", "B")})
    held = one["accuracy"]  # what the caller keeps adding rows to
    held["A"], one["probe"] = {"records": ["new A"]}, {"test_acc": 0.9}
    bench.write(one, args_one)
    two["accuracy"]["B"] = {"records": ["new B"]}
    bench.write(two, args_two)  # its stale A and probe, loaded at its start, give way to the file's
    held["C"] = {"records": ["new C"]}
    args_one.own.add(("accuracy", "C"))
    bench.write(one, args_one)
    stored = json.loads(base.with_suffix(".json").read_text())
    assert stored["accuracy"] == {"A": {"records": ["new A"]}, "B": {"records": ["new B"]},
                                  "C": {"records": ["new C"]}}
    assert stored["probe"] == {"test_acc": 0.9}


@pytest.mark.slow
def test_real_minilm_finetunes_a_few_steps_with_every_rule(tmp_path):
    """The bundled MiniLM on the real corpus (needs `forwardlearn data fetch spam-assassin`): a few steps of each
    rule run and evaluate; 20 backprop steps from the random head raise the test accuracy and lower the loss."""
    pytest.importorskip("forwardlearn.training")
    from forwardlearn import finetune as ft

    try:
        sa.read_messages(__import__("forwardlearn").data.data_dir())
    except sa.DataError as e:
        pytest.skip(str(e))
    torch.set_num_threads(2)
    for rule, params in (("zo_spsa", "full"), ("forward_gradient", "lora")):
        prep = ft.prepare("minilm", rule=rule, params=params, max_length=32, test_size=32)
        s = ft.finetune(prep, steps=2, progress=False)
        assert 0 <= s["final"]["test_acc"] <= 1
    prep = ft.prepare("minilm", rule="backprop", params="full", max_length=32, test_size=64)
    s = ft.finetune(prep, steps=20, eval_every=10, progress=False, out=tmp_path / "bp")
    # measured (seed 0): test accuracy 0.53 -> 0.77, mean loss 0.64 (steps 1-10) -> 0.47 (steps 11-20)
    assert s["final"]["test_acc"] >= s["start"]["test_acc"] + 0.15
    assert s["records"][1]["loss"] < s["records"][0]["loss"] - 0.05


def test_fl_train_takes_token_mappings(tiny_dir):
    pytest.importorskip("forwardlearn.training")
    import forwardlearn as fl
    from forwardlearn.models import hf

    tok, model = hf.load_tokenizer(tiny_dir), hf.load_classifier(tiny_dir, params="lora", lora_rank=2)
    texts = ["free money now", "linux kernel patch", "click win cash", "thanks for the code"] * 4
    x, y = hf.tokenize(tok, texts, 8), torch.tensor([1, 0, 1, 0] * 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    h = fl.train(model, "zo_spsa", (x, y), (x, y), strategy="fused", lr=1e-2, steps=4, batch_size=4,
                 progress=False, eval_train=False)
    assert h.final["test_acc"] >= 0 and len(h) == 1
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all("lora_" in k or k.startswith("head.") for k in changed)  # only what LoRA trains


_RANK_SCRIPT = """
import json, sys
from forwardlearn.data import spam_assassin as sa
sa.EXPECTED = {**sa.EXPECTED, **{k: tuple(v) for k, v in json.loads(sys.argv[1]).items()}}
from forwardlearn.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow  # two torchrun ranks each import transformers: 20-160 s depending on the machine's load
def test_two_rank_finetune_exchanges_seeds_and_scalars_and_equals_the_serial_emulation(tiny_dir, tmp_path):
    """``torchrun --nproc-per-node 2 ... finetune --distributed`` on the tiny BERT: rank 0's weights equal one
    process playing both ranks with the same seeds (the seed-and-scalar step, bit for bit)."""
    pytest.importorskip("forwardlearn.training")
    import os
    import subprocess
    import sys
    from pathlib import Path

    from forwardlearn import finetune as ft
    from forwardlearn.distributed.trainer import SeedScalarStep
    from forwardlearn.rules import get_rule, trainable_parameters
    from forwardlearn.training import Trainer

    root = tmp_path / "data"
    expected = fake_messages(root)
    script = tmp_path / "rank.py"
    script.write_text(_RANK_SCRIPT)
    out = tmp_path / "dist"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", str(script), json.dumps(expected),
           *_args(tiny_dir, root, out), "--rule", "zo_spsa", "--steps", "3", "--lr", "1e-2", "--distributed"]
    proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["world_size"] == 2 and summary["config"]["step"] == "seed_scalar"
    last = summary["records"][-1]
    assert last["measured_bytes_per_step"] == last["wire_bytes_per_step"] > 0  # only the records went over
    # the same run in one process playing ranks 0 and 1 in turn
    sa_expected = {**sa.EXPECTED, **expected}
    orig = sa.EXPECTED
    sa.EXPECTED = sa_expected
    try:
        prep = ft.prepare(str(tiny_dir), rule="zo_spsa", batch_size=8, max_length=12, data_dir=root, lr=1e-2)
    finally:
        sa.EXPECTED = orig
    rule = get_rule("zo_spsa", seed=0, **prep.config["options"])
    model = rule.attach(prep.model)
    opt = torch.optim.SGD(trainable_parameters(model), lr=1e-2)
    step = SeedScalarStep(rule, seed=0, ranks=[0, 1], world_size=2)
    Trainer(model, rule, opt, batch_size=8, steps=3, eval_every=3, strategy=step, seed=0, progress=False,
            eval_train=False, device="cpu").fit(prep.train, prep.test)
    dist_weights = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(dist_weights[k], v) for k, v in model.state_dict().items())
