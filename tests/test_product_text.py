"""The product speaks of the product: no development history in what users read or run.

How a default was found (trials, machines, branches, work sessions) belongs in dated entries
under ``docs/experiments/``; the README, the design doc, params, notebooks and code say what
the package does. Naming the CPU a measured figure comes from is allowed: that is what the
figure holds on.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

HISTORY = re.compile(
    r"\b(?:this|that|earlier|previous|last|next) sessions?\b|\bsessions? \d+|\bsession notes\b"
    r"|\bearlier machine\b|\bon branch\b|\bbranch `|`exp/[\w-]+`|\bissue #?\d+\b"
    r"|\b(?:the|was the) (?:old|previous) default\b|\buntil this\b|\blab notebook\b",
    re.IGNORECASE)


def product_files() -> list[Path]:
    files = [ROOT / n for n in ("README.md", "params.yaml", "dvc.yaml", "Makefile", "environment.yml",
                                "pyproject.toml", "docs/architecture.md")]
    for folder, pattern in (("configs", "*.yaml"), ("src/vlmcompress", "*.py"), ("notebooks", "*.ipynb"),
                            ("scripts", "*.py"), ("benchmarks", "*.py")):
        files += sorted((ROOT / folder).rglob(pattern))
    return [f for f in files if f.is_file()]


def history_lines(text: str) -> list[tuple[int, str]]:
    return [(i, line.strip()) for i, line in enumerate(text.splitlines(), 1) if HISTORY.search(line)]


@pytest.mark.parametrize("text, flagged", [
    ("measured in session 12 on the earlier machine", True),
    ("(branch `exp/peak-quantile`, not merged)", True),
    ("see issue 21 for the cause", True),
    ("λ / 4 was the previous default", True),
    ("`make repro`: 45 min on 2 CPUs (AMD EPYC)", False),           # the CPU a figure holds on
    ("a `.part` left by an earlier run is resumed", False),         # behaviour, not history
    ('@pytest.fixture(scope="session")', False),
])
def test_the_pattern_flags_history_and_only_history(text, flagged):
    assert bool(history_lines(text)) is flagged


def test_no_development_history_in_the_product():
    found = [f"{f.relative_to(ROOT)}:{i}: {line[:100]}" for f in product_files()
             for i, line in history_lines(f.read_text(encoding="utf-8", errors="replace"))]
    assert not found, "development history belongs in docs/experiments/:\n" + "\n".join(found)
