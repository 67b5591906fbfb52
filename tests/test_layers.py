"""The package's layers, checked on the source: every import (module level or inside a function)
goes from a layer to the same or a lower one, and the fused path never imports the oracle.

    kernels, plain, reference  ->  tuning  ->  ops  ->  nn  ->  models
        ->  integrations, perf, training, data, testing  ->  cli  ->  vit_fast/__init__.py

`reference.py` (the float64 oracle) imports nothing of the package, so it sits on the ground floor;
the op implementations (kernels, plain, tuning, ops) never import it. Above them, only the
`impl="reference"` variants of the nn modules use it (the stock eager model the tests and the
benchmark compare against).
"""

from __future__ import annotations

import ast
import pathlib

import pytest

import vit_fast

ROOT = pathlib.Path(vit_fast.__file__).parent

#: Layer of each top-level part of the package (a folder or a module), lowest first.
LAYER = {
    "kernels": 0,
    "plain": 0,
    "_C": 0,
    "tuning": 1,
    "ops": 2,
    "nn": 3,
    "models": 4,
    "integrations": 5,
    "perf": 5,
    "training": 5,
    "data": 5,
    "testing": 5,
    "reference": 0,
    "cli": 6,
    "__init__": 7,
}
#: The op implementations: none of them may call the float64 oracle they are tested against.
OP_LAYERS = ("kernels", "plain", "tuning", "ops")


def _part(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0].removesuffix(".py")


def _imports(path: pathlib.Path) -> list[str]:
    """Every vit_fast module `path` imports, resolved to its top-level part."""
    parts = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative imports are not used in the package; reject them loudly
                raise AssertionError(f"{path}: relative import")
            if node.module == "vit_fast":
                parts += [a.name for a in node.names]
            elif node.module and node.module.startswith("vit_fast."):
                parts.append(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            parts += [a.name.split(".")[1] for a in node.names if a.name.startswith("vit_fast.")]
    return parts


FILES = sorted(p for p in ROOT.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_part_has_a_layer():
    assert len(FILES) > 40
    assert {_part(p) for p in FILES} <= set(LAYER)
    assert not [p for p in (ROOT / "reference.py",) if _imports(p)]  # the oracle stands alone


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_go_down(path):
    here = _part(path)
    for there in _imports(path):
        assert there in LAYER, f"{path.name} imports unknown part vit_fast.{there}"
        assert LAYER[there] <= LAYER[here], (
            f"{here}/{path.name} (layer {LAYER[here]}) imports {there} (layer {LAYER[there]})"
        )
        if here in OP_LAYERS:
            assert there != "reference", f"{here}/{path.name} implements ops but imports the oracle"


def test_no_folder_loop():
    """Parts on one layer may import each other, but never both ways."""
    edges = {(_part(p), t) for p in FILES for t in _imports(p) if t != _part(p)}
    loops = sorted((a, b) for a, b in edges if (b, a) in edges and a < b)
    assert not loops, loops
