"""Phase bookkeeping: run order, seed streams, what each phase owns, the digests that decide
whether a finished phase is reused, and the progress line."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from vlmcompress.data.config import ScenesParams
from vlmcompress.lvlm.config import LvlmParams

PHASES = ("clip", "text", "align", "lm")                       # run order
PHASE_STREAM = {"clip": 0, "align": 1, "lm": 2, "text": 3}   # seed stream of each phase's batches
# What each phase trains, as (state group, key prefixes): a reused or resumed phase restores
# only these, so it never overwrites what a re-run earlier phase has just produced.
PHASE_OWNS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "clip": (("clip", ("",)), ("heads", ("",)), ("llava", ("model.vision_tower.",))),
    "text": (("clip", ("text_model.", "text_projection.")),),
    "align": (("llava", ("model.multi_modal_projector.",)),),
    "lm": (("llava", ("model.multi_modal_projector.", "model.language_model.", "lm_head.")), ("relation", ("",))),
}
PHASE_INPUTS = {"clip": None, "text": "clip", "align": "clip", "lm": "align"}   # the phase each starts from


def phase_digests(params: LvlmParams, scenes: ScenesParams, seed: int) -> dict[str, str]:
    """Per phase, a hash of everything its result depends on: the shared recipe (seed, scenes,
    architecture, prompts — the vocabulary —, pool, warm-up), its own ``<phase>_*`` params and
    the digest of the phase it starts from."""
    t = dataclasses.asdict(params.train)
    common = {"seed": seed, "scenes": dataclasses.asdict(scenes), "arch": dataclasses.asdict(params.arch),
              "prompts": dataclasses.asdict(params.prompts), "pool": t["pool_scenes"], "warmup": t["warmup_steps"]}
    own = {"clip": {k: v for k, v in t.items() if k.startswith("clip_")},
           "text": {k: v for k, v in t.items() if k.startswith("text_")},
           "align": {k: v for k, v in t.items() if k.startswith("align_")},
           "lm": {k: v for k, v in t.items() if k.startswith(("lm_", "ground_")) or k == "caption_prob"}}
    out: dict[str, str] = {}
    for phase in PHASES:
        parent = PHASE_INPUTS[phase]
        blob = {"common": common, "own": own[phase], "parent": out[parent] if parent else None}
        out[phase] = hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]
    return out


def recipe_digest(params: LvlmParams, scenes: ScenesParams) -> str:
    """What a trained LVLM depends on but the seed: the LM phase's digest (every phase's params,
    the scenes, architecture and prompts) with the seed left out. Runs of one recipe on other
    seeds, CPUs or thread counts share it; the matrix's cells are found by it."""
    return phase_digests(params, scenes, -1)["lm"]


def progress_line(phase: str, steps: int, row: dict[str, Any]) -> str:
    """``[lm] step 400/2000 (20%, 310 s, ~1240 s left) loss=...``: a curve row with where its
    phase stands. ``row`` holds the step and the phase's seconds so far (across resumed runs),
    so the time left extrapolates the phase's own pace."""
    step, secs = int(row["step"]), float(row.get("seconds", 0.0))
    left = f"~{secs / step * (steps - step):.0f} s left" if step > 0 else "time left unknown"
    rest = " ".join(f"{k}={v}" for k, v in row.items() if k not in ("phase", "step", "seconds"))
    return f"[{phase}] step {step}/{steps} ({100 * step // steps}%, {secs:.0f} s, {left}) {rest}".rstrip()
