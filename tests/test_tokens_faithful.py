"""Recoverable Compression's switches to the official code, and the official code's bugs that
ours does not have (docs/architecture.md, "Recoverable Compression: faithful switches")."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lvlm_helpers import save_tiny_lvlm
from vlmcompress.lvlm import LVLM, load_lvlm
from vlmcompress.tokens import (
    KIND_GLOBAL, KIND_MERGED, KIND_RECOVERED, KIND_SALIENT, METHOD_PARAMS, Compressed, VisualTokens, compress,
    method_spec,
)
from vlmcompress.tokens import attach
from vlmcompress.tokens.config import RecoverableParams
from vlmcompress.tokens.methods import official_text_weight
from vlmcompress.tokens.patch import TextEmbeddingCache, TokenCompressor

H = W = 8
N = H * W
DV, D, P = 12, 10, 16
OFFICIAL = dict(merge_space="vision", global_without_centres=False, min_salient=0, text_pooling="last",
                text_weight=None)


def projector(seed: int = 0, affine: bool = False) -> nn.Module:
    """A LLaVA-style projector [.., DV] -> [.., D]: linear, GELU, linear (or one affine map)."""
    torch.manual_seed(seed)
    net = nn.Linear(DV, D) if affine else nn.Sequential(nn.Linear(DV, 2 * D), nn.GELU(), nn.Linear(2 * D, D))
    return net.requires_grad_(False)


def make_vt(B: int = 3, seed: int = 0, dv: int = DV, project: nn.Module | None = None,
            spikes=(2, 6, 4)) -> VisualTokens:
    """Vision features, their projection, CLS attention with a different number of spikes per
    image, text similarity with its own peaks (width P)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, N, dv, generator=torch.Generator().manual_seed(seed + 1000))   # widths vary, the rest not
    project = project if project is not None else projector(seed)
    keys = torch.randn(B, N, 5, generator=g)
    logits = torch.randn(B, N, generator=g) * 0.3
    text = torch.rand(B, N, generator=g) * 0.2
    for b in range(B):
        logits[b, torch.randperm(N, generator=g)[: spikes[b % len(spikes)]]] += 4.0 + torch.rand(1, generator=g)
        text[b, torch.randperm(N, generator=g)[:3]] += 0.7
    attn = torch.softmax(logits, 1)
    with torch.no_grad():
        tokens = project(hidden)
    return VisualTokens(tokens, keys, attn, torch.softmax(logits.flip(1), 1), text, (H, W),
                        hidden=hidden, project=project, text_dim=P)


def rows(c: Compressed, b: int) -> tuple[torch.Tensor, ...]:
    m = c.mask[b]
    return c.tokens[b][m], c.source[b][m], c.kind[b][m], c.position[b][m]


def same_rows(a: Compressed, i: int, b: Compressed, j: int) -> bool:
    return all(torch.allclose(x, y, rtol=1e-5, atol=1e-6) if x.is_floating_point() else torch.equal(x, y)
               for x, y in zip(rows(a, i), rows(b, j)))


def weighted_mean(x: torch.Tensor, w: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """Attention-weighted mean of the member rows: x [N, C], w [N], members [N] bool -> [C]."""
    w = torch.where(members, w, 0.0)
    return (w[:, None] * x).sum(0) / w.sum()


# --- the switches and the preset ----------------------------------------------------------

def test_defaults_are_ours_and_the_preset_sets_all_five_switches_to_the_official_code():
    ours = RecoverableParams()
    assert (ours.merge_space, ours.global_without_centres, ours.min_salient, ours.text_pooling,
            ours.text_weight) == ("projected", True, 1, "eos", 1.804)
    official = METHOD_PARAMS["recoverable_official"]()
    assert {k: getattr(official, k) for k in OFFICIAL} == OFFICIAL
    assert official.merge_mode == "residual"                  # the official x_c + sum a_j x_j
    spec = method_spec("recoverable_official")
    assert spec.base == "recoverable" and spec.adaptive and spec.text_guided
    # everything else is recoverable's: the preset changes the switches (and merge_mode) only
    changed = {f.name for f in dataclasses.fields(official) if getattr(official, f.name) != getattr(ours, f.name)}
    assert changed == set(OFFICIAL) | {"merge_mode"}


@pytest.mark.parametrize("budget", [None, 0.1, 0.25, 13])
def test_switches_at_their_defaults_change_nothing(budget):
    vt = make_vt()
    plain = compress(dataclasses.replace(vt, hidden=None, project=None, text_dim=None), "recoverable", budget=budget)
    explicit = compress(vt, "recoverable", budget=budget, merge_space="projected", global_without_centres=True,
                        min_salient=1, text_pooling="eos", text_weight=1.804)
    assert all(same_rows(plain, b, explicit, b) for b in range(vt.batch_size))


def test_bad_switch_values_name_their_field():
    for field, value in (("merge_space", "lm"), ("text_pooling", "mean")):
        with pytest.raises(ValueError, match=rf"^tokens\.recoverable\.{field}: expected "):
            RecoverableParams(**{field: value})
    with pytest.raises(ValueError, match=r"^tokens\.recoverable_official\.text_pooling: "):
        METHOD_PARAMS["recoverable_official"](text_pooling="mean")


# 1. merge_space -------------------------------------------------------------------------

@pytest.mark.parametrize("budget", [None, 0.25])
def test_merging_in_vision_space_projects_the_vision_space_average(budget):
    """Each centre absorbs every leftover (merge_neighbors >= N), so every merged token is the
    attention-weighted mean of the leftovers, the global token that of the non-centres: in
    vision space projected afterwards, in projected space a mean of projected tokens."""
    proj = projector(1)
    vt = make_vt(project=proj)
    kw = dict(budget=budget, merge_neighbors=N, text_weight=0.0, merge_mode="average")
    vis = compress(vt, "recoverable", merge_space="vision", **kw)
    lm = compress(vt, "recoverable", merge_space="projected", **kw)
    merged_somewhere = False
    for b in range(vt.batch_size):
        tv, sv, kv, pv = rows(vis, b)
        tl, sl, kl, pl = rows(lm, b)
        assert torch.equal(sv, sl) and torch.equal(kv, kl) and torch.equal(pv, pl)   # same selection
        kept = (kv == KIND_SALIENT) | (kv == KIND_RECOVERED)
        torch.testing.assert_close(tv[kept], tl[kept])                             # kept tokens as they were
        leftover = torch.ones(N, dtype=torch.bool)
        leftover[sv[kept]] = False
        centres = torch.zeros(N, dtype=torch.bool)
        centres[pv[kv == KIND_MERGED]] = True
        a = vt.cls_attn[b]
        for kind, members in ((KIND_MERGED, leftover), (KIND_GLOBAL, leftover & ~centres)):
            if not (kv == kind).any():
                continue
            merged_somewhere = True
            by_hand = proj(weighted_mean(vt.hidden[b], a, members))
            torch.testing.assert_close(tv[kv == kind], by_hand.expand(int((kv == kind).sum()), D))
            torch.testing.assert_close(tl[kv == kind],
                                       weighted_mean(vt.tokens[b], a, members).expand(int((kv == kind).sum()), D))
            assert not torch.allclose(tv[kv == kind], tl[kv == kind], atol=1e-4)   # GELU: the order matters
    assert merged_somewhere


def test_with_an_affine_projector_both_merge_spaces_agree():
    """A weighted mean commutes with an affine map, so only a nonlinear projector tells them apart."""
    vt = make_vt(project=projector(2, affine=True))
    for budget in (None, 0.25):
        vis = compress(vt, "recoverable", budget=budget, merge_space="vision")
        lm = compress(vt, "recoverable", budget=budget)
        assert all(same_rows(vis, b, lm, b) for b in range(vt.batch_size))


def test_vision_merge_without_vision_features_is_refused():
    vt = dataclasses.replace(make_vt(), hidden=None)
    with pytest.raises(ValueError, match=r"^recoverable: merge_space='vision' needs VisualTokens\.hidden"):
        compress(vt, "recoverable", budget=0.25, merge_space="vision")


# 2. global_without_centres ----------------------------------------------------------------

def test_the_global_token_without_centres_is_dropped_only_by_the_official_switch():
    vt = make_vt()
    # Fixed budget 4: 2 salient, 1 recovered, 1 left, which is the global token (no centres).
    ours = compress(vt, "recoverable", budget=4)
    assert ours.count_kind(KIND_GLOBAL).tolist() == [1, 1, 1] and ours.count_kind(KIND_MERGED).sum() == 0
    official = compress(vt, "recoverable", budget=4, global_without_centres=False)
    assert official.count_kind(KIND_GLOBAL).sum() == 0 and official.counts().tolist() == [4, 4, 4]
    assert official.count_kind(KIND_RECOVERED).tolist() == [2, 2, 2]            # the slot goes to a kept token
    # With centres the global token stays.
    with_centres = compress(vt, "recoverable", budget=8, global_without_centres=False)
    assert with_centres.count_kind(KIND_GLOBAL).tolist() == [1] * 3
    # Adaptive: image by image, in one batch.
    no_ctr = compress(vt, "recoverable", budget=None, merge=False, global_without_centres=False)
    assert no_ctr.count_kind(KIND_GLOBAL).sum() == 0
    assert compress(vt, "recoverable", budget=None, merge=False).count_kind(KIND_GLOBAL).tolist() == [1, 1, 1]


def test_the_global_token_is_dropped_per_image_in_a_batch():
    """Image 0 has merge centres, image 1 none (its leftover attention is flat)."""
    vt = make_vt(B=2)
    flat = torch.full((N,), 1.0)
    flat[[3, 17, 40]] = 30.0                                     # three salient spikes, the rest equal
    attn = vt.cls_attn.clone()
    attn[1] = flat / flat.sum()
    vt = dataclasses.replace(vt, cls_attn=attn)
    kw = dict(budget=None, salient_rule="iqr", recover=False)
    ours = compress(vt, "recoverable", **kw)
    assert ours.count_kind(KIND_MERGED).tolist()[1] == 0 and ours.count_kind(KIND_MERGED).tolist()[0] > 0
    assert ours.count_kind(KIND_GLOBAL).tolist() == [1, 1]
    official = compress(vt, "recoverable", global_without_centres=False, **kw)
    assert official.count_kind(KIND_GLOBAL).tolist() == [1, 0]
    assert same_rows(official, 0, ours, 0)


# 3. min_salient -----------------------------------------------------------------------------

@pytest.mark.parametrize("rule", ["lof", "iqr"])
def test_min_salient_zero_can_keep_no_salient_token(rule):
    vt = make_vt(B=2)
    vt = dataclasses.replace(vt, cls_attn=torch.full((2, N), 1.0 / N))   # no attention outlier at all
    kw = dict(budget=None, salient_rule=rule)
    assert compress(vt, "recoverable", **kw).count_kind(KIND_SALIENT).tolist() == [1, 1]       # ours: at least one
    assert compress(vt, "recoverable", min_salient=0, **kw).count_kind(KIND_SALIENT).tolist() == [0, 0]


# 4. text_pooling ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lvlm(tmp_path_factory) -> LVLM:
    d = save_tiny_lvlm(tmp_path_factory.mktemp("faithful") / "lvlm")
    return load_lvlm(str(d / "llava"), str(d / "clip")).eval()


QUESTIONS = ["what color is the circle ?", "how many red square are there ?"]


@torch.no_grad()
def test_last_pooling_reads_the_last_padded_position(lvlm):
    """By hand: the question's CLIP ids padded on the right to the context length, the text
    tower run without attention mask, its output at the last position, the text projection."""
    tok, clip = lvlm.clip_tokenizer, lvlm.clip
    ctx = clip.config.text_config.max_position_embeddings
    by_hand = []
    for q in QUESTIONS:
        ids = tok(q)["input_ids"]
        assert ids[-1] == tok.eos_token_id and len(ids) < ctx
        padded = torch.tensor([ids + [tok.pad_token_id] * (ctx - len(ids))])
        h = clip.text_model(input_ids=padded).last_hidden_state[0, -1]
        by_hand.append(F.normalize(clip.text_projection(h), dim=-1))
    last = lvlm.text_embeddings(QUESTIONS, pooling="last")
    torch.testing.assert_close(last, torch.stack(by_hand))
    eos = lvlm.text_embeddings(QUESTIONS)
    assert not torch.allclose(last, eos, atol=1e-3)                       # a different vector than EOS pooling
    torch.testing.assert_close(lvlm.text_embeddings(QUESTIONS, pooling="eos"), eos)
    with pytest.raises(ValueError, match="text pooling"):
        lvlm.text_embeddings(QUESTIONS, pooling="mean")


@torch.no_grad()
def test_the_token_compressor_feeds_every_switch_from_the_lvlm(lvlm):
    """recoverable_official through TokenCompressor: the question pooled at the last position,
    text_dim = CLIP's joint width, the vision features and the model's projector."""
    g = torch.Generator().manual_seed(0)
    feats = lvlm.visual_features(torch.rand(2, 3, 56, 56, generator=g))
    cache = TextEmbeddingCache(lvlm)
    comp = TokenCompressor(lvlm, "recoverable_official", budget=None, attention="full", text_encoder=cache)
    vt = comp.visual_tokens(feats, QUESTIONS)
    width = lvlm.clip.config.projection_dim
    assert vt.text_dim == width and vt.hidden is feats.hidden and vt.project is lvlm.projector
    torch.testing.assert_close(vt.project(vt.hidden), feats.tokens)      # hidden is what the projector maps
    text = lvlm.text_embeddings(QUESTIONS, pooling="last")
    torch.testing.assert_close(vt.text_sim, torch.einsum("bnp,bp->bn", lvlm.patch_embeddings(feats), text))
    assert set(cache.memo) == {("last", q) for q in QUESTIONS}
    # The default method reads EOS pooling and no vision features.
    plain = TokenCompressor(lvlm, "recoverable", budget=0.25, text_encoder=cache).visual_tokens(feats, QUESTIONS)
    assert plain.hidden is None and plain.project is None
    assert {("eos", q) for q in QUESTIONS} <= set(cache.memo)
    # And the whole LVLM generates with it.
    answers = lvlm.generate(torch.rand(2, 3, 56, 56, generator=g), QUESTIONS, transform=comp, max_new_tokens=2)
    assert len(answers) == 2 and comp.last is not None


# 5. text_weight -----------------------------------------------------------------------------

def test_text_weight_none_is_50_over_sqrt_p():
    assert official_text_weight(768) == pytest.approx(1.804, abs=5e-4)     # our fixed default, right for CLIP-L
    assert official_text_weight(1024) == pytest.approx(50 / 32)
    vt = make_vt()
    for width in (16, 768, 1024):
        v = dataclasses.replace(vt, text_dim=width)
        for budget in (None, 0.25):
            derived = compress(v, "recoverable", budget=budget, text_weight=None)
            fixed = compress(v, "recoverable", budget=budget, text_weight=50 / math.sqrt(width))
            assert all(same_rows(derived, b, fixed, b) for b in range(vt.batch_size))
    with pytest.raises(ValueError, match=r"text_weight=None derives 50/sqrt\(P\) from VisualTokens\.text_dim"):
        compress(dataclasses.replace(vt, text_dim=None), "recoverable", budget=0.25, text_weight=None)


def test_text_weight_changes_what_a_centre_absorbs():
    vt = make_vt()
    kw = dict(budget=0.25, merge_neighbors=4)
    a = compress(dataclasses.replace(vt, text_dim=16), "recoverable", text_weight=None, **kw)
    b = compress(dataclasses.replace(vt, text_dim=10 ** 6), "recoverable", text_weight=None, **kw)
    assert not torch.allclose(a.tokens, b.tokens)


# --- the official code's bugs, absent from ours ----------------------------------------------

@pytest.mark.parametrize("merge_space", ["projected", "vision"])
def test_centre_count_follows_n_not_the_feature_width(merge_space):
    """The official code counts centres as floor(C · outlier fraction) with C the vision width;
    ours uses N: inputs with the same N, attention and text but other widths keep the same counts."""
    narrow, wide = make_vt(dv=4, project=nn.Linear(4, 3)), make_vt(dv=1024, project=nn.Linear(1024, 4096))
    assert torch.equal(narrow.cls_attn, wide.cls_attn) and torch.equal(narrow.text_sim, wide.text_sim)
    for params in ({}, {"centre_count_base": "leftover"}, {**OFFICIAL, "text_weight": 0.0}):
        params = {**params, "merge_space": merge_space}
        a = compress(narrow, "recoverable", budget=None, **params)
        b = compress(wide, "recoverable", budget=None, **params)
        for kind in (KIND_SALIENT, KIND_RECOVERED, KIND_MERGED, KIND_GLOBAL):
            assert torch.equal(a.count_kind(kind), b.count_kind(kind))
        assert a.count_kind(KIND_MERGED).sum() > 0


def test_merge_keys_are_aligned_with_the_leftover_tokens():
    """Patch 0 is salient, patch 1 the one centre; it absorbs one token, the leftover whose key
    is most like its own. Aligned keys: patch 5 (key e1, as the centre's). The official code
    gathers keys of all N patches at the leftover tokens' ranks (rank r = patch r + 1 here), so
    the centre would read patch 0's key (e2) and patch 4 would carry patch 3's key (e2): it
    would absorb patch 4."""
    n, eye = 8, torch.eye(8)
    tokens = eye[None]                                          # token i = e_i: a merge shows its members
    keys = eye[[2, 1, 3, 2, 4, 1, 5, 6]][None]                  # key of patch p
    attn = torch.tensor([[0.5, 0.3, 0.03, 0.03, 0.03, 0.03, 0.03, 0.05]])
    vt = VisualTokens(tokens, keys, attn, None, torch.zeros(1, n), (2, 4))
    out = compress(vt, "recoverable", budget=3, salient_share=0.34, recover=False, merge_neighbors=1,
                   text_weight=0.0)
    t, src, kind, pos = rows(out, 0)
    assert src[kind == KIND_SALIENT].tolist() == [0] and pos[kind == KIND_MERGED].tolist() == [1]
    merged = t[kind == KIND_MERGED][0]
    assert torch.nonzero(merged).flatten().tolist() == [1, 5]
    # What the official gather would pick: keys at ranks of the leftover list [1..7].
    leftover = torch.arange(1, n)
    misaligned = F.normalize(keys[0, : len(leftover)], dim=-1)     # Key_wo_cls gathered at ranks
    centre_rank = 0
    sims = misaligned[1:] @ misaligned[centre_rank]
    assert leftover[1:][sims.argmax()].item() == 4                 # a different token than ours


@pytest.mark.parametrize("official", [False, True])
@pytest.mark.parametrize("budget", [None, 0.1, 0.25, 13])
def test_a_batch_equals_its_images_one_by_one(official, budget):
    """The official code fits one LOF over the whole batch and masks image 0's salient tokens
    in every image (a batch of several images fails); ours treats each image on its own."""
    vt = make_vt(B=3, seed=4)
    params = dict(OFFICIAL, merge_mode="residual") if official else {}
    batch = compress(vt, "recoverable", budget=budget, attention="full", **params)
    for b in range(vt.batch_size):
        one = compress(vt.select([b]), "recoverable", budget=budget, attention="full", **params)
        assert same_rows(batch, b, one, 0)
    assert len(set(batch.counts().tolist())) > 1 or budget is not None     # different counts per image


# --- attach on stock models ---------------------------------------------------------------

def _llava_images(model, inputs, h):
    """The handle's per-image records of one call, from pixel_values."""
    return h.family.images({"pixel_values": inputs["pixel_values"], **({"image_sizes": inputs["image_sizes"]}
                                                                        if "image_sizes" in inputs else {})})


@torch.no_grad()
def test_attach_llava_merges_the_projector_input_and_projects_it():
    from test_tokens_attach import N as LLAVA_N
    from test_tokens_attach import QS, TOK, gen, prompts, tiny_llava
    model = tiny_llava()
    inputs = prompts(QS)
    with attach(model, "recoverable", 0.5, tokenizer=TOK, merge_space="vision") as h:
        images = _llava_images(model, inputs, h)
        tower = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True)
        for i, im in enumerate(images):
            assert im.vt.project is model.model.multi_modal_projector
            torch.testing.assert_close(im.vt.hidden[0], tower.hidden_states[-2][i, 1:])
            torch.testing.assert_close(im.vt.project(im.vt.hidden), im.vt.tokens)
        ids, _ = gen(model, inputs)
        vis = h.last
    with attach(model, "recoverable", 0.5, tokenizer=TOK) as h:
        gen(model, inputs)
        lm = h.last
    assert torch.equal(vis.kind, lm.kind) and torch.equal(vis.source, lm.source) and vis.counts().tolist() == [8, 8]
    kept = (vis.kind == KIND_SALIENT) | (vis.kind == KIND_RECOVERED)
    torch.testing.assert_close(vis.tokens[kept], lm.tokens[kept])
    assert not torch.allclose(vis.tokens[vis.kind == KIND_MERGED], lm.tokens[vis.kind == KIND_MERGED])
    assert LLAVA_N == 16 and ids.shape[0] == 2


@torch.no_grad()
def test_attach_llava_next_gives_each_packed_token_its_own_vision_feature():
    from test_tokens_attach_archs import QS, TOK, next_inputs, tiny_next
    model = tiny_next()
    inputs = next_inputs(model, QS, [0, 1])
    with attach(model, "recoverable", 0.3, tokenizer=TOK, merge_space="vision") as h:
        for im in _llava_images(model, inputs, h):
            torch.testing.assert_close(im.vt.project(im.vt.hidden), im.vt.tokens)   # aligned with the packing
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        assert h.last.count_kind(KIND_MERGED).sum() > 0


@torch.no_grad()
def test_attach_text_weight_none_uses_the_lm_embedding_width():
    from test_tokens_attach import QS, TOK, gen, prompts, tiny_llava
    model = tiny_llava()
    inputs = prompts(QS)
    width = model.get_input_embeddings().weight.shape[1]
    with attach(model, "recoverable", 0.5, tokenizer=TOK, text_weight=None) as h:
        gen(model, inputs)
        derived = h.last
    with attach(model, "recoverable", 0.5, tokenizer=TOK, text_weight=50 / math.sqrt(width)) as h:
        gen(model, inputs)
        fixed = h.last
    assert all(same_rows(derived, b, fixed, b) for b in range(2))


def test_attach_refuses_switches_that_cannot_apply_in_one_line():
    from test_tokens_attach import TOK, tiny_llava
    from test_tokens_attach_archs import TOK as QTOK
    from test_tokens_attach_archs import tiny_qwen
    llava, qwen = tiny_llava(), tiny_qwen()
    cases = [(llava, TOK, "recoverable_official", {}, r"text_pooling='last' of recoverable_official .*"
                                                      r"LlavaForConditionalGeneration embeds the question"),
             (llava, TOK, "recoverable", {"text_pooling": "last"}, r"text_pooling='last' of recoverable "),
             (qwen, QTOK, "recoverable", {"merge_space": "vision"},
              r"merge_space='vision' of recoverable cannot apply to Qwen2VLForConditionalGeneration")]
    for model, tok, method, params, match in cases:
        with pytest.raises(ValueError, match=r"^attach: " + match) as exc:
            attach(model, method, None, tokenizer=tok, **params)
        assert "\n" not in str(exc.value)
    assert not llava.model._forward_pre_hooks and not qwen.model._forward_pre_hooks   # nothing left attached
    # The official preset with the one switch attach cannot honour set back runs.
    with attach(llava, "recoverable_official", None, tokenizer=TOK, text_pooling="eos"):
        pass
