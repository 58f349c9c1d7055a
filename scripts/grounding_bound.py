"""What grounding acc@0.5 a box from the object's centre and its size class can reach.

    python scripts/grounding_bound.py --scenes 3000 --noise 0 1 2 4

For each object of the first ``--scenes`` training-pool scenes: a box of the mean width and
height of the object's (size, shape) class, centred on the true centre plus Gaussian noise of
σ = ``--noise`` px, written with two decimals as the LVLM writes boxes, scored against the
object's box (IoU >= 0.5). Prints the accuracy per noise level and the class sizes.
Results: ``docs/experiments/2026-12-04-lvlm-frozen-projector-and-grounding-readout.md``.
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from vlmcompress.config import load_params  # noqa: E402
from vlmcompress.data.scenes import sample_scene, scene_rng  # noqa: E402
from vlmcompress.lvlm.pool import POOL_STREAM  # noqa: E402


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """IoU of two ``(x1, y1, x2, y2)`` boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def class_box_accuracy(boxes: list[tuple[float, float, float, float]], classes: list[tuple[str, str]],
                       noise: float, size: int, rng: np.random.Generator) -> float:
    """Percent of ``boxes`` (COCO x, y, w, h) hit at IoU >= 0.5 by the class-mean box around
    the centre moved by N(0, noise²) px, rounded to two decimals of ``size``."""
    sums: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
    for (x, y, w, h), c in zip(boxes, classes):
        s = sums[c]
        s[0], s[1], s[2] = s[0] + w, s[1] + h, s[2] + 1
    mean = {c: (s[0] / s[2], s[1] / s[2]) for c, s in sums.items()}
    hits = 0
    for (x, y, w, h), c in zip(boxes, classes):
        mw, mh = mean[c]
        cx, cy = x + w / 2 + rng.normal(0, noise), y + h / 2 + rng.normal(0, noise)
        guess = tuple(round(v / size, 2) * size for v in (cx - mw / 2, cy - mh / 2, cx + mw / 2, cy + mh / 2))
        hits += iou(guess, (x, y, x + w, y + h)) >= 0.5
    return 100.0 * hits / len(boxes)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenes", type=int, default=3000, help="training-pool scenes to draw objects from")
    ap.add_argument("--noise", type=float, nargs="+", default=[0.0, 1.0, 2.0, 4.0], help="centre noise σ, px")
    args = ap.parse_args(argv)
    p = load_params().data.scenes
    objs = [o for i in range(args.scenes) for o in sample_scene(scene_rng(p.seed, POOL_STREAM, i), p)]
    boxes, classes = [o.bbox for o in objs], [(o.size, o.shape) for o in objs]
    for noise in args.noise:
        acc = class_box_accuracy(boxes, classes, noise, p.image_size, np.random.default_rng(0))
        print(f"centre noise σ {noise:g} px: acc@0.5 {acc:.1f} % ({len(objs)} objects)")
    for c in sorted(set(classes)):
        wh = np.array([b[2:] for b, k in zip(boxes, classes) if k == c])
        print(f"{c[0]} {c[1]}: {len(wh)} objects, width {wh[:, 0].mean():.1f} ± {wh[:, 0].std():.1f} px")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
