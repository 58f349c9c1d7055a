"""A token method registered outside the package is usable everywhere a built-in is: through
``compress``, ``attach`` on a stock model, params.yaml and ``make_transform``; presets."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
import yaml

from test_tokens_attach import IMAGE_ID, QS, TOK, N, prompts, tiny_llava
from test_tokens_methods import make_vt
from vlmcompress.config import ConfigError, load_params
from vlmcompress.paths import project_root
from vlmcompress.tokens import (
    ADAPTIVE, METHOD_PARAMS, METHODS, TEXT_GUIDED, TokensParams, attach, compress, make_transform, method_names,
    method_spec, register_method, register_preset, temporary_methods, unregister_method,
)
from vlmcompress.tokens.sweep import Run, plan_runs
from vlmcompress.tokens.thresholds import topk_mask
from vlmcompress.tokens.types import KIND_SALIENT, Compressed, VisualTokens, pack, resolve_budget


@dataclass(frozen=True)
class WindowParams:
    """``window``: k consecutive patches from ``start`` on (wrapping); adaptive: a quarter of N."""

    start: int = 0

    def __post_init__(self) -> None:
        if self.start < 0:
            raise ValueError(f"start: must be >= 0, got {self.start}")


def window(vt: VisualTokens, *, budget=None, attention="head_mean", generator=None, **params) -> Compressed:
    k = vt.n_tokens // 4 if budget is None else resolve_budget(vt.n_tokens, budget)
    after_start = (torch.arange(vt.n_tokens) - params["start"]) % vt.n_tokens     # 0 at start
    keep = topk_mask(-after_start.float().expand(vt.batch_size, -1), k)
    return pack(vt.tokens, torch.where(keep, KIND_SALIENT, 0).to(torch.int8))


@dataclass(frozen=True)
class TextTopParams:
    """``text_top``: the k patches most similar to the question."""


def text_top(vt: VisualTokens, *, budget=None, attention="head_mean", generator=None, **params) -> Compressed:
    keep = topk_mask(vt.text_sim, resolve_budget(vt.n_tokens, budget))
    return pack(vt.tokens, torch.where(keep, KIND_SALIENT, 0).to(torch.int8))


@pytest.fixture
def user_methods():
    """``window`` (adaptive) and ``text_top`` (text-guided), registered for one test only."""
    with temporary_methods():
        register_method("window", params=WindowParams, adaptive=True)(window)
        register_method("text_top", params=TextTopParams, text_guided=True)(text_top)
        yield
    assert "window" not in METHOD_PARAMS and "text_top" not in METHODS


def _sources(c: Compressed) -> list[list[int]]:
    return [row[m].tolist() for row, m in zip(c.source, c.mask)]


def test_a_registered_method_runs_through_compress_with_its_traits(user_methods):
    vt = make_vt()                                              # 3 images of 8 x 8 patches
    assert _sources(compress(vt, "window", budget=4, start=2)) == [[2, 3, 4, 5]] * 3
    assert _sources(compress(vt, "window", budget=3)) == [[0, 1, 2]] * 3        # defaults filled in
    assert compress(vt, "window", budget=None).counts().tolist() == [16] * 3
    assert "window" in method_names() and "window" in ADAPTIVE and "window" not in TEXT_GUIDED
    assert "text_top" in TEXT_GUIDED and "text_top" not in ADAPTIVE
    assert list(METHOD_PARAMS)[-2:] == ["window", "text_top"] and METHOD_PARAMS["window"] is WindowParams
    with pytest.raises(ValueError, match=r"window: bad parameter .*known parameters: start"):
        compress(vt, "window", budget=4, stop=3)
    with pytest.raises(ValueError, match="start: must be >= 0"):
        compress(vt, "window", budget=4, start=-1)


def test_registration_is_checked_and_undone():
    with temporary_methods():
        register_method("window", params=WindowParams)(window)
        with pytest.raises(ValueError, match="'window' registered twice"):
            register_method("window", params=WindowParams)(window)
        with pytest.raises(ValueError, match="key or attribute of the tokens section itself"):
            register_method("eval", params=WindowParams)(window)
        with pytest.raises(ValueError, match="identifier"):
            register_method("my-method", params=WindowParams)(window)
        with pytest.raises(TypeError, match="params must be a dataclass"):
            register_method("window2", params=dict)(window)
        unregister_method("window")
        assert "window" not in METHOD_PARAMS
        register_method("window", params=WindowParams)(window)
    assert "window" not in METHOD_PARAMS and "window" not in TokensParams().methods
    with pytest.raises(ValueError, match="unknown token method 'window'"):
        compress(make_vt(), "window", budget=4)


def test_attach_runs_a_registered_method_on_a_stock_llava(user_methods):
    model = tiny_llava()
    inputs = prompts(QS[:1])
    ref = model(**inputs).logits
    with attach(model, "window", 0.25, start=5) as h:
        logits = model(**inputs).logits
        assert h.stats["tokens"] == [N // 4]
        assert _sources(h.last) == [[5, 6, 7, 8]]
    assert logits.shape[1] == ref.shape[1] - (N - N // 4)
    torch.testing.assert_close(model(**inputs).logits, ref)     # detached: the stock model again
    with pytest.raises(ValueError, match="text_top reads the question; pass tokenizer="):
        attach(model, "text_top", 0.25)                         # the text-guided trait, not a list of names
    with attach(model, "text_top", 0.25, tokenizer=TOK) as h:
        model(**inputs)
        assert h.stats["tokens"] == [N // 4] and h.last_question_ids
    assert IMAGE_ID not in h.last_question_ids[0]


def _params_file(tmp_path, tokens: dict) -> str:
    raw = yaml.safe_load((project_root() / "params.yaml").read_text())
    raw["tokens"].update(tokens)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_params_yaml_names_a_registered_method_and_validates_its_section(user_methods, tmp_path):
    methods = yaml.safe_load((project_root() / "params.yaml").read_text())["tokens"]["methods"]
    p = load_params(_params_file(tmp_path, {"methods": [*methods, "window"], "window": {"start": 3}}))
    assert p.tokens.window == WindowParams(start=3) and p.tokens.method_params("window") == {"start": 3}
    assert p.tokens.text_top == TextTopParams()                 # a section not given: its defaults
    runs = plan_runs(p.tokens)
    assert Run("window", None) in runs and Run("window", 0.10) in runs        # adaptive: its own run
    assert load_params(_params_file(tmp_path, {"methods": ["full", "window", "recoverable"]})).tokens.window.start == 0

    for section, match in [({"start": "x"}, r"^tokens\.window\.start: expected int, got 'x'$"),
                           ({"start": -1}, r"^tokens\.window\.start: must be >= 0, got -1$"),
                           ({"stop": 1}, r"^tokens\.window\.stop: unknown key \(known: start\)$")]:
        with pytest.raises(ConfigError, match=match) as exc:
            load_params(_params_file(tmp_path, {"methods": [*methods, "window"], "window": section}))
        assert "\n" not in str(exc.value)


def test_params_yaml_refuses_a_method_nobody_registered(tmp_path):
    with pytest.raises(ConfigError, match=r"^tokens\.methods\[1\]: unknown method 'window'"):
        load_params(_params_file(tmp_path, {"methods": ["full", "window", "recoverable"]}))
    known = r"\(known: .*recoverable_official, divprune, cdpruner, fastv\)$"
    with pytest.raises(ConfigError, match=r"^tokens\.window: unknown key " + known):
        load_params(_params_file(tmp_path, {"window": {"start": 3}}))


def _features(B: int = 2, n: int = 16, d: int = 8) -> SimpleNamespace:
    g = torch.Generator().manual_seed(0)
    return SimpleNamespace(tokens=torch.randn(B, n, d, generator=g), keys=torch.randn(B, n, 4, generator=g),
                           cls_attn=torch.softmax(torch.randn(B, n, generator=g), 1), cls_attn_full=None, grid=(4, 4))


class _TextLVLM:
    """Just what a text-guided transform asks of an LVLM: question and patch embeddings."""

    def text_embeddings(self, texts):
        return torch.eye(3)[[len(t) % 3 for t in texts]]                      # [B, 3]

    def patch_embeddings(self, feats):
        return torch.eye(3)[torch.arange(feats.tokens.shape[1]) % 3].expand(feats.tokens.shape[0], -1, -1)


def test_make_transform_builds_a_registered_method_from_the_params(user_methods):
    P = TokensParams(methods=["full", "window", "text_top"], window=WindowParams(start=6))
    tr = make_transform(None, "window", 0.25, P)
    tokens, mask = tr(_features(), ["q", "q"])
    assert tokens.shape == (2, 4, 8) and mask.all() and not tr.uses_text
    assert _sources(tr.last) == [[6, 7, 8, 9]] * 2

    tr = make_transform(_TextLVLM(), "text_top", 0.25, P)
    tr(_features(), ["abc", "a"])                              # questions embed as one-hot 0 and 1
    assert tr.uses_text
    assert _sources(tr.last) == [[0, 3, 6, 9], [1, 4, 7, 10]]  # the patches whose embedding matches


# Every default of the hand-written RecoverableSpreadParams the preset replaced.
OLD_SPREAD_DEFAULTS = dict(
    salient_rule="lof", recovery_rule="lof", centre_rule="lof", salient_neighbors=20, recovery_neighbors=20,
    centre_neighbors=10, lof_threshold=1.5, whisker=1.5, centre_count_base="all", min_salient=1, recover=True,
    merge=False, global_token=False, merge_neighbors=32, text_weight=1.804, merge_mode="average",
    salient_share=0.75, recovered_share=0.25, salient_source="spread", recovery_peaks=True, peak_window=3)


def _same(a: Compressed, b: Compressed) -> bool:
    return all((x is None and y is None) or torch.equal(x, y)
               for x, y in zip(dataclasses.astuple(a), dataclasses.astuple(b)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_recoverable_spread_preset_equals_its_former_defaults(seed):
    spread = METHOD_PARAMS["recoverable_spread"]
    assert dataclasses.asdict(spread()) == {**OLD_SPREAD_DEFAULTS, "peak_floor": 0.7, "merge_space": "projected",
                                            "global_without_centres": True, "text_pooling": "eos"}
    spec = method_spec("recoverable_spread")
    assert spec.base == "recoverable" and spec.adaptive and spec.text_guided
    vt = make_vt(seed=seed)
    for budget in (None, 0.05, 0.10, 0.25, 0.5, 13):
        got = compress(vt, "recoverable_spread", budget=budget, attention="full")
        assert _same(got, compress(vt, "recoverable", budget=budget, attention="full", **OLD_SPREAD_DEFAULTS,
                                   peak_floor=0.7))
        assert _same(got, METHODS["recoverable_spread"](vt, budget=budget, attention="full"))   # called directly
        override = compress(vt, "recoverable_spread", budget=budget, recovery_peaks=False)
        assert _same(override, compress(vt, "recoverable", budget=budget,
                                        **{**OLD_SPREAD_DEFAULTS, "recovery_peaks": False}))


def test_a_user_preset_of_a_user_method(user_methods):
    cls = register_preset("window_mid", base="window", start=8, doc="``window_mid``: the window from the middle.")
    assert cls.__doc__.startswith("``window_mid``") and issubclass(cls, WindowParams)
    assert "window_mid" in ADAPTIVE and METHOD_PARAMS["window_mid"] is cls
    vt = make_vt()
    assert _sources(compress(vt, "window_mid", budget=3)) == [[8, 9, 10]] * 3
    assert _sources(compress(vt, "window_mid", budget=3, start=1)) == [[1, 2, 3]] * 3
    assert TokensParams(window_mid={"start": 9}).method_params("window_mid") == {"start": 9}
    with pytest.raises(ValueError, match="has presets window_mid"):
        unregister_method("window")
    with pytest.raises(ValueError, match="has no field 'stop'"):
        register_preset("window_bad", base="window", stop=1)
    with pytest.raises(ValueError, match="start: must be >= 0"):
        register_preset("window_neg", base="window", start=-1)
    assert "window_bad" not in METHOD_PARAMS and "window_neg" not in METHOD_PARAMS


def test_the_tokens_stage_sweeps_a_registered_method(user_methods, project_root, params, tiny_scenes):
    from test_tokens_stage import _tiny_project, paired_names, planned_runs
    from vlmcompress.data.dataset import load_all
    from vlmcompress.tokens.stage import run_tokens_stage

    P = _tiny_project(project_root, params, tiny_scenes, methods=["full", "window", "recoverable"], budgets=[0.10],
                      eval={"example_methods": ["full", "window"]})
    run_tokens_stage(P, load_all(), log=lambda line: None)
    out = project_root / "outputs" / "tokens"
    window = planned_runs(out)["window"]
    assert set(window) == {"0.10", "adaptive"}                                   # its adaptive trait
    assert float(window["0.10"]["tokens"]) == 2                                  # 10 % of 16 patches
    assert float(window["adaptive"]["tokens"]) == 4                              # a quarter of N
    assert "recoverable - window" in paired_names(out)                           # text-guided vs the rest
