"""DivPrune and CDPruner: the selection against brute force, their traits, params, and their
runs through compress(), make_transform() and attach() on the tiny stock models."""
from __future__ import annotations

import itertools

import pytest
import torch

import test_tokens_attach as llava
import test_tokens_attach_archs as archs
from test_tokens_registry import _features, _sources, _TextLVLM
from vlmcompress.config import ConfigError, from_dict
from vlmcompress.tokens import (
    ADAPTIVE, KIND_RECOVERED, KIND_SALIENT, METHOD_PARAMS, TEXT_GUIDED, TokensParams, VisualTokens, attach, compress, make_transform,
    method_spec, resolve_budget,
)
from vlmcompress.tokens.config import CDPrunerParams, DivPruneParams
from vlmcompress.tokens.peers import conditional_kernel, dpp_greedy_map, instruction_relevance
from vlmcompress.tokens.select import cosine_matrix, diverse_mask, max_min_greedy

PEERS = ["divprune", "cdpruner"]


def vt_of(tokens: torch.Tensor, text_sim: torch.Tensor | None = None) -> VisualTokens:
    """tokens [B, N, D] (and the instruction cosine [B, N]) as VisualTokens on a 1 x N grid."""
    B, N, _ = tokens.shape
    return VisualTokens(tokens, tokens, torch.full((B, N), 1.0 / N), text_sim=text_sim, grid=(1, N))


def random_vt(B=3, N=40, D=12, seed=0) -> VisualTokens:
    g = torch.Generator().manual_seed(seed)
    return vt_of(torch.randn(B, N, D, generator=g), torch.rand(B, N, generator=g) * 2 - 1)


def clustered(n_clusters=4, per=3, D=8, noise=0.05, seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    """[1, n_clusters·per, D] tight clusters around orthogonal directions, shuffled; [N] labels."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.linalg.qr(torch.randn(D, D, generator=g)).Q[:, :n_clusters].T          # [C, D] orthonormal
    labels = torch.arange(n_clusters).repeat_interleave(per)
    points = centres[labels] + noise * torch.randn(len(labels), D, generator=g)
    order = torch.randperm(len(labels), generator=g)
    return points[order][None], labels[order]


def kept(c) -> list[list[int]]:
    return [c.unpad(b)[1].tolist() for b in range(c.tokens.shape[0])]


def min_pairwise(dist: torch.Tensor, subset) -> float:
    """The max-min objective: the smallest distance between two members of ``subset``."""
    return min(float(dist[i, j]) for i, j in itertools.combinations(subset, 2))


# --- DivPrune ---------------------------------------------------------------------------

def official_divprune(x: torch.Tensor, k: int) -> list[int]:
    """The official selection loop, one image: [N, D] -> the k picks, sorted."""
    unit = x / x.norm(dim=1, keepdim=True)
    dist = 1.0 - unit @ unit.T
    picks: list[int] = []
    for i in range(k):
        if i == 0:
            score = torch.topk(dist, 2, dim=0, largest=False).values[1]   # nearest other token per column
        else:
            score = dist[picks].min(dim=0).values                         # nearest pick per column
        picks.append(int(torch.argmax(score)))
    return sorted(picks)


@pytest.mark.parametrize("budget", [1, 2, 5, 0.25, 0.5])
def test_divprune_equals_the_official_loop_per_image(budget):
    vt = random_vt(B=3, N=40, D=12, seed=1)
    got = kept(compress(vt, "divprune", budget=budget))
    k = resolve_budget(40, budget)
    assert got == [official_divprune(vt.tokens[b], k) for b in range(3)]


def test_divprune_first_steps_equal_brute_force():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 15, 6, generator=g)
    dist = 1.0 - cosine_matrix(x)[0]
    picks = max_min_greedy(dist[None], 3)[0].tolist()
    nearest = [min(float(dist[i, j]) for j in range(15) if j != i) for i in range(15)]
    assert picks[0] == max(range(15), key=lambda i: nearest[i])             # the most isolated token
    assert picks[1] == max((j for j in range(15) if j != picks[0]), key=lambda j: float(dist[picks[0], j]))
    # the third maximises the max-min objective over every pair completed by one more token
    best = max((j for j in range(15) if j not in picks[:2]), key=lambda j: min_pairwise(dist, picks[:2] + [j]))
    assert picks[2] == best


def test_divprune_takes_one_token_per_cluster_before_a_second_from_any():
    x, labels = clustered(n_clusters=5, per=4)
    dist = 1.0 - cosine_matrix(x)[0]
    order = max_min_greedy(dist[None], 10)[0]
    assert sorted(labels[order[:5]].tolist()) == [0, 1, 2, 3, 4]           # one per cluster first
    assert set(labels[order[5:]].tolist()) <= {0, 1, 2, 3, 4} and len(set(order.tolist())) == 10
    c = compress(vt_of(x), "divprune", budget=5)
    assert sorted(labels[kept(c)[0]].tolist()) == [0, 1, 2, 3, 4]


def test_diverse_mask_is_the_greedy_prefix_per_image():
    """Per-image counts take a prefix of one greedy run: one token per cluster first; a count of
    0 keeps nothing and a count above N keeps everything."""
    x, labels = clustered(n_clusters=4, per=3)
    order = max_min_greedy(1.0 - cosine_matrix(x), 12)[0]
    xs = x.repeat(4, 1, 1)
    m = diverse_mask(xs, torch.tensor([0, 4, 7, 20]))
    assert m.sum(dim=1).tolist() == [0, 4, 7, 12]
    assert set(m[1].nonzero().flatten().tolist()) == set(order[:4].tolist())
    assert sorted(labels[m[1]].tolist()) == [0, 1, 2, 3]
    assert set(m[2].nonzero().flatten().tolist()) == set(order[:7].tolist())
    assert diverse_mask(xs, 3).sum(dim=1).tolist() == [3, 3, 3, 3]
    assert not diverse_mask(xs, 0).any() and diverse_mask(x[:, :1], 1).all()


def test_recoverable_with_diverse_salient_tokens_covers_every_cluster_then_recovers_by_text():
    """salient_source: diverse keeps one token of each distinct kind of patch (what DivPrune
    keeps), then the question's best match among the rest; fixed and adaptive budgets."""
    x, labels = clustered(n_clusters=4, per=3)
    text = torch.zeros(1, 12)
    text[0, labels == 2] = 1.0                                              # the question names cluster 2
    vt = vt_of(x, text)
    c = compress(vt, "recoverable_spread", budget=5, salient_source="diverse", salient_share=0.8,
                 recovered_share=0.2, recovery_peaks=False)
    sal = c.source[c.kind == KIND_SALIENT]
    rec = c.source[c.kind == KIND_RECOVERED]
    assert sorted(labels[sal].tolist()) == [0, 1, 2, 3] and len(rec) == 1
    assert int(labels[rec[0]]) == 2 and not bool(torch.isin(rec, sal).any())
    a = compress(vt, "recoverable_spread", budget=None, salient_source="diverse")
    spread = compress(vt, "recoverable_spread", budget=None)
    assert int((a.kind == KIND_SALIENT).sum()) == int((spread.kind == KIND_SALIENT).sum())   # the rule sets how many


def test_divprune_objective_beats_random_subsets_and_every_unbalanced_one():
    x, labels = clustered(n_clusters=4, per=3)
    dist = 1.0 - cosine_matrix(x)[0]
    ours = min_pairwise(dist, kept(compress(vt_of(x), "divprune", budget=4))[0])
    subsets = list(itertools.combinations(range(12), 4))
    best = max(min_pairwise(dist, s) for s in subsets)
    unbalanced = max(min_pairwise(dist, s) for s in subsets if len(set(labels[list(s)].tolist())) < 4)
    assert ours > unbalanced + 0.5 and ours >= 0.9 * best
    g = torch.Generator().manual_seed(0)
    y = torch.randn(1, 40, 8, generator=g)                                 # no clusters: against random picks
    d = 1.0 - cosine_matrix(y)[0]
    ours = min_pairwise(d, kept(compress(vt_of(y), "divprune", budget=6))[0])
    rand = [min_pairwise(d, torch.randperm(40, generator=g)[:6].tolist()) for _ in range(200)]
    assert ours > max(rand)


def test_divprune_with_duplicates_still_keeps_k_distinct_tokens():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).repeat(5, 1)[None]           # two directions, five copies each
    c = compress(vt_of(x), "divprune", budget=4)
    assert c.counts().tolist() == [4] and len(set(kept(c)[0])) == 4


# --- CDPruner ---------------------------------------------------------------------------

def greedy_logdet(L: torch.Tensor, k: int) -> list[int]:
    """Brute-force greedy MAP: each step the token that maximises log det of the kept kernel."""
    L = L.double()
    picks: list[int] = []
    for _ in range(k):
        def logdet(j: int) -> float:
            s = picks + [j]
            sign, value = torch.linalg.slogdet(L[s][:, s])
            return float(value) if sign > 0 else float("-inf")
        picks.append(max((j for j in range(L.shape[0]) if j not in picks), key=logdet))
    return picks


def official_relevance(text_sim: torch.Tensor) -> torch.Tensor:
    """[N] -> [N]: the official min-max normalisation (without its negation)."""
    return (text_sim - text_sim.min() + 1e-6) / (text_sim.max() - text_sim.min())


def test_cdpruner_with_constant_relevance_is_plain_dpp_greedy_map():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 10, 16, generator=g)
    vt = vt_of(x, torch.full((2, 10), 0.3))
    assert torch.equal(instruction_relevance(vt.text_sim), torch.ones(2, 10))
    c = compress(vt, "cdpruner", budget=4)
    S = cosine_matrix(x)
    for b in range(2):
        ref = greedy_logdet(S[b], 4)
        assert dpp_greedy_map(S[b:b + 1], 4)[0].tolist() == ref
        assert kept(c)[b] == sorted(ref)


def test_cdpruner_equals_brute_force_greedy_on_the_conditional_kernel():
    vt = random_vt(B=2, N=9, D=16, seed=4)
    c = compress(vt, "cdpruner", budget=5)
    for b in range(2):
        r = official_relevance(vt.text_sim[b])
        unit = vt.tokens[b] / vt.tokens[b].norm(dim=1, keepdim=True)
        L = r[:, None] * (unit @ unit.T) * r[None, :]
        assert kept(c)[b] == sorted(greedy_logdet(L, 5))


def test_cdpruner_picks_the_tokens_the_instruction_is_about():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 30, 16, generator=g)
    text = torch.zeros(1, 30)
    text[0, [4, 17, 22]] = 0.9
    c = compress(vt_of(x, text), "cdpruner", budget=3)
    assert kept(c) == [[4, 17, 22]]
    first = dpp_greedy_map(conditional_kernel(cosine_matrix(x), instruction_relevance(text)), 1)
    assert first.tolist() == [[4]]                                          # first pick: most relevant (lowest index)
    away = compress(vt_of(x, text), "cdpruner", budget=3, negate_relevance=True)
    assert not set(kept(away)[0]) & {4, 17, 22}                             # the official sign avoids them


def test_cdpruner_relevance_normalisation_and_theta():
    sim = torch.tensor([[0.1, 0.3, 0.5], [0.2, 0.2, 0.2]])
    r = instruction_relevance(sim)
    torch.testing.assert_close(r[0], official_relevance(sim[0]))
    assert torch.equal(r[1], torch.ones(3))                                 # equal scores: no division by zero
    torch.testing.assert_close(instruction_relevance(sim, negate=True)[0], official_relevance(-sim[0]))
    torch.testing.assert_close(instruction_relevance(sim, theta=0.5), torch.exp(0.5 * r))
    vt = random_vt(B=1, N=20, D=8, seed=6)
    plain = compress(vt_of(vt.tokens, torch.zeros(1, 20)), "cdpruner", budget=5)
    assert kept(compress(vt, "cdpruner", budget=5, theta=0.0)) == kept(plain)     # exp(0 · r) = 1: no condition
    assert kept(compress(vt, "cdpruner", budget=5)) != kept(plain)


def test_cdpruner_past_the_kernel_rank_keeps_k_tokens_by_relevance():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 20, 3, generator=g)                                  # rank 3 < k
    text = torch.rand(2, 20, generator=g)
    K = conditional_kernel(cosine_matrix(x), instruction_relevance(text))
    order = dpp_greedy_map(K, 10)
    for b in range(2):
        assert len(set(order[b].tolist())) == 10
        assert order[b, :3].tolist() == greedy_logdet(K[b], 3)              # the rank is used by the DPP
        rest = [j for j in torch.argsort(text[b], descending=True, stable=True).tolist() if j not in order[b, :3]]
        assert order[b, 3:].tolist() == rest[:7]                            # then by relevance
    c = compress(vt_of(x, text), "cdpruner", budget=10)
    assert c.counts().tolist() == [10, 10] and torch.isfinite(c.tokens).all()


def test_cdpruner_needs_the_instruction():
    with pytest.raises(ValueError, match=r"^cdpruner: VisualTokens\.text_sim is required"):
        compress(vt_of(torch.randn(1, 8, 4)), "cdpruner", budget=2)


# --- both ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", PEERS)
@pytest.mark.parametrize("budget", [1, 3, 0.1, 0.5, 39])
def test_exactly_k_unchanged_tokens_in_patch_order_deterministic(name, budget):
    vt = random_vt(B=3, N=40, D=12, seed=8)
    c = compress(vt, name, budget=budget)
    k = resolve_budget(40, budget)
    assert c.counts().tolist() == [k] * 3 and c.mask.all() and (c.kind == KIND_SALIENT).all()
    assert (c.source[:, 1:] > c.source[:, :-1]).all()
    assert torch.equal(c.tokens, vt.tokens.gather(1, c.source[..., None].expand(-1, -1, 12)))
    again = compress(vt, name, budget=budget)
    assert torch.equal(again.source, c.source)
    for b in range(3):                                                      # each image alone: the same picks
        assert torch.equal(compress(vt.select(slice(b, b + 1)), name, budget=budget).source[0], c.source[b])


@pytest.mark.parametrize("name", PEERS)
def test_traits_budgets_and_errors(name):
    spec = method_spec(name)
    assert spec.fn.__module__ == "vlmcompress.tokens.peers" and name not in ADAPTIVE and not spec.in_lm
    assert (name in TEXT_GUIDED) == (name == "cdpruner")
    vt = random_vt(B=2, N=16, D=4)
    assert torch.equal(compress(vt, name, budget=1.0).tokens, vt.tokens)   # a budget of N keeps everything
    with pytest.raises(ValueError, match=rf"^{name}: has no adaptive mode"):
        compress(vt, name, budget=None)
    with pytest.raises(ValueError, match=rf"^{name}: bad parameter .*known parameters: "):
        compress(vt, name, budget=0.5, no_such=1)


@pytest.mark.parametrize("kwargs,match", [
    ({"theta": 1.0}, r"^tokens\.cdpruner\.theta: must be null or in \[0, 1\), got 1\.0$"),
    ({"theta": -0.1}, r"^tokens\.cdpruner\.theta: must be null or in \[0, 1\), got -0\.1$"),
    ({"theta": float("nan")}, r"^tokens\.cdpruner\.theta: must be null or in \[0, 1\)"),
    ({"theta": True}, r"^tokens\.cdpruner\.theta: must be null or in \[0, 1\)"),
    ({"negate_relevance": "yes"}, r"^tokens\.cdpruner\.negate_relevance: expected true or false, got 'yes'$"),
])
def test_cdpruner_params_are_checked(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        CDPrunerParams(**kwargs)
    with pytest.raises(ValueError, match=match[1:]):
        compress(random_vt(B=1, N=8, D=4), "cdpruner", budget=2, **kwargs)


def test_params_yaml_lists_both_with_their_sections(params):
    p = params.tokens                                                       # the project's params.yaml
    assert {"divprune", "cdpruner"} <= set(p.methods) and p.methods[-1] == "fastv"
    assert p.divprune == DivPruneParams() and p.cdpruner == CDPrunerParams()
    assert METHOD_PARAMS["cdpruner"] is CDPrunerParams and METHOD_PARAMS["divprune"] is DivPruneParams
    q = from_dict(TokensParams, {"cdpruner": {"theta": 0.5, "negate_relevance": True}}, "tokens")
    assert q.method_params("cdpruner") == {"theta": 0.5, "negate_relevance": True}
    with pytest.raises(ConfigError, match=r"^tokens\.cdpruner\.theta: must be null or in \[0, 1\), got 2"):
        from_dict(TokensParams, {"cdpruner": {"theta": 2}}, "tokens")
    with pytest.raises(ConfigError, match=r"^tokens\.divprune\.k: unknown key"):
        from_dict(TokensParams, {"divprune": {"k": 3}}, "tokens")


def test_make_transform_feeds_cdpruner_the_question():
    P = TokensParams(methods=["full", "divprune", "cdpruner"])
    tr = make_transform(_TextLVLM(), "cdpruner", 0.25, P)
    tokens, mask = tr(_features(), ["abc", "a"])                # questions embed as one-hot 0 and 1
    assert tr.uses_text and tokens.shape == (2, 4, 8) and mask.all()
    src = _sources(tr.last)
    assert all(s % 3 == 0 for s in src[0]) and all(s % 3 == 1 for s in src[1])   # only patches like the question
    tr = make_transform(None, "divprune", 0.25, P)               # no question needed
    assert not tr.uses_text and tr(_features(), ["q", "q"])[0].shape == (2, 4, 8)


# --- attach on the tiny stock models -------------------------------------------------------

@pytest.mark.parametrize("name", PEERS)
def test_attach_llava15_equals_feeding_the_kept_tokens_by_hand(name):
    model = llava.tiny_llava()
    inputs = llava.prompts(llava.QS)
    with attach(model, name, 0.25, tokenizer=llava.TOK) as h:
        ids, logits = llava.gen(model, inputs)
        assert h.stats["tokens"] == [4, 4]                                # 25 % of 16 patches
        assert (h.last.kind[h.last.mask] == KIND_SALIENT).all()
    ref_ids, ref_logits = llava.gen(model, llava._by_hand(model, h, inputs))
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)


def test_attach_cdpruner_reads_the_question():
    model = llava.tiny_llava()
    with pytest.raises(ValueError, match=r"^attach: cdpruner reads the question"):
        attach(model, "cdpruner", 0.25)
    with attach(model, "cdpruner", 0.25, tokenizer=llava.TOK) as h:
        model(**llava.prompts(llava.QS))
    want = [llava.TOK(q, add_special_tokens=False)["input_ids"] for q in llava.QS]
    newline = llava.TOK.convert_tokens_to_ids("\n")
    assert [[t for t in q if t != newline] for q in h.last_question_ids] == want


@pytest.mark.parametrize("name", PEERS)
def test_attach_llava_next_equals_feeding_the_kept_tokens_by_hand(name):
    model = archs.tiny_next()
    inputs = archs.next_inputs(model, archs.QS[:1], [2])
    with attach(model, name, 0.25, tokenizer=archs.TOK) as h:
        got = archs.gen(model, inputs)
        assert int(h.last.mask[0].sum()) == resolve_budget(h.stats["total"][0] - 4, 0.25)   # patch tokens only
    archs.assert_same(got, archs.gen(model, archs.next_by_hand(model, h, inputs)))


@pytest.mark.parametrize("name", PEERS)
def test_attach_qwen2vl_keeps_tokens_at_their_original_positions(name):
    model = archs.tiny_qwen()
    inputs = archs.qwen_inputs(archs.QS, [0, 1])
    with attach(model, name, 0.25, tokenizer=archs.TOK) as h:
        got = archs.gen(model, inputs)
    assert h.stats["tokens"] == [4, 3] and h.stats["total"] == [16, 12]
    archs.assert_same(got, archs.gen(model, archs.qwen_by_hand(model, h, inputs)))


def test_the_tokens_stage_sweeps_both(project_root, params, tiny_scenes):
    from test_tokens_stage import _tiny_project, paired_names, planned_runs
    from vlmcompress.data.dataset import load_all
    from vlmcompress.tokens.stage import run_tokens_stage

    P = _tiny_project(project_root, params, tiny_scenes, methods=["full", "divprune", "cdpruner", "recoverable"],
                      budgets=[0.10], eval={"example_methods": ["full", "divprune", "cdpruner"]})
    run_tokens_stage(P, load_all(), log=lambda line: None)
    out = project_root / "outputs" / "tokens"
    runs = planned_runs(out)
    div, cdp = runs["divprune"], runs["cdpruner"]
    assert set(div) == set(cdp) == {"0.10"}                                 # no adaptive mode
    assert float(div["0.10"]["tokens"]) == float(cdp["0.10"]["tokens"]) == 2    # 10 % of 16 patches
    assert float(cdp["0.10"]["gflops"]) > float(div["0.10"]["gflops"])     # the question's text tower
    assert "cdpruner - divprune" in paired_names(out)                       # text-guided against the rest
