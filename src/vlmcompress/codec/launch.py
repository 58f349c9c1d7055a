"""Train one codec from the command line, in one process or under ``accelerate launch``.

::

    python -m vlmcompress.codec.launch CONFIG --images DIR --out DIR [options]
    accelerate launch --multi_gpu --num_processes 2 -m vlmcompress.codec.launch CONFIG ...

``CONFIG``: a YAML/JSON file holding one codec's ``model``, ``loss`` and ``train``
sections, or a project ``params.yaml`` (its codec stage's variant ``--variant``). Every
process runs this same command; :func:`~vlmcompress.codec.train.train_codec` splits each
global batch over them and only the main process writes ``--out``. On CPU-only machines
the processes join over gloo (``ACCELERATE_USE_CPU=1`` is then implied).
"""
from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlmcompress.codec.config import CodecParams
from vlmcompress.codec.losses import TokenFn
from vlmcompress.config import from_dict, load_params, read_yaml


def read_codec_params(path: str | Path, variant: str = "ours") -> CodecParams:
    """One codec's params: a file of ``model``/``loss``/``train``, or a project params
    file (with a ``codec`` section) and the name of one of its stage's codecs."""
    path = Path(path)
    data = read_yaml(path)
    if isinstance(data, dict) and "codec" in data:
        from vlmcompress.codec.variants import model_variants

        variants = model_variants(load_params(path).codec)
        if variant not in variants:
            raise ValueError(f"{path}: no codec {variant!r} (codecs: {', '.join(variants)})")
        return variants[variant]
    return from_dict(CodecParams, data, str(path), strict=True)


def load_token_fn(spec: str) -> TokenFn:
    """``module:callable`` -> ``callable()``: a factory of the frozen vision tower's token
    function (``x [B,3,H,W] -> [B,N,D]``), imported by every process."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"--token-fn: expected module:callable, got {spec!r}")
    return getattr(importlib.import_module(module), name)()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m vlmcompress.codec.launch",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("config", type=Path, help="codec params (model/loss/train) or a project params.yaml")
    ap.add_argument("--variant", default="ours", help="the stage codec to train from a params.yaml")
    ap.add_argument("--images", type=Path, required=True, help="folder of training images")
    ap.add_argument("--out", type=Path, required=True,
                    help="training output folder (model/, checkpoint/, curves.csv)")
    ap.add_argument("--token-fn", default=None, help="module:callable returning the token function")
    ap.add_argument("--init-from", type=Path, default=None, help="a saved codec a fresh run starts from")
    ap.add_argument("--stop-at", type=int, default=None, help="stop after this global step")
    ap.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> Any:
    """Train as the arguments say; returns the :class:`~vlmcompress.codec.train.TrainResult`."""
    from vlmcompress.codec.data import RecordImages
    from vlmcompress.codec.train import make_accelerator, train_codec
    from vlmcompress.data.folders import list_image_files

    args = parse_args(argv)
    params = read_codec_params(args.config, args.variant)
    accelerator = make_accelerator()
    token_fn = load_token_fn(args.token_fn) if args.token_fn else None
    images = RecordImages(list_image_files(args.images), params.train.patch_size)
    result = train_codec(params, images, token_fn, args.out, resume=not args.no_resume,
                         stop_at=args.stop_at, accelerator=accelerator, init_from=args.init_from)
    if accelerator.is_main_process:
        print(f"{result.steps_this_run} steps in {result.seconds:.1f} s on {accelerator.num_processes} "
              f"process(es); model in {args.out}", flush=True)
    return result


def _cli() -> int:
    """``main`` with one-line errors (exit 1) instead of tracebacks."""
    import sys
    try:
        main()
    except KeyboardInterrupt:
        print("vlmcompress.codec.launch: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as exc:
        line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        print(f"vlmcompress.codec.launch: error: {line}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(_cli())
