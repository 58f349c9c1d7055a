"""Reading imports from source: shared by the layering and DVC-dependency tests."""
from __future__ import annotations

import ast


def from_module(node: ast.ImportFrom, package: str) -> str:
    """The module a ``from ... import`` names, relative imports resolved against ``package``
    (the importing module's package)."""
    if not node.level:
        return node.module or ""
    parts = package.split(".")
    base = ".".join(parts[:len(parts) - node.level + 1])
    return f"{base}.{node.module}" if node.module else base
