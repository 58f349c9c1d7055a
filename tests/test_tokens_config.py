"""The tokens params schema: defaults, strict loading, validation messages."""
import pytest
import torch

from vlmcompress.config import ConfigError, from_dict
from vlmcompress.tokens import VisualTokens, compress
from vlmcompress.tokens.config import METHOD_PARAMS, RecoverableParams, TokensParams


def test_defaults_load_from_an_empty_section():
    p = from_dict(TokensParams, {}, "tokens")
    assert p.methods == list(METHOD_PARAMS)
    assert p.budgets == [0.05, 0.10, 0.25, 0.50]
    assert p.attention == "head_mean" and p.attention_layer == -1
    assert p.recoverable == RecoverableParams() and p.fastv.layer == 2 and "fastv" in p.methods


def test_budgets_keep_int_counts_and_float_fractions():
    p = from_dict(TokensParams, {"budgets": [0.1, 64], "methods": ["recoverable", "visionzip"]}, "tokens")
    assert p.budgets == [0.1, 64]
    assert isinstance(p.budgets[0], float) and isinstance(p.budgets[1], int)


@pytest.mark.parametrize("section,match", [
    ({"methods": ["fastv2"]}, r"tokens\.methods\[0\]: unknown method 'fastv2'"),
    ({"fastv": {"layer": 0}}, r"tokens\.fastv\.layer: must be >= 1"),
    ({"eval": {"batch_images": 0}}, r"tokens\.eval\.batch_images: must be >= 1"),
    ({"eval": {"task_budget": 1.5}}, r"tokens\.eval\.task_budget: a fraction must be in"),
    ({"eval": {"example_methods": ["full", "nope"]}}, r"tokens\.eval\.example_methods\[1\]: unknown method"),
    ({"budgets": [0.1, 1.5]}, r"tokens\.budgets\[1\]: a fraction must be in \(0, 1\]"),
    ({"budgets": [0]}, r"tokens\.budgets\[0\]: a token count must be >= 1"),
    ({"attention": "max"}, r"tokens\.attention: expected 'head_mean' \| 'full'"),
    ({"recoverable": {"salient_share": 0.8, "recovered_share": 0.4}}, r"tokens\.recoverable\.recovered_share"),
    ({"recoverable": {"centre_neighbors": 0}}, r"tokens\.recoverable\.centre_neighbors: must be >= 1"),
    ({"recoverable": {"unknown": 1}}, r"tokens\.recoverable\.unknown: unknown key"),
    ({"recoverable_spread": {"peak_window": 4}}, r"tokens\.recoverable_spread\.peak_window: must be odd and >= 3"),
    ({"recoverable_spread": {"peak_floor": 1.0}}, r"tokens\.recoverable_spread\.peak_floor: must be in \[0, 1\)"),
    ({"prumerge_plus": {"attn_share": 2.0}}, r"tokens\.prumerge_plus\.attn_share"),
    ({"visionzip": {"contextual_share": -0.1}}, r"tokens\.visionzip\.contextual_share"),
])
def test_bad_values_name_the_key(section, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(TokensParams, section, "tokens")


def test_method_params_feed_the_methods():
    p = from_dict(TokensParams, {"recoverable": {"salient_share": 0.6, "recovered_share": 0.2}}, "tokens")
    kw = p.method_params("recoverable")
    assert kw["salient_share"] == 0.6 and kw["merge_mode"] == "average"
    g = torch.Generator().manual_seed(0)
    vt = VisualTokens(torch.randn(1, 16, 4, generator=g), torch.randn(1, 16, 3, generator=g),
                      torch.softmax(torch.randn(1, 16, generator=g), 1), None,
                      torch.rand(1, 16, generator=g), (4, 4))
    c = compress(vt, "recoverable", budget=10, attention=p.attention, **kw)
    assert (c.kind == 1).sum() == 6 and (c.kind == 2).sum() == 2
    for name in METHOD_PARAMS:
        assert isinstance(p.method_params(name), dict)
    assert p.method_params("fastv") == {"layer": 2}
    with pytest.raises(KeyError, match="unknown method"):
        p.method_params("fastv2")


def test_a_bad_recoverable_spread_share_names_its_own_section():
    spread = METHOD_PARAMS["recoverable_spread"]      # the preset's class: recoverable's fields and checks
    assert issubclass(spread, RecoverableParams) and spread.__name__ == "RecoverableSpreadParams"
    with pytest.raises(ConfigError, match=r"tokens\.recoverable_spread\.recovered_share"):
        spread(salient_share=0.75, recovered_share=0.5)
    with pytest.raises(ConfigError, match=r"tokens\.recoverable\.recovered_share"):
        RecoverableParams(salient_share=0.75, recovered_share=0.5)


def test_the_former_preset_class_name_still_imports():
    from vlmcompress.tokens.config import RecoverableSpreadParams

    assert RecoverableSpreadParams is METHOD_PARAMS["recoverable_spread"]
    assert RecoverableSpreadParams().salient_source == "spread" and RecoverableSpreadParams().merge is False


def test_sections_are_set_by_method_name_in_code_too():
    import dataclasses

    p = TokensParams(recoverable=RecoverableParams(merge=False), fastv={"layer": 3})
    assert p.recoverable.merge is False and p.fastv.layer == 3 and p.pool == METHOD_PARAMS["pool"]()
    q = dataclasses.replace(p, fastv=dataclasses.replace(p.fastv, layer=5))
    assert q.fastv.layer == 5 and q.recoverable.merge is False
    with pytest.raises(ConfigError, match=r"^tokens\.fastv: expected FastVParams"):
        TokensParams(fastv=RecoverableParams())
    with pytest.raises(ConfigError, match=r"^tokens\.fastv\.layer: expected int"):
        TokensParams(fastv={"layer": "x"})
    with pytest.raises(AttributeError, match="nope"):
        p.nope


def test_unknown_keys_list_the_method_sections():
    with pytest.raises(ConfigError, match=r"^tokens\.nope: unknown key \(known: methods, .*eval, full, .*fastv\)$"):
        from_dict(TokensParams, {"nope": {}}, "tokens")
    with pytest.raises(ConfigError, match=r"^tokens\.sections: unknown key"):   # the field behind them is not a key
        from_dict(TokensParams, {"sections": {}}, "tokens")


@pytest.mark.parametrize("section,match", [
    ({"methods": []}, r"^tokens\.methods: needs at least one method$"),
    ({"methods": ["full", "recoverable", "full"]}, r"^tokens\.methods: 'full' is listed twice$"),
    ({"budgets": []}, r"^tokens\.budgets: needs at least one budget$"),
    ({"budgets": [0.1, 0.25, 0.1]}, r"^tokens\.budgets: 0\.1 is listed twice$"),
    ({"methods": ["full", "random"]}, r"^tokens\.eval\.reference_method: must be one of tokens\.methods"),
    ({"eval": {"example_methods": ["full", "full"]}}, r"^tokens\.eval\.example_methods: 'full' is listed twice$"),
    ({"random": {"seed": -1}}, r"^tokens\.random\.seed: must be in \[0, 4294967295\], got -1$"),
])
def test_section_checks_name_the_key(section, match):
    from vlmcompress.tokens.config import check_tokens_params

    with pytest.raises(ConfigError, match=match):
        check_tokens_params(from_dict(TokensParams, section, "tokens"))


def test_a_count_and_a_fraction_of_the_same_value_are_different_budgets():
    from vlmcompress.tokens.config import check_tokens_params

    check_tokens_params(from_dict(TokensParams, {"budgets": [1, 1.0]}, "tokens"))   # 1 token, all tokens


def test_long_names_are_quoted_short():
    with pytest.raises(ConfigError) as exc:
        from_dict(TokensParams, {"methods": ["m" * 10_000]}, "tokens")
    assert len(str(exc.value)) < 250 and "..." in str(exc.value)
