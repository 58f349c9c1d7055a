"""The codec stage end to end: tiny codecs, a tiny random LVLM, a throw-away project root."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from vlmcompress.codec.config import (BaselineParams, CodecEvalParams, CodecModelParams,
                                      CodecTrainParams, LossParams, PreEditParams, check_stage_params)
from vlmcompress.codec.data import RecordImages
from vlmcompress.codec.fit import prune_models, train_seconds_from_curves, train_variant
from vlmcompress.codec.stage import run_codec_stage
from vlmcompress.codec.target import lvlm_token_fn
from vlmcompress.codec.timing import timing_image
from vlmcompress.codec.train import load_codec
from vlmcompress.codec.variants import ABLATIONS, model_variants
from vlmcompress.config import ConfigError, Params
from vlmcompress.data.dataset import load_all
from vlmcompress.data.stage import run_data_stage
from vlmcompress.lvlm.load import lvlm_from_params

from lvlm_helpers import TINY, save_tiny_lvlm

CONTRACT = ("train_seconds", "bpp_min", "bpp_max", "roundtrip_max_abs_err", "encode_ms_512", "decode_ms_512",
            "vvc_encode_ms_512", "vvc_decode_ms_512")


def tiny_codec(params: Params, ablations: list[str]) -> Params:
    model = CodecModelParams(
        name="gained-mean-scale-hyperprior", N=8, M=12, levels=3, gain_init=(1.0, 50.0), hyper_gain=True,
        preedit=PreEditParams(enabled=True, channels=4, depth=2, use_tokens=True,
                              token_dim=TINY.vision_hidden, token_channels=4))
    codec = dataclasses.replace(
        params.codec, model=model,
        loss=LossParams(lambdas=[0.5, 1.0, 2.0], w_token_mse=1.0, w_token_cos=0.1, w_rank=0.1,
                        rank_mode="spectrum", w_pixel=1e-4),
        train=CodecTrainParams(seed=0, steps=2, batch_size=2, patch_size=64, lr=1e-3, aux_lr=1e-2,
                               lr_decay_at=0.5, grad_clip=1.0, rate_sampling="continuous",
                               checkpoint_every=2, log_every=1, quantile_update=False,
                               init_from="pixel_baseline"),
        baseline=BaselineParams(enabled=True, lambdas=[0.001, 0.005, 0.02], preedit="no_tokens"),
        ablations=ablations,
        eval=CodecEvalParams(n_test_images=2, n_rates=2, example_rates=[0.0, 2.0], timing_repeats=1,
                             timing_threads=1, vvc_preset="faster", vvc_qp=40))
    return dataclasses.replace(params, codec=codec)


@pytest.fixture
def stage_env(project_root, params, tiny_scenes):
    """Tiny scenes and a tiny LVLM where the stage looks for them (outputs/data, outputs/lvlm)."""
    p = dataclasses.replace(params, data=dataclasses.replace(
        params.data, scenes=dataclasses.replace(tiny_scenes, n_train=4, n_val=1, n_test=2)))
    run_data_stage(p)
    save_tiny_lvlm(project_root / "outputs" / "lvlm" / "model")
    return project_root, tiny_codec(p, []), load_all()


def test_stage_trains_measures_and_writes_the_contract(stage_env, capsys):
    root, p, splits = stage_env
    logs: list[str] = []
    metrics = run_codec_stage(p, splits, log=logs.append)
    out = root / "outputs" / "codec"
    # ours fine-tunes the pixel baseline (train.init_from), so the baseline trains first.
    starts = [line for line in logs if ": training to " in line]
    assert starts == ["pixel_baseline: training to 2 steps",
                      f"ours: training to 2 steps, starting from {out / 'models/pixel_baseline/model'}"]
    assert json.loads((out / "metrics.json").read_text()) == metrics
    for key in CONTRACT:
        assert isinstance(metrics[key], float) and np.isfinite(metrics[key]), key
    assert metrics["train_seconds"] > 0 and metrics["encode_ms_512"] > 0 and metrics["vvc_decode_ms_512"] > 0
    assert 0 < metrics["bpp_min"] < metrics["bpp_max"]
    assert metrics["roundtrip_max_abs_err"] <= 1  # decode(encode(x)) vs the forward reconstruction
    names = ["ours", "pixel_baseline"]
    assert metrics["train_seconds"] == pytest.approx(sum(metrics[f"{n}.train_seconds"] for n in names), abs=0.2)

    rd = pd.read_csv(out / "rd.csv")
    assert list(rd.columns) == ["model", "rate", "bpp", "psnr", "token_mse"]
    assert sorted(rd["model"].unique()) == sorted(names) and sorted(set(rd["rate"])) == [0.0, 2.0]
    ours = rd[rd["model"] == "ours"].sort_values("rate")
    assert ours["bpp"].is_monotonic_increasing  # more rate, more bytes (real files)
    assert metrics["bpp_min"] == pytest.approx(ours["bpp"].min(), abs=1e-4)

    curves = pd.read_csv(out / "curves.csv")
    assert list(curves.groupby("model").size().loc[names]) == [2, 2]
    base = curves[curves["model"] == "pixel_baseline"]
    # the baseline really had no token term: never computed, pixel MSE is its only distortion
    assert base[["token_mse", "token_cos", "rank_loss"]].isna().all().all() and base["pixel_mse"].notna().all()
    assert curves[curves["model"] == "ours"]["token_mse"].notna().all()
    record = json.loads((out / "models" / "pixel_baseline" / "model" / "codec.json").read_text())
    assert record["params"]["loss"]["w_token_mse"] == record["params"]["loss"]["w_rank"] == 0
    assert not record["model"]["preedit"]["use_tokens"]

    for name in names:  # each loadable from its training folder, as `--model` accepts it
        assert load_codec(out / "models" / name).levels == 3
    ex = pd.read_csv(out / "examples" / "examples.csv")
    assert len(ex) == 2 * 2 and all((out / "examples" / f).is_file() for f in [*ex["png"], *ex["file"]])

    # The CLI encodes with a trained codec (the LVLM named by --params) and finds it again by hash.
    from vlmcompress.cli import main
    Image.fromarray(np.asarray(Image.open(splits["test"][0].path).convert("RGB"))).save(root / "in.png")
    assert main(["encode", str(root / "in.png"), str(root / "x.vlmc"), "--rate", "1.0",
                 "--model", str(out / "models" / "ours"), "--params", str(root / "params.yaml")]) == 0
    assert main(["decode", str(root / "x.vlmc"), str(root / "out.png")]) == 0
    assert "models/ours/model" in capsys.readouterr().out

    # A second run reuses every trained codec (its recorded training time with it).
    token_fn = lvlm_token_fn(lvlm_from_params(p))
    images = RecordImages(splits["train"], 64)
    for name, cp in model_variants(p.codec).items():
        train_variant(name, cp, images, token_fn, log=logs.append)
    assert sum("trained model found" in line for line in logs) == 2


def test_stale_checkpoints_and_dropped_variants_are_cleared(stage_env):
    root, p, splits = stage_env
    out = root / "outputs" / "codec" / "models"
    (out / "ours-old").mkdir(parents=True)
    assert prune_models(["ours"]) == ["ours-old"] and not (out / "ours-old").exists()
    token_fn = lvlm_token_fn(lvlm_from_params(p))
    images = RecordImages(splits["train"], 64)
    cp = dataclasses.replace(p.codec.ours, train=dataclasses.replace(p.codec.train, steps=1))
    logs: list[str] = []
    train_variant("ours", cp, images, token_fn, log=logs.append)
    changed = dataclasses.replace(cp, loss=dataclasses.replace(cp.loss, w_rank=0.0))
    train_variant("ours", changed, images, token_fn, log=logs.append)
    assert logs[0] == "ours: training to 1 steps" and logs[2] == "ours: checkpoint of other params, starting over"
    assert json.loads((out / "ours" / "model" / "codec.json").read_text())["params"]["loss"]["w_rank"] == 0
    more = dataclasses.replace(changed, train=dataclasses.replace(changed.train, steps=2))
    train_variant("ours", more, images, token_fn, log=logs.append)
    assert logs[-2] == "ours: resuming to 2 steps"
    # Both runs' rows are kept (the sum itself: test_train_seconds_add_up_over_resumed_runs); a
    # 1-step tiny run can log 0.0 s, so only the rows are asserted here, not a positive time.
    assert pd.read_csv(out / "ours" / "curves.csv")["step"].tolist() == [1, 2]
    assert train_seconds_from_curves(out / "ours" / "curves.csv") >= 0


def test_stage_params_checks(params):
    check_stage_params(params.codec)
    bad = dataclasses.replace(params.codec, ablations=["no_such"])
    with pytest.raises(ConfigError, match=r"^codec\.ablations\[0\]: unknown ablation 'no_such'"):
        check_stage_params(bad)
    lone = dataclasses.replace(params.codec, loss=dataclasses.replace(params.codec.loss, w_token_cos=0.0,
                                                                       w_rank=0.0, w_pixel=0.0, w_lowpass=0.0),
                               ablations=["no_token"])
    with pytest.raises(ConfigError, match="at least one distortion weight.*ours-no_token"):
        check_stage_params(lone)
    short = dataclasses.replace(params.codec, baseline=dataclasses.replace(params.codec.baseline, lambdas=[1.0]))
    with pytest.raises(ConfigError, match=r"^codec\.baseline\.lambdas: needs one value per rate level"):
        check_stage_params(short)
    for key, value, fragment in (("steps", -1, "must be >= 0"), ("patch_size", 100, "must be 0 .train.patch_size. or a multiple of 64")):
        bad_base = dataclasses.replace(params.codec, baseline=dataclasses.replace(params.codec.baseline,
                                                                                  **{key: value}))
        with pytest.raises(ConfigError, match=rf"^codec\.baseline\.{key}: {fragment}"):
            check_stage_params(bad_base)
    variants = model_variants(dataclasses.replace(params.codec, ablations=sorted(ABLATIONS)))
    assert list(variants)[:2] == ["ours", "pixel_baseline"] and len(variants) == 2 + len(ABLATIONS)
    # the baseline's own budget: 0 takes ours' values, anything else only changes the baseline
    same = model_variants(dataclasses.replace(params.codec, baseline=dataclasses.replace(
        params.codec.baseline, steps=0, patch_size=0)))["pixel_baseline"].train
    assert (same.steps, same.patch_size) == (params.codec.train.steps, params.codec.train.patch_size)
    own = model_variants(dataclasses.replace(params.codec, baseline=dataclasses.replace(
        params.codec.baseline, steps=7, patch_size=64)))
    assert (own["pixel_baseline"].train.steps, own["pixel_baseline"].train.patch_size) == (7, 64)
    assert own["ours"].train == params.codec.train
    assert not variants["ours-no_preedit"].model.preedit.enabled
    assert variants["ours-no_token"].loss.w_token_mse == 0 and variants["ours-no_token"].loss.w_rank > 0


def test_timing_image_is_a_mosaic_or_a_crop():
    small = [np.full((128, 128, 3), i, np.uint8) for i in range(3)]
    img = timing_image(small)
    assert img.shape == (512, 512, 3) and img[0, 0, 0] == 0 and img[0, 128, 0] == 1 and img[0, 384, 0] == 0
    big = np.arange(600 * 700 * 3, dtype=np.uint32).astype(np.uint8).reshape(600, 700, 3)
    assert np.array_equal(timing_image([big]), big[44:556, 94:606])


def test_train_seconds_add_up_over_resumed_runs(tmp_path):
    path = tmp_path / "curves.csv"
    # run 1 logged steps 1-3, was resumed from step 2 (row 3 dropped), run 2 logged 3-4
    path.write_text("step,loss,seconds\n1,1,2.0\n2,1,4.0\n3,1,1.5\n4,1,3.0\n")
    assert train_seconds_from_curves(path) == 7.0
    assert train_seconds_from_curves(tmp_path / "none.csv") == 0.0


def test_a_codec_trained_against_another_lvlm_tower_is_trained_again(stage_env):
    import torch

    from vlmcompress.codec.target import tower_digest

    root, p, splits = stage_env
    lvlm = lvlm_from_params(p)
    token_fn, tower = lvlm_token_fn(lvlm), tower_digest(lvlm)
    images = RecordImages(splits["train"], 64)
    cp = dataclasses.replace(p.codec.ours, train=dataclasses.replace(p.codec.train, steps=1))
    logs: list[str] = []
    train_variant("ours", cp, images, token_fn, log=logs.append, tower=tower)
    train_variant("ours", cp, images, token_fn, log=logs.append, tower=tower)
    assert logs[-1] == "ours: trained model found, 1 steps"
    with torch.no_grad():                                   # a retrained LVLM: other tower weights
        lvlm.vision_tower.post_layernorm.weight.add_(0.5)
    other = tower_digest(lvlm)
    assert other != tower and tower_digest(lvlm) == other
    lvlm.vision_tower.register_buffer("counter", torch.tensor(3))   # 0-dim, like BatchNorm's counters
    assert tower_digest(lvlm) != other
    del lvlm.vision_tower.counter
    train_variant("ours", cp, images, token_fn, log=logs.append, tower=other)
    assert "ours: trained against another LVLM tower, starting over" in logs
    assert "ours: checkpoint of other params, starting over" not in logs   # one reason, the right one
    assert logs[-2] == "ours: training to 1 steps"
    assert (root / "outputs/codec/models/ours" / "tower.txt").read_text().strip() == other
    # The pixel baseline never reads the LVLM: the tower does not concern it.
    base = model_variants(p.codec)["pixel_baseline"]
    base = dataclasses.replace(base, train=dataclasses.replace(base.train, steps=1))
    train_variant("pixel_baseline", base, images, None, log=logs.append, tower=tower)
    train_variant("pixel_baseline", base, images, None, log=logs.append, tower=other)
    assert logs[-1] == "pixel_baseline: trained model found, 1 steps"


def test_a_projector_space_codec_is_also_stale_for_another_projector(stage_env):
    import torch

    from vlmcompress.codec.target import tower_digest

    _, p, _ = stage_env
    lvlm = lvlm_from_params(p)
    tower, with_proj = tower_digest(lvlm), tower_digest(lvlm, projector=True)
    assert with_proj != tower
    with_attn = tower_digest(lvlm, attention=True)                # the attention layer is part of it
    assert with_attn not in (tower, with_proj)
    lvlm.attn_layer = lvlm.attn_layer - 1
    assert tower_digest(lvlm, attention=True) != with_attn and tower_digest(lvlm) == tower
    with torch.no_grad():                                   # e.g. an LM phase that trained the projector
        next(lvlm.projector.parameters()).add_(0.5)
    assert tower_digest(lvlm) == tower                      # a tower-space codec is still current
    assert tower_digest(lvlm, projector=True) != with_proj


def test_the_attention_weighting_reuses_the_reference_pass(stage_env):
    import torch

    from vlmcompress.codec.target import lvlm_attention_fn

    _, p, _ = stage_env
    lvlm = lvlm_from_params(p)
    token_fn = lvlm_token_fn(lvlm)
    attention_fn = lvlm_attention_fn(lvlm, token_fn)
    calls = []
    inner = lvlm.visual_features
    lvlm.visual_features = lambda x: (calls.append(x), inner(x))[1]      # this instance only
    x, other = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        token_fn(x)                                        # the trainer's reference pass
    assert len(calls) == 1
    attn = attention_fn(x)
    assert len(calls) == 1 and attn.shape == (2, lvlm.grid[0] * lvlm.grid[1])
    token_fn(other.requires_grad_())                       # a pass with gradient keeps nothing
    assert torch.equal(attention_fn(x), attn) and len(calls) == 2
    fresh = attention_fn(other.detach())
    assert len(calls) == 3 and torch.allclose(fresh, inner(other.detach()).cls_attn)
    assert torch.allclose(attn, inner(x).cls_attn)


def test_init_from_trains_the_source_first_and_is_checked(params):
    from vlmcompress.codec.variants import training_order

    def with_init(src: str, **changes):
        return dataclasses.replace(params.codec, train=dataclasses.replace(params.codec.train, init_from=src),
                                   **changes)

    ft = with_init("pixel_baseline", ablations=["no_rank"])
    check_stage_params(ft)
    variants = model_variants(ft)
    assert variants["pixel_baseline"].train.init_from == ""          # the baseline starts from scratch
    assert variants["ours-no_rank"].train.init_from == "pixel_baseline"
    assert training_order(variants) == ["pixel_baseline", "ours", "ours-no_rank"]
    assert training_order(model_variants(with_init(""))) == ["ours", "pixel_baseline"]
    off = with_init("pixel_baseline", baseline=dataclasses.replace(params.codec.baseline, enabled=False))
    with pytest.raises(ConfigError, match=r"^codec\.train\.init_from: 'pixel_baseline' is not trained by this "
                                          r"params file \(codecs: ours\)$"):
        check_stage_params(off)
    with pytest.raises(ConfigError, match=r"^codec\.train\.init_from: codec 'ours' starts from itself"):
        check_stage_params(with_init("ours"))
    check_stage_params(with_init("runs/pretrained"))   # a folder: checked when the stage starts
    slow = dataclasses.replace(params.codec, train=dataclasses.replace(params.codec.train, gain_lr_scale=0.0))
    with pytest.raises(ConfigError, match=r"^codec\.train\.gain_lr_scale: must be > 0, got 0\.0"):
        check_stage_params(slow)


def test_a_codec_started_from_a_retrained_source_is_trained_again(stage_env):
    from vlmcompress.codec.fit import init_dir

    root, p, splits = stage_env
    token_fn = lvlm_token_fn(lvlm_from_params(p))
    images = RecordImages(splits["train"], 64)
    variants = model_variants(dataclasses.replace(p.codec, train=dataclasses.replace(
        p.codec.train, steps=1, init_from="pixel_baseline")))
    base, ours = variants["pixel_baseline"], variants["ours"]
    logs: list[str] = []
    train_variant("pixel_baseline", base, images, None, log=logs.append)
    src = init_dir(ours, variants)
    assert src == root / "outputs/codec/models/pixel_baseline/model"
    train_variant("ours", ours, images, token_fn, log=logs.append, init=src)
    assert logs[-2] == f"ours: training to 1 steps, starting from {src}"
    train_variant("ours", ours, images, token_fn, log=logs.append, init=src)
    assert logs[-1] == "ours: trained model found, 1 steps"
    more = dataclasses.replace(base, train=dataclasses.replace(base.train, seed=1))   # a new baseline
    train_variant("pixel_baseline", more, images, None, log=logs.append)
    train_variant("ours", ours, images, token_fn, log=logs.append, init=src)
    assert "ours: started from another codec, starting over" in logs
    assert "ours: checkpoint of other params, starting over" not in logs
    hashes = [json.loads((root / f"outputs/codec/models/{n}/model/codec.json").read_text())["model_hash"]
              for n in ("pixel_baseline", "ours")]
    assert (root / "outputs/codec/models/ours/init.txt").read_text().strip() == hashes[0]
    # A folder that holds no codec fails before anything trains, naming it.
    folder = dataclasses.replace(ours, train=dataclasses.replace(ours.train, init_from="nowhere"))
    with pytest.raises(FileNotFoundError, match=r"nowhere/codec\.json: no such file"):
        init_dir(folder, variants)


def test_token_loss_gradients_reach_the_pixels_from_a_bfloat16_lvlm(tmp_path):
    """The token target runs the tower in float32 even when the LVLM is loaded in bfloat16: its
    pixel gradients equal a float32 run of the same (bfloat16-rounded) weights."""
    import torch

    from lvlm_helpers import save_tiny_lvlm

    from vlmcompress.codec.target import lvlm_token_fn
    from vlmcompress.lvlm.load import load_lvlm

    folder = save_tiny_lvlm(tmp_path / "m")
    g = torch.Generator().manual_seed(0)
    x0, ref = torch.rand(2, 3, 40, 52, generator=g), torch.rand(2, 3, 40, 52, generator=g)

    def pixel_grad(lvlm):
        token_fn = lvlm_token_fn(lvlm)
        x = x0.clone().requires_grad_(True)
        with torch.no_grad():
            target = token_fn(ref)
        loss = torch.nn.functional.mse_loss(token_fn(x), target)
        loss.backward()
        assert loss.dtype == torch.float32
        return x.grad

    half = load_lvlm(str(folder / "llava"), str(folder / "clip"), dtype="bfloat16")
    full = load_lvlm(str(folder / "llava"), str(folder / "clip"))
    with torch.no_grad():
        for p in full.llava.parameters():
            p.copy_(p.bfloat16().float())
    got, want = pixel_grad(half), pixel_grad(full)
    assert next(half.language_model.parameters()).dtype == torch.bfloat16      # only the tower moved
    assert (got != 0).float().mean() > 0.99
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


def test_training_images_from_a_folder_must_not_be_evaluated(tmp_path, params):
    import dataclasses
    import shutil

    import pytest
    from PIL import Image

    from vlmcompress.codec.fit import training_paths
    from vlmcompress.data.records import ImageRecord

    def rec(i, path):
        return ImageRecord(image_id=i, path=str(path), width=8, height=8, objects=[], captions=[], questions=[],
                           refs=[])

    (tmp_path / "eval").mkdir()
    (tmp_path / "train").mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / "eval" / f"{i}.png")
        Image.new("RGB", (8, 8), (0, 40 * i, 1)).save(tmp_path / "train" / f"t{i}.png")
    splits = {"test": [rec(i, tmp_path / "eval" / f"{i}.png") for i in range(3)]}
    P = dataclasses.replace(params.codec, train_images=str(tmp_path / "train"))
    assert [p.name for p in training_paths(P, splits)] == ["t0.png", "t1.png", "t2.png"]
    shutil.copy(tmp_path / "eval" / "1.png", tmp_path / "train" / "copy.png")
    with pytest.raises(ValueError, match=r"copy.png is the evaluated image .*1.png"):
        training_paths(P, splits)
    with pytest.raises(ValueError, match="no 'train' images .*name a folder in codec.train_images"):
        training_paths(params.codec, splits)
