"""Command line: ``vlmcompress check-params | encode | decode``.

Every failure a user can cause (wrong path, corrupt file, bad params) prints one line to
stderr and exits non-zero; nothing half-written is left behind (outputs are atomic).
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence


def _check_params(args: argparse.Namespace) -> int:
    from vlmcompress.codec.config import check_stage_params
    from vlmcompress.config import load_params
    check_stage_params(load_params(args.params).codec)
    print(f"{args.params or 'params.yaml'}: ok")
    return 0


def _token_fn(model_dir: str, params_path: str | None):
    """The LVLM vision tower when the codec's pre-editing net fuses tokens, else None.

    Decided from the codec's saved config, so the weights are loaded once (by ``encode_file``).
    """
    from vlmcompress.codec.config import CodecModelParams
    from vlmcompress.codec.train import read_codec_record, resolve_model_dir
    from vlmcompress.config import from_dict
    record = read_codec_record(resolve_model_dir(model_dir))
    pre = from_dict(CodecModelParams, record.get("model"), "model").preedit
    if not (pre.enabled and pre.use_tokens):
        return None
    from vlmcompress.codec.stage import lvlm_token_fn
    from vlmcompress.config import load_params
    from vlmcompress.lvlm.stage import load_stage_lvlm
    return lvlm_token_fn(load_stage_lvlm(load_params(params_path)))  # the stage's token target


def _encode(args: argparse.Namespace) -> int:
    from vlmcompress.codec.coder import encode_file
    model_dir = args.model or _default_model()
    info = encode_file(model_dir, args.input, args.output, args.rate, token_fn=_token_fn(model_dir, args.params))
    print(json.dumps(info))
    return 0


def _decode(args: argparse.Namespace) -> int:
    from vlmcompress.codec.coder import decode_file
    print(json.dumps(decode_file(args.input, args.output, args.model)))
    return 0


def _default_model() -> str:
    from vlmcompress.paths import outputs_dir
    path = outputs_dir("codec", "models", "ours")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no trained codec; run `make repro` or pass --model DIR")
    return str(path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlmcompress", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check-params", help="validate a params file (default: the project's params.yaml)")
    c.add_argument("params", nargs="?", default=None)
    c.set_defaults(func=_check_params)
    e = sub.add_parser("encode", help="compress an image with the LVLM-oriented codec")
    e.add_argument("input")
    e.add_argument("output")
    e.add_argument("--rate", type=float, required=True, help="rate level in [0, levels-1] (continuous)")
    e.add_argument("--model", default=None, help="codec folder (default: outputs/codec/models/ours)")
    e.add_argument("--params", default=None, help="params file naming the LVLM (for token-fusing codecs)")
    e.set_defaults(func=_encode)
    d = sub.add_parser("decode", help="decode a file written by `vlmcompress encode` to PNG")
    d.add_argument("input")
    d.add_argument("output")
    d.add_argument("--model", default=None, help="codec folder (default: found by the file's model hash)")
    d.set_defaults(func=_decode)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    # compressai 1.2.8 calls torch.jit.script at import; the deprecation notice is not the user's concern.
    warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"vlmcompress {args.command}: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
