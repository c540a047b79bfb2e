"""The package's shape (issue 16), as measured from its source: no module over 400 logic lines, no function
over 60, no class over 250; no private name imported across modules; no module below the entry points
imports the package face or an entry point. Logic lines are lines holding code: not blank, not comments,
not docstrings."""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "zkllm_hf"
FILES = sorted(PKG.rglob("*.py"))
ENTRY_POINTS = ("session", "dataset", "cli", "integrations", "__main__")  # and the package face, zkllm_hf/__init__.py


def _docstring_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(
                first.value.value, str
            ):
                lines.update(range(first.lineno, first.end_lineno + 1))
    return lines


def _code_lines(source: str) -> set[int]:
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}
    lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in skip:
            lines.update(range(tok.start[0], tok.end[0] + 1))
    return lines


def logic_lines(path: Path) -> tuple[int, list[tuple[str, str, int]]]:
    """The module's logic lines, and (kind, name, logic lines) of each function and class in it."""
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source)
    logic = _code_lines(source) - _docstring_lines(tree)
    parts = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            span = range(node.lineno, node.end_lineno + 1)
            kind = "class" if isinstance(node, ast.ClassDef) else "function"
            parts.append((kind, f"{node.name} (line {node.lineno})", len(logic.intersection(span))))
    return len(logic), parts


def test_the_measure_counts_code_only(tmp_path):
    """The yardstick itself: docstrings, comments and blank lines are not logic lines."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        '"""Doc.\n\nMore."""\n\n# a comment\nx = (\n    1,\n)\n\n\ndef f():\n    """Doc."""\n    return x\n'
    )
    total, parts = logic_lines(sample)
    assert total == 5 and parts == [("function", "f (line 11)", 2)]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.relative_to(PKG).as_posix())
def test_modules_functions_and_classes_stay_small(path):
    total, parts = logic_lines(path)
    assert total <= 400, f"{path.name}: {total} logic lines (the limit is 400); split it by job"
    too_big = [(k, n, c) for k, n, c in parts if c > (250 if k == "class" else 60)]
    assert not too_big, f"{path.name}: over the limit (function 60, class 250): {too_big}"


def _module_of(path: Path) -> str:
    return ".".join(path.relative_to(PKG.parent).with_suffix("").parts).removesuffix(".__init__")


def _imports(path: Path):
    """(imported module, names) of every ``from X import ...`` in ``path``, X resolved to a dotted name."""
    package = _module_of(path) if path.name == "__init__.py" else _module_of(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield target, [a.name for a in node.names]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.relative_to(PKG).as_posix())
def test_no_private_name_crosses_a_module(path):
    crossing = [(m, n) for m, names in _imports(path) if m.startswith("zkllm_hf") for n in names
                if n.startswith("_") and n != "__version__"]
    assert not crossing, f"{path.name} imports private names {crossing}; give them a public name where they live"


def _is_entry(module: str) -> bool:
    parts = module.split(".")
    return module == "zkllm_hf" or (len(parts) > 1 and parts[1] in ENTRY_POINTS)


@pytest.mark.parametrize("path", [p for p in FILES if not _is_entry(_module_of(p))],
                         ids=lambda p: p.relative_to(PKG).as_posix())
def test_lower_modules_do_not_import_the_face_or_an_entry_point(path):
    submodules = {p.stem for p in PKG.glob("*.py")} | {p.name for p in PKG.iterdir() if p.is_dir()}
    upward = [m for m, _ in _imports(path) if m != "zkllm_hf" and _is_entry(m)]
    for m, names in _imports(path):
        if m == "zkllm_hf":  # `from . import x`: a submodule is fine, a name of the face or an entry point is not
            upward += [f"zkllm_hf.{n}" for n in names if n not in submodules or n in ENTRY_POINTS]
    assert not upward, f"{path.name} imports {upward}, which sit above it"
