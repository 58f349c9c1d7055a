"""BD-rate / BD-quality: known answers, messy curves, NaN with a reason instead of a crash."""
from __future__ import annotations

import math

import numpy as np
import pytest

from vlmcompress.eval.bdrate import (
    BDResult, bd_quality, bd_quality_result, bd_rate, bd_rate_result, bd_table,
    bd_table_results, monotone_curve,
)

RATE = [0.1, 0.2, 0.4, 0.8, 1.6]
PSNR = [28.0, 31.0, 34.0, 36.5, 38.5]


@pytest.mark.parametrize("method", ["pchip", "akima"])
def test_known_answers(method: str) -> None:
    assert bd_rate(RATE, PSNR, RATE, PSNR, method=method) == pytest.approx(0.0, abs=1e-9)
    half = [r / 2 for r in RATE]
    assert bd_rate(RATE, PSNR, half, PSNR, method=method) == pytest.approx(-50.0, abs=1e-6)
    double = [r * 2 for r in RATE]
    assert bd_rate(RATE, PSNR, double, PSNR, method=method) == pytest.approx(100.0, abs=1e-6)
    better = [q + 1.5 for q in PSNR]
    assert bd_quality(RATE, PSNR, RATE, better, method=method) == pytest.approx(1.5, abs=1e-9)


def test_quality_shift_on_a_log_linear_curve() -> None:
    # q = 10 log10(r) + c: +3 dB at equal rate is 10**-0.3 of the rate at equal quality.
    rate = np.geomspace(0.05, 2.0, 7)
    anchor = 10 * np.log10(rate) + 40
    test = anchor + 3.0
    want = (10 ** -0.3 - 1) * 100
    assert bd_rate(rate, anchor, rate, test) == pytest.approx(want, abs=1e-6)


def test_no_overlap_is_nan_with_a_reason() -> None:
    res = bd_rate_result(RATE, PSNR, RATE, [q + 20 for q in PSNR])
    assert isinstance(res, BDResult) and math.isnan(res.value) and not res.ok
    assert "share 0% of their quality range" in res.reason
    res = bd_quality_result(RATE, PSNR, [r * 100 for r in RATE], PSNR)
    assert math.isnan(res.value) and "log-rate" in res.reason


def test_min_overlap_threshold() -> None:
    shifted = [q + 7.0 for q in PSNR]      # quality ranges 28..38.5 vs 35..45.5: 3.5/17.5 = 20%
    low = bd_rate_result(RATE, PSNR, RATE, shifted, min_overlap=0.25)
    assert math.isnan(low.value) and low.overlap == pytest.approx(0.2)
    ok = bd_rate_result(RATE, PSNR, RATE, shifted, min_overlap=0.1)
    assert ok.ok and ok.value < 0


def test_too_few_points_is_nan() -> None:
    res = bd_rate_result(RATE, PSNR, [0.5, 0.5, 0.5], [30.0, 30.0, 30.0])
    assert math.isnan(res.value) and "test curve has 1 usable point" in res.reason
    res = bd_rate_result([0.1, float("nan"), -1.0], [30.0, 31.0, 32.0], RATE, PSNR)
    assert math.isnan(res.value) and "anchor curve has 1 usable point" in res.reason


def test_duplicates_and_order_do_not_matter() -> None:
    base = bd_rate(RATE, PSNR, [r * 0.7 for r in RATE], PSNR)
    rate_t = [r * 0.7 for r in RATE]
    messy_r = rate_t[::-1] + rate_t[:2]
    messy_q = PSNR[::-1] + PSNR[:2]
    for monotone in ("envelope", "isotonic"):
        assert bd_rate(RATE, PSNR, messy_r, messy_q, monotone=monotone) == \
            pytest.approx(base, abs=1e-9)


def test_non_monotone_accuracy_curves() -> None:
    rate = [0.05, 0.1, 0.2, 0.4, 0.8, 1.6]
    acc_anchor = [0.42, 0.50, 0.49, 0.58, 0.61, 0.60]         # noisy, two dips
    acc_test = [0.47, 0.55, 0.57, 0.56, 0.62, 0.63]
    for monotone in ("envelope", "isotonic"):
        res = bd_rate_result(rate, acc_anchor, rate, acc_test, monotone=monotone)
        assert res.ok and res.value < 0, res
    # A dominated point (more rate, no better accuracy) is ignored by the envelope.
    r_env, q_env = monotone_curve(rate, acc_anchor)
    assert r_env.tolist() == [0.05, 0.1, 0.4, 0.8]
    assert q_env.tolist() == [0.42, 0.50, 0.58, 0.61]
    # Isotonic pooling averages the violators and merges them at the geometric-mean rate.
    r_iso, q_iso = monotone_curve(rate, acc_anchor, "isotonic")
    np.testing.assert_allclose(q_iso, [0.42, 0.495, 0.58, 0.605])
    np.testing.assert_allclose(r_iso, [0.05, math.sqrt(0.1 * 0.2), 0.4, math.sqrt(0.8 * 1.6)])


@pytest.mark.parametrize("seed", range(5))
def test_cleaned_curves_are_strictly_increasing(seed: int) -> None:
    rng = np.random.default_rng(seed)
    rate = rng.choice([0.1, 0.2, 0.3, 0.5, 0.8], size=12)
    qual = rng.normal(size=12)
    for monotone in ("envelope", "isotonic"):
        r, q = monotone_curve(rate, qual, monotone)
        assert len(r) >= 1 and np.all(np.diff(r) > 0) and np.all(np.diff(q) > 0)


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="5 rates but 4 quality values"):
        bd_rate(RATE, PSNR[:4], RATE, PSNR)
    with pytest.raises(ValueError, match="method must be one of pchip, akima"):
        bd_rate(RATE, PSNR, RATE, PSNR, method="cubic")     # type: ignore[arg-type]
    with pytest.raises(ValueError, match="monotone must be one of"):
        monotone_curve(RATE, PSNR, "hull")                   # type: ignore[arg-type]


def test_bd_table() -> None:
    curves = {
        "vvc": {"bpp": RATE, "psnr": PSNR, "acc": [0.4, 0.5, 0.55, 0.6, 0.62]},
        "ours": {"bpp": [r / 2 for r in RATE], "psnr": PSNR, "acc": [0.4, 0.5, 0.55, 0.6, 0.62]},
        "far": {"bpp": RATE, "psnr": [q + 30 for q in PSNR], "acc": [0.4, 0.5, 0.55, 0.6, 0.62]},
    }
    table = bd_table(curves, "vvc", ["psnr", "acc"])
    assert set(table) == {"vvc", "ours", "far"}
    assert table["vvc"]["psnr"] == pytest.approx(0.0, abs=1e-9)
    assert table["ours"]["psnr"] == pytest.approx(-50.0) and table["ours"]["acc"] == \
        pytest.approx(-50.0)
    assert math.isnan(table["far"]["psnr"]) and table["far"]["acc"] == pytest.approx(0.0, abs=1e-9)
    deltas = bd_table(curves, "vvc", ["psnr"], kind="quality")
    assert deltas["far"]["psnr"] == pytest.approx(30.0)
    results = bd_table_results(curves, "vvc", ["psnr"])
    assert "quality range" in results["far"]["psnr"].reason
    with pytest.raises(ValueError, match="anchor 'jpeg' not among curves"):
        bd_table(curves, "jpeg", ["psnr"])
    with pytest.raises(ValueError, match="curve 'vvc' has no column 'ms_ssim'"):
        bd_table(curves, "vvc", ["ms_ssim"])
