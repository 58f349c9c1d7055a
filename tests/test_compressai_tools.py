"""CompressAI's eval_model on a tiny saved codec: real-file bpp and PSNR / MS-SSIM as ours."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import compressai.zoo
import compressai.zoo.image
from vlmcompress.codec import compressai_tools as tools
from vlmcompress.codec.coder import decode_image, encode_image
from vlmcompress.codec.model import build_codec
from vlmcompress.codec.train import load_codec, save_codec
from vlmcompress.eval.quality import ms_ssim, psnr, to_tensor

from codec_helpers import TinyTokens, lively, make_image, model_params

SIDE = 192      # a multiple of 64 (eval_model pads to 64) and > 160 (pytorch_msssim's floor)


def tiny_tokens() -> TinyTokens:
    """``--token-fn`` factory for the tests (module:callable)."""
    return TinyTokens()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("cai")
    torch.manual_seed(0)
    save_codec(lively(build_codec(model_params(preedit=False))), root / "plain")
    save_codec(lively(build_codec(model_params(use_tokens=True)), seed_edit=3), root / "tokens")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    imgs = {"a": make_image(SIDE, SIDE),
            "b": np.clip(make_image(SIDE, SIDE).astype(int) + rng.integers(-30, 30, (SIDE, SIDE, 3)),
                         0, 255).astype(np.uint8)}
    for k, img in imgs.items():
        Image.fromarray(img).save(images / f"{k}.png")
    return {"root": root, "images": images, "imgs": imgs}


def run_eval(argv: list[str], capsys) -> dict:
    assert tools.main(argv) == 0
    out = capsys.readouterr().out
    return json.loads(out[out.index("{"):])


def ours(model_dir: Path, imgs: dict, rate: float, token_fn=None) -> dict[str, float]:
    """Mean bpp (real file), PSNR and MS-SSIM over the images, from our coder and metrics."""
    model = load_codec(model_dir)
    bpp, p, m = [], [], []
    for img in imgs.values():
        data = encode_image(model, img, rate, token_fn=token_fn)
        dec = decode_image(model, data)
        x, y = to_tensor(img).double(), to_tensor(dec).double()
        bpp.append(8 * len(data) / (img.shape[0] * img.shape[1]))
        p.append(float(psnr(x, y)[0]))
        m.append(float(ms_ssim(x, y)[0]))
    return {"bpp": float(np.mean(bpp)), "psnr": float(np.mean(p)), "ms_ssim": float(np.mean(m))}


def test_register_adds_dict_entries_only() -> None:
    tools.register()
    tools.register()   # idempotent
    assert compressai.zoo.image.model_architectures[tools.ARCH] is tools.CompressAICodec
    assert tools.ARCH in compressai.zoo.image_models
    with pytest.raises(ValueError, match="no pretrained weights ship"):
        compressai.zoo.image_models[tools.ARCH](quality=1)


def test_eval_model_prints_real_file_bpp_and_our_psnr(world, capsys) -> None:
    out = run_eval(["checkpoint", str(world["images"]), "-a", tools.ARCH, "-p", str(world["root"] / "plain"),
                    "--rates", "0,2"], capsys)
    res = out["results"]
    assert out["name"].startswith(tools.ARCH) and len(res["bpp"]) == 2
    for i, rate in enumerate((0.0, 2.0)):
        want = ours(world["root"] / "plain", world["imgs"], rate)
        assert res["bpp"][i] == pytest.approx(want["bpp"], rel=1e-12)
        assert res["psnr-rgb"][i] == pytest.approx(want["psnr"], abs=1e-3)
        assert res["ms-ssim-rgb"][i] == pytest.approx(want["ms_ssim"], abs=1e-4)
    assert res["bpp"][0] < res["bpp"][1]          # rate 0 is the lowest rate


def test_token_fusing_codec_and_checkpoint_files(world, capsys, tmp_path) -> None:
    folder = world["root"] / "tokens"
    ckpt = tools.write_checkpoint(folder, 1.5, tmp_path / "tok-r1.5.tar.pth")
    spec = f"{__name__}:tiny_tokens"
    out = run_eval(["checkpoint", str(world["images"]), "-a", tools.ARCH, "-p", str(ckpt),
                    "--token-fn", spec], capsys)
    want = ours(folder, world["imgs"], 1.5, token_fn=TinyTokens())
    assert out["results"]["bpp"][0] == pytest.approx(want["bpp"], rel=1e-12)
    assert out["results"]["psnr-rgb"][0] == pytest.approx(want["psnr"], abs=1e-3)
    # Without a token function the checkpoint cannot encode: one-line error.
    with pytest.raises(ValueError, match="fuses LVLM tokens"):
        tools.CompressAICodec.from_state_dict(torch.load(ckpt)["state_dict"])


def test_entropy_estimation_is_our_likelihood_bits(world, capsys) -> None:
    out = run_eval(["checkpoint", str(world["images"]), "-p", str(world["root"] / "plain"), "--rates", "1",
                    "--entropy-estimation"], capsys)
    model = load_codec(world["root"] / "plain")
    bits = []
    with torch.no_grad():
        for img in world["imgs"].values():
            lik = model(to_tensor(img), 1.0)["likelihoods"]
            bits.append(sum(float(-torch.log2(v).sum()) for v in lik.values()) / (SIDE * SIDE))
    assert out["results"]["bpp"][0] == pytest.approx(float(np.mean(bits)), rel=1e-4)


def test_bad_inputs_are_one_line_errors(world, tmp_path) -> None:
    with pytest.raises(ValueError, match=r"--rates: need rates in \[0, 2\], got '0,5'"):
        tools.parse_rates("0,5", 3)
    with pytest.raises(ValueError, match="comma-separated numbers"):
        tools.parse_rates("low", 3)
    assert tools.parse_rates(None, 3) == [0.0, 1.0, 2.0]
    with pytest.raises(ValueError, match="not a vlmcompress checkpoint"):
        tools.CompressAICodec.from_state_dict({"w": torch.zeros(1)})
    state = torch.load(tools.write_checkpoint(world["root"] / "plain", 0, tmp_path / "c.tar.pth"))["state_dict"]
    key = next(k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point())
    state[key] = state[key] + 1
    with pytest.raises(ValueError, match="do not match the model_hash"):
        tools.CompressAICodec.from_state_dict(state)


def test_command_line_errors_are_one_line(world, tmp_path, capsys) -> None:
    images = str(world["images"])
    for argv, msg in ((["checkpoint", images, "-p", str(tmp_path)], "codec.json"),
                      (["checkpoint", images, "-p", str(world["root"] / "plain"), "--rates", "7"], "--rates"),
                      (["pretrained", images, "-a", tools.ARCH], "no pretrained weights ship")):
        assert tools.cli(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and msg in err and "\n" not in err
    assert tools.cli([]) == 0 and "usage:" in capsys.readouterr().out
