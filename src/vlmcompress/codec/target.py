"""The frozen LVLM as the codec's token target: its vision features, and the CLS attention
that weights the low-pass term, computed once per reference image.

Library code shared by the codec stage, the codec CLI and CompressAI's tools; state lives on a
:class:`TowerTarget` instance, never on a function.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


class TowerTarget:
    """``target(x [B,3,H,W] in [0,1]) -> [B, N, Dv]``: the frozen tower's features fed to the projector.

    Differentiable w.r.t. ``x``; the LVLM's own weights are frozen (this instance only), so a
    backward pass through it costs no weight gradients. The tower and projector are moved to
    float32 (this instance): through a half-precision tower most token-loss gradients
    underflow to zero before they reach the pixels. Output: float32 on ``x``'s device.
    A call without gradient (the reference pass on the original) also keeps that image's CLS
    attention, so :meth:`attention` on the same tensor need not run the tower again.
    """

    def __init__(self, lvlm: Any) -> None:
        lvlm.llava.requires_grad_(False)
        lvlm.vision_tower.float()
        lvlm.projector.float()
        lvlm.eval()
        self.lvlm = lvlm
        self._reference: tuple[Tensor, Tensor] | None = None     # (image, its CLS attention [B, N])

    def __call__(self, x: Tensor) -> Tensor:
        feats = self.lvlm.visual_features(x)
        if not torch.is_grad_enabled():
            self._reference = (x, feats.cls_attn.float().to(x.device))
        return feats.hidden.float().to(x.device)

    def attention(self, x: Tensor) -> Tensor:
        """``[B, N]`` CLS attention (head mean) of the adapter's ``attn_layer`` for ``x``: the
        reference pass's when it was on this very tensor, else computed."""
        if self._reference is not None and self._reference[0] is x:
            return self._reference[1]
        with torch.no_grad():
            return self.lvlm.visual_features(x).cls_attn.float().to(x.device)


def lvlm_token_fn(lvlm: Any) -> TowerTarget:
    """The codec's token target for ``lvlm`` (see :class:`TowerTarget`)."""
    return TowerTarget(lvlm)


def lvlm_attention_fn(lvlm: Any, token_fn: Callable[[Tensor], Tensor] | None = None) -> Callable[[Tensor], Tensor]:
    """``x [B,3,H,W] in [0,1] -> [B, N]``: CLS attention (head mean) of the adapter's
    ``attn_layer``, the saliency the low-pass term's ``attention`` weighting uses; reuses
    ``token_fn``'s reference pass when it is a :class:`TowerTarget`."""
    if isinstance(token_fn, TowerTarget):
        return token_fn.attention

    def attention_fn(x: Tensor) -> Tensor:
        with torch.no_grad():
            return lvlm.visual_features(x).cls_attn.float().to(x.device)
    return attention_fn


def tower_digest(lvlm: Any, projector: bool = False, attention: bool = False) -> str:
    """Fingerprint of what :func:`lvlm_token_fn` computes: the vision tower's weights (names,
    shapes, bytes) and the feature layer it reads. A codec trained against one tower is stale
    for another (its token losses and token fusion were fitted to that tower's features).
    ``projector``: also the projector's weights, for a codec whose token terms are on its
    output (``loss.token_space: projector``); ``attention``: also the layer whose CLS attention
    weights the low-pass term (``loss.lowpass_weighting: attention``)."""
    h = hashlib.sha256(f"layer={lvlm.feature_layer}".encode())
    if attention:
        h.update(f"attn_layer={lvlm.attn_layer}".encode())
    modules = [lvlm.vision_tower] + ([lvlm.projector] if projector else [])
    for name, t in sorted((n, t) for m in modules for n, t in m.state_dict().items()):
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())  # 0-dim: BN counters
    return h.hexdigest()[:16]
