"""Bjontegaard deltas between rate-quality curves, for any metric where higher is better.

:func:`bd_rate` is the average rate difference (percent) of a test curve against an
anchor curve at equal quality (negative: the test needs fewer bits); :func:`bd_quality`
is the average quality difference at equal rate (BD-PSNR for PSNR, points of accuracy for
an accuracy). Both integrate interpolants only over the range the two curves share, as
the ``bjontegaard`` package does (``pchip`` or ``akima`` on log10 rate).

Curves are cleaned first, because measured curves (task accuracies above all) are not
always monotone, and the interpolants need strictly increasing abscissae:

* points with a non-finite value or a rate <= 0 are dropped;
* ``monotone="envelope"`` (default) keeps the operational rate-quality frontier: sorted by
  rate, a point survives only if its quality is strictly above every cheaper point's.
  A dominated point is one a sender would never choose, since it could send the cheaper,
  better point instead, so the frontier is what the codec achieves. Duplicates collapse.
* ``monotone="isotonic"`` fits a non-decreasing quality to the rate-sorted points (pool
  adjacent violators; points of one rate are averaged first) and merges each run of equal
  fitted quality into one point at the geometric-mean rate: less optimistic than the
  envelope for noisy accuracies, at the price of smoothing real bumps.

The result is NaN, never an exception, when a curve keeps fewer than two points or when
the curves share less than ``min_overlap`` of their joint range; :class:`BDResult` carries
the reason. Wrong argument shapes and unknown methods still raise ``ValueError``.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

Monotone = Literal["envelope", "isotonic"]
Method = Literal["pchip", "akima"]
_METHODS = ("pchip", "akima")
_MONOTONE = ("envelope", "isotonic")


@dataclass(frozen=True)
class BDResult:
    """A Bjontegaard delta, or NaN with ``reason`` saying why it is undefined."""

    value: float
    reason: str = ""
    overlap: float = float("nan")   # shared fraction of the joint integration range, 0..1
    n_anchor: int = 0               # points left after cleaning
    n_test: int = 0

    @property
    def ok(self) -> bool:
        return math.isfinite(self.value)


def _as_curve(rate: Sequence[float], quality: Sequence[float], who: str
              ) -> tuple[np.ndarray, np.ndarray]:
    r = np.asarray(rate, dtype=float).ravel()
    q = np.asarray(quality, dtype=float).ravel()
    if r.shape != q.shape:
        raise ValueError(f"{who}: {r.size} rates but {q.size} quality values")
    keep = np.isfinite(r) & np.isfinite(q) & (r > 0)
    return r[keep], q[keep]


def _envelope(r: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((-q, r))                 # by rate, best quality first within a rate
    keep, best = [], -np.inf
    for i in order:
        if q[i] > best:
            keep.append(i)
            best = q[i]
    return r[keep], q[keep]


def _isotonic(r: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rates, inverse = np.unique(r, return_inverse=True)
    counts = np.bincount(inverse).astype(float)
    means = np.bincount(inverse, weights=q) / counts
    # Pool adjacent violators: blocks of (mean, weight, log-rate sum, n rates).
    blocks: list[list[float]] = []
    for rate, mean, weight in zip(rates, means, counts):
        blocks.append([mean, weight, math.log(rate), 1.0])
        while len(blocks) > 1 and blocks[-2][0] >= blocks[-1][0]:
            m2, w2, l2, n2 = blocks.pop()
            m1, w1, l1, n1 = blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, l1 + l2, n1 + n2])
    out_r = np.array([math.exp(b[2] / b[3]) for b in blocks])
    out_q = np.array([b[0] for b in blocks])
    return out_r, out_q


def monotone_curve(rate: Sequence[float], quality: Sequence[float],
                   monotone: Monotone = "envelope") -> tuple[np.ndarray, np.ndarray]:
    """Clean one curve: both returned arrays strictly increasing, sorted by rate."""
    if monotone not in _MONOTONE:
        raise ValueError(f"monotone must be one of {', '.join(_MONOTONE)}, got {monotone!r}")
    r, q = _as_curve(rate, quality, "curve")
    if r.size == 0:
        return r, q
    return _envelope(r, q) if monotone == "envelope" else _isotonic(r, q)


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    joint = max(a.max(), b.max()) - min(a.min(), b.min())
    shared = min(a.max(), b.max()) - max(a.min(), b.min())
    return max(shared, 0.0) / joint if joint > 0 else 0.0


def _bd(kind: Literal["rate", "quality"], anchor_rate: Sequence[float],
        anchor_quality: Sequence[float], test_rate: Sequence[float],
        test_quality: Sequence[float], method: Method, min_overlap: float,
        monotone: Monotone) -> BDResult:
    import bjontegaard

    if method not in _METHODS:
        raise ValueError(f"method must be one of {', '.join(_METHODS)}, got {method!r}")
    _as_curve(anchor_rate, anchor_quality, "anchor curve")    # shape checks raise early
    _as_curve(test_rate, test_quality, "test curve")
    ra, qa = monotone_curve(anchor_rate, anchor_quality, monotone)
    rt, qt = monotone_curve(test_rate, test_quality, monotone)
    counts = {"n_anchor": int(ra.size), "n_test": int(rt.size)}
    for who, n in (("anchor", ra.size), ("test", rt.size)):
        if n < 2:
            return BDResult(float("nan"), f"{who} curve has {n} usable point(s) after "
                            f"cleaning ({monotone}); need >= 2", **counts)
    axis_a, axis_t = (qa, qt) if kind == "rate" else (np.log10(ra), np.log10(rt))
    overlap = _overlap(axis_a, axis_t)
    if overlap <= 0 or overlap < min_overlap:
        axis = "quality" if kind == "rate" else "log-rate"
        return BDResult(float("nan"), f"curves share {overlap:.0%} of their {axis} range "
                        f"(need > 0 and >= {min_overlap:.0%})", overlap, **counts)
    fn = bjontegaard.bd_rate if kind == "rate" else bjontegaard.bd_psnr
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = float(fn(ra, qa, rt, qt, method=method, require_matching_points=False,
                             min_overlap=0.0))
    except (ValueError, AssertionError, ArithmeticError, np.linalg.LinAlgError) as exc:
        return BDResult(float("nan"), f"interpolation failed: {type(exc).__name__}: {exc}",
                        overlap, **counts)
    if not math.isfinite(value):
        return BDResult(float("nan"), "interpolation gave a non-finite value", overlap, **counts)
    return BDResult(value, "", overlap, **counts)


def bd_rate_result(anchor_rate: Sequence[float], anchor_quality: Sequence[float],
                   test_rate: Sequence[float], test_quality: Sequence[float], *,
                   method: Method = "pchip", min_overlap: float = 0.25,
                   monotone: Monotone = "envelope") -> BDResult:
    """BD-rate in percent of the test curve against the anchor, with diagnostics."""
    return _bd("rate", anchor_rate, anchor_quality, test_rate, test_quality, method,
               min_overlap, monotone)


def bd_rate(anchor_rate: Sequence[float], anchor_quality: Sequence[float],
            test_rate: Sequence[float], test_quality: Sequence[float], *,
            method: Method = "pchip", min_overlap: float = 0.25,
            monotone: Monotone = "envelope") -> float:
    """BD-rate in percent (negative: test saves rate); NaN when undefined."""
    return bd_rate_result(anchor_rate, anchor_quality, test_rate, test_quality,
                          method=method, min_overlap=min_overlap, monotone=monotone).value


def bd_quality_result(anchor_rate: Sequence[float], anchor_quality: Sequence[float],
                      test_rate: Sequence[float], test_quality: Sequence[float], *,
                      method: Method = "pchip", min_overlap: float = 0.25,
                      monotone: Monotone = "envelope") -> BDResult:
    """Average quality gain of the test curve at equal rate (BD-PSNR etc.), with diagnostics."""
    return _bd("quality", anchor_rate, anchor_quality, test_rate, test_quality, method,
               min_overlap, monotone)


def bd_quality(anchor_rate: Sequence[float], anchor_quality: Sequence[float],
               test_rate: Sequence[float], test_quality: Sequence[float], *,
               method: Method = "pchip", min_overlap: float = 0.25,
               monotone: Monotone = "envelope") -> float:
    """Average quality gain at equal rate, in the metric's units; NaN when undefined."""
    return bd_quality_result(anchor_rate, anchor_quality, test_rate, test_quality,
                             method=method, min_overlap=min_overlap, monotone=monotone).value


Curves = Mapping[str, Mapping[str, Sequence[float]]]


def bd_table_results(curves: Curves, anchor: str, metrics: Sequence[str], *,
                     rate_key: str = "bpp", kind: Literal["rate", "quality"] = "rate",
                     method: Method = "pchip", min_overlap: float = 0.25,
                     monotone: Monotone = "envelope") -> dict[str, dict[str, BDResult]]:
    """``codec -> metric -> BDResult`` against ``curves[anchor]`` (anchor row included).

    ``curves`` maps a codec name to columns: ``{"bpp": [...], "psnr": [...], ...}``.
    """
    if anchor not in curves:
        raise ValueError(f"bd_table: anchor {anchor!r} not among curves "
                         f"({', '.join(curves) or 'none'})")
    for name, cols in curves.items():
        missing = [k for k in (rate_key, *metrics) if k not in cols]
        if missing:
            raise ValueError(f"bd_table: curve {name!r} has no column {missing[0]!r}")
    fn = bd_rate_result if kind == "rate" else bd_quality_result
    ref = curves[anchor]
    return {name: {m: fn(ref[rate_key], ref[m], cols[rate_key], cols[m], method=method,
                         min_overlap=min_overlap, monotone=monotone) for m in metrics}
            for name, cols in curves.items()}


def bd_table(curves: Curves, anchor: str, metrics: Sequence[str], **kwargs: object
             ) -> dict[str, dict[str, float]]:
    """``codec -> metric -> BD-rate %`` (BD-quality with ``kind="quality"``); NaN if undefined."""
    results = bd_table_results(curves, anchor, metrics, **kwargs)  # type: ignore[arg-type]
    return {name: {m: r.value for m, r in row.items()} for name, row in results.items()}
