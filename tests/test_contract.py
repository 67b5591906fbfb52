"""The backend contract is machine-checked: every backend exports every contract function of
vit_fast.ops.contract with exactly the contract's argument names, in order.

Backends: "triton" (`vit_fast.kernels.<family>`, read with inspect), "cpu" (the C++ extension: the
names are parsed from the first line of each pybind11 docstring, `name(arg: type, ...) -> ...`) and
"reference" (`vit_fast.plain.<family>`). One case per (family, function, backend).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pathlib
import re

import pytest

from vit_fast.ops.backend import backend_module, cpu_extension
from vit_fast.ops.contract import CONTRACT, FAMILIES, arguments

CASES = [
    (family, function, backend)
    for family, functions in CONTRACT.items()
    for function in functions
    for backend in ("triton", "cpu", "reference")
]


def _split_top_level(text: str) -> list[str]:
    """`text` split at the commas outside brackets (types such as `tuple[int, int]` hold commas)."""
    parts, depth, current = [], 0, []
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if "".join(current).strip():
        parts.append("".join(current))
    return parts


def pybind_arg_names(fn: object) -> tuple[str, ...]:
    """Argument names of a pybind11 function from its docstring's first line."""
    first = (getattr(fn, "__doc__", None) or "").strip().splitlines()[0]
    match = re.match(r"^(\w+)\((.*)\)\s*->", first)
    assert match, f"not a pybind11 signature line: {first!r}"
    return tuple(part.split(":")[0].strip() for part in _split_top_level(match.group(2)))


def test_pybind_parser_reads_nested_types():
    # The parser itself must be able to fail: a made-up signature with bracketed types.
    class Fake:
        __doc__ = (
            "f(x: torch.Tensor, w: torch.Tensor | None, t: tuple[int, int], k: int) -> tuple[a, b]\n\ndoc"
        )

    assert pybind_arg_names(Fake) == ("x", "w", "t", "k")


def test_contract_lookups():
    assert set(CONTRACT) == set(FAMILIES)
    assert arguments("attention_varlen_forward")[:4] == ("qkv", "table", "max_len", "zero_fill")
    with pytest.raises(KeyError):
        arguments("no_such_function")


def _positional(fn) -> tuple[str, ...]:
    """The positional parameters of a Python backend function: the contract. A backend may take
    extra keyword-only parameters for its own internal callers, but only with defaults (the ops
    never pass them)."""
    params = inspect.signature(fn).parameters.values()
    extra = [p for p in params if p.kind == p.KEYWORD_ONLY]
    assert all(p.default is not p.empty for p in extra), f"{fn.__name__}: keyword-only without default"
    return tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


@pytest.mark.parametrize(("family", "function", "backend"), CASES)
def test_backend_exports_contract_function(family: str, function: str, backend: str):
    want = arguments(function)
    if backend == "triton":
        pytest.importorskip("triton")
        module = backend_module(family, "triton")
        got = _positional(getattr(module, function))
    elif backend == "cpu":
        if cpu_extension() is None:
            pytest.skip("the C++ extension vit_fast._C is not built")
        module = backend_module(family, "cpu")
        got = pybind_arg_names(getattr(module, function))
    else:
        module = backend_module(family, "reference")
        got = _positional(getattr(module, function))
    assert got == want, f"{backend} {family}.{function}: arguments {got}, contract {want}"


def _imported_names(path: pathlib.Path) -> list[str]:
    """Every module name `path` imports (module level or inside functions; `from a import b` gives
    both "a" and "a.b", since b may be a module)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            names.append(node.module or "")
            names += [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names]
    return names


def test_import_scan_sees_nested_and_from_imports(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from vit_fast import reference\n")
    assert "vit_fast.reference" in _imported_names(src)


@pytest.mark.parametrize("family", FAMILIES)
def test_plain_backend_imports_neither_the_oracle_nor_ops(family: str):
    # The plain backend sits below ops/ and is a fused-path fallback: the test oracle is not its.
    module = importlib.import_module(f"vit_fast.plain.{family}")
    for name in _imported_names(pathlib.Path(inspect.getfile(module))):
        assert not name.startswith(("vit_fast.reference", "vit_fast.ops")), (
            f"plain/{family}.py imports {name}"
        )
