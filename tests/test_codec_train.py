"""Training loop: disjoint optimizers, exact resume, checkpoints, curves, load_codec."""
from __future__ import annotations

import csv
import dataclasses
import json

import pytest
import torch

from vlmcompress.codec.config import (CodecModelParams, CodecParams, CodecTrainParams, LossParams,
                                      PreEditParams)
from vlmcompress.codec.model import build_codec, weights_hash
from vlmcompress.codec.train import (batch_indices, draw_rate, load_codec, make_batch,
                                     split_parameters, train_codec)

from codec_helpers import TOKEN_DIM, TinyTokens

token_fn = TinyTokens()


def params(steps: int = 4, preedit: bool = True, rate_sampling: str = "discrete") -> CodecParams:
    return CodecParams(
        model=CodecModelParams(
            name="gained-mean-scale-hyperprior", N=8, M=12, levels=3, gain_init=(0.5, 2.0),
            hyper_gain=True,
            preedit=PreEditParams(enabled=preedit, channels=4, depth=2, use_tokens=preedit,
                                  token_dim=TOKEN_DIM, token_channels=4)),
        loss=LossParams(lambdas=[0.5, 1.0, 2.0], w_token_mse=1.0, w_token_cos=0.1, w_rank=0.1,
                        rank_mode="spectrum", w_pixel=0.001),
        train=CodecTrainParams(seed=7, steps=steps, batch_size=2, patch_size=64, lr=1e-3, aux_lr=1e-2,
                               lr_decay_at=0.5, grad_clip=1.0, rate_sampling=rate_sampling,
                               checkpoint_every=2, log_every=1, quantile_update=True))


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (torch.rand(5, 3, 72, 80, generator=g) * 255).to(torch.uint8)


def test_optimizer_parameter_sets_are_disjoint_and_complete():
    m = build_codec(params().model)
    main, aux = split_parameters(m)
    assert not set(main) & set(aux)
    assert set(main) | set(aux) == {n for n, _ in m.named_parameters()}
    assert aux == ["core.entropy_bottleneck.quantiles"]
    assert any(n.startswith("preedit.") for n in main) and "core.log_gain" in main


def test_sampling_is_a_function_of_seed_and_step(images):
    a = make_batch(images, batch_indices(5, 2, 7, 3), 64, 7, 3)
    b = make_batch(images, batch_indices(5, 2, 7, 3), 64, 7, 3)
    c = make_batch(images, batch_indices(5, 2, 7, 4), 64, 7, 4)
    assert a.shape == (2, 3, 64, 64) and torch.equal(a, b) and not torch.equal(a, c)
    # one epoch (n // batch steps) visits distinct images
    seen = torch.cat([batch_indices(5, 2, 7, s) for s in range(2)])
    assert len(set(seen.tolist())) == 4
    assert {draw_rate(3, "discrete", 7, s) for s in range(30)} == {0.0, 1.0, 2.0}
    cont = [draw_rate(3, "continuous", 7, s) for s in range(30)]
    assert all(0 <= r <= 2 for r in cont) and len({round(r, 6) for r in cont}) == 30
    with pytest.raises(ValueError, match="smaller than patch_size"):
        make_batch(images, torch.tensor([0]), 128, 7, 0)


def _rows(path):
    with open(path, newline="") as fh:
        timing = ("seconds", "steps_per_s")
        return [{k: v for k, v in r.items() if k not in timing} for r in csv.DictReader(fh)]


def test_resume_continues_exactly(images, tmp_path):
    full = train_codec(params(), images, token_fn, tmp_path / "full")
    part = train_codec(params(), images, token_fn, tmp_path / "split", stop_at=3)
    assert part.steps == 3 and not (tmp_path / "split" / "model").exists()
    ckpt = json.loads((tmp_path / "split" / "checkpoint" / "codec.json").read_text())
    assert ckpt["step"] == 3  # the stop step is checkpointed too
    resumed = train_codec(params(), images, token_fn, tmp_path / "split")
    assert resumed.steps == 4 and resumed.steps_this_run == 1
    sd_full, sd_res = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(sd_full[k], sd_res[k]) for k in sd_full)
    rows_full, rows_split = _rows(tmp_path / "full" / "curves.csv"), _rows(tmp_path / "split" / "curves.csv")
    assert [r["step"] for r in rows_split] == ["1", "2", "3", "4"]
    assert rows_full == rows_split
    assert {"loss", "bpp_loss", "token_mse", "token_cos", "rank_loss", "pixel_mse", "aux_loss",
            "rate", "lr"} <= set(rows_full[0])
    assert float(rows_full[-1]["lr"]) == pytest.approx(1e-4)  # decayed after half the steps


def test_saved_model_loads_with_hash_and_coder_tables(images, tmp_path):
    res = train_codec(params(steps=2, preedit=False), images, token_fn, tmp_path / "run")
    record = json.loads((tmp_path / "run" / "model" / "codec.json").read_text())
    loaded = load_codec(tmp_path / "run")  # the training folder resolves to run/model
    assert record["model_hash"] == weights_hash(loaded).hex() == weights_hash(res.model).hex()
    assert record["step"] == 2 and record["params"]["train"]["steps"] == 2
    assert loaded.core.entropy_bottleneck._quantized_cdf.numel() > 0
    assert not loaded.training
    q = loaded.core.entropy_bottleneck.quantiles
    assert not torch.allclose(q[:, 0, 0], torch.full_like(q[:, 0, 0], -10.0))  # fitted at the end
    # a changed weights file no longer matches its recorded hash
    from safetensors.torch import load_file, save_file
    path = tmp_path / "run" / "model" / "model.safetensors"
    sd = load_file(str(path))
    sd["core.log_gain"] = sd["core.log_gain"] + 1
    save_file(sd, str(path))
    with pytest.raises(ValueError, match="model_hash"):
        load_codec(tmp_path / "run")


def test_resume_with_other_params_is_refused(images, tmp_path):
    train_codec(params(steps=2, preedit=False), images, token_fn, tmp_path / "run", stop_at=2)
    changed = params(steps=2, preedit=False)
    changed = dataclasses.replace(changed, loss=dataclasses.replace(changed.loss, w_rank=0.0))
    with pytest.raises(ValueError, match="different params"):
        train_codec(changed, images, token_fn, tmp_path / "run")
    # more steps is a legal change: training continues
    longer = train_codec(params(steps=3, preedit=False), images, token_fn, tmp_path / "run")
    assert longer.steps == 3 and longer.steps_this_run == 1


def test_a_record_without_a_later_defaulted_key_is_still_the_same_codec(images, tmp_path):
    import json

    from vlmcompress.codec.train import training_state

    p = params(steps=2, preedit=False)
    train_codec(p, images, token_fn, tmp_path / "run")
    assert training_state(tmp_path / "run", p) == "done"
    for sub in ("model", "checkpoint"):                     # as written before w_lowpass existed
        path = tmp_path / "run" / sub / "codec.json"
        if path.exists():
            rec = json.loads(path.read_text())
            for key in ("w_lowpass", "lowpass"):
                rec["params"]["loss"].pop(key)
            path.write_text(json.dumps(rec))
    assert training_state(tmp_path / "run", p) == "done"
    on = dataclasses.replace(p, loss=dataclasses.replace(p.loss, w_lowpass=0.1))
    assert training_state(tmp_path / "run", on) in ("stale", "fresh")


def test_pixel_only_baseline_trains_without_token_fn(images, tmp_path):
    p = params(steps=2, preedit=False, rate_sampling="continuous")
    p = dataclasses.replace(p, loss=dataclasses.replace(p.loss, w_token_mse=0.0, w_token_cos=0.0,
                                                         w_rank=0.0, w_pixel=1.0))
    res = train_codec(p, images, None, tmp_path / "px")
    assert "token_mse" not in res.last and "pixel_mse" in res.last
    with pytest.raises(ValueError, match="token_fn"):
        train_codec(params(steps=1), images, None, tmp_path / "tok")


def test_warm_start_copies_every_matching_weight_and_reports_the_rest(images, tmp_path):
    from vlmcompress.codec.train import warm_start

    pixel = params(steps=1, preedit=True)
    pixel = dataclasses.replace(pixel, model=dataclasses.replace(
        pixel.model, preedit=dataclasses.replace(pixel.model.preedit, use_tokens=False)),
        loss=dataclasses.replace(pixel.loss, w_token_mse=0.0, w_token_cos=0.0, w_rank=0.0, w_pixel=1.0))
    src = train_codec(pixel, images, None, tmp_path / "px").model
    ours = build_codec(params().model)
    fresh = ours.state_dict()
    left = warm_start(ours, tmp_path / "px")
    # Only the token branch (projection and fusion block) is new.
    assert left and all(name.startswith(("preedit.token_proj.", "preedit.fuse.")) for name in left)
    src_sd, got = src.state_dict(), ours.state_dict()
    copied = [k for k in got if k not in left and k in src_sd and src_sd[k].shape == got[k].shape]
    assert copied and all(torch.equal(got[k], src_sd[k]) for k in copied)
    assert all(torch.equal(got[k], fresh[k]) for k in left)
    # A run started from it begins from those weights; resuming ignores init_from.
    res = train_codec(params(steps=1), images, token_fn, tmp_path / "ft", init_from=tmp_path / "px")
    assert res.steps == 1
    (tmp_path / "bad").mkdir()
    with pytest.raises(FileNotFoundError, match="codec.json: no such file"):
        warm_start(ours, tmp_path / "bad")
    other = build_codec(dataclasses.replace(params().model, N=4, M=6, preedit=dataclasses.replace(
        params().model.preedit, enabled=False)))
    with pytest.raises(ValueError, match=r"px/model: another architecture \(core\..*: \[.*\] here"):
        warm_start(other, tmp_path / "px")


def test_gain_units_get_their_own_learning_rate(images, tmp_path):
    from vlmcompress.codec.train import is_gain, make_optimizers

    model = build_codec(params().model)
    opt, _ = make_optimizers(model, 1e-3, 1e-2)
    assert len(opt.param_groups) == 1                       # the layout of older checkpoints
    opt, _ = make_optimizers(model, 1e-3, 1e-2, gain_lr_scale=10.0)
    gains = {id(p) for p in opt.param_groups[1]["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in gains}
    assert names == {"core.log_gain", "core.log_inv_gain", "core.log_hyper_gain", "core.log_inv_hyper_gain"}
    assert all(is_gain(n) for n in names) and not is_gain("core.g_a.0.weight")

    def first_step(scale: float) -> tuple[float, torch.Tensor]:
        p = params(steps=1, preedit=False)
        p = dataclasses.replace(p, train=dataclasses.replace(p.train, gain_lr_scale=scale, grad_clip=0.0,
                                                              lr_decay_at=1.0))
        init = build_codec(p.model).state_dict()["core.log_gain"]    # gains start from gain_init
        after = train_codec(p, images, token_fn, tmp_path / f"s{scale}").model.state_dict()
        return float((after["core.log_gain"] - init).abs().max()), after["core.g_a.0.weight"]

    # Adam's first step moves a parameter with a gradient by lr, here x its group's scale;
    # the rest of the model takes the same step whatever the gains' scale.
    gain1, conv1 = first_step(1.0)
    gain10, conv10 = first_step(10.0)
    assert gain1 == pytest.approx(1e-3, rel=1e-3) and gain10 == pytest.approx(1e-2, rel=1e-3)
    assert torch.equal(conv1, conv10)


def _tail(cp: CodecParams, tail: int, kernel: int) -> CodecParams:
    return dataclasses.replace(cp, model=dataclasses.replace(cp.model, synthesis_tail=tail,
                                                             synthesis_tail_kernel=kernel))


def test_synthesis_tail_is_part_of_a_saved_codec_and_of_its_warm_start(tmp_path):
    """A saved codec of one tail loads as that tail, starts a codec of the same tail and refuses
    (one line) to start another; a record written before the tail keys existed means the defaults."""
    from vlmcompress.codec.train import save_codec, training_state, warm_start

    narrow = _tail(params(preedit=False), 4, 3)
    src = build_codec(narrow.model)
    save_codec(src, tmp_path / "n" / "model", params=narrow, step=narrow.train.steps)
    again = load_codec(tmp_path / "n")
    assert (again.core.synthesis_tail, again.core.synthesis_tail_kernel) == (4, 3)
    assert weights_hash(again) == weights_hash(src)
    assert warm_start(build_codec(narrow.model), tmp_path / "n") == []
    with pytest.raises(ValueError, match=r"n/model: another architecture \(core\.g_s\.4\.\w+: "
                                         r"\[.*\] here, \[.*\] wanted\)$"):
        warm_start(build_codec(params(preedit=False).model), tmp_path / "n")
    # the codec folder of one tail is not reused for another
    assert training_state(tmp_path / "n", narrow) == "done"
    assert training_state(tmp_path / "n", _tail(narrow, 4, 5)) != "done"
    assert training_state(tmp_path / "n", params(preedit=False)) != "done"
    # defaults: a record without the keys is today's architecture, and still "done"
    wide = params(preedit=False)
    save_codec(build_codec(wide.model), tmp_path / "w" / "model", params=wide, step=wide.train.steps)
    path = tmp_path / "w" / "model" / "codec.json"
    record = json.loads(path.read_text())
    for section in (record["model"], record["params"]["model"]):
        assert (section.pop("synthesis_tail"), section.pop("synthesis_tail_kernel")) == (0, 5)
    path.write_text(json.dumps(record))
    assert training_state(tmp_path / "w", wide) == "done"
    assert load_codec(tmp_path / "w").core.synthesis_tail == 8
