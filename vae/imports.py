"""The import graph of the ``vae`` package, read from its source (nothing is imported).

What ships inside a registered model, what the resume fingerprint hashes, which files a DVC
stage depends on, and which room may import which are all read off this graph, so that no list
of modules is kept by hand. An import under ``if TYPE_CHECKING:`` is for annotations only and is
not an edge; an import inside a function body is an edge marked ``deferred`` (it runs when the
function does, not when the module is imported).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "Import",
    "closure",
    "imports_in",
    "module_file",
    "module_name",
    "runtime_nodes",
    "vae_imports",
]

ROOT = Path(__file__).resolve().parent  # the vae package folder


@dataclass(frozen=True)
class Import:
    module: str  # a dotted name inside vae, e.g. "vae.core.model"
    line: int
    deferred: bool  # inside a function body: runs when the function runs


def module_file(name: str, root: Path = ROOT) -> Path | None:
    """The file of module ``name`` (``vae.x.y``): ``x/y.py`` or ``x/y/__init__.py``, if any."""
    parts = name.split(".")[1:]
    base = root.joinpath(*parts)
    for path in (base.with_suffix(".py") if parts else None, base / "__init__.py"):
        if path is not None and path.is_file():
            return path
    return None


def module_name(path: Path, root: Path = ROOT) -> str:
    """The dotted name of a file of the package: ``core/model.py`` -> ``vae.core.model``."""
    parts = path.resolve().relative_to(root).with_suffix("").parts
    return ".".join(("vae", *parts[: -1 if parts[-1] == "__init__" else None]))


def runtime_nodes(tree: ast.AST, deferred: bool = False) -> Iterator[tuple[ast.AST, bool]]:
    """Every node that runs (``if TYPE_CHECKING:`` bodies left out), each with whether it sits
    inside a function body (``deferred``: it runs when the function does)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in (
            "TYPE_CHECKING",
            "typing.TYPE_CHECKING",
        ):
            yield from ((n, deferred) for n in node.orelse)
            continue
        yield node, deferred
        inner = deferred or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        yield from runtime_nodes(node, inner)


def vae_imports(path: Path, root: Path = ROOT) -> list[Import]:
    """Every import of a ``vae`` module in ``path``, with its parent packages (importing
    ``vae.core.model`` runs ``vae/__init__.py`` and ``vae/core/__init__.py`` first)."""
    return imports_in(ast.parse(path.read_text()), root)


def imports_in(tree: ast.AST, root: Path = ROOT) -> list[Import]:
    """:func:`vae_imports` of a syntax tree: a module, or one function of it."""
    found: dict[tuple[str, bool], int] = {}
    for node, deferred in runtime_nodes(tree):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "vae" or node.module.startswith("vae."):
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name == "vae" or a.name.startswith("vae.")]
        for name in names:
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                mod = ".".join(parts[:i])
                if module_file(mod, root) is not None:
                    found.setdefault((mod, deferred), getattr(node, "lineno", 0))
    return [Import(m, line, d) for (m, d), line in sorted(found.items())]


def closure(modules: Iterable[str], deferred: bool = True, root: Path = ROOT) -> set[str]:
    """``modules`` and every ``vae`` module they import, transitively; with ``deferred=False``,
    only what importing them runs (imports inside function bodies left out)."""
    todo, seen = list(modules), set()
    while todo:
        mod = todo.pop()
        if mod in seen or (path := module_file(mod, root)) is None:
            continue
        seen.add(mod)
        todo += [i.module for i in vae_imports(path, root) if deferred or not i.deferred]
    return seen
