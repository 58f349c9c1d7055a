"""The console script: one-line errors, non-zero exits, nothing half-written."""
from __future__ import annotations

import subprocess
import sys

import yaml

from vlmcompress.cli import main


def test_check_params_ok_and_bad(tmp_path, capsys):
    assert main(["check-params"]) == 0
    bad = tmp_path / "p.yaml"
    data = yaml.safe_load(open("params.yaml"))
    data["lvlm"]["train"]["lm_lr"] = "fast"
    bad.write_text(yaml.safe_dump(data))
    assert main(["check-params", str(bad)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "vlmcompress check-params: error: lvlm.train.lm_lr: expected float, got 'fast'"


def test_decode_corrupt_and_missing_files(tmp_path, capsys):
    junk = tmp_path / "junk.vlmc"
    junk.write_bytes(b"VLMC" + bytes(40))
    out = tmp_path / "out.png"
    assert main(["decode", str(junk), str(out)]) == 1
    assert main(["decode", str(tmp_path / "nope"), str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("vlmcompress decode: error: ") for line in err)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["junk.vlmc"]


def test_console_script_is_installed():
    r = subprocess.run([sys.executable, "-m", "vlmcompress.cli", "encode", "missing.png", "x", "--rate", "1",
                        "--model", "nowhere"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "error" in r.stderr


def test_encode_decode_roundtrip_with_a_saved_codec(tmp_path, capsys):
    """A pixel-only codec needs no LVLM: encode reads its config, decode finds it by --model."""
    import json

    import numpy as np
    from PIL import Image

    from codec_helpers import lively, make_image, model_params
    from vlmcompress.codec.model import build_codec
    from vlmcompress.codec.train import save_codec

    model_dir = save_codec(lively(build_codec(model_params(preedit=False))), tmp_path / "codec")
    Image.fromarray(make_image(40, 56)).save(tmp_path / "in.png")
    assert main(["encode", str(tmp_path / "in.png"), str(tmp_path / "x.vlmc"), "--rate", "1.5",
                 "--model", str(model_dir)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["bytes"] == (tmp_path / "x.vlmc").stat().st_size and info["height"] == 40
    assert main(["decode", str(tmp_path / "x.vlmc"), str(tmp_path / "out.png"), "--model", str(model_dir)]) == 0
    assert np.asarray(Image.open(tmp_path / "out.png")).shape == (40, 56, 3)
