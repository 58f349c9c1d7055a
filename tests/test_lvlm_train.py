"""The LM phase's training signals: which patches a turn is about, the look loss, the token curriculum."""
from __future__ import annotations

import json

import numpy as np
import torch

from vlmcompress.lvlm.labels import COLOR_IDS, SHAPE_IDS
from vlmcompress.lvlm.train import background_budget, kept_tokens, look_loss, relevant_patches


def _labels() -> torch.Tensor:
    """A 4x4 grid: a red circle (top-left 2 patches), a blue square (one patch), background elsewhere."""
    lab = torch.zeros(4, 4, 4, dtype=torch.long)
    lab[0, 0, :2], lab[1, 0, :2] = COLOR_IDS["red"], SHAPE_IDS["circle"]
    lab[0, 3, 3], lab[1, 3, 3] = COLOR_IDS["blue"], SHAPE_IDS["square"]
    lab[2][lab[0] > 0] = 1
    return lab


def _idx(mask: torch.Tensor) -> list[int]:
    return mask.nonzero().flatten().tolist()


def test_relevant_patches_follow_the_words_of_each_question_type():
    lab = _labels()
    assert _idx(relevant_patches("what color is the circle?", lab)) == [0, 1]
    assert _idx(relevant_patches("what shape is the blue object?", lab)) == [15]
    assert _idx(relevant_patches("how many squares are there?", lab)) == [15]
    assert _idx(relevant_patches("is the red circle left of the blue square?", lab)) == [0, 1, 15]
    # A "no" existence question names a pair that is absent: fall back to shared attributes.
    assert _idx(relevant_patches("is there a red square?", lab)) == [0, 1, 15]
    # A caption names nothing: every object patch.
    assert _idx(relevant_patches("", lab)) == [0, 1, 15]
    # Nothing matches (a shape not in the scene): no target, so the look loss skips the turn.
    assert _idx(relevant_patches("how many crosses are there?", lab)) == []


def test_look_loss_is_zero_when_all_mass_is_on_relevant_keys_and_skips_empty_targets():
    attn = torch.zeros(1, 2, 5, 5)
    attn[0, :, 4, 1] = 0.5
    attn[0, :, 4, 2] = 0.5
    attn[0, :, 3, 0] = 1.0
    q = torch.tensor([[0, 4], [0, 3]])
    tgt = torch.zeros(2, 5, dtype=torch.bool)
    tgt[0, 1:3] = True                                   # query 1 has no relevant key: skipped
    assert look_loss(attn, q, tgt).item() == 0.0
    tgt[0, 2] = False                                    # half the mass on the target: -log(0.5)
    assert np.isclose(look_loss(attn, q, tgt).item(), np.log(2.0))
    assert look_loss(attn, q, torch.zeros(2, 5, dtype=torch.bool)).item() == 0.0


def test_look_loss_gradient_moves_attention_towards_the_target():
    logits = torch.zeros(1, 1, 3, 3, requires_grad=True)
    tgt = torch.tensor([[False, True, False]])
    look_loss(logits.softmax(-1), torch.tensor([[0, 2]]), tgt).backward()
    g = logits.grad[0, 0, 2]
    assert g[1] < 0 and g[0] > 0 and g[2] > 0            # descent raises the relevant logit


def test_background_budget_ramps_from_start_to_all():
    assert background_budget(0, 100, 16, 0.5, 256) == 16
    assert background_budget(25, 100, 16, 0.5, 256) == 136
    assert background_budget(50, 100, 16, 0.5, 256) == 256
    assert background_budget(99, 100, 16, 0.5, 256) == 256
    assert background_budget(0, 100, 16, 0.0, 256) == 256          # no ramp: all tokens from the start


def test_kept_tokens_keep_every_object_patch_in_grid_order():
    lab = torch.stack([_labels(), _labels()])
    keep = kept_tokens(lab, 3, np.random.default_rng(0))
    for k in keep:
        assert {0, 1, 15} <= set(k.tolist()) and len(k) == 6
        assert torch.equal(k, k.sort().values)
    assert len(kept_tokens(lab, 1000, np.random.default_rng(0))[0]) == 16   # capped at the grid


def test_resumed_training_keeps_the_curve_up_to_its_checkpoint(tmp_path):
    from types import SimpleNamespace

    from vlmcompress.lvlm.train import Trainer

    path = tmp_path / "curves.jsonl"
    rows = [{"phase": "clip", "step": 100}, {"phase": "lm", "step": 100}, {"phase": "lm", "step": 200},
            {"phase": "lm", "step": 300}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fake = SimpleNamespace(_curves_path=path, curves=[])
    Trainer._load_curves(fake, "lm", 200)          # interrupted after the step-200 checkpoint
    assert fake.curves == rows[:3]
    assert [json.loads(x) for x in path.read_text().splitlines()] == rows[:3]
    Trainer._load_curves(fake, None, 0)            # nothing in progress: everything is kept
    assert fake.curves == rows[:3]
