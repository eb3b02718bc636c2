"""The project files a module runs when imported: its static import closure (AST, no import)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("deepalign", "flows")


def module_file(name: str) -> Path | None:
    """deepalign.methods.sinkhorn -> deepalign/methods/sinkhorn.py (or the package's __init__)."""
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _parents(name: str) -> list[str]:
    """Importing a.b.c runs a and a.b first."""
    parts = name.split(".")
    return [".".join(parts[:k]) for k in range(1, len(parts) + 1)]


def _imported(path: Path) -> set[str]:
    """Project modules named by the import statements of one file (any nesting level)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    if path.name == "__init__.py":
        package = package.rsplit(".", 1)[0] + ".__init__"
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this file's package
                base = package.rsplit(".", node.level)[0]
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            names.add(mod)
            names.update(f"{mod}.{a.name}" for a in node.names)  # `from pkg import submodule`
    return {n for n in names if n.split(".")[0] in PACKAGES}


def import_closure(module: str) -> set[Path]:
    """Every project file that `python -m module` executes through imports, itself included."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        for name in _parents(todo.pop()):
            path = module_file(name)
            if path is None or path in seen:
                continue
            seen.add(path)
            todo.extend(_imported(path))
    return {p.relative_to(ROOT) for p in seen}
