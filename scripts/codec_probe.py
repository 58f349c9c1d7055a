"""What a trained codec keeps of the objects the LVLM is asked about.

    python scripts/codec_probe.py outputs/codec/models/ours [more model dirs] [--images 32] [--rates 0 1.5 3]

For each codec and rate, on the first ``--images`` test scenes regenerated with their dense
labels: the estimated bpp, the token MSE on object and on background patches (the LVLM
features the codec is trained on), and how often the embedded tower's own per-patch heads
(colour, shape; trained in the LVLM's phase A, kept in ``outputs/lvlm/checkpoints``) still
read the right colour and shape of an object patch from the reconstruction. The first row,
``uncoded``, is what they read from the originals (the ceiling). Embedded profile only; writes
nothing. Results: ``docs/experiments/2026-12-03-codec-losses-warm-start.md`` (the colour term).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--params", default=None)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--rates", type=float, nargs="+", default=[0.0, 1.5, 3.0])
    args = ap.parse_args(argv)
    import numpy as np
    import pandas as pd
    import torch

    from vlmcompress.codec.losses import bpp_from_likelihoods
    from vlmcompress.api import lvlm_from_params, lvlm_token_fn
    from vlmcompress.codec.train import load_codec
    from vlmcompress.config import load_params
    from vlmcompress.data.scenes import STREAMS, make_scene
    from vlmcompress.lvlm.labels import patch_labels
    from vlmcompress.lvlm.train import Trainer
    from vlmcompress.paths import outputs_dir

    from vlmcompress.config import ConfigError

    try:
        params = load_params(args.params)
        models = {path: load_codec(path).eval() for path in args.models}
    except (ConfigError, OSError, ValueError) as exc:
        print(f"codec_probe: {exc}", file=sys.stderr)
        return 1
    if params.lvlm.source != "train":
        print("codec_probe: needs the embedded LVLM (lvlm.source: train)", file=sys.stderr)
        return 1
    trainer = Trainer(params.lvlm, params.data.scenes, outputs_dir("lvlm", "checkpoints"), seed=params.seed, log=lambda m: None)
    trainer._load_weights("after_clip", "clip")          # the dense heads of phase A
    heads = trainer.heads.eval()
    token_fn = lvlm_token_fn(lvlm_from_params(params))
    S = params.data.scenes
    scenes = [make_scene(S, STREAMS["test"], i, n_questions=0) for i in range(args.images)]
    x = torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2).float() / 255.0
    patch = params.lvlm.arch.patch_size
    lab = torch.from_numpy(np.stack([patch_labels(s.objects, S.image_size, patch) for s in scenes]))
    lab = lab.flatten(2).transpose(1, 2)                                            # [B, N, 4]
    obj = lab[..., 0] > 0
    rows = []

    def readout(t: "torch.Tensor") -> dict[str, float]:
        return {"colour_acc_obj": (heads.color(t).argmax(-1) == lab[..., 0])[obj].float().mean().item(),
                "shape_acc_obj": (heads.shape(t).argmax(-1) == lab[..., 1])[obj].float().mean().item()}

    with torch.no_grad():
        ref = token_fn(x)
        # The ceiling: what the heads read from the uncoded images.
        rows.append({"codec": "uncoded", "rate": float("nan"), "bpp_est": float("nan"),
                     "token_mse_obj": 0.0, "token_mse_bg": 0.0, **readout(ref)})
        for path, model in models.items():
            for rate in args.rates:
                out = model(x, rate, ref if model.needs_tokens else None)
                t = token_fn(out["x_hat"].clamp(0, 1))
                err = (t - ref).pow(2).mean(-1)
                rows.append({"codec": path, "rate": rate,
                             "bpp_est": bpp_from_likelihoods(out["likelihoods"], x.shape[0] * x.shape[2] * x.shape[3]).item(),
                             "token_mse_obj": err[obj].mean().item(), "token_mse_bg": err[~obj].mean().item(),
                             **readout(t)})
    print(pd.DataFrame(rows).round(4).to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
