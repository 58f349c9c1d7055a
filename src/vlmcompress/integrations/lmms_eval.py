"""The lmms-eval model ``vlmcompress``: a Hugging Face VLM with a token method attached.

::

    lmms-eval --model vlmcompress \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=recoverable,budget=0.1 \\
        --tasks TASK --batch_size 8

``pretrained``: a local folder or hub id of a model :func:`vlmcompress.tokens.attach` supports
(LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL), loaded with its processor. ``method``: a
registered token method; ``budget``: a decimal is a fraction of each image's tokens (``1.0``
keeps all), an integer a token count, ``none`` the method's adaptive mode. Every other key is
a parameter of the method (``salient_share=0.6``, ``text_weight=none``); the model's own keys
are :data:`MODEL_ARGS`. A bad name or value fails before the model loads, in one line.

Prompts and decoding follow lmms-eval's ``llava_hf`` model, so at budget 1.0 the outputs are
``llava_hf``'s: the processor's chat template renders the task's messages; decoding is greedy
unless the task sets a temperature, stops at the tokenizer's EOS or after ``max_new_tokens``
(1024 if the task sets none); a task's ``until`` strings are not applied, as in ``llava_hf``.
Unlike ``llava_hf``, requests run in batches of ``--batch_size`` (left padding; requests with
different generation settings never share a batch).

Two implementations, as lmms-eval's built-in models have: :class:`VlmcompressChat` (the
default; the task's messages) and :class:`VlmcompressSimple` (``--force_simple``; the task's
text and visuals as one user turn, which renders the same prompt). Both answer log-likelihood
requests (lmms-eval sends them for ``multiple_choice`` tasks, to simple models) as lmms-eval's
models do: the mean negative log-likelihood of the continuation's tokens given the prompt and
its images (lmms-eval picks the choice with the lowest), and whether greedy decoding produces
the continuation.
"""
from __future__ import annotations

import dataclasses
import json
import time
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from lmms_eval.protocol import ChatMessages
from loguru import logger
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from tqdm import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor

from vlmcompress.integrations import LMMS_EVAL_MODEL as NAME
from vlmcompress.tokens import ADAPTIVE, METHOD_PARAMS, METHODS, attach, resolve_budget

# The model's own --model_args keys; every other key is a parameter of the method.
MODEL_ARGS = ("pretrained", "method", "budget", "device", "dtype", "batch_size", "attention", "attn_layer",
              "seed", "use_cache", "attn_implementation", "max_batch_size")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ATTENTIONS = ("head_mean", "full")          # CLS-attention variants the methods rank by
DEFAULT_MAX_NEW_TOKENS = 1024               # llava_hf's when a task sets none
NONE_WORDS = ("none", "null")


# --- --model_args ---------------------------------------------------------------------------

def parse_budget(method: str, value: Any) -> int | float | None:
    """``budget`` as lmms-eval parsed it ('0.1' -> 0.1, '64' -> 64, 'none' stays a string)."""
    if isinstance(value, str) and value.lower() in NONE_WORDS:
        if method not in ADAPTIVE:
            raise ValueError(f"{NAME}: budget=none is the adaptive mode, which {method} does not have "
                             f"(adaptive: {', '.join(sorted(ADAPTIVE))})")
        return None
    try:
        resolve_budget(1, value)
    except ValueError as exc:
        raise ValueError(f"{NAME}: {exc}") from None
    return value


def _coerce(value: Any, hint: Any) -> Any:
    """A parsed --model_args value for a params field annotated ``hint``: 'none' -> None where the
    field allows it, an int -> float where the field is a float."""
    allowed = typing.get_args(hint) or (hint,)
    if isinstance(value, str) and value.lower() in NONE_WORDS and type(None) in allowed:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and float in allowed and int not in allowed:
        return float(value)
    return value


def method_params(method: str, raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` (the --model_args keys not in :data:`MODEL_ARGS`) checked as ``method``'s parameters."""
    if method not in METHODS:
        raise ValueError(f"{NAME}: unknown method {method!r} (methods that compress the visual tokens: "
                         f"{', '.join(METHODS)})")
    cls = METHOD_PARAMS[method]
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    out = {}
    for key, value in raw.items():
        if key not in names:
            raise ValueError(f"{NAME}: unknown argument {key!r}: neither a model argument ({', '.join(MODEL_ARGS)}) "
                             f"nor a parameter of {method} ({', '.join(names) or 'none'})")
        out[key] = _coerce(value, hints[key])
    try:
        cls(**out)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{NAME}: {method}: {exc}") from None
    return out


def parse_batch_size(value: Any) -> int:
    try:
        size = int(value)
    except (TypeError, ValueError):
        size = 0
    if isinstance(value, bool) or size < 1 or str(size) != str(value).strip():
        raise ValueError(f"{NAME}: batch_size must be a positive integer, got {value!r}")
    return size


def int_arg(name: str, value: Any) -> int | None:
    """An integer model argument; lmms-eval parses '-2' as the float -2.0."""
    if value is None or (isinstance(value, str) and value.lower() in NONE_WORDS):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise ValueError(f"{NAME}: {name} must be an integer, got {value!r}")
    return int(value)


def torch_dtype(value: str) -> torch.dtype | str:
    if value == "auto":
        return "auto"
    if value not in DTYPES:
        raise ValueError(f"{NAME}: dtype must be auto or one of {', '.join(DTYPES)}, got {value!r}")
    return DTYPES[value]


# --- requests -------------------------------------------------------------------------------

def batches(keys: Sequence[str], size: int) -> list[list[int]]:
    """Request indices in batches of at most ``size``, each batch of one key, in request order."""
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return [idx[a:a + size] for idx in groups.values() for a in range(0, len(idx), size)]


def settings_key(gen_kwargs: dict[str, Any]) -> str:
    """Requests with equal keys may share a ``generate`` call."""
    return json.dumps(gen_kwargs, sort_keys=True, default=repr)


def decoding(gen_kwargs: dict[str, Any]) -> dict[str, Any]:
    """``generate`` keywords from a task's ``generation_kwargs``, with llava_hf's defaults."""
    temperature = float(gen_kwargs.get("temperature") or 0)
    sample = temperature > 0
    return {"do_sample": sample, "temperature": temperature if sample else None, "top_p": gen_kwargs.get("top_p"),
            "num_beams": int(gen_kwargs.get("num_beams") or 1),
            "max_new_tokens": int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)}


def as_image(visual: Any) -> Image.Image:
    """A task's visual as a PIL image (a path is opened); videos and audio are refused."""
    if isinstance(visual, Image.Image):
        return visual
    if isinstance(visual, (str, Path)):
        try:
            with Image.open(visual) as im:
                return im.convert("RGB")
        except (UnidentifiedImageError, OSError):
            pass
    raise ValueError(f"{NAME}: images only (token methods compress image tokens), got {str(visual)[:80]!r}")


def user_turn(n_images: int, text: str, image_token: str | None) -> list[dict[str, Any]]:
    """One user message: the images, then the text; a text that places its own image tokens
    (``<image>`` in it) is left as it is."""
    content: list[dict[str, Any]] = []
    if not (image_token and image_token in text):
        content = [{"type": "image"} for _ in range(n_images)]
    return [{"role": "user", "content": content + [{"type": "text", "text": text}]}]


def generated_lengths(new: Tensor, eos: int | None) -> list[int]:
    """Tokens each row generated (its EOS included): ``new [B, T]`` is padded with EOS after it."""
    if eos is None:
        return [new.shape[1]] * new.shape[0]
    hit = new == eos
    return torch.where(hit.any(1), hit.int().argmax(1) + 1, new.shape[1]).tolist()


@dataclasses.dataclass
class Tally:
    """What one ``generate_until`` call did: generated tokens and seconds in ``generate``, images,
    visual tokens the language model saw, and the images' uncompressed token counts."""

    gen_tokens: int = 0
    seconds: float = 0.0
    images: int = 0
    kept: int = 0
    total: int = 0

    def metrics(self) -> dict[str, float]:
        """lmms-eval's throughput record (its results file reports ``avg_<key>`` of each)."""
        per = max(self.images, 1)
        return {"visual_tokens_per_image": self.kept / per, "visual_tokens_per_image_uncompressed": self.total / per}


def continuation_loss(logits: Tensor, cont: Tensor) -> tuple[float, bool]:
    """``logits [L, V]`` of a sequence that ends with ``cont [n]``: the mean negative
    log-likelihood of ``cont``'s tokens and whether greedy decoding produces ``cont``."""
    n = cont.shape[0]
    logp = logits[-n - 1:-1].float().log_softmax(-1)                       # [n, V] predicts cont
    cont = cont.to(logp.device)
    return float(-logp.gather(1, cont[:, None]).mean()), bool((logp.argmax(-1) == cont).all())


# --- the model --------------------------------------------------------------------------------

class _Vlmcompress(lmms):
    """Shared by both implementations: loading, the attached method, batched generation and
    log-likelihood."""

    def __init__(self, pretrained: str, method: str = "recoverable", budget: Any = 0.1, device: str | None = None,
                 dtype: str = "auto", batch_size: Any = 1, attention: str = "head_mean", attn_layer: int | None = None,
                 seed: int = 0, use_cache: bool = True, attn_implementation: str | None = None,
                 max_batch_size: Any = None, **params: Any) -> None:   # max_batch_size: lmms-eval passes it; unused
        super().__init__()
        self.method = str(method)
        self.params = method_params(self.method, params)
        self.budget = parse_budget(self.method, budget)
        if attention not in ATTENTIONS:
            raise ValueError(f"{NAME}: attention must be one of {', '.join(ATTENTIONS)}, got {attention!r}")
        self.batch_size_per_gpu = parse_batch_size(batch_size)
        layer, seed = int_arg("attn_layer", attn_layer), int_arg("seed", seed) or 0
        dt = torch_dtype(str(dtype))
        if Accelerator().num_processes > 1:
            raise ValueError(f"{NAME}: runs in one process (launch lmms-eval without accelerate's data parallelism)")
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        try:
            model = AutoModelForImageTextToText.from_pretrained(pretrained, dtype=dt,
                                                                attn_implementation=attn_implementation)
            self.processor = AutoProcessor.from_pretrained(pretrained)
        except OSError as exc:
            raise ValueError(f"{NAME}: cannot load {pretrained!r}: {str(exc).splitlines()[0]}") from None
        self._model = model.to(self._device).eval()
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"       # batched generation continues every row at the end
        self.handle = attach(self._model, self.method, self.budget, attention=attention, attn_layer=layer,
                             tokenizer=self.processor, seed=seed, **self.params)
        self.use_cache = bool(use_cache)
        self.chat_template = None                  # lmms-eval reads it with --apply_chat_template

    @property
    def model(self) -> torch.nn.Module:
        return self._model

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    def clean(self) -> None:
        self.handle.detach()
        super().clean()

    # -- generation --------------------------------------------------------------------------
    def _prompt(self, messages: list[dict[str, Any]]) -> str:
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _generate(self, prompts: list[str], images: list[list[Image.Image]], gen_kwargs: dict[str, Any],
                  tally: Tally) -> list[GenerationResult]:
        """One ``generate`` call for a batch of rendered prompts and their images."""
        flat = [im for row in images for im in row]
        inputs = self.processor(images=flat or None, text=prompts, padding=True, return_tensors="pt")
        inputs = inputs.to(self._device, self._model.dtype)
        eos = self.tokenizer.eos_token_id
        start = time.perf_counter()
        out = self._model.generate(**inputs, **decoding(gen_kwargs), use_cache=self.use_cache, pad_token_id=eos,
                                   eos_token_id=eos)
        tally.seconds += time.perf_counter() - start
        if flat:
            tally.images += len(flat)
            tally.kept += sum(self.handle.stats["tokens"])
            tally.total += sum(self.handle.stats["total"])
        new = out[:, inputs["input_ids"].shape[1]:]
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        lengths = generated_lengths(new, eos)
        tally.gen_tokens += sum(lengths)
        return [GenerationResult(text=t, token_counts=TokenCounts(output_tokens=n)) for t, n in zip(texts, lengths)]

    def _run(self, requests: list[Instance], render: Callable[[tuple], tuple[str, list[Image.Image]]],
             settings: Callable[[tuple], dict[str, Any]]) -> list[GenerationResult]:
        """Every request in batches: ``render(args)`` gives its prompt and images, ``settings(args)``
        its generation kwargs. Results come back in request order."""
        args = [r.args for r in requests]
        plan = batches([settings_key(settings(a)) for a in args], self.batch_size)
        results: list[GenerationResult | None] = [None] * len(args)
        tally = Tally()
        for idx in tqdm(plan, disable=self.rank != 0, desc="Model Responding"):
            prompts, images = zip(*(render(args[i]) for i in idx))
            for i, res in zip(idx, self._generate(list(prompts), list(images), settings(args[idx[0]]), tally)):
                results[i] = res
        extra = tally.metrics()
        logger.info(f"{NAME}: {self.method} at budget {self.budget}: the language model saw "
                    f"{extra['visual_tokens_per_image']:.1f} of {extra['visual_tokens_per_image_uncompressed']:.1f} "
                    f"visual tokens per image ({tally.images} images)")
        log_metrics(total_elapsed_time=tally.seconds, total_gen_tokens=tally.gen_tokens,
                    avg_speed=tally.gen_tokens / tally.seconds if tally.seconds > 0 else 0.0,
                    additional_metrics=extra)
        return results

    def _doc(self, doc_id: int, task: str, split: str) -> dict[str, Any]:
        return self.task_dict[task][split][doc_id]

    def _simple_prompt(self, context: str, visuals: Any) -> tuple[str, list[Image.Image]]:
        """A task's text and visuals as one user turn."""
        images = [as_image(v) for v in (visuals or []) if v is not None]
        image_token = getattr(self.processor, "image_token", None)
        return self._prompt(user_turn(len(images), context, image_token)), images

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError(f"{NAME}: multi-round generation is not supported")

    # -- log-likelihood ----------------------------------------------------------------------
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(mean negative log-likelihood of the continuation's tokens, whether greedy decoding
        produces it) per request ``(context, continuation, doc_to_visual, doc_id, task, split)``."""
        out = []
        for context, target, to_visual, doc_id, task, split in tqdm([r.args for r in requests], desc="Model Responding",
                                                                     disable=self.rank != 0):
            doc = self._doc(doc_id, task, split)
            continuation = target if isinstance(target, str) else target(doc)
            prompt, images = self._simple_prompt(context, to_visual(doc) if callable(to_visual) else to_visual)
            out.append(self._loglikelihood(prompt, continuation, images))
        return out

    def _loglikelihood(self, prompt: str, continuation: str, images: list[Image.Image]) -> tuple[float, bool]:
        n_prompt = self.processor(images=images or None, text=[prompt], return_tensors="pt")["input_ids"].shape[1]
        inputs = self.processor(images=images or None, text=[prompt + continuation], return_tensors="pt")
        inputs = inputs.to(self._device, self._model.dtype)
        ids = inputs["input_ids"][0]
        if ids.shape[0] <= n_prompt:
            raise ValueError(f"{NAME}: the continuation {continuation[:80]!r} adds no tokens to the prompt")
        with torch.inference_mode():
            # The method shortens the image's span; the text after it keeps its place at the end.
            logits = self._model(**inputs, use_cache=False).logits[0]
        return continuation_loss(logits, ids[n_prompt:])


class VlmcompressChat(_Vlmcompress):
    """``--model vlmcompress``: requests ``(context, doc_to_messages, gen_kwargs, doc_id, task, split)``."""

    is_simple = False

    def _render_messages(self, a: tuple) -> tuple[str, list[Image.Image]]:
        _, to_messages, _, doc_id, task, split = a
        chat = ChatMessages(messages=to_messages(self._doc(doc_id, task, split)))
        images, videos, audios = chat.extract_media()
        if videos or audios:
            raise ValueError(f"{NAME}: images only (token methods compress image tokens); doc {doc_id} of {task} "
                             f"has {len(videos)} videos and {len(audios)} audio clips")
        return self._prompt(chat.model_dump()["messages"]), [as_image(v) for v in images]

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        return self._run(requests, self._render_messages, lambda a: a[2])


class VlmcompressSimple(_Vlmcompress):
    """``--model vlmcompress --force_simple``: requests ``(context, gen_kwargs, doc_to_visual,
    doc_id, task, split)``, and log-likelihood requests."""

    is_simple = True

    def _render_text(self, a: tuple) -> tuple[str, list[Image.Image]]:
        context, _, to_visual, doc_id, task, split = a
        return self._simple_prompt(context, to_visual(self._doc(doc_id, task, split)))

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        return self._run(requests, self._render_text, lambda a: a[1])
