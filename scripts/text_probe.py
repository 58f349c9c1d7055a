"""Does the CLIP text tower point a question at the patches it asks about?

    python scripts/text_probe.py [--params params.yaml] [--clip FOLDER] [--images 200] [--k 13]

Loads the stage's LVLM (or its LLaVA with the CLIP folder ``--clip``), then for every question
of the first ``--images`` test images prints, per question type, the precision of the ``--k``
patches most similar to the question (beside the base rate of relevant patches) and how often
the most similar patch is relevant (``vlmcompress.lvlm.probe.text_localisation``, which the
``lvlm`` stage also runs on ``lvlm.eval.text_probe_images`` images). Results:
``docs/experiments/2026-12-03-embedded-lvlm-recipe.md`` (phase A2).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from vlmcompress.config import load_params  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=None)
    ap.add_argument("--clip", default=None, help="CLIP folder to use instead of the stage's")
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--k", type=int, default=13)
    args = ap.parse_args(argv)
    import pandas as pd

    from vlmcompress.data.records import load_split
    from vlmcompress.api import dataset_root, model_paths
    from vlmcompress.eval.tasks import file_images
    from vlmcompress.lvlm.adapter import Prompts
    from vlmcompress.lvlm.load import load_lvlm
    from vlmcompress.lvlm.probe import text_localisation

    from vlmcompress.config import ConfigError
    from vlmcompress.lvlm.load import ModelNotAvailableError

    try:
        params = load_params(args.params)
        llava, clip = model_paths(params)
        L = params.lvlm
        lvlm = load_lvlm(llava, args.clip or clip, prompts=Prompts(**dataclasses.asdict(L.prompts)),
                         attn_layer=L.attn_layer, dtype=L.dtype, device=L.device)
        records = load_split(dataset_root(), "test")[: args.images]
    except (ConfigError, ModelNotAvailableError, OSError, ValueError) as exc:
        print(f"text_probe: {exc}", file=sys.stderr)
        return 1
    out = text_localisation(lvlm, records, args.k, file_images)
    if out is None:
        print("the test records carry no scenes colour/shape attributes: nothing to probe", file=sys.stderr)
        return 1
    print(f"text tower: {args.clip or clip}; top-{args.k} patches; percentages")
    print(pd.DataFrame(out).T.to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
