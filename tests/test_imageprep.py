"""Mixed image sizes made square as LLaVA-1.5 (pad), CLIP's processor (crop) or a stretch do it."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vlmcompress.lvlm.imageprep import box_to_input, pad_to_square, prepare, to_square

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def _expand2square(img: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """LLaVA's own rule, written with PIL: paste at ((S - W) // 2, (S - H) // 2) on a mean canvas."""
    w, h = img.size
    s = max(w, h)
    canvas = Image.new("RGB", (s, s), fill)
    canvas.paste(img, ((s - w) // 2, (s - h) // 2))
    return canvas


@pytest.mark.parametrize("h,w", [(5, 9), (9, 4), (6, 6)])
def test_pad_matches_expand2square(h, w):
    arr = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    fill = tuple(int(m * 255) for m in MEAN)
    want = np.asarray(_expand2square(Image.fromarray(arr), fill)).astype(np.float32) / 255
    x = torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255
    got = pad_to_square(x, [f / 255 for f in fill])[0].permute(1, 2, 0).numpy()
    assert np.array_equal(got, want)


def test_mixed_sizes_batch_and_gradients():
    imgs = [torch.rand(3, 40, 64, requires_grad=True), torch.rand(3, 64, 30), torch.rand(3, 40, 64)]
    out = prepare(imgs, 28, "pad", MEAN, STD)
    assert out.shape == (3, 3, 28, 28) and out.dtype == torch.float32
    torch.testing.assert_close(out[0], prepare(imgs[0][None], 28, "pad", MEAN, STD)[0])
    out.sum().backward()
    assert imgs[0].grad is not None and imgs[0].grad.abs().sum() > 0
    for aspect in ("crop", "resize"):
        assert prepare(imgs, 28, aspect, MEAN, STD).shape == (3, 3, 28, 28)
    with pytest.raises(ValueError, match="image_aspect"):
        to_square(imgs[1][None], 28, "squash", MEAN)


@pytest.mark.parametrize("aspect", ["pad", "crop"])
def test_boxes_follow_the_geometry(aspect):
    """A white box drawn on a wide image lands where box_to_input says, in the square input."""
    h, w = 60, 100
    x = torch.zeros(1, 3, h, w)
    x[..., 20:40, 50:80] = 1.0                      # rows 20..39, columns 50..79
    sq = to_square(x, 100, aspect, MEAN)[0, 0]
    rows, cols = torch.nonzero(sq > 0.9, as_tuple=True)
    got = (cols.min() / 100, rows.min() / 100, (cols.max() + 1) / 100, (rows.max() + 1) / 100)
    want = box_to_input((50 / w, 20 / h, 80 / w, 40 / h), h, w, aspect)
    assert np.allclose([float(v) for v in got], want, atol=0.03), (got, want)


def test_grounding_is_absent_not_zero_without_referring_expressions():
    from vlmcompress.data.records import ImageRecord
    from vlmcompress.eval.tasks import ref_box, run_grounding

    rec = ImageRecord(image_id=1, path="unused.png", width=100, height=60, objects=[], captions=[],
                      questions=[], refs=[])
    assert run_grounding(None, [rec]) == (None, None)            # the model is never called
    assert ref_box(rec, (50, 20, 30, 20), "pad") == pytest.approx((0.5, 0.4, 0.8, 0.6))
