"""vlmcompress.api: the pipeline's LVLM from a params file or Params, its projector, the data set."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from vlmcompress import api
from vlmcompress.config import Params

from lvlm_helpers import save_tiny_lvlm


def test_model_paths_follow_the_source_and_accept_a_params_file(params: Params, project_root: Path):
    trained = project_root / "outputs" / "lvlm" / "model"
    assert api.model_paths(project_root / "params.yaml") == (str(trained / "llava"), str(trained / "clip"))
    hub = dataclasses.replace(params, lvlm=dataclasses.replace(params.lvlm, source="pretrained", llava="a/llava",
                                                               clip="a/clip"))
    assert api.model_paths(hub) == ("a/llava", "a/clip")


def test_the_pipeline_lvlm_loads_and_its_projector_makes_its_tokens(params: Params, tmp_path: Path):
    root = save_tiny_lvlm(tmp_path / "lvlm")
    P = dataclasses.replace(params, lvlm=dataclasses.replace(params.lvlm, source="pretrained",
                                                             llava=str(root / "llava"), clip=str(root / "clip")))
    lvlm = api.lvlm_from_params(P)
    with torch.no_grad():
        feats = lvlm.visual_features(torch.rand(2, 3, 40, 56))
        assert torch.allclose(lvlm.projector(feats.hidden), feats.tokens)        # [B, N, Dv] -> [B, N, D]
        assert api.lvlm_token_fn(lvlm)(torch.rand(1, 3, 56, 56)).shape == feats.hidden[:1].shape


def test_the_data_set_reads_every_split(project_root: Path, tiny_scenes):
    from vlmcompress.data.generate import generate_scenes

    assert api.dataset_root() == project_root / "outputs" / "data" / "dataset"
    generate_scenes(tiny_scenes, api.dataset_root())
    splits = api.load_all()
    assert list(splits) == ["train", "val", "test"]
    assert [len(v) for v in splits.values()] == [12, 4, 6]


def test_a_missing_data_set_is_a_one_line_error_naming_the_folder(tmp_path):
    from vlmcompress.data.dataset import load_all

    with pytest.raises(FileNotFoundError, match="no data set; run the data stage first"):
        load_all(tmp_path / "absent")
