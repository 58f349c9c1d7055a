"""Codec training under ``accelerate launch``: 2 CPU processes (gloo) train the model 1 process trains.

Run as a script (by the test, under ``accelerate launch``) it records, per process, every
file operation under the output folder, then trains through ``vlmcompress.codec.launch``.
"""
from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

# Weights of the two runs may differ by the order of floating-point sums (gradients are
# averaged across processes): a max abs difference within this fraction of the tensor's
# own max abs value (at least WEIGHT_FLOOR, so a tensor that is still ~0 is not judged by
# the relative error of its rounding noise).
REL_TOL = 1e-4
WEIGHT_FLOOR = 1e-3
# Logged loss terms: the mean over processes of shard means vs the mean over one batch.
CURVE_TOL = 1e-5
TIMING = {"seconds", "steps_per_s"}
TESTS = Path(__file__).resolve().parent


def codec_config() -> dict:
    """A tiny codec with the token pre-editing branch and every token loss (TinyTokens)."""
    return {
        "model": {"name": "gained-mean-scale-hyperprior", "N": 8, "M": 12, "levels": 3,
                  "gain_init": [0.5, 2.0], "hyper_gain": True,
                  "preedit": {"enabled": True, "channels": 4, "depth": 2, "use_tokens": True,
                              "token_dim": 8, "token_channels": 4}},
        "loss": {"lambdas": [0.5, 1.0, 2.0], "w_token_mse": 1.0, "w_token_cos": 0.1, "w_rank": 0.1,
                 "rank_mode": "spectrum", "w_pixel": 0.001},
        "train": {"seed": 7, "steps": 4, "batch_size": 4, "patch_size": 64, "lr": 1e-3, "aux_lr": 1e-2,
                  "lr_decay_at": 0.5, "grad_clip": 1.0, "rate_sampling": "continuous",
                  "checkpoint_every": 2, "log_every": 1, "quantile_update": True},
    }


def _config_file(folder: Path) -> Path:
    from vlmcompress.codec.config import CodecParams
    from vlmcompress.config import from_dict, to_dict

    base = from_dict(CodecParams, codec_config(), "test")
    path = folder / "codec.json"
    path.write_text(json.dumps(to_dict(base)))   # every key, as the launcher reads it strictly
    return path


def _images(folder: Path) -> Path:
    from vlmcompress.codec.coder import write_png

    folder.mkdir()
    g = np.random.default_rng(0)
    for i in range(6):
        h, w = 72 + 8 * (i % 2), 80 + 4 * i           # mixed sizes: crops depend on them
        write_png(folder / f"img{i}.png", g.integers(0, 256, (h, w, 3), dtype=np.uint8))
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "model" / "model.safetensors"))


def _curves(run: Path) -> list[dict[str, float]]:
    with open(run / "curves.csv", newline="") as fh:
        return [{k: float(v) for k, v in r.items() if k not in TIMING} for r in csv.DictReader(fh)]


def test_shards_of_a_batch_are_the_slices_of_the_whole_batch():
    from vlmcompress.codec.train import batch_indices, make_batch, shard_slice

    g = torch.Generator().manual_seed(0)
    images = [(torch.rand(3, 64 + 8 * i, 70 + 3 * i, generator=g) * 255).to(torch.uint8) for i in range(5)]
    idx = batch_indices(len(images), 4, 7, 3)
    whole = make_batch(images, idx, 64, 7, 3)
    for world in (2, 4):
        parts = [make_batch(images, idx, 64, 7, 3, shard_slice(4, r, world)) for r in range(world)]
        assert torch.equal(torch.cat(parts), whole)


def test_global_noise_gives_each_shard_its_slice_of_the_batch_noise():
    from vlmcompress.codec.model import build_codec
    from vlmcompress.codec.train import global_noise, shard_slice

    from codec_helpers import model_params

    torch.manual_seed(0)
    model = build_codec(model_params(preedit=False)).train()
    x = torch.rand(4, 3, 64, 64)
    with torch.no_grad():
        torch.manual_seed(5)
        whole = model(x, 1.0)
        for r in range(2):
            part = shard_slice(4, r, 2)
            torch.manual_seed(5)
            with global_noise(model, r, 2):
                out = model(x[part], 1.0)
            for k in ("y", "z"):
                torch.testing.assert_close(out["likelihoods"][k], whole["likelihoods"][k][part])
            torch.testing.assert_close(out["x_hat"], whole["x_hat"][part])
    assert "quantize" not in vars(model.core.entropy_bottleneck)   # the instance is restored


def test_two_cpu_processes_train_the_model_one_process_trains(tmp_path):
    from vlmcompress.codec.launch import main

    config, images = _config_file(tmp_path), _images(tmp_path / "images")
    args = [str(config), "--images", str(images), "--token-fn", "codec_helpers:TinyTokens"]
    one = tmp_path / "one"
    main(args + ["--out", str(one)])

    two, audit = tmp_path / "two", tmp_path / "audit"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}   # no user accelerate config
    env.pop("ACCELERATE_USE_CPU", None)                                # implied on a CPU-only machine
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()),
           str(Path(__file__)), str(audit), *args, "--out", str(two)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "on 2 process(es)" in proc.stdout

    # Only the main process touched the output folder.
    ops = {r: json.loads((audit / f"rank{r}.json").read_text()) for r in (0, 1)}
    assert ops[1] == [] and any(op == "os.rename" for op, _ in ops[0])

    w1, w2 = _weights(one), _weights(two)
    assert w1.keys() == w2.keys()
    floats = [k for k in w1 if w1[k].is_floating_point()]
    diffs = {k: float((w1[k] - w2[k]).abs().max()) for k in floats}
    worst = max(diffs[k] / max(float(w1[k].abs().max()), WEIGHT_FLOOR) for k in floats)
    print(f"weights, 2 vs 1 process: max abs difference {max(diffs.values()):.3g}, "
          f"max relative {worst:.3g}")
    assert worst <= REL_TOL
    c1, c2 = _curves(one), _curves(two)
    assert [r["step"] for r in c1] == [r["step"] for r in c2] == [1, 2, 3, 4]
    diff = max(abs(a[k] - b[k]) / max(abs(a[k]), 1.0) for a, b in zip(c1, c2) for k in a)
    print(f"max curve difference, 2 vs 1 process: {diff:.3g}")
    assert diff <= CURVE_TOL
    assert {p.name for p in two.iterdir()} == {p.name for p in one.iterdir()}


if __name__ == "__main__":
    audit, argv = Path(sys.argv[1]), sys.argv[2:]
    out = Path(argv[argv.index("--out") + 1])
    writes: list = []
    from stage_checks import record_writes

    record_writes(out, writes)
    from vlmcompress.codec.launch import main

    main(argv)
    audit.mkdir(exist_ok=True)
    (audit / f"rank{os.environ['RANK']}.json").write_text(json.dumps(writes))


def test_two_processes_run_the_codec_stage_as_one_and_only_the_main_writes(project_root, params, tiny_scenes,
                                                                           tmp_path):
    """``vlmcompress run codec`` under ``accelerate launch``: the same codecs and measurements
    as one process (within the tolerances above), every file written by the main process."""
    import dataclasses

    import yaml

    from test_codec_stage import tiny_codec
    from test_distributed_eval import _ok, _one_process, _set_aside, _two_processes
    from lvlm_helpers import TINY, save_tiny_lvlm
    from vlmcompress.config import to_dict
    from vlmcompress.data.stage import run_data_stage

    p = dataclasses.replace(params, data=dataclasses.replace(
        params.data, scenes=dataclasses.replace(tiny_scenes, n_train=4, n_val=1, n_test=2)))
    run_data_stage(p)
    save_tiny_lvlm(project_root / "outputs" / "lvlm" / "model")
    d = to_dict(tiny_codec(p, []))
    d["lvlm"]["arch"]["vision_hidden"] = TINY.vision_hidden        # the tower the codec fuses
    (project_root / "params.yaml").write_text(yaml.safe_dump(d))
    out = project_root / "outputs" / "codec"
    _ok(_one_process(project_root, tmp_path, "codec"))
    one = _set_aside(out, tmp_path / "one")
    audit = tmp_path / "audit"
    stdout = _ok(_two_processes(project_root, tmp_path,
                                [str(TESTS / "test_distributed_eval.py"), str(audit), "run", "codec"]))
    assert "on 2 process(es)" in stdout
    ops = {r: json.loads((audit / f"rank{r}.json").read_text()) for r in (0, 1)}
    assert ops[1] == [] and any(path.endswith("metrics.json") for _, path in ops[0])
    two = json.loads((out / "metrics.json").read_text())
    assert one["processes"] == 1 and two["processes"] == 2
    for name in ("ours", "pixel_baseline"):
        w1, w2 = _weights(tmp_path / "one" / "models" / name), _weights(out / "models" / name)
        worst = max(float((w1[k] - w2[k]).abs().max()) / max(float(w1[k].abs().max()), WEIGHT_FLOOR)
                    for k in w1 if w1[k].is_floating_point())
        assert worst <= REL_TOL, (name, worst)
    for key in ("bpp_min", "bpp_max", "ours.psnr_at_bpp_max", "pixel_baseline.psnr_at_bpp_max",
                "ours.token_mse_at_bpp_max"):
        assert two[key] == pytest.approx(one[key], rel=1e-3, abs=1e-4), key
