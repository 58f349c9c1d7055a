"""CompressAI's own evaluation tool on this package's codec, with real files.

CompressAI's ``python -m compressai.utils.eval_model`` looks an architecture up by name in
two public dicts, ``compressai.zoo.image_models`` (the ``-a`` choices) and
``compressai.zoo.image.model_architectures`` (whose ``from_state_dict`` rebuilds a model from
a ``torch.load``-ed checkpoint). :func:`register` adds :data:`ARCH` to both (entries of data,
no class of CompressAI is changed) and this module's command line then runs CompressAI's
``eval_model.main`` itself::

    python -m vlmcompress.codec.compressai_tools checkpoint IMAGES -a vlmcompress \\
        -p outputs/codec/models/ours [--rates 0,1.5,3] [--params params.yaml] [other eval_model options]

``-p`` takes saved codec folders (``codec.json`` + ``model.safetensors``) or checkpoint
files written by :func:`write_checkpoint`. The codec is variable-rate: each folder is
evaluated once per rate of ``--rates`` (default: every integer level), each a separate
"checkpoint" run of CompressAI, so its JSON lists one bpp / PSNR / MS-SSIM per rate.

What the numbers are: ``compress`` returns the whole file :func:`~vlmcompress.codec.coder.
encode_image` writes (header included) as the only string, so eval_model's bpp is the file
size over the pixels, and ``decompress`` decodes that file. eval_model zero-pads every image
to multiples of 64 px before ``compress``; on sides that are multiples of 64 the file is
byte for byte the one ``vlmcompress encode`` writes, otherwise it is the file of the padded
image (as for every CompressAI model), a little larger. ``--entropy-estimation`` reports the
likelihoods' bits instead (no file). A codec whose pre-editing net fuses LVLM tokens needs
the vision tower at encode time: the pipeline's (``--params``) or ``--token-fn module:callable``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vlmcompress.codec.bitstream import coded_rate
from vlmcompress.codec.losses import TokenFn
from vlmcompress.codec.model import LVLMCodec, build_codec, check_rate, saved_state_dict, weights_hash

ARCH = "vlmcompress"                      # the ``-a`` name in CompressAI's tools
CONFIG_KEY = "vlmcompress.codec_json"     # non-tensor entries of a checkpoint's state dict
RATE_KEY = "vlmcompress.rate"
_token_fn: TokenFn | None = None          # what models built by from_state_dict encode with


class CompressAICodec(nn.Module):
    """One saved codec at one rate, with the interface CompressAI's ``eval_model`` calls.

    ``compress(x [1,3,H,W] in [0,1]) -> {"strings": [[file bytes]], "shape": (H, W)}``;
    ``decompress(strings, shape) -> {"x_hat": [1,3,H,W]}``; ``forward(x)`` ->
    ``{"x_hat", "likelihoods"}`` (entropy estimation).
    """

    def __init__(self, codec: LVLMCodec, rate: float, token_fn: TokenFn | None = None):
        super().__init__()
        self.codec = codec
        self.rate = coded_rate(check_rate(rate, codec.levels))   # the rate a file carries
        self.token_fn = token_fn
        if codec.needs_tokens and token_fn is None:
            raise ValueError("this codec's pre-editing net fuses LVLM tokens: give a token function "
                             "(--params for the pipeline's vision tower, or --token-fn module:callable)")

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, Any]) -> CompressAICodec:
        """Rebuild from a :func:`write_checkpoint` state dict (weights checked against their hash)."""
        from vlmcompress.codec.config import CodecModelParams
        from vlmcompress.schema import from_dict

        state = dict(state_dict)
        if CONFIG_KEY not in state or RATE_KEY not in state:
            raise ValueError(f"not a {ARCH} checkpoint (no {CONFIG_KEY!r} / {RATE_KEY!r}); write one "
                             f"with vlmcompress.codec.compressai_tools.write_checkpoint")
        record = json.loads(state.pop(CONFIG_KEY))
        rate = float(state.pop(RATE_KEY))
        codec = build_codec(from_dict(CodecModelParams, record.get("model"), "checkpoint model"))
        result = nn.Module.load_state_dict(codec, state, strict=False)
        wanted = set(saved_state_dict(codec))
        missing = sorted(wanted & set(result.missing_keys))
        if missing or result.unexpected_keys:
            raise ValueError(f"checkpoint weights do not match its config (missing {missing[:3]}, "
                             f"unexpected {result.unexpected_keys[:3]})")
        if weights_hash(codec).hex() != record.get("model_hash"):
            raise ValueError("checkpoint weights do not match the model_hash of its config")
        return cls(codec, rate, _token_fn)

    def update(self, scale_table: Tensor | None = None, force: bool = False, **kwargs: Any) -> bool:
        return self.codec.update(scale_table=scale_table, force=force)

    def _tokens(self, x: Tensor) -> Tensor | None:
        if not self.codec.needs_tokens:
            return None
        with torch.no_grad():
            return self.token_fn(x)

    def forward(self, x: Tensor) -> dict[str, Any]:
        out = self.codec(x.float(), self.rate, self._tokens(x.float()))
        return {"x_hat": out["x_hat"].clamp(0, 1), "likelihoods": out["likelihoods"]}

    def compress(self, x: Tensor) -> dict[str, Any]:
        from vlmcompress.codec.coder import encode_image, tensor_to_image

        img = tensor_to_image(x.float())    # eval_model's input is 8-bit: exact
        data = encode_image(self.codec, img, self.rate, token_fn=self.token_fn,
                            max_pixels=img.shape[0] * img.shape[1])
        return {"strings": [[data]], "shape": tuple(img.shape[:2])}

    def decompress(self, strings: Sequence[Sequence[bytes]], shape: Sequence[int]) -> dict[str, Tensor]:
        from vlmcompress.codec.coder import decode_image, image_to_tensor

        h, w = shape
        img = decode_image(self.codec, strings[0][0], max_pixels=int(h) * int(w))
        device = next(self.codec.parameters()).device
        return {"x_hat": image_to_tensor(img, max_pixels=img.shape[0] * img.shape[1]).to(device)}


def _no_pretrained(*args: Any, **kwargs: Any) -> nn.Module:
    raise ValueError(f"{ARCH}: no pretrained weights ship; evaluate a saved codec with "
                     f"`checkpoint IMAGES -a {ARCH} -p MODEL_DIR`")


def register() -> None:
    """Make :data:`ARCH` known to CompressAI's zoo lookups (idempotent)."""
    import compressai.zoo
    import compressai.zoo.image

    compressai.zoo.image_models.setdefault(ARCH, _no_pretrained)
    compressai.zoo.models.setdefault(ARCH, _no_pretrained)
    compressai.zoo.image.model_architectures.setdefault(ARCH, CompressAICodec)


@contextlib.contextmanager
def using_token_fn(token_fn: TokenFn | None) -> Iterator[None]:
    """Models that ``from_state_dict`` builds inside the block encode with ``token_fn``."""
    global _token_fn
    before, _token_fn = _token_fn, token_fn
    try:
        yield
    finally:
        _token_fn = before


def write_checkpoint(model_dir: str | Path, rate: float, path: str | Path) -> Path:
    """A ``torch.load``-able file CompressAI's ``load_checkpoint`` hands to ``from_state_dict``:
    ``{"state_dict": weights + the codec's config + the rate}``."""
    from vlmcompress.codec.train import load_codec, read_codec_record, resolve_model_dir

    folder = resolve_model_dir(model_dir)
    codec = load_codec(folder)                 # checks the weights against codec.json
    check_rate(rate, codec.levels)
    record = read_codec_record(folder)
    state: dict[str, Any] = dict(saved_state_dict(codec))
    state[CONFIG_KEY] = json.dumps({"model": record["model"], "model_hash": record["model_hash"]})
    state[RATE_KEY] = float(rate)
    torch.save({"state_dict": state}, str(path))
    return Path(path)


def parse_rates(text: str | None, levels: int) -> list[float]:
    """``"0,1.5,3"`` -> rates in ``[0, levels-1]``; ``None``/``""``: every integer level."""
    if not text:
        return [float(r) for r in range(levels)]
    try:
        rates = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--rates: expected comma-separated numbers, got {text!r}") from None
    bad = [r for r in rates if not 0 <= r <= levels - 1]
    if not rates or bad:
        raise ValueError(f"--rates: need rates in [0, {levels - 1}], got {text!r}")
    return rates


def _load_token_fn(args: argparse.Namespace, model_dirs: Sequence[Path]) -> TokenFn | None:
    """``--token-fn``, else the pipeline's vision tower when a codec folder fuses tokens, else None."""
    from vlmcompress.codec.config import CodecModelParams
    from vlmcompress.codec.train import read_codec_record
    from vlmcompress.schema import from_dict

    def fuses(folder: Path) -> bool:
        pre = from_dict(CodecModelParams, read_codec_record(folder).get("model"), "model").preedit
        return pre.enabled and pre.use_tokens

    if args.token_fn:
        from vlmcompress.codec.launch import load_token_fn
        return load_token_fn(args.token_fn)
    if not any(fuses(d) for d in model_dirs):
        return None
    from vlmcompress.codec.target import lvlm_token_fn
    from vlmcompress.config import load_params
    from vlmcompress.lvlm.load import lvlm_from_params
    return lvlm_token_fn(lvlm_from_params(load_params(args.params)))


def _split_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(prog="python -m vlmcompress.codec.compressai_tools", add_help=False)
    ap.add_argument("-p", "--path", dest="paths", nargs="+", default=None)
    ap.add_argument("--rates", default=None)
    ap.add_argument("--params", default=None)
    ap.add_argument("--token-fn", default=None)
    return ap.parse_known_args(list(argv))


USAGE = f"""usage: python -m vlmcompress.codec.compressai_tools checkpoint IMAGES -a {ARCH} -p MODEL_DIR [MODEL_DIR ...]
         [--rates R1,R2,...] [--params PARAMS.yaml | --token-fn module:callable] [eval_model options]

Runs CompressAI's eval_model with the codec registered as '{ARCH}'. MODEL_DIR: a saved codec
folder (codec.json + model.safetensors) or a checkpoint file of write_checkpoint. --rates:
rates in [0, levels-1] to evaluate each codec at (default: every integer level).
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Translate model folders and rates into checkpoint files, then run CompressAI's eval_model."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    register()
    from compressai.utils.eval_model.__main__ import main as eval_main

    ours, rest = _split_args(argv)
    if "checkpoint" not in rest:
        eval_main(rest)        # pretrained models and eval_model's own errors, as CompressAI says them
        return 0
    if not ours.paths:
        raise SystemExit(f"-p/--path: give saved codec folders or checkpoint files\n{USAGE}")
    if "-a" not in rest and "--architecture" not in rest:
        rest += ["-a", ARCH]
    with tempfile.TemporaryDirectory(prefix="vlmc-eval-") as tmp:
        files, folders = [], []
        for i, p in enumerate(ours.paths):
            path = Path(p)
            if path.is_file():
                files.append(str(path))
                continue
            from vlmcompress.codec.train import read_codec_record, resolve_model_dir
            folder = resolve_model_dir(path)
            record = read_codec_record(folder)      # one-line error for a folder without a codec
            folders.append(folder)
            for rate in parse_rates(ours.rates, int(record["model"]["levels"])):
                # eval_model names a run after the file, less its last 8 characters (".tar.pth")
                name = f"{folder.parent.name if folder.name == 'model' else folder.name}-{i}-rate{rate:g}"
                files.append(str(write_checkpoint(folder, rate, Path(tmp) / f"{name}.tar.pth")))
        with using_token_fn(_load_token_fn(ours, folders)):
            eval_main(rest + ["-p", *files])
    return 0


def cli(argv: Sequence[str] | None = None) -> int:
    """``main`` with bad input reported in one line on stderr (exit status 2)."""
    try:
        return main(argv)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
