"""Token compression on a stock Hugging Face LVLM, through its own ``generate`` and ``forward``.

::

    handle = vlmcompress.tokens.attach(model, method="recoverable", budget=0.1, tokenizer=processor.tokenizer)
    out = model.generate(**processor(images=image, text=prompt, return_tensors="pt"), max_new_tokens=20)
    handle.stats          # {"tokens": [kept per image of the last call], "total": [N per image], "calls": n}
    handle.detach()       # or: with vlmcompress.tokens.attach(...): ...

One forward pre-hook on the model's inner multimodal module (this instance only, nothing on
a class) replaces the prompt before the language model sees it: the image placeholder tokens
become the method's kept tokens (:mod:`vlmcompress.tokens.methods`), each row is re-padded on
the side it was padded on, and the attention mask and position ids follow. While ``generate``
decodes from the cache that prefill filled, the hook maps its attention mask and position ids
(laid out for the uncompressed prompt) onto the compressed one, so decoding with the KV
cache equals decoding without it, and a batch equals its rows one by one.

Text guidance (``recoverable`` and other methods that read ``text_sim``): the question is the
user turn that holds the image, read from the prompt's ids — after the user marker (e.g.
``USER:``), without the image tokens, up to the assistant marker (e.g. ``ASSISTANT:``) — so
neither a system prompt nor the template reaches the text encoder; or ``questions=[...]``
given explicitly. The markers come from ``tokenizer`` (a tokenizer or processor). A stock
LLaVA has no CLIP text tower, so the question is embedded with the LM's own input embeddings
(mean over its tokens) and compared by cosine with the projected visual tokens, which live
in the same space.

Supported: ``LlavaForConditionalGeneration`` (llava-1.5: CLIP tower with a CLS token).
Another architecture is refused with a one-line error naming its class.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from vlmcompress.tokens.methods import compress, get_method
from vlmcompress.tokens.types import Compressed, VisualTokens

TEXT_GUIDED = {"recoverable", "recoverable_spread"}
SUPPORTED = ("LlavaForConditionalGeneration",)
MARKERS = {"LlavaForConditionalGeneration": ("USER:", "ASSISTANT:")}


@dataclasses.dataclass
class _Prompt:
    """What prefill changed, for mapping the decoding steps of the same ``generate`` call."""

    cache: Any                 # the KV cache object prefill filled
    orig_len: int              # prompt length as generate laid it out (L)
    new_mask: Tensor           # [B, L'] attention mask of the compressed prompt
    removed: Tensor            # [B] tokens removed from each row


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


class _Llava:
    """LLaVA-1.5 plumbing: the projected patch tokens the model itself computed, and the CLS
    attention and keys of the vision layer that produced them."""

    def __init__(self, model: nn.Module, attn_layer: int | None):
        cfg = model.config
        if not isinstance(cfg.vision_feature_layer, int):
            raise ValueError(f"{type(model).__name__}: several vision feature layers are not supported")
        if cfg.vision_feature_select_strategy != "default":
            raise ValueError(f"{type(model).__name__}: needs a CLS token (vision_feature_select_strategy "
                             f"'default'), got {cfg.vision_feature_select_strategy!r}")
        self.model = model
        self.inner = model.model
        self.image_token_id = cfg.image_token_id
        tower = self.inner.vision_tower
        self.layers = getattr(tower, "vision_model", tower).encoder.layers
        n_layers = len(self.layers)
        f = cfg.vision_feature_layer
        # The features are hidden_states[f], the output of layers[f] (f < 0) or layers[f - 1].
        self.attn_layer = (attn_layer if attn_layer is not None else (f if f < 0 else f - 1)) % n_layers
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size
        self.grid = (side, side)
        self.captured: tuple[Tensor, Tensor, Tensor] | None = None

    def capture(self) -> Any:
        """Record the CLS attention of ``attn_layer`` whenever the tower runs (a hook on this
        instance's module): ``generate`` encodes the images before the prefill forward."""

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self.captured = cls_attention(module, kwargs.get("hidden_states", args[0] if args else None))

        return self.layers[self.attn_layer].self_attn.register_forward_pre_hook(hook, with_kwargs=True)

    def visual_tokens(self, kw: dict) -> VisualTokens:
        """VisualTokens of every image of the call, from the encoder outputs ``generate``
        computed (``mm_encoder_outputs``) or from ``pixel_values``."""
        enc = (kw.get("mm_encoder_outputs") or {}).get("image")
        if enc is None:
            enc = self.inner.get_image_features(pixel_values=kw["pixel_values"], return_dict=True)
        tokens = torch.stack(list(enc.pooler_output))                              # [I, N, D]
        if self.captured is None or self.captured[0].shape[0] != tokens.shape[0]:
            raise RuntimeError("attach: the vision tower's attention was not recorded for these images")
        (cls, keys, full), self.captured = self.captured, None
        return VisualTokens(tokens=tokens, keys=keys, cls_attn=cls, cls_attn_full=full, grid=self.grid)

    def embed(self, ids: Tensor) -> Tensor:
        return self.inner.get_input_embeddings()(ids)


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
    start = _find_last(ids, user, img) + len(user) if user else 0
    start = max(start, 0) if _find_last(ids, user, img) >= 0 else 0
    return [t for t in ids[start:end] if t != image_token_id and t not in ignore]


class AttachHandle:
    """A method attached to one model instance; ``detach()`` (or leaving ``with``) removes it."""

    def __init__(self, model: nn.Module, method: str, budget: int | float | None, params: dict[str, Any],
                 *, attention: str, attn_layer: int | None, tokenizer: Any, questions: Sequence[str] | None,
                 seed: int):
        name = type(model).__name__
        if name not in SUPPORTED:
            raise ValueError(f"attach: {name} is not supported (supported: {', '.join(SUPPORTED)})")
        get_method(method)
        self.model, self.method, self.budget, self.params = model, method, budget, dict(params)
        self.attention = attention
        self.family = _Llava(model, attn_layer)
        self.questions = list(questions) if questions is not None else None
        self.tokenizer = tokenizer
        self._gen = torch.Generator().manual_seed(seed)
        self._prompt: _Prompt | None = None
        self._encoded: tuple[Any, Compressed] | None = None
        self.stats: dict[str, Any] = {"tokens": [], "total": [], "calls": 0}
        self.last: Compressed | None = None
        self.last_question_ids: list[list[int]] = []
        user, assistant = MARKERS[name]
        self._user = _marker_ids(tokenizer, user) if tokenizer is not None else []
        self._assistant = _marker_ids(tokenizer, assistant) if tokenizer is not None else []
        if method in TEXT_GUIDED and questions is None and tokenizer is None:
            raise ValueError(f"attach: {method} reads the question; pass tokenizer= (to find the user turn "
                             f"in the prompt) or questions=[...]")
        if self.questions is not None and tokenizer is None:
            raise ValueError("attach: questions=[...] needs tokenizer= to embed them")
        self._hooks = [model.model.register_forward_pre_hook(self._pre_forward, with_kwargs=True),
                       self.family.capture()]

    # -- public ------------------------------------------------------------------------------
    def detach(self) -> None:
        """Remove the hook; the model is exactly as before ``attach``."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._prompt = None
        self._encoded = None
        self.family.captured = None

    def __enter__(self) -> "AttachHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    # -- the hook ------------------------------------------------------------------------------
    def _pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if args:
            raise ValueError("attach: call the model with keyword arguments")
        ids = kwargs.get("input_ids")
        images = kwargs.get("pixel_values") is not None or (kwargs.get("mm_encoder_outputs") or {}).get("image")
        if images is not None and ids is not None and bool((ids == self.family.image_token_id).any()):
            return args, self._prefill(kwargs)
        p = self._prompt
        cache = kwargs.get("past_key_values")
        if p is not None and cache is not None and cache is p.cache:
            return args, self._decode_step(kwargs, p)
        return None

    def _text_sim(self, vt: VisualTokens, rows: list[int], ids: Tensor) -> Tensor | None:
        if self.method not in TEXT_GUIDED and not self.params.get("text_weight"):
            return None
        fam = self.family
        if self.questions is not None:
            if len(self.questions) != ids.shape[0]:
                raise ValueError(f"attach: {len(self.questions)} questions for a batch of {ids.shape[0]} prompts")
            tok = getattr(self.tokenizer, "tokenizer", self.tokenizer)
            q_ids = [list(tok(self.questions[r], add_special_tokens=False)["input_ids"]) for r in rows]
        else:
            tok = getattr(self.tokenizer, "tokenizer", self.tokenizer)
            ignore = set(getattr(tok, "all_special_ids", []) or [])
            q_ids = [question_ids(ids[r].tolist(), fam.image_token_id, self._user, self._assistant, ignore)
                     for r in rows]
        if any(not q for q in q_ids):
            raise ValueError("attach: found no question text in the prompt's user turn")
        self.last_question_ids = q_ids
        emb = torch.stack([fam.embed(torch.tensor(q, device=ids.device)).float().mean(0) for q in q_ids])
        return torch.einsum("bnd,bd->bn", F.normalize(vt.tokens.float(), dim=-1), F.normalize(emb, dim=-1))

    def _prefill(self, kw: dict) -> dict:
        ids: Tensor = kw["input_ids"]
        fam = self.family
        B, L = ids.shape
        is_img = ids == fam.image_token_id
        n = fam.grid[0] * fam.grid[1]
        per_row = is_img.sum(1)
        if bool((per_row % n).any()):
            raise ValueError(f"attach: each image needs {n} placeholder tokens, got {per_row.tolist()} per prompt")
        enc = (kw.get("mm_encoder_outputs") or {}).get("image")
        if enc is not None and self._encoded is not None and self._encoded[0] is enc:
            out = self._encoded[1]     # generate without a cache: the same images, the same choice
        else:
            vt = fam.visual_tokens(kw)
            rows = [r for r in range(B) for _ in range(int(per_row[r]) // n)]      # image -> its prompt
            if len(rows) != vt.batch_size:
                raise ValueError(f"attach: {vt.batch_size} images for {len(rows)} image placeholders")
            vt.text_sim = self._text_sim(vt, rows, ids)
            out = compress(vt, self.method, budget=self.budget, attention=self.attention, generator=self._gen,
                           **self.params)
            self._encoded = (enc, out) if enc is not None else None
            self.last = out
            self.stats = {"tokens": out.mask.sum(1).tolist(), "total": [n] * vt.batch_size,
                          "calls": self.stats["calls"] + 1}
        counts = out.mask.sum(1)
        embeds = fam.embed(ids)
        mask = kw.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        left = bool((mask[:, 0] == 0).any())
        seqs, masks = [], []
        img = 0
        for r in range(B):
            parts, pmask, pos = [], [], 0
            where = torch.nonzero(is_img[r]).flatten().tolist()
            for s in range(0, len(where), n):
                a = where[s]
                parts.append(embeds[r, pos:a])
                pmask.append(mask[r, pos:a])
                k = int(counts[img])
                parts.append(out.tokens[img, :k].to(embeds.dtype))
                pmask.append(mask.new_ones(k))
                pos, img = where[s + n - 1] + 1, img + 1
            parts.append(embeds[r, pos:])
            pmask.append(mask[r, pos:])
            seqs.append(torch.cat(parts))
            masks.append(torch.cat(pmask))
        Lp = max(s.shape[0] for s in seqs)
        new_e = embeds.new_zeros(B, Lp, embeds.shape[-1])
        new_m = mask.new_zeros(B, Lp)
        for r, (s, m) in enumerate(zip(seqs, masks)):
            sl = slice(Lp - s.shape[0], Lp) if left else slice(0, s.shape[0])
            new_e[r, sl], new_m[r, sl] = s, m
        removed = mask.sum(1) - new_m.sum(1)
        pos_ids = (new_m.long().cumsum(-1) - 1).masked_fill(new_m == 0, 0)
        cache = kw.get("past_key_values")
        self._prompt = _Prompt(cache, L, new_m, removed) if cache is not None else None
        kw = dict(kw)
        kw.update(input_ids=None, pixel_values=None, mm_encoder_outputs=None, inputs_embeds=new_e, position_ids=pos_ids,
                  attention_mask=None if bool(new_m.all()) and kw.get("attention_mask") is None else new_m)
        return kw

    def _decode_step(self, kw: dict, p: _Prompt) -> dict:
        cur = (kw.get("input_ids") if kw.get("input_ids") is not None else kw["inputs_embeds"]).shape[1]
        past = p.cache.get_seq_length()
        generated = past + cur - p.new_mask.shape[1]           # tokens after the prompt, this step's included
        mask = kw.get("attention_mask")
        tail = mask[:, p.orig_len:] if mask is not None else p.new_mask.new_ones(p.new_mask.shape[0], generated)
        new_mask = torch.cat([p.new_mask, tail.to(p.new_mask.dtype)], dim=1)
        pos = kw.get("position_ids")
        if pos is not None:
            pos = pos - p.removed.view(-1, *([1] * (pos.dim() - 1))).to(pos)
        else:
            pos = (new_mask.long().cumsum(-1) - 1).masked_fill(new_mask == 0, 0)[:, -cur:]
        kw = dict(kw)
        kw.update(position_ids=pos, attention_mask=None if bool(new_mask.all()) and mask is None else new_mask)
        return kw


def attach(model: nn.Module, method: str = "recoverable", budget: int | float | None = 0.1, *,
           attention: str = "head_mean", attn_layer: int | None = None, tokenizer: Any = None,
           questions: Sequence[str] | None = None, seed: int = 0, **method_params: Any) -> AttachHandle:
    """Attach a registered token method to one stock model instance (see the module docstring).

    ``budget``: a fraction of the image's tokens, a count, or ``None`` (adaptive mode);
    ``method_params``: the fields of the method's params dataclass; ``attn_layer``: the
    vision layer whose CLS attention ranks tokens (default: the layer the LM's features
    come from); ``tokenizer``: the model's tokenizer or processor (needed by text-guided
    methods to find the question); ``questions``: the questions, one per prompt, instead.
    """
    return AttachHandle(model, method, budget, method_params, attention=attention, attn_layer=attn_layer,
                        tokenizer=tokenizer, questions=questions, seed=seed)
