"""Cost of ``vlmcompress.tokens.attach`` on a stock LlavaForConditionalGeneration of LLaVA-1.5-7B's shape.

    python benchmarks/bench_attach.py [--lm-layers 2] [--budget 0.10] [--repeats 5] [--methods recoverable random]
    python benchmarks/bench_attach.py --selection-only [--methods recoverable divprune cdpruner] [--repeats 20]

Builds llava-1.5-7b-hf's architecture with random weights (CLIP ViT-L/14-336: 24 layers,
1024 wide, 576 patches; the 2-layer projector; a 4096-wide Llama with ``--lm-layers`` of
Vicuna-7B's 32 layers: all 32 do not fit in 24 GiB as float32) and times one prefill
(``model(**inputs)``, the next-token logits) of one image and a ~40-token question, the median
of round-robin repeats after a warm-up:

* ``stock`` — the model without ``attach``;
* ``<method>@1.0`` — attached at budget 1.0: every token kept, so the difference to
  ``stock`` is what ``attach`` itself costs (selection on the whole grid, prompt rebuild);
* ``<method>@<budget>`` — attached at the budget: the saving of a shorter LM prefill.

It also prints the prefill FLOPs of the full 32-layer model at the budget against all tokens
(:func:`vlmcompress.tokens.flops.prefill_gflops`; ``attach`` compresses after the projector
and embeds the question with the LM's own embeddings, so no text tower is counted), and the
share of the measured prefill the method's selection takes (timed inside the hook). Fewer LM
layers than 32 make the LM a smaller part of the prefill, so they overstate every overhead
share. ``--tiny`` runs the same on a miniature model, to check the script in seconds.

``--selection-only`` builds no model: it times ``compress`` alone (what ``attach`` calls per
image) on random :class:`VisualTokens` of LLaVA-1.5's shapes — 576 patches, keys 1024 wide
(the CLIP-L layer), projected tokens 4096 wide, a question cosine per patch — for each method
at ``--budget``, the median of ``--repeats`` after a warm-up.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def build(tiny: bool, lm_layers: int, vocab: int = 1000):
    """A random LlavaForConditionalGeneration of llava-1.5-7b-hf's shape (or a miniature)."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    if tiny:
        vision = CLIPVisionConfig(image_size=56, patch_size=14, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=3, num_attention_heads=2)
        text = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=lm_layers,
                           num_attention_heads=2)
    else:   # config.json of llava-hf/llava-1.5-7b-hf
        vision = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
                                  num_hidden_layers=24, num_attention_heads=16, hidden_act="quick_gelu")
        text = LlamaConfig(vocab_size=vocab, hidden_size=4096, intermediate_size=11008, num_hidden_layers=lm_layers,
                           num_attention_heads=32, max_position_embeddings=4096)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=vocab - 1,
                      vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(cfg).eval()


def inputs(model, n_text: int = 40) -> dict:
    import torch
    vc = model.config.vision_config
    n = (vc.image_size // vc.patch_size) ** 2
    g = torch.Generator().manual_seed(0)
    text = torch.randint(1, model.config.image_token_id - 1, (n_text,), generator=g)
    ids = torch.cat([text[:5], torch.full((n,), model.config.image_token_id), text[5:]])[None]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(1, 3, vc.image_size, vc.image_size, generator=g), "logits_to_keep": 1}


class SelectionTimer:
    """Time spent in the method itself: wraps the ``compress`` that ``attach`` calls."""

    def __init__(self):
        self.seconds = 0.0

    def __enter__(self):
        A = sys.modules["vlmcompress.tokens.hf"]     # the module behind vlmcompress.tokens.attach
        self._module, self._orig = A, A.compress

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return self._orig(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0

        A.compress = timed
        return self

    def __exit__(self, *exc):
        self._module.compress = self._orig


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lm-layers", type=int, default=2, help="Llama layers (Vicuna-7B has 32)")
    ap.add_argument("--budget", type=float, default=0.10)
    ap.add_argument("--methods", nargs="+", default=["recoverable", "random"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--tiny", action="store_true", help="a miniature model (checks the script)")
    ap.add_argument("--selection-only", action="store_true", help="time the methods alone, no model")
    a = ap.parse_args(argv)
    if a.lm_layers < 1 or a.repeats < 1 or not 0 < a.budget <= 1:
        ap.error("--lm-layers and --repeats must be >= 1, --budget in (0, 1]")
    import torch

    from vlmcompress.tokens import TEXT_GUIDED, attach
    from vlmcompress.tokens.flops import LLAVA15_7B, prefill_gflops

    if a.threads:
        torch.set_num_threads(a.threads)
    if a.selection_only:
        return selection_only(a.methods, a.budget, a.repeats, a.tiny)
    model = build(a.tiny, a.lm_layers)
    x = inputs(model)
    n = int((x["input_ids"] == model.config.image_token_id).sum())
    n_text = x["input_ids"].shape[1] - n
    configs = [("stock", None, None)] + [(f"{m}@1.0", m, 1.0) for m in a.methods] + \
              [(f"{m}@{a.budget:g}", m, a.budget) for m in a.methods]
    times: dict[str, list[float]] = {c[0]: [] for c in configs}
    cpu: dict[str, list[float]] = {c[0]: [] for c in configs}
    select: dict[str, float] = {c[0]: 0.0 for c in configs}
    kept: dict[str, int] = {}
    with torch.inference_mode():
        for rep in range(a.repeats + 1):            # the first round is a warm-up
            for label, method, budget in configs:
                kw = {"questions": ["what is in the image ?"], "tokenizer": _Tok()} if method in TEXT_GUIDED else {}
                handle = attach(model, method, budget, **kw) if method else None
                with SelectionTimer() as st:
                    t0, c0 = time.perf_counter(), time.process_time()
                    model(**x)
                    dt, dc = time.perf_counter() - t0, time.process_time() - c0
                if handle is not None:
                    kept[label] = handle.stats["tokens"][0]
                    handle.detach()
                if rep:
                    times[label].append(dt)
                    cpu[label].append(dc)
                    select[label] += st.seconds / a.repeats
    stock = statistics.median(times["stock"])
    print(f"prefill of 1 image ({n} patches) + {n_text} text tokens, LM {a.lm_layers} layers, "
          f"{torch.get_num_threads()} threads, median of {a.repeats}:")
    # Paired: each round's ratio to the stock prefill of the same round (a burst of background
    # load hits neighbours alike), then the median; CPU time is this process's, all its threads.
    print(f"{'config':<22}{'tokens':>8}{'ms':>10}{'vs stock':>10}{'paired':>8}{'cpu ms':>10}{'cpu paired':>11}"
          f"{'selection %':>13}")
    for label, _, _ in configs:
        med = statistics.median(times[label])
        paired = statistics.median(t / s for t, s in zip(times[label], times["stock"]))
        cpu_paired = statistics.median(t / s for t, s in zip(cpu[label], cpu["stock"]))
        print(f"{label:<22}{kept.get(label, n):>8}{1000 * med:>10.1f}{med / stock:>10.3f}{paired:>8.3f}"
              f"{1000 * statistics.median(cpu[label]):>10.1f}{cpu_paired:>11.3f}{100 * select[label] / med:>13.2f}")
    vision, projector, lm = LLAVA15_7B
    k = max(1, int(a.budget * n + 0.5))
    full = prefill_gflops(n_patches=n, n_visual=n, n_text=n_text, vision=vision, projector=projector, lm=lm)
    part = prefill_gflops(n_patches=n, n_visual=k, n_text=n_text, vision=vision, projector=projector, lm=lm)
    print(f"LLaVA-1.5-7B (32 LM layers) prefill at {a.budget:g} ({k} of {n} tokens): "
          f"{part['total']:.0f} of {full['total']:.0f} GFLOPs = {part['total'] / full['total']:.3f} of full")
    return 0


def selection_only(methods: list[str], budget: float, repeats: int, tiny: bool) -> int:
    """Median time of ``compress`` alone per method on one image of LLaVA-1.5's token shapes."""
    import torch

    from vlmcompress.tokens import VisualTokens, compress, resolve_budget

    n, dk, d = (16, 32, 32) if tiny else (576, 1024, 4096)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, n, generator=g)
    vt = VisualTokens(tokens=torch.randn(1, n, d, generator=g), keys=torch.randn(1, n, dk, generator=g),
                      cls_attn=logits.softmax(1), cls_attn_full=(2 * logits).softmax(1),
                      text_sim=0.2 * torch.randn(1, n, generator=g), grid=(int(n ** 0.5),) * 2, text_dim=d)
    k = resolve_budget(n, budget)
    times: dict[str, list[float]] = {m: [] for m in methods}
    kept: dict[str, int] = {}
    with torch.inference_mode():
        for rep in range(repeats + 1):             # round-robin; the first round is a warm-up
            for m in methods:
                t0 = time.perf_counter()
                out = compress(vt, m, budget=budget)
                dt = time.perf_counter() - t0
                kept[m] = int(out.mask.sum())
                if rep:
                    times[m].append(dt)
    print(f"compress alone, 1 image: {n} patches, tokens {d} wide, keys {dk} wide, budget {budget:g} ({k} tokens), "
          f"{torch.get_num_threads()} threads, median of {repeats}:")
    print(f"{'method':<22}{'tokens':>8}{'ms':>10}{'min ms':>10}")
    for m in methods:
        print(f"{m:<22}{kept[m]:>8}{1000 * statistics.median(times[m]):>10.2f}{1000 * min(times[m]):>10.2f}")
    return 0


class _Tok:
    """A word-level stand-in tokenizer: the benchmark's questions are given explicitly."""

    all_special_ids: list[int] = []

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [1 + sum(w.encode()) % 900 for w in text.split()]}


if __name__ == "__main__":
    sys.exit(main())
