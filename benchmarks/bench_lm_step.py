"""Seconds per phase-C step of the embedded LVLM recipe, for recipe variants, same machine, same run.

    python benchmarks/bench_lm_step.py [--params params.yaml] [--scales 1.0 0.0] [--turns 10]
        [--looks off on] [--attn sdpa eager] [--steps 12] [--warmup 2] [--at 0.9] [--pool 400]
        [--threads 2] [--profile]

Times one LM step (forward over the packed sequences, backward, AdamW) with the projector
trained at each ``--scales`` value (``lm_projector_lr_scale``; 0 = frozen) and each ``--turns``
value (``lm_turns``), at ``--at`` of phase C, i.e. past the visual-token ramp when ``--at`` >=
``lm_bg_ramp`` (all 256 tokens), with the look losses ``--looks`` off (the params' own) or on
(``LOOKS``: the coordinate tokens on the shape word, the shape word on the object, one head
each), and the LM's attention kernel ``--attn`` (default: transformers' choice; the look
losses recompute their rows either way, so ``eager`` is what they cost when read from the
layer's full attention weights). Step cost does not depend on trained weights, so the model is
freshly initialised and nothing is read from ``outputs/``. Each figure is the median over
``--steps`` steps after ``--warmup`` (the first step also computes the pool's tower features);
variants run one after another in the same process. ``--profile`` prints the torch profiler's
top operators of one more step of the last variant.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from typing import Any

import torch

from vlmcompress.config import ConfigError, load_params
from vlmcompress.lvlm.pool import build_pool
from vlmcompress.lvlm.train import Trainer


LOOKS = dict(lm_look_weight=0.5, lm_look_on="ground_word", lm_look_layer=2, lm_look_heads=1, lm_hop_weight=0.5,
             lm_hop_layer=1, lm_hop_heads=1, lm_look_start=0.0)


def time_steps(params, scenes, pool, scale: float, turns: int, steps: int, warmup: int, at: float,
               work: str, prof: Any = None, looks: bool = False, attn: str | None = None) -> list[float]:
    """Wall seconds of the ``steps`` phase-C steps after ``warmup`` ones, fresh model; ``prof``
    (a torch profiler, not yet entered) records the timed steps only."""
    t = dataclasses.replace(params.train, lm_projector_lr_scale=scale, lm_turns=turns, **(LOOKS if looks else {}))
    trainer = Trainer(dataclasses.replace(params, train=t), scenes, work, seed=0, log=lambda m: None)
    if attn is not None:
        trainer.llava.set_attn_implementation(attn)   # transformers' own switch (every sub-model)
    proj = trainer.projector
    proj.requires_grad_(scale > 0)            # the optimiser groups of Trainer.run's phase C
    groups = ([{"params": trainer.lm_parameters}]
              + ([{"params": list(proj.parameters()), "lr": t.lm_lr * scale}] if scale > 0 else []))
    opt = torch.optim.AdamW(groups, lr=t.lm_lr)
    step_fn = trainer._lm_step(pool)
    trainer.llava.train()
    first = int(at * t.lm_steps)
    out = []
    for i in range(warmup + steps):
        if i == warmup and prof is not None:
            prof.__enter__()
        t0 = time.perf_counter()
        loss, _ = step_fn(trainer._rng("lm", first + i), first + i)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        out.append(time.perf_counter() - t0)
    if prof is not None:
        prof.__exit__(None, None, None)
    return out[warmup:]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=None)
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.0])
    ap.add_argument("--turns", type=int, nargs="+", default=None, help="lm_turns values (default: the params')")
    ap.add_argument("--looks", nargs="+", choices=["off", "on"], default=["off"],
                    help="look losses off (the params') or on (LOOKS)")
    ap.add_argument("--attn", nargs="+", choices=["sdpa", "eager"], default=[None],
                    help="the LM's attention kernel (default: transformers' choice)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--at", type=float, default=0.9, help="fraction of phase C the steps are taken at")
    ap.add_argument("--pool", type=int, default=400, help="scenes in the pool the batches are drawn from")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args(argv)
    if a.steps < 1 or a.warmup < 1 or a.pool < 1:
        ap.error("--steps, --warmup and --pool must be >= 1 (the first step computes the pool's features)")
    if min(a.scales) < 0:
        ap.error("--scales must be >= 0 (0 freezes the projector)")
    try:
        P = load_params(a.params)
    except ConfigError as exc:
        ap.error(str(exc))
    # The Trainer sets torch's thread count from the params: --threads goes there.
    L = dataclasses.replace(P.lvlm, train=dataclasses.replace(P.lvlm.train, pool_scenes=a.pool, threads=a.threads))
    if a.pool < L.train.lm_batch:
        ap.error(f"--pool must be >= lvlm.train.lm_batch ({L.train.lm_batch})")
    torch.set_num_threads(a.threads)
    pool = build_pool(P.data.scenes, a.pool, L.arch.patch_size)
    turns = a.turns or [L.train.lm_turns]
    print(f"phase-C step at {a.at:.0%} of {L.train.lm_steps} steps, batch {L.train.lm_batch}, "
          f"{a.threads} threads; median of {a.steps} after {a.warmup} warm-up")
    with tempfile.TemporaryDirectory() as work:
        for turn in turns:
            for scale in a.scales:
                for look in a.looks:
                    for attn in a.attn:
                        ts = time_steps(L, P.data.scenes, pool, scale, turn, a.steps, a.warmup, a.at, work,
                                        looks=look == "on", attn=attn)
                        print(f"lm_turns {turn:3d}  lm_projector_lr_scale {scale:g}  looks {look:3s}  "
                              f"attn {attn or 'default':7s}: median {statistics.median(ts):.3f} s/step "
                              f"(min {min(ts):.3f}, max {max(ts):.3f})")
        if a.profile:
            from torch.profiler import profile
            prof = profile()
            time_steps(L, P.data.scenes, pool, a.scales[-1], turns[-1], 1, 1, a.at, work, prof)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
