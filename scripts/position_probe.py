"""Do the visual tokens say where each patch is, and where its object's box is? Linear probes.

    python scripts/position_probe.py [--params params.yaml] [--llava FOLDER [--clip FOLDER]] [--scenes 400]

Embeds ``--scenes`` training-stream scenes with the stage's LLaVA (or ``--llava``), fits a
least-squares one-hot classifier of each patch's grid column and row on the first three
quarters of the scenes and prints its accuracy on the object patches of the rest, and the
mean absolute error (in grid cells) of a linear regression of the index, for the tower's
LLaVA feature layer and for the projector's output (what the LM reads). Chance is 1 / grid
side for the accuracy; predicting the mean index gives an MAE of about a quarter of the side.
Scenes profile only (the pool needs the scene generator's labels). Results:
``docs/experiments/2026-12-03-embedded-lvlm-recipe.md`` (position heads and code) and
``docs/experiments/2026-12-04-lvlm-where-position-is-lost.md`` and
``docs/experiments/2026-12-04-lvlm-object-boxes-and-type-curriculum.md``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from vlmcompress.config import load_params  # noqa: E402


def _fit_predict(x, y, train, test):
    """Least squares with a bias on rows ``train`` of ``x [M, D]`` -> ``y [M, C]``; the
    predictions for rows ``test``."""
    import torch

    X = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.double)], 1)
    W = torch.linalg.lstsq(X[train], y.double()[train]).solution
    return X[test] @ W


def probe_accuracy(x, target, train, test, mask) -> float:
    """``x [M, D]`` features, ``target [M]`` class ids; fit on rows ``train``, score on the
    ``test`` rows where ``mask`` holds -> accuracy."""
    import torch

    onehot = torch.nn.functional.one_hot(target, int(target.max()) + 1)
    pred = _fit_predict(x, onehot, train, test).argmax(1)
    return (pred == target[test])[mask[test]].float().mean().item()


def probe_mae(x, target, train, test, mask) -> float:
    """Mean absolute error of a least-squares linear regression of ``target`` (a grid index) on
    ``x``, on the ``test`` rows where ``mask`` holds: the read-out for a position coded as a
    scalar along a direction, which a one-hot classifier cannot pick out of the middle."""
    pred = _fit_predict(x, target[:, None], train, test).squeeze(1)
    return (pred - target[test].double()).abs()[mask[test]].mean().item()


def probe_box_px(x, boxes, train, test, mask, side: int) -> float:
    """Mean absolute error in pixels of a ``side``-pixel image of a least-squares regression
    of ``boxes [M, 4]`` (in [-1, 1]) on ``x [M, D]``, fitted on the ``train`` rows and scored
    on the ``test`` rows, both restricted to where ``mask`` holds."""
    rows = mask.nonzero().squeeze(1)
    fit, score = rows[rows < train.stop], rows[rows >= test.start]
    pred = _fit_predict(x, boxes, fit, score)
    return side / 2 * (pred - boxes[score].double()).abs().mean().item()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=None)
    ap.add_argument("--llava", default=None, help="LLaVA folder to probe instead of the stage's")
    ap.add_argument("--clip", default=None, help="its CLIP folder (default: a clip/ beside --llava, else the stage's)")
    ap.add_argument("--scenes", type=int, default=400)
    args = ap.parse_args(argv)
    import torch

    from vlmcompress.api import model_paths
    from vlmcompress.config import ConfigError
    from vlmcompress.lvlm.load import ModelNotAvailableError, load_lvlm
    from vlmcompress.lvlm.pool import build_pool, to_pixels

    if args.scenes < 8:
        print("position_probe: --scenes must be at least 8", file=sys.stderr)
        return 1
    try:
        params = load_params(args.params)
        llava, clip = model_paths(params)
        beside = Path(args.llava).parent / "clip" if args.llava else None
        clip = args.clip or (str(beside) if beside is not None and beside.is_dir() else clip)
        lvlm = load_lvlm(args.llava or llava, clip)
    except (ConfigError, ModelNotAvailableError, OSError, ValueError) as exc:
        print(f"position_probe: {exc}", file=sys.stderr)
        return 1
    patch = lvlm.vision_tower.config.patch_size
    pool = build_pool(params.data.scenes, args.scenes, patch)
    images = to_pixels(pool.images)
    with torch.inference_mode():
        feats = lvlm.visual_features(images)
    n, (gh, g) = feats.tokens.shape[1], feats.grid
    cell = torch.arange(n).repeat(args.scenes)
    obj = (pool.labels[:, 0].flatten(1) > 0).flatten()
    boxes = pool.boxes.flatten(2).transpose(1, 2).flatten(0, 1)            # [scenes * N, 4]
    side = params.data.scenes.image_size
    split = args.scenes * 3 // 4 * n
    train, test = slice(0, split), slice(split, None)
    print(f"{args.llava or llava}: {args.scenes} scenes, grid {gh}x{g}, object patches "
          f"(chance: column {100 / g:.1f}%, row {100 / gh:.1f}%)")
    for name, x in (("tower feature layer", feats.hidden), ("projector output", feats.tokens)):
        flat = x.flatten(0, 1)
        col = probe_accuracy(flat, cell % g, train, test, obj)
        row = probe_accuracy(flat, cell // g, train, test, obj)
        mae_c = probe_mae(flat, cell % g, train, test, obj)
        mae_r = probe_mae(flat, cell // g, train, test, obj)
        box = probe_box_px(flat, boxes, train, test, obj, side)
        print(f"  {name:20s} column {100 * col:5.1f}%  row {100 * row:5.1f}%   "
              f"linear regression MAE: column {mae_c:.2f}, row {mae_r:.2f} cells; object box {box:.2f} px")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
