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
