"""Schema of the ``tokens`` section of params.yaml, and the registry of token methods.

The registry maps a method name to a :class:`MethodSpec`: its params dataclass (the schema of
``tokens.<name>`` and the keywords its function accepts besides ``budget``, ``attention`` and
``generator``), its function and its traits (adaptive, text-guided, in-LM). Methods register
with :func:`vlmcompress.tokens.methods.register_method` (built-ins on import of that module,
others from any module imported before use); :data:`METHOD_PARAMS`, :data:`ADAPTIVE`,
:data:`TEXT_GUIDED` and :data:`IN_LM_METHODS` are live read-only views of it, and
:class:`TokensParams` accepts a section for every registered method. This module imports no
torch: the registry holds the functions, it never calls them.

``eval`` holds the stage's settings.
Defaults follow the official code of each method, except ``merge_mode`` (see below) and
``recoverable``'s switches to the official code (the ``recoverable_official`` preset sets them).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import typing
from collections.abc import Callable, Iterator, Mapping, Set
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, Generic, Literal, TypeVar

MergeMode = Literal["average", "residual"]
Rule = Literal["lof", "iqr"]
V = TypeVar("V")


def _fail(where: str, msg: str) -> None:
    # Imported here: vlmcompress.config imports this module to assemble Params.
    from vlmcompress.config import ConfigError
    raise ConfigError(f"tokens.{where}: {msg}")


def _show(value: Any) -> str:
    from vlmcompress.config import show
    return show(value)


def _known_methods() -> str:
    """The registered names for an error message, clipped: users may register any number."""
    from vlmcompress.config import clip
    return clip(", ".join(METHOD_PARAMS), 80)


def _check_share(section: str, name: str, value: float) -> None:
    if not (0.0 <= value <= 1.0) or math.isnan(value):
        _fail(f"{section}.{name}", f"must be in [0, 1], got {_show(value)}")


def _check_min(section: str, name: str, value: float, low: float) -> None:
    if not value >= low:
        _fail(f"{section}.{name}" if section else name, f"must be >= {low}, got {_show(value)}")


@dataclass(frozen=True)
class FullParams:
    """``full``: all N tokens (the uncompressed reference); no parameters."""


@dataclass(frozen=True)
class RandomParams:
    """``random``: k tokens chosen uniformly at random, kept in patch order."""

    seed: int = 0   # used when the caller passes no torch.Generator


@dataclass(frozen=True)
class PoolParams:
    """``pool``: average pooling of the patch grid to the largest grid with <= k cells."""

    max_aspect: float = 2.0   # pooled grid's aspect ratio may differ from the image's by this factor

    def __post_init__(self) -> None:
        _check_min("pool", "max_aspect", self.max_aspect, 1.0)


@dataclass(frozen=True)
class PruMergeParams:
    """``prumerge`` (arXiv 2403.15388): centres = CLS-attention outliers (IQR rule, adaptive)
    or top-(k-1) (fixed); each absorbs its ``n_neighbors`` nearest tokens by key cosine;
    one global token sums the rest."""

    whisker: float = 1.5            # IQR rule: keep > Q3 + whisker·IQR
    n_neighbors: int = 32           # tokens each centre absorbs (official: 32)
    # 'average' = attention-weighted mean (identical tokens merge to themselves);
    # 'residual' = the official x_c + Σ a_j x_j (unnormalised).
    merge_mode: MergeMode = "average"
    global_token: bool = True       # the extra token summarising all non-centres
    min_keep: int = 1               # adaptive mode never keeps fewer centres

    def __post_init__(self) -> None:
        name = "prumerge_plus" if isinstance(self, PruMergePlusParams) else "prumerge"
        _check_min(name, "whisker", self.whisker, 0.0)
        _check_min(name, "n_neighbors", self.n_neighbors, 0)
        _check_min(name, "min_keep", self.min_keep, 0)


@dataclass(frozen=True)
class PruMergePlusParams(PruMergeParams):
    """``prumerge_plus``: PruMerge centres plus spatially uniform samples."""

    attn_share: float = 0.25   # fixed budget: share of the centres chosen by attention
    stride_divisor: int = 3    # adaptive: sample every (N // n_outliers // 3)-th patch (official)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_share("prumerge_plus", "attn_share", self.attn_share)
        _check_min("prumerge_plus", "stride_divisor", self.stride_divisor, 1)


@dataclass(frozen=True)
class VisionZipParams:
    """``visionzip`` (arXiv 2412.04467): dominant tokens by CLS attention, contextual tokens
    by merging the rest into evenly spaced targets."""

    contextual_share: float = 0.15625   # official splits 54+10, 108+20, 162+30: 10/64

    def __post_init__(self) -> None:
        _check_share("visionzip", "contextual_share", self.contextual_share)


@dataclass(frozen=True)
class FastVParams:
    """``fastv`` (arXiv 2403.06764): visual tokens dropped inside the LM. The first ``layer``
    decoder layers see every token; the attention the last prompt token pays to each visual
    token in layer ``layer`` (1-based; official K = 2) picks the ones the remaining layers keep.
    No adaptive mode. Registered ``in_lm``: its callable is :class:`vlmcompress.tokens.fastv.FastV`,
    a transform for ``LVLM.generate``, not a function of the visual tokens."""

    layer: int = 2

    def __post_init__(self) -> None:
        _check_min("fastv", "layer", self.layer, 1)


@dataclass(frozen=True)
class RecoverableParams:
    """``recoverable`` (arXiv 2409.01179): salient tokens by CLS attention, recovered tokens by
    text similarity, the rest merged into attention-ranked centres plus one global token."""

    _section: ClassVar[str] = "recoverable"   # a preset's class sets its own name (error paths)
    salient_rule: Rule = "lof"
    recovery_rule: Rule = "lof"
    centre_rule: Rule = "lof"
    salient_neighbors: int = 20      # LOF n_neighbors, salient step (official: 20)
    recovery_neighbors: int = 20     # LOF n_neighbors, recovery step (official: 20)
    centre_neighbors: int = 10       # LOF n_neighbors, centre step (official: sklearn default 10)
    lof_threshold: float = 1.5       # outlier iff LOF > this (sklearn contamination='auto')
    whisker: float = 1.5             # for rules set to 'iqr'
    # Centre count = floor(base · outlier fraction of the leftover attention). Official code:
    # base = N in one variant, the vision width (a bug) in the other; 'leftover' = n_leftover.
    centre_count_base: Literal["all", "leftover"] = "all"
    min_salient: int = 1             # adaptive salient tokens never fewer (official: no minimum, 0)
    recover: bool = True             # step 2 on/off (ablation)
    merge: bool = True               # step 3 centres on/off (ablation)
    global_token: bool = True
    merge_neighbors: int = 32        # tokens each centre absorbs (official: 32)
    # Weight of the text cosine added to key cosine when choosing what a centre absorbs:
    # official 50·sim with sim = cos/√P, P the joint space's width; 1.804 = 50/√768 (CLIP-L).
    # None: 50/√P with P read from the model (VisualTokens.text_dim), as the official code.
    text_weight: float | None = 1.804
    merge_mode: MergeMode = "average"
    salient_share: float = 0.5       # fixed budget: share of k for salient tokens
    recovered_share: float = 0.25    # fixed budget: share of k for recovered; the rest merged
    # Where the salient tokens are: 'cls' = highest CLS attention (the paper); 'spread' = the
    # same number spread evenly over the grid (the recoverable_spread preset); 'diverse' = the
    # same number picked for max-min diversity of the projected tokens (DivPrune's criterion).
    salient_source: Literal["cls", "spread", "diverse"] = "cls"
    # Which tokens are recovered: true = the text score's local maxima on the patch grid first
    # (about one per object the question names), then the best of the rest; false = the top
    # scores (the paper), which on a large object spend the whole share on that one object.
    # Adaptive mode: the rule still sets how many, the peaks choose which.
    recovery_peaks: bool = False
    peak_window: int = 3             # a peak is the maximum of this odd square of patches around it
    # A peak must also score at least this far from the image's lowest text score to its highest
    # (0: every peak; 0.5: the upper half). A weaker peak ranks as an ordinary patch, so the share
    # goes to the best patches around the strong peaks: more of the named object, fewer strays.
    peak_floor: float = 0.0
    # Switches to the official code's behaviour (defaults: ours; the recoverable_official preset
    # sets all of them). Where merged and global tokens are averaged: 'projected' = the LM-space
    # tokens; 'vision' = the vision features before the projector, then projected (official).
    merge_space: Literal["projected", "vision"] = "projected"
    # The global token of an image with no centres: true keeps it; false drops it (official).
    global_without_centres: bool = True
    # The question's CLIP text embedding: 'eos' = CLIP's own pooling at the EOS token; 'last' =
    # the question padded to CLIP's context length, read at the last position (official).
    text_pooling: Literal["eos", "last"] = "eos"

    def __post_init__(self) -> None:
        name = self._section
        for field_name, allowed in (("salient_source", ("cls", "spread", "diverse")), ("merge_space", ("projected", "vision")),
                                    ("text_pooling", ("eos", "last"))):
            if getattr(self, field_name) not in allowed:
                _fail(f"{name}.{field_name}", f"expected {' or '.join(map(repr, allowed))}, "
                                              f"got {_show(getattr(self, field_name))}")
        for field_name in ("salient_neighbors", "recovery_neighbors", "centre_neighbors"):
            _check_min(name, field_name, getattr(self, field_name), 1)
        _check_min(name, "merge_neighbors", self.merge_neighbors, 0)
        _check_min(name, "min_salient", self.min_salient, 0)
        if self.peak_window < 3 or self.peak_window % 2 == 0:
            _fail(f"{name}.peak_window", f"must be odd and >= 3, got {_show(self.peak_window)}")
        if not (0.0 <= self.peak_floor < 1.0):
            _fail(f"{name}.peak_floor", f"must be in [0, 1), got {_show(self.peak_floor)}")
        _check_min(name, "whisker", self.whisker, 0.0)
        _check_share(name, "salient_share", self.salient_share)
        _check_share(name, "recovered_share", self.recovered_share)
        if self.salient_share + self.recovered_share > 1.0 + 1e-9:
            total = self.salient_share + self.recovered_share
            _fail(f"{name}.recovered_share", f"salient_share + recovered_share must be <= 1, got {_show(total)}")


@dataclass(frozen=True)
class DivPruneParams:
    """``divprune`` (CVPR 2025, arXiv 2503.02175): the k tokens of greatest max-min diversity
    (greedy, distance 1 - cosine of the projected tokens); no parameters besides the budget."""


@dataclass(frozen=True)
class CDPrunerParams:
    """``cdpruner`` (NeurIPS 2025, arXiv 2506.10967): greedy MAP of a DPP whose kernel is the
    tokens' cosine similarity scaled by each token's relevance to the instruction."""

    # Relevance r (min-max normalised text cosine) enters the kernel as exp(alpha·r), alpha =
    # theta / (2(1 - theta)), the paper's quality/diversity trade-off; None: r itself (official code).
    theta: float | None = None
    # The official code ranks by the *negated* cosine: with LLaVA's penultimate CLIP layer the
    # authors found patch-text similarity inverted. VisualTokens.text_sim comes from CLIP's last
    # layer (or the LM's embedding space under attach), where a higher cosine is more relevant.
    negate_relevance: bool = False

    def __post_init__(self) -> None:
        t = self.theta
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t < 1.0):
            _fail("cdpruner.theta", f"must be null or in [0, 1), got {_show(t)}")
        if not isinstance(self.negate_relevance, bool):
            _fail("cdpruner.negate_relevance", f"expected true or false, got {_show(self.negate_relevance)}")


# --- the registry of methods ------------------------------------------------------------

@dataclass(frozen=True)
class MethodSpec:
    """One registered token method.

    ``fn`` is ``fn(vt, *, budget, attention, generator, **params) -> Compressed`` for a method
    that compresses the visual tokens before the LM, or ``fn(*, budget, **params) -> transform``
    (a transform for ``LVLM.generate``) for one that prunes inside the LM (``in_lm``).
    """

    name: str
    params: type                     # its params dataclass: the schema of tokens.<name>
    fn: Callable[..., Any] | str     # or "module:attr" of a declared built-in not imported yet
    adaptive: bool = False           # accepts budget=None (its own rule picks how many)
    text_guided: bool = False        # reads VisualTokens.text_sim: needs the question's embedding
    in_lm: bool = False              # prunes inside the LM (fn makes a transform)
    base: str | None = None          # a preset: runs this method's function with other defaults


_SPECS: dict[str, MethodSpec] = {}


def method_specs() -> Mapping[str, MethodSpec]:
    """Every registered method by name, in registration order, built-ins first.

    Built-ins are declared at the end of this module with where their function lives, so the
    schema knows their names, params and traits without importing torch; a declared spec's
    ``fn`` is that ``"module:attr"`` string until its module is imported (:func:`method_function`).
    """
    return MappingProxyType(_SPECS)


def _where(fn: Any) -> str:
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', getattr(fn, '__name__', '?'))}"


CALL_KEYWORDS = ("budget", "attention", "generator")   # every method's own keywords; the rest are params


def method_params_of(cls: type, name: str, params: dict[str, Any]) -> Any:
    """``cls(**params)``; an unknown keyword is a one-line error naming the known parameters."""
    try:
        return cls(**params)
    except TypeError as exc:   # unknown keyword
        known = ", ".join(f.name for f in dataclasses.fields(cls)) or "none"
        raise ValueError(f"{name}: bad parameter ({exc}); known parameters: {known}") from None


def params_fields(params: Any) -> dict[str, Any]:
    """A params dataclass as keywords (shallow: values stay as they are)."""
    return {f.name: getattr(params, f.name) for f in dataclasses.fields(params)}


def with_defaults(name: str, params: type, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` called with every field of ``params`` (its defaults, updated by the call's): a preset."""
    def run(*args: Any, **kwargs: Any) -> Any:
        call = {k: kwargs.pop(k) for k in CALL_KEYWORDS if k in kwargs}
        return fn(*args, **call, **params_fields(method_params_of(params, name, kwargs)))
    run.__name__ = run.__qualname__ = name
    run.__doc__ = params.__doc__
    return run


def method_function(spec: MethodSpec) -> Callable[..., Any]:
    """The callable of ``spec``, importing a declared built-in's module on first use."""
    if callable(spec.fn):
        return spec.fn
    importlib.import_module(str(spec.fn).partition(":")[0])     # its decorator binds it
    bound = _SPECS.get(spec.name, spec)
    if not callable(bound.fn) and bound.base is not None:
        bound = _bind_preset(bound)
    if not callable(bound.fn):
        raise LookupError(f"token method {spec.name!r}: {spec.fn} did not register it")
    return bound.fn


def _bind_preset(spec: MethodSpec) -> MethodSpec:
    base_fn = method_function(_SPECS[spec.base])
    bound = dataclasses.replace(spec, fn=with_defaults(spec.name, spec.params, base_fn))
    _SPECS[spec.name] = bound
    return bound


def _declare(name: str, params: type, where: str, **traits: Any) -> None:
    """A built-in, known by name before its module is imported."""
    _SPECS[name] = MethodSpec(name, params, where, **traits)


def _declare_preset(name: str, base: str, doc: str, **defaults: Any) -> type:
    """A built-in preset of built-in ``base``; returns its params dataclass."""
    b = _SPECS[base]
    params = preset_params(name, b.params, doc, **defaults)
    _SPECS[name] = dataclasses.replace(b, name=name, params=params, base=base)
    return params


def method_spec(name: str) -> MethodSpec:
    """The spec of method ``name``; ``KeyError`` naming the known ones if none is registered."""
    specs = method_specs()
    if not isinstance(name, str) or name not in specs:
        raise KeyError(f"tokens: unknown method {_show(name)} (known: {_known_methods()})")
    return specs[name]


def _reserved_names() -> set[str]:
    """Keys of the ``tokens`` section itself and attributes of :class:`TokensParams`: a method's
    section is read as ``p.<name>``, so its name cannot be one of them."""
    return {f.name for f in dataclasses.fields(TokensParams)} | {a for a in dir(TokensParams) if not a.startswith("_")}


def add_method_spec(spec: MethodSpec) -> None:
    """Register ``spec`` (the decorators of :mod:`vlmcompress.tokens.methods` call this).

    For a declared built-in this binds its function: the decorator must name the declared
    function, params and traits (so the declaration cannot drift from the code)."""
    specs = method_specs()
    if not (isinstance(spec.name, str) and spec.name.isidentifier()):
        raise ValueError(f"token method name must be an identifier (it is a params.yaml key), got {spec.name!r}")
    declared = specs.get(spec.name)
    if declared is not None and not callable(declared.fn) and declared.base is None:
        where = _where(spec.fn)
        if declared.fn != where or declared != dataclasses.replace(spec, fn=where):
            raise ValueError(f"token method {spec.name!r} is a built-in declared as {declared}; "
                             f"registered as {dataclasses.replace(spec, fn=_where(spec.fn))}")
        _SPECS[spec.name] = spec
        for preset in [s for s in _SPECS.values() if s.base == spec.name and not callable(s.fn)]:
            _bind_preset(preset)
        return
    if spec.name in specs:
        raise ValueError(f"token method {spec.name!r} registered twice")
    if spec.name in _reserved_names():
        raise ValueError(f"token method name {spec.name!r} is a key or attribute of the tokens section itself")
    if not (isinstance(spec.params, type) and dataclasses.is_dataclass(spec.params)):
        raise TypeError(f"token method {spec.name!r}: params must be a dataclass, got {spec.params!r}")
    if not callable(spec.fn):
        raise TypeError(f"token method {spec.name!r}: fn must be callable, got {spec.fn!r}")
    _SPECS[spec.name] = spec


def remove_method_spec(name: str) -> MethodSpec:
    """Unregister method ``name`` (refused while a preset of it is registered)."""
    method_spec(name)   # KeyError if unknown
    presets = [n for n, s in _SPECS.items() if s.base == name]
    if presets:
        raise ValueError(f"token method {name!r} has presets {', '.join(presets)}; unregister those first")
    return _SPECS.pop(name)


class RegistryMap(Mapping[str, V], Generic[V]):
    """Live read-only ``name -> value(spec)`` of the registered methods that ``pick`` accepts."""

    def __init__(self, pick: Callable[[MethodSpec], bool], value: Callable[[MethodSpec], V]) -> None:
        self._pick, self._value = pick, value

    def __getitem__(self, name: str) -> V:
        spec = method_specs().get(name) if isinstance(name, str) else None
        if spec is None or not self._pick(spec):
            raise KeyError(name)
        return self._value(spec)

    def __iter__(self) -> Iterator[str]:
        return iter([n for n, s in method_specs().items() if self._pick(s)])

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return repr(dict(self))


class RegistrySet(Set[str]):
    """Live read-only set of the registered method names that ``pick`` accepts; set operations
    (``&``, ``|``, ``-``) return plain sets."""

    def __init__(self, pick: Callable[[MethodSpec], bool]) -> None:
        self._pick = pick

    def __contains__(self, name: object) -> bool:
        spec = method_specs().get(name) if isinstance(name, str) else None
        return spec is not None and self._pick(spec)

    def __iter__(self) -> Iterator[str]:
        return iter([n for n, s in method_specs().items() if self._pick(s)])

    def __len__(self) -> int:
        return sum(1 for _ in self)

    @classmethod
    def _from_iterable(cls, it: Any) -> set[str]:
        return set(it)

    def __repr__(self) -> str:
        return repr(set(self))


METHOD_PARAMS: Mapping[str, type] = RegistryMap(lambda s: True, lambda s: s.params)
ADAPTIVE: Set[str] = RegistrySet(lambda s: s.adaptive)
TEXT_GUIDED: Set[str] = RegistrySet(lambda s: s.text_guided)
IN_LM_METHODS: Set[str] = RegistrySet(lambda s: s.in_lm)


def _class_name(method: str) -> str:
    return "".join(part.capitalize() for part in method.split("_")) + "Params"


def preset_params(name: str, base: type, doc: str | None = None, **defaults: Any) -> type:
    """The params dataclass of preset ``name``: ``base``'s fields and checks with ``defaults``
    as the new defaults (errors name ``tokens.<name>`` where ``base`` reads ``_section``)."""
    fields = [f.name for f in dataclasses.fields(base)]
    unknown = [k for k in defaults if k not in fields]
    if unknown:
        raise ValueError(f"preset {name!r}: {base.__name__} has no field {unknown[0]!r} (fields: {', '.join(fields)})")
    hints = typing.get_type_hints(base)
    cls = dataclasses.make_dataclass(
        _class_name(name), [(k, hints[k], field(default=v)) for k, v in defaults.items()], bases=(base,),
        frozen=base.__dataclass_params__.frozen,
        namespace={"__doc__": doc or f"``{name}``: a preset of {base.__name__}.", "_section": name})
    cls.__module__ = base.__module__
    cls()   # the new defaults pass the base's checks, or registration fails here
    return cls


@dataclass(frozen=True)
class TokensEvalParams:
    """Settings of the ``05_eval_tokens`` stage (how much to evaluate, not how to compress)."""

    max_questions: int = 1000        # VQA test questions, type-stratified (0: all)
    batch_images: int = 32           # images per batch (all their questions, every method)
    task_budget: float = 0.10        # captions run at this budget (and full); grounding at every budget
    max_captions: int = 100          # images captioned (0: all)
    max_refs: int = 200              # referring expressions grounded (0: all)
    examples: int = 6                # test questions saved with token maps for figures
    example_methods: list[str] = field(
        default_factory=lambda: ["full", "random", "prumerge", "visionzip", "recoverable"])
    reference_method: str = "recoverable"  # its measured speedup/overhead at task_budget go to metrics
    bench_repeats: int = 5           # timed prefills per configuration (median reported)
    bench_batch: int = 8             # questions per timed prefill
    # Our method: the candidate with the best mean accuracy over the budgets on val_questions
    # validation questions (the test split is reported once); candidates not in methods are skipped.
    ours: list[str] = field(default_factory=lambda: ["recoverable", "recoverable_spread"])
    val_questions: int = 500         # validation questions for that choice, type-stratified (0: all)
    cost_tolerance: float = 0.02     # equal cost: ours within this share of a peer's prefill GFLOPs

    def __post_init__(self) -> None:
        for name in ("max_questions", "max_captions", "max_refs", "examples", "val_questions"):
            _check_min("eval", name, getattr(self, name), 0)
        for name in ("batch_images", "bench_repeats", "bench_batch"):
            _check_min("eval", name, getattr(self, name), 1)
        if not (0.0 < self.task_budget <= 1.0):
            _fail("eval.task_budget", f"a fraction must be in (0, 1], got {_show(self.task_budget)}")
        for i, name in enumerate(self.example_methods):
            if name not in METHOD_PARAMS:
                _fail(f"eval.example_methods[{i}]", f"unknown method {_show(name)} (known: {_known_methods()})")
        for i, name in enumerate(self.ours):
            if name not in METHOD_PARAMS:
                _fail(f"eval.ours[{i}]", f"unknown method {_show(name)} (known: {_known_methods()})")
        if not (0.0 < self.cost_tolerance < 1.0):
            _fail("eval.cost_tolerance", f"a share must be in (0, 1), got {_show(self.cost_tolerance)}")
        if self.reference_method not in METHOD_PARAMS:
            _fail("eval.reference_method", f"unknown method {_show(self.reference_method)} "
                                           f"(known: {_known_methods()})")


def _sections_by_name(cls: type) -> type:
    """Let ``cls(recoverable=RecoverableParams(...))`` set a method's section under the method's
    name, as the file does (``dataclasses.replace(p, fastv=...)`` goes through here too)."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, sections: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        named = {k: kwargs.pop(k) for k in list(kwargs) if k in METHOD_PARAMS}
        init(self, *args, sections={**(sections or {}), **named}, **kwargs)

    cls.__init__ = __init__
    return cls


@_sections_by_name
@dataclass(frozen=True)
class TokensParams:
    """The ``tokens`` section: methods x budgets to evaluate, where scores come from, and one
    section per registered method (``tokens.<name>``, its params dataclass; defaults if absent),
    read as ``p.<name>`` or :meth:`method_params`."""

    methods: list[str] = field(default_factory=lambda: list(METHOD_PARAMS))
    # A float is a fraction of N (0.05 -> 29 of 576), an int a token count.
    budgets: list[int | float] = field(default_factory=lambda: [0.05, 0.10, 0.25, 0.50])
    adaptive: bool = True            # also run the adaptive mode of methods that have one
    attention_layer: int = -1        # vision encoder layer whose CLS attention / keys score tokens
                                     # (PruMerge, Recoverable: last = 23; VisionZip's own code: -2)
    attention: Literal["head_mean", "full"] = "head_mean"  # VisualTokens.cls_attn or .cls_attn_full
    # Kept tokens at their grid positions (merged ones at their centre's) and the text after the
    # whole grid, instead of packed contiguously as LLaVA does; for an LM trained that way.
    grid_positions: bool = False
    eval: TokensEvalParams = field(default_factory=TokensEvalParams)
    # Method name -> its params. In the file each is a key of the section itself ("inline" tells
    # vlmcompress.config.from_dict / to_dict so), typed by the registry at load time.
    sections: dict[str, Any] = field(default_factory=dict, metadata={"inline": lambda: METHOD_PARAMS})

    def __post_init__(self) -> None:
        for i, name in enumerate(self.methods):
            if name not in METHOD_PARAMS:
                _fail(f"methods[{i}]", f"unknown method {_show(name)} (known: {_known_methods()})")
        for i, b in enumerate(self.budgets):
            if isinstance(b, bool) or not isinstance(b, (int, float)):
                _fail(f"budgets[{i}]", f"expected an int count or a float fraction, got {_show(b)}")
            if isinstance(b, int) and b < 1:
                _fail(f"budgets[{i}]", f"a token count must be >= 1, got {_show(b)}")
            if isinstance(b, float) and not (0.0 < b <= 1.0):
                _fail(f"budgets[{i}]", f"a fraction must be in (0, 1], got {_show(b)}")
        given = {name: _section(name, value) for name, value in self.sections.items()}
        object.__setattr__(self, "sections", {name: given[name] if name in given else cls()
                                              for name, cls in METHOD_PARAMS.items()})

    def section(self, name: str) -> Any:
        """The params of method ``name`` (its defaults if it was registered, or registered again
        with another params class, after this object was made)."""
        cls = method_spec(name).params
        value = self.sections.get(name)
        return value if isinstance(value, cls) else cls()

    def __getattr__(self, name: str) -> Any:
        # p.recoverable, p.fastv.layer: a registered method's section reads like a field.
        if name.startswith("__") or name == "sections":
            raise AttributeError(name)
        try:
            return self.section(name)
        except KeyError:
            raise AttributeError(f"{type(self).__name__} has no field or method section {name!r}") from None

    def method_params(self, name: str) -> dict[str, Any]:
        """Keyword parameters for method ``name`` (its section as a dict)."""
        section = self.section(name)
        return {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}


def _section(name: Any, value: Any) -> Any:
    """A method's section given in code: its params dataclass, or a dict loaded into one."""
    if name not in METHOD_PARAMS:
        _fail(_show(name) if not isinstance(name, str) else name,
              f"unknown method section (known: {_known_methods()})")
    cls = METHOD_PARAMS[name]
    if isinstance(value, dict):
        from vlmcompress.config import from_dict
        return from_dict(cls, value, f"tokens.{name}")
    if not isinstance(value, cls):
        _fail(name, f"expected {cls.__name__}, got {_show(value)}")
    return value


def check_tokens_params(p: TokensParams, path: str = "tokens") -> None:
    """Checks of the whole section beyond each field's own range (run by ``load_params``).

    The method and budget lists are non-empty and without repeats (a repeat would run twice
    under one label), and the reference method is one the stage measures.
    """
    from vlmcompress.config import SEED_MAX, check_names, check_range, check_unique, require, show

    check_names(f"{path}.methods", p.methods, METHOD_PARAMS, "method")
    require(len(p.budgets) > 0, f"{path}.budgets", "needs at least one budget")
    check_unique(f"{path}.budgets", p.budgets, key=lambda b: (type(b), b))   # 1 token is not 1.0 of them
    check_range(f"{path}.random.seed", p.random.seed, 0, SEED_MAX)
    check_unique(f"{path}.eval.example_methods", p.eval.example_methods)
    require(p.eval.reference_method in p.methods, f"{path}.eval.reference_method",
            f"must be one of {path}.methods (its measured speedup is reported), got {show(p.eval.reference_method)}")


# --- the built-in methods, declared ---------------------------------------------------------
# Each decorator in vlmcompress.tokens.methods / .peers / .fastv binds its entry (and must match
# it); the order here is the registry's order, built-ins first.
_declare("full", FullParams, "vlmcompress.tokens.methods:full")
_declare("random", RandomParams, "vlmcompress.tokens.methods:random")
_declare("pool", PoolParams, "vlmcompress.tokens.methods:pool")
_declare("prumerge", PruMergeParams, "vlmcompress.tokens.methods:prumerge", adaptive=True)
_declare("prumerge_plus", PruMergePlusParams, "vlmcompress.tokens.methods:prumerge_plus", adaptive=True)
_declare("visionzip", VisionZipParams, "vlmcompress.tokens.methods:visionzip")
_declare("recoverable", RecoverableParams, "vlmcompress.tokens.methods:recoverable", adaptive=True, text_guided=True)
RecoverableSpreadParams = _declare_preset(
    "recoverable_spread", "recoverable",
    salient_source="spread", recovery_peaks=True, peak_floor=0.7, merge=False, global_token=False,
    salient_share=0.75, recovered_share=0.25,
    doc="""``recoverable_spread``: our variant of ``recoverable`` for an LM that reads token
    statistics (counting). Salient tokens spread evenly over the grid instead of chosen by CLS
    attention (``salient_share`` of k), the rest recovered by question similarity; no merged or
    global tokens (averages of unrelated patches). Without merging, the recovered tokens take
    all of ``k`` the salient ones leave. Recovered tokens come from the text score's grid peaks
    first (``recovery_peaks``): one token on each object the question names lets the LM count
    them (docs/experiments/2026-12-03-token-methods-embedded.md). Only peaks in the top 30 % of
    the image's text-score range count as peaks (``peak_floor``); a weaker one ranks as an ordinary
    patch, so more of the share lands on and around the named object.
    """)
RecoverableOfficialParams = _declare_preset(
    "recoverable_official", "recoverable",
    merge_space="vision", global_without_centres=False, min_salient=0, text_pooling="last", text_weight=None,
    merge_mode="residual",
    doc="""``recoverable_official``: ``recoverable`` as the official code runs it. Merged and global
    tokens are averaged from the vision features before the projector, then projected; no global
    token without centres; no minimum of salient tokens; the question embedded at the last
    padded position of CLIP's text tower; text weight 50/√P from the model's joint width; the
    unnormalised ``x_c + Σ a_j x_j`` merge (``merge_mode: residual``). The official code's bugs
    stay fixed (see :func:`vlmcompress.tokens.methods.recoverable`). The official code runs the
    adaptive mode (``budget: None``) with ``attention: full``; those are call settings, not parameters.
    """)
_declare("divprune", DivPruneParams, "vlmcompress.tokens.peers:divprune")
_declare("cdpruner", CDPrunerParams, "vlmcompress.tokens.peers:cdpruner", text_guided=True)
_declare("fastv", FastVParams, "vlmcompress.tokens.fastv:FastV", in_lm=True)
