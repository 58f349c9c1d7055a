"""Attention scores on the vision towers of stock Hugging Face LVLMs, for :func:`~vlmcompress.tokens.hf.attach`.

Kept apart from the architecture families (:mod:`vlmcompress.tokens.hf_archs`) because they
are pure tensor functions of one attention module and its input: testable on a bare module,
with no model, hook or prompt around them.

- :func:`cls_attention`: the CLS row of a CLIP attention layer (LLaVA-1.5, LLaVA-NeXT).
- :func:`received_attention`: the attention each patch receives in a Qwen2-VL vision block
  (no CLS token there).
"""
from __future__ import annotations

import importlib
import math

import torch
import torch.nn as nn
from torch import Tensor


def cls_attention(attn: nn.Module, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """CLS row of one CLIP attention module, from its input ``h [B, 1 + N, Dv]`` (after the
    layer norm): ``(mean over heads [B, N], keys [B, N, C], single-head full width [B, N])``.

    Only the CLS query is formed: O(N), whatever attention implementation the model runs."""
    b, t, _ = h.shape
    nh, hd = attn.num_heads, attn.head_dim
    q = attn.q_proj(h[:, :1]).view(b, 1, nh, hd).transpose(1, 2)              # [B, H, 1, hd]
    k = attn.k_proj(h).view(b, t, nh, hd).transpose(1, 2)                       # [B, H, T, hd]
    w = torch.softmax((q @ k.transpose(-1, -2)).float() * attn.scale, dim=-1)   # [B, H, 1, T]
    kf = k.transpose(1, 2).reshape(b, t, nh * hd)
    qf = q.transpose(1, 2).reshape(b, 1, nh * hd)
    full = torch.softmax((qf @ kf.transpose(1, 2)).float() / math.sqrt(nh * hd), dim=-1)
    return w[:, :, 0, 1:].mean(1), kf[:, 1:], full[:, 0, 1:]


def _received(q: Tensor, k: Tensor, scale: float, budget: int = 1 << 25) -> Tensor:
    """Mean softmax attention each key receives: q, k ``[H, S, d]`` -> ``[S]`` (sums to 1).
    Queries go in chunks of about ``budget`` attention weights, so memory stays bounded for
    images of many thousand patches."""
    H, S, _ = q.shape
    chunk = max(1, budget // (H * S))
    out = q.new_zeros(S, dtype=torch.float32)
    kt = k.float().transpose(-1, -2)
    for a in range(0, S, chunk):
        out += torch.softmax((q[:, a:a + chunk].float() @ kt) * scale, dim=-1).sum(dim=(0, 1))
    return out / (H * S)


def received_attention(attn: nn.Module, h: Tensor, cos: Tensor, sin: Tensor,
                       cu_seqlens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Attention each patch receives in one Qwen2-VL vision attention module, from its input
    ``h [S, Dv]`` (all images' patches, after the norm) and the rotary ``cos, sin [S, hd]``:
    ``(mean over heads and queries [S], keys [S, C], single-head full width [S])``, each
    image (``cu_seqlens`` segment) on its own. Keys are taken before the rotary embedding so
    merge similarity compares content, not position."""
    S = h.shape[0]
    nh = attn.num_heads
    q, k, _ = attn.qkv(h).reshape(S, 3, nh, -1).permute(1, 0, 2, 3).unbind(0)   # [S, H, hd]
    keys = k.reshape(S, -1)
    rotate = importlib.import_module(type(attn).__module__).apply_rotary_pos_emb_vision
    q, k = rotate(q, k, cos, sin)
    mean, full = [], []
    bounds = cu_seqlens.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        qs, ks = q[a:b].transpose(0, 1), k[a:b].transpose(0, 1)                  # [H, n, hd]
        mean.append(_received(qs, ks, attn.scaling))
        qf, kf = q[a:b].reshape(1, b - a, -1), k[a:b].reshape(1, b - a, -1)     # [1, n, C]
        full.append(_received(qf, kf, 1.0 / math.sqrt(qf.shape[-1])))
    return torch.cat(mean), keys, torch.cat(full)
