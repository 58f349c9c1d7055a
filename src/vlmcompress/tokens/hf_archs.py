"""Per-architecture plumbing of :func:`~vlmcompress.tokens.hf.attach`: one family class per model class.

A family knows where one architecture keeps its image tokens and vision attention: it hooks
the vision tower of one model instance, turns a call's inputs into per-image
:class:`VisualTokens` (:meth:`Family.images`), places a method's output back into the
placeholders (:meth:`Family.place`) and gives M-RoPE positions where the LM has them
(:meth:`Family.rope`). Kept apart from the handle (:mod:`vlmcompress.tokens.hf`), which is
the same for every architecture, so supporting another model is one class here and one
entry in :data:`FAMILIES`.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from vlmcompress.lvlm.adapter import clip_patch_embeddings
from vlmcompress.tokens.hf_scores import cls_attention, received_attention
from vlmcompress.tokens.types import Compressed, VisualTokens

# --- what a family hands the handle, and the hook plumbing ---------------------------------

@dataclasses.dataclass
class PromptImage:
    """One image of a call: its tokens for the method and how many placeholders it fills."""

    vt: VisualTokens           # batch of one
    slots: int                 # placeholder tokens of this image in the prompt
    layout: Any = None         # family data that :meth:`Family.place` needs
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


# --- families -----------------------------------------------------------------------------

class Family:
    """What the handle needs from one architecture. ``images`` turns one call's inputs into
    per-image :class:`PromptImage` records, ``place`` turns a method's output for one image into the
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

    def images(self, kw: dict) -> list[PromptImage]:
        raise NotImplementedError

    def place(self, image: PromptImage, out: Compressed) -> tuple[Tensor, Tensor]:
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


class _Llava(Family):
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

    def images(self, kw: dict) -> list[PromptImage]:
        """One :class:`PromptImage` per image, from the encoder outputs ``generate`` computed
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
        return [PromptImage(vt.select([i]), tokens.shape[1], patches=None if patches is None else patches[i:i + 1])
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

    def images(self, kw: dict) -> list[PromptImage]:
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
            out.append(PromptImage(vt, packed.shape[0], (torch.nonzero(patch).flatten(), newline, packed)))
        return out

    def place(self, image: PromptImage, out: Compressed) -> tuple[Tensor, Tensor]:
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


class _Qwen2VL(Family):
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

    def images(self, kw: dict) -> list[PromptImage]:
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
            out.append(PromptImage(vt, f.shape[0]))
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


FAMILIES: dict[str, type[Family]] = {
    "LlavaForConditionalGeneration": _Llava,
    "LlavaNextForConditionalGeneration": _LlavaNext,
    "Qwen2VLForConditionalGeneration": _Qwen2VL,
    "Qwen2_5_VLForConditionalGeneration": _Qwen25VL,
}
SUPPORTED = tuple(FAMILIES)
