"""Threshold rules on 1-D scores: IQR (PruMerge), LOF fraction (Recoverable Compression), top-k."""
import numpy as np
import pytest
import torch

from vlmcompress.tokens.thresholds import (
    adaptive_mask, iqr_threshold, lof_scores, lof_threshold, masked_quantile, topk_mask,
)


def ref_lof(x: np.ndarray, k: int) -> np.ndarray:
    """Brute-force LOF straight from its definition (sklearn's formulas), no ties assumed."""
    n = len(x)
    k = max(1, min(k, n - 1))
    d = np.abs(x[:, None] - x[None, :])
    np.fill_diagonal(d, np.inf)
    nbr = np.argsort(d, axis=1, kind="stable")[:, :k]
    dk = np.take_along_axis(d, nbr, 1)
    reach = np.maximum(dk, dk[:, -1][nbr])
    lrd = 1.0 / (reach.mean(axis=1) + 1e-10)
    return lrd[nbr].mean(axis=1) / lrd


def rows(mask: torch.Tensor) -> list[list[int]]:
    return [torch.nonzero(m).flatten().tolist() for m in mask]


# --- IQR -----------------------------------------------------------------------------------

def test_iqr_hand_example():
    # Q1 = 2.75, Q3 = 6.25 (linear interpolation), IQR = 3.5, upper fence = 11.5
    s = torch.tensor([[1.0, 2, 3, 4, 5, 6, 7, 100], [1.0, 2, 3, 4, 5, 6, 7, 11]])
    assert rows(iqr_threshold(s)) == [[7], []]
    assert rows(iqr_threshold(s, min_keep=2)) == [[6, 7], [6, 7]]


def test_iqr_matches_numpy_percentile():
    g = torch.Generator().manual_seed(0)
    s = torch.rand(4, 97, generator=g) ** 6
    got = iqr_threshold(s)
    for b in range(4):
        x = s[b].numpy()
        q1, q3 = np.percentile(x, 25), np.percentile(x, 75)
        expect = x > q3 + 1.5 * (q3 - q1)
        assert expect.any()
        assert np.array_equal(got[b].numpy(), expect)


def test_iqr_quartiles_over_eligible_only():
    s = torch.tensor([[1.0, 2, 3, 4, 5, 6, 7, 100, 500, 600]])
    el = torch.ones_like(s, dtype=torch.bool)
    el[0, 8:] = False                      # the two giants are not eligible
    assert rows(iqr_threshold(s, el)) == [[7]]
    assert not iqr_threshold(s, torch.zeros_like(el), min_keep=3).any()


def test_masked_quantile_matches_numpy():
    x = torch.tensor([[3.0, 1, 4, 1, 5, 9, 2, 6]])
    valid = torch.tensor([[True, True, False, True, True, True, False, True]])
    for q in (0.0, 0.25, 0.5, 0.75, 1.0):
        assert masked_quantile(x, valid, q).item() == pytest.approx(np.percentile(x[valid].numpy(), q * 100))


# --- top-k ---------------------------------------------------------------------------------

def test_topk_mask_budget_ties_and_eligibility():
    s = torch.tensor([[0.5, 0.9, 0.5, 0.1, 0.9, 0.5]])
    assert rows(topk_mask(s, 3)) == [[0, 1, 4]]               # tie at 0.5: lowest index wins
    el = torch.tensor([[True, False, True, True, True, True]])
    assert rows(topk_mask(s, 2, el)) == [[0, 4]]
    assert rows(topk_mask(s, 99, el)) == [[0, 2, 3, 4, 5]]     # capped at the eligible count
    per_image = topk_mask(s.repeat(2, 1), torch.tensor([1, 4]))
    assert per_image.sum(1).tolist() == [1, 4]
    with pytest.raises(ValueError, match="k"):
        topk_mask(s, -1)
    with pytest.raises(ValueError, match="NaN"):
        topk_mask(torch.tensor([[float("nan"), 1.0]]), 1)


# --- LOF -----------------------------------------------------------------------------------

def test_lof_hand_example():
    # k=1: lrd = 1 for 0, 1, 2; the point 10 has reach-dist max(1, 8) = 8 -> LOF = 1 / (1/8) = 8
    lof = lof_scores(torch.tensor([[0.0, 1, 2, 10]]), n_neighbors=1)
    assert lof[0].tolist() == pytest.approx([1, 1, 1, 8], rel=1e-6)


@pytest.mark.parametrize("k", [1, 5, 20, 100])
def test_lof_matches_bruteforce_reference(k):
    g = torch.Generator().manual_seed(k)
    x = torch.rand(3, 60, generator=g) ** 3
    got = lof_scores(x, n_neighbors=k)
    for b in range(3):
        assert np.allclose(got[b].numpy(), ref_lof(x[b].double().numpy(), k), rtol=1e-9)


def test_lof_on_a_subset_ignores_the_rest():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 50, generator=g)
    valid = torch.rand(2, 50, generator=g) > 0.4
    got = lof_scores(x, valid, n_neighbors=10)
    for b in range(2):
        assert np.allclose(got[b][valid[b]].numpy(), ref_lof(x[b][valid[b]].double().numpy(), 10))
        assert torch.isnan(got[b][~valid[b]]).all()


def test_lof_duplicates_stay_finite():
    x = torch.tensor([[0.0] * 10 + [5.0]])
    lof = lof_scores(x, n_neighbors=3)
    assert torch.isfinite(lof).all()
    assert lof[0, :10].tolist() == pytest.approx([1.0] * 10)
    assert lof[0, 10] > 1e9                       # lrd of duplicates is 1 / 1e-10


def test_lof_threshold_keeps_top_floor_n_times_outlier_fraction():
    # 40 evenly spaced values, two high outliers and one LOW outlier: r = 3/43, so the rule
    # keeps the 3 highest scores — including 1.0, an inlier — not the outlier set itself.
    vals = torch.cat([torch.linspace(0, 1, 40), torch.tensor([5.0, 6.0, -5.0])]).unsqueeze(0)
    lof = lof_scores(vals, n_neighbors=5)
    assert rows(lof > 1.5) == [[40, 41, 42]]
    assert rows(lof_threshold(vals, n_neighbors=5)) == [[39, 40, 41]]


def test_lof_threshold_with_eligible_fill_min_and_count_base():
    vals = torch.cat([torch.linspace(0, 1, 40), torch.tensor([5.0, 6.0, 7.0])]).unsqueeze(0)
    el = torch.ones_like(vals, dtype=torch.bool)
    el[0, 42] = False                                # 7.0 already taken: filled with the minimum
    n_out = int((lof_scores(torch.where(el, vals, vals.min()), n_neighbors=5) > 1.5).sum())
    assert n_out == 2
    keep = lof_threshold(vals, el, n_neighbors=5)   # floor(42 * 2 / 43) = 1
    assert rows(keep) == [[41]]
    keep_all = lof_threshold(vals, el, n_neighbors=5, count_base="all")   # floor(43 * 2 / 43) = 2
    assert rows(keep_all) == [[40, 41]]


def test_lof_threshold_exclude_equals_running_on_the_subset():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(1, 80, generator=g) ** 4
    el = torch.rand(1, 80, generator=g) > 0.3
    keep = lof_threshold(x, el, n_neighbors=10, ineligible="exclude", count_base="eligible")
    alone = lof_threshold(x[el].unsqueeze(0), n_neighbors=10)
    assert keep[el].tolist() == alone[0].tolist()
    assert not keep[~el].any()


def test_rules_are_per_image_batch_equivalent():
    g = torch.Generator().manual_seed(4)
    x = torch.rand(5, 70, generator=g) ** 5
    el = torch.rand(5, 70, generator=g) > 0.2
    for rule in ("iqr", "lof"):
        for ine in ("fill_min", "exclude"):
            batched = adaptive_mask(rule, x, el, ineligible=ine, min_keep=1)
            for b in range(5):
                single = adaptive_mask(rule, x[b:b + 1], el[b:b + 1], ineligible=ine, min_keep=1)
                assert torch.equal(batched[b], single[0])
    with pytest.raises(ValueError, match="rule"):
        adaptive_mask("median", x)
