"""VQA accuracy by question type for token-compression settings side by side, on the stage's model.

    python scripts/token_ablation.py --methods random recoverable --budgets 0.10 \
        --set grid_positions=false --set grid_positions=true --questions 500

Each ``--set`` is one configuration: comma-separated ``key=value`` overrides of the ``tokens``
params section (dotted for a method's own params, e.g. ``recoverable.merge=false``); values
are YAML. Prints one table per configuration (rows: method and budget; columns: question
types). Uses the trained model under ``outputs/lvlm/model`` and the test split (``--split val``
to choose settings on images the stage never scores); writes nothing. Results:
``docs/experiments/2026-12-03-token-methods-embedded.md``.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from vlmcompress.config import ConfigError, from_dict, load_params, to_dict  # noqa: E402
from vlmcompress.tokens.config import TokensParams  # noqa: E402


def apply_overrides(tokens: TokensParams, spec: str) -> TokensParams:
    """``tokens`` with ``k=v,k2=v2`` applied (validated by the same loader as params.yaml)."""
    raw: dict[str, Any] = to_dict(tokens)
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"token_ablation: --set {spec!r}: expected key=value, got {item!r}")
        *parents, leaf = key.strip().split(".")
        node = raw
        for p in parents:
            if not isinstance(node.get(p), dict):
                raise SystemExit(f"token_ablation: --set: tokens.{key} is not a params key")
            node = node[p]
        if leaf not in node:
            raise SystemExit(f"token_ablation: --set: tokens.{key} is not a params key")
        node[leaf] = yaml.safe_load(value)
    return from_dict(TokensParams, raw, "tokens")


def confusion_table(outputs: dict, question_type: str) -> pd.DataFrame:
    """Counts of (reference answer, answer given) for one question type, one row per run."""
    rows = [{"method": run.method, "budget": run.key, "pair": f"{q.answer}->{given.strip()}"}
            for run, o in outputs.items() for (_, q), given in zip(o.samples, o.answers)
            if q.question_type == question_type]
    if not rows:
        raise SystemExit(f"token_ablation: --confusion: no {question_type!r} questions among those drawn")
    return pd.DataFrame(rows).pivot_table(index=["method", "budget"], columns="pair", aggfunc="size", fill_value=0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=["random", "recoverable"])
    ap.add_argument("--budgets", nargs="+", type=float, default=[0.10])
    ap.add_argument("--adaptive", action="store_true", help="also the adaptive modes")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="one configuration (repeatable)")
    ap.add_argument("--questions", type=int, default=500, help="stratified test questions")
    ap.add_argument("--by-size", action="store_true", help="also accuracy by the size of the named objects")
    ap.add_argument("--confusion", metavar="TYPE", default=None,
                    help="also the answer given against the reference, for one question type (e.g. count)")
    ap.add_argument("--split", choices=["val", "test"], default="test",
                    help="scene split the questions come from (tune on val, report on test)")
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    args = ap.parse_args(argv)

    import torch

    from vlmcompress.api import load_all, lvlm_from_params
    from vlmcompress.eval.tasks import answer_tokens
    from vlmcompress.tokens.compare import vqa_by_size, vqa_table
    from vlmcompress.tokens.sweep import Sweeper, make_batches, plan_runs, stratified_questions

    # The params and every configuration are checked before the model loads: a typo fails at once.
    try:
        params = load_params(args.params)
        configs = [(spec, dataclasses.replace(apply_overrides(params.tokens, spec), methods=["full", *args.methods],
                                              budgets=args.budgets, adaptive=args.adaptive))
                   for spec in args.sets or [""]]
    except ConfigError as exc:
        raise SystemExit(f"token_ablation: {exc}") from None
    if params.lvlm.train.threads > 0:
        torch.set_num_threads(params.lvlm.train.threads)
    lvlm = lvlm_from_params(params)
    lvlm.attn_layer = params.tokens.attention_layer
    items = stratified_questions(load_all()[args.split], args.questions, seed=params.seed)
    if args.confusion and not any(q.question_type == args.confusion for _, q in items):   # before the sweeps
        raise SystemExit(f"token_ablation: --confusion: no {args.confusion!r} questions among those drawn")
    batches = make_batches(items, lambda s: s[0], lambda s: s[1].question, params.tokens.eval.batch_images)
    for spec, tokens in configs:
        outputs = Sweeper(lvlm, tokens, seed=params.seed).sweep(batches, plan_runs(tokens), "vqa",
                                                              answer_tokens(lvlm, [a for _, q in items for a in q.answers]))
        table = vqa_table(outputs)
        print(f"== {spec or 'params as given'} ({len(items)} {args.split} questions)")
        print(table.pivot_table(index=["method", "budget"], columns="question_type", values="acc").round(1).to_string())
        if args.by_size:
            sized = vqa_by_size(outputs)
            print(sized.pivot_table(index=["method", "budget"], columns="size", values="acc").round(1).to_string())
            print("questions per size:", dict(zip(sized[sized.method == "full"]["size"], sized[sized.method == "full"]["n"])))
        if args.confusion:
            print(confusion_table(outputs, args.confusion).to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
