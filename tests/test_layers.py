"""The package's layers: a module imports only modules of its own layer or of the layers below it.

    0  rules/ models/ data/ forward_only/ blocks.py physical.py explain.py   models, data, learning rules
    1  training/                                                    the loop, strategies, checkpoints, build_run
    2  distributed/ bench/ diagnostics/                             built on 0-1
    3  commands/                                                    the CLI verbs
    4  cli.py __main__.py                                           the command line itself

``forwardlearn/__init__.py`` (the public API) sits above them all.
"""

import ast
from pathlib import Path

import forwardlearn

ROOT = Path(forwardlearn.__file__).parent
LAYERS = {
    "rules": 0, "models": 0, "data": 0, "forward_only": 0, "physical": 0, "explain": 0, "blocks": 0,
    "training": 1,
    "distributed": 2, "bench": 2, "diagnostics": 2, "finetune": 2,
    "commands": 3,
    "cli": 4, "__main__": 4,
}


def _part(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    return rel.parts[0]


def _imports(path: Path) -> set[str]:
    """The top-level forwardlearn parts (``rules``, ``training``, ...) that ``path`` imports, relative or not."""
    tree = ast.parse(path.read_text())
    package = list(path.relative_to(ROOT).parent.parts)
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "forwardlearn" and len(parts) > 1:
                    out.add(parts[1])
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                parts = (node.module or "").split(".")
                if parts[0] != "forwardlearn":
                    continue
                base = parts[1:]
            else:
                up = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                if node.level - 1 > len(package):
                    continue
                base = up + (node.module.split(".") if node.module else [])
            if base:
                out.add(base[0])
            else:  # `from . import x` at the top of the package
                out.update(a.name for a in node.names)
    return out


def test_every_part_has_a_layer():
    parts = {_part(p) for p in ROOT.rglob("*.py") if p.name != "__init__.py" or p.parent != ROOT}
    assert parts <= set(LAYERS), f"give these a layer: {sorted(parts - set(LAYERS))}"


def test_no_module_imports_a_higher_layer():
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        if path == ROOT / "__init__.py":
            continue
        mine = LAYERS[_part(path)]
        for part in _imports(path):
            if part in LAYERS and LAYERS[part] > mine:
                bad.append(f"{path.relative_to(ROOT)} imports {part} (layer {LAYERS[part]} > {mine})")
    assert not bad, "\n".join(bad)


def test_the_check_sees_relative_and_absolute_imports(tmp_path):
    """The walker itself: a relative import two levels up and an absolute one are both found."""
    f = ROOT / "rules" / "base.py"
    assert "data" in _imports(f)  # `from ..data.batches import ...`
    assert {"cli", "commands"} <= _imports(ROOT / "__main__.py") | _imports(ROOT / "cli.py")
