"""Anchor codecs: real files round-trip, rates grow with quality, bad data fails in one line."""
from __future__ import annotations

import numpy as np
import pytest

from vlmcompress.codec import anchors
from vlmcompress.codec.anchors import (
    ANCHORS, AnchorError, QualityPlan, RDPoint, make_anchor, pick_qualities, sweep,
)


def natural(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth colour gradients and waves plus mild noise: compresses like a photo, not noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(float)
    chans = [128 + 60 * np.sin(xx / 9.0 + c) + 30 * np.cos(yy / 13.0 + xx / 17.0)
             for c in range(3)]
    img = np.stack(chans, -1) + rng.normal(0, 4, (h, w, 3))
    return img.clip(0, 255).astype(np.uint8)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(float) - b.astype(float)) ** 2)
    return 10 * np.log10(255.0 ** 2 / mse)


def high_low(codec: anchors.AnchorCodec) -> tuple[int, int]:
    """A high-quality and a low-quality setting of the codec's scale."""
    order = codec.scale.rate_order()            # lowest rate first
    if codec.name == "vvc":
        return 22, 42
    return order[int(0.9 * (len(order) - 1))], order[int(0.2 * (len(order) - 1))]


def usable(name: str) -> anchors.AnchorCodec:
    reason = ANCHORS[name].unavailable()
    if reason:
        pytest.skip(f"{name}: {reason}")
    return make_anchor(name)


@pytest.fixture(scope="module")
def images() -> dict[str, np.ndarray]:
    return {"64x48": natural(48, 64), "37x29": natural(29, 37, seed=1)}


@pytest.mark.parametrize("name", sorted(ANCHORS))
@pytest.mark.parametrize("size", ["64x48", "37x29"])
def test_round_trip_quality_and_rate(name: str, size: str, images) -> None:
    codec = usable(name)
    img = images[size]
    hi, lo = high_low(codec)
    p_hi, p_lo = sweep(codec, img, [hi, lo])
    for p in (p_hi, p_lo):
        assert isinstance(p, RDPoint)
        assert p.decoded.shape == img.shape and p.decoded.dtype == np.uint8
    assert psnr(img, p_hi.decoded) > 25.0
    assert psnr(img, p_hi.decoded) > psnr(img, p_lo.decoded)
    assert p_hi.nbytes > p_lo.nbytes
    assert p_hi.nbytes == len(codec.encode(img, hi))    # deterministic, bytes of the file


@pytest.mark.parametrize("name", sorted(ANCHORS))
def test_corrupt_data_gives_one_line_value_error(name: str, images) -> None:
    codec = usable(name)
    data = codec.encode(images["64x48"], high_low(codec)[0])
    garbage = np.random.default_rng(3).integers(0, 256, 300, dtype=np.uint8).tobytes()
    for bad in (garbage, data[: len(data) // 2], b""):
        with pytest.raises(ValueError) as info:
            codec.decode(bad)
        msg = str(info.value)
        assert msg.startswith(f"{name}:") and "\n" not in msg


@pytest.mark.parametrize("name", sorted(ANCHORS))
def test_bad_image_and_quality_are_refused(name: str, images) -> None:
    codec = make_anchor(name)
    with pytest.raises(AnchorError, match="HxWx3 uint8"):
        codec.encode(images["64x48"].astype(np.float32), high_low(codec)[0])
    with pytest.raises(AnchorError, match="HxWx3 uint8"):
        codec.encode(images["64x48"][..., 0], high_low(codec)[0])
    with pytest.raises(AnchorError, match="outside"):
        codec.encode(images["64x48"], codec.scale.hi + 1)
    with pytest.raises(AnchorError, match="integer"):
        codec.encode(images["64x48"], 50.5)


def test_make_anchor_errors_name_the_problem() -> None:
    with pytest.raises(AnchorError, match="unknown anchor codec 'j2k'"):
        make_anchor("j2k")
    with pytest.raises(AnchorError, match="anchor vvc.crf: unknown key .*known: preset, qpa"):
        make_anchor("vvc", crf=30)
    with pytest.raises(AnchorError, match="anchor vvc.threads: expected int, got 'two'"):
        make_anchor("vvc", threads="two")
    assert make_anchor("webp", method=4).method == 4
    assert make_anchor("vvc", timeout_s=5).timeout_s == 5.0


@pytest.mark.parametrize("name,options", [("jpeg", {"subsampling": "bogus"}),
                                          ("hevc", {"preset": "bogus"}),
                                          ("avif", {"codec": "bogus"})])
def test_bad_encoder_options_fail_in_one_line(name: str, options: dict, images) -> None:
    usable(name)
    codec = make_anchor(name, **options)
    with pytest.raises(AnchorError) as info:
        codec.encode(images["64x48"], high_low(codec)[0])
    assert str(info.value).startswith(f"{name}:") and "\n" not in str(info.value)


def test_vvc_presets_are_the_encoders_and_change_the_bytes(images) -> None:
    import subprocess

    usable("vvc")
    helptext = subprocess.run([anchors.ffmpeg_exe(), "-hide_banner", "-h", "encoder=libvvenc"],
                              capture_output=True, text=True, timeout=30).stdout
    block = helptext.split("-preset", 1)[1].split("\n  -", 1)[0]      # the -preset option and its values
    offered = [ln.split()[0] for ln in block.splitlines()[1:] if ln.strip()]
    assert tuple(offered) == anchors.VVENC_PRESETS
    assert make_anchor("vvc").preset == "medium"                     # the BD-rate reference
    with pytest.raises(AnchorError, match=r"^anchor vvc\.preset: unknown VVenC preset 'bogus' \(known: faster, "):
        make_anchor("vvc", preset="bogus")
    img = images["64x48"]
    medium, faster = (make_anchor("vvc", preset=p).encode(img, 32) for p in ("medium", "faster"))
    assert medium != faster
    assert make_anchor("vvc", threads=2).settings() == make_anchor("vvc").settings() == \
        {"preset": "medium", "qpa": False}                           # threads do not change the bytes


def test_vvc_writes_a_real_vvc_bitstream(images) -> None:
    codec = usable("vvc")
    img = natural(64, 64, seed=2)                 # even and >= 64: no padding, a plain .266
    data = codec.encode(img, 32)
    assert data[:4] == b"\x00\x00\x00\x01"          # Annex-B start code
    types = anchors.vvc_nal_unit_types(data)
    assert types[0] == 20                          # access unit delimiter (H.266 table 5)
    assert {15, 16} <= set(types)                  # SPS, PPS
    assert set(types) & {7, 8, 9}                  # an IRAP slice: IDR_W_RADL, IDR_N_LP, CRA
    assert psnr(img, codec.decode(data)) > 30.0


def test_vvc_pads_odd_sizes_and_counts_the_prefix(images) -> None:
    codec = usable("vvc")
    data = codec.encode(images["37x29"], 32)
    pad_h, pad_w = anchors.vvc_canvas(29, 37)
    assert data[:3] == bytes([0xFF, pad_w, pad_h]) and (pad_h, pad_w) == (35, 27)
    assert data[3:7] == b"\x00\x00\x00\x01"
    assert codec.decode(data).shape == (29, 37, 3)
    assert anchors.vvc_canvas(64, 128) == (0, 0) and anchors.vvc_canvas(65, 128) == (1, 0)


def test_vvc_timeout_is_a_one_line_error(images) -> None:
    usable("vvc")
    slow = make_anchor("vvc", timeout_s=0.001)
    with pytest.raises(AnchorError, match="did not finish within 0.001 s"):
        slow.encode(images["64x48"], 32)


def test_ffmpeg_reason_keeps_the_codec_complaint() -> None:
    stderr = (b"[vvc @ 0x55d1] No start code is found.\n"
              b"[vf#0:0 @ 0x55d2] Cannot determine format of input 0:0 after EOF\n"
              b"[vost#0:0/ppm @ 0x55d3] Terminating thread with return code -22\n")
    assert anchors.ffmpeg_reason(stderr) == ("No start code is found.; "
                                             "Cannot determine format of input 0:0 after EOF")
    assert anchors.ffmpeg_reason(b"") == "no message"


def test_parse_ppm() -> None:
    img = natural(5, 7)
    buf = b"P6\n7 5\n255\n" + img.tobytes()
    np.testing.assert_array_equal(anchors.parse_ppm(buf), img)
    with pytest.raises(AnchorError, match="expected 105 pixel bytes"):
        anchors.parse_ppm(buf[:-1])
    with pytest.raises(AnchorError, match="not an 8-bit binary PPM"):
        anchors.parse_ppm(b"P5\n7 5\n255\n")


def test_pick_qualities_spans_the_bpp_range() -> None:
    samples = [natural(48, 64, seed=s) for s in range(2)]
    plan = pick_qualities("jpeg", samples, (1.0, 3.0), n_points=6)
    assert isinstance(plan, QualityPlan) and plan.codec == "jpeg"
    assert len(set(plan.qualities)) == 6
    assert list(plan.qualities) == sorted(plan.qualities)        # JPEG: rate grows with q
    assert list(plan.mean_bpp) == sorted(plan.mean_bpp)
    assert plan.mean_bpp[0] < 1.2 and plan.mean_bpp[-1] > 2.6    # both ends reached
    assert pick_qualities("jpeg", samples, (1.0, 3.0), n_points=6) == plan


def test_pick_qualities_fills_a_narrow_range_with_distinct_points() -> None:
    samples = [natural(48, 64)]
    plan = pick_qualities("jpeg", samples, (1.50, 1.52), n_points=6)
    assert len(set(plan.qualities)) == 6
    plan = pick_qualities("jpeg", samples, (1e-4, 2e-4), n_points=6)   # below the lowest rate
    assert plan.qualities == (1, 2, 3, 4, 5, 6)


def test_pick_qualities_vvc_runs_in_rate_order() -> None:
    usable("vvc")
    plan = pick_qualities("vvc", [natural(64, 64)], (0.2, 0.9), n_points=6)
    assert len(set(plan.qualities)) == 6
    assert list(plan.qualities) == sorted(plan.qualities, reverse=True)  # QP falls as rate grows
    assert plan.mean_bpp[0] < 0.25 and plan.mean_bpp[-1] > 0.7


def test_pick_qualities_rejects_bad_arguments() -> None:
    with pytest.raises(AnchorError, match="0 < low < high"):
        pick_qualities("jpeg", [natural(16, 16)], (1.0, 0.5))
    with pytest.raises(AnchorError, match="no sample images"):
        pick_qualities("jpeg", [], (0.1, 1.0))
