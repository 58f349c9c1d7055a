"""The one object every later stage talks to: an LLaVA-architecture model plus its CLIP.

Same class for both worlds: the embedded model this package trains, and
`llava-hf/llava-1.5-7b-hf` with `openai/clip-vit-large-patch14-336`. It offers

* :meth:`LVLM.visual_features` — visual tokens **with gradients** (the codec trains through
  them) plus the CLS-attention row and keys of one chosen vision layer, computed by a hook on
  that layer only (works with eager and SDPA attention alike);
* :meth:`LVLM.text_embeddings` / :meth:`LVLM.image_embeddings` / :meth:`LVLM.patch_embeddings`
  — CLIP's joint space (EOS pooling with the attention mask, by CLIP's own text tower);
* :meth:`LVLM.generate` — batched greedy decoding that builds ``inputs_embeds`` itself, so a
  ``transform`` of the visual tokens may change their number per image (padding + mask);
* :meth:`LVLM.answer_logits` / :meth:`LVLM.answer_loss` — teacher-forced answers: the logits, or the LM loss on answer tokens only (training, gradient tests, probes);
* :attr:`LVLM.vision_tower` / :attr:`LVLM.projector` / :attr:`LVLM.language_model` — the three
  parts, for code that needs one itself (the codec's token target, FLOPs counting); nothing
  outside this package reaches into ``LVLM.llava`` for them.

Images enter as float tensors ``[B, 3, H, W]`` in ``[0, 1]``, or as a list of ``[3, H, W]``
of different sizes; making them square as the model's own processor does (``image_aspect``:
pad with the mean colour, centre crop, or resize; :mod:`vlmcompress.lvlm.imageprep`),
resizing and CLIP normalisation happen here, in float32 and differentiably.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import CLIPModel, LlavaForConditionalGeneration, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicCache

import vlmcompress.lvlm.vision  # noqa: F401  (registers the embedded tower's Auto classes)
from vlmcompress.lvlm.imageprep import Aspect, prepare

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Prompts:
    """Chat template and task instructions. ``{question}``/``{ref}`` are filled per sample."""

    system: str = ""
    template: str = "USER: <image>\n{instruction} ASSISTANT:"
    vqa: str = "{question}\nanswer the question using a single word or phrase."
    caption: str = "provide a one-sentence caption for the provided image."
    ground: str = "please provide the bounding box coordinate of the region this sentence describes: {ref}."

    def instruction(self, task: str, text: str = "") -> str:
        if task == "vqa":
            return self.vqa.format(question=text)
        if task == "caption":
            return self.caption
        if task == "ground":
            return self.ground.format(ref=text)
        raise ValueError(f"unknown task {task!r} (vqa, caption, ground)")

    def render_followup(self, task: str, text: str = "") -> str:
        """A later turn of a conversation: the template without system prompt and image."""
        return " " + self.template.replace("<image>\n", "").replace("<image>", "").format(
            instruction=self.instruction(task, text))

    def render(self, task: str, text: str = "") -> tuple[str, str]:
        """(text before the image, text after it) for one sample."""
        full = (self.system + " " if self.system else "") + self.template.format(
            instruction=self.instruction(task, text))
        before, sep, after = full.partition("<image>")
        if not sep:
            raise ValueError("prompt template has no <image> placeholder")
        return before, after


@dataclass
class VisualFeatures:
    """What the vision side hands to a token-compression method (shapes for N patches)."""

    tokens: Tensor        # [B, N, D]   projected visual tokens (LM input space)
    hidden: Tensor        # [B, N, Dv]  selected vision-layer features (before the projector)
    keys: Tensor          # [B, N, Dv]  attention keys of the CLS-attention layer (heads concatenated)
    cls_attn: Tensor      # [B, N]      CLS row of that layer's softmax attention, mean over heads
    cls_attn_heads: Tensor  # [B, H, N] the same per head
    last_hidden: Tensor   # [B, 1 + N, Dv] last vision layer output (CLS first), for patch embeddings
    grid: tuple[int, int]  # (H, W) patch grid
    cls_attn_full: Tensor | None = None  # [B, N] single-head full-width CLS attention (official code)

    def index(self, idx: Tensor) -> "VisualFeatures":
        """The features of images ``idx [B']`` (repeats allowed)."""
        pick = lambda t: t.index_select(0, idx)  # noqa: E731
        return VisualFeatures(pick(self.tokens), pick(self.hidden), pick(self.keys), pick(self.cls_attn),
                              pick(self.cls_attn_heads), pick(self.last_hidden), self.grid,
                              None if self.cls_attn_full is None else pick(self.cls_attn_full))


# A transform replaces the visual tokens: (features, raw questions) -> (tokens [B, K, D], mask [B, K]).
# A transform with ``uses_text = False`` promises to ignore the texts; then questions about one
# image share its compressed tokens and the LM prefill of the image prefix.
# A transform may add a third tensor, ``positions [B, K]`` long: the grid index each kept token
# stands at. The LM then gives token k the position it would have with every token present
# (prefix + index) and the text after the image the positions after the whole grid, instead of
# packing the kept tokens contiguously (see :func:`grid_position_shift`).
TokenTransform = Callable[[VisualFeatures, Sequence[str]], "tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]"]


def grid_position_shift(vmask: Tensor, positions: Tensor, n_grid: int) -> tuple[Tensor, Tensor]:
    """What to add to contiguous position ids so kept visual tokens sit at their grid positions.

    ``vmask [B, K]`` bool real tokens (padding anywhere), ``positions [B, K]`` grid index of
    each -> ``shift [B, K]`` for the visual slots (0 on padding) and ``tail [B]`` for every
    token after the image: contiguous ids count only real tokens, so real slot k (k-th real
    token) needs ``positions - k``, and text after K_b tokens needs ``n_grid - K_b``.
    """
    rank = vmask.long().cumsum(1) - 1
    shift = torch.where(vmask, positions.long() - rank, torch.zeros_like(rank))
    return shift, n_grid - vmask.long().sum(1)


class LMDecoder(Protocol):
    """Greedy-decoding state after a prefill: ``step(embeds [B, 1, D]) -> logits [B, V]``."""

    def step(self, embeds: Tensor) -> Tensor: ...


@runtime_checkable
class LMTransform(Protocol):
    """A transform that runs the LM prefill itself (FastV prunes visual tokens *inside* the LM).

    It receives every visual token, as one shared prefix per image and a suffix per sample:
    ``prefill(lvlm, prefix [U, P, D], prefix_mask [U, P], prefix_visual [U, P] bool,
    index [B], suffix [B, S, D], suffix_mask [B, S])`` — sample b is ``prefix[index[b]]``
    followed by ``suffix[b]`` (padding anywhere, hidden by the masks; ``prefix_visual`` marks
    the visual tokens; S may be 0, then the prefix is the whole prompt) — and returns the
    next-token logits ``[B, V]`` and an :class:`LMDecoder` that continues on its own cache.
    """

    def prefill(self, lvlm: "LVLM", prefix: Tensor, prefix_mask: Tensor, prefix_visual: Tensor, index: Tensor,
                suffix: Tensor, suffix_mask: Tensor) -> tuple[Tensor, LMDecoder]: ...


class DenseDecoder:
    """The plain LM's decoding state: its KV cache and the attention mask so far."""

    def __init__(self, lvlm: "LVLM", mask: Tensor, cache: DynamicCache, shift: Tensor | None = None,
                 tail: Tensor | None = None) -> None:
        """``shift [B, T]`` / ``tail [B]``: grid-position shift of the prompt and of every token
        after the image (generated ones included); both None for contiguous positions."""
        self.lvlm, self.mask, self.cache, self.shift, self.tail = lvlm, mask, cache, shift, tail

    def step(self, embeds: Tensor) -> Tensor:
        past = self.mask.shape[1]
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], 1)
        if self.shift is not None and self.tail is not None:
            self.shift = torch.cat([self.shift, self.tail[:, None].to(self.shift)], 1)
        logits, self.cache = self.lvlm._lm_step(embeds, self.mask, self.cache, past, self.shift)
        return logits


def uses_text(transform: TokenTransform | None) -> bool:
    """Whether a transform may depend on the question (unknown callables: assume it does)."""
    return transform is not None and bool(getattr(transform, "uses_text", True))


@contextlib.contextmanager
def _capture_cls_attention(attn: nn.Module, store: dict[str, Tensor]) -> Iterator[None]:
    """Hook one attention module (this instance only) to record its CLS row and keys.

    Only the CLS query is formed, so the cost is O(N) rather than the O(N^2) of returning the
    full attention map, and no attention implementation switch is needed.
    """

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        h = kwargs.get("hidden_states", args[0] if args else None)  # [B, 1 + N, Dv], after layer norm
        b, t, _ = h.shape
        nh, hd = module.num_heads, module.head_dim
        q = module.q_proj(h[:, :1]).view(b, 1, nh, hd).transpose(1, 2)          # [B, H, 1, hd]
        k = module.k_proj(h).view(b, t, nh, hd).transpose(1, 2)                   # [B, H, T, hd]
        attn_w = torch.softmax((q @ k.transpose(-1, -2)) * module.scale, dim=-1)  # [B, H, 1, T]
        store["cls_attn_heads"] = attn_w[:, :, 0, 1:]
        kf = k.transpose(1, 2).reshape(b, t, nh * hd)                             # [B, T, C]
        store["keys"] = kf[:, 1:]
        # The "full width" variant of the PruMerge / Recoverable Compression code: one head
        # over all C channels, softmax(q k^T / sqrt(C)).
        qf = q.transpose(1, 2).reshape(b, 1, nh * hd)
        full = torch.softmax((qf @ kf.transpose(1, 2)) / math.sqrt(nh * hd), dim=-1)
        store["cls_attn_full"] = full[:, 0, 1:]

    handle = attn.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def clip_patch_embeddings(clip: CLIPModel, tower: nn.Module, last_hidden: Tensor) -> Tensor:
    """Patches in CLIP's joint space: ``last_hidden [B, 1 + N, Dv]`` (the tower's last layer, CLS
    first) -> ``[B, N, P]`` unit vectors (post-LN + visual projection). One function for the
    adapter and :func:`vlmcompress.tokens.attach`, so both guide by the same similarities."""
    post_ln = getattr(tower, "vision_model", tower).post_layernorm
    return F.normalize(clip.visual_projection(post_ln(last_hidden[:, 1:])), dim=-1)


def clip_text_embeddings(clip: CLIPModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
                         pooling: str = "eos") -> Tensor:
    """CLIP text embeddings ``[B, P]``, unit norm. ``pooling='eos'``: CLIP's text tower pools at
    the EOS token; ``'last'``: as the official Recoverable Compression code, each text padded
    on the right to CLIP's context length, run without attention mask, read at the last
    position (a padding token that attends, causally, to the whole text)."""
    device = clip.text_projection.weight.device
    if pooling == "last":
        enc = tokenizer(list(texts), padding="max_length", truncation=True, padding_side="right",
                        max_length=clip.config.text_config.max_position_embeddings, return_tensors="pt")
        out = clip.text_model(input_ids=enc.input_ids.to(device), return_dict=True)
        return F.normalize(clip.text_projection(out.last_hidden_state[:, -1]), dim=-1)
    if pooling != "eos":
        raise ValueError(f"text pooling: expected 'eos' or 'last', got {pooling!r}")
    enc = tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
    out = clip.text_model(input_ids=enc.input_ids.to(device), attention_mask=enc.attention_mask.to(device),
                          return_dict=True)
    return F.normalize(clip.text_projection(out.pooler_output), dim=-1)


class LVLM:
    """An LLaVA-architecture model, its tokenizer, and the CLIP sharing its vision tower."""

    def __init__(self, llava: LlavaForConditionalGeneration, tokenizer: PreTrainedTokenizerBase,
                 clip: CLIPModel, clip_tokenizer: PreTrainedTokenizerBase, prompts: Prompts = Prompts(),
                 attn_layer: int = -1, image_mean: Sequence[float] = CLIP_MEAN,
                 image_std: Sequence[float] = CLIP_STD, image_aspect: Aspect = "resize") -> None:
        self.llava, self.tokenizer = llava, tokenizer
        self.clip, self.clip_tokenizer = clip, clip_tokenizer
        self.prompts = prompts
        self.attn_layer = attn_layer
        cfg = llava.config
        self.feature_layer = cfg.vision_feature_layer
        self.select = cfg.vision_feature_select_strategy
        if not isinstance(self.feature_layer, int):
            raise ValueError("only a single vision_feature_layer is supported")
        vcfg = cfg.vision_config
        self.image_size, self.patch_size = vcfg.image_size, vcfg.patch_size
        self.grid = (self.image_size // self.patch_size,) * 2
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        self.image_aspect = image_aspect
        eos = tokenizer.eos_token_id
        self.eos_ids = {eos} if eos is not None else set()

    # -- plumbing -------------------------------------------------------------------------
    @property
    def vision_tower(self) -> nn.Module:
        return self.llava.model.vision_tower

    @property
    def language_model(self) -> nn.Module:
        return self.llava.model.language_model

    @property
    def projector(self) -> nn.Module:
        """The multimodal projector: selected vision-layer features ``[B, N, Dv]`` (the tower's
        hidden states, ``VisualFeatures.hidden``) -> LM input embeddings ``[B, N, D]``."""
        return self.llava.model.multi_modal_projector

    @property
    def device(self) -> torch.device:
        return next(self.llava.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.llava.parameters()).dtype

    def to(self, device: str | torch.device) -> "LVLM":
        self.llava.to(device)
        self.clip.to(device)
        return self

    def eval(self) -> "LVLM":
        self.llava.eval()
        self.clip.eval()
        return self

    def preprocess(self, images: Tensor | Sequence[Tensor]) -> Tensor:
        """``[B, 3, H, W]`` or a list of ``[3, H_i, W_i]`` in [0, 1] -> normalised ``[B, 3, S, S]``
        in the model's dtype (the geometry in float32, differentiable)."""
        x = prepare([t.to(self.device) for t in images] if not isinstance(images, Tensor) else images.to(self.device),
                    self.image_size, self.image_aspect, self.image_mean, self.image_std)
        return x.to(next(self.vision_tower.parameters()).dtype)

    # -- vision ---------------------------------------------------------------------------
    def visual_features(self, images: Tensor) -> VisualFeatures:
        """Projected visual tokens and the CLS-attention of layer ``attn_layer``, with gradients."""
        layers = self.vision_tower.encoder.layers
        store: dict[str, Tensor] = {}
        with _capture_cls_attention(layers[self.attn_layer].self_attn, store):
            out = self.vision_tower(self.preprocess(images), output_hidden_states=True, return_dict=True)
        hidden = out.hidden_states[self.feature_layer]
        if self.select == "default":
            hidden = hidden[:, 1:]
        tokens = self.projector(hidden)
        heads = store["cls_attn_heads"]
        return VisualFeatures(tokens=tokens, hidden=hidden, keys=store["keys"], cls_attn=heads.mean(1),
                              cls_attn_heads=heads, last_hidden=out.last_hidden_state, grid=self.grid,
                              cls_attn_full=store["cls_attn_full"])

    def patch_embeddings(self, feats: VisualFeatures) -> Tensor:
        """Patches in CLIP's joint space: ``[B, N, P]`` unit vectors (post-LN + visual projection)."""
        return clip_patch_embeddings(self.clip, self.vision_tower, feats.last_hidden)

    def image_embeddings(self, images: Tensor) -> Tensor:
        """CLIP image embeddings ``[B, P]``, unit norm."""
        out = self.vision_tower(self.preprocess(images), return_dict=True)
        return F.normalize(self.clip.visual_projection(out.pooler_output), dim=-1)

    def text_embeddings(self, texts: Sequence[str], pooling: str = "eos") -> Tensor:
        """CLIP text embeddings ``[B, P]``, unit norm. ``pooling='eos'``: CLIP's text tower pools at
        the EOS token; ``'last'``: as the official Recoverable Compression code, each text padded
        on the right to CLIP's context length, run without attention mask, read at the last
        position (a padding token that attends, causally, to the whole text)."""
        return clip_text_embeddings(self.clip, self.clip_tokenizer, texts, pooling)

    # -- language -------------------------------------------------------------------------
    def _prompt_ids(self, task: str, texts: Sequence[str]) -> list[tuple[list[int], list[int]]]:
        out = []
        for t in texts:
            before, after = self.prompts.render(task, t)
            pre = self.tokenizer(before, add_special_tokens=True).input_ids
            post = self.tokenizer(after, add_special_tokens=False).input_ids
            out.append((pre, post))
        return out

    def _embed_ids(self, ids: list[int]) -> Tensor:
        emb = self.llava.get_input_embeddings()
        return emb(torch.tensor(ids, dtype=torch.long, device=self.device))

    def prompt_lengths(self, task: str, texts: Sequence[str]) -> list[int]:
        """Text tokens of each sample's prompt (everything but the visual tokens)."""
        return [len(pre) + len(post) for pre, post in self._prompt_ids(task, texts)]

    def build_inputs(self, vis_tokens: Tensor, vis_mask: Tensor, task: str, texts: Sequence[str],
                     answers: Sequence[str] | None = None, left_pad: bool = True
                     ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Per-sample ``[prefix, visual tokens (mask applied), suffix (, answer </s>)]``, padded.

        Returns ``inputs_embeds [B, T, D]``, ``attention_mask [B, T]`` and, with answers,
        ``labels [B, T]`` (-100 everywhere but the answer tokens and their EOS).
        """
        embeds, mask, labels, _ = self._assemble(vis_tokens, vis_mask, self._prompt_ids(task, texts),
                                                 answers, left_pad)
        return embeds, mask, labels

    def _assemble(self, vis_tokens: Tensor, vis_mask: Tensor, prompts: list[tuple[list[int], list[int]]],
                  answers: Sequence[str] | None = None, left_pad: bool = True
                  ) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
        """:meth:`build_inputs` from tokenised prompts, plus ``visual [B, T]`` bool: where the
        visual tokens sit in the padded sequence."""
        seqs, labels, spans = [], [], []
        for i, (pre, post) in enumerate(prompts):
            pre_e = self._embed_ids(pre)
            parts = [pre_e, vis_tokens[i][vis_mask[i]].to(pre_e.dtype), self._embed_ids(post)]
            spans.append((len(pre), parts[1].shape[0]))
            n_ctx = sum(p.shape[0] for p in parts)
            lab = [-100] * n_ctx
            if answers is not None:
                ans = self.tokenizer(" " + answers[i], add_special_tokens=False).input_ids
                ans = ans + [self.tokenizer.eos_token_id]
                parts.append(self._embed_ids(ans))
                lab += ans
            seqs.append(torch.cat(parts))
            labels.append(torch.tensor(lab, dtype=torch.long))
        t = max(s.shape[0] for s in seqs)
        d = seqs[0].shape[1]
        embeds = seqs[0].new_zeros(len(seqs), t, d)
        mask = torch.zeros(len(seqs), t, dtype=torch.long, device=self.device)
        visual = torch.zeros(len(seqs), t, dtype=torch.bool, device=self.device)
        lab_t = torch.full((len(seqs), t), -100, dtype=torch.long, device=self.device)
        for i, (s, lab) in enumerate(zip(seqs, labels)):
            start = t - s.shape[0] if left_pad else 0
            embeds[i, start:start + s.shape[0]] = s
            mask[i, start:start + s.shape[0]] = 1
            lab_t[i, start:start + s.shape[0]] = lab
            visual[i, start + spans[i][0]:start + spans[i][0] + spans[i][1]] = True
        return embeds, mask, (lab_t if answers is not None else None), visual

    def _lm_step(self, embeds: Tensor, mask: Tensor, cache: DynamicCache | None, past_len: int,
                 shift: Tensor | None = None) -> tuple[Tensor, DynamicCache]:
        """One LM call on the new columns of ``mask [B, T]`` (positions: :meth:`_position_ids`)."""
        pos = self._position_ids(mask, shift)[:, past_len:]
        out = self.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos,
                                  past_key_values=cache, use_cache=True, return_dict=True)
        return self.llava.lm_head(out.last_hidden_state[:, -1]), out.past_key_values

    @staticmethod
    def _position_ids(mask: Tensor, shift: Tensor | None = None) -> Tensor:
        """``[B, T]`` position ids counting real tokens of ``mask [B, T]``, plus ``shift [B, T]``
        (grid positions of compressed visual tokens) when given."""
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        return pos if shift is None else pos + shift

    @staticmethod
    def _apply(feats: VisualFeatures, texts: Sequence[str], transform: TokenTransform | None
               ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Visual tokens, their mask and (if the transform gives them) their grid positions."""
        if transform is None:
            b, n, _ = feats.tokens.shape
            return feats.tokens, torch.ones(b, n, dtype=torch.bool, device=feats.tokens.device), None
        out = transform(feats, texts)
        return (out[0], out[1], out[2]) if len(out) == 3 else (out[0], out[1], None)

    def _sequence_shift(self, vmask: Tensor, positions: Tensor | None, n_grid: int,
                        prompts: list[tuple[list[int], list[int]]], mask: Tensor, left_pad: bool
                        ) -> tuple[Tensor | None, Tensor | None]:
        """``shift [B, T]`` for :meth:`_assemble`'s layout ``[pre, real visual, post (, answer)]``
        padded to ``mask [B, T]``, and ``tail [B]`` (after the image); Nones without positions."""
        if positions is None:
            return None, None
        vshift, tail = grid_position_shift(vmask, positions.to(vmask.device), n_grid)
        out = torch.zeros_like(mask)
        for i, (pre, _) in enumerate(prompts):
            n = int(mask[i].sum())
            row = torch.full((n,), int(tail[i]), dtype=out.dtype, device=out.device)
            row[:len(pre)] = 0
            v = vshift[i][vmask[i]]
            row[len(pre):len(pre) + v.shape[0]] = v
            start = out.shape[1] - n if left_pad else 0
            out[i, start:start + n] = row
        return out, tail

    def _split_inputs(self, vis: Tensor, vmask: Tensor, pre: list[int], posts: list[list[int]]
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``[pre, visual]`` once per image and each sample's suffix, left-padded.

        vis [U, K, D], vmask [U, K] -> prefix [U, P, D], prefix_mask [U, P], prefix_visual [U, P],
        suffix [B, S, D], suffix_mask [B, S]
        """
        u = vmask.shape[0]
        prefix = torch.cat([self._embed_ids(pre).unsqueeze(0).expand(u, -1, -1), vis.to(self.dtype)], 1)
        ones = torch.ones(u, len(pre), dtype=torch.long, device=self.device)
        pmask = torch.cat([ones, vmask.to(device=self.device, dtype=torch.long)], 1)
        pvisual = torch.cat([torch.zeros_like(ones, dtype=torch.bool), vmask.to(self.device).bool()], 1)
        s = max(len(x) for x in posts)
        suffix = prefix.new_zeros(len(posts), s, prefix.shape[-1])
        smask = torch.zeros(len(posts), s, dtype=torch.long, device=self.device)
        for i, post in enumerate(posts):
            if post:
                suffix[i, s - len(post):] = self._embed_ids(post)
                smask[i, s - len(post):] = 1
        return prefix, pmask, pvisual, suffix, smask

    def _prefill_shared(self, prefix: Tensor, pmask: Tensor, suffix: Tensor, smask: Tensor, index: Tensor,
                        pshift: Tensor | None = None, tail: Tensor | None = None) -> tuple[Tensor, DenseDecoder]:
        """Prefill each image's prefix once, then each sample's suffix after its image's prefix.

        The attention mask hides all padding and positions follow the mask (plus ``pshift
        [U, P]`` and, after the prefix, ``tail [U]`` for grid positions), so results equal a
        per-sample prefill.
        """
        index = index.to(self.device)
        _, cache = self._lm_step(prefix, pmask, None, 0, pshift)
        cache.reorder_cache(index)
        mask = torch.cat([pmask.index_select(0, index), smask], 1)
        shift = tail_b = None
        if pshift is not None and tail is not None:
            tail_b = tail.index_select(0, index)
            shift = torch.cat([pshift.index_select(0, index), tail_b[:, None].expand(-1, smask.shape[1])], 1)
        logits, cache = self._lm_step(suffix, mask, cache, prefix.shape[1], shift)
        return logits, DenseDecoder(self, mask, cache, shift, tail_b)

    def transform_texts(self, task: str, texts: Sequence[str]) -> list[str]:
        """What a transform sees: the raw question / referring expression; for captions (no
        user text) the caption instruction. Never the chat template or the system prompt."""
        return [self.prompts.instruction(task) if task == "caption" else t for t in texts]

    @torch.inference_mode()
    def generate(self, images: Tensor, texts: Sequence[str] | None = None, task: str = "vqa",
                 transform: TokenTransform | LMTransform | None = None, max_new_tokens: int = 16,
                 image_index: Sequence[int] | Tensor | None = None) -> list[str]:
        """Greedy answers for a batch. ``texts``: questions (vqa), referring expressions (ground).

        ``images [U, 3, H, W]``; ``image_index [B]`` names each sample's image (default: one
        sample per image), so many questions about one image run the vision tower once and,
        unless the ``transform`` reads the question, share the LM prefill of the image prefix.
        ``transform`` receives :meth:`transform_texts` — never the chat template or system prompt;
        an :class:`LMTransform` also runs the LM prefill (pruning inside the LM).
        """
        return self.generate_from_features(self.visual_features(images), texts, task, transform,
                                           max_new_tokens, image_index)

    @torch.inference_mode()
    def generate_from_features(self, feats: VisualFeatures, texts: Sequence[str] | None = None,
                               task: str = "vqa", transform: TokenTransform | LMTransform | None = None,
                               max_new_tokens: int = 16, image_index: Sequence[int] | Tensor | None = None
                               ) -> list[str]:
        """:meth:`generate` on visual features computed once (e.g. reused by many transforms)."""
        u = feats.tokens.shape[0]
        index = torch.arange(u) if image_index is None else torch.as_tensor(image_index).long()
        b = index.shape[0]
        texts = list(texts) if texts is not None else [""] * b
        if len(texts) != b:
            raise ValueError(f"{b} samples but {len(texts)} texts")
        prompts = self._prompt_ids(task, texts)
        in_lm = isinstance(transform, LMTransform)
        # One prefix per image needs a suffix per sample: with nothing after the image (a
        # template ending in <image>) the plain path would read logits at a prefix column,
        # which may be padding of a compressed image; such prompts go one sequence per sample.
        shared = all(pre == prompts[0][0] for pre, _ in prompts) and (in_lm or all(post for _, post in prompts))
        decoder: LMDecoder
        if shared and (in_lm or not uses_text(transform)):
            # The visual tokens do not depend on the question: one prefix per image.
            vis, vmask, gpos = self._apply(feats, [""] * u, None if in_lm else transform)
            parts = self._split_inputs(vis, vmask, prompts[0][0], [p for _, p in prompts])
            if in_lm:
                logits, decoder = transform.prefill(self, *parts[:3], index.to(self.device), *parts[3:])
            else:
                prefix, pmask, _, suffix, smask = parts
                pshift = tail = None
                if gpos is not None:
                    vshift, tail = grid_position_shift(vmask.to(self.device).bool(), gpos.to(self.device),
                                                       feats.tokens.shape[1])
                    pshift = torch.cat([torch.zeros_like(pmask[:, :len(prompts[0][0])]), vshift], 1)
                logits, decoder = self._prefill_shared(prefix, pmask, suffix, smask, index, pshift, tail)
        else:
            feats = feats if image_index is None else feats.index(index.to(feats.tokens.device))
            vis, vmask, gpos = self._apply(feats, self.transform_texts(task, texts), None if in_lm else transform)
            embeds, mask, _, visual = self._assemble(vis, vmask.bool(), prompts)
            if in_lm:
                logits, decoder = transform.prefill(self, embeds, mask, visual, torch.arange(b, device=self.device),
                                                    embeds[:, :0], mask[:, :0])
            else:
                shift, tail = self._sequence_shift(vmask.bool(), gpos, feats.tokens.shape[1], prompts, mask, True)
                logits, cache = self._lm_step(embeds, mask, None, 0, shift)
                decoder = DenseDecoder(self, mask, cache, shift, tail)
        done = torch.zeros(b, dtype=torch.bool, device=self.device)
        out: list[list[int]] = [[] for _ in range(b)]
        emb = self.llava.get_input_embeddings()
        for step in range(max_new_tokens):
            nxt = logits.argmax(-1)
            for i in range(b):
                if not done[i]:
                    if int(nxt[i]) in self.eos_ids:
                        done[i] = True
                    else:
                        out[i].append(int(nxt[i]))
            if bool(done.all()) or step == max_new_tokens - 1:   # no LM step whose logits go unused
                break
            logits = decoder.step(emb(nxt)[:, None])
        return [self.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in out]

    def answer_logits(self, images: Tensor, texts: Sequence[str], answers: Sequence[str], task: str = "vqa",
                      transform: TokenTransform | None = None) -> tuple[Tensor, Tensor]:
        """Teacher-forced ``answers`` after each prompt: ``logits [B, T-1, V]`` at every position
        and the ``labels [B, T-1]`` they predict (-100 but on answer tokens and their EOS)."""
        if isinstance(transform, LMTransform):
            raise ValueError("answer_logits: a transform that prunes inside the LM is not supported")
        feats = self.visual_features(images)
        vis, vmask, gpos = self._apply(feats, self.transform_texts(task, texts), transform)
        prompts = self._prompt_ids(task, texts)
        embeds, mask, labels, _ = self._assemble(vis, vmask.bool(), prompts, answers, left_pad=False)
        shift, _ = self._sequence_shift(vmask.bool(), gpos, feats.tokens.shape[1], prompts, mask, False)
        pos = self._position_ids(mask, shift)
        h = self.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos,
                                return_dict=True).last_hidden_state
        return self.llava.lm_head(h[:, :-1]), labels[:, 1:]

    def answer_loss(self, images: Tensor, texts: Sequence[str], answers: Sequence[str], task: str = "vqa",
                    transform: TokenTransform | None = None) -> Tensor:
        """Mean cross-entropy over answer tokens (+EOS); differentiable w.r.t. ``images``."""
        logits, labels = self.answer_logits(images, texts, answers, task, transform)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)
