"""Standard image codecs used as anchors: JPEG, WebP, AVIF, HEVC (HEIF/x265) and VVC (VVenC).

Every anchor turns an ``HxWx3`` uint8 RGB image into the bytes of a real file and back,
and its rate is ``len(bytes)``: container and header overhead included (JFIF, RIFF, the
HEIF/AVIF boxes, the VVC parameter sets), as a receiver would have to get them.

* ``jpeg``, ``webp``: Pillow (libjpeg, libwebp); 4:2:0 chroma.
* ``avif``: Pillow's own AVIF plugin (libavif + aom), 4:2:0, 8-bit.
* ``hevc``: pillow-heif (libheif + x265), one intra-coded HEVC image in a HEIF file, 4:2:0.
* ``vvc``: VVenC through the ffmpeg binary shipped by imageio-ffmpeg. One frame, all-intra
  (``-g 1``), 10-bit 4:2:0 (``yuv420p10le``), constant QP (``-qp``), perceptual QP
  adaptation off by default so the anchor targets PSNR like the reference test models.
  ``preset`` is VVenC's speed/efficiency trade-off (:data:`VVENC_PRESETS`, the values of
  the wrapper's ``-preset``); the default ``medium`` is VVenC's own default and the
  BD-rate reference, ``faster`` encodes much faster for more bits at equal PSNR.
  RGB<->YCbCr is BT.601 limited range with accurate rounding, done by ffmpeg's scaler on
  both sides. The bitstream is a raw Annex-B ``.266`` stream, decoded back by ffmpeg's
  native ``vvc`` decoder. 4:2:0 VVC cannot represent odd sizes and ffmpeg's libvvenc
  wrapper caps an access unit at ``W*H`` bytes, so the image is padded (edge replication)
  to even sides of at least :data:`VVC_MIN_SIDE` px; when padding was needed a 3-byte
  prefix ``0xFF, pad_w, pad_h`` is stored before the stream (counted in the rate) and the
  decoder crops. Without padding the bytes are a plain ``.266`` file any decoder reads.

Quality parameters are integers; :class:`QualityScale` says their range and whether a
larger value means more bytes (quality factors) or fewer (VVC's QP).
"""
from __future__ import annotations

import dataclasses
import functools
import io
import math
import re
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np

from vlmcompress.codec.config import VVENC_PRESETS
from vlmcompress.schema import ConfigError, from_dict


class AnchorError(ValueError):
    """One-line failure of an anchor codec (bad input, corrupt data, encoder failure)."""


@dataclass(frozen=True)
class QualityScale:
    """Integer quality parameter ``lo..hi``; ``rate_increases``: larger q -> more bytes."""

    lo: int
    hi: int
    rate_increases: bool

    def rate_order(self) -> list[int]:
        """Every q from the lowest-rate setting to the highest-rate one."""
        qs = list(range(self.lo, self.hi + 1))
        return qs if self.rate_increases else qs[::-1]


class AnchorCodec:
    """Interface of an anchor: concrete codecs are frozen dataclasses of their options."""

    name: ClassVar[str]
    scale: ClassVar[QualityScale]
    runtime_options: ClassVar[tuple[str, ...]] = ()   # options the coded bytes do not depend on

    def encode(self, img: np.ndarray, q: int) -> bytes:  # pragma: no cover - interface
        raise NotImplementedError

    def decode(self, data: bytes) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    @classmethod
    def unavailable(cls) -> str | None:
        """``None`` when the codec can run here, else why not."""
        return None

    def settings(self) -> dict[str, Any]:
        """Every option the coded bytes depend on, defaults included (a cache identity)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.runtime_options}

    def check_q(self, q: Any) -> int:
        if isinstance(q, (bool, np.bool_)) or not isinstance(q, (int, np.integer)):
            raise AnchorError(f"{self.name}: quality must be an integer, got {q!r}")
        if not self.scale.lo <= int(q) <= self.scale.hi:
            raise AnchorError(f"{self.name}: quality {q} outside {self.scale.lo}..{self.scale.hi}")
        return int(q)


ANCHORS: dict[str, type[AnchorCodec]] = {}


def register_anchor(name: str) -> Callable[[type[AnchorCodec]], type[AnchorCodec]]:
    """Class decorator: make an anchor codec available to :func:`make_anchor` by ``name``."""

    def deco(cls: type[AnchorCodec]) -> type[AnchorCodec]:
        if name in ANCHORS:
            raise ValueError(f"anchor codec {name!r} is already registered")
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"anchor codec {name!r} must be a dataclass of its options")
        cls.name = name
        ANCHORS[name] = cls
        return cls

    return deco


def make_anchor(name: str, **options: Any) -> AnchorCodec:
    """Instantiate a registered anchor with its options (one-line error on a bad name/option)."""
    if name not in ANCHORS:
        raise AnchorError(f"unknown anchor codec {name!r} (known: {', '.join(ANCHORS)})")
    try:  # the strict params loader type-checks options against the codec's fields
        return from_dict(ANCHORS[name], dict(options), f"anchor {name}")
    except ConfigError as exc:
        raise AnchorError(str(exc)) from None


def available_anchors() -> dict[str, str | None]:
    """``name -> None`` (usable) or the reason it is not usable on this machine."""
    return {name: cls.unavailable() for name, cls in ANCHORS.items()}


def check_image(img: Any, who: str) -> np.ndarray:
    if not isinstance(img, np.ndarray) or img.ndim != 3 or img.shape[2] != 3 \
            or img.dtype != np.uint8 or img.shape[0] < 1 or img.shape[1] < 1:
        desc = f"shape {img.shape} dtype {img.dtype}" if isinstance(img, np.ndarray) \
            else type(img).__name__
        raise AnchorError(f"{who}: expected an HxWx3 uint8 image, got {desc}")
    return np.ascontiguousarray(img)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = re.sub(r"\s*<[^<>]* at 0x[0-9a-f]+>", "", text[0]) if text else ""
    return f"{type(exc).__name__}: {first}".rstrip(": ")


# --- Pillow-based codecs -------------------------------------------------------------------

def _pil_encode(img: np.ndarray, fmt: str, who: str, **kwargs: Any) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    try:
        Image.fromarray(img, "RGB").save(buf, fmt, **kwargs)
    except Exception as exc:  # noqa: BLE001 - bad options surface as TypeError/ValueError/OSError
        raise AnchorError(f"{who}: encoding failed ({_first_line(exc)})") from None
    return buf.getvalue()


def _pil_decode(data: bytes, fmt: str, who: str) -> np.ndarray:
    from PIL import Image

    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
        raise AnchorError(f"{who}: nothing to decode (got {type(data).__name__} of length "
                          f"{len(data) if hasattr(data, '__len__') else '?'})")
    try:
        with Image.open(io.BytesIO(bytes(data)), formats=[fmt]) as im:
            im.load()
            return np.asarray(im.convert("RGB")).copy()
    except Exception as exc:  # noqa: BLE001 - a decoder boundary: any failure is bad data
        raise AnchorError(f"{who}: cannot decode {len(data)} bytes ({_first_line(exc)})") from None


@register_anchor("jpeg")
@dataclass(frozen=True)
class JpegAnchor(AnchorCodec):
    """Baseline JPEG (libjpeg via Pillow), Huffman tables optimised per image."""

    scale: ClassVar[QualityScale] = QualityScale(1, 100, rate_increases=True)
    subsampling: str = "4:2:0"
    optimize: bool = True

    def encode(self, img: np.ndarray, q: int) -> bytes:
        img, q = check_image(img, self.name), self.check_q(q)
        return _pil_encode(img, "JPEG", self.name, quality=q, subsampling=self.subsampling,
                           optimize=self.optimize)

    def decode(self, data: bytes) -> np.ndarray:
        return _pil_decode(data, "JPEG", self.name)


@register_anchor("webp")
@dataclass(frozen=True)
class WebpAnchor(AnchorCodec):
    """Lossy WebP (VP8 intra), ``method`` 0 (fast) .. 6 (best compression)."""

    scale: ClassVar[QualityScale] = QualityScale(0, 100, rate_increases=True)
    method: int = 6

    def encode(self, img: np.ndarray, q: int) -> bytes:
        img, q = check_image(img, self.name), self.check_q(q)
        return _pil_encode(img, "WEBP", self.name, quality=q, method=self.method, lossless=False)

    def decode(self, data: bytes) -> np.ndarray:
        return _pil_decode(data, "WEBP", self.name)


@register_anchor("avif")
@dataclass(frozen=True)
class AvifAnchor(AnchorCodec):
    """AVIF (AV1 intra) through Pillow's AVIF plugin; ``speed`` 0 (slow) .. 10 (fast)."""

    scale: ClassVar[QualityScale] = QualityScale(0, 100, rate_increases=True)
    speed: int = 6
    subsampling: str = "4:2:0"
    codec: str = "auto"

    @classmethod
    def unavailable(cls) -> str | None:
        from PIL import features

        return None if features.check("avif") else "this Pillow was built without AVIF"

    def encode(self, img: np.ndarray, q: int) -> bytes:
        img, q = check_image(img, self.name), self.check_q(q)
        return _pil_encode(img, "AVIF", self.name, quality=q, speed=self.speed,
                           subsampling=self.subsampling, codec=self.codec, max_threads=1)

    def decode(self, data: bytes) -> np.ndarray:
        return _pil_decode(data, "AVIF", self.name)


@register_anchor("hevc")
@dataclass(frozen=True)
class HevcAnchor(AnchorCodec):
    """HEVC intra in HEIF (libheif + x265 via pillow-heif).

    ``preset``/``tune`` are passed to libheif's x265 plugin when set (libheif's defaults
    otherwise); ``chroma`` is ``"420"``, ``"422"`` or ``"444"``.
    """

    scale: ClassVar[QualityScale] = QualityScale(0, 100, rate_increases=True)
    chroma: str = "420"
    preset: str | None = None
    tune: str | None = None

    @classmethod
    def unavailable(cls) -> str | None:
        try:
            import pillow_heif
        except ImportError:
            return "pillow-heif is not installed"
        if "x265" not in pillow_heif.libheif_info().get("encoders", {}):
            return "pillow-heif has no x265 encoder"
        return None

    def encode(self, img: np.ndarray, q: int) -> bytes:
        import pillow_heif

        img, q = check_image(img, self.name), self.check_q(q)
        enc_params = {k: v for k, v in (("preset", self.preset), ("tune", self.tune)) if v}
        heif = pillow_heif.from_bytes("RGB", (img.shape[1], img.shape[0]), img.tobytes())
        buf = io.BytesIO()
        try:
            heif.save(buf, quality=q, chroma=self.chroma, enc_params=enc_params)
        except Exception as exc:  # noqa: BLE001 - libheif reports option errors as RuntimeError
            raise AnchorError(f"{self.name}: encoding failed ({_first_line(exc)})") from None
        return buf.getvalue()

    def decode(self, data: bytes) -> np.ndarray:
        import pillow_heif

        if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
            raise AnchorError(f"{self.name}: nothing to decode")
        try:
            heif = pillow_heif.open_heif(io.BytesIO(bytes(data)), convert_hdr_to_8bit=True)
            return np.asarray(heif.to_pillow().convert("RGB")).copy()
        except Exception as exc:  # noqa: BLE001 - a decoder boundary: any failure is bad data
            raise AnchorError(f"{self.name}: cannot decode {len(data)} bytes "
                              f"({_first_line(exc)})") from None


# --- VVC through ffmpeg/VVenC ----------------------------------------------------------------

VVC_MIN_SIDE = 64           # ffmpeg's wrapper caps an AU at W*H bytes: keep room for headers
_PAD_MARKER = 0xFF          # an Annex-B stream starts with 0x00, so 0xFF marks our prefix
_RGB_TO_YUV = ("scale=out_color_matrix=bt601:out_range=tv:flags=accurate_rnd+full_chroma_int,"
               "format=yuv420p10le")
_YUV_TO_RGB = ("scale=in_color_matrix=bt601:in_range=tv:flags=accurate_rnd+full_chroma_int,"
               "format=rgb24")
_PREFIX = re.compile(r"\[[^\]]*@ 0x[0-9a-f]+\]\s*")
_FFMPEG_NOISE = ("Terminating thread", "Task finished", "Nothing was written",
                 "Could not open encoder before EOF", "Configuration warning",
                 "Error opening output file", "Error opening output files")


def ffmpeg_exe() -> str:
    """Path of the ffmpeg binary shipped by imageio-ffmpeg (or ``$IMAGEIO_FFMPEG_EXE``)."""
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


@functools.lru_cache(maxsize=4)
def _ffmpeg_vvc_support(exe: str) -> str | None:
    try:
        enc = subprocess.run([exe, "-hide_banner", "-h", "encoder=libvvenc"],
                             capture_output=True, text=True, timeout=30)
        dec = subprocess.run([exe, "-hide_banner", "-h", "decoder=vvc"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot run ffmpeg at {exe} ({_first_line(exc)})"
    if "libvvenc" not in enc.stdout or "is not recognized" in enc.stdout:
        return f"ffmpeg at {exe} has no libvvenc encoder"
    if "Decoder vvc" not in dec.stdout:
        return f"ffmpeg at {exe} has no native vvc decoder"
    return None


def ffmpeg_reason(stderr: bytes | str) -> str:
    """One line from ffmpeg's stderr: the codec's first complaint and ffmpeg's last word."""
    text = stderr.decode("utf-8", "replace") if isinstance(stderr, bytes) else stderr
    raw = [ln.strip() for ln in text.splitlines() if ln.strip()]
    codec = [ln for ln in raw if re.match(r"\[(vvc|libvvenc) @ 0x", ln)]
    lines = [_PREFIX.sub("", ln).strip() for ln in raw]
    useful = [ln for ln in lines if ln and not any(n in ln for n in _FFMPEG_NOISE)]
    last = (useful or lines or ["no message"])[-1]
    first = _PREFIX.sub("", codec[0]).strip() if codec else ""
    return f"{first}; {last}" if first and first != last else last


def _run_ffmpeg(args: list[str], who: str, timeout_s: float,
                stdin: bytes | None = None) -> bytes:
    """Run ffmpeg; stdout on success, else a one-line :class:`AnchorError`."""
    try:
        proc = subprocess.run(args, input=stdin, capture_output=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise AnchorError(f"{who}: ffmpeg did not finish within {timeout_s:g} s") from None
    except OSError as exc:
        raise AnchorError(f"{who}: cannot run ffmpeg ({_first_line(exc)})") from None
    if proc.returncode != 0:
        raise AnchorError(f"{who}: ffmpeg failed (exit {proc.returncode}): "
                          f"{ffmpeg_reason(proc.stderr)}")
    return proc.stdout


def parse_ppm(buf: bytes) -> np.ndarray:
    """Binary 8-bit PPM (``P6``) -> ``HxWx3`` uint8 array."""
    m = re.match(rb"P6\s+(\d+)\s+(\d+)\s+(\d+)\s", buf)
    if not m or int(m.group(3)) != 255:
        raise AnchorError("ppm: not an 8-bit binary PPM")
    w, h = int(m.group(1)), int(m.group(2))
    body = buf[m.end():m.end() + w * h * 3]
    if len(body) != w * h * 3:
        raise AnchorError(f"ppm: expected {w * h * 3} pixel bytes for {w}x{h}, got {len(body)}")
    return np.frombuffer(body, np.uint8).reshape(h, w, 3).copy()


def vvc_canvas(height: int, width: int) -> tuple[int, int]:
    """Padding ``(pad_h, pad_w)`` to even sides of at least :data:`VVC_MIN_SIDE` px."""
    def pad(n: int) -> int:
        return max(n + n % 2, VVC_MIN_SIDE) - n
    return pad(height), pad(width)


def vvc_nal_unit_types(stream: bytes) -> list[int]:
    """``nal_unit_type`` of every NAL unit of an Annex-B VVC stream (H.266 7.3.1.2)."""
    types = []
    for m in re.finditer(rb"\x00\x00\x01", stream):
        i = m.end()
        if i + 1 < len(stream):
            types.append(stream[i + 1] >> 3)
    return types


@register_anchor("vvc")
@dataclass(frozen=True)
class VvcAnchor(AnchorCodec):
    """VVC all-intra, 10-bit 4:2:0, constant QP, via ffmpeg's libvvenc and native decoder."""

    scale: ClassVar[QualityScale] = QualityScale(0, 63, rate_increases=False)
    runtime_options: ClassVar[tuple[str, ...]] = ("threads", "timeout_s")
    preset: str = "medium"      # VVenC preset, one of VVENC_PRESETS (slower: fewer bits, more time)
    qpa: bool = False           # perceptual QP adaptation (off: PSNR-oriented like VTM)
    threads: int = 1            # VVenC output does not depend on it; 1 suits shared CPUs
    timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if self.preset not in VVENC_PRESETS:
            raise AnchorError(f"preset: unknown VVenC preset {self.preset!r} "
                              f"(known: {', '.join(VVENC_PRESETS)})")

    @classmethod
    def unavailable(cls) -> str | None:
        try:
            exe = ffmpeg_exe()
        except Exception as exc:  # noqa: BLE001 - imageio-ffmpeg raises RuntimeError & co.
            return f"no ffmpeg binary ({_first_line(exc)})"
        return _ffmpeg_vvc_support(exe)

    def encode(self, img: np.ndarray, q: int) -> bytes:
        img, q = check_image(img, self.name), self.check_q(q)
        reason = self.unavailable()
        if reason:
            raise AnchorError(f"{self.name}: {reason}")
        pad_h, pad_w = vvc_canvas(*img.shape[:2])
        canvas = np.pad(img, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
        h, w = canvas.shape[:2]
        with tempfile.TemporaryDirectory(prefix="vlmc-vvc-") as tmp:
            out = Path(tmp) / "frame.266"
            cap = (f"; ffmpeg's libvvenc wrapper caps a coded frame at W*H = {w * h} bytes, "
                   f"a higher QP stays below it")
            try:
                _run_ffmpeg([
                    ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
                    "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-i", "pipe:0",
                    "-vf", _RGB_TO_YUV, "-frames:v", "1",
                    "-c:v", "libvvenc", "-preset", self.preset, "-qp", str(q),
                    "-qpa", "1" if self.qpa else "0", "-g", "1", "-threads", str(self.threads),
                    "-f", "vvc", str(out),
                ], self.name, self.timeout_s, stdin=canvas.tobytes())
            except AnchorError as exc:
                hint = cap if "external library" in str(exc) else ""
                raise AnchorError(f"{exc} (QP {q}){hint}") from None
            stream = out.read_bytes() if out.exists() else b""
        if not stream:
            raise AnchorError(f"{self.name}: libvvenc wrote no bitstream at QP {q}{cap}")
        prefix = bytes([_PAD_MARKER, pad_w, pad_h]) if pad_h or pad_w else b""
        return prefix + stream

    def decode(self, data: bytes) -> np.ndarray:
        if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) < 4:
            raise AnchorError(f"{self.name}: nothing to decode")
        data = bytes(data)
        pad_w = pad_h = 0
        if data[0] == _PAD_MARKER:
            pad_w, pad_h, data = data[1], data[2], data[3:]
        with tempfile.TemporaryDirectory(prefix="vlmc-vvc-") as tmp:
            src = Path(tmp) / "frame.266"
            src.write_bytes(data)
            ppm = _run_ffmpeg([
                ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-xerror",
                "-threads", str(self.threads), "-f", "vvc", "-i", str(src), "-frames:v", "1", "-vf", _YUV_TO_RGB,
                "-c:v", "ppm", "-f", "image2pipe", "pipe:1",
            ], self.name, self.timeout_s)
        try:
            frame = parse_ppm(ppm)
        except AnchorError as exc:
            raise AnchorError(f"{self.name}: decoder output unusable ({exc})") from None
        h, w = frame.shape[0] - pad_h, frame.shape[1] - pad_w
        if h < 1 or w < 1:
            raise AnchorError(f"{self.name}: padding {pad_w}x{pad_h} larger than the decoded "
                              f"{frame.shape[1]}x{frame.shape[0]} frame")
        return np.ascontiguousarray(frame[:h, :w])


# --- sweeps and quality-point selection ------------------------------------------------------

class RDPoint(NamedTuple):
    q: int
    nbytes: int
    decoded: np.ndarray     # HxWx3 uint8


def _as_codec(codec: AnchorCodec | str) -> AnchorCodec:
    return make_anchor(codec) if isinstance(codec, str) else codec


def sweep(codec: AnchorCodec | str, img: np.ndarray, qualities: Sequence[int]) -> list[RDPoint]:
    """Encode and decode ``img`` at every quality; bytes are those of the real file."""
    codec = _as_codec(codec)
    img = check_image(img, codec.name)
    points = []
    for q in qualities:
        data = codec.encode(img, q)
        decoded = codec.decode(data)
        if decoded.shape != img.shape:
            raise AnchorError(f"{codec.name}: decoded {decoded.shape} from a {img.shape} image")
        points.append(RDPoint(int(q), len(data), decoded))
    return points


@dataclass(frozen=True)
class QualityPlan:
    """Quality points of one codec, lowest rate first, with their mean bpp on the samples."""

    codec: str
    qualities: tuple[int, ...]
    mean_bpp: tuple[float, ...]


def _closest(idx_lo: int, idx_hi: int, target: float, rate: Callable[[int], float]) -> int:
    """Of two neighbouring indices, the one whose rate is closer to ``target`` in log scale."""
    def dist(i: int) -> float:
        return abs(math.log(max(rate(i), 1e-12)) - math.log(target))
    return idx_lo if dist(idx_lo) <= dist(idx_hi) else idx_hi


def _index_for_rate(target: float, n: int, rate: Callable[[int], float]) -> int:
    """Bisection on a (roughly) increasing ``rate(i)``, ``i in 0..n-1``, for ``target``."""
    if rate(0) >= target:
        return 0
    if rate(n - 1) <= target:
        return n - 1
    lo, hi = 0, n - 1                  # rate(lo) < target < rate(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if rate(mid) < target:
            lo = mid
        else:
            hi = mid
    return _closest(lo, hi, target, rate)


def _fill(chosen: set[int], n_points: int, n: int) -> set[int]:
    """Add indices until ``n_points``: largest gaps inside the span first, then outside it."""
    chosen = set(chosen)
    while len(chosen) < min(n_points, n):
        lo, hi = min(chosen), max(chosen)
        inside = [i for i in range(lo, hi + 1) if i not in chosen]
        if inside:
            chosen.add(max(inside, key=lambda i: (min(abs(i - c) for c in chosen), -i)))
        elif hi + 1 < n:
            chosen.add(hi + 1)
        else:
            chosen.add(lo - 1)
    return chosen


def pick_qualities(codec: AnchorCodec | str, images: Sequence[np.ndarray],
                   bpp_range: tuple[float, float], n_points: int = 6) -> QualityPlan:
    """Choose ``n_points`` qualities whose mean bpp over ``images`` spans ``bpp_range``.

    Targets are log-spaced in ``bpp_range``; each is found by bisection over the codec's
    quality scale (rate assumed to grow with the scale's rate order) on the mean bpp of
    the sample images, every setting encoded at most once. Coinciding picks are replaced
    by the settings filling the largest gaps, so the result always has ``n_points``
    distinct settings (if the scale has that many). Deterministic for deterministic codecs.
    """
    codec = _as_codec(codec)
    lo_bpp, hi_bpp = bpp_range
    if not 0 < lo_bpp < hi_bpp:
        raise AnchorError(f"pick_qualities: bpp_range must satisfy 0 < low < high, got {bpp_range}")
    if n_points < 2:
        raise AnchorError(f"pick_qualities: n_points must be >= 2, got {n_points}")
    if not images:
        raise AnchorError("pick_qualities: no sample images")
    samples = [check_image(im, codec.name) for im in images]
    order = codec.scale.rate_order()

    @functools.cache
    def rate(i: int) -> float:
        q = order[i]
        # bits per pixel of the original size (as eval.quality.bits_per_pixel; no torch here)
        return float(np.mean([8.0 * len(codec.encode(im, q)) / (im.shape[0] * im.shape[1])
                              for im in samples]))

    targets = np.geomspace(lo_bpp, hi_bpp, n_points)
    chosen = _fill({_index_for_rate(float(t), len(order), rate) for t in targets},
                   n_points, len(order))
    idx = sorted(chosen)
    return QualityPlan(codec.name, tuple(order[i] for i in idx), tuple(rate(i) for i in idx))
