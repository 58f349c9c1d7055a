"""Shared fixtures: tiny params and a throw-away project root."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

from vlmcompress.config import Params, load_params

REPO = Path(__file__).resolve().parents[1]

torch.set_num_threads(1)  # tests are tiny; one thread avoids oversubscribing CI's two cores


@pytest.fixture(scope="session")
def params() -> Params:
    return load_params(REPO / "params.yaml")


@pytest.fixture
def tiny_scenes(params: Params):
    """Scene params small enough to generate in well under a second."""
    return dataclasses.replace(params.data.scenes, n_train=12, n_val=4, n_test=6)


@pytest.fixture
def project_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temporary project root (own params.yaml, own outputs/) for stage runs."""
    root = tmp_path / "proj"
    root.mkdir()
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    monkeypatch.setenv("VLMCOMPRESS_ROOT", str(root))
    return root


def paper_params_path(folder: Path) -> Path:
    """params.yaml with ``profile: paper``: the paper profile as the loader resolves it
    (configs/paper.yaml laid over params.yaml)."""
    text = (REPO / "params.yaml").read_text()
    assert "\nprofile: embedded\n" in text
    path = folder / "params_paper.yaml"
    path.write_text(text.replace("\nprofile: embedded\n", "\nprofile: paper\n", 1))
    (folder / "configs").mkdir(exist_ok=True)        # found beside the params file, whatever the root
    shutil.copy(REPO / "configs" / "paper.yaml", folder / "configs" / "paper.yaml")
    return path
