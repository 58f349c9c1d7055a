"""Prefill cost of token compression at LLaVA-1.5's proportions, on a random-weight model.

    python benchmarks/bench_tokens_scale.py [--lm-layers 8] [--budget 0.10] [--repeats 3] [--batch 1]
                                            [--shape llava15|tiny]

The embedded model's three parts are all about the same small size, so CLIP's text tower,
which text-guided recovery runs on every question, costs a good share of its prefill.
LLaVA-1.5-7B has other proportions: CLIP ViT-L/14-336 (24 layers, 1024 wide, 576 patches),
CLIP-L's text tower (12 layers, 768 wide) and a 32-layer, 4096-wide Llama. This builds that
shape with random weights (vocabulary: the scenes' words), with ``--lm-layers`` of the LM's
layers (all 32 do not fit in 24 GiB as float32; each further layer only adds to the prefill,
so fewer layers overstate the overhead). It saves the model, loads it back through the paper
profile's loader (:func:`vlmcompress.lvlm.load.load_lvlm`) and times ``full`` against each
method of ``--methods`` at ``--budget`` on scenes test questions
(:func:`vlmcompress.tokens.sweep.efficiency_table`: median of round-robin repeats after a
warm-up). Only time is measured: a random model's answers mean nothing. ``--shape tiny`` is
the same structure in miniature, to check the script itself in seconds.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

# llava-1.5-7b-hf's shapes (config.json of the hub model and of openai/clip-vit-large-patch14-336).
LLAVA15 = dict(image_size=336, patch_size=14, stem_layers=0, vision_hidden=1024, vision_layers=24,
               vision_heads=16, text_hidden=768, text_layers=12, text_heads=12, text_max_len=77,
               projection_dim=768, lm_hidden=4096, lm_heads=32, lm_intermediate=11008,
               vision_feature_layer=-2, hidden_act="quick_gelu")
TINY = dict(LLAVA15, image_size=56, vision_hidden=32, vision_layers=3, vision_heads=2, text_hidden=32,
            text_layers=2, text_heads=2, projection_dim=16, lm_hidden=32, lm_heads=2, lm_intermediate=64)
SHAPES = {"llava15": LLAVA15, "tiny": TINY}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=None, help="params file (default: the project's params.yaml)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llava15")
    ap.add_argument("--lm-layers", type=int, default=8, help="Llama layers (Vicuna-7B has 32)")
    ap.add_argument("--budget", type=float, default=0.10)
    ap.add_argument("--methods", nargs="+", default=["random", "recoverable", "fastv"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1, help="questions per prefill")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default=None, help="also write the table as JSON here")
    a = ap.parse_args(argv)
    if a.lm_layers < 1 or a.repeats < 1 or a.batch < 1:
        ap.error("--lm-layers, --repeats and --batch must be >= 1")
    import torch

    from vlmcompress.api import dataset_root
    from vlmcompress.config import ConfigError, load_params
    from vlmcompress.data.records import load_split
    from vlmcompress.io import write_json
    from vlmcompress.lvlm.build import ModelSpec, build_clip, build_llava, count_params, save_lvlm
    from vlmcompress.lvlm.load import load_lvlm
    from vlmcompress.lvlm.adapter import Prompts
    from vlmcompress.lvlm.tokenizer import build_tokenizers
    from vlmcompress.lvlm.pool import scene_vocab
    from vlmcompress.tokens.config import METHOD_PARAMS
    from vlmcompress.tokens.sweep import Run, efficiency_table, stratified_questions

    if a.threads:
        torch.set_num_threads(a.threads)
    unknown = [m for m in a.methods if m not in METHOD_PARAMS or m == "full"]
    if unknown:
        ap.error(f"unknown method(s) {unknown} (known: {', '.join(sorted(set(METHOD_PARAMS) - {'full'}))})")
    try:
        params = load_params(a.params)
        test = load_split(dataset_root(), "test")
    except (ConfigError, OSError, ValueError) as exc:
        print(f"bench_tokens_scale: {exc}", file=sys.stderr)
        return 1
    T = params.tokens
    T = dataclasses.replace(T, eval=dataclasses.replace(T.eval, bench_repeats=a.repeats, bench_batch=a.batch))
    prompts = Prompts(**dataclasses.asdict(params.lvlm.prompts))

    torch.manual_seed(params.seed)
    spec = ModelSpec(lm_layers=a.lm_layers, **SHAPES[a.shape])
    tok, clip_tok = build_tokenizers(scene_vocab(params.data.scenes, prompts))
    ids = {k: tok.convert_tokens_to_ids(k) for k in ("<pad>", "<s>", "</s>", "<image>")}
    t0 = time.perf_counter()
    clip = build_clip(spec, len(tok), ids["<pad>"], ids["<s>"], ids["</s>"])
    llava = build_llava(spec, clip, len(tok), ids["<image>"], ids["<pad>"], ids["<s>"], ids["</s>"])
    sizes = {"vision": count_params(llava.model.vision_tower), "text": count_params(clip.text_model),
             "lm": count_params(llava.model.language_model)}
    with tempfile.TemporaryDirectory(prefix="vlmc-bench-") as tmp:
        save_lvlm(Path(tmp) / "m", llava, tok, clip, clip_tok)
        del llava, clip
        lvlm = load_lvlm(str(Path(tmp) / "m" / "llava"), str(Path(tmp) / "m" / "clip"), prompts=prompts,
                         attn_layer=T.attention_layer)
    print(f"built and loaded in {time.perf_counter() - t0:.0f} s: vision {sizes['vision'] / 1e6:.0f}M, "
          f"text {sizes['text'] / 1e6:.0f}M, LM {sizes['lm'] / 1e6:.0f}M parameters "
          f"({a.lm_layers} LM layers); {lvlm.grid[0] * lvlm.grid[1]} visual tokens", flush=True)
    items = stratified_questions(test, a.batch, seed=params.seed)
    runs = [Run("full", None)] + [Run(m, a.budget) for m in a.methods]
    table = efficiency_table(lvlm, items, runs, T, seed=params.seed)
    print(f"{a.batch} question(s) per prefill, median of {a.repeats}, {torch.get_num_threads()} threads")
    print(table.to_string(index=False))
    if a.out:
        write_json(a.out, {"shape": a.shape, "lm_layers": a.lm_layers, "budget": a.budget, "repeats": a.repeats, "batch": a.batch,
                           "params_m": {k: round(v / 1e6, 1) for k, v in sizes.items()},
                           "rows": table.to_dict(orient="records")})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
