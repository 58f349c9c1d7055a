"""Training loop of the variable-rate codec (CompressAI habits, ``accelerate`` ready).

* Two optimizers on disjoint parameter sets, as in CompressAI's ``net_aux``: the
  entropy bottleneck's ``quantiles`` are trained by the auxiliary loss only, everything
  else by the rate/distortion loss; :func:`split_parameters` asserts the split.
* Each step draws one rate (a level, or a uniform real in ``[0, R-1]``) for the batch.
* At the end the entropy bottleneck's quantiles are fitted by bisection
  (``quantile_update``), then the final model is saved.
* Everything random in a step (batch indices, crops, flips, rate, quantisation noise) is
  a function of ``(seed, step)`` only, so a run resumed from a checkpoint continues
  exactly where it stopped.
* Output directory::

      model/        codec.json + model.safetensors: the final model (:func:`load_codec`)
      checkpoint/   the last resumable state (the same two files + optim.*)
      curves.csv    one row every ``log_every`` steps (appended)

Runs as is under ``accelerate launch`` (``python -m vlmcompress.codec.launch``): every
process draws the global batch, crops only its contiguous shard and adds the shard's slice
of the global quantisation noise (:func:`global_noise`); DDP averages the main gradients,
and the auxiliary loss needs no reduction (it does not depend on the data). So N processes
train the model one process trains, up to the order of floating-point sums. Only the main
process writes. ``token_fn`` is the caller's frozen LVLM vision tower, already on the
accelerator's device.
"""
from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from compressai.entropy_models import EntropyBottleneck, EntropyModel
from safetensors.torch import load_file, save_file
from torch import Tensor

from vlmcompress.codec.config import CodecModelParams, CodecParams, check_codec_params
from vlmcompress.codec.losses import CodecLoss, TokenFn
from vlmcompress.codec.model import (CODER_TABLE_SUFFIXES, LVLMCodec, build_codec,
                                     saved_state_dict, weights_hash)
from vlmcompress.schema import ConfigError, from_dict, to_dict
from vlmcompress.io import atomic_path, read_json

FORMAT = "vlmcompress-codec"
FORMAT_VERSION = 1
CONFIG_NAME = "codec.json"
WEIGHTS_NAME = "model.safetensors"
CHECKPOINT_DIR = "checkpoint"
MODEL_DIR = "model"
CURVES_NAME = "curves.csv"
# Train settings that may change between a checkpoint and its resumption.
_RESUMABLE_CHANGES = {"steps", "checkpoint_every", "log_every"}


# --- parameters and optimizers ---------------------------------------------------------

def split_parameters(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """Names of the main and auxiliary parameters (disjoint, together all trainable ones).

    Auxiliary = the entropy bottlenecks' ``quantiles`` (CompressAI's ``aux_loss``).
    """
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    aux = sorted(n for n in named if n.endswith(".quantiles"))
    main = sorted(n for n in named if not n.endswith(".quantiles"))
    assert not set(main) & set(aux), "main and aux parameter sets overlap"
    assert set(main) | set(aux) == set(named), "some parameters are in no optimizer"
    return main, aux


def is_gain(name: str) -> bool:
    """A gain unit's per-level log-gains (``log_gain``, ``log_inv_gain``, and the hyper ones)."""
    leaf = name.rsplit(".", 1)[-1]
    return leaf.startswith("log_") and leaf.endswith("gain")


def make_optimizers(model: torch.nn.Module, lr: float, aux_lr: float, gain_lr_scale: float = 1.0
                    ) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """Adam on the main parameters (the gain units in a group of their own, at
    ``gain_lr_scale`` × lr, when that is not 1) and Adam on the auxiliary ones."""
    named = dict(model.named_parameters())
    main, aux = split_parameters(model)
    if gain_lr_scale == 1.0:   # one group, as checkpoints written before the option hold
        groups = [{"params": [named[n] for n in main], "lr_scale": 1.0}]
    else:
        groups = [{"params": [named[n] for n in main if not is_gain(n)], "lr_scale": 1.0},
                  {"params": [named[n] for n in main if is_gain(n)], "lr_scale": gain_lr_scale}]
    return torch.optim.Adam(groups, lr=lr), torch.optim.Adam([named[n] for n in aux], lr=aux_lr)


def lr_at(step: int, params: CodecParams) -> float:
    """Step schedule: ``lr``, then ``0.1 * lr`` from ``lr_decay_at * steps`` on."""
    t = params.train
    return t.lr * (0.1 if step >= int(t.lr_decay_at * t.steps) else 1.0)


# --- deterministic per-step randomness ----------------------------------------------------

def _seed(seed: int, *parts: int) -> int:
    value = seed & 0xFFFFFFFF
    for p in parts:
        value = (value * 1_000_003 + p + 1) % (2 ** 62)
    return value


def _generator(seed: int, *parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(_seed(seed, *parts))


def batch_indices(n: int, batch: int, seed: int, step: int) -> Tensor:
    """Indices of the step's global batch: epochs of seeded permutations ``[batch]``."""
    if n >= batch:
        per_epoch = n // batch
        epoch, k = divmod(step, per_epoch)
        perm = torch.randperm(n, generator=_generator(seed, 1, epoch))
        return perm[k * batch:(k + 1) * batch]
    return torch.randint(n, (batch,), generator=_generator(seed, 2, step))


def draw_rate(levels: int, mode: str, seed: int, step: int) -> float:
    """The step's rate: a random level, or a uniform real in ``[0, levels-1]``."""
    g = _generator(seed, 3, step)
    if mode == "continuous":
        return float(torch.rand((), generator=g)) * (levels - 1)
    return float(torch.randint(levels, (), generator=g))


def _as_float_image(t: Tensor) -> Tensor:
    if t.dtype == torch.uint8:
        return t.float() / 255.0
    if not t.is_floating_point():
        raise ValueError(f"training images must be uint8 or float in [0, 1], got {t.dtype}")
    return t.float()


def _item(images: Tensor | Sequence, i: int) -> Tensor:
    item = images[i]
    if isinstance(item, (tuple, list)):
        item = item[0]
    if not isinstance(item, Tensor):
        raise ValueError(f"training item {i} is {type(item).__name__}, expected a Tensor [3, H, W]")
    if item.dim() != 3 or item.shape[0] != 3:
        raise ValueError(f"training item {i} has shape {tuple(item.shape)}, expected [3, H, W]")
    return item


def make_batch(images: Tensor | Sequence, idx: Tensor, patch: int, seed: int, step: int,
               part: slice = slice(None)) -> Tensor:
    """Random ``patch`` x ``patch`` crops with random horizontal flips: ``[len(idx[part]), 3, p, p]``.

    ``part``: the positions of the global batch ``idx`` to crop (a process's shard). The
    others are neither read nor cropped, but advance the generator as a crop does, so every
    crop is the one a single process cropping the whole batch draws.
    """
    g = _generator(seed, 4, step)
    keep = range(len(idx))[part]
    if keep.step != 1:
        raise ValueError(f"part must be a contiguous slice, got {part}")
    out = []
    for j, i in enumerate(idx.tolist()[:keep.stop]):
        if j < keep.start:
            _skip_crop(g)
            continue
        img = _as_float_image(_item(images, i))
        h, w = img.shape[-2:]
        if h < patch or w < patch:
            raise ValueError(f"training image {i} is {h}x{w}, smaller than patch_size {patch}")
        top = int(torch.randint(h - patch + 1, (), generator=g))
        left = int(torch.randint(w - patch + 1, (), generator=g))
        crop = img[:, top:top + patch, left:left + patch]
        if bool(torch.rand((), generator=g) < 0.5):
            crop = crop.flip(-1)
        out.append(crop)
    return torch.stack(out)


def _skip_crop(g: torch.Generator) -> None:
    # The draws of one crop; each takes one 32-bit word whatever its range, so the image's
    # size is not needed (test_codec_distributed checks shards against the whole batch).
    torch.randint(1, (), generator=g)
    torch.randint(1, (), generator=g)
    torch.rand((), generator=g)


def shard_slice(batch: int, rank: int, world: int) -> slice:
    """Process ``rank``'s contiguous part of a global batch of ``batch`` (divisible by ``world``)."""
    per = batch // world
    return slice(rank * per, (rank + 1) * per)


@contextmanager
def global_noise(model: torch.nn.Module, rank: int, world: int) -> Iterator[None]:
    """Give every entropy model of ``model`` (this instance only) the training noise a
    single process adds to this process's part of the global batch.

    CompressAI draws the uniform noise from the global generator, shaped like its input:
    here each entropy model draws it for the whole batch (the generator is seeded alike on
    every process) and keeps this process's slice. The batch axis is the first one of the
    Gaussian conditional's ``[B, M, h, w]``; the entropy bottleneck quantises
    ``[C, 1, B*h*w]`` (batch before pixels), so there it is the last one.
    """
    if world == 1:
        yield
        return
    patched = [m for m in model.modules() if isinstance(m, EntropyModel)]

    def noisy(module: EntropyModel) -> Callable[..., Tensor]:
        original = type(module).quantize
        axis = -1 if isinstance(module, EntropyBottleneck) else 0

        def quantize(inputs: Tensor, mode: str, means: Tensor | None = None) -> Tensor:
            if mode != "noise":
                return original(module, inputs, mode, means)
            shape = list(inputs.shape)
            per = shape[axis]
            shape[axis] = per * world
            noise = torch.empty(shape, dtype=inputs.dtype, device=inputs.device).uniform_(-0.5, 0.5)
            return inputs + noise.narrow(axis, rank * per, per)

        return quantize

    for m in patched:
        m.quantize = noisy(m)
    try:
        yield
    finally:
        for m in patched:
            del m.quantize


# --- saving and loading -------------------------------------------------------------------

def _flatten_optimizer(sd: dict) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Optimizer state dict -> (tensors for safetensors, JSON-able rest)."""
    tensors: dict[str, Tensor] = {}
    state_meta: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        meta = {}
        for k, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
                meta[k] = "__tensor__"
            else:
                meta[k] = v
        state_meta[str(pid)] = meta
    return tensors, {"state": state_meta, "param_groups": sd["param_groups"]}


def _unflatten_optimizer(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict:
    state = {}
    for pid, st in meta["state"].items():
        state[int(pid)] = {k: (tensors[f"{pid}.{k}"] if v == "__tensor__" else v) for k, v in st.items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def _config_record(model: LVLMCodec, params: CodecParams | None, step: int) -> dict:
    return {"format": FORMAT, "version": FORMAT_VERSION, "model": to_dict(model.params),
            "params": to_dict(params) if params is not None else None,
            "model_hash": weights_hash(model).hex(), "step": step}


def save_codec(model: LVLMCodec, out_dir: str | Path, *, params: CodecParams | None = None,
               step: int = 0, extra: dict[str, Tensor] | None = None,
               extra_meta: dict[str, Any] | None = None) -> Path:
    """Write ``codec.json`` + ``model.safetensors`` (and optional optimizer state) atomically.

    ``out_dir`` is replaced as a whole, so a reader never sees a half-written model.
    """
    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        save_file(saved_state_dict(model), str(tmp / WEIGHTS_NAME))
        (tmp / CONFIG_NAME).write_text(json.dumps(_config_record(model, params, step), indent=2,
                                                  sort_keys=True) + "\n")
        if extra is not None:
            save_file(extra, str(tmp / "optim.safetensors"))
            (tmp / "optim.json").write_text(json.dumps(extra_meta or {}, indent=2, sort_keys=True) + "\n")
    return out_dir


def _read_weights(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises several types for a bad file
        raise ValueError(f"{path}: cannot read weights ({type(exc).__name__}: {exc})") from None


def _load_weights(model: LVLMCodec, path: Path) -> None:
    result = torch.nn.Module.load_state_dict(model, _read_weights(path), strict=False)
    missing = [k for k in result.missing_keys if not k.endswith(CODER_TABLE_SUFFIXES)]
    if missing or result.unexpected_keys:
        raise ValueError(f"{path}: weights do not match the config "
                         f"(missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})")


def warm_start(model: LVLMCodec, model_dir: str | Path) -> list[str]:
    """Copy into ``model`` every weight of the saved codec at ``model_dir`` whose name and
    shape match; returns the names of ``model``'s weights left at their initial values.

    A codec trained for pixels starts one trained for tokens (the seed paper fine-tunes a
    pretrained codec): parts only ``model`` has (the pre-editing net's token branch) keep
    their initialisation; the coder tables are rebuilt by ``update`` anyway. A weight of
    another shape means another architecture: ``ValueError``.
    """
    model_dir = resolve_model_dir(model_dir)
    read_codec_record(model_dir)
    src = _read_weights(model_dir / WEIGHTS_NAME)
    own = model.state_dict()
    clash = [k for k, v in src.items() if k in own and own[k].shape != v.shape
             and not k.endswith(CODER_TABLE_SUFFIXES)]
    if clash:
        k = clash[0]
        raise ValueError(f"{model_dir}: another architecture ({k}: {list(src[k].shape)} here, "
                         f"{list(own[k].shape)} wanted)")
    take = {k: v for k, v in src.items() if k in own and not k.endswith(CODER_TABLE_SUFFIXES)}
    torch.nn.Module.load_state_dict(model, take, strict=False)
    return sorted(k for k in own if k not in take and not k.endswith(CODER_TABLE_SUFFIXES))


def resolve_model_dir(model_dir: str | Path) -> Path:
    """A saved model folder, or a training output folder holding one in ``model/``."""
    model_dir = Path(model_dir)
    if not (model_dir / CONFIG_NAME).exists() and (model_dir / MODEL_DIR / CONFIG_NAME).exists():
        return model_dir / MODEL_DIR
    return model_dir


def read_codec_record(model_dir: str | Path) -> dict:
    """The ``codec.json`` of a saved model, checked for format and version."""
    path = Path(model_dir) / CONFIG_NAME
    record = read_json(path)
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"{path}: not a vlmcompress codec config")
    if record.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: config version {record.get('version')} is not supported")
    return record


def load_codec(model_dir: str | Path, device: str | torch.device = "cpu") -> LVLMCodec:
    """Rebuild a saved codec (config + weights), check its hash, ``update(force=True)``, eval."""
    model_dir = resolve_model_dir(model_dir)
    record = read_codec_record(model_dir)
    mparams = from_dict(CodecModelParams, record.get("model"), "model")
    model = build_codec(mparams)
    _load_weights(model, model_dir / WEIGHTS_NAME)
    if weights_hash(model).hex() != record.get("model_hash"):
        raise ValueError(f"{model_dir}: weights do not match the model_hash in {CONFIG_NAME}")
    model.update(force=True)
    return model.to(device).eval()


# --- processes ------------------------------------------------------------------------------

def make_accelerator() -> Any:
    """The ``accelerate.Accelerator`` :func:`train_codec` uses: one process as is, or the
    processes ``accelerate launch`` started (DDP over GPUs; gloo over CPU processes on a
    machine without CUDA, where accelerate would otherwise run each one alone)."""
    from accelerate import Accelerator, DistributedDataParallelKwargs

    from vlmcompress.distributed import launched_world_size

    launched = launched_world_size()
    # The quantiles get no gradient from the main loss (only from the aux loss).
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    accelerator = Accelerator(cpu=launched > 1 and not torch.cuda.is_available(), kwargs_handlers=[ddp])
    if accelerator.num_processes != launched:
        raise RuntimeError(f"{launched} processes were launched but accelerate joined "
                           f"{accelerator.num_processes}; on CPU set ACCELERATE_USE_CPU=1")
    return accelerator


# --- the loop -----------------------------------------------------------------------------

@dataclass
class TrainResult:
    model: LVLMCodec           # trained, updated, in eval mode
    steps: int                 # total steps done (including resumed ones)
    steps_this_run: int
    seconds: float             # wall time of this call's training loop
    last: dict[str, float]     # the last logged row


def _check_resume(record: dict, params: CodecParams, where: Path) -> None:
    if _comparable(record.get("params") or {}) != _comparable(params):
        raise ValueError(f"{where}: checkpoint was trained with different params; "
                         "delete it or call train_codec(..., resume=False)")


def _comparable(params: CodecParams | dict) -> dict:
    if isinstance(params, dict):
        # A record written before a defaulted key existed means that default: parse it back so
        # it compares equal (a record that no longer parses is compared as written: stale).
        try:
            params = from_dict(CodecParams, params, "record")
        except (ConfigError, TypeError, ValueError):
            pass
    d = to_dict(params) if not isinstance(params, dict) else params
    train = {k: v for k, v in (d.get("train") or {}).items() if k not in _RESUMABLE_CHANGES}
    return {"model": d.get("model"), "loss": d.get("loss"), "train": train}


def training_state(out_dir: str | Path, params: CodecParams) -> str:
    """What :func:`train_codec` would do with ``out_dir`` for ``params``.

    ``"done"``: ``model/`` holds a codec trained with these params for ``train.steps``;
    ``"resume"``: a compatible checkpoint at or before ``train.steps``; ``"fresh"``: nothing
    to continue from; ``"stale"``: a checkpoint of other params (or past ``train.steps``)
    that :func:`train_codec` would refuse: delete the folder to start over.
    """
    out_dir = Path(out_dir)
    want = _comparable(params)
    for sub, state in ((MODEL_DIR, "done"), (CHECKPOINT_DIR, "resume")):
        if not (out_dir / sub / CONFIG_NAME).exists():
            continue
        try:
            record = read_codec_record(out_dir / sub)
        except ValueError:
            return "stale"
        same = _comparable(record.get("params") or {}) == want
        step = int(record.get("step", -1))
        if state == "done" and same and step == params.train.steps:
            return "done"
        if state == "resume":
            return "resume" if same and step <= params.train.steps else "stale"
    return "fresh"


def _truncate_curves(path: Path, step: int) -> None:
    """Drop rows logged after the checkpoint we resume from (they will be redone)."""
    if not path.exists():
        return
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        return
    kept = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= step]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        csv.writer(fh).writerows(kept)


def _append_row(path: Path, row: dict[str, float]) -> None:
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def train_codec(params: CodecParams, train_images: Tensor | Sequence, token_fn: TokenFn | None,
                out_dir: str | Path, *, resume: bool = True, stop_at: int | None = None,
                accelerator: Any = None, token_map: Callable[[Tensor], Tensor] | None = None,
                attention_fn: Callable[[Tensor], Tensor] | None = None,
                init_from: str | Path | None = None) -> TrainResult:
    """Train (or resume training) one codec; see the module docstring.

    Args:
        params: the codec section (model, loss, train).
        train_images: ``[N, 3, H, W]`` uint8 or float in [0, 1], or a map-style dataset
            whose items are ``[3, H, W]`` tensors (or tuples starting with one).
        token_fn: frozen LVLM vision tower, ``[B,3,H,W] -> [B,N,D]`` (None for a pixel-only
            loss without a token pre-editing branch).
        out_dir: where checkpoints, the final model and ``curves.csv`` go.
        resume: continue from ``out_dir/checkpoint`` when it exists.
        stop_at: stop after this global step (to split a run; the final model is not written
            unless ``stop_at >= params.train.steps``).
        accelerator: an ``accelerate.Accelerator`` (default: :func:`make_accelerator`; one
            you pass must set ``find_unused_parameters=True`` for multi-process DDP).
        token_map: the LVLM's frozen projector, for ``loss.token_space: projector``.
        attention_fn: ``x -> [B, N]`` the LVLM tower's CLS attention, for
            ``loss.lowpass_weighting: attention``.
        init_from: a saved codec (:func:`warm_start`) a fresh run starts from instead of
            random weights; ignored when resuming (the checkpoint already holds it).
    """
    check_codec_params(params)
    if accelerator is None:
        accelerator = make_accelerator()
    tp = params.train
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / CHECKPOINT_DIR
    curves = out_dir / CURVES_NAME
    n_images = len(train_images)
    if n_images == 0:
        raise ValueError("train_images is empty")
    if tp.batch_size % accelerator.num_processes:
        raise ValueError(f"batch_size {tp.batch_size} is not divisible by "
                         f"{accelerator.num_processes} processes")

    torch.manual_seed(_seed(tp.seed, 0))
    model = build_codec(params.model)
    criterion = CodecLoss(params.loss, token_fn, token_map, attention_fn)
    if model.needs_tokens and token_fn is None:
        raise ValueError("the pre-editing net fuses LVLM tokens but token_fn is None")
    opt, aux_opt = make_optimizers(model, tp.lr, tp.aux_lr, tp.gain_lr_scale)
    start = 0
    if resume and (ckpt_dir / CONFIG_NAME).exists():
        record = read_codec_record(ckpt_dir)
        _check_resume(record, params, ckpt_dir)
        _load_weights(model, ckpt_dir / WEIGHTS_NAME)
        tensors = load_file(str(ckpt_dir / "optim.safetensors"))
        meta = read_json(ckpt_dir / "optim.json")
        opt.load_state_dict(_unflatten_optimizer(
            {k[5:]: v for k, v in tensors.items() if k.startswith("main.")}, meta["main"]))
        aux_opt.load_state_dict(_unflatten_optimizer(
            {k[4:]: v for k, v in tensors.items() if k.startswith("aux.")}, meta["aux"]))
        start = int(record["step"])
        if accelerator.is_main_process:
            _truncate_curves(curves, start)
    else:
        if init_from is not None:
            warm_start(model, init_from)
        if accelerator.is_main_process and curves.exists():
            curves.unlink()
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()

    model, opt, aux_opt = accelerator.prepare(model, opt, aux_opt)
    core = accelerator.unwrap_model(model)
    main_names, aux_names = map(set, split_parameters(core))
    main_params = [p for n, p in core.named_parameters() if n in main_names]
    aux_params = [p for n, p in core.named_parameters() if n in aux_names]
    end = tp.steps if stop_at is None else min(stop_at, tp.steps)
    world, rank = accelerator.num_processes, accelerator.process_index
    t0 = time.perf_counter()
    last: dict[str, float] = {}

    def checkpoint(step: int) -> None:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            t_main, m_main = _flatten_optimizer(opt.state_dict())
            t_aux, m_aux = _flatten_optimizer(aux_opt.state_dict())
            tensors = {**{f"main.{k}": v for k, v in t_main.items()},
                       **{f"aux.{k}": v for k, v in t_aux.items()}}
            save_codec(core, ckpt_dir, params=params, step=step, extra=tensors,
                       extra_meta={"main": m_main, "aux": m_aux})
        accelerator.wait_for_everyone()

    shard = shard_slice(tp.batch_size, rank, world)
    model.train()
    with global_noise(core, rank, world):
        for step in range(start, end):
            lr = lr_at(step, params)
            for group in opt.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            # Every process draws the global batch and keeps its shard: N processes train on
            # the crops, rates and noise of a one-process run (gradients are averaged by DDP).
            idx = batch_indices(n_images, tp.batch_size, tp.seed, step)
            x = make_batch(train_images, idx, tp.patch_size, tp.seed, step, shard).to(accelerator.device)
            rate = draw_rate(params.model.levels, tp.rate_sampling, tp.seed, step)
            torch.manual_seed(_seed(tp.seed, 5, step, 0))  # quantisation noise: alike on every process

            ref_tokens = None
            if criterion.needs_tokens or core.needs_tokens:
                ref_tokens = criterion.reference_tokens(x) if token_fn is not None else None
            opt.zero_grad(set_to_none=True)
            aux_opt.zero_grad(set_to_none=True)
            out = model(x, rate, ref_tokens if core.needs_tokens else None)
            terms = criterion(out, x, rate, ref_tokens)
            if not torch.isfinite(terms["loss"]):
                raise FloatingPointError(f"non-finite loss at step {step}: "
                                         + ", ".join(f"{k}={float(v):.4g}" for k, v in terms.items()))
            accelerator.backward(terms["loss"])
            if tp.grad_clip > 0:
                accelerator.clip_grad_norm_(main_params, tp.grad_clip)
            opt.step()
            aux_loss = core.aux_loss()
            # autograd.grad, not backward: the aux loss never went through the (DDP) wrapper,
            # so its gradient must not trigger the wrapper's reduction hooks; it is identical
            # on every process anyway (it does not depend on the data).
            for p, g in zip(aux_params, torch.autograd.grad(aux_loss, aux_params)):
                p.grad = g if p.grad is None else p.grad + g
            aux_opt.step()

            done = step + 1
            if done % tp.log_every == 0 or done == end:
                elapsed = time.perf_counter() - t0
                names = list(terms)
                values = torch.stack([terms[k].detach().float() for k in names])
                if world > 1:  # the global batch's mean, not the main process's shard
                    values = accelerator.reduce(values, reduction="mean")
                last = {"step": done, "rate": rate, "lr": lr,
                        **{k: float(v) for k, v in zip(names, values)},
                        "aux_loss": float(aux_loss.detach()), "seconds": round(elapsed, 3),
                        "steps_per_s": round((done - start) / max(elapsed, 1e-9), 4)}
                if accelerator.is_main_process:
                    _append_row(curves, last)
            if done % tp.checkpoint_every == 0 or done == end:
                checkpoint(done)
    seconds = time.perf_counter() - t0
    final_step = max(end, start)
    core = core.cpu()
    if final_step >= tp.steps:
        # Part of the saved weights (the quantiles move), so it happens before saving.
        core.update(force=True, update_quantiles=tp.quantile_update)
        if accelerator.is_main_process:
            save_codec(core, out_dir / MODEL_DIR, params=params, step=final_step)
    accelerator.wait_for_everyone()
    core.update(force=True)
    return TrainResult(model=core.eval(), steps=final_step, steps_this_run=max(end - start, 0),
                       seconds=seconds, last=last)
