"""Static import analysis shared by the layout and Docker tests.

Files are parsed with `ast`, never imported, so the checks need none of the packages'
dependencies and work on packages that are still empty.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "streaming", "server", "client")
STDLIB = frozenset(sys.stdlib_module_names)
SKIP_DIRS = frozenset({"__pycache__", "build", "dist", "node_modules", "runs"})
IMPORT_FUNCTIONS = frozenset({"__import__", "import_module"})


@dataclass(frozen=True)
class Import:
    """One absolute import found in a file."""

    path: Path
    line: int
    module: str

    @property
    def top(self) -> str:
        return self.module.partition(".")[0]

    def __str__(self) -> str:
        try:
            shown = self.path.relative_to(ROOT)
        except ValueError:
            shown = self.path
        return f"{shown}:{self.line}: imports {self.module}"


def _skipped(relative: Path) -> bool:
    return any(part.startswith(".") or part in SKIP_DIRS for part in relative.parts[:-1])


def python_files(base: Path = ROOT) -> list[Path]:
    """Every .py file under `base` (none if it does not exist), hidden and build dirs skipped."""
    if not base.is_dir():
        return []
    return sorted(p for p in base.rglob("*.py") if not _skipped(p.relative_to(base)))


def _dynamic_import(node: ast.Call) -> str | None:
    """The module of `__import__("x")` / `importlib.import_module("x")`, if literal."""
    func = node.func
    name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
    if name not in IMPORT_FUNCTIONS or not node.args:
        return None
    first = node.args[0]
    if isinstance(first, ast.Constant) and isinstance(first.value, str):
        return first.value
    return None


def _modules(node: ast.AST) -> Iterator[str]:
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
        if node.level == 0 and node.module:
            yield node.module
    elif isinstance(node, ast.Call):
        module = _dynamic_import(node)
        if module and not module.startswith("."):
            yield module


def imports_in(path: Path) -> list[Import]:
    """Absolute imports of one file (relative ones stay inside their package)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return [
        Import(path, getattr(node, "lineno", 0), module)
        for node in ast.walk(tree)
        for module in _modules(node)
    ]


def imports_under(*bases: Path) -> list[Import]:
    return [imp for base in bases for path in python_files(base) for imp in imports_in(path)]


def is_third_party(imp: Import) -> bool:
    return imp.top not in STDLIB and imp.top not in PACKAGES


def report(offending: Iterable[Import]) -> str:
    return "\n".join(str(imp) for imp in offending)
