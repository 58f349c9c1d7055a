"""Prefill GFLOPs at each token budget, by the documented formula, for two model shapes.

    python scripts/flops_table.py [--params params.yaml] [--text-tokens 40] [--clip-tokens 16]

Whether prefill FLOPs at 10% of the tokens stay under 1/3 of full depends on the shape of the
model more than on the method: the vision tower runs on every patch whatever the budget. This
prints ``vlmcompress.tokens.flops.prefill_gflops`` for the stage's embedded model (dimensions
read from the saved folders) and for LLaVA-1.5-7B's published shapes (``LLAVA15_7B``, CLIP
ViT-L/14-336's text tower for the guidance), full and with text-guided recovery at
5/10/25/50% of the tokens: a formula, not a measurement. Results:
``docs/experiments/2026-12-03-status-history.md`` (FLOPs at 10 %) and
``docs/experiments/2026-12-03-attach-cost-and-decoder-fuzz.md``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from vlmcompress.tokens.flops import LLAVA15_7B, TextDims, prefill_gflops  # noqa: E402

# CLIP ViT-L/14-336's text tower: 12 layers of 768, MLP 3072, joint space 768.
CLIP_L_TEXT = TextDims(layers=12, width=768, intermediate=3072, proj_dim=768, vision_width=1024)
BUDGETS = (0.05, 0.10, 0.25, 0.50)


def table(name: str, dims, n_patches: int, n_text: int, clip_tokens: int) -> list[str]:
    """Rows ``name, budget, K, vision, lm, text, total, total/full`` for one model shape."""
    vision, projector, lm, text = dims
    full = prefill_gflops(n_patches=n_patches, n_visual=n_patches, n_text=n_text, vision=vision,
                          projector=projector, lm=lm)
    rows = [f"{name:10s} {'full':>6s} {n_patches:5d} {full['vision']:9.3f} {full['lm']:9.3f} {0.0:7.3f} "
            f"{full['total']:9.3f}  1.000  lm 1.000"]
    for b in BUDGETS:
        k = max(1, round(b * n_patches))
        g = prefill_gflops(n_patches=n_patches, n_visual=k, n_text=n_text, vision=vision, projector=projector,
                           lm=lm, text=text, n_clip_tokens=clip_tokens)
        rows.append(f"{name:10s} {b:6.2f} {k:5d} {g['vision']:9.3f} {g['lm']:9.3f} {g['text']:7.3f} "
                    f"{g['total']:9.3f}  {g['total'] / full['total']:.3f}  lm {g['lm'] / full['lm']:.3f}")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=None)
    ap.add_argument("--text-tokens", type=int, default=40, help="LM prompt tokens besides the image")
    ap.add_argument("--clip-tokens", type=int, default=16, help="question tokens through CLIP's text tower")
    args = ap.parse_args(argv)
    from vlmcompress.config import ConfigError
    from vlmcompress.lvlm.load import ModelNotAvailableError
    from vlmcompress.api import lvlm_from_params
    from vlmcompress.tokens.flops import model_dims

    if args.text_tokens < 0 or args.clip_tokens < 0:
        print("flops_table: --text-tokens and --clip-tokens must be >= 0", file=sys.stderr)
        return 1
    try:
        lvlm = lvlm_from_params(args.params)
    except (ConfigError, ModelNotAvailableError, OSError, ValueError) as exc:
        print(f"flops_table: {exc}", file=sys.stderr)
        return 1
    gh, gw = lvlm.grid
    print(f"{'model':10s} {'budget':>6s} {'K':>5s} {'vision':>9s} {'lm':>9s} {'text':>7s} {'total':>9s}  "
          f"ratio (GFLOPs; ratio = total / full total)")
    for row in table("embedded", model_dims(lvlm), gh * gw, args.text_tokens, args.clip_tokens):
        print(row)
    for row in table("llava-7b", (*LLAVA15_7B, CLIP_L_TEXT), 576, args.text_tokens, args.clip_tokens):
        print(row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
