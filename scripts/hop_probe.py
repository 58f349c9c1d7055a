"""Where does the LM look from an object's word? The hop head's attention, split by what it lands on.

    python scripts/hop_probe.py MODEL [--layer 1] [--heads 1] [--images 120] [--split val]

``MODEL`` is a folder with ``llava/`` and ``clip/`` (``outputs/lvlm/model``, a trial's
``<work>/model`` or a matrix cell's ``outputs/lvlm/model``). For the first object phrase of
every question of the first ``--images`` images of ``--split``, the attention of LM layer
``--layer`` (mean of its first ``--heads`` heads) from the phrase's head word ("cube" in "is
there a red cube?"), as the share on the named objects' patches, on other objects of the same
shape, of the same colour, on the other objects, the background and the text
(``vlmcompress.lvlm.probe.hop_attention``), per question type, ``+`` / ``-`` for whether the
scene holds the named object. A hop that reads the shape word alone puts a red cube's mass on
every cube; so it also prints, for each earlier layer, each head's mass from the head word on
the colour word right before it ("red"), the step that puts the colour into the word. Results: ``docs/experiments/2026-12-05-lvlm-phrase-look.md``.
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
    ap.add_argument("model", type=Path, help="folder with llava/ and clip/")
    ap.add_argument("--layer", type=int, default=1)
    ap.add_argument("--heads", type=int, default=1, help="mean of the layer's first this many heads (0: all)")
    ap.add_argument("--images", type=int, default=120)
    ap.add_argument("--split", default="val", choices=("train", "val", "test"))
    ap.add_argument("--params", default=None)
    args = ap.parse_args(argv)
    import pandas as pd

    from vlmcompress.api import dataset_root
    from vlmcompress.config import ConfigError
    from vlmcompress.data.records import load_split
    from vlmcompress.eval.tasks import file_images
    from vlmcompress.lvlm.adapter import Prompts
    from vlmcompress.lvlm.load import ModelNotAvailableError, load_lvlm
    from vlmcompress.lvlm.probe import hop_attention

    if not (args.model / "llava").is_dir() or not (args.model / "clip").is_dir():
        print(f"hop_probe: {args.model} has no llava/ and clip/ folders", file=sys.stderr)
        return 2
    try:
        L = load_params(args.params).lvlm
        lvlm = load_lvlm(str(args.model / "llava"), str(args.model / "clip"),
                         prompts=Prompts(**dataclasses.asdict(L.prompts)), attn_layer=L.attn_layer)
        layers = lvlm.language_model.config.num_hidden_layers
        if not 0 <= args.layer < layers:
            raise ValueError(f"--layer {args.layer}: the LM has layers 0..{layers - 1}")
        records = load_split(dataset_root(), args.split)[: args.images]
    except (ConfigError, ModelNotAvailableError, OSError, ValueError) as exc:
        print(f"hop_probe: {exc}", file=sys.stderr)
        return 2
    out = hop_attention(lvlm, records, args.layer, args.heads, file_images)
    if out is None:
        print("the records carry no scenes colour/shape attributes: nothing to probe", file=sys.stderr)
        return 1
    shares, colour = out
    print(f"{args.model}: LM layer {args.layer}, heads {args.heads or 'all'}; attention share, %")
    print(pd.DataFrame(shares).T.astype({"n": int}).to_string())
    for layer, per_head in colour.items():
        print(f"layer {layer}, each head's attention on the colour word before the head word, %: {per_head}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
