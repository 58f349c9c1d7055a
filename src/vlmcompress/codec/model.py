"""Variable-rate end-to-end codec on CompressAI entropy models, plus the pre-editing net.

The core is a mean-scale hyperprior (Minnen et al. 2018, CompressAI ``mbt2018-mean``)
made variable-rate with *gain units* (Cui et al., "Asymmetric Gained Deep Image
Compression With Continuous Rate Adaptation", CVPR 2021): each of ``R`` rate levels owns
a per-channel gain vector applied to the latent ``y`` before quantisation and an inverse
gain applied after it (optionally the same for the hyper latent ``z``). A real-valued
``rate`` in ``[0, R-1]`` interpolates geometrically between the two adjacent levels,
so one set of weights covers a continuum of rates.

Gains are stored as log-gains (positive by construction, and the geometric interpolation
is a linear one in log space). At init level ``r`` has gain
``exp(linspace(log g_0, log g_{R-1}))[r]`` and inverse ``1/gain``: an untrained model is
already a variable-rate quantiser (higher rate = finer quantisation step), which training
then refines.

:class:`LVLMCodec` wraps the core with the optional pre-editing net and handles any image
size by replicate-padding to the stride (64) and cropping the reconstruction.

Without gradients (``compress``, ``decompress``, ``forward`` in eval mode) the analysis and
synthesis transforms run through :func:`inference_ops`: the same functions on faster kernels,
built once per weights, so a decoded image equals the eval-mode ``forward`` reconstruction
exactly. The hyper-synthesis, which decides the entropy coder's tables, keeps its reference
kernels: its output must not move by a rounding step between encoder and decoder versions.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from compressai.ans import BufferedRansEncoder
from compressai.entropy_models import EntropyBottleneck, GaussianConditional
from compressai.layers import GDN
from compressai.models import CompressionModel
from compressai.models.utils import conv, deconv
from torch import Tensor

from vlmcompress.codec.config import MODELS, CodecModelParams, check_model_params
from vlmcompress.codec.preedit import PreEditNet
from vlmcompress.codec.rans import CoderTables, RansReader, coder_tables

# Entropy-coder tables rebuilt by ``update(force=True)``; never part of a saved model.
CODER_TABLE_SUFFIXES = ("._quantized_cdf", "._offset", "._cdf_length", ".scale_table")


def register_model(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: make a core codec buildable by name from params.yaml (``codec.model.name``)."""
    return MODELS.register(name)


def check_rate(rate: float, levels: int) -> float:
    """Validate a rate (float in ``[0, levels-1]``) and return it as a Python float."""
    try:
        r = float(rate)
    except (TypeError, ValueError):
        raise ValueError(f"rate must be a number, got {rate!r}") from None
    if not math.isfinite(r) or r < 0 or r > levels - 1:
        raise ValueError(f"rate must be in [0, {levels - 1}], got {rate!r}")
    return r


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the body on one intra-op thread (restored after).

    Float reductions split over threads round differently; what decides symbols and
    entropy parameters runs here, so files and their decoding do not depend on the
    thread count."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def interpolate_log_gains(log_gains: Tensor, rate: float) -> Tensor:
    """Gain vector at a real-valued rate.

    Args:
        log_gains: ``[R, C]`` per-level log-gains.
        rate: float in ``[0, R-1]`` (checked by the caller).
    Returns:
        ``[1, C, 1, 1]`` gains ``exp((1-t) log g_lo + t log g_hi)`` with
        ``lo = floor(rate)``, ``hi = min(lo + 1, R-1)``, ``t = rate - lo``.
    """
    levels = log_gains.shape[0]
    lo = min(int(math.floor(rate)), levels - 1)
    hi = min(lo + 1, levels - 1)
    t = rate - lo
    mixed = log_gains[lo] * (1.0 - t) + log_gains[hi] * t
    return torch.exp(mixed).view(1, -1, 1, 1)


def pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """Replicate-pad ``[B, C, H, W]`` on the bottom/right to multiples of ``multiple``.

    Replicate (not zero) padding: a flat extension of the border costs almost no bits.
    """
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x
    return F.pad(x, (0, pw, 0, ph), mode="replicate")


# --- inference kernels ---------------------------------------------------------------------
# Without gradients the transforms run the same functions through faster kernels: oneDNN in
# channels-last layout, GDN as a cache-sized matrix product, and a 3-channel output layer as
# a sub-pixel convolution (a k x k stride-2 transposed convolution whose 3 output channels make
# a poor matrix shape is the same as a small convolution to 4 x 3 channels + pixel shuffle).

Op = Callable[[Tensor], Tensor]
GDN_ROWS = 2048              # pixels per GDN block: x^2, the norm and the output stay in L2
# Largest (sub-pixel taps) / (kernel taps) for which a narrow output layer runs sub-pixel: at
# k = 5 (36 / 25 taps) it beats oneDNN's transposed convolution, at k = 3 (16 / 9 taps and a
# cropped output) it is slower (docs/experiments/2026-12-04-codec-narrow-synthesis.md).
SUBPIXEL_MAX_TAPS_RATIO = 1.5


def subpixel_taps(k: int) -> tuple[int, int]:
    """Input offsets ``(lo, hi)`` that a ``ConvTranspose2d(k, stride=2, padding=k // 2,
    output_padding=1)`` (odd ``k``) reads for its outputs ``2i`` and ``2i + 1``: inputs
    ``i + lo .. i + hi`` (5: ``(-1, 1)``, a centred 3x3 window; 3: ``(0, 1)``, a 2x2 one)."""
    p = k // 2
    return -(p // 2), (p + 1) // 2


def subpixel_weight(w: Tensor) -> Tensor:
    """A ``ConvTranspose2d(k, stride=2, padding=k // 2, output_padding=1)`` weight ``[Cin, Cout, k, k]``
    (odd ``k``) -> the ``Conv2d`` weight ``[4 Cout, Cin, n, n]`` (``n = hi - lo + 1`` of
    :func:`subpixel_taps`) whose output, pixel-shuffled by 2, is the transposed convolution's.

    Output pixel ``(2i + a, 2j + b)`` sums input ``(i + lo + u, j + lo + v)`` times tap
    ``(a + k//2 - 2 (lo + u), b + k//2 - 2 (lo + v))``; a tap outside the kernel is zero.
    """
    cin, cout, k = w.shape[0], w.shape[1], w.shape[2]
    p = k // 2
    lo, hi = subpixel_taps(k)
    n = hi - lo + 1
    out = w.new_zeros(cout, 2, 2, cin, n, n)
    for a in range(2):
        for b in range(2):
            for u in range(n):
                for v in range(n):
                    ty, tx = a + p - 2 * (lo + u), b + p - 2 * (lo + v)
                    if 0 <= ty < k and 0 <= tx < k:
                        out[:, a, b, :, u, v] = w[:, :, ty, tx].t()
    return out.reshape(4 * cout, cin, n, n)


def _up2_kernel(layer: nn.ConvTranspose2d) -> int:
    """``k`` if ``layer`` is an exact 2x upsampling ``ConvTranspose2d(k, stride=2, padding=k // 2,
    output_padding=1)`` with odd square ``k`` (CompressAI's ``deconv``), else 0."""
    k = layer.kernel_size[0]
    ok = (layer.kernel_size == (k, k) and k % 2 == 1 and layer.stride == (2, 2)
          and layer.padding == (k // 2, k // 2) and layer.output_padding == (1, 1)
          and layer.dilation == (1, 1) and layer.groups == 1)
    return k if ok else 0


def _subpixel_op(w: Tensor, b: Tensor | None) -> Op:
    """The up-2 transposed convolution of weight ``w [Cin, Cout, k, k]`` as a convolution to
    ``4 Cout`` channels + pixel shuffle. The convolution pads ``P`` on every side; its output
    row ``c + i`` (``c = lo + P``) is input row ``i``'s (cropped when the window is not centred)."""
    lo, hi = subpixel_taps(w.shape[2])
    pad = max(-lo, hi)
    c = lo + pad
    k = subpixel_weight(w).contiguous(memory_format=torch.channels_last)
    kb = b.repeat_interleave(4) if b is not None else None
    if c == 0:   # centred window (k = 5, 9, ...): the output is already the input's size
        return lambda x: F.pixel_shuffle(F.conv2d(x, k, kb, padding=pad), 2)

    def op(x: Tensor) -> Tensor:
        h, wd = x.shape[-2:]
        return F.pixel_shuffle(F.conv2d(x, k, kb, padding=pad)[..., c:c + h, c:c + wd], 2)

    return op


def subpixel_pays(k: int, out_channels: int) -> bool:
    """Whether the up-2 transposed convolution of kernel ``k`` to ``out_channels`` runs faster in
    sub-pixel form: a poor matrix shape (few output channels) and few wasted taps."""
    lo, hi = subpixel_taps(k)
    return out_channels < 16 and 4 * (hi - lo + 1) ** 2 <= SUBPIXEL_MAX_TAPS_RATIO * k * k


def _deconv_op(layer: nn.ConvTranspose2d) -> Op:
    w = layer.weight.detach()
    b = layer.bias.detach() if layer.bias is not None else None
    k = _up2_kernel(layer)
    if k and subpixel_pays(k, w.shape[1]):
        return _subpixel_op(w, b)
    wc = w.contiguous(memory_format=torch.channels_last)
    kw = {"stride": layer.stride, "padding": layer.padding, "output_padding": layer.output_padding,
          "groups": layer.groups, "dilation": layer.dilation}
    return lambda x: F.conv_transpose2d(x, wc, b, **kw)


def _conv_op(layer: nn.Conv2d) -> Op:
    if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
        return layer
    w = layer.weight.detach().contiguous(memory_format=torch.channels_last)
    b = layer.bias.detach() if layer.bias is not None else None
    kw = {"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation, "groups": layer.groups}
    return lambda x: F.conv2d(x, w, b, **kw)


def _gdn_op(layer: GDN) -> Op:
    """``x * (beta + gamma x^2)^(+-1/2)`` per pixel, on blocks of pixels (channels-last rows)."""
    beta = layer.beta_reparam(layer.beta).detach()
    gamma_t = layer.gamma_reparam(layer.gamma).detach().t().contiguous()
    inverse = layer.inverse

    def op(x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(-1, c)      # a view for channels-last x
        out = torch.empty((n, h, w, c), dtype=x.dtype, device=x.device).view(-1, c)
        for s in range(0, rows.shape[0], GDN_ROWS):
            part = rows[s:s + GDN_ROWS]
            norm = torch.addmm(beta, part.square(), gamma_t)
            norm = norm.sqrt_() if inverse else norm.rsqrt_()
            torch.mul(part, norm, out=out[s:s + GDN_ROWS])
        return out.view(n, h, w, c).permute(0, 3, 1, 2)

    return op


def inference_ops(seq: nn.Sequential) -> list[Op]:
    """The layers of ``seq`` as gradient-free functions of channels-last tensors (any layer
    without a faster kernel runs as itself)."""
    ops: list[Op] = []
    for layer in seq:
        if isinstance(layer, nn.ConvTranspose2d):
            ops.append(_deconv_op(layer))
        elif isinstance(layer, nn.Conv2d):
            ops.append(_conv_op(layer))
        elif type(layer) is GDN:
            ops.append(_gdn_op(layer))
        else:
            ops.append(layer)
    return ops


def run_ops(ops: Sequence[Op], x: Tensor) -> Tensor:
    """``x [B, C, H, W]`` through ``ops`` (channels-last inside; the result is channels-last)."""
    x = x.contiguous(memory_format=torch.channels_last)
    for op in ops:
        x = op(x)
    return x


class Derived:
    """A value computed from some tensors, recomputed once any of them is replaced, moved or
    changed in place (each tensor's identity, storage and version counter are compared)."""

    def __init__(self) -> None:
        self._key: tuple = ()
        self._value: Any = None

    def get(self, tensors: Iterable[Tensor], make: Callable[[], Any]) -> Any:
        key = tuple((t, t._version, t.data_ptr()) for t in tensors)
        if len(key) != len(self._key) or any(a[0] is not b[0] or a[1:] != b[1:] for a, b in zip(key, self._key)):
            self._value = make()
            self._key = key
        return self._value


@register_model("gained-mean-scale-hyperprior")
class GainedMeanScaleHyperprior(CompressionModel):
    """Mean-scale hyperprior with gain units.

    ``forward(x [B,3,H,W], rate) -> {"x_hat": [B,3,H,W], "likelihoods": {"y", "z"}}``
    with ``H, W`` multiples of 64. ``synthesis_tail`` (0: N) and ``synthesis_tail_kernel`` set
    the width and kernel of ``g_s``'s last two upsamplings (``g_s[4:]``); ``g_a`` is unchanged.
    """

    def __init__(self, N: int, M: int, levels: int, gain_init: tuple[float, float] = (0.5, 2.0),
                 hyper_gain: bool = True, hyper_channels: int = 0, synthesis_tail: int = 0,
                 synthesis_tail_kernel: int = 5):
        super().__init__()
        self.N, self.M, self.levels, self.use_hyper_gain = int(N), int(M), int(levels), bool(hyper_gain)
        Nz = self.Nz = int(hyper_channels) or self.N
        # The last two upsamplings run at 1/4 and full resolution: their width T and kernel k
        # decide most of the decode's multiply-accumulates (defaults: N and 5, mbt2018-mean's).
        T = self.synthesis_tail = int(synthesis_tail) or self.N
        k = self.synthesis_tail_kernel = int(synthesis_tail_kernel)
        if k < 3 or k % 2 == 0:
            raise ValueError(f"synthesis_tail_kernel must be odd and >= 3, got {synthesis_tail_kernel!r}")
        self.entropy_bottleneck = EntropyBottleneck(Nz)
        self.gaussian_conditional = GaussianConditional(None)
        self.g_a = nn.Sequential(conv(3, N), GDN(N), conv(N, N), GDN(N), conv(N, N), GDN(N), conv(N, M))
        self.g_s = nn.Sequential(
            deconv(M, N), GDN(N, inverse=True), deconv(N, N), GDN(N, inverse=True),
            deconv(N, T, kernel_size=k), GDN(T, inverse=True), deconv(T, 3, kernel_size=k))
        self.h_a = nn.Sequential(
            conv(M, N, stride=1, kernel_size=3), nn.LeakyReLU(inplace=True),
            conv(N, N), nn.LeakyReLU(inplace=True), conv(N, Nz))
        self.h_s = nn.Sequential(
            deconv(Nz, M), nn.LeakyReLU(inplace=True), deconv(M, M * 3 // 2), nn.LeakyReLU(inplace=True),
            conv(M * 3 // 2, M * 2, stride=1, kernel_size=3))
        lo, hi = gain_init
        init = torch.linspace(math.log(lo), math.log(hi), self.levels)[:, None]
        self.log_gain = nn.Parameter(init.repeat(1, M))
        self.log_inv_gain = nn.Parameter(-init.repeat(1, M))
        if self.use_hyper_gain:
            self.log_hyper_gain = nn.Parameter(torch.zeros(self.levels, Nz))
            self.log_inv_hyper_gain = nn.Parameter(torch.zeros(self.levels, Nz))
        self._derived: dict[str, Derived] = {}   # inference kernels and coder tables, never saved

    @classmethod
    def from_params(cls, p: CodecModelParams) -> GainedMeanScaleHyperprior:
        return cls(p.N, p.M, p.levels, tuple(p.gain_init), p.hyper_gain, p.hyper_channels,
                   p.synthesis_tail, p.synthesis_tail_kernel)

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (4 + 2)

    def _gains(self, rate: float) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        r = check_rate(rate, self.levels)
        g = interpolate_log_gains(self.log_gain, r)
        ig = interpolate_log_gains(self.log_inv_gain, r)
        if not self.use_hyper_gain:
            return g, ig, None, None
        return (g, ig, interpolate_log_gains(self.log_hyper_gain, r),
                interpolate_log_gains(self.log_inv_hyper_gain, r))

    def _derive(self, name: str, tensors: Iterable[Tensor], make: Callable[[], Any]) -> Any:
        return self.__dict__.setdefault("_derived", {}).setdefault(name, Derived()).get(tensors, make)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_derived": {}}   # kernels are closures: rebuilt, not pickled

    def _transform(self, name: str, x: Tensor, fast: bool) -> Tensor:
        """``g_a`` or ``g_s`` (``name``) of ``x``; ``fast``: through :func:`inference_ops` (no
        gradients), built once per weights."""
        seq = getattr(self, name)
        if not fast:
            return seq(x)
        ops = self._derive(name, [*seq.parameters(), *seq.buffers()], lambda: inference_ops(seq))
        return run_ops(ops, x)

    def _tables(self, em: nn.Module) -> tuple[CoderTables, Any, tuple]:
        """Validated decoder tables of ``em``, their per-table minimum bits and the encoder's
        lists, built once per ``update``."""
        name = "tables." + ("z" if em is self.entropy_bottleneck else "y")
        return self._derive(name, [em._quantized_cdf, em._cdf_length, em._offset],
                            lambda: _all_tables(em))

    def _scale_indexes(self, scales: Tensor) -> Tensor:
        """``GaussianConditional.build_indexes`` in one pass: the index of a (lower-bounded)
        scale ``s`` is the number of table entries below it, i.e. ``searchsorted(table[:-1], s)``.
        Same integers, NaN included (it sorts last: the widest table)."""
        gc = self.gaussian_conditional
        table = gc.scale_table
        if table.numel() < 2 or not bool((table[1:] > table[:-1]).all()):
            return gc.build_indexes(scales)
        return torch.searchsorted(table[:-1].contiguous(), gc.lower_bound_scale(scales).contiguous()).int()

    def _y_prior(self, z_hat: Tensor, inv_hyper_gain: Tensor | None) -> tuple[Tensor, Tensor]:
        """Decoded z ``[B, Nz, h, w]`` -> y's Gaussian ``(scales, means)``, each ``[B, M, 4h, 4w]``."""
        if inv_hyper_gain is not None:
            z_hat = z_hat * inv_hyper_gain
        scales, means = self.h_s(z_hat).chunk(2, 1)
        return scales, means

    def forward(self, x: Tensor, rate: float) -> dict:
        g, ig, hg, ihg = self._gains(rate)
        fast = not (self.training or torch.is_grad_enabled())   # the kernels compress/decompress use
        y = self._transform("g_a", x, fast).contiguous() * g
        z = self.h_a(y)
        if hg is not None:
            z = z * hg
        z_hat, z_lik = self.entropy_bottleneck(z)
        scales, means = self._y_prior(z_hat, ihg)
        y_hat, y_lik = self.gaussian_conditional(y, scales, means=means)
        x_hat = self._transform("g_s", y_hat * ig, fast)
        return {"x_hat": x_hat, "likelihoods": {"y": y_lik, "z": z_lik}}

    def _z_tables(self, z_shape: torch.Size) -> tuple[Tensor, Tensor]:
        """CDF indexes ``[B, Nz, h, w]`` (one table per channel) and medians ``[1, Nz, 1, 1]``
        of the factorised z prior: what CompressAI's ``EntropyBottleneck.compress`` uses."""
        eb = self.entropy_bottleneck
        idx = torch.arange(z_shape[1], dtype=torch.int32).view(1, -1, 1, 1).expand(z_shape)
        return idx, eb.quantiles[:, 0, 1].detach().view(1, -1, 1, 1)

    def compress(self, x: Tensor, rate: float) -> dict:
        """-> ``{"strings": [one bytes per image], "shape": z_hw}``.

        One rANS string per image holds z's symbols, then y's (CompressAI's buffered
        encoder, decoded in the same order): a second string would cost another flushed
        64-bit state and word padding, ~10 bytes, 6% of our codec's smallest files.
        """
        g, _, hg, ihg = self._gains(rate)
        y = self._transform("g_a", x, not torch.is_grad_enabled()).contiguous() * g
        z = self.h_a(y)
        if hg is not None:
            z = z * hg
        eb, gc = self.entropy_bottleneck, self.gaussian_conditional
        z_idx, z_med = self._z_tables(z.shape)
        z_sym = eb.quantize(z, "symbols", z_med)
        scales, means = self._y_prior(eb.dequantize(z_sym, z_med), ihg)
        y_idx = self._scale_indexes(scales)
        y_sym = gc.quantize(y, "symbols", means)
        z_tab, y_tab = self._tables(eb)[2], self._tables(gc)[2]
        strings = []
        for i in range(x.shape[0]):
            enc = BufferedRansEncoder()
            enc.encode_with_indexes(z_sym[i].reshape(-1).tolist(), z_idx[i].reshape(-1).tolist(), *z_tab)
            enc.encode_with_indexes(y_sym[i].reshape(-1).tolist(), y_idx[i].reshape(-1).tolist(), *y_tab)
            strings.append(enc.flush())
        return {"strings": strings, "shape": tuple(z.shape[-2:])}

    def min_stream_bits(self, shape: tuple[int, int]) -> float:
        """A lower bound on the bits of a string coding latents of spatial shape ``shape``
        (z's ``h, w``): each symbol costs at least what its likeliest value costs under the
        flattest-peaked table. Lets a decoder refuse a header that claims a large image
        with a few bytes before anything of that size is allocated."""
        h, w = shape
        z_bits = float(self._tables(self.entropy_bottleneck)[1].sum()) * h * w
        y_bits = float(self._tables(self.gaussian_conditional)[1].min()) * self.M * 16 * h * w
        return z_bits + y_bits

    def _decode_z(self, reader: RansReader, shape: tuple[int, int]) -> Tensor:
        """z ``[1, Nz, h, w]`` of one image."""
        eb = self.entropy_bottleneck
        z_shape = torch.Size((1, self.Nz, *shape))
        z_idx, z_med = self._z_tables(z_shape)
        sym = reader.decode(z_idx.numpy(), self._tables(eb)[0])
        return eb.dequantize(torch.from_numpy(sym).view(z_shape), z_med)

    def _decode_y(self, reader: RansReader, scales: Tensor, means: Tensor) -> Tensor:
        """y ``[1, M, 4h, 4w]`` given its Gaussian parameters (one image)."""
        gc = self.gaussian_conditional
        idx = self._scale_indexes(scales)
        sym = reader.decode(idx.numpy(), self._tables(gc)[0])
        return gc.dequantize(torch.from_numpy(sym).view(idx.shape), means)

    def decompress(self, strings: list[bytes], shape: tuple[int, int], rate: float) -> dict:
        """Inverse of :meth:`compress`: ``strings`` (one per image) -> ``{"x_hat": [B, 3, H, W]}``.

        Decoded by :class:`~vlmcompress.codec.rans.RansReader` (bounds-checked, and each
        string must be used up exactly); raises :class:`~vlmcompress.codec.rans.RansError`.
        """
        if not (isinstance(strings, (list, tuple)) and strings and all(isinstance(s, bytes) for s in strings)):
            raise ValueError("strings must be a non-empty list of bytes, one per image")
        _, ig, _, ihg = self._gains(rate)
        y_hats = []
        with torch.no_grad():
            for s in strings:
                reader = RansReader(s)
                with one_thread():
                    scales, means = self._y_prior(self._decode_z(reader, shape), ihg)
                y_hats.append(self._decode_y(reader, scales, means))
                reader.finish()
            return {"x_hat": self._transform("g_s", torch.cat(y_hats) * ig, True).clamp_(0, 1)}

    def decompress_split(self, strings: list[list[bytes]], shape: tuple[int, int], rate: float) -> dict:
        """Decode the two-string layout of format versions 1 and 2: ``[y_strings, z_strings]``."""
        if not (isinstance(strings, (list, tuple)) and len(strings) == 2):
            raise ValueError("strings must be [y_strings, z_strings]")
        _, ig, _, ihg = self._gains(rate)
        y_hats = []
        with torch.no_grad():
            for y_s, z_s in zip(*strings):
                z_reader, y_reader = RansReader(z_s), RansReader(y_s)
                z_hat = self._decode_z(z_reader, shape)
                z_reader.finish()
                with one_thread():
                    scales, means = self._y_prior(z_hat, ihg)
                y_hats.append(self._decode_y(y_reader, scales, means))
                y_reader.finish()
            return {"x_hat": self._transform("g_s", torch.cat(y_hats) * ig, True).clamp_(0, 1)}


def _coder_tables(em: nn.Module) -> tuple[list[list[int]], list[int], list[int]]:
    """An updated CompressAI entropy model's rANS tables: CDFs, their lengths, offsets."""
    return (em.quantized_cdf.tolist(), em.cdf_length.reshape(-1).int().tolist(),
            em.offset.reshape(-1).int().tolist())


def _all_tables(em: nn.Module) -> tuple[CoderTables, Any, tuple]:
    """``(decoder tables, their min_bits, encoder lists)`` of an updated entropy model."""
    tables = coder_tables(em)
    return tables, tables.min_bits(), _coder_tables(em)


class LVLMCodec(CompressionModel):
    """Pre-editing net (optional) + a registered variable-rate core, for any image size.

    ``forward(x [B,3,H,W] in [0,1], rate, tokens [B,N,Dv] | None)`` returns
    ``{"x_hat": [B,3,H,W], "likelihoods": {"y", "z"}, "x_edit": [B,3,H,W]}``; ``tokens``
    are the LVLM vision tower's patch tokens of ``x`` (needed only when the pre-editing
    net fuses tokens). ``x_hat`` is not clamped in ``forward`` (gradients), it is in
    ``decompress``.
    """

    def __init__(self, params: CodecModelParams):
        super().__init__()
        check_model_params(params)
        if params.name not in MODELS:
            raise ValueError(f"unknown codec model {params.name!r} (known: {', '.join(sorted(MODELS))})")
        self.params = params
        self.preedit = PreEditNet(params.preedit) if params.preedit.enabled else None
        self.core = MODELS[params.name].from_params(params)

    @property
    def levels(self) -> int:
        return self.params.levels

    @property
    def stride(self) -> int:
        s = self.core.downsampling_factor
        return math.lcm(s, self.preedit.stride) if self.preedit is not None else s

    @property
    def needs_tokens(self) -> bool:
        return self.preedit is not None and self.params.preedit.use_tokens

    def _prepare(self, x: Tensor, tokens: Tensor | None) -> Tensor:
        if x.dim() != 4 or x.shape[1] != 3 or not x.is_floating_point():
            raise ValueError(f"x must be a float tensor [B, 3, H, W], got {x.dtype} {tuple(x.shape)}")
        xp = pad_to_multiple(x, self.stride)
        if self.preedit is None:
            return xp
        return self.preedit(xp, tokens if self.needs_tokens else None)

    def forward(self, x: Tensor, rate: float, tokens: Tensor | None = None) -> dict:
        h, w = x.shape[-2:]
        x_edit = self._prepare(x, tokens)
        out = self.core(x_edit, rate)
        return {"x_hat": out["x_hat"][..., :h, :w], "likelihoods": out["likelihoods"],
                "x_edit": x_edit[..., :h, :w]}

    @torch.no_grad()
    def compress(self, x: Tensor, rate: float, tokens: Tensor | None = None) -> dict:
        """-> ``{"strings": [one bytes per image], "shape": z_hw, "size": (H, W)}`` (one thread:
        the bytes do not depend on the thread count)."""
        h, w = x.shape[-2:]
        with one_thread():
            out = self.core.compress(self._prepare(x, tokens), rate)
        out["size"] = (int(h), int(w))
        return out

    @torch.no_grad()
    def decompress(self, strings: list, shape: tuple[int, int], rate: float,
                   size: tuple[int, int], *, split: bool = False) -> dict:
        """-> ``{"x_hat": [B, 3, H, W]}`` clamped to [0, 1]. ``split``: ``strings`` is the
        ``[y_strings, z_strings]`` pair of format versions 1 and 2."""
        h, w = size
        decode = self.core.decompress_split if split else self.core.decompress
        x_hat = decode(strings, shape, rate)["x_hat"]
        return {"x_hat": x_hat[..., :h, :w]}

    def weights_digest(self) -> bytes:
        """:func:`weights_hash` of this model, recomputed only once a weight or buffer changed."""
        cache = self.__dict__.setdefault("_digest", Derived())
        return cache.get([*self.parameters(), *self.buffers()], lambda: weights_hash(self))

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_digest"}

    def min_stream_bits(self, size: tuple[int, int]) -> float:
        """Fewest bits a file's entropy-coded strings can hold for an image of ``size = (H, W)``."""
        return self.core.min_stream_bits(self.latent_shape(size))

    def latent_shape(self, size: tuple[int, int]) -> tuple[int, int]:
        """Spatial shape of ``z`` for an image of ``size = (H, W)``."""
        s = self.stride
        hp, wp = -(-size[0] // s) * s, -(-size[1] // s) * s
        f = self.core.downsampling_factor
        return hp // f, wp // f


def build_codec(params: CodecModelParams) -> LVLMCodec:
    """A fresh (untrained) codec from its params section."""
    return LVLMCodec(params)


def saved_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The state dict that is saved: weights and fixed buffers, not the coder tables."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
            if not k.endswith(CODER_TABLE_SUFFIXES)}


def weights_hash(model: nn.Module) -> bytes:
    """First 16 bytes of SHA-256 over the saved state dict (names, dtypes, shapes, values).

    Identifies the weights that wrote a bitstream; independent of the coder tables,
    which ``update(force=True)`` derives from the weights.
    """
    h = hashlib.sha256()
    for name, t in sorted(saved_state_dict(model).items()):
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(repr(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.digest()[:16]
