"""Measured cost of a compressed prefill: latency, selection overhead, peak memory.

Prefill = time to the first token: vision tower, the method's selection and merging (for
text-guided methods including CLIP's text tower), and the LM prefill — one
``LVLM.generate(..., max_new_tokens=1)`` call, the median over repeats after one warm-up;
repeats go round-robin over the configurations compared.
Selection time is measured around the transform (FastV: around its in-LM scoring and gather),
so ``selection_ms / prefill_ms`` is the method's own overhead; ``text_ms`` is the part of it
spent in the CLIP text tower (text-guided methods only).

Peak memory: on CUDA the allocator's peak above the memory held before the call; on the
CPU (no allocator statistics) the peak total size of the tensor storages created during the
call, tracked by a dispatch mode that sees every allocation and a finalizer on every storage.
Both exclude the weights, so they show what the token count changes: activations and cache.
"""
from __future__ import annotations

import statistics
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from vlmcompress.tokens.fastv import FastV


class _StorageTracker(TorchDispatchMode):
    """Bytes of live storages created under the mode; ``peak`` is their maximum."""

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: dict[int, int] = {}

    def _release(self, key: int, nbytes: int) -> None:
        if self._live.pop(key, None) is not None:
            self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, Tensor) or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in self._live:     # views share their base's storage
                continue
            self._live[key] = nbytes
            self.current += nbytes
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._release, key, nbytes)
        return out


def peak_memory_mb(fn, device: torch.device) -> float:
    """Peak memory (MB) ``fn()`` allocates beyond what was held before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
    tracker = _StorageTracker()
    with tracker:
        fn()
    return tracker.peak / 2 ** 20


class _TimedTransform:
    """A pre-LM transform with a stopwatch around it (keeps ``uses_text``)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.seconds = 0.0
        self.uses_text = bool(getattr(inner, "uses_text", True))

    def __call__(self, feats, texts):
        t0 = time.perf_counter()
        out = self.inner(feats, texts)
        self.seconds += time.perf_counter() - t0
        return out


@dataclass(frozen=True)
class PrefillCost:
    prefill_ms: float     # median time to the first token (vision + selection + LM prefill)
    vision_ms: float      # median vision-tower time (the same for every method)
    selection_ms: float   # median selection + merging time inside the prefill (text encoding included)
    text_ms: float        # median of the part spent encoding the questions (CLIP text tower)
    peak_mb: float        # peak memory of one prefill beyond the weights


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def prefill_once(lvlm: Any, images: Tensor, texts: Sequence[str], transform: Any,
                 image_index: Sequence[int] | None = None) -> tuple[float, float, float]:
    """(seconds to the first token, seconds of it spent selecting and merging, seconds of that
    spent in the text encoder) of one call; ``transform`` must be fresh (its counters at 0)."""
    device = lvlm.device
    timed = transform if (transform is None or isinstance(transform, FastV)) else _TimedTransform(transform)
    _sync(device)
    t0 = time.perf_counter()
    lvlm.generate(images, texts, transform=timed, max_new_tokens=1, image_index=image_index)
    _sync(device)
    total = time.perf_counter() - t0
    if transform is None:
        return total, 0.0, 0.0
    text = float(getattr(transform, "text_seconds", 0.0))
    return total, transform.selection_seconds if isinstance(transform, FastV) else timed.seconds, text


@torch.inference_mode()
def vision_once(lvlm: Any, images: Tensor) -> float:
    _sync(lvlm.device)
    t0 = time.perf_counter()
    lvlm.visual_features(images)
    _sync(lvlm.device)
    return time.perf_counter() - t0


@torch.inference_mode()
def measure_prefills(lvlm: Any, images: Tensor, texts: Sequence[str], makers: dict[str, Callable[[], Any]],
                     repeats: int = 5, image_index: Sequence[int] | None = None) -> dict[str, PrefillCost]:
    """Cost of prefilling ``texts`` about ``images`` with each transform ``makers[name]()``
    builds (``None``: every token); a fresh transform per call, so no cached text embedding
    helps. After one warm-up each, the repeats go round-robin over the configurations, so a
    burst of load on a shared machine slows all of them alike instead of one."""
    for make in makers.values():
        prefill_once(lvlm, images, texts, make(), image_index)
    times: dict[str, list[tuple[float, float, float]]] = {name: [] for name in makers}
    vision: list[float] = []
    for _ in range(repeats):
        vision.append(vision_once(lvlm, images))
        for name, make in makers.items():
            times[name].append(prefill_once(lvlm, images, texts, make(), image_index))
    vis_ms = 1e3 * statistics.median(vision)
    out = {}
    for name, make in makers.items():
        peak = peak_memory_mb(lambda: lvlm.generate(images, texts, transform=make(), max_new_tokens=1,
                                                    image_index=image_index), lvlm.device)
        out[name] = PrefillCost(prefill_ms=1e3 * statistics.median(t for t, _, _ in times[name]), vision_ms=vis_ms,
                                selection_ms=1e3 * statistics.median(s for _, s, _ in times[name]),
                                text_ms=1e3 * statistics.median(t for _, _, t in times[name]), peak_mb=peak)
    return out
