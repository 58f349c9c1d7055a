"""Merging and selection helpers: cluster merge weights, global token, VisionZip contextual
tokens, pooling, spatial sampling, FastV's keep step."""
import pytest
import torch

from vlmcompress.tokens.merge import (
    avg_pool_tokens, global_token, merge_into_centres, pool_grid, visionzip_contextual,
)
from vlmcompress.tokens.select import (
    fastv_keep, fastv_scores, grid_peaks, peaks_first, random_scores, split_budget, spread_mask, stride_mask,
)


def _toy():
    # Five tokens; keys: 1 and 2 point almost like 0, 3 and 4 elsewhere.
    x = torch.tensor([[[1.0, 0], [2, 0], [0, 3], [4, 4], [5, -1]]])
    keys = torch.tensor([[[1.0, 0], [0.9, 0.1], [0.8, 0.2], [0, 1], [-1, 0]]])
    a = torch.tensor([[0.4, 0.1, 0.2, 0.05, 0.25]])
    return x, keys, a


def test_merge_weights_average_and_residual():
    x, keys, a = _toy()
    centres = torch.tensor([[True, False, False, False, False]])
    pool = torch.ones_like(centres)
    avg, valid = merge_into_centres(x, keys, a, centres, pool, n_neighbors=2, mode="average")
    expect = (0.4 * x[0, 0] + 0.1 * x[0, 1] + 0.2 * x[0, 2]) / 0.7
    assert valid.tolist() == [[True]]
    assert torch.allclose(avg[0, 0], expect)
    res, _ = merge_into_centres(x, keys, a, centres, pool, n_neighbors=2, mode="residual")
    assert torch.allclose(res[0, 0], x[0, 0] + 0.1 * x[0, 1] + 0.2 * x[0, 2])   # official form


def test_merge_extra_score_and_pool_decide_the_neighbours():
    x, keys, a = _toy()
    centres = torch.tensor([[True, False, False, False, False]])
    extra = torch.tensor([[0.0, 0, 0, 0, 5.0]])              # a strong text score pulls in token 4
    out, _ = merge_into_centres(x, keys, a, centres, torch.ones_like(centres), n_neighbors=2,
                                extra_score=extra)
    assert torch.allclose(out[0, 0], (0.4 * x[0, 0] + 0.25 * x[0, 4] + 0.1 * x[0, 1]) / 0.75)
    pool = torch.tensor([[True, False, True, True, True]])   # token 1 may not be absorbed
    out, _ = merge_into_centres(x, keys, a, centres, pool, n_neighbors=2)
    assert torch.allclose(out[0, 0], (0.4 * x[0, 0] + 0.2 * x[0, 2] + 0.05 * x[0, 3]) / 0.65)


def test_merge_identical_tokens_returns_the_token_and_pads_per_image():
    tok = torch.tensor([0.3, -1.2, 2.0])
    x = tok.expand(2, 6, 3).clone()
    keys = torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(0))
    a = torch.rand(2, 6, generator=torch.Generator().manual_seed(1))
    centres = torch.tensor([[True, False, True, False, False, True], [False, True, False, False, False, False]])
    out, valid = merge_into_centres(x, keys, a, centres, ~centres, n_neighbors=3)
    assert valid.tolist() == [[True, True, True], [True, False, False]]
    assert torch.allclose(out[valid], tok.expand(4, 3))
    assert (out[~valid] == 0).all()


def test_merge_with_no_centres_is_empty():
    x, keys, a = _toy()
    out, valid = merge_into_centres(x, keys, a, torch.zeros(1, 5, dtype=torch.bool), torch.ones(1, 5, dtype=torch.bool))
    assert out.shape == (1, 0, 2) and valid.shape == (1, 0)


def test_global_token():
    x, _, a = _toy()
    members = torch.tensor([[False, True, True, False, True]])
    g, valid = global_token(x, a, members)
    w = torch.tensor([0.1, 0.2, 0.25])
    assert valid.tolist() == [[True]]
    assert torch.allclose(g[0, 0], (w[:, None] * x[0, [1, 2, 4]]).sum(0) / w.sum())
    g_res, _ = global_token(x, a, members, mode="residual")
    assert torch.allclose(g_res[0, 0], (w[:, None] * x[0, [1, 2, 4]]).sum(0))
    g0, v0 = global_token(x, torch.zeros_like(a), members)      # zero weights -> plain mean
    assert torch.allclose(g0[0, 0], x[0, [1, 2, 4]].mean(0))
    empty, ve = global_token(x, a, torch.zeros_like(members))
    assert ve.tolist() == [[False]] and (empty == 0).all()
    with pytest.raises(ValueError, match="merge mode"):
        global_token(x, a, members, mode="sum")


def test_visionzip_contextual_targets_and_assignment():
    # Remaining tokens 1..6 (token 0 is dominant): R = 6, c = 2 -> step 3 -> targets are ranks
    # 0 and 3 = tokens 1 and 4. Keys put tokens 2, 6 with 1 and tokens 3, 5 with 4.
    keys = torch.tensor([[[0.0, 0, 1], [1, 0, 0], [1, 0.1, 0], [0, 1, 0.1], [0, 1, 0], [0.1, 1, 0], [1, 0, 0.1]]])
    x = torch.arange(7 * 2, dtype=torch.float32).view(1, 7, 2)
    remaining = torch.tensor([[False, True, True, True, True, True, True]])
    ctx, valid = visionzip_contextual(x, keys, remaining, 2)
    assert valid.tolist() == [[True, True]]
    assert torch.allclose(ctx[0, 0], x[0, [1, 2, 6]].mean(0))
    assert torch.allclose(ctx[0, 1], x[0, [4, 3, 5]].mean(0))


def test_pool_grid_and_average_pooling():
    assert pool_grid((24, 24), 144) == (12, 12)
    assert pool_grid((24, 24), 288) in ((16, 18), (18, 16))
    h, w = pool_grid((24, 24), 58)
    assert h * w == 56 and max(h, w) / min(h, w) <= 2
    assert pool_grid((8, 8), 16) == (4, 4)
    x = torch.arange(2 * 16 * 3, dtype=torch.float32).view(2, 16, 3)
    pooled = avg_pool_tokens(x, (4, 4), (2, 2))
    grid = x.view(2, 4, 4, 3)
    assert torch.allclose(pooled[:, 0], grid[:, :2, :2].mean(dim=(1, 2)))
    assert torch.allclose(pooled[:, 3], grid[:, 2:, 2:].mean(dim=(1, 2)))


def test_split_budget_sums_exactly():
    assert split_budget(58, (0.5, 0.25)) == [29, 15, 14]
    assert split_budget(1, (0.5, 0.25)) == [1, 0, 0]
    assert sum(split_budget(29, (0.9, 0.9))) == 29


def test_spread_and_stride_masks():
    el = torch.ones(1, 12, dtype=torch.bool)
    assert torch.nonzero(spread_mask(el, 3)[0]).flatten().tolist() == [2, 6, 10]
    el2 = torch.tensor([[True, False] * 6, [True] * 12])
    m = spread_mask(el2, torch.tensor([2, 12]))
    assert m.sum(1).tolist() == [2, 12] and not (m & ~el2).any()
    s = stride_mask(10, torch.tensor([3, 4]), limit=9)
    assert [torch.nonzero(r).flatten().tolist() for r in s] == [[0, 3, 6], [0, 4, 8]]


def test_random_scores_are_seeded():
    a = random_scores((2, 5), None, 7, torch.device("cpu"))
    b = random_scores((2, 5), None, 7, torch.device("cpu"))
    c = random_scores((2, 5), None, 8, torch.device("cpu"))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_fastv_keep_and_scores():
    att = torch.tensor([[0.1, 0.5, 0.2, 0.5, 0.05], [0.3, 0.0, 0.9, 0.1, 0.2]])
    assert fastv_keep(att, 3).tolist() == [[1, 2, 3], [0, 2, 4]]
    assert fastv_keep(att, 1).tolist() == [[1], [2]]       # tie 0.5: the earlier token
    with pytest.raises(ValueError, match="k must be"):
        fastv_keep(att, 6)
    # [B=1, heads=2, T=4, T=4]; image tokens at positions 1..2
    attn = torch.zeros(1, 2, 4, 4)
    attn[0, 0, -1] = torch.tensor([0.1, 0.6, 0.2, 0.1])
    attn[0, 1, -1] = torch.tensor([0.1, 0.2, 0.6, 0.1])
    attn[0, :, 0, 0] = 1.0
    assert fastv_scores(attn, 1, 2, "last")[0].tolist() == pytest.approx([0.4, 0.4])
    assert fastv_scores(attn, 1, 2, "mean")[0].tolist() == pytest.approx([0.1, 0.1])
    with pytest.raises(ValueError, match="outside"):
        fastv_scores(attn, 3, 2)


def test_grid_peaks_are_local_maxima_and_skip_flat_regions():
    x = torch.zeros(1, 4, 4)
    x[0, 0, 0] = 5.0                       # corner: compared with its 3 in-grid neighbours
    x[0, 2, 2] = x[0, 2, 3] = 3.0          # two equal tops side by side
    x[0, 1, 2] = 2.0                       # shoulder of the pair: lower than a neighbour
    peaks = grid_peaks(x.view(1, 16), (4, 4)).view(4, 4)
    assert torch.nonzero(peaks).tolist() == [[0, 0], [2, 2], [2, 3]]
    assert not grid_peaks(torch.ones(2, 12), (3, 4)).any()          # flat: no peak anywhere


def test_peaks_first_ranks_every_peak_above_the_rest_in_score_order():
    s = torch.tensor([[0.9, 0.8, 0.1, 0.5, 0.0, 0.0]])               # grid 1 x 6: peaks 0.9 and 0.5
    order = torch.argsort(peaks_first(s, (1, 6)), dim=1, descending=True)[0].tolist()
    assert order[:4] == [0, 3, 1, 2]


def test_peaks_first_floor_demotes_weak_peaks_to_ordinary_patches():
    s = torch.tensor([[0.9, 0.8, 0.1, 0.5, 0.0, 0.0]])               # peaks 0.9 and 0.5 (0.56 of the range)
    assert torch.argsort(peaks_first(s, (1, 6), floor=0.5), dim=1, descending=True)[0, :2].tolist() == [0, 3]
    # Above 0.56 of the range the 0.5 peak ranks by its score, after the 0.8 shoulder.
    assert torch.argsort(peaks_first(s, (1, 6), floor=0.6), dim=1, descending=True)[0, :3].tolist() == [0, 1, 3]
    with pytest.raises(ValueError, match="floor"):
        peaks_first(s, (1, 6), floor=1.0)


def test_grid_peaks_window_widens_the_neighbourhood():
    s = torch.tensor([[0.0, 3.0, 0.0, 2.0, 0.0, 0.0]])                # 1 x 6: 2.0 is two patches from 3.0
    assert torch.nonzero(grid_peaks(s, (1, 6), 3)[0]).flatten().tolist() == [1, 3]
    assert torch.nonzero(grid_peaks(s, (1, 6), 5)[0]).flatten().tolist() == [1]
    with pytest.raises(ValueError, match="odd"):
        grid_peaks(s, (1, 6), 4)
