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


def _saved_pixel_codec(tmp_path):
    from codec_helpers import lively, model_params
    from vlmcompress.codec.model import build_codec
    from vlmcompress.codec.train import save_codec
    return save_codec(lively(build_codec(model_params(preedit=False))), tmp_path / "codec")


def test_an_existing_folder_as_output_is_refused_and_kept(tmp_path, capsys):
    from PIL import Image

    from codec_helpers import make_image

    model_dir = _saved_pixel_codec(tmp_path)
    Image.fromarray(make_image(16, 16)).save(tmp_path / "in.png")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    assert main(["encode", str(tmp_path / "in.png"), str(mine), "--rate", "1", "--model", str(model_dir)]) == 1
    assert main(["encode", str(tmp_path / "in.png"), str(tmp_path / "x.vlmc"), "--rate", "1",
                 "--model", str(model_dir)]) == 0
    assert main(["decode", str(tmp_path / "x.vlmc"), str(mine), "--model", str(model_dir)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"vlmcompress encode: error: {mine}: is a folder; name a file to write",
                   f"vlmcompress decode: error: {mine}: is a folder; name a file to write"]
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"] and (mine / "thesis.tex").read_text() == "years of work"


def test_fifo_inputs_are_refused_before_reading(tmp_path, capsys):
    import os

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    model_dir = _saved_pixel_codec(tmp_path)
    assert main(["encode", str(fifo), str(tmp_path / "x.vlmc"), "--rate", "1", "--model", str(model_dir)]) == 1
    assert main(["decode", str(fifo), str(tmp_path / "y.png"), "--model", str(model_dir)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("not a regular file" in line for line in err)


def test_unexpected_exceptions_and_interrupts_are_one_line(monkeypatch, capsys):
    import vlmcompress.cli as cli

    def boom(args):
        raise TypeError("unhashable type: 'dict'\nsecond line")

    def interrupt(args):
        raise KeyboardInterrupt

    def oom(args):
        raise MemoryError

    for fn, code, line in ((boom, 2, "vlmcompress check-params: error: internal error (TypeError: unhashable "
                                     "type: 'dict')"),
                           (interrupt, 130, "vlmcompress check-params: interrupted"),
                           (oom, 1, "vlmcompress check-params: error: out of memory")):
        monkeypatch.setattr(cli, "_check_params", fn)
        assert cli.main(["check-params"]) == code
        assert capsys.readouterr().err.splitlines() == [line]


def test_sigterm_during_decode_exits_143_without_traceback_or_temporaries(tmp_path):
    """A decode that is killed mid-way leaves the folder as it was."""
    import signal
    import time

    code = ("import sys, time\n"
            "import vlmcompress.codec.coder as c\n"
            "def slow(*a, **k):\n"
            "    print('decoding', flush=True); time.sleep(30)\n"
            "c.decode_image = slow\n"
            "from vlmcompress.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    from codec_helpers import lively, make_image, model_params  # noqa: F401
    model_dir = _saved_pixel_codec(tmp_path)
    from vlmcompress.codec.coder import encode_file
    from PIL import Image
    Image.fromarray(make_image(8, 8)).save(tmp_path / "in.png")
    encode_file(model_dir, tmp_path / "in.png", tmp_path / "x.vlmc", 1.0)
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = subprocess.Popen([sys.executable, "-c", code, "decode", str(tmp_path / "x.vlmc"),
                             str(tmp_path / "out.png"), "--model", str(model_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "decoding"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    time.sleep(0.05)
    assert proc.returncode == 143 and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
