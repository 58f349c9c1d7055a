"""Code a set of images with many codecs at many points: real files, a cache, a process pool.

A *codec* is an anchor (``codec.anchors``: name + options, integer quality points) or a
learned codec saved by the codec stage (a folder ``load_codec`` reads, float rate points).
Every (codec, point, image) is encoded to the bytes of a real file and decoded back from
those bytes; the rate is ``len(file)``. Both the file and the decoded PNG are kept in a
cache folder, one per (codec, point)::

    <cache>/<codec>/<point label>/manifest.json     identity, point, one entry per image
    <cache>/<codec>/<point label>/<image>.<ext>     the coded file (.jpg .webp .avif .heic .266 .vlmc)
    <cache>/<codec>/<point label>/<image>.png       what the receiver decodes

An image is re-coded only when the codec's identity (anchor options and library versions,
or the learned model's weight hash), the point or the image's pixels changed, so re-running
the tasks on decoded images costs no encoding. Work is spread over a process pool (one task
per codec and image, all points of it), with one progress bar.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import multiprocessing
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from vlmcompress.codec.bitstream import VERSION as BITSTREAM_VERSION
from vlmcompress.io import atomic_path, write_json

Point = int | float
MANIFEST = "manifest.json"
_EXT = {"jpeg": ".jpg", "webp": ".webp", "avif": ".avif", "hevc": ".heic", "vvc": ".266"}
LEARNED_EXT = ".vlmc"
RD_COLUMNS = ("codec", "point", "image", "nbytes", "bpp", "psnr", "ms_ssim")


# --- what is coded ---------------------------------------------------------------------------

@functools.cache
def library_versions() -> dict[str, str]:
    """Versions of the libraries behind the anchors (part of an anchor's cache identity)."""
    import PIL

    out = {"pillow": PIL.__version__}
    for mod in ("pillow_heif", "imageio_ffmpeg"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = "absent"
    return out


@dataclass(frozen=True)
class CodecSpec:
    """One codec of a sweep (picklable, so pool workers can rebuild it)."""

    name: str                                   # row name in the curves ("vvc", "ours", ...)
    kind: Literal["anchor", "learned"]
    options: dict[str, Any] = field(default_factory=dict)   # anchor options
    codec: str = ""                             # anchor: its registered name ("": ``name``)
    model_dir: str = ""                         # learned: the saved model folder
    model_hash: str = ""                        # learned: hash of its weights
    levels: int = 0                             # learned: rates lie in [0, levels - 1]
    needs_tokens: bool = False                  # learned: pre-editing fuses LVLM tokens

    @classmethod
    def anchor(cls, name: str, options: Mapping[str, Any] | None = None, codec: str = "") -> CodecSpec:
        """Anchor ``codec`` (default ``name``) with ``options``, its rows named ``name``."""
        return cls(name=name, kind="anchor", options=dict(options or {}), codec="" if codec == name else codec)

    @property
    def anchor_name(self) -> str:
        """The key of ``codec.anchors.ANCHORS`` this spec codes with."""
        return self.codec or self.name

    def make(self):
        """The anchor codec object (:func:`vlmcompress.codec.anchors.make_anchor`)."""
        from vlmcompress.codec.anchors import make_anchor

        return make_anchor(self.anchor_name, **self.options)

    @classmethod
    def learned(cls, name: str, model_dir: str | Path) -> CodecSpec:
        """A learned codec from its saved folder (read from ``codec.json``, weights not loaded)."""
        from vlmcompress.codec.config import CodecModelParams
        from vlmcompress.codec.train import read_codec_record, resolve_model_dir
        from vlmcompress.schema import from_dict

        folder = resolve_model_dir(model_dir)
        record = read_codec_record(folder)
        mp = from_dict(CodecModelParams, record.get("model"), f"{folder}/codec.json:model")
        return cls(name=name, kind="learned", model_dir=str(folder),
                   model_hash=str(record.get("model_hash", "")), levels=mp.levels,
                   needs_tokens=mp.preedit.enabled and mp.preedit.use_tokens)

    def identity(self) -> dict[str, Any]:
        """Everything the coded bytes depend on, besides the point and the image."""
        if self.kind == "anchor":   # defaults included: a changed default re-codes
            return {"anchor": self.anchor_name, "options": self.make().settings(), "libs": library_versions()}
        return {"learned": self.model_hash, "format": BITSTREAM_VERSION}

    @property
    def ext(self) -> str:
        return _EXT.get(self.anchor_name, ".bin") if self.kind == "anchor" else LEARNED_EXT

    def label(self, point: Point) -> str:
        """Folder name of a point: ``q042`` (anchor quality) or ``r1.500`` (learned rate)."""
        return f"q{int(point):03d}" if self.kind == "anchor" else f"r{float(point):.3f}"


def pixel_hash(img: np.ndarray) -> str:
    """Identity of an image's pixels (shape included)."""
    h = hashlib.sha256(repr(img.shape).encode())
    h.update(np.ascontiguousarray(img).tobytes())
    return h.hexdigest()[:20]


def decoded_path(cache: Path, spec: CodecSpec, point: Point, image: str) -> Path:
    return cache / spec.name / spec.label(point) / f"{image}.png"


# --- one task: one codec, one image, several points (runs in a pool worker) -----------------------

@functools.lru_cache(maxsize=8)
def _learned_model(model_dir: str):
    import torch

    from vlmcompress.codec.train import load_codec

    if torch.get_num_threads() > 1 and multiprocessing.parent_process() is not None:
        torch.set_num_threads(1)   # pool workers share the cores: one thread each
    return load_codec(model_dir)


def _anchor_coder(spec: CodecSpec) -> tuple[Callable[[np.ndarray, Point], bytes], Callable[[bytes], np.ndarray]]:
    codec = spec.make()
    return (lambda img, q: codec.encode(img, int(q))), codec.decode


def _learned_coder(spec: CodecSpec, tokens: Any) -> tuple[Callable[[np.ndarray, Point], bytes],
                                                          Callable[[bytes], np.ndarray]]:
    from vlmcompress.codec.coder import decode_image, encode_image

    model = _learned_model(spec.model_dir)
    token_fn = (lambda _x: tokens) if spec.needs_tokens else None
    return ((lambda img, r: encode_image(model, img, float(r), token_fn=token_fn)),
            (lambda data: decode_image(model, data)))


def code_image(spec: CodecSpec, points: Sequence[Point], image: str, img: np.ndarray,
               cache: str, tokens: Any = None) -> list[dict[str, Any]]:
    """Encode ``img`` at each point, write the file and its decoded PNG, score the pair.

    ``tokens``: the LVLM's ``[1, N, Dv]`` vision features of ``img`` (learned codecs whose
    pre-editing net fuses them). Returns one row per point (see :data:`RD_COLUMNS`).
    """
    from PIL import Image

    from vlmcompress.eval.quality import rd_metrics

    encode, decode = _anchor_coder(spec) if spec.kind == "anchor" else _learned_coder(spec, tokens)
    rows = []
    for p in points:
        folder = Path(cache) / spec.name / spec.label(p)
        folder.mkdir(parents=True, exist_ok=True)
        data = encode(img, p)
        coded = folder / f"{image}{spec.ext}"
        with atomic_path(coded) as tmp:
            tmp.write_bytes(data)
        decoded = decode(coded.read_bytes())      # what a receiver of the file gets
        if decoded.shape != img.shape:
            raise ValueError(f"{spec.name} at {spec.label(p)}: decoded {decoded.shape} "
                             f"from a {img.shape} image ({image})")
        with atomic_path(folder / f"{image}.png") as tmp:
            Image.fromarray(decoded).save(tmp, format="PNG")
        rows.append({"codec": spec.name, "point": p, "image": image,
                     "nbytes": len(data), **rd_metrics(img, decoded, len(data))})
    return rows


# --- the pool ----------------------------------------------------------------------------------

class _Inline(Executor):
    """An executor that runs each call at once in this process (``workers: 0``)."""

    def submit(self, fn, /, *args, **kwargs) -> Future:  # type: ignore[override]
        fut: Future = Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - delivered through the future, as a pool does
            fut.set_exception(exc)
        return fut


def _init_worker() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@contextlib.contextmanager
def make_pool(workers: int) -> Iterator[Executor]:
    """``workers`` processes (spawned: safe with torch), or the calling process when 0."""
    if workers <= 0:
        yield _Inline()
        return
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker) as pool:
        yield pool


def _progress(futures: Sequence[Future], desc: str, enabled: bool) -> Iterator[Future]:
    from concurrent.futures import as_completed

    from tqdm.auto import tqdm

    yield from tqdm(as_completed(futures), total=len(futures), desc=desc, disable=not enabled or not futures)


# --- the cache ---------------------------------------------------------------------------------

def _read_manifest(folder: Path, spec: CodecSpec, point: Point) -> dict[str, dict[str, Any]]:
    """Cached rows of one (codec, point) whose identity matches, keyed by image."""
    path = folder / MANIFEST
    if not path.is_file():
        return {}
    try:
        m = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}                                   # a damaged manifest only costs a re-encode
    if m.get("codec") != spec.identity() or m.get("point") != point:
        return {}
    return m.get("images", {})


def code_images(jobs: Sequence[tuple[CodecSpec, Sequence[Point]]], images: Mapping[str, np.ndarray],
                cache: str | Path, pool: Executor, *, tokens: Mapping[str, Any] | None = None,
                progress: bool = True, desc: str = "encode") -> pd.DataFrame:
    """Code every image with every (codec, points) job; cached entries are reused.

    Returns one row per (codec, point, image): :data:`RD_COLUMNS`. ``tokens`` maps an image
    key to its LVLM vision features, needed by learned codecs that fuse them.
    """
    cache = Path(cache)
    hashes = {k: pixel_hash(v) for k, v in images.items()}
    rows: list[dict[str, Any]] = []
    pending: dict[tuple[str, str], list[Point]] = {}
    kept: dict[tuple[str, Point], dict[str, dict[str, Any]]] = {}
    specs = {spec.name: spec for spec, _ in jobs}
    for spec, points in jobs:
        if spec.needs_tokens and (tokens is None or set(images) - set(tokens)):
            raise ValueError(f"{spec.name}: its pre-editing net fuses LVLM tokens; pass tokens "
                             "for every image")
        for p in points:
            cached = _read_manifest(cache / spec.name / spec.label(p), spec, p)
            good = {}
            for key in images:
                entry = cached.get(key)
                if entry is not None and entry.get("src") == hashes[key] \
                        and decoded_path(cache, spec, p, key).is_file():
                    good[key] = entry
                    rows.append({"codec": spec.name, "point": p, "image": key,
                                 **{c: entry[c] for c in RD_COLUMNS[3:]}})
                else:
                    pending.setdefault((spec.name, key), []).append(p)
            kept[(spec.name, p)] = good
    futures = {pool.submit(code_image, specs[name], pts, key, images[key], str(cache),
                           (tokens or {}).get(key) if specs[name].needs_tokens else None): (name, key)
               for (name, key), pts in pending.items()}
    try:
        for fut in _progress(list(futures), desc, progress):
            for row in fut.result():
                rows.append(row)
                kept[(row["codec"], row["point"])][row["image"]] = {
                    "src": hashes[row["image"]], **{c: row[c] for c in RD_COLUMNS[3:]}}
    finally:
        # Whatever finished is recorded, so an interrupted run resumes from there.
        for (name, p), entries in kept.items():
            spec = specs[name]
            write_json(cache / name / spec.label(p) / MANIFEST,
                       {"codec": spec.identity(), "point": p, "images": entries})
    df = pd.DataFrame(rows, columns=list(RD_COLUMNS))
    order = {name: i for i, name in enumerate(specs)}
    return df.sort_values(["codec", "point", "image"], key=lambda s: s.map(order) if s.name == "codec" else s,
                          ignore_index=True)


# --- quality points of the anchors -------------------------------------------------------------

def _pick(spec: CodecSpec, images: Sequence[np.ndarray], bpp_range: tuple[float, float],
          n_points: int) -> dict[str, Any]:
    from vlmcompress.codec.anchors import pick_qualities

    plan = pick_qualities(spec.make(), list(images), bpp_range, n_points)
    return {"qualities": list(plan.qualities), "mean_bpp": list(plan.mean_bpp)}


def plan_anchor_points(specs: Sequence[CodecSpec], calibration: Sequence[np.ndarray],
                       bpp_range: tuple[float, float], n_points: int, pool: Executor, *,
                       explicit: Mapping[str, Sequence[int]] | None = None,
                       cache_file: str | Path | None = None, progress: bool = True
                       ) -> dict[str, list[int]]:
    """Quality points of each anchor: ``explicit`` ones, else picked to span ``bpp_range``
    on the calibration images (``codec.anchors.pick_qualities``), in parallel over codecs.

    Picks are cached in ``cache_file`` by codec identity, calibration pixels, range and count.
    """
    explicit = dict(explicit or {})
    calib_id = [pixel_hash(im) for im in calibration]
    store: dict[str, Any] = {}
    if cache_file is not None and Path(cache_file).is_file():
        with contextlib.suppress(OSError, json.JSONDecodeError):
            store = json.loads(Path(cache_file).read_text())

    def key(spec: CodecSpec) -> str:
        blob = json.dumps([spec.identity(), calib_id, [round(b, 6) for b in bpp_range], n_points],
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    out: dict[str, list[int]] = {}
    todo = {}
    for spec in specs:
        if spec.name in explicit:
            out[spec.name] = sorted(int(q) for q in explicit[spec.name])
        elif key(spec) in store:
            out[spec.name] = list(store[key(spec)]["qualities"])
        else:
            todo[pool.submit(_pick, spec, calibration, bpp_range, n_points)] = spec
    for fut in _progress(list(todo), "pick anchor qualities", progress):
        spec = todo[fut]
        store[key(spec)] = fut.result()
        out[spec.name] = list(store[key(spec)]["qualities"])
    if cache_file is not None and todo:
        write_json(cache_file, store)
    return {spec.name: out[spec.name] for spec in specs}


def learned_points(spec: CodecSpec, rates: Sequence[float], n_points: int) -> list[float]:
    """Rates of a learned codec: ``rates`` as given, else ``n_points`` spread over its range."""
    if not rates:
        return [round(float(r), 4) for r in np.linspace(0.0, spec.levels - 1, n_points)]
    top = spec.levels - 1
    bad = [r for r in rates if not 0 <= r <= top]
    if bad:
        raise ValueError(f"eval_codec.learned_rates: {bad} outside [0, {top}], the rates of "
                         f"codec {spec.name!r} ({spec.model_dir})")
    return sorted(float(r) for r in rates)


def span_of(rd: pd.DataFrame, widen: float) -> tuple[float, float] | None:
    """Mean-bpp range of the points in ``rd`` (per-image rows), widened ``widen`` x each side."""
    if rd.empty:
        return None
    mean = rd.groupby(["codec", "point"])["bpp"].mean()
    lo, hi = float(mean.min()), float(mean.max())
    if not (math.isfinite(lo) and lo > 0 and hi > lo):
        return None
    return lo / widen, hi * widen
