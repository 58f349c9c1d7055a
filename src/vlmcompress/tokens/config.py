"""Schema of the ``tokens`` section of params.yaml: which token-compression methods to run,
at which budgets, on which vision layer, and each method's own parameters.

Each method's dataclass lists exactly the keyword parameters its function in
:mod:`vlmcompress.tokens.methods` accepts (besides ``budget``, ``attention`` and
``generator``), with the defaults used there; :data:`METHOD_PARAMS` maps a method name to it
(``fastv``, which prunes inside the LM, takes its parameters in :mod:`vlmcompress.tokens.fastv`).
``eval`` holds the stage's settings.
Defaults follow the official code of each method, except ``merge_mode`` (see below).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

MergeMode = Literal["average", "residual"]
Rule = Literal["lof", "iqr"]


def _fail(where: str, msg: str) -> None:
    # Imported here: vlmcompress.config imports this module to assemble Params.
    from vlmcompress.config import ConfigError
    raise ConfigError(f"tokens.{where}: {msg}")


def _show(value: Any) -> str:
    from vlmcompress.config import show
    return show(value)


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
    No adaptive mode. Runs in :mod:`vlmcompress.tokens.fastv`, not in the methods registry."""

    layer: int = 2

    def __post_init__(self) -> None:
        _check_min("fastv", "layer", self.layer, 1)


@dataclass(frozen=True)
class RecoverableParams:
    """``recoverable`` (arXiv 2409.01179): salient tokens by CLS attention, recovered tokens by
    text similarity, the rest merged into attention-ranked centres plus one global token."""

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
    min_salient: int = 1
    recover: bool = True             # step 2 on/off (ablation)
    merge: bool = True               # step 3 centres on/off (ablation)
    global_token: bool = True
    merge_neighbors: int = 32        # tokens each centre absorbs (official: 32)
    # Weight of the text cosine added to key cosine when choosing what a centre absorbs:
    # official 50·sim with sim = cos/√768 (CLIP-L joint dim) -> 50/√768 ≈ 1.804.
    text_weight: float = 1.804
    merge_mode: MergeMode = "average"
    salient_share: float = 0.5       # fixed budget: share of k for salient tokens
    recovered_share: float = 0.25    # fixed budget: share of k for recovered; the rest merged
    # Where the salient tokens are: 'cls' = highest CLS attention (the paper); 'spread' = the
    # same number spread evenly over the grid (recoverable_spread, an improved variant).
    salient_source: Literal["cls", "spread"] = "cls"
    # Which tokens are recovered: true = the text score's local maxima on the patch grid first
    # (about one per object the question names), then the best of the rest; false = the top
    # scores (the paper), which on a large object spend the whole share on that one object.
    # Adaptive mode: the rule still sets how many, the peaks choose which.
    recovery_peaks: bool = False
    peak_window: int = 3             # a peak is the maximum of this odd square of patches around it

    def __post_init__(self) -> None:
        name = "recoverable_spread" if isinstance(self, RecoverableSpreadParams) else "recoverable"
        if self.salient_source not in ("cls", "spread"):
            _fail(f"{name}.salient_source", f"expected 'cls' or 'spread', got {_show(self.salient_source)}")
        for field_name in ("salient_neighbors", "recovery_neighbors", "centre_neighbors"):
            _check_min(name, field_name, getattr(self, field_name), 1)
        _check_min(name, "merge_neighbors", self.merge_neighbors, 0)
        _check_min(name, "min_salient", self.min_salient, 0)
        if self.peak_window < 3 or self.peak_window % 2 == 0:
            _fail(f"{name}.peak_window", f"must be odd and >= 3, got {_show(self.peak_window)}")
        _check_min(name, "whisker", self.whisker, 0.0)
        _check_share(name, "salient_share", self.salient_share)
        _check_share(name, "recovered_share", self.recovered_share)
        if self.salient_share + self.recovered_share > 1.0 + 1e-9:
            total = self.salient_share + self.recovered_share
            _fail(f"{name}.recovered_share", f"salient_share + recovered_share must be <= 1, got {_show(total)}")


@dataclass(frozen=True)
class RecoverableSpreadParams(RecoverableParams):
    """``recoverable_spread``: our variant of ``recoverable`` for an LM that reads token
    statistics (counting). Salient tokens spread evenly over the grid instead of chosen by CLS
    attention (``salient_share`` of k), the rest recovered by question similarity; no merged or
    global tokens (averages of unrelated patches, on the embedded LM, came out as box fragments
    and "2"). Without merging, the recovered tokens take all of ``k`` the salient ones leave.
    Recovered tokens come from the text score's grid peaks first (``recovery_peaks``): one
    token on each object the question names lets the LM count them (count 49 -> 74 % at 10% on
    2,000 val questions). With peaks, a quarter of k recovered beat 3/8, 1/2 and 3/4 there.
    """

    salient_source: Literal["cls", "spread"] = "spread"
    recovery_peaks: bool = True
    merge: bool = False
    global_token: bool = False
    salient_share: float = 0.75
    recovered_share: float = 0.25


METHOD_PARAMS: dict[str, type] = {
    "full": FullParams,
    "random": RandomParams,
    "pool": PoolParams,
    "prumerge": PruMergeParams,
    "prumerge_plus": PruMergePlusParams,
    "visionzip": VisionZipParams,
    "recoverable": RecoverableParams,
    "recoverable_spread": RecoverableSpreadParams,
    "fastv": FastVParams,
}
IN_LM_METHODS = {"fastv"}   # prune inside the LM: not in the registry of pre-LM methods


@dataclass(frozen=True)
class TokensEvalParams:
    """Settings of the ``05_eval_tokens`` stage (how much to evaluate, not how to compress)."""

    max_questions: int = 1000        # VQA test questions, type-stratified (0: all)
    batch_images: int = 32           # images per batch (all their questions, every method)
    task_budget: float = 0.10        # captions and grounding run at this budget (and full)
    max_captions: int = 100          # images captioned (0: all)
    max_refs: int = 200              # referring expressions grounded (0: all)
    examples: int = 6                # test questions saved with token maps for figures
    example_methods: list[str] = field(
        default_factory=lambda: ["full", "random", "prumerge", "visionzip", "recoverable"])
    reference_method: str = "recoverable"  # its measured speedup/overhead at task_budget go to metrics
    bench_repeats: int = 5           # timed prefills per configuration (median reported)
    bench_batch: int = 8             # questions per timed prefill

    def __post_init__(self) -> None:
        for name in ("max_questions", "max_captions", "max_refs", "examples"):
            _check_min("eval", name, getattr(self, name), 0)
        for name in ("batch_images", "bench_repeats", "bench_batch"):
            _check_min("eval", name, getattr(self, name), 1)
        if not (0.0 < self.task_budget <= 1.0):
            _fail("eval.task_budget", f"a fraction must be in (0, 1], got {_show(self.task_budget)}")
        for i, name in enumerate(self.example_methods):
            if name not in METHOD_PARAMS:
                _fail(f"eval.example_methods[{i}]", f"unknown method {_show(name)} (known: {', '.join(METHOD_PARAMS)})")
        if self.reference_method not in METHOD_PARAMS:
            _fail("eval.reference_method", f"unknown method {_show(self.reference_method)} "
                                           f"(known: {', '.join(METHOD_PARAMS)})")


@dataclass(frozen=True)
class TokensParams:
    """The ``tokens`` section: methods x budgets to evaluate and where scores come from."""

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
    full: FullParams = field(default_factory=FullParams)
    random: RandomParams = field(default_factory=RandomParams)
    pool: PoolParams = field(default_factory=PoolParams)
    prumerge: PruMergeParams = field(default_factory=PruMergeParams)
    prumerge_plus: PruMergePlusParams = field(default_factory=PruMergePlusParams)
    visionzip: VisionZipParams = field(default_factory=VisionZipParams)
    recoverable: RecoverableParams = field(default_factory=RecoverableParams)
    recoverable_spread: RecoverableSpreadParams = field(default_factory=RecoverableSpreadParams)
    fastv: FastVParams = field(default_factory=FastVParams)
    eval: TokensEvalParams = field(default_factory=TokensEvalParams)

    def __post_init__(self) -> None:
        for i, name in enumerate(self.methods):
            if name not in METHOD_PARAMS:
                _fail(f"methods[{i}]", f"unknown method {_show(name)} (known: {', '.join(METHOD_PARAMS)})")
        for i, b in enumerate(self.budgets):
            if isinstance(b, bool) or not isinstance(b, (int, float)):
                _fail(f"budgets[{i}]", f"expected an int count or a float fraction, got {_show(b)}")
            if isinstance(b, int) and b < 1:
                _fail(f"budgets[{i}]", f"a token count must be >= 1, got {_show(b)}")
            if isinstance(b, float) and not (0.0 < b <= 1.0):
                _fail(f"budgets[{i}]", f"a fraction must be in (0, 1], got {_show(b)}")

    def method_params(self, name: str) -> dict[str, Any]:
        """Keyword parameters for method ``name`` (its section as a dict)."""
        if name not in METHOD_PARAMS:
            raise KeyError(f"tokens: unknown method {name!r} (known: {', '.join(METHOD_PARAMS)})")
        section = getattr(self, name)
        return {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}


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
