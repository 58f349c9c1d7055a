"""Regenerate the README's results section from the pipeline's metrics files (never by hand).

    python scripts/readme_results.py            # rewrite README.md between the markers
    python scripts/readme_results.py --check    # exit 1 if README.md is not up to date

Everything between ``<!-- results:start -->`` and ``<!-- results:end -->`` is replaced by
tables built from ``outputs/*/metrics.json``, ``outputs/eval_codec/bd_table.csv``,
``outputs/tokens/{accuracy,accuracy_by_size,equal_cost,candidates}.csv`` and
``outputs/repro/metrics.json``, the matrix cells of the committed LVLM recipe from the
records ``docs/experiments/lvlm-matrix-*.json`` (cells whose ``train_recipe`` is the recipe
digest of ``params.yaml``), plus links to the main figures. A file that does not exist
yet is reported as such; the output depends on the files only, so running twice changes nothing.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "scripts"))
START, END = "<!-- results:start -->", "<!-- results:end -->"
CODECS = ("ours", "pixel_baseline", "jpeg", "webp", "avif", "hevc")
BD_METRICS = ("vqa_acc", "caption_cider", "retrieval_i2t_r1", "retrieval_t2i_r1", "grounding_acc50", "psnr")
FIGURES = (("rate_accuracy", "Rate vs accuracy, every codec"), ("bd_rate", "BD-rate against VVC"),
           ("ablation", "Loss terms and pre-editing"), ("token_accuracy", "Accuracy vs visual tokens kept"),
           ("token_gflops", "Accuracy vs prefill GFLOPs (equal cost: read across)"),
           ("token_latency", "Accuracy vs measured prefill latency"),
           ("token_grounding", "Grounding vs the fraction of visual tokens kept"),
           ("codec_examples", "Reconstructions at about equal bpp"),
           ("token_examples", "Kept, recovered and merged tokens"))


def _load(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SystemExit(f"readme_results: {path}: invalid JSON at line {exc.lineno}") from None


def fmt(v: Any, nd: int = 1) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return f"{v:.{nd}f}" if isinstance(v, float) else str(v)
    return str(v)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows)]


def _missing(rel: str) -> list[str]:
    return [f"_`{rel}` does not exist yet: run `make repro`._", ""]


def lvlm_section(root: Path) -> list[str]:
    m = _load(root / "outputs/lvlm/metrics.json")
    out = ["### The LVLM on uncoded test images", ""]
    if m is None:
        return out + _missing("outputs/lvlm/metrics.json")
    keys = (("VQA accuracy (%)", "vqa_acc"), ("most-common-answer baseline (%)", "vqa_majority_acc"),
            ("CIDEr", "caption_cider"), ("image→text R@1 (%)", "retrieval_i2t_r1"),
            ("text→image R@1 (%)", "retrieval_t2i_r1"), ("grounding acc@0.5 (%)", "grounding_acc50"))
    rows = [[name, fmt(m.get(k))] for name, k in keys]
    if "text_loc_precision" in m:       # the text tower's question -> patch ranking (lvlm/probe.py)
        rows.append([f"question → top-{m.get('text_loc_k', '?')} patches relevant (%; base rate)",
                     f"{fmt(m['text_loc_precision'])} ({fmt(m.get('text_loc_base'))})"])
    return out + table(["metric", "value"], rows) + [""]


MATRIX_COLUMNS = (("VQA %", "vqa"), ("min margin over majority", "margin_min"), ("R@1 i2t", "i2t_r1"),
                  ("R@1 t2i", "t2i_r1"), ("grounding acc@0.5", "grounding"), ("train s", "train_seconds"))


def matrix_cells(root: Path) -> list[dict[str, Any]] | None:
    """The cells of every matrix record under ``docs/experiments/`` trained with the recipe of
    ``root/params.yaml`` (their ``train_recipe`` equals its recipe digest), by cell name; None
    without a params file."""
    from vlmcompress.config import load_params
    from vlmcompress.lvlm.phases import recipe_digest

    if not (root / "params.yaml").is_file():
        return None
    p = load_params(root / "params.yaml")
    want = recipe_digest(p.lvlm, p.data.scenes)
    cells: dict[str, dict[str, Any]] = {}
    for path in sorted((root / "docs/experiments").glob("lvlm-matrix-*.json")):
        rec = _load(path)
        for name, m in (rec or {}).get("cells", {}).items():
            if isinstance(m, dict) and m.get("train_recipe") == want:
                cells[name] = m
    return [cells[k] for k in sorted(cells)]


def matrix_section(root: Path) -> list[str]:
    """The pipeline's own LVLM beside the matrix's cells of the same recipe: each cell, then
    mean / min / max, and how many cells meet each floor."""
    import lvlm_matrix

    out = ["### The LVLM over seeds and CPU code paths", ""]
    cells = matrix_cells(root)
    if cells is None:
        return out + ["_No `params.yaml`: the recipe is unknown._", ""]
    if not cells:
        return out + ["_No matrix cell of the committed recipe yet: `python scripts/lvlm_matrix.py --record "
                      "docs/experiments/lvlm-matrix-NAME.json` runs them._", ""]
    # A cell that shared the CPU has a wall time that says nothing about the recipe: shown as –.
    rows = lvlm_matrix.summary_rows([{**m, "train_seconds": None} if m.get("cells_at_once", 1) > 1 else m
                                     for m in cells])
    own = _load(root / "outputs/lvlm/metrics.json")
    shown = ([dict(lvlm_matrix.cell_row({**own, "seed": own.get("seed", "")}), seed="pipeline",
                   capability=own.get("train_capability", ""))] if own else []) + rows
    body = [[str(r["seed"]), str(r.get("capability", ""))] + [fmt(r.get(k)) for _, k in MATRIX_COLUMNS]
            for r in shown]
    mean = rows[-3]
    passed = ", ".join(f"{f.name} {mean[f'pass_{f.name}']}" for f in lvlm_matrix.FLOORS)
    return out + table(["seed", "CPU kernels"] + [n for n, _ in MATRIX_COLUMNS], body) + [
        "", f"{len(cells)} cells; cells meeting each floor: {passed} ({lvlm_matrix.floors_note()}; "
        "a cell that shared the CPU with another is not judged on time, and its time is –).", ""]


def _bd_cells(rows: list[dict[str, str]], anchor: str, value: str) -> dict[str, dict[str, float | None]]:
    """``codec -> metric -> value`` (``bd_rate`` or ``bd_quality``) of the ``bd_table.csv`` rows
    against ``anchor``; an empty cell (undefined) is None."""
    out: dict[str, dict[str, float | None]] = {}
    for r in rows:
        if r["anchor"] == anchor:
            out.setdefault(r["codec"], {})[r["metric"]] = float(r[value]) if r.get(value) else None
    return out


def _bd_rows(cells: dict[str, dict[str, float | None]], vs_pixel: dict[str, float | None] | None,
             nd: int) -> list[list[str]]:
    """Table rows: the known codecs in order, any other by name, then ours vs the pixel baseline."""
    names = [c for c in CODECS if c in cells] + sorted(c for c in cells if c not in CODECS)
    rows = [[c, *(fmt(cells[c].get(k), nd) for k in BD_METRICS)] for c in names]
    if vs_pixel:
        rows.append(["ours vs pixel_baseline", *(fmt(vs_pixel.get(k), nd) for k in BD_METRICS)])
    return rows


def codec_section(root: Path) -> list[str]:
    """BD-rate and BD-quality of every codec (``outputs/eval_codec/bd_table.csv``) and the
    uncoded scores (``outputs/eval_codec/metrics.json``)."""
    out = ["### Codec: BD-rate (%) against VVC (negative: fewer bits for the same score)", ""]
    m = _load(root / "outputs/eval_codec/metrics.json")
    if m is None:
        return out + _missing("outputs/eval_codec/metrics.json")
    bd = _csv_rows(root, "outputs/eval_codec/bd_table.csv")
    if bd is None:
        return out + _missing("outputs/eval_codec/bd_table.csv")
    anchor = m.get("anchor") or "vvc"
    rate, quality = _bd_cells(bd, anchor, "bd_rate"), _bd_cells(bd, anchor, "bd_quality")
    pixel = {v: _bd_cells(bd, "pixel_baseline", v).get("ours") for v in ("bd_rate", "bd_quality")}
    out += table(["codec", *BD_METRICS], _bd_rows(rate, pixel["bd_rate"], 1))
    if any(v is not None for c in quality.values() for v in c.values()):
        out += ["", "BD-quality against VVC: mean score difference at equal bpp (VQA and grounding in points, "
                "CIDEr in CIDEr, PSNR in dB; positive: better), defined where BD-rate is not when the "
                "curves share rates but not scores.", ""]
        out += table(["codec", *BD_METRICS], _bd_rows(quality, pixel["bd_quality"], 2))
    out += ["", f"On {m.get('n_images', '?')} test images ({m.get('vqa_questions', '?')} questions); uncoded: "
            + ", ".join(f"{k} {fmt(m.get(f'uncoded_{k}'))}" for k in BD_METRICS if k != "psnr") + ".", ""]
    return out


def _top_rate(rows: list[dict[str, str]], codec: str) -> dict[str, str] | None:
    """The row of ``codec``'s highest rate point in ``curves.csv`` (None if it has none)."""
    mine = [r for r in rows if r.get("codec") == codec and r.get("point") not in (None, "")]
    return max(mine, key=lambda r: float(r["point"])) if mine else None


def codec_model_section(root: Path) -> list[str]:
    """The default codec's rate range, top-rate accuracy against uncoded, speed against VVC and
    training time (``outputs/codec/metrics.json``, ``outputs/eval_codec/curves.csv``)."""
    out = ["### Codec: rate range, speed and training", ""]
    c = _load(root / "outputs/codec/metrics.json")
    if c is None:
        return out + _missing("outputs/codec/metrics.json")
    e = _load(root / "outputs/eval_codec/metrics.json") or {}
    curves = _csv_rows(root, "outputs/eval_codec/curves.csv") or []
    top = _top_rate(curves, "ours")
    rows = [["rate range, real files (bpp)", f"{fmt(c.get('ours.bpp_min'), 4)}–{fmt(c.get('ours.bpp_max'), 4)}", "–"]]
    if top is not None:
        rows.append(["VQA at the top rate (%; uncoded " + fmt(e.get("uncoded_vqa_acc")) + ")",
                     fmt(float(top["vqa_acc"])), "–"])
    th = c.get("timing_threads", "?")
    rows += [[f"decode 512×512, {th} thread (ms, median)", fmt(c.get("decode_ms_512"), 2),
              fmt(c.get("vvc_decode_ms_512"), 2)],
             [f"encode 512×512, {th} thread (ms, median)", fmt(c.get("encode_ms_512"), 2),
              fmt(c.get("vvc_encode_ms_512"), 2)],
             ["training (s): pixel baseline + ours", f"{fmt(c.get('pixel_baseline.train_seconds'))} + "
              f"{fmt(c.get('ours.train_seconds'))} = {fmt(c.get('train_seconds'))}", "–"]]
    out += table(["", "ours", f"VVC (VVenC, QP {c.get('vvc_qp', '?')})"], rows)
    return out + ["", "Wall times of one image in the same run (median of `codec.eval.timing_repeats` after a "
                  "warm-up; `benchmarks/bench_codec_speed.py` repeats it). VVenC runs at `codec.eval.vvc_preset` here, "
                  "the speed reference; the BD-rate anchor is `bdrate.anchor`.", ""]


def _budget_order(key: str) -> tuple[int, float, str]:
    """Numeric budgets (fractions or counts) ascending, then named ones (``adaptive``)."""
    try:
        return (0, float(key), key)
    except ValueError:
        return (1, 0.0, key)


def _csv_rows(root: Path, rel: str) -> list[dict[str, str]] | None:
    """The rows of the stage CSV ``root / rel``, or None when it does not exist yet."""
    path = root / rel
    if not path.is_file():
        return None
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def tokens_section(root: Path) -> list[str]:
    out = ["### Visual-token compression: VQA accuracy (%) by token budget", ""]
    rows = _csv_rows(root, "outputs/tokens/accuracy.csv")
    if rows is None:
        return out + _missing("outputs/tokens/accuracy.csv")
    rows = [r for r in rows if r.get("question_type") == "all"]
    budgets = sorted({r["budget"] for r in rows}, key=_budget_order)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cell = {(r["method"], r["budget"]): r for r in rows}

    def show(method: str, b: str) -> str:
        r = cell.get((method, b))
        return f"{float(r['acc']):.1f} ({float(r['mean_tokens']):.0f})" if r else "–"

    out += table(["method", *(f"budget {b}" for b in budgets)],
                 [[meth, *(show(meth, b) for b in budgets)] for meth in methods])
    out += ["", "Cells: accuracy (mean visual tokens kept).", ""]
    m = _load(root / "outputs/tokens/metrics.json")
    if m and m.get("selection_overhead_pct") is not None:
        speed = next((v for k, v in m.items() if k.startswith("prefill_speedup_")), None)
        out += [f"Measured prefill of `{m.get('reference_method')}` at the task budget: {fmt(speed, 2)}× faster than "
                f"all tokens; its selection overhead is {fmt(m['selection_overhead_pct'])} % of its prefill: "
                f"the CLIP text tower {fmt(m.get('text_encoder_pct'))} %, selection and merging "
                f"{fmt(m.get('selection_merge_pct'))} %.", ""]
    if m and m.get("ours_acc") is not None and m.get("best_peer"):
        diff = m.get("ours_minus_best_peer")
        line = (f"At the task budget ({m.get('task_budget')}), ours (`{m.get('ours')}`) scores {fmt(m['ours_acc'])} % "
                f"({fmt(m.get('ours_rel_acc'))} % of all tokens); the most accurate peer, `{m['best_peer']}`, "
                f"{fmt(m.get('best_peer_acc'))} %; at equal prefill cost ours minus it is "
                f"{'–' if diff is None else f'{diff:+.1f}'} ± {fmt(m.get('ours_minus_best_peer_se'))} points.")
        out += [line, ""]
    return out + size_table(_csv_rows(root, "outputs/tokens/accuracy_by_size.csv") or [], (m or {}).get("task_budget"))


def size_table(rows: list[dict[str, str]], key: str | None) -> list[str]:
    """Accuracy by the size of the objects a question names, of every run at the task budget
    ``key`` and of the full model (rows of ``accuracy_by_size.csv``); nothing without sizes."""
    full = [r for r in rows if r["method"] == "full"]
    if not key or not full:
        return []
    n = {r["size"]: int(r["n"]) for r in full}
    classes = [c for c in ("small", "large", "none") if c in n]
    acc: dict[str, dict[str, float]] = {}
    for r in rows:
        if r["method"] == "full" or r["budget"] == key:
            acc.setdefault(f"{r['method']}@{r['budget']}", {})[r["size"]] = float(r["acc"])
    runs = sorted(acc, key=lambda k: (not k.startswith("full@"), k))
    counts = ", ".join(f"{c} {n[c]}" for c in classes)
    return [f"At the task budget, by the size of the objects a question names (questions: {counts}):", "",
            *table(["method", *classes], [[k, *(fmt(acc[k].get(c)) for c in classes)] for k in runs]), ""]


def equal_cost_section(root: Path) -> list[str]:
    """Ours against every peer run at equal prefill GFLOPs (``outputs/tokens/equal_cost.csv``)."""
    out = ["### Visual-token compression at equal prefill cost", ""]
    rows = _csv_rows(root, "outputs/tokens/equal_cost.csv")
    if rows is None:
        return out + _missing("outputs/tokens/equal_cost.csv")
    m = _load(root / "outputs/tokens/metrics.json") or {}
    if not rows:
        return out + ["_No peer to compare with: `tokens.methods` has no method besides ours._", ""]
    ours = rows[0]["ours"]
    val = {r["method"]: float(r["val_acc"]) for r in _csv_rows(root, "outputs/tokens/candidates.csv") or []
           if r.get("val_acc")}
    how = (f"chosen on {m.get('val_questions', '?')} validation questions among "
           + ", ".join(f"`{k}` {fmt(v)} %" for k, v in val.items()) + " (mean accuracy over the budgets)"
           if val else "the only candidate")
    tol = m.get("cost_tolerance")
    out += [f"Ours is `{ours}`, {how}. Each peer run is paired with the run of ours whose prefill GFLOPs per "
            f"question (vision tower, text guidance, LM prefill with the tokens actually kept; FastV's first "
            f"layers on every token) is nearest; runs of ours are added at solved token counts so costs match "
            f"within {fmt(100 * tol, 0) if isinstance(tol, float) else '?'} % where a count can. Difference: ours "
            f"minus the peer on the same test questions, in points, with its paired standard error.", ""]
    body = []
    for r in rows:
        gap = f"{float(r['gap_pct']):+.1f} %" + ("" if r["matched"] == "True" else " (not matched)")
        z = fmt(float(r["z"]), 1) if r.get("z") else "–"
        body.append([f"{r['peer']} @ {r['peer_budget']}", f"{float(r['peer_tokens']):.0f}",
                     f"{float(r['peer_gflops']):.3f}", f"{r['ours_budget']} ({float(r['ours_tokens']):.0f})", gap,
                     f"{float(r['diff']):+.1f} ± {float(r['se']):.1f}", z])
    out += table(["peer @ budget", "peer tokens", "GFLOPs", "ours @ budget (tokens)", "cost gap", "diff ± se",
                  "z"], body)
    return out + ["", "Above a peer means a positive difference about two standard errors or more (|z| ≥ 2).", ""]


def repro_section(root: Path) -> list[str]:
    m = _load(root / "outputs/repro/metrics.json")
    out = ["### Reproduction time", ""]
    if m is None:
        return out + ["_Not measured yet: `python scripts/time_repro.py` times `make repro`._", ""]
    cmd = m.get("command", "make repro")
    # The CPU model the time holds on is in the metrics file; the README points there.
    cpu = " (CPU model in `outputs/repro/metrics.json`)" if m.get("cpu_model") else ""
    line = f"`{cmd}`: {fmt(m.get('repro_minutes'))} min on {m.get('cpus', '?')} CPUs{cpu}"
    if "noop_seconds" in m:
        line += f"; again with nothing changed: {fmt(m['noop_seconds'])} s"
    line += "."
    if "-f" in cmd.split() or "--force" in cmd.split():
        line += (" A forced run re-runs every stage but reuses the persisted training checkpoints and coded files"
                 " of unchanged settings; a fresh clone's `make repro` does all the work.")
    if isinstance(m.get("stages"), dict):
        from time_repro import changed_stages, stage_digests

        changed = changed_stages(m["stages"], stage_digests(root / "dvc.lock"))
        if changed:
            line += (f" Re-run with other settings or results since this timing: {', '.join(changed)};"
                     " `python scripts/time_repro.py` re-times the pipeline as it is now.")
    return out + [line, ""]


def figures_section(root: Path) -> list[str]:
    out = ["### Figures", ""]
    have = [(n, t) for n, t in FIGURES if (root / f"outputs/figures/{n}.png").is_file()]
    if not have:
        return out + _missing("outputs/figures/")
    for name, title in have:
        out += [f"**{title}** ([data](outputs/figures/{name}.csv), [svg](outputs/figures/{name}.svg))", "",
                f"![{title}](outputs/figures/{name}.png)", ""]
    return out


SECTIONS: tuple[Callable[[Path], list[str]], ...] = (lvlm_section, matrix_section, codec_section, codec_model_section,
                                                      tokens_section, equal_cost_section, repro_section,
                                                      figures_section)


def render(root: Path) -> str:
    lines = ["_Generated by `python scripts/readme_results.py` from the files under `outputs/`; "
             "do not edit by hand._", ""]
    for section in SECTIONS:
        lines += section(root)
    return "\n".join(lines).rstrip() + "\n"


def splice(readme: str, body: str, where: str = "README.md") -> str:
    """``readme`` with the text between the markers replaced by ``body``."""
    if readme.count(START) != 1 or readme.count(END) != 1 or readme.index(START) > readme.index(END):
        raise SystemExit(f"readme_results: {where}: needs exactly one {START} ... {END} pair")
    head, rest = readme.split(START)
    _, tail = rest.split(END)
    return f"{head}{START}\n{body}{END}{tail}"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=ROOT)
    ap.add_argument("--check", action="store_true", help="exit 1 when README.md would change")
    args = ap.parse_args(argv)
    path = args.root / "README.md"
    if not path.is_file():
        raise SystemExit(f"readme_results: {path}: no such file")
    old = path.read_text()
    new = splice(old, render(args.root), str(path))
    if args.check:
        if new != old:
            print(f"{path}: results section is out of date; run python scripts/readme_results.py")
            return 1
        return 0
    if new != old:
        path.write_text(new)
        print(f"{path}: results section updated")
    else:
        print(f"{path}: results section already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
