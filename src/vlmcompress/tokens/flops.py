"""Prefill FLOPs of an LLaVA-style LVLM as a pure function of its dimensions.

Convention: one multiply-add = 2 FLOPs (``flops_per_mac``; pass 1 to compare with papers
such as FastV/VisionZip that count MACs). Only matrix products are counted; layer norms,
softmax, activations, biases and the token-compression step itself are ignored (each is
O(T·d), well under 1% here).

Per transformer layer on T tokens of width d, MLP hidden m, key/value width d_kv:

    Q, O projections     2 · 2·T·d·d
    K, V projections     2 · 2·T·d·d_kv
    attention            2·T²·d (Q·Kᵀ) + 2·T²·d (A·V) = 4·T²·d
    MLP                  n_mat · 2·T·d·m   (n_mat = 2 for GELU MLPs, 3 for SwiGLU)

The quadratic term is counted in full even for a causal LM (dense kernels compute the
whole T x T product). Parts:

- vision tower: patch embedding 2·N·(c·p²)·d_v plus L_v layers on N+1 tokens (CLS); a
  convolutional stem (the embedded tower) counts each 3x3 convolution instead,
  2·H_out·W_out·c_out·c_in·k² (``VisionDims.stem``);
- projector (LLaVA-1.5 2-layer MLP): 2·T_p·(d_v·h + h·d_lm), T_p = tokens projected
  (N when tokens are compressed after projection, as in this package; K if before);
- LM prefill: L layers on n_text + K tokens, plus the LM head on the last position
  (2·d·V; prefill only needs the next-token logits); FastV: the first ``agg_layer`` layers
  on n_text + N, the rest on n_text + k;
- text guidance (Recoverable Compression): CLIP's text tower on the question's T_c tokens
  (L_t layers of width d_t, GELU MLP) and its projection (2·d_t·P), plus the patches'
  projection into the joint space, 2·N·d_v·P.

:func:`model_dims` reads all dimensions from an :class:`~vlmcompress.lvlm.adapter.LVLM`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class VisionDims:
    layers: int
    width: int
    mlp_ratio: float = 4.0
    patch_size: int = 14
    channels: int = 3
    cls_token: bool = True
    # Convolutional stem instead of one patch convolution: (c_in, c_out, kernel, stride) per conv.
    stem: tuple[tuple[int, int, int, int], ...] = ()


@dataclass(frozen=True)
class TextDims:
    """CLIP's text tower (for text-guided methods) and the joint-space projections."""

    layers: int
    width: int
    intermediate: int
    proj_dim: int
    vision_width: int


@dataclass(frozen=True)
class ProjectorDims:
    in_dim: int
    hidden: int
    out_dim: int


@dataclass(frozen=True)
class LMDims:
    layers: int
    hidden: int
    intermediate: int
    kv_hidden: int | None = None   # grouped-query attention: heads_kv · head_dim
    vocab: int = 0                 # 0: leave out the LM head
    mlp_matrices: int = 3          # Llama SwiGLU: gate, up, down


# LLaVA-1.5-7B: CLIP ViT-L/14-336 (24 x 1024, MLP 4096, 576 patches), MLP projector, Vicuna-7B.
LLAVA15_7B = (VisionDims(layers=24, width=1024, mlp_ratio=4.0, patch_size=14),
              ProjectorDims(in_dim=1024, hidden=4096, out_dim=4096),
              LMDims(layers=32, hidden=4096, intermediate=11008, vocab=32000))


def linear_flops(tokens: int, d_in: int, d_out: int, flops_per_mac: int = 2) -> float:
    return float(flops_per_mac) * tokens * d_in * d_out


def layer_flops(tokens: int, width: int, mlp_hidden: int, *, mlp_matrices: int = 2,
                kv_width: int | None = None, flops_per_mac: int = 2) -> float:
    """One pre-norm transformer layer on ``tokens`` tokens (formula in the module docstring)."""
    T, d, m = tokens, width, mlp_hidden
    kv = d if kv_width is None else kv_width
    proj = 2 * linear_flops(T, d, d, flops_per_mac) + 2 * linear_flops(T, d, kv, flops_per_mac)
    attn = 2.0 * flops_per_mac * T * T * d
    mlp = mlp_matrices * linear_flops(T, d, m, flops_per_mac)
    return proj + attn + mlp


def stem_flops(n_patches: int, dims: VisionDims, flops_per_mac: int = 2) -> float:
    """Convolutions of a stem on a square image of sqrt(N)·p pixels ('same' padding)."""
    side = math.isqrt(n_patches) * dims.patch_size
    total = 0.0
    for c_in, c_out, k, stride in dims.stem:
        side = -(-side // stride)
        total += float(flops_per_mac) * side * side * c_out * c_in * k * k
    return total


def vision_tower_flops(n_patches: int, dims: VisionDims, flops_per_mac: int = 2) -> float:
    T = n_patches + (1 if dims.cls_token else 0)
    if dims.stem:
        embed = stem_flops(n_patches, dims, flops_per_mac)
    else:
        embed = linear_flops(n_patches, dims.channels * dims.patch_size ** 2, dims.width, flops_per_mac)
    per_layer = layer_flops(T, dims.width, int(round(dims.width * dims.mlp_ratio)),
                            mlp_matrices=2, flops_per_mac=flops_per_mac)
    return embed + dims.layers * per_layer


def projector_flops(tokens: int, dims: ProjectorDims, flops_per_mac: int = 2) -> float:
    return (linear_flops(tokens, dims.in_dim, dims.hidden, flops_per_mac)
            + linear_flops(tokens, dims.hidden, dims.out_dim, flops_per_mac))


def lm_prefill_flops(n_text: int, n_visual: int, dims: LMDims, flops_per_mac: int = 2) -> float:
    per_layer = layer_flops(n_text + n_visual, dims.hidden, dims.intermediate,
                            mlp_matrices=dims.mlp_matrices, kv_width=dims.kv_hidden,
                            flops_per_mac=flops_per_mac)
    return dims.layers * per_layer + linear_flops(1, dims.hidden, dims.vocab, flops_per_mac)


def lm_prefill_flops_fastv(n_text: int, n_visual: int, n_keep: int, agg_layer: int, dims: LMDims,
                           flops_per_mac: int = 2) -> float:
    """FastV: layers < ``agg_layer`` see all ``n_visual`` tokens, the rest only ``n_keep``."""
    if not (0 <= agg_layer <= dims.layers):
        raise ValueError(f"agg_layer: must be in [0, {dims.layers}], got {agg_layer}")
    kw = dict(mlp_matrices=dims.mlp_matrices, kv_width=dims.kv_hidden, flops_per_mac=flops_per_mac)
    early = layer_flops(n_text + n_visual, dims.hidden, dims.intermediate, **kw)
    late = layer_flops(n_text + n_keep, dims.hidden, dims.intermediate, **kw)
    head = linear_flops(1, dims.hidden, dims.vocab, flops_per_mac)
    return agg_layer * early + (dims.layers - agg_layer) * late + head


def text_guidance_flops(n_clip_tokens: int, n_patches: int, dims: TextDims, flops_per_mac: int = 2) -> float:
    """CLIP text tower on the question + its projection + the patches' projection."""
    tower = dims.layers * layer_flops(n_clip_tokens, dims.width, dims.intermediate, mlp_matrices=2,
                                      flops_per_mac=flops_per_mac)
    return (tower + linear_flops(1, dims.width, dims.proj_dim, flops_per_mac)
            + linear_flops(n_patches, dims.vision_width, dims.proj_dim, flops_per_mac))


def prefill_gflops(*, n_patches: int, n_visual: int, n_text: int, vision: VisionDims,
                   projector: ProjectorDims, lm: LMDims, projector_tokens: int | None = None,
                   fastv: tuple[int, int] | None = None, text: TextDims | None = None,
                   n_clip_tokens: int = 0, flops_per_mac: int = 2) -> dict[str, float]:
    """GFLOPs of one prefill: ``{'vision', 'projector', 'lm', 'text', 'total'}``.

    n_patches: N patch tokens of the vision tower; n_visual: K visual tokens given to the
    LM; n_text: text tokens of the prompt; projector_tokens: tokens through the projector
    (default N: this package compresses after projection); fastv: ``(agg_layer, n_keep)``
    when FastV keeps ``n_keep`` of the ``n_visual`` tokens after ``agg_layer`` layers;
    text: CLIP text dims when the method embeds the question (``n_clip_tokens`` tokens).
    """
    for name, v in (("n_patches", n_patches), ("n_visual", n_visual), ("n_text", n_text)):
        if v < 0:
            raise ValueError(f"{name}: must be >= 0, got {v}")
    if fastv is None:
        lm_f = lm_prefill_flops(n_text, n_visual, lm, flops_per_mac)
    else:
        lm_f = lm_prefill_flops_fastv(n_text, n_visual, fastv[1], fastv[0], lm, flops_per_mac)
    parts = {
        "vision": vision_tower_flops(n_patches, vision, flops_per_mac),
        "projector": projector_flops(n_patches if projector_tokens is None else projector_tokens,
                                     projector, flops_per_mac),
        "lm": lm_f,
        "text": text_guidance_flops(n_clip_tokens, n_patches, text, flops_per_mac) if text is not None else 0.0,
    }
    parts["total"] = sum(parts.values())
    return {k: v / 1e9 for k, v in parts.items()}


def model_dims(lvlm) -> tuple[VisionDims, ProjectorDims, LMDims, TextDims]:
    """The dimensions of an :class:`~vlmcompress.lvlm.adapter.LVLM` (any size, either tower)."""
    from torch import nn

    vc = lvlm.llava.config.vision_config
    tc = lvlm.llava.config.text_config
    emb = lvlm.vision_tower.embeddings
    stem = tuple((m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0])
                 for m in getattr(emb, "stem", ()) if isinstance(m, nn.Conv2d))
    # Every tower layer runs (the last one gives the CLS attention), whatever vision_feature_layer.
    vision = VisionDims(layers=vc.num_hidden_layers, width=vc.hidden_size,
                        mlp_ratio=vc.intermediate_size / vc.hidden_size, patch_size=vc.patch_size,
                        channels=vc.num_channels, stem=stem)
    proj = lvlm.projector
    projector = ProjectorDims(proj.linear_1.in_features, proj.linear_1.out_features, proj.linear_2.out_features)
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    lm = LMDims(layers=tc.num_hidden_layers, hidden=tc.hidden_size, intermediate=tc.intermediate_size,
                kv_hidden=tc.num_key_value_heads * head_dim, vocab=tc.vocab_size)
    ct = lvlm.clip.config.text_config
    text = TextDims(layers=ct.num_hidden_layers, width=ct.hidden_size, intermediate=ct.intermediate_size,
                    proj_dim=lvlm.clip.config.projection_dim, vision_width=vc.hidden_size)
    return vision, projector, lm, text
