"""Token compression on a stock Hugging Face LVLM, through its own ``generate`` and ``forward``.

::

    handle = vlmcompress.tokens.attach(model, method="recoverable", budget=0.1, tokenizer=processor.tokenizer)
    out = model.generate(**processor(images=image, text=prompt, return_tensors="pt"), max_new_tokens=20)
    handle.stats          # {"tokens": [LM tokens per image of the last call], "total": [placeholders
                          #  per image], "calls": n}
    handle.detach()       # or: with vlmcompress.tokens.attach(...): ...

One forward pre-hook on the model's inner multimodal module (this instance only, nothing on
a class) replaces the prompt before the language model sees it: each image's placeholder
tokens become the method's kept tokens (:mod:`vlmcompress.tokens.methods`), each row is
re-padded on the side it was padded on, and the attention mask and position ids follow.
While ``generate`` decodes from the cache that prefill filled, the hook maps its attention
mask and position ids (laid out for the uncompressed prompt) onto the compressed one, so
decoding with the KV cache equals decoding without it, and a batch equals its rows one by
one. Images are compressed one :class:`VisualTokens` per image, grouped by token count, so
images of one call may have different numbers of tokens.

Text guidance (``recoverable`` and other methods that read ``text_sim``): the question is the
user turn that holds the image, read from the prompt's ids — after the user marker (e.g.
``USER:``), without the image tokens, up to the assistant marker (e.g. ``ASSISTANT:``) — so
neither a system prompt nor the template reaches the text encoder; or ``questions=[...]``
given explicitly. The markers come from ``tokenizer`` (a tokenizer or processor). These
models have no CLIP text tower, so the question is embedded with the LM's own input
embeddings (mean over its tokens) and compared by cosine with the projected visual tokens,
which live in the same space. So ``text_pooling`` other than ``eos`` (a CLIP text tower's) is
refused, and ``text_weight: null`` reads P as the LM's embedding width. Given ``clip=`` (the
CLIP model whose vision side the LLaVA-1.5 tower is) the question goes through CLIP's text
tower and is compared with the patches in CLIP's joint space, by the same functions the
tokens stage uses (:func:`vlmcompress.lvlm.adapter.clip_text_embeddings`,
:func:`~vlmcompress.lvlm.adapter.clip_patch_embeddings`). ``merge_space: vision``
merges the projector's input (recorded by a hook on this instance's projector) and projects
the result, on the LLaVA families; Qwen2-VL refuses it.

Supported (one family class each, :data:`FAMILIES`):

- ``LlavaForConditionalGeneration`` (llava-1.5): CLIP patch tokens of one 24 x 24 grid, ranked
  by the CLS attention of the vision layer the features come from.
- ``LlavaNextForConditionalGeneration``: see :class:`_LlavaNext` (anyres tiles packed into one
  sequence per image; newline tokens kept as row ends; no single grid).
- ``Qwen2VLForConditionalGeneration`` and ``Qwen2_5_VLForConditionalGeneration``: see
  :class:`_Qwen2VL` (merged 2 x 2 patch tokens; no CLS token, the attention each token
  receives stands in; kept tokens keep their original M-RoPE positions).

Another architecture is refused with a one-line error naming its class.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from vlmcompress.lvlm.adapter import clip_patch_embeddings, clip_text_embeddings
from vlmcompress.tokens.config import METHOD_PARAMS, TEXT_GUIDED
from vlmcompress.tokens.methods import compress, get_method
from vlmcompress.tokens.types import KIND_PAD, Compressed, VisualTokens


@dataclasses.dataclass
class _Prompt:
    """What prefill changed, for mapping the decoding steps of the same ``generate`` call."""

    cache: Any                 # the KV cache object prefill filled
    orig_len: int              # prompt length as generate laid it out (L)
    new_mask: Tensor           # [B, L'] attention mask of the compressed prompt
    removed: Tensor            # [B] tokens removed from each row
    rope_shift: Tensor | None  # [B] M-RoPE position minus compressed sequence position after the prompt
    keep_positions: bool = False  # 1-D positions of the uncompressed prompt (grid_positions)


@dataclasses.dataclass
class _Image:
    """One image of a call: its tokens for the method and how many placeholders it fills."""

    vt: VisualTokens           # batch of one
    slots: int                 # placeholder tokens of this image in the prompt
    layout: Any = None         # family data that :meth:`_Family.place` needs
    patches: Tensor | None = None  # [1, N, P] patches in CLIP's joint space (clip= guidance)


class _Removable:
    """A hook-like handle that undoes an instance attribute set by :func:`_wrap_method`."""

    def __init__(self, obj: Any, name: str, wrapper: Callable):
        self.obj, self.name, self.wrapper = obj, name, wrapper

    def remove(self) -> None:
        if self.obj.__dict__.get(self.name) is self.wrapper:
            del self.obj.__dict__[self.name]


def _wrap_method(obj: Any, name: str, before: Callable[[tuple, dict], None]) -> _Removable:
    """Call ``before(args, kwargs)`` ahead of ``obj.name`` on this instance only; keeps the
    signature (``generate`` picks the encoder's arguments by it)."""
    original = getattr(obj, name)

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        before(args, kwargs)
        return original(*args, **kwargs)

    obj.__dict__[name] = wrapper
    return _Removable(obj, name, wrapper)


# --- vision attention scores ------------------------------------------------------------

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


# --- families -----------------------------------------------------------------------------

class _Family:
    """What the handle needs from one architecture. ``images`` turns one call's inputs into
    per-image :class:`_Image` records, ``place`` turns a method's output for one image into the
    embeddings that fill its placeholders, ``rope`` gives M-RoPE positions when the LM has them."""

    markers: tuple[tuple[str, str], ...] = (("USER:", "ASSISTANT:"),)
    single_grid = True          # the image's tokens form one row-major grid (pool, peaks)
    # Why merging before the projector (merge_space 'vision') cannot apply; None: it can.
    no_vision_merge: str | None = "its projector is not known to map one vision feature per token"
    # Why CLIP text guidance (clip=) cannot apply; None: it can.
    no_clip_guidance: str | None = "its vision tower is not a CLIP tower with one CLS grid per image"

    def __init__(self, model: nn.Module, attn_layer: int | None):
        self.model = model
        self.clip: Any = None               # a CLIPModel sharing the vision tower: CLIP text guidance
        self.inner = model.model
        self.name = type(model).__name__
        self.image_token_id: int = model.config.image_token_id
        self.skip_ids: set[int] = set()     # template tokens that are never part of the question
        self.vision_merge = False           # record the projector's input (merge_space 'vision')

    def hooks(self) -> list[Any]:
        """Handles (with ``remove()``) of the hooks that record what the method needs."""
        return []

    def reset(self) -> None:
        """Forget what the hooks recorded."""

    def images(self, kw: dict) -> list[_Image]:
        raise NotImplementedError

    def place(self, image: _Image, out: Compressed) -> tuple[Tensor, Tensor]:
        """Embeddings for one image's placeholders from its method output ``out`` (batch of one):
        ``(tokens [K, D], slot [K] long)``, ``slot`` = the placeholder each token stands at (its
        own for a kept token, its centre's for a merged one)."""
        m = out.mask[0]
        return out.tokens[0][m], out.position[0][m]

    def rope(self, kw: dict, ids: Tensor, mask: Tensor) -> Tensor | None:
        """``[3, B, L]`` M-RoPE positions of the uncompressed prompt, or None (1-D positions)."""
        return None

    def embed(self, ids: Tensor) -> Tensor:
        return self.inner.get_input_embeddings()(ids)

    def encoder_output(self, kw: dict) -> Any:
        return (kw.get("mm_encoder_outputs") or {}).get("image")


class _Llava(_Family):
    """LLaVA-1.5 plumbing: the projected patch tokens the model itself computed, and the CLS
    attention and keys of the vision layer that produced them; for ``merge_space: vision``,
    the projector's input (the feature layer's patch features) and the projector."""

    no_vision_merge = None
    no_clip_guidance = None

    def __init__(self, model: nn.Module, attn_layer: int | None):
        super().__init__(model, attn_layer)
        cfg = model.config
        if not isinstance(cfg.vision_feature_layer, int):
            raise ValueError(f"{self.name}: several vision feature layers are not supported")
        if cfg.vision_feature_select_strategy != "default":
            raise ValueError(f"{self.name}: needs a CLS token (vision_feature_select_strategy "
                             f"'default'), got {cfg.vision_feature_select_strategy!r}")
        tower = self.inner.vision_tower
        self.layers = getattr(tower, "vision_model", tower).encoder.layers
        n_layers = len(self.layers)
        f = cfg.vision_feature_layer
        # The features are hidden_states[f], the output of layers[f] (f < 0) or layers[f - 1].
        self.attn_layer = (attn_layer if attn_layer is not None else (f if f < 0 else f - 1)) % n_layers
        self.side = cfg.vision_config.image_size // cfg.vision_config.patch_size
        self.captured: tuple[Tensor, Tensor, Tensor] | None = None
        self.features: Tensor | None = None     # [T, n, Dv] the projector's last input
        self.last_hidden: Tensor | None = None  # [T, 1 + n, Dv] the tower's last layer (clip= guidance)

    def hooks(self) -> list[Any]:
        """Record the CLS attention of ``attn_layer`` whenever the tower runs (a hook on this
        instance's module): ``generate`` encodes the images before the prefill forward. With
        ``vision_merge``, also the projector's input; with ``clip``, the tower's last layer."""

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self.captured = cls_attention(module, kwargs.get("hidden_states", args[0] if args else None))

        def projector(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self.features = kwargs.get("image_features", args[0] if args else None)

        def tower(module: nn.Module, args: tuple, output: Any) -> None:
            self.last_hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

        handles = [self.layers[self.attn_layer].self_attn.register_forward_pre_hook(hook, with_kwargs=True)]
        if self.vision_merge:
            handles.append(self.inner.multi_modal_projector.register_forward_pre_hook(projector, with_kwargs=True))
        if self.clip is not None:
            handles.append(self.inner.vision_tower.register_forward_hook(tower))
        return handles

    def reset(self) -> None:
        self.captured = None
        self.features = None
        self.last_hidden = None

    def _take_patches(self, tiles: int) -> Tensor | None:
        """``[T, n, P]`` the last tower run's patches in CLIP's joint space (None without ``clip``)."""
        if self.clip is None:
            return None
        if self.last_hidden is None or self.last_hidden.shape[0] != tiles:
            raise RuntimeError("attach: the vision tower's last layer was not recorded for these images")
        out, self.last_hidden = self.last_hidden, None
        return clip_patch_embeddings(self.clip, self.inner.vision_tower, out)

    def _take_features(self, tiles: int) -> tuple[Tensor | None, Any]:
        """``(features [T, n, Dv], projector)`` of the last tower run, or ``(None, None)`` without
        ``vision_merge``."""
        if not self.vision_merge:
            return None, None
        if self.features is None or self.features.shape[0] != tiles:
            raise RuntimeError("attach: the projector's input was not recorded for these images")
        out, self.features = self.features, None
        return out, self.inner.multi_modal_projector

    def _take_captured(self, tiles: int) -> tuple[Tensor, Tensor, Tensor]:
        """The recorded ``(cls [T, n], keys [T, n, C], full [T, n])`` of the last tower run."""
        if self.captured is None or self.captured[0].shape[0] != tiles:
            raise RuntimeError("attach: the vision tower's attention was not recorded for these images")
        out, self.captured = self.captured, None
        return out

    def images(self, kw: dict) -> list[_Image]:
        """One :class:`_Image` per image, from the encoder outputs ``generate`` computed
        (``mm_encoder_outputs``) or from ``pixel_values``."""
        enc = self.encoder_output(kw)
        if enc is None:
            enc = self.inner.get_image_features(pixel_values=kw["pixel_values"], return_dict=True)
        tokens = torch.stack(list(enc.pooler_output))                              # [I, N, D]
        cls, keys, full = self._take_captured(tokens.shape[0])
        hidden, project = self._take_features(tokens.shape[0])
        patches = self._take_patches(tokens.shape[0])
        vt = VisualTokens(tokens=tokens, keys=keys, cls_attn=cls, cls_attn_full=full, grid=(self.side, self.side),
                          hidden=hidden, project=project)
        return [_Image(vt.select([i]), tokens.shape[1], patches=None if patches is None else patches[i:i + 1])
                for i in range(tokens.shape[0])]


class _LlavaNext(_Llava):
    """LLaVA-NeXT (anyres): each image is a base tile plus a grid of high-res tiles; the model
    packs them (``pack_image_features``) into ``base (s·s) + H'·(W' + 1)`` tokens: the base
    tile row-major, then the unpadded high-res grid row-major with an ``image_newline`` token
    closing each row.

    - The method sees one image at a time: its ``N = s·s + H'·W'`` patch tokens in packed order
      (newlines left out), as one set with ``grid = (1, N)``. There is no single grid, so
      methods that need the grid's shape (``pool``, ``recovery_peaks``) are refused; evenly
      spread choices (``prumerge_plus``, ``recoverable_spread`` without peaks) spread along the
      packed order, so over the base tile and the high-res grid in proportion to their sizes.
    - CLS attention: every tile runs through the tower; each packed token gets the CLS
      attention (and key) of the tile and patch it came from. The map from packed token to
      tile patch is the model's own ``pack_image_features`` applied to patch indices, so it
      follows the model's tiling and unpadding exactly. Tiles' scores are each a softmax over
      the tile, so they are on one scale.
    - Newlines are layout markers, not content: a high-res row that keeps at least one patch
      token keeps its newline, right after its last kept token; rows that lose every token
      lose it too. Merged and global tokens follow, as for LLaVA-1.5. So the budget counts
      patch tokens; the LM sees at most one newline more per kept row, and ``full`` (or budget
      1.0) gives back the model's exact sequence.
    """

    markers = (("USER:", "ASSISTANT:"), ("[INST]", "[/INST]"))
    single_grid = False
    no_clip_guidance = "each image is several tiles, not one CLS grid"

    def __init__(self, model: nn.Module, attn_layer: int | None):
        super().__init__(model, attn_layer)
        self.image_sizes: Tensor | None = None

    def hooks(self) -> list[Any]:
        # generate pops image_sizes before the prefill forward, so it is read where the images
        # are encoded (this instance's get_image_features; a module hook never sees it).
        def record(args: tuple, kwargs: dict) -> None:
            self.image_sizes = kwargs.get("image_sizes", args[1] if len(args) > 1 else None)

        return super().hooks() + [_wrap_method(self.inner, "get_image_features", record)]

    def reset(self) -> None:
        super().reset()
        self.image_sizes = None

    def _tile_counts(self, sizes: Tensor) -> list[int]:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches
        cfg = self.model.config
        return [image_size_to_num_patches(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
                for s in sizes]

    def packed_index(self, sizes: Tensor) -> list[Tensor]:
        """Per image ``[P]`` long: for each packed token, the flat index ``tile · n + patch`` over
        all tiles of the call (tiles in tower order), or -1 for a newline token."""
        n = self.side * self.side
        counts = self._tile_counts(sizes)
        idx = torch.arange(sum(counts) * n, dtype=torch.float64).view(-1, n, 1)
        per_image = list(torch.split(idx, counts))
        packed, _ = self.inner.pack_image_features(per_image, sizes, "default",
                                                  image_newline=torch.tensor([-1.0], dtype=torch.float64))
        return [p[:, 0].long() for p in packed]

    def images(self, kw: dict) -> list[_Image]:
        enc = self.encoder_output(kw)
        if enc is None:
            enc = self.inner.get_image_features(pixel_values=kw["pixel_values"], image_sizes=kw["image_sizes"],
                                                return_dict=True)
        sizes, self.image_sizes = (self.image_sizes if self.image_sizes is not None else kw.get("image_sizes")), None
        if sizes is None:
            raise RuntimeError("attach: the image sizes of these images were not recorded")
        index = self.packed_index(sizes.cpu())
        tiles = sum(self._tile_counts(sizes.cpu()))
        cls, keys, full = self._take_captured(tiles)
        cls, keys, full = cls.flatten(), keys.flatten(0, 1), full.flatten()
        features, project = self._take_features(tiles)
        features = None if features is None else features.flatten(0, 1)           # [T·n, Dv]
        out = []
        for packed, where in zip(enc.pooler_output, index):
            where = where.to(packed.device)
            patch = where >= 0
            src = where[patch]
            vt = VisualTokens(tokens=packed[patch][None], keys=keys[src][None], cls_attn=cls[src][None],
                              cls_attn_full=full[src][None], grid=(1, int(patch.sum())),
                              hidden=None if features is None else features[src][None], project=project)
            newline = torch.nonzero(~patch).flatten()                    # [R] packed index of each row end
            out.append(_Image(vt, packed.shape[0], (torch.nonzero(patch).flatten(), newline, packed)))
        return out

    def place(self, image: _Image, out: Compressed) -> tuple[Tensor, Tensor]:
        at, newline, packed = image.layout       # [N] packed index of each patch token, [R], [P, D]
        m = out.mask[0]
        tokens, source, position = out.tokens[0][m], out.source[0][m], out.position[0][m]
        kept = source >= 0
        kept_at = at[source[kept]]                                          # increasing
        high = kept_at >= self.side * self.side                             # after the base tile
        row_kept = torch.zeros(newline.numel(), dtype=torch.bool, device=at.device)
        row_kept[torch.searchsorted(newline, kept_at[high])] = True         # the row each one ends in
        nl_at = newline[row_kept]
        slots = torch.cat([kept_at, nl_at])
        order = torch.argsort(slots)
        seq = torch.cat([tokens[kept], packed[nl_at].to(tokens.dtype)])[order]
        return torch.cat([seq, tokens[~kept]]), torch.cat([slots[order], at[position[~kept]]])


class _Qwen2VL(_Family):
    """Qwen2-VL plumbing: the merged (2 x 2 patch) tokens the model computed, one grid
    ``(t·h/2, w/2)`` per image, placed with their original M-RoPE positions.

    - No CLS token: the score that stands in for CLS attention is the attention each merged
      token receives in the vision block the features come from (the last; ``attn_layer`` picks
      another): softmax attention of every patch query, mean over heads and queries, summed
      over the token's 2 x 2 patches. Like CLS attention it is the encoder's own softmax mass
      over the image (it sums to 1), so the outlier rules and budgets behave as on CLIP; a token
      norm would be on an arbitrary scale and favours high-norm artefact tokens. ``attention=
      'full'`` uses the single-head full-width variant. Keys (merge similarity) are the block's
      keys before the rotary embedding, averaged over the 2 x 2 patches.
    - Positions: the M-RoPE positions the model itself gives the uncompressed prompt
      (``get_rope_index``, or those ``generate`` precomputed), with the removed tokens'
      columns dropped: kept tokens and the text after the image keep their original positions;
      a merged token takes its centre's, the global token the last patch's. Decoding steps
      continue from the uncompressed prompt's positions, as the stock model does.
    """

    markers = (("<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"),)
    no_vision_merge = "its merger projects each 2 x 2 block of patches at once, not one vision feature per token"

    def __init__(self, model: nn.Module, attn_layer: int | None):
        super().__init__(model, attn_layer)
        cfg = model.config
        self.visual = self.inner.visual
        blocks = self.visual.blocks
        self.attn_layer = (attn_layer if attn_layer is not None else -1) % len(blocks)
        self.block = blocks[self.attn_layer]
        self.merge = cfg.vision_config.spatial_merge_size
        self.skip_ids = {t for t in (getattr(cfg, "vision_start_token_id", None),
                                     getattr(cfg, "vision_end_token_id", None)) if t is not None}
        self.captured: tuple[Tensor, Tensor, Tensor] | None = None
        self.grid_thw: Tensor | None = None

    def hooks(self) -> list[Any]:
        """Record the images' grids when the vision tower runs, and the attention each patch
        receives in the chosen block (hooks on this instance's modules)."""

        def tower(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self.grid_thw = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)

        def block(module: nn.Module, args: tuple, kwargs: dict) -> None:
            h = kwargs.get("hidden_states", args[0] if args else None)
            cos, sin = kwargs["position_embeddings"]
            self.captured = received_attention(module, h, cos, sin, kwargs["cu_seqlens"])

        return [self.visual.register_forward_pre_hook(tower, with_kwargs=True),
                self.block.attn.register_forward_pre_hook(block, with_kwargs=True)]

    def reset(self) -> None:
        self.captured = None
        self.grid_thw = None

    def unit_order(self, grid_thw: Tensor) -> Tensor | None:
        """Order of the merged units inside the vision blocks (None: the output order)."""
        return None

    def images(self, kw: dict) -> list[_Image]:
        enc = self.encoder_output(kw)
        if enc is None:
            enc = self.inner.get_image_features(kw["pixel_values"], kw["image_grid_thw"], return_dict=True)
        grid_thw = self.grid_thw if self.grid_thw is not None else kw.get("image_grid_thw")
        feats = list(enc.pooler_output)
        n = [int(f.shape[0]) for f in feats]
        if self.captured is None or grid_thw is None or self.captured[0].shape[0] != sum(n) * self.merge ** 2:
            raise RuntimeError("attach: the vision tower's attention was not recorded for these images")
        (mean, keys, full), self.captured, self.grid_thw = self.captured, None, None
        u = self.merge ** 2
        mean, full = mean.view(-1, u).sum(1), full.view(-1, u).sum(1)          # [sum n]
        keys = keys.view(-1, u, keys.shape[-1]).mean(1)                         # [sum n, C]
        order = self.unit_order(grid_thw.cpu())
        if order is not None:         # the blocks ran in window order: back to the output order
            back = torch.argsort(order).to(mean.device)
            mean, full, keys = mean[back], full[back], keys[back]
        out = []
        for f, a, b, c, (t, h, w) in zip(feats, mean.split(n), keys.split(n), full.split(n), grid_thw.tolist()):
            grid = (t * h // self.merge, w // self.merge)
            vt = VisualTokens(tokens=f[None], keys=b[None].to(f.dtype), cls_attn=a[None], cls_attn_full=c[None],
                              grid=grid)
            out.append(_Image(vt, f.shape[0]))
        return out

    def rope(self, kw: dict, ids: Tensor, mask: Tensor) -> Tensor:
        pos = kw.get("position_ids")
        if pos is not None and pos.dim() == 3:
            return pos[-3:]                         # generate's [4, B, L]: text row, then M-RoPE
        types = kw.get("mm_token_type_ids")
        if types is None:
            types = (ids == self.image_token_id).int()
        pos, _ = self.inner.get_rope_index(ids, mm_token_type_ids=types, image_grid_thw=kw.get("image_grid_thw"),
                                           attention_mask=mask)
        return pos


class _Qwen25VL(_Qwen2VL):
    """Qwen2.5-VL: as Qwen2-VL; its vision blocks run on merged units reordered into windows,
    so the recorded scores are put back in the output order (``get_vision_window_index``).
    A windowed block (not in ``fullatt_block_indexes``) scores tokens within their window."""

    def unit_order(self, grid_thw: Tensor) -> Tensor:
        from transformers.vision_utils import get_vision_window_index
        v = self.visual
        index, _ = get_vision_window_index(grid_thw, spatial_merge_size=v.spatial_merge_size,
                                           window_size=v.window_size, patch_size=v.patch_size)
        return index


FAMILIES: dict[str, type[_Family]] = {
    "LlavaForConditionalGeneration": _Llava,
    "LlavaNextForConditionalGeneration": _LlavaNext,
    "Qwen2VLForConditionalGeneration": _Qwen2VL,
    "Qwen2_5_VLForConditionalGeneration": _Qwen25VL,
}
SUPPORTED = tuple(FAMILIES)


# --- the question -------------------------------------------------------------------------

def _marker_ids(tokenizer: Any, text: str) -> list[int]:
    tok = getattr(tokenizer, "tokenizer", tokenizer)      # a processor holds its tokenizer
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _find_last(seq: list[int], sub: list[int], end: int) -> int:
    """Start of the last occurrence of ``sub`` in ``seq[:end]``, or -1."""
    n = len(sub)
    for i in range(end - n, -1, -1):
        if seq[i:i + n] == sub:
            return i
    return -1


def question_ids(ids: list[int], image_token_id: int, user: list[int], assistant: list[int],
                 ignore: set[int]) -> list[int]:
    """The user turn holding the (last) image: after the user marker, up to the assistant
    marker, without image, padding or special tokens (``ignore``)."""
    img = max(i for i, t in enumerate(ids) if t == image_token_id)
    end = len(ids)
    for j in range(img + 1, len(ids) - len(assistant) + 1):
        if assistant and ids[j:j + len(assistant)] == assistant:
            end = j
            break
    at = _find_last(ids, user, img) if user else -1
    start = at + len(user) if at >= 0 else 0          # no user marker: from the start
    return [t for t in ids[start:end] if t != image_token_id and t not in ignore]


def _resolved(method: str, params: dict[str, Any]) -> Any:
    """The method's params dataclass with ``params`` (preset defaults included), or None if they
    are bad (the method reports its own bad parameters)."""
    cls = METHOD_PARAMS.get(method)
    try:
        return cls(**params) if cls is not None else None
    except (TypeError, ValueError):
        return None


def _needs_grid(method: str, params: dict[str, Any]) -> str | None:
    """Why ``method`` needs the tokens' grid shape (None: it does not)."""
    if method == "pool":
        return "pools the patch grid"
    p = _resolved(method, params)
    return "finds grid peaks (recovery_peaks)" if getattr(p, "recovery_peaks", False) else None


def _stack(outs: list[Compressed]) -> Compressed:
    """Per-image outputs (batch of one each, any K and N) as one padded :class:`Compressed`."""
    K = max(int(o.mask.shape[1]) for o in outs)
    N = max(int(o.cells.shape[1]) if o.cells is not None else 0 for o in outs)

    def cat(name: str, width: int, fill: int) -> Tensor:
        parts = []
        for o in outs:
            t = getattr(o, name)
            pad = [0, 0] * (t.dim() - 2) + [0, width - t.shape[1]]
            parts.append(F.pad(t, pad, value=fill))
        return torch.cat(parts)

    cells = cat("cells", N, KIND_PAD) if all(o.cells is not None for o in outs) else None
    position = cat("position", K, 0) if all(o.position is not None for o in outs) else None
    return Compressed(cat("tokens", K, 0), cat("mask", K, False), cat("source", K, -1), cat("kind", K, KIND_PAD),
                      cells, position)


# --- the handle ---------------------------------------------------------------------------

class AttachHandle:
    """A method attached to one model instance; ``detach()`` (or leaving ``with``) removes it."""

    def __init__(self, model: nn.Module, method: str, budget: int | float | None, params: dict[str, Any],
                 *, attention: str, attn_layer: int | None, tokenizer: Any, questions: Sequence[str] | None,
                 seed: int, clip: Any = None, clip_tokenizer: Any = None, grid_positions: bool = False):
        name = type(model).__name__
        if name not in FAMILIES:
            raise ValueError(f"attach: {name} is not supported (supported: {', '.join(SUPPORTED)})")
        get_method(method)
        self.family = FAMILIES[name](model, attn_layer)
        why = None if self.family.single_grid else _needs_grid(method, params)
        if why:
            raise ValueError(f"attach: {method} {why}, but {name} packs each image as a base tile plus a "
                             f"high-res grid with newline tokens (no single grid)")
        resolved = _resolved(method, params)
        if clip is not None:
            if self.family.no_clip_guidance:
                raise ValueError(f"attach: clip= text guidance cannot apply to {name}: {self.family.no_clip_guidance}")
            if clip_tokenizer is None:
                raise ValueError("attach: clip= needs clip_tokenizer= to tokenise the questions")
            self.family.clip = clip
        if grid_positions and type(self.family).rope is not _Family.rope:
            raise ValueError(f"attach: grid_positions applies to 1-D positions; {name} keeps its own M-RoPE positions")
        if clip is None and getattr(resolved, "text_pooling", "eos") != "eos":
            raise ValueError(f"attach: text_pooling={resolved.text_pooling!r} of {method} needs a CLIP text tower, but "
                             f"{name} embeds the question with its LM's input embeddings (use text_pooling='eos')")
        if getattr(resolved, "merge_space", "projected") == "vision":
            if self.family.no_vision_merge:
                raise ValueError(f"attach: merge_space='vision' of {method} cannot apply to {name}: "
                                 f"{self.family.no_vision_merge}")
            self.family.vision_merge = True
        self.model, self.method, self.budget, self.params = model, method, budget, dict(params)
        self.attention = attention
        self.questions = list(questions) if questions is not None else None
        self.tokenizer = tokenizer
        self.clip_tokenizer = clip_tokenizer
        self.text_pooling = getattr(resolved, "text_pooling", "eos")
        self.grid_positions = grid_positions
        self._gen = torch.Generator().manual_seed(seed)
        self._prompt: _Prompt | None = None
        self._encoded: tuple[Any, list[tuple[Tensor, Tensor, int]]] | None = None
        self.stats: dict[str, Any] = {"tokens": [], "total": [], "calls": 0}
        self.last: Compressed | None = None
        self.last_question_ids: list[list[int]] = []
        self._markers = [(_marker_ids(tokenizer, u), _marker_ids(tokenizer, a)) for u, a in self.family.markers] \
            if tokenizer is not None else [([], [])]
        if method in TEXT_GUIDED and questions is None and tokenizer is None:
            raise ValueError(f"attach: {method} reads the question; pass tokenizer= (to find the user turn "
                             f"in the prompt) or questions=[...]")
        if self.questions is not None and tokenizer is None:
            raise ValueError("attach: questions=[...] needs tokenizer= to embed them")
        self._hooks = [model.model.register_forward_pre_hook(self._pre_forward, with_kwargs=True),
                       *self.family.hooks()]

    # -- public ------------------------------------------------------------------------------
    def detach(self) -> None:
        """Remove the hooks; the model is exactly as before ``attach``."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._prompt = None
        self._encoded = None
        self.family.reset()

    def __enter__(self) -> "AttachHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    # -- the hook ------------------------------------------------------------------------------
    def _pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if args:      # LlavaNextForConditionalGeneration passes input_ids by position
            names = list(inspect.signature(module.forward).parameters)
            kwargs = {**dict(zip(names, args)), **kwargs}
            args = ()
        ids = kwargs.get("input_ids")
        if kwargs.get("pixel_values_videos") is not None or (kwargs.get("mm_encoder_outputs") or {}).get("video"):
            raise ValueError(f"attach: videos are not supported ({self.family.name}); pass images")
        images = kwargs.get("pixel_values") is not None or self.family.encoder_output(kwargs)
        if images is not None and ids is not None and bool((ids == self.family.image_token_id).any()):
            return args, self._prefill(kwargs)
        p = self._prompt
        cache = kwargs.get("past_key_values")
        if p is not None and cache is not None and cache is p.cache:
            return args, self._decode_step(kwargs, p)
        return None

    def _question(self, ids: list[int]) -> list[int]:
        tok = getattr(self.tokenizer, "tokenizer", self.tokenizer)
        ignore = set(getattr(tok, "all_special_ids", []) or []) | self.family.skip_ids
        img = max(i for i, t in enumerate(ids) if t == self.family.image_token_id)
        user, assistant = next(((u, a) for u, a in self._markers if u and _find_last(ids, u, img) >= 0),
                               self._markers[0])
        return question_ids(ids, self.family.image_token_id, user, assistant, ignore)

    def _question_embeddings(self, rows: list[int], ids: Tensor) -> Tensor | None:
        """``[I, D]`` the question embedding of each image's prompt (None: the method reads none)."""
        if self.method not in TEXT_GUIDED and not self.params.get("text_weight"):
            return None
        if self.questions is not None:
            if len(self.questions) != ids.shape[0]:
                raise ValueError(f"attach: {len(self.questions)} questions for a batch of {ids.shape[0]} prompts")
            tok = getattr(self.tokenizer, "tokenizer", self.tokenizer)
            q_ids = [list(tok(self.questions[r], add_special_tokens=False)["input_ids"]) for r in rows]
        else:
            q_ids = [self._question(ids[r].tolist()) for r in rows]
        if any(not q for q in q_ids):
            raise ValueError("attach: found no question text in the prompt's user turn")
        self.last_question_ids = q_ids
        if self.family.clip is not None:       # CLIP's text tower, as LVLM.text_embeddings
            tok = getattr(self.tokenizer, "tokenizer", self.tokenizer)
            texts = [self.questions[r] for r in rows] if self.questions is not None else \
                [tok.decode(q, skip_special_tokens=True) for q in q_ids]
            return clip_text_embeddings(self.family.clip, self.clip_tokenizer, texts, self.text_pooling)
        return torch.stack([self.family.embed(torch.tensor(q, device=ids.device)).float().mean(0) for q in q_ids])

    def _assign(self, images: list[_Image], is_img: Tensor) -> list[int]:
        """The prompt row of each image, filling each row's placeholders in order."""
        per_row = is_img.sum(1).tolist()
        rows, i = [], 0
        for r, need in enumerate(per_row):
            while need > 0 and i < len(images):
                need -= images[i].slots
                rows.append(r)
                i += 1
            if need != 0:
                break
        if i != len(images) or len(rows) != len(images) or sum(im.slots for im in images) != sum(per_row):
            raise ValueError(f"attach: {len(images)} images with {[im.slots for im in images]} tokens do not "
                             f"fill the {per_row} image placeholders per prompt")
        return rows

    def _compress(self, images: list[_Image], rows: list[int], ids: Tensor) -> list[Compressed]:
        """The method on every image, images with the same token count and grid in one batch."""
        q = self._question_embeddings(rows, ids)                        # [I, D] or None
        if q is not None:
            for im, qi in zip(images, q):
                if im.patches is not None:                # cosine in CLIP's joint space, as the tokens stage
                    im.vt.text_sim = torch.einsum("bnp,bp->bn", im.patches, qi[None].to(im.patches))
                else:                                     # cosine in the LM's embedding space
                    im.vt.text_sim = F.normalize(im.vt.tokens.float(), dim=-1) @ F.normalize(qi, dim=-1)
                im.vt.text_dim = int(qi.shape[-1])
        groups: dict[tuple, list[int]] = {}
        for i, im in enumerate(images):
            groups.setdefault((im.vt.n_tokens, tuple(im.vt.grid)), []).append(i)
        outs: list[Compressed] = [None] * len(images)  # type: ignore[list-item]
        for members in groups.values():
            vt = _cat_tokens([images[i].vt for i in members])
            out = compress(vt, self.method, budget=self.budget, attention=self.attention, generator=self._gen,
                           **self.params)
            for j, i in enumerate(members):
                outs[i] = Compressed(*(None if t is None else t[j:j + 1] for t in _fields(out)))
        return outs

    def _prefill(self, kw: dict) -> dict:
        """The prompt with every image's placeholders replaced by its method output, re-padded,
        with its attention mask and position ids (M-RoPE: the uncompressed prompt's columns)."""
        ids: Tensor = kw["input_ids"]
        fam = self.family
        B, L = ids.shape
        is_img = ids == fam.image_token_id
        enc = fam.encoder_output(kw)
        if enc is not None and self._encoded is not None and self._encoded[0] is enc:
            placed = self._encoded[1]     # generate without a cache: the same images, the same choice
        else:
            images = fam.images(kw)
            rows = self._assign(images, is_img)
            outs = self._compress(images, rows, ids)
            placed = [(*fam.place(im, out), im.slots) for im, out in zip(images, outs)]
            self._encoded = (enc, placed) if enc is not None else None
            self.last = _stack(outs)
            self.stats = {"tokens": [int(t.shape[0]) for t, _, _ in placed], "total": [im.slots for im in images],
                          "calls": self.stats["calls"] + 1}
        embeds = fam.embed(ids)
        mask = kw.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        left = bool((mask[:, 0] == 0).any())
        seqs, masks, cols = _splice(embeds, mask, is_img, placed)
        Lp = max(s.shape[0] for s in seqs)
        new_e = embeds.new_zeros(B, Lp, embeds.shape[-1])
        new_m = mask.new_zeros(B, Lp)
        new_c = torch.full((B, Lp), -1, dtype=torch.long, device=ids.device)
        for r, (s, m, c) in enumerate(zip(seqs, masks, cols)):
            sl = slice(Lp - s.shape[0], Lp) if left else slice(0, s.shape[0])
            new_e[r, sl], new_m[r, sl], new_c[r, sl] = s, m, c
        removed = mask.sum(1) - new_m.sum(1)
        pos_ids = (new_m.long().cumsum(-1) - 1).masked_fill(new_m == 0, 0)
        if self.grid_positions:       # each token at its column's position in the uncompressed prompt
            orig = (mask.long().cumsum(-1) - 1).clamp(min=0)
            pos_ids = orig.gather(1, new_c.clamp(min=0)).masked_fill(new_m == 0, 0)
        rope = fam.rope(kw, ids, mask)
        shift = None
        if rope is not None:
            kept = torch.where(new_c[None] >= 0, rope.gather(2, new_c.clamp(min=0)[None].expand(3, B, Lp)), 0)
            kept = kept.masked_fill(new_m[None] == 0, 0)
            shift = kept.amax(dim=(0, 2)) + 1 - new_m.sum(1)
            pos_ids = torch.cat([pos_ids[None], kept.to(pos_ids)])              # [4, B, L']: text row, M-RoPE
        cache = kw.get("past_key_values")
        self._prompt = _Prompt(cache, L, new_m, removed, shift, self.grid_positions) if cache is not None else None
        kw = dict(kw)
        kw.update(input_ids=None, pixel_values=None, mm_encoder_outputs=None, inputs_embeds=new_e, position_ids=pos_ids,
                  attention_mask=None if bool(new_m.all()) and kw.get("attention_mask") is None else new_m)
        return kw

    def _decode_step(self, kw: dict, p: _Prompt) -> dict:
        """A decoding step of generate, laid out for the uncompressed prompt, on the compressed cache."""
        cur = (kw.get("input_ids") if kw.get("input_ids") is not None else kw["inputs_embeds"]).shape[1]
        past = p.cache.get_seq_length()
        generated = past + cur - p.new_mask.shape[1]           # tokens after the prompt, this step's included
        mask = kw.get("attention_mask")
        tail = mask[:, p.orig_len:] if mask is not None else p.new_mask.new_ones(p.new_mask.shape[0], generated)
        new_mask = torch.cat([p.new_mask, tail.to(p.new_mask.dtype)], dim=1)
        pos = kw.get("position_ids")
        removed = p.removed.view(-1, 1)
        if pos is not None and pos.dim() == 3:
            # M-RoPE rows continue the uncompressed prompt's positions; only the text row moves.
            pos = torch.cat([pos[:1] - removed.to(pos), pos[1:]]) if pos.shape[0] == 4 else pos
        elif pos is not None:
            pos = pos if p.keep_positions else pos - removed.to(pos)
        else:
            pos = (new_mask.long().cumsum(-1) - 1).masked_fill(new_mask == 0, 0)[:, -cur:]
            if p.keep_positions:
                pos = pos + removed.view(-1, 1).to(pos)
            if p.rope_shift is not None:
                pos = torch.cat([pos[None], (pos + p.rope_shift.view(-1, 1).to(pos))[None].expand(3, -1, -1)])
        kw = dict(kw)
        kw.update(position_ids=pos, attention_mask=None if bool(new_mask.all()) and mask is None else new_mask)
        return kw


def _fields(c: Compressed) -> list[Tensor | None]:
    return [getattr(c, f.name) for f in dataclasses.fields(c)]


def _cat_tokens(vts: list[VisualTokens]) -> VisualTokens:
    """Images with the same token count and grid as one batch."""
    def cat(name: str) -> Tensor | None:
        return None if getattr(vts[0], name) is None else torch.cat([getattr(v, name) for v in vts])

    return VisualTokens(cat("tokens"), cat("keys"), cat("cls_attn"), cat("cls_attn_full"), cat("text_sim"),
                        vts[0].grid, cat("hidden"), vts[0].project, vts[0].text_dim)


def _splice(embeds: Tensor, mask: Tensor, is_img: Tensor, placed: list[tuple[Tensor, Tensor, int]]
            ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Each row with its images' placeholders replaced by their placed tokens.

    embeds [B, L, D], mask [B, L], is_img [B, L]; placed: per image in prompt order,
    ``(tokens [K, D], slot [K], placeholders)`` -> per row ``(embeddings [L_r, D], mask [L_r],
    column [L_r])``, column = the uncompressed prompt position each token stands at."""
    seqs, masks, cols = [], [], []
    img = 0
    dev = embeds.device
    for r in range(embeds.shape[0]):
        parts, pmask, pcol, pos = [], [], [], 0
        where = torch.nonzero(is_img[r]).flatten().tolist()
        s = 0
        while s < len(where):
            tokens, slot, n = placed[img]
            a = where[s]
            if s + n > len(where) or where[s + n - 1] != a + n - 1:
                raise ValueError(f"attach: image {img} needs {n} consecutive placeholder tokens")
            parts += [embeds[r, pos:a], tokens.to(embeds.dtype)]
            pmask += [mask[r, pos:a], mask.new_ones(tokens.shape[0])]
            pcol += [torch.arange(pos, a, device=dev), a + slot.to(dev)]
            pos, s, img = a + n, s + n, img + 1
        parts.append(embeds[r, pos:])
        pmask.append(mask[r, pos:])
        pcol.append(torch.arange(pos, embeds.shape[1], device=dev))
        seqs.append(torch.cat(parts))
        masks.append(torch.cat(pmask))
        cols.append(torch.cat(pcol))
    return seqs, masks, cols


def attach(model: nn.Module, method: str = "recoverable", budget: int | float | None = 0.1, *,
           attention: str = "head_mean", attn_layer: int | None = None, tokenizer: Any = None,
           questions: Sequence[str] | None = None, seed: int = 0, clip: Any = None, clip_tokenizer: Any = None,
           grid_positions: bool = False, **method_params: Any) -> AttachHandle:
    """Attach a registered token method to one stock model instance (see the module docstring).

    ``budget``: a fraction of the image's tokens, a count, or ``None`` (adaptive mode);
    ``method_params``: the fields of the method's params dataclass; ``attn_layer``: the
    vision layer whose attention ranks tokens (default: the layer the LM's features come
    from); ``tokenizer``: the model's tokenizer or processor (needed by text-guided methods to
    find the question); ``questions``: the questions, one per prompt, instead. ``clip`` (a
    ``CLIPModel`` whose vision side is the model's tower) and ``clip_tokenizer``: text guidance as
    the seed paper and the tokens stage do it, CLIP's text embedding of the question against the
    patches in CLIP's joint space (LLaVA-1.5 only), instead of the LM's input embeddings;
    ``grid_positions``: kept tokens and the text after them keep the positions of the
    uncompressed prompt (``tokens.grid_positions``), instead of being packed.
    """
    return AttachHandle(model, method, budget, method_params, attention=attention, attn_layer=attn_layer,
                        tokenizer=tokenizer, questions=questions, seed=seed, clip=clip, clip_tokenizer=clip_tokenizer,
                        grid_positions=grid_positions)
