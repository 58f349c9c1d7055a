"""The text-guidance probe: relevance from record boxes and the precision of a ranking."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from vlmcompress.data.records import ImageRecord, ObjectAnn, Question
from vlmcompress.lvlm.labels import COLOR_IDS, SHAPE_IDS
from vlmcompress.lvlm.probe import box_labels, text_localisation


def _record(questions=()) -> ImageRecord:
    objs = (ObjectAnn(1, "circle", (0.0, 0.0, 15.0, 7.0), {"color": "red", "shape": "circle", "size": "large"}),
            ObjectAnn(2, "square", (24.0, 24.0, 7.0, 7.0), {"color": "blue", "shape": "square", "size": "small"}))
    return ImageRecord(7, Path("x.png"), 32, 32, objs, (), tuple(questions))


def test_box_labels_paint_each_object_box_on_the_grid():
    lab = box_labels(_record(), 4)
    assert lab.shape == (4, 4, 4)
    assert lab[0, 0, :2].tolist() == [COLOR_IDS["red"]] * 2 and lab[1, 0, :2].tolist() == [SHAPE_IDS["circle"]] * 2
    assert lab[0, 3, 3] == COLOR_IDS["blue"] and lab[0].gt(0).sum() == 3
    coco = ImageRecord(1, Path("y.png"), 32, 32, (ObjectAnn(1, "dog", (0.0, 0.0, 8.0, 8.0), {}),))
    assert box_labels(coco, 4) is None


class _OracleLVLM:
    """Patches embedded as one-hot grid positions; a question embeds onto chosen patches."""

    def __init__(self, targets: dict[str, list[int]]):
        self.targets = targets

    def visual_features(self, images):
        return SimpleNamespace(tokens=torch.zeros(1, 16, 4))

    def patch_embeddings(self, feats):
        return torch.eye(16)[None]

    def text_embeddings(self, texts):
        rows = [torch.zeros(16).index_fill_(0, torch.tensor(self.targets[t]), 1.0) for t in texts]
        return F.normalize(torch.stack(rows), dim=-1)


def test_text_localisation_scores_a_ranking_against_the_named_patches():
    q = [Question(1, "what color is the circle?", "red", ("red",), "color", "other"),
         Question(2, "is there a blue square?", "yes", ("yes",), "exists", "yes/no")]
    rec = _record(q)
    # The circle question points at both circle patches; the square question at a background patch.
    lvlm = _OracleLVLM({q[0].question: [0, 1], q[1].question: [5]})
    out = text_localisation(lvlm, [rec], 2, lambda r: torch.zeros(3, 32, 32))
    assert out["color"]["precision"] == 100.0 and out["color"]["hit1"] == 100.0
    assert out["exists"]["hit1"] == 0.0
    assert out["color"]["base"] == 12.5                     # 2 of 16 patches
    assert out["all"]["n"] == 2 and out["all"]["hit1"] == 50.0


def test_attention_shares_split_a_row_by_what_it_lands_on():
    from vlmcompress.lvlm.probe import attention_shares

    lab = box_labels(_record(), 4)      # red circle on patches 0, 1; blue square on patch 15
    vis = torch.zeros(16)
    vis[0], vis[15], vis[5] = 0.5, 0.2, 0.1   # 0.2 left for the text
    red_circle = attention_shares(vis, lab, "red", "circle")
    assert red_circle["named"] == 0.5 and red_circle["other_objects"] == pytest.approx(0.2)
    assert red_circle["background"] == pytest.approx(0.1) and red_circle["text"] == pytest.approx(0.2)
    blue_circle = attention_shares(vis, lab, "blue", "circle")      # absent: the red circle is a near miss
    assert blue_circle["named"] == 0.0 and blue_circle["same_shape"] == 0.5
    assert blue_circle["same_colour"] == pytest.approx(0.2)
    any_circle = attention_shares(vis, lab, None, "circle")
    assert any_circle["named"] == 0.5 and sum(any_circle.values()) == pytest.approx(1.0)


def test_the_hop_probe_script_refuses_a_folder_without_a_model(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("hop_probe", Path(__file__).parents[1] / "scripts" / "hop_probe.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"hop_probe: {tmp_path} has no llava/ and clip/ folders"
