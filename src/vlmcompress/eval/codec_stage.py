"""The codec-evaluation stage (``04_eval_codec``): rate vs LVLM accuracy, against the anchors.

1. Every learned codec under ``outputs/codec/models/<name>/`` is coded at its rate points
   (``eval_codec.learned_rates``), with real bitstreams (``codec.coder``).
2. Each anchor's quality points are picked to span the learned codecs' bpp range
   (``codec.anchors.pick_qualities``) and the test images are coded at them (real files).
3. The decoded images of every (codec, point) go through the LVLM adapter: VQA (overall and
   per question type), captioning (CIDEr), retrieval (R@1 / R@5 both ways), grounding
   (accuracy at IoU >= 0.5), plus PSNR, MS-SSIM and the token-level distortion (MSE and
   cosine similarity of the projected visual tokens of decoded vs original images).
4. BD-rate of every codec against ``bdrate.anchor`` (VVC) on each metric, and of every
   learned codec against ``pixel_baseline``.
5. Each folder in ``data.image_folders`` gets the same sweep, rate-distortion only.
6. The photographs of ``eval_codec.photos`` (any folder, mixed sizes, the first
   ``max_photos``, downscaled to ``photo_max_side``) get it too, reported per image. The
   learned codecs are trained on the data set's scenes: on photographs they show how far
   that training carries, not what a codec trained on photographs would do.

What is coded lives in ``eval/codecs.py``, the scoring in ``eval/scoring.py``, the tables in
``eval/tables.py`` and the examples in ``eval/examples.py``; this module runs them in order.

Outputs (``outputs/eval_codec/``)::

    metrics.json     flat headline numbers, each a number, a string or null: ``anchor``
                     (``bdrate.anchor``); ``ours_bd_rate_<metric>`` against it for every BD
                     metric, ``ours_bd_quality_vqa_acc``, ``ours_bd_rate_vs_pixel_baseline_vqa_acc``;
                     ``uncoded_<metric>`` (the LVLM on the uncoded images); ``n_images``,
                     ``vqa_questions``, ``n_photos``; ``anchor_bpp_min`` / ``_max``,
                     ``ours_bpp_min`` / ``_max``; ``processes`` and ``image_sets_per_process`` (a
                     string: the image sets each process scored, by rank, comma-separated);
                     ``seconds_encode``, ``seconds_tasks``, ``seconds_total``,
                     ``cpu_seconds_encode``, ``cpu_seconds_tasks``
    curves.csv       one row per (codec, point): bpp and every metric; ``original`` = no coding
    rd_images.csv    per-image bpp / PSNR / MS-SSIM of every (codec, point)
    bd_table.csv     every BD-rate and BD-quality (every codec x anchor x metric) with its
                     overlap and the reason when undefined
    examples.csv + examples/<image>/<codec>.png   decoded images at about equal bpp
    folders.csv      rate-distortion curves of each extra image folder (``folder`` column)
    bd_folders.csv   their BD tables (PSNR, MS-SSIM), a ``folder`` column first
    photos_rd.csv    per-photo bpp / PSNR / MS-SSIM of every (codec, point), then their means
                     (``image`` = ``mean``); only the header when ``eval_codec.photos`` is null
    bd_photos.csv    the BD table (PSNR, MS-SSIM) of the photographs' mean curves (header only
                     without photographs)
    cache/           coded files and decoded PNGs per (codec, point) (kept across runs)
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vlmcompress.config import Params
from vlmcompress.data.records import ImageRecord
from vlmcompress.distributed import Processes, merge_shards
from vlmcompress.distributed import current as current_processes
from vlmcompress.eval.codecs import (anchor_codecs, check_stage_params, folder_images, folder_sets,
                                     learned_codecs, models_dir, photo_images, photos_folder, sweep_set)
from vlmcompress.eval.examples import write_examples
from vlmcompress.eval.scoring import decoded_source, task_scores, vision_tokens
from vlmcompress.eval.sweep import CodecSpec, make_pool
from vlmcompress.eval.tables import (PHOTO_COLUMNS, bd_tables, curves_table, folder_tables, headline,
                                     metric_columns, photos_bd, photos_table, with_reference, write_csv)
from vlmcompress.eval.tasks import ImageSource, file_images, vqa_items
from vlmcompress.io import write_json
from vlmcompress.paths import outputs_dir


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (pool workers, ffmpeg): honest cost
    on a shared machine, where wall time depends on the neighbours."""
    import resource

    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + kids.ru_utime + kids.ru_stime


def stage_dir() -> Path:
    return outputs_dir("eval_codec")


# --- the stage --------------------------------------------------------------------------------------

def _code_all(params: Params, records: Sequence[ImageRecord], learned: Sequence[CodecSpec],
              anchors: Sequence[CodecSpec], folders: Mapping[str, Path], photos: Path | None, lvlm, cache: Path,
              progress: bool, log: Callable[[str], None]) -> tuple:
    """Code the test images, the extra folders and the photographs with every codec (cached):
    ``(images, points, rd, bpp_range, folder_rd, photo_images, photo_rd)``."""
    E = params.eval_codec
    from vlmcompress.codec.coder import read_png
    images = {str(r.image_id): read_png(r.path) for r in records}
    need_tokens = any(s.needs_tokens for s in learned)
    tokens = vision_tokens(lvlm, images, E.batch_size) if need_tokens else None
    folder_rd: dict[str, pd.DataFrame] = {}
    with make_pool(E.workers) as pool:
        rd, points, bpp_range = sweep_set(images, learned, anchors, params, pool, cache / "test",
                                          tokens=tokens, progress=progress, log=log)
        for name, path in folders.items():
            imgs = folder_images(path)
            toks = vision_tokens(lvlm, imgs, 1) if need_tokens else None
            folder_rd[name], _, _ = sweep_set(imgs, learned, anchors, params, pool, cache / f"folder-{name}",
                                              tokens=toks, progress=progress, log=log)
        photo_imgs: dict[str, np.ndarray] = {}
        photo_rd = pd.DataFrame(columns=list(PHOTO_COLUMNS))
        if photos is not None:
            photo_imgs = photo_images(photos, E.max_photos, E.photo_max_side)
            toks = vision_tokens(lvlm, photo_imgs, 1) if need_tokens else None
            photo_rd, _, _ = sweep_set(photo_imgs, learned, anchors, params, pool, cache / "photos",
                                       tokens=toks, progress=progress, log=log)
    return images, points, rd, bpp_range, folder_rd, photo_imgs, photo_rd


def run_eval_codec_stage(params: Params, splits: Mapping[str, Sequence[ImageRecord]],
                         log: Callable[[str], None] = print, progress: bool = True,
                         lvlm=None, procs: Processes | None = None) -> dict[str, Any]:
    """Code, score and compare; write ``outputs/eval_codec/*`` (see the module docstring).

    ``lvlm``: an already loaded adapter (default: the pipeline's, ``lvlm_from_params``).
    ``procs``: the processes sharing the work (default: this one, or those ``accelerate
    launch`` started). The main process codes the images (a pool of ``eval_codec.workers``
    CPU processes) and writes; the decoded image sets are scored on every process's own
    device, each taking every ``world``-th set. Returns the metrics written to ``metrics.json``.
    """
    check_stage_params(params)
    procs = procs or current_processes()
    log, progress = procs.main_log(log), progress and procs.is_main
    E = params.eval_codec
    t_start = time.perf_counter()
    out, cache = stage_dir(), stage_dir() / "cache"
    if "test" not in splits or not splits["test"]:
        raise ValueError("eval_codec: the data set has no test split")
    test = list(splits["test"])
    records = test[: E.n_images] if E.n_images > 0 else test
    folders = folder_sets(params)
    photos = photos_folder(params)
    learned, anchors = learned_codecs(), anchor_codecs(params)
    clash = {s.name for s in learned} & {s.name for s in anchors}
    if clash:
        raise ValueError(f"{models_dir()}: learned codec named like an anchor ({', '.join(sorted(clash))})")
    if not learned:
        log(f"no learned codec under {models_dir()}: anchors only")
    specs = {s.name: s for s in [*learned, *anchors]}
    kinds = {s.name: s.kind for s in specs.values()}

    if lvlm is None:
        from vlmcompress.lvlm.load import lvlm_from_params
        device = procs.device(params.lvlm.device)
        lvlm = lvlm_from_params(params, device=device)
    t0, c0 = time.perf_counter(), cpu_seconds()
    coded = _code_all(params, records, learned, anchors, folders, photos, lvlm, cache, progress, log) \
        if procs.is_main else None
    points = procs.from_main(coded[1] if coded else None)     # the others wait while the main process codes
    seconds_encode, cpu_encode = time.perf_counter() - t0, cpu_seconds() - c0
    log(f"coded {len(records)} images at {sum(map(len, points.values()))} points in {seconds_encode:.0f} s "
        f"({cpu_encode:.0f} CPU s)")

    t0, c0 = time.perf_counter(), cpu_seconds()
    items = vqa_items(records, E.max_questions, seed=params.seed)

    def score(src: ImageSource) -> dict[str, float]:
        return task_scores(lvlm, records, src, items, E.batch_size, E.max_captions, E.max_refs)

    from tqdm.auto import tqdm
    jobs: list[tuple[CodecSpec, Any] | None] = [(s, p) for s in specs.values() for p in points[s.name]]
    jobs.append(None)                                        # the uncoded images
    mine = [(i, score(file_images if jobs[i] is None else decoded_source(cache / "test", *jobs[i])))
            for i in tqdm(procs.shard(len(jobs)), desc="tasks", disable=not progress)]
    every = merge_shards(procs.gather(mine))
    sets_per_process = procs.gather(len(mine))
    seconds_tasks, cpu_tasks = time.perf_counter() - t0, cpu_seconds() - c0
    if not procs.is_main:
        return procs.from_main(None)     # the main process's metrics, once it has written them
    reference = every[-1]
    scores = {(job[0].name, job[1]): sc for job, sc in zip(jobs[:-1], every[:-1])}
    images, rd, bpp_range, folder_rd, photo_imgs, photo_rd = coded[0], coded[2], coded[3], coded[4], coded[5], coded[6]

    curves = with_reference(curves_table(rd, scores, kinds), reference, len(records))
    bd = bd_tables(curves, params, metric_columns(curves))
    write_csv(curves, out / "curves.csv")
    write_csv(rd, out / "rd_images.csv")
    write_csv(bd, out / "bd_table.csv")
    write_examples(rd, curves, images, specs, cache / "test", out, E.n_examples, E.example_bpp)
    folder_curves, folder_bd = folder_tables(folder_rd, params, kinds)
    write_csv(folder_curves, out / "folders.csv")
    write_csv(folder_bd, out / "bd_folders.csv")
    # header only without photos: DVC outputs always
    write_csv(photos_table(photo_rd, photo_imgs, kinds), out / "photos_rd.csv")
    write_csv(photos_bd(photo_rd, params, kinds), out / "bd_photos.csv")

    metrics: dict[str, Any] = {
        "anchor": params.bdrate.anchor, **headline(bd, curves, params.bdrate.anchor),
        "n_images": len(records), "vqa_questions": len(items), "n_photos": len(photo_imgs),
        "anchor_bpp_min": round(float(bpp_range[0]), 4), "anchor_bpp_max": round(float(bpp_range[1]), 4),
        "seconds_encode": round(seconds_encode, 1), "seconds_tasks": round(seconds_tasks, 1),
        "cpu_seconds_encode": round(cpu_encode, 1), "cpu_seconds_tasks": round(cpu_tasks, 1),
        "seconds_total": round(time.perf_counter() - t_start, 1),
        "processes": procs.world, "image_sets_per_process": ",".join(map(str, sets_per_process)),
    }
    write_json(out / "metrics.json", metrics)
    log(f"tasks on {len(jobs)} image sets in {seconds_tasks:.0f} s ({cpu_tasks:.0f} CPU s) "
        f"on {procs.world} process(es)")
    return procs.from_main(metrics)
