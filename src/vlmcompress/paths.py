"""Project paths, resolved from the package location (never from the current directory)."""
from __future__ import annotations

import os
from pathlib import Path

_MARKERS = ("dvc.yaml", "params.yaml")


def project_root() -> Path:
    """The repository root: ``$VLMCOMPRESS_ROOT`` if set, else the checkout holding this package.

    Raises ``FileNotFoundError`` when neither points at a folder with ``params.yaml``.
    """
    env = os.environ.get("VLMCOMPRESS_ROOT")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2])  # src/vlmcompress/paths.py -> root
    for cand in candidates:
        if any((cand / m).is_file() for m in _MARKERS):
            return cand
    raise FileNotFoundError(
        "cannot find the vlmcompress project root; set VLMCOMPRESS_ROOT to the checkout")


def outputs_dir(*parts: str) -> Path:
    """``<root>/outputs/<parts...>`` (not created)."""
    return project_root().joinpath("outputs", *parts)


def project_relative(path: str | Path) -> str:
    """``path`` as a POSIX path relative to the project root when it lies inside it (so an
    output that names a file stays valid when the outputs are moved to another checkout),
    else as given, absolute."""
    p = Path(path).resolve()
    try:
        return p.relative_to(project_root().resolve()).as_posix()
    except ValueError:
        return str(p)
