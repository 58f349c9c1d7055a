"""Wall time of the tokens stage's runs two ways, on a random model of the embedded LVLM's shape.

    python benchmarks/bench_stage_attach.py [--images 10] [--per-image 3] [--new-tokens 3] [--repeats 3]

* ``adapter`` — what ``tokens.sweep.Sweeper`` does: per batch of images one vision-tower pass,
  then every run through ``LVLM.generate_from_features`` (one compression and one prefix
  prefill per image unless the method reads the question);
* ``attach`` — every run through ``vlmcompress.tokens.attach`` and the stock model's own
  ``generate``: one image per prompt (the stock model encodes the image of every prompt), the
  compression inside the forward hook.

The same images, questions, methods and budget both ways; decoding is forced to
``--new-tokens`` tokens (EOS ignored) so both decode the same number of steps. Prints the
median over ``--repeats`` of each, and their ratio.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

RUNS = (("full", None), ("random", 0.1), ("prumerge", 0.1), ("visionzip", 0.1), ("recoverable", 0.1))
WORDS = ("user assistant : what color is the circle square triangle red blue green small large a of there how "
         "many answer question using single word or phrase left right above below").split()


def build():
    import torch
    import yaml

    from vlmcompress.lvlm.adapter import LVLM, Prompts
    from vlmcompress.lvlm.build import ModelSpec, build_clip, build_llava
    from vlmcompress.lvlm.tokenizer import build_tokenizers, build_vocab

    arch = yaml.safe_load((ROOT / "params.yaml").read_text())["lvlm"]["arch"]
    spec = ModelSpec(**{k: v for k, v in arch.items() if k in {f.name for f in dataclasses.fields(ModelSpec)}})
    torch.manual_seed(0)
    vocab = build_vocab(WORDS, ["?", ".", ",", "\n"])
    tok, clip_tok = build_tokenizers(vocab)
    ids = {k: tok.convert_tokens_to_ids(k) for k in ("<pad>", "<s>", "</s>", "<image>")}
    clip = build_clip(spec, len(vocab), ids["<pad>"], ids["<s>"], ids["</s>"])
    llava = build_llava(spec, clip, len(vocab), ids["<image>"], ids["<pad>"], ids["<s>"], ids["</s>"]).eval()
    clip.vision_model = None
    lvlm = LVLM(llava, tok, clip.eval(), clip_tok, prompts=Prompts()).eval()
    lvlm.eos_ids = set()                   # decode exactly --new-tokens tokens
    return lvlm


def hf_inputs(lvlm, texts, pixels):
    """Left-padded stock prompts with N image placeholders each, and one image row per prompt."""
    import torch
    n = lvlm.grid[0] * lvlm.grid[1]
    image_id = lvlm.llava.config.image_token_id
    seqs = [pre + [image_id] * n + post for pre, post in lvlm._prompt_ids("vqa", texts)]
    L = max(map(len, seqs))
    ids = torch.full((len(seqs), L), lvlm.tokenizer.pad_token_id)
    mask = torch.zeros(len(seqs), L, dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, L - len(s):] = torch.tensor(s)
        mask[r, L - len(s):] = 1
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def main() -> None:
    import torch

    from vlmcompress.config import load_params
    from vlmcompress.tokens import attach
    from vlmcompress.tokens.patch import TextEmbeddingCache, make_transform

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=10)
    ap.add_argument("--per-image", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    lvlm = build()
    T = load_params(ROOT / "params.yaml").tokens
    g = torch.Generator().manual_seed(0)
    images = torch.rand(args.images, 3, lvlm.image_size, lvlm.image_size, generator=g)
    qs = ["what color is the circle ?", "how many red square are there ?", "is the triangle left of the circle ?"]
    index = [i for i in range(args.images) for _ in range(args.per_image)]
    texts = [qs[k % len(qs)] for k in range(len(index))]
    pixels = lvlm.preprocess(images)[index]

    def adapter() -> None:
        cache = TextEmbeddingCache(lvlm)
        feats = lvlm.visual_features(images)
        for method, budget in RUNS:
            tr = make_transform(lvlm, method, budget, T, text_encoder=cache)
            lvlm.generate_from_features(feats, texts, transform=tr, max_new_tokens=args.new_tokens, image_index=index)

    def stock() -> None:
        inputs = hf_inputs(lvlm, texts, pixels)
        model = lvlm.llava
        for method, budget in RUNS:
            kw = T.method_params(method)
            kw.pop("text_pooling", None)
            with attach(model, method, 1.0 if method == "full" else budget, tokenizer=lvlm.tokenizer,
                        questions=texts, **({} if method == "full" else kw)):
                model.generate(**inputs, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                               do_sample=False, pad_token_id=lvlm.tokenizer.pad_token_id)

    times: dict[str, list[float]] = {"adapter": [], "attach": []}
    adapter(), stock()                                       # warm-up
    for _ in range(args.repeats):
        for name, fn in (("adapter", adapter), ("attach", stock)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    a, b = statistics.median(times["adapter"]), statistics.median(times["attach"])
    print(f"{args.images} images x {args.per_image} questions, {len(RUNS)} runs, {args.new_tokens} new tokens, "
          f"median of {args.repeats}: adapter {a:.3f} s, attach + generate {b:.3f} s, ratio {b / a:.2f}")


if __name__ == "__main__":
    main()
