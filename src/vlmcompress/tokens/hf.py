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

Supported (one family class each, :data:`~vlmcompress.tokens.hf_archs.FAMILIES`):

- ``LlavaForConditionalGeneration`` (llava-1.5): CLIP patch tokens of one 24 x 24 grid, ranked
  by the CLS attention of the vision layer the features come from.
- ``LlavaNextForConditionalGeneration``: see :class:`~vlmcompress.tokens.hf_archs._LlavaNext`
  (anyres tiles packed into one sequence per image; newline tokens kept as row ends; no single grid).
- ``Qwen2VLForConditionalGeneration`` and ``Qwen2_5_VLForConditionalGeneration``: see
  :class:`~vlmcompress.tokens.hf_archs._Qwen2VL` (merged 2 x 2 patch tokens; no CLS token, the
  attention each token receives stands in; kept tokens keep their original M-RoPE positions).

Another architecture is refused with a one-line error naming its class.

This module holds the handle, the same for every architecture: the prompt rewrite at prefill
and its mapping at each decoding step. The families are in :mod:`vlmcompress.tokens.hf_archs`,
the vision attention scores in :mod:`vlmcompress.tokens.hf_scores`, the question's place in
the prompt in :mod:`vlmcompress.tokens.hf_prompt`.
"""
from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from vlmcompress.lvlm.adapter import clip_text_embeddings
from vlmcompress.tokens.config import METHOD_PARAMS, TEXT_GUIDED
from vlmcompress.tokens.hf_archs import FAMILIES, SUPPORTED, Family, PromptImage
from vlmcompress.tokens.hf_prompt import find_last, marker_ids, question_ids
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
        if grid_positions and type(self.family).rope is not Family.rope:
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
        self._markers = [(marker_ids(tokenizer, u), marker_ids(tokenizer, a)) for u, a in self.family.markers] \
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
        user, assistant = next(((u, a) for u, a in self._markers if u and find_last(ids, u, img) >= 0),
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

    def _assign(self, images: list[PromptImage], is_img: Tensor) -> list[int]:
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

    def _compress(self, images: list[PromptImage], rows: list[int], ids: Tensor) -> list[Compressed]:
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
