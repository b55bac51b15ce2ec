"""Every number in the README comes from a stored result: its generated blocks regenerate byte for byte."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from forwardlearn.bench import readme as blocks
from forwardlearn.bench.report import readme_text

ROOT = Path(__file__).resolve().parents[1]


def test_readme_is_what_the_stored_results_generate() -> None:
    # reads only benchmarks/results/*.json (no clock, no machine): fails when a generated block was edited by
    # hand or a results file changed without `forwardlearn bench report --readme README.md`
    text = (ROOT / "README.md").read_text()
    for name in ("summary", "compare-digits", "bench", "architectures", "finetune-cost", "finetune-accuracy",
                 "zo-lowrank-cost", "zo-lowrank-accuracy", "forward-only-cost", "biotorch-lenet", "ff-mnist",
                 "distributed-bytes", "ep-cost", "forward-gnn", "ff-conv", "forward-gradient-rank1", "lenet-timing",
                 "federated", "replay-bytes", "harsanyi-cost", "harsanyi-accuracy"):
        assert blocks.BEGIN.format(name) in text and blocks.END.format(name) in text, name
    assert readme_text(ROOT / "benchmarks" / "results", ROOT / "README.md") == text


def test_blocks_are_replaced_by_name_and_the_rest_is_kept(tmp_path, monkeypatch) -> None:
    (tmp_path / "numbers.json").write_text(json.dumps({"x": 0.25}))
    def numbers(results: Path, prefix: str) -> str:
        return f"x is {json.loads((results / 'numbers.json').read_text())['x']:.2f} ({prefix})\n"

    monkeypatch.setitem(blocks.BLOCKS, "numbers", numbers)
    readme = tmp_path / "README.md"
    readme.write_text(f"intro 1.0\n\n{blocks.BEGIN.format('numbers')}\nstale 9.99\n{blocks.END.format('numbers')}\n"
                      "outro 2.0\n")
    got = readme_text(tmp_path, readme)
    assert got == (f"intro 1.0\n\n{blocks.BEGIN.format('numbers')}\n{blocks.NOTE}\n\nx is 0.25 (./)\n\n"
                   f"{blocks.END.format('numbers')}\noutro 2.0\n")
    readme.write_text(got)
    assert readme_text(tmp_path, readme) == got  # idempotent


@pytest.mark.parametrize("text, match", [
    ("no blocks here\n", "no generated block"),
    (f"{blocks.BEGIN.format('nonesuch')}\n{blocks.END.format('nonesuch')}\n", "unknown generated block 'nonesuch'"),
    (f"{blocks.BEGIN.format('summary')}\nno end\n", "has no"),
])
def test_bad_blocks_are_refused(tmp_path, text: str, match: str) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(text)
    with pytest.raises(ValueError, match=match):
        readme_text(tmp_path, readme)


def test_a_missing_results_file_names_the_command_that_makes_it(tmp_path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"{blocks.BEGIN.format('compare-digits')}\n{blocks.END.format('compare-digits')}\n")
    with pytest.raises(FileNotFoundError, match="forwardlearn compare --data digits"):
        readme_text(tmp_path, readme)


@pytest.mark.parametrize("name, command", [
    ("architectures", "python benchmarks/architectures.py"),
    ("finetune-cost", "python benchmarks/finetune_minilm.py --part cost"),
    ("finetune-accuracy", "python benchmarks/finetune_minilm.py --part accuracy"),
    ("zo-lowrank-cost", "python benchmarks/forward_only_cost.py"),
    ("zo-lowrank-accuracy", "python benchmarks/zo_lowrank_accuracy.py"),
    ("forward-only-cost", "python benchmarks/forward_only_cost.py"),
    ("biotorch-lenet", "python benchmarks/biotorch_lenet.py --epochs 10"),
    ("ff-mnist", "python benchmarks/ff_mnist.py --recipe hinton"),
    ("distributed-bytes", "python benchmarks/distributed_bytes.py"),
    ("ep-cost", "forwardlearn bench cost"),
    ("forward-gnn", "python benchmarks/forward_gnn.py"),
    ("ff-conv", "python benchmarks/ff_conv.py --data mnist"),
    ("forward-gradient-rank1", "python benchmarks/zo_lowrank_accuracy.py --rule forward_gradient"),
    ("lenet-timing", "python benchmarks/biotorch_lenet.py --timing 20 --clock cpu"),
    ("federated", "python benchmarks/federated.py --clients 10 --rounds 100"),
    ("replay-bytes", "python benchmarks/replay_bytes.py"),
    ("harsanyi-cost", "python benchmarks/harsanyi_cost.py --part cost"),
    ("harsanyi-accuracy", "python benchmarks/harsanyi_cost.py --part accuracy"),
    ("compare-mnist-ff", "forwardlearn compare --rules backprop,ff --seeds 3 --data mnist"),
])
def test_each_new_block_names_the_command_of_its_missing_file(tmp_path, name: str, command: str) -> None:
    with pytest.raises(FileNotFoundError, match=command.replace(".", r"\.")):
        blocks.BLOCKS[name](tmp_path, "./")
    (tmp_path / "finetune_minilm.json").write_text("{}")  # a file without the part the block shows
    if name.startswith("finetune"):
        with pytest.raises(FileNotFoundError, match=command.replace(".", r"\.")):
            blocks.BLOCKS[name](tmp_path, "./")
