"""Prefill cost of every token-compression method at one budget against all tokens.

    python benchmarks/bench_tokens.py [--budget 0.10] [--repeats 5] [--batch 8] [--out outputs/bench/tokens.json]

Loads the stage's LVLM (``outputs/lvlm/model`` or the hub ids of the paper profile) and a
type-stratified batch of test questions, then for ``full`` and each method of ``tokens.methods``
at ``--budget`` measures (``vlmcompress.tokens.timing.measure_prefills``, repeats round-robin):

* prefill latency = time to the first token (vision tower, selection, LM prefill), median of
  ``--repeats`` after one warm-up, and the speedup over all tokens;
* the method's selection + merging time as % of its own prefill time;
* peak memory one prefill allocates beyond the weights.
"""
from __future__ import annotations

import argparse
import dataclasses

import torch

from vlmcompress.api import dataset_root, load_params, lvlm_from_params
from vlmcompress.data.records import load_split
from vlmcompress.io import write_json
from vlmcompress.tokens.sweep import Run, efficiency_table, stratified_questions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=None, help="params file (default: the project's params.yaml)")
    ap.add_argument("--budget", type=float, default=0.10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8, help="questions per prefill")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default=None, help="also write the table as JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    params = load_params(args.params)
    T = params.tokens
    T = dataclasses.replace(T, eval=dataclasses.replace(T.eval, bench_repeats=args.repeats, bench_batch=args.batch))
    lvlm = lvlm_from_params(params)
    lvlm.attn_layer = T.attention_layer
    items = stratified_questions(load_split(dataset_root(), "test"), args.batch, seed=params.seed)
    runs = [Run("full", None)] + [Run(m, args.budget) for m in T.methods if m != "full"]
    table = efficiency_table(lvlm, items, runs, T, seed=params.seed)
    print(f"{len(items)} questions per prefill, median of {args.repeats}, {torch.get_num_threads()} threads, "
          f"device {lvlm.device}")
    print(table.to_string(index=False))
    if args.out:
        write_json(args.out, {"budget": args.budget, "repeats": args.repeats, "batch": args.batch,
                              "rows": table.to_dict(orient="records")})


if __name__ == "__main__":
    main()
