"""The method registry: budgets, layout, padding, batch equivalence, determinism, errors."""
import dataclasses

import pytest
import torch

from vlmcompress.tokens import (
    ADAPTIVE, IN_LM_METHODS, KIND_GLOBAL, KIND_MERGED, KIND_PAD, KIND_POOLED, KIND_RECOVERED, KIND_SALIENT,
    METHOD_PARAMS, TEXT_GUIDED, VisualTokens, compress, method_names, method_spec, resolve_budget,
)
from vlmcompress.tokens.thresholds import iqr_threshold

H = W = 8
N = H * W
NAMES = {"full", "random", "pool", "prumerge", "prumerge_plus", "visionzip", "recoverable", "recoverable_spread",
         "recoverable_official", "divprune", "cdpruner"}
FIXED = ["random", "prumerge", "prumerge_plus", "visionzip", "recoverable", "divprune", "cdpruner"]


def make_vt(B=3, D=6, seed=0, spikes=(2, 6, 4)) -> VisualTokens:
    """Random tokens; CLS attention with a different number of spikes per image so adaptive
    rules keep different counts; text similarity with its own few peaks."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(B, N, D, generator=g)
    keys = torch.randn(B, N, 5, generator=g)
    logits = torch.randn(B, N, generator=g) * 0.3
    text = torch.rand(B, N, generator=g) * 0.2
    for b in range(B):
        idx = torch.randperm(N, generator=g)[: spikes[b % len(spikes)]]
        logits[b, idx] += 4.0 + torch.rand(len(idx), generator=g)
        text[b, torch.randperm(N, generator=g)[:3]] += 0.7
    attn = torch.softmax(logits, dim=1)
    full = torch.softmax(logits.flip(1), dim=1)
    # hidden/project/text_dim: what recoverable_official's vision-space merge and text weight read
    return VisualTokens(tokens, keys, attn, full, text, (H, W), hidden=tokens, project=torch.nn.Identity(), text_dim=D)


def runs():
    """(method, budget) pairs covering every mode."""
    out = [("full", None)]
    for m in NAMES - {"full"}:
        if m in ADAPTIVE:
            out.append((m, None))
        out += [(m, 0.1), (m, 0.25), (m, 13)]
    return sorted(out, key=str)


def test_registry_lists_all_methods_with_params():
    assert set(method_names()) == NAMES
    # FastV prunes inside the LM (tokens.fastv): registered for its params, not a tokens function.
    assert set(METHOD_PARAMS) == NAMES | IN_LM_METHODS and not NAMES & IN_LM_METHODS
    assert IN_LM_METHODS == {"fastv"}
    assert ADAPTIVE == {"prumerge", "prumerge_plus", "recoverable", "recoverable_spread", "recoverable_official"}
    assert TEXT_GUIDED == {"recoverable", "recoverable_spread", "recoverable_official", "cdpruner"}
    assert method_spec("recoverable_spread").base == "recoverable"
    assert list(METHOD_PARAMS) == ["full", "random", "pool", "prumerge", "prumerge_plus", "visionzip",
                                   "recoverable", "recoverable_spread", "recoverable_official", "divprune", "cdpruner",
                                   "fastv"]   # the stage's default order


@pytest.mark.parametrize("name", sorted(NAMES))
def test_params_dataclass_matches_method_keywords(name):
    vt = make_vt()
    budget = None if name == "full" else 0.25
    defaults = dataclasses.asdict(METHOD_PARAMS[name]())
    a = compress(vt, name, budget=budget, **defaults)
    b = compress(vt, name, budget=budget)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.kind, b.kind)
    with pytest.raises(ValueError, match=name):
        compress(vt, name, budget=budget, no_such_param=1)


def test_full_is_identity():
    vt = make_vt()
    c = compress(vt, "full")
    assert torch.equal(c.tokens, vt.tokens) and c.mask.all()
    assert torch.equal(c.source, torch.arange(N).expand(3, N))
    assert (c.kind == KIND_SALIENT).all()
    with pytest.raises(ValueError, match="full"):
        compress(vt, "full", budget=0.5)


@pytest.mark.parametrize("name", FIXED)
@pytest.mark.parametrize("budget", [0.05, 0.10, 0.25, 0.50, 1, 7, 63])
def test_fixed_budgets_are_exact(name, budget):
    c = compress(make_vt(), name, budget=budget)
    k = resolve_budget(N, budget)
    assert c.counts().tolist() == [k] * 3
    assert c.tokens.shape[1] == k


def test_budget_at_or_above_n_returns_everything():
    vt = make_vt()
    for name in FIXED + ["pool"]:
        c = compress(vt, name, budget=1.0)
        assert torch.equal(c.tokens, vt.tokens), name


def test_pool_budget_is_the_largest_grid_within_k():
    vt = make_vt()
    c = compress(vt, "pool", budget=16)
    assert c.counts().tolist() == [16] * 3 and (c.kind == KIND_POOLED).all()
    c = compress(vt, "pool", budget=0.1)        # k = 6 -> 2x3 grid
    assert c.counts().tolist() == [6] * 3


def _group(kind: int) -> int:
    return {KIND_SALIENT: 0, KIND_RECOVERED: 0, KIND_MERGED: 1, KIND_GLOBAL: 2, KIND_POOLED: 3}[kind]


@pytest.mark.parametrize("name,budget", runs())
def test_layout_order_and_padding(name, budget):
    vt = make_vt()
    c = compress(vt, name, budget=budget)
    B, K, D = c.tokens.shape
    assert c.mask.dtype == torch.bool and c.kind.dtype == torch.int8 and c.source.dtype == torch.long
    assert K == int(c.counts().max())
    for b in range(B):
        n = int(c.counts()[b])
        assert c.mask[b, :n].all() and not c.mask[b, n:].any()          # real rows first
        assert (c.tokens[b, n:] == 0).all() and (c.kind[b, n:] == KIND_PAD).all()
        assert (c.source[b, n:] == -1).all()
        kinds = c.kind[b, :n].tolist()
        groups = [_group(k) for k in kinds]
        assert groups == sorted(groups)                                  # kept, merged, global
        kept = [i for i, k in enumerate(kinds) if k in (KIND_SALIENT, KIND_RECOVERED)]
        src = c.source[b, kept]
        assert (src[1:] > src[:-1]).all()                                # spatial order
        assert torch.equal(c.tokens[b, kept], vt.tokens[b, src])         # kept tokens unchanged
        others = [i for i, k in enumerate(kinds) if k not in (KIND_SALIENT, KIND_RECOVERED)]
        assert (c.source[b, others] == -1).all()
        assert kinds.count(KIND_GLOBAL) <= 1


@pytest.mark.parametrize("name,budget", [r for r in runs() if r[0] != "random"])
def test_batch_equals_each_image_alone(name, budget):
    vt = make_vt(B=4)
    batched = compress(vt, name, budget=budget)
    for b in range(4):
        alone = compress(vt.select(slice(b, b + 1)), name, budget=budget)
        t1, s1, k1 = batched.unpad(b)
        t2, s2, k2 = alone.unpad(0)
        assert torch.equal(s1, s2) and torch.equal(k1, k2)
        assert torch.allclose(t1, t2, atol=1e-5)


def test_adaptive_counts_differ_per_image_and_are_padded():
    vt = make_vt(B=3, spikes=(1, 8, 3))
    c = compress(vt, "prumerge")
    counts = c.counts().tolist()
    assert len(set(counts)) == 3
    outliers = iqr_threshold(vt.cls_attn).sum(1)
    assert c.count_kind(KIND_MERGED).tolist() == outliers.tolist()     # centres = IQR outliers
    assert c.count_kind(KIND_GLOBAL).tolist() == [1, 1, 1]
    assert c.tokens.shape[1] == max(counts)


def test_prumerge_plus_adds_strided_centres():
    vt = make_vt(B=2, spikes=(2, 4))
    plus = compress(vt, "prumerge_plus")
    base = compress(vt, "prumerge")
    n_out = iqr_threshold(vt.cls_attn).sum(1)
    stride = (N // n_out) // 3
    assert (plus.count_kind(KIND_MERGED) > base.count_kind(KIND_MERGED)).all()
    for b in range(2):                                  # strided positions 0..N-2 join the centres
        grid = set(range(0, N - 1, int(stride[b])))
        assert int(plus.count_kind(KIND_MERGED)[b]) >= len(grid)


def test_recovery_picks_highest_text_similarity_among_non_salient():
    vt = make_vt(B=3)
    salient_top = vt.text_sim.clone()
    for budget in (None, 20):
        c = compress(vt, "recoverable", budget=budget)
        for b in range(3):
            _, src, kind = c.unpad(b)
            sal = src[kind == KIND_SALIENT]
            rec = src[kind == KIND_RECOVERED]
            assert len(rec) > 0
            others = torch.ones(N, dtype=torch.bool)
            others[sal] = False
            ranked = torch.argsort(salient_top[b].masked_fill(~others, -1), descending=True, stable=True)
            assert set(rec.tolist()) == set(ranked[: len(rec)].tolist())


def test_recoverable_fixed_split_and_ablations():
    vt = make_vt()
    c = compress(vt, "recoverable", budget=20)               # 10 salient, 5 recovered, 4 + 1 merged
    assert c.count_kind(KIND_SALIENT).tolist() == [10] * 3
    assert c.count_kind(KIND_RECOVERED).tolist() == [5] * 3
    assert c.count_kind(KIND_MERGED).tolist() == [4] * 3
    assert c.count_kind(KIND_GLOBAL).tolist() == [1] * 3
    # salient = top CLS attention
    for b in range(3):
        _, src, kind = c.unpad(b)
        top = torch.argsort(vt.cls_attn[b], descending=True)[:10]
        assert set(src[kind == KIND_SALIENT].tolist()) == set(top.tolist())
    for kw, absent in (({"recover": False}, KIND_RECOVERED), ({"merge": False}, KIND_MERGED),
                       ({"global_token": False}, KIND_GLOBAL)):
        c = compress(vt, "recoverable", budget=20, **kw)
        assert c.counts().tolist() == [20] * 3, kw
        assert (c.count_kind(absent) == 0).all(), kw
    no_text = dataclasses.replace(vt, text_sim=None)
    with pytest.raises(ValueError, match="text_sim"):
        compress(no_text, "recoverable")
    c = compress(no_text, "recoverable", budget=20, recover=False, text_weight=0.0)
    assert c.counts().tolist() == [20] * 3


def test_recoverable_adaptive_steps():
    vt = make_vt(B=3)
    c = compress(vt, "recoverable")
    assert (c.count_kind(KIND_SALIENT) >= 1).all()
    assert (c.count_kind(KIND_GLOBAL) == 1).all()
    assert (c.counts() < N // 2).all()
    iqr = compress(vt, "recoverable", salient_rule="iqr", recovery_rule="iqr", centre_rule="iqr")
    assert (iqr.count_kind(KIND_SALIENT) >= 1).all()


@pytest.mark.parametrize("name", ["recoverable", "prumerge", "prumerge_plus", "visionzip", "pool"])
def test_merging_identical_tokens_returns_that_token(name):
    vt = make_vt()
    tok = torch.tensor([0.5, -1.0, 2.0, 0.0, 3.0, -0.25])
    vt = dataclasses.replace(vt, tokens=tok.expand(3, N, 6).clone())
    for budget in ([None] if name in ADAPTIVE else []) + [0.25, 9]:
        c = compress(vt, name, budget=budget)
        assert torch.allclose(c.tokens[c.mask], tok.expand(int(c.mask.sum()), 6), atol=1e-6), (name, budget)


def test_random_is_seeded_and_generator_driven():
    vt = make_vt()
    a = compress(vt, "random", budget=0.25, seed=3)
    b = compress(vt, "random", budget=0.25, seed=3)
    c = compress(vt, "random", budget=0.25, seed=4)
    assert torch.equal(a.source, b.source) and not torch.equal(a.source, c.source)
    g1, g2 = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    x1 = compress(vt, "random", budget=0.25, generator=g1)
    x2 = compress(vt, "random", budget=0.25, generator=g2)
    assert torch.equal(x1.source, x2.source)
    y1 = compress(vt, "random", budget=0.25, generator=g1)       # generator advanced
    assert not torch.equal(x1.source, y1.source)


@pytest.mark.parametrize("name,budget", runs())
def test_methods_are_deterministic(name, budget):
    vt = make_vt()
    a, b = compress(vt, name, budget=budget), compress(vt, name, budget=budget)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.source, b.source)


def test_attention_variant_switch():
    vt = make_vt()
    head = compress(vt, "visionzip", budget=10)
    full = compress(vt, "visionzip", budget=10, attention="full")
    for b in range(3):
        top_full = torch.argsort(vt.cls_attn_full[b], descending=True)[:8]
        _, src, kind = full.unpad(b)
        assert set(src[kind == KIND_SALIENT].tolist()) == set(top_full.tolist())
    assert not torch.equal(head.source, full.source)
    with pytest.raises(ValueError, match="cls_attn_full"):
        compress(dataclasses.replace(vt, cls_attn_full=None), "prumerge", attention="full")
    with pytest.raises(ValueError, match="attention"):
        compress(vt, "prumerge", attention="mean")


def test_half_precision_tokens_keep_their_dtype():
    vt = make_vt()
    vt = dataclasses.replace(vt, tokens=vt.tokens.to(torch.bfloat16))
    for name, budget in runs():
        c = compress(vt, name, budget=budget)
        assert c.tokens.dtype == torch.bfloat16, name


def test_bad_inputs_give_clear_errors():
    vt = make_vt()
    with pytest.raises(ValueError, match="VisualTokens.keys"):
        compress(dataclasses.replace(vt, keys=vt.keys[:, :5]), "full")
    with pytest.raises(ValueError, match="VisualTokens.grid"):
        compress(dataclasses.replace(vt, grid=(7, 8)), "full")
    with pytest.raises(ValueError, match="VisualTokens.text_sim"):
        compress(dataclasses.replace(vt, text_sim=vt.text_sim[:, :3]), "recoverable")
    with pytest.raises(ValueError, match="NaN"):
        bad = vt.cls_attn.clone()
        bad[0, 0] = float("nan")
        compress(dataclasses.replace(vt, cls_attn=bad), "prumerge")
    with pytest.raises(ValueError, match="no adaptive mode"):
        compress(vt, "visionzip")
    with pytest.raises(ValueError, match="budget"):
        compress(vt, "random", budget=1.5)
    with pytest.raises(ValueError, match="budget"):
        compress(vt, "random", budget=0)
    with pytest.raises(ValueError, match="unknown token method 'nope'"):
        compress(vt, "nope")
    with pytest.raises(ValueError, match="'fastv' prunes inside the LM"):
        compress(vt, "fastv")


@pytest.mark.parametrize("name,budget", runs())
def test_cell_map_marks_kept_patches_and_cluster_centres(name, budget):
    """``cells`` (for figures): kept patches carry their kind at their own position, one cell
    per cluster / contextual token is its centre, pooling marks every cell."""
    vt = make_vt()
    c = compress(vt, name, budget=budget)
    assert c.cells.shape == (3, N) and c.cells.dtype == torch.int8
    for b in range(3):
        tok, src, kind = c.unpad(b)
        cells = c.cells[b]
        if name == "pool":
            assert (cells == KIND_POOLED).all()
            continue
        for k in (KIND_SALIENT, KIND_RECOVERED):
            assert sorted(src[kind == k].tolist()) == (cells == k).nonzero().flatten().tolist()
        centres = (cells == KIND_MERGED).nonzero().flatten()
        assert len(centres) == int((kind == KIND_MERGED).sum())
        if name == "visionzip" and len(centres):
            # contextual tokens are means over groups that contain their target
            assert not (c.cells[b] == KIND_SALIENT)[centres].any()


def test_recoverable_spread_spreads_the_salient_share_and_recovers_by_text():
    """The variant keeps the faithful method's salient count but spreads those tokens evenly
    over the grid; the rest of the budget goes to the tokens most similar to the question."""
    torch.manual_seed(1)
    n, d = 64, 6
    attn = torch.zeros(1, n)
    attn[0, :8] = 1.0                                       # CLS attention piled in the first row
    text = torch.zeros(1, n)
    text[0, [40, 41, 50, 51]] = torch.tensor([4.0, 3.0, 2.0, 1.0])
    vt = VisualTokens(tokens=torch.randn(1, n, d), keys=torch.randn(1, n, d), cls_attn=attn.softmax(-1),
                      cls_attn_full=None, text_sim=text, grid=(8, 8))
    faithful = compress(vt, "recoverable", budget=8, merge=False, global_token=False, recovered_share=0.5)
    spread = compress(vt, "recoverable_spread", budget=8, salient_share=0.5, recovered_share=0.5)
    sal_f = faithful.source[faithful.kind == KIND_SALIENT].tolist()
    sal_s = spread.source[spread.kind == KIND_SALIENT].tolist()
    assert sal_f == [0, 1, 2, 3] and sal_s == [8, 24, 40, 56]            # ranks (i + 0.5)·64/4
    rec = spread.source[spread.kind == KIND_RECOVERED].tolist()
    assert 40 not in rec and {41, 50, 51} <= set(rec)    # 40 is already salient: the next best recovered
    assert int(spread.mask.sum()) == 8 and not bool((spread.kind == KIND_MERGED).any())
    default = compress(vt, "recoverable_spread", budget=8)                  # 3/4 spread, 1/4 recovered
    assert (default.kind == KIND_SALIENT).sum() == 6 and default.source[default.kind == KIND_RECOVERED].tolist() == [40, 41]


def _two_objects() -> VisualTokens:
    """8x8 grid; the question matches a large object (a 2x2 block, scores 5-6) and a small one
    (one patch, score 4); CLS attention piled in the first row."""
    n = 64
    text = torch.zeros(1, n)
    text[0, [9, 10, 17, 18]] = torch.tensor([6.0, 5.8, 5.6, 5.4])
    text[0, 45] = 4.0
    attn = torch.zeros(1, n)
    attn[0, :8] = 1.0
    g = torch.Generator().manual_seed(0)
    return VisualTokens(tokens=torch.randn(1, n, 6, generator=g), keys=torch.randn(1, n, 6, generator=g),
                        cls_attn=attn.softmax(-1), cls_attn_full=None, text_sim=text, grid=(8, 8))


def test_recovery_peaks_cover_every_named_object_before_a_second_patch_of_one():
    """Top scores spend the recovered share on the large object; peaks give each object one
    token first (so an LM can count them), then the best of the rest."""
    vt = _two_objects()
    kw = dict(budget=3, salient_share=0.0, recovered_share=1.0)
    top = compress(vt, "recoverable_spread", recovery_peaks=False, **kw)
    peaks = compress(vt, "recoverable_spread", peak_floor=0.0, **kw)        # every peak counts
    assert top.source[top.kind == KIND_RECOVERED].tolist() == [9, 10, 17]
    assert peaks.source[peaks.kind == KIND_RECOVERED].tolist() == [9, 10, 45]
    # The variant's default floor (0.7): the small object's peak sits at 4/6 of the score range,
    # so it ranks as an ordinary patch and the share stays on the large object.
    floored = compress(vt, "recoverable_spread", **kw)
    assert floored.source[floored.kind == KIND_RECOVERED].tolist() == [9, 10, 17]
    lower = compress(vt, "recoverable_spread", peak_floor=0.6, **kw)          # 4/6 clears a 0.6 floor
    assert lower.source[lower.kind == KIND_RECOVERED].tolist() == [9, 10, 45]
    faithful = compress(vt, "recoverable", budget=4)                           # the paper: top scores
    assert faithful.source[faithful.kind == KIND_RECOVERED].tolist() == [9]


def test_recovery_peaks_in_adaptive_mode_keep_the_rules_count():
    vt = make_vt()
    for params in ({}, {"recovery_rule": "iqr"}):
        top = compress(vt, "recoverable_spread", recovery_peaks=False, **params)
        peaks = compress(vt, "recoverable_spread", **params)
        count = lambda c: (c.kind == KIND_RECOVERED).sum(dim=1)     # noqa: E731
        assert torch.equal(count(top), count(peaks)) and torch.equal(peaks.mask.sum(1), top.mask.sum(1))
