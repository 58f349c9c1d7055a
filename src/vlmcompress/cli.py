"""Command line: ``vlmcompress check-params | encode | decode | run``.

Every failure prints one line to stderr and exits non-zero, whatever the input: a wrong
path, a folder, FIFO or device where a file is expected, a corrupt or hostile file, bad
params, running out of memory, Ctrl-C (exit 130) or SIGTERM (exit 143). Nothing
half-written is left behind (outputs are atomic) and nothing but the named output file
is ever replaced.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import warnings
from collections.abc import Sequence
from typing import Any


def _check_params(args: argparse.Namespace) -> int:
    from vlmcompress.config import load_params
    load_params(args.params)          # every key's type and value, every section
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
    from vlmcompress.api import lvlm_from_params, lvlm_token_fn
    return lvlm_token_fn(lvlm_from_params(params_path))  # the stage's token target


def _max_pixels(args: argparse.Namespace) -> int:
    """``--max-pixels``, else ``codec.max_pixels`` of ``--params``, else the package default."""
    from vlmcompress.codec.coder import MAX_PIXELS
    if args.max_pixels is not None:
        if args.max_pixels < 1:
            raise ValueError(f"--max-pixels must be >= 1, got {args.max_pixels}")
        return args.max_pixels
    if args.params is not None:
        from vlmcompress.config import load_params
        return load_params(args.params).codec.max_pixels
    return MAX_PIXELS


def _encode(args: argparse.Namespace) -> int:
    from vlmcompress.codec.coder import encode_file
    from vlmcompress.io import check_regular_file
    from vlmcompress.io import check_output
    check_regular_file(args.input)       # before loading any model
    check_output(args.output)
    max_pixels = _max_pixels(args)
    model_dir = args.model or _default_model()
    info = encode_file(model_dir, args.input, args.output, args.rate, token_fn=_token_fn(model_dir, args.params),
                       max_pixels=max_pixels)
    print(json.dumps(info))
    return 0


def _decode(args: argparse.Namespace) -> int:
    from vlmcompress.codec.coder import decode_file
    print(json.dumps(decode_file(args.input, args.output, args.model, max_pixels=_max_pixels(args))))
    return 0


def _default_model() -> str:
    from vlmcompress.paths import outputs_dir
    path = outputs_dir("codec", "models", "ours")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no trained codec; run `make repro` or pass --model DIR")
    return str(path)


# The stages ``run`` starts: the heavy ones, which also run on several processes.
RUNNABLE = ("codec", "eval_codec", "tokens")


def _run(args: argparse.Namespace) -> int:
    """Run one stage's function (the one its notebook calls) on the project's data set.

    Under ``accelerate launch`` every process runs this same command: codec training splits
    each batch over the processes, the evaluations split their images and questions; the main
    process writes the stage's outputs and prints the summary line."""
    from vlmcompress.config import load_params
    from vlmcompress.data.dataset import load_all
    from vlmcompress.distributed import current
    from vlmcompress.paths import outputs_dir

    params = load_params(args.params)       # every key checked before any model loads
    procs = current()
    splits = load_all()
    progress = procs.is_main        # bars on stderr: the main process's share of the work
    log = procs.main_log(print)
    if args.stage == "tokens":
        from vlmcompress.tokens.stage import run_tokens_stage
        run_tokens_stage(params, splits, log=log, progress=progress, procs=procs)
    elif args.stage == "eval_codec":
        from vlmcompress.eval.codec_stage import run_eval_codec_stage
        run_eval_codec_stage(params, splits, log=log, progress=progress, procs=procs)
    else:
        from vlmcompress.codec.stage import run_codec_stage
        run_codec_stage(params, splits, log=log)
    if procs.is_main:
        print(f"{args.stage}: wrote {outputs_dir(args.stage) / 'metrics.json'} on {procs.world} process(es)")
    return 0


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
    e.add_argument("--max-pixels", type=int, default=None, help="largest image accepted (default: codec.max_pixels)")
    e.set_defaults(func=_encode)
    d = sub.add_parser("decode", help="decode a file written by `vlmcompress encode` to PNG")
    d.add_argument("input")
    d.add_argument("output")
    d.add_argument("--model", default=None, help="codec folder (default: found by the file's model hash)")
    d.add_argument("--params", default=None, help="params file whose codec.max_pixels bounds the image size")
    d.add_argument("--max-pixels", type=int, default=None, help="largest image accepted (default: codec.max_pixels)")
    d.set_defaults(func=_decode)
    r = sub.add_parser("run", help="run a heavy stage here, or on several processes under `accelerate launch`",
                       description="Run the function a stage's notebook calls, on the project's data set and "
                                   "params: `vlmcompress run tokens`, or `accelerate launch -m vlmcompress run "
                                   "tokens` to share the work over processes (GPUs).")
    r.add_argument("stage", choices=RUNNABLE)
    r.add_argument("--params", default=None, help="params file (default: the project's params.yaml)")
    r.set_defaults(func=_run)
    return p


def _one_line(exc: BaseException) -> str:
    """The first line of an error's message, at most 300 characters."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= 300 else line[:297] + "..."


def _sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)     # unwinds: atomic outputs remove their temporaries


def main(argv: Sequence[str] | None = None) -> int:
    # compressai 1.2.8 calls torch.jit.script at import; the deprecation notice is not the user's concern.
    warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
    args = build_parser().parse_args(argv)
    prefix = f"vlmcompress {args.command}: error:"
    previous = signal.signal(signal.SIGTERM, _sigterm) if _main_thread() else None
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"vlmcompress {args.command}: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print(f"{prefix} out of memory", file=sys.stderr)
        return 1
    except (ValueError, OSError, RuntimeError) as exc:    # user errors: files, params, data
        print(f"{prefix} {_one_line(exc)}", file=sys.stderr)
        return 1
    except Exception as exc:                                 # a bug: still one line, and a distinct exit
        print(f"{prefix} internal error ({type(exc).__name__}: {_one_line(exc)})", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
