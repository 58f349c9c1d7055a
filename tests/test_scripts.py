"""scripts/ and benchmarks/: the README tools (readme_results idempotent, time_repro), the trials'
and probes' answers to bad input, and that every script is run by a documented command."""
from __future__ import annotations

import ast
import importlib.util
import json
import re
import shlex
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _script(name: str, folder: str = "scripts"):
    spec = importlib.util.spec_from_file_location(name, REPO / folder / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


readme = _script("readme_results")
time_repro = _script("time_repro")


def _project(root: Path) -> None:
    (root / "README.md").write_text("# x\n\nintro\n\n<!-- results:start -->\nstale text\n<!-- results:end -->\n\ntail\n")
    (root / "outputs/eval_codec").mkdir(parents=True)
    (root / "outputs/eval_codec/metrics.json").write_text(json.dumps({
        "anchor": "vvc", "ours_bd_rate_vqa_acc": -61.23, "uncoded_vqa_acc": 71.2, "uncoded_caption_cider": None,
        "n_images": 48, "vqa_questions": 288}))
    (root / "outputs/eval_codec/bd_table.csv").write_text(      # the columns the README reads
        "codec,anchor,metric,bd_rate,reason,bd_quality\n"
        "ours,vvc,vqa_acc,-61.234,,-4.5\nours,vvc,psnr,40.0,,\n"
        "jpeg,vvc,vqa_acc,120.5,,\njpeg,vvc,psnr,,no overlap,\n"
        "ours,pixel_baseline,vqa_acc,-30.0,,9.25\n")
    (root / "outputs/eval_codec/curves.csv").write_text(   # ours' top rate is point 6, not the last row
        "codec,kind,point,bpp,vqa_acc\nours,learned,0.0,0.03,50.0\nours,learned,6.0,0.15,88.98\n"
        "ours,learned,3.0,0.09,80.0\nvvc,anchor,28.0,0.9,97.7\n")
    (root / "outputs/codec").mkdir(parents=True)
    (root / "outputs/codec/metrics.json").write_text(json.dumps({
        "ours.bpp_min": 0.0286, "ours.bpp_max": 0.1515, "decode_ms_512": 46.12, "vvc_decode_ms_512": 52.88,
        "encode_ms_512": 216.62, "vvc_encode_ms_512": 218.95, "timing_threads": 1, "vvc_qp": 32,
        "pixel_baseline.train_seconds": 593.0, "ours.train_seconds": 299.6, "train_seconds": 892.6}))
    (root / "outputs/tokens").mkdir(parents=True)
    (root / "outputs/tokens/accuracy.csv").write_text(
        "method,budget,mean_tokens,question_type,acc\n"
        "recoverable,0.10,25.6,all,66.5\nrecoverable,0.10,25.6,color,70.0\nfull,1.00,256,all,70.1\n"
        "recoverable,adaptive,30.2,all,67.0\n")
    (root / "outputs/tokens/metrics.json").write_text(json.dumps({
        "reference_method": "recoverable", "prefill_speedup_0.10": 1.456, "selection_overhead_pct": 9.87,
        "text_encoder_pct": 6.1, "selection_merge_pct": 3.77, "task_budget": "0.10", "ours": "recoverable",
        "ours_acc": 66.5, "ours_rel_acc": 94.86, "best_peer": "pool", "best_peer_acc": 64.0,
        "ours_minus_best_peer": 1.25, "ours_minus_best_peer_se": 0.5}))
    (root / "outputs/tokens/accuracy_by_size.csv").write_text(
        "method,budget,size,acc,n\nfull,1.00,large,90.0,20\nfull,1.00,small,80.0,10\n"
        "recoverable,0.10,small,60.0,10\nrecoverable,0.50,small,70.0,10\n")
    (root / "outputs/lvlm").mkdir(parents=True)
    (root / "outputs/lvlm/metrics.json").write_text(json.dumps({"vqa_acc": 63.7, "text_loc_k": 13,
                                                                "text_loc_precision": 72.69, "text_loc_base": 7.74}))
    (root / "outputs/repro").mkdir(parents=True)
    (root / "outputs/repro/metrics.json").write_text(json.dumps({"repro_minutes": 42.5, "cpus": 2,
                                                                 "cpu_model": "AMD EPYC", "noop_seconds": 3.2}))
    (root / "outputs/figures").mkdir(parents=True)
    (root / "outputs/figures/rate_accuracy.png").write_bytes(b"png")


def test_readme_section_from_metrics_and_idempotent(tmp_path, capsys):
    _project(tmp_path)
    assert readme.main(["--root", str(tmp_path)]) == 0
    first = (tmp_path / "README.md").read_text()
    assert "stale text" not in first and first.startswith("# x\n\nintro\n") and first.endswith("\n\ntail\n")
    assert "| ours | -61.2 | – | – | – | – | 40.0 |" in first
    assert "| jpeg | 120.5 | – | – | – | – | – |" in first
    assert "| ours vs pixel_baseline | -30.0 |" in first
    assert "| ours | -4.50 | – |" in first and "| ours vs pixel_baseline | 9.25 |" in first   # BD-quality
    assert "On 48 test images (288 questions); uncoded: vqa_acc 71.2, caption_cider –, " in first
    assert "| rate range, real files (bpp) | 0.0286–0.1515 | – |" in first
    assert "| VQA at the top rate (%; uncoded 71.2) | 89.0 | – |" in first
    assert "| decode 512×512, 1 thread (ms, median) | 46.12 | 52.88 |" in first
    assert "| training (s): pixel baseline + ours | 593.0 + 299.6 = 892.6 | – |" in first
    assert "| method | budget 0.10 | budget 1.00 | budget adaptive |" in first
    assert "| recoverable | 66.5 (26) | – | 67.0 (30) |" in first and "| full | – | 70.1 (256) | – |" in first
    assert ("42.5 min on 2 CPUs (CPU model in `outputs/repro/metrics.json`); again with nothing changed: 3.2 s"
            in first)
    assert "![Rate vs accuracy, every codec](outputs/figures/rate_accuracy.png)" in first
    assert "| question → top-13 patches relevant (%; base rate) | 72.7 (7.7) |" in first
    assert "| VQA accuracy (%) | 63.7 |" in first and "| CIDEr | – |" in first
    assert ("`recoverable` at the task budget: 1.46× faster than all tokens; its selection overhead is 9.9 % "
            "of its prefill: the CLIP text tower 6.1 %, selection and merging 3.8 %.") in first
    assert "(questions: small 10, large 20)" in first
    assert "| full@1.00 | 80.0 | 90.0 |" in first and "| recoverable@0.10 | 60.0 | – |" in first
    assert "recoverable@0.50" not in first                                  # the task budget only
    assert ("At the task budget (0.10), ours (`recoverable`) scores 66.5 % (94.9 % of all tokens); the most "
            "accurate peer, `pool`, 64.0 %; at equal prefill cost ours minus it is +1.2 ± 0.5 points.") in first
    assert readme.main(["--root", str(tmp_path)]) == 0
    assert (tmp_path / "README.md").read_text() == first
    assert readme.main(["--root", str(tmp_path), "--check"]) == 0
    (tmp_path / "outputs/repro/metrics.json").write_text(json.dumps({"repro_minutes": 50.0, "cpus": 2}))
    assert readme.main(["--root", str(tmp_path), "--check"]) == 1
    (tmp_path / "outputs/lvlm/metrics.json").unlink()
    assert readme.main(["--root", str(tmp_path)]) == 0
    assert "_`outputs/lvlm/metrics.json` does not exist yet" in (tmp_path / "README.md").read_text()


def test_readme_without_markers_is_refused(tmp_path):
    (tmp_path / "README.md").write_text("# no markers\n")
    with pytest.raises(SystemExit, match="needs exactly one <!-- results:start -->"):
        readme.main(["--root", str(tmp_path)])


def test_repo_readme_has_one_results_section():
    text = (REPO / "README.md").read_text()
    assert text.count(readme.START) == 1 and text.count(readme.END) == 1


def test_time_repro_prints_and_writes_minutes(tmp_path, capsys):
    cmd = shlex.join([sys.executable, "-c", "pass"])
    assert time_repro.main(["--cmd", cmd, "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("repro_minutes: ") and "noop_seconds: " in out
    m = json.loads((tmp_path / "outputs/repro/metrics.json").read_text())
    assert set(m) == {"repro_minutes", "noop_seconds", "cpus", "cpu_model", "command", "stages"}
    assert m["repro_minutes"] >= 0 and m["cpu_model"] and m["stages"] == {}     # no dvc.lock here


LOCK = """schema: '2.0'
stages:
  a:
    cmd: run a
    deps:
    - path: src/x.py
      md5: {dep}
    params:
      params.yaml:
        a.steps: {steps}
    outs:
    - path: outputs/a
      md5: {out}.dir
  b:
    cmd: run b
    outs:
    - path: outputs/b
      md5: bbb
"""


def _lock(path: Path, dep="d1", steps=10, out="o1") -> Path:
    path.write_text(LOCK.format(dep=dep, steps=steps, out=out))
    return path


def test_stage_digests_follow_params_and_outputs_not_code(tmp_path):
    base = time_repro.stage_digests(_lock(tmp_path / "l0"))
    assert set(base) == {"a", "b"} and all(len(v) == 12 for v in base.values())
    # a code edit committed without a re-run leaves the stage as timed
    assert time_repro.stage_digests(_lock(tmp_path / "l1", dep="d2")) == base
    for kw in ({"steps": 20}, {"out": "o2"}):
        now = time_repro.stage_digests(_lock(tmp_path / "l2", **kw))
        assert time_repro.changed_stages(base, now) == ["a"]
    assert time_repro.changed_stages(base, {"a": base["a"]}) == ["b"]       # a stage removed
    assert time_repro.stage_digests(tmp_path / "missing") == {}
    (tmp_path / "bad").write_text("stages: [1, 2\n")
    assert time_repro.stage_digests(tmp_path / "bad") == {}
    (tmp_path / "list").write_text("- stages\n")
    assert time_repro.stage_digests(tmp_path / "list") == {}


def test_time_repro_records_the_lock_and_the_readme_names_later_reruns(tmp_path):
    _lock(tmp_path / "dvc.lock")
    cmd = shlex.join([sys.executable, "-c", "pass"])
    assert time_repro.main(["--cmd", cmd, "--no-noop", "--root", str(tmp_path)]) == 0
    text = "\n".join(readme.repro_section(tmp_path))
    assert "Re-run" not in text and "forced run" not in text          # `python -c pass` is not forced
    _lock(tmp_path / "dvc.lock", steps=20)                  # stage a re-run with other params
    text = "\n".join(readme.repro_section(tmp_path))
    assert "Re-run with other settings or results since this timing: a;" in text


def test_the_readme_says_a_forced_run_reuses_persisted_work(tmp_path):
    cmd = shlex.join([sys.executable, "-c", "pass", "-f"])       # `-f` reaches the script, as in `dvc repro -f`
    assert time_repro.main(["--cmd", cmd, "--no-noop", "--root", str(tmp_path)]) == 0
    assert "A forced run re-runs every stage but reuses" in "\n".join(readme.repro_section(tmp_path))


def test_the_cpu_model_is_read_from_cpuinfo(tmp_path):
    from vlmcompress.machine import cpu_model

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9B14\n\nprocessor\t: 1\n")
    assert cpu_model(info) == "AMD EPYC 9B14"
    assert cpu_model(tmp_path / "missing")        # falls back to the platform's name


def test_time_repro_second_run_can_use_its_own_command(tmp_path, capsys):
    marker = tmp_path / "second_ran"
    first = shlex.join([sys.executable, "-c", "pass"])
    second = shlex.join([sys.executable, "-c", f"open({str(marker)!r}, 'w').close()"])
    assert time_repro.main(["--cmd", first, "--noop-cmd", second, "--root", str(tmp_path)]) == 0
    assert marker.exists()
    bad = shlex.join([sys.executable, "-c", "raise SystemExit(4)"])
    (tmp_path / "x").mkdir()
    assert time_repro.main(["--cmd", first, "--noop-cmd", bad, "--root", str(tmp_path / "x")]) == 4
    assert "second" in capsys.readouterr().err and not (tmp_path / "x/outputs/repro/metrics.json").exists()


def test_time_repro_failure_writes_nothing(tmp_path, capsys):
    cmd = shlex.join([sys.executable, "-c", "raise SystemExit(3)"])
    assert time_repro.main(["--cmd", cmd, "--root", str(tmp_path)]) == 3
    assert "failed with exit code 3" in capsys.readouterr().err
    assert not (tmp_path / "outputs/repro/metrics.json").exists()


def test_token_ablation_overrides_are_validated_like_params():
    from vlmcompress.tokens.config import TokensParams

    ablation = _script("token_ablation")
    base = TokensParams()
    t = ablation.apply_overrides(base, "grid_positions=true, recoverable.merge=false,recoverable.recovered_share=0.5")
    assert t.grid_positions is True and t.recoverable.merge is False and t.recoverable.recovered_share == 0.5
    assert t.prumerge == base.prumerge                       # untouched sections stay as they were
    assert ablation.apply_overrides(base, "") == base
    for bad in ("grid_position=true", "recoverable.nope=1", "no_equals_sign"):
        with pytest.raises(SystemExit, match="token_ablation"):
            ablation.apply_overrides(base, bad)
    with pytest.raises(ValueError, match="recovered_share"):   # the loader's own range check
        ablation.apply_overrides(base, "recoverable.recovered_share=0.9")


def test_token_ablation_confusion_counts_reference_against_given_answers():
    from vlmcompress.data.records import Question
    from vlmcompress.tokens.sweep import Run, RunOutput

    ablation = _script("token_ablation")

    def q(i, answer, qtype):
        return Question(i, "how many?", answer, (answer,) * 10, qtype, "number")

    qs = [q(1, "1", "count"), q(2, "1", "count"), q(3, "0", "count"), q(4, "red", "color")]
    outputs = {Run("full", None): RunOutput(samples=[(None, x) for x in qs], answers=["1", "1", "0", "red"]),
               Run("random", 0.1): RunOutput(samples=[(None, x) for x in qs], answers=["2", " 1", "1", "blue"])}
    table = ablation.confusion_table(outputs, "count")
    assert table.loc[("full", "1.00")].to_dict() == {"0->0": 1, "0->1": 0, "1->1": 2, "1->2": 0}
    assert table.loc[("random", "0.10")].to_dict() == {"0->0": 0, "0->1": 1, "1->1": 1, "1->2": 1}
    with pytest.raises(SystemExit, match="no 'shape' questions"):
        ablation.confusion_table(outputs, "shape")


def test_probes_answer_bad_input_with_one_line(tmp_path, capsys):
    codec_probe, text_probe = _script("codec_probe"), _script("text_probe")
    assert codec_probe.main([str(tmp_path / "no_such_codec")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("codec_probe: ") and "\n" not in err
    bad = tmp_path / "params.yaml"
    bad.write_text("seed: 0\nnot_a_section: 1\n")
    assert text_probe.main(["--params", str(bad)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("text_probe: ") and "not_a_section" in err and "\n" not in err
    position_probe = _script("position_probe")
    assert position_probe.main(["--llava", str(tmp_path / "no_such_model")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("position_probe: ") and "no_such_model" in err and "\n" not in err
    codec_trial = _script("codec_trial")
    assert codec_trial.main([str(bad), str(tmp_path / "work")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("codec_trial: ") and "not_a_section" in err and "\n" not in err
    assert codec_trial.main([str(REPO / "params.yaml"), str(tmp_path / "work"), "--rates", "9"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("codec_trial: rate must be in") and "\n" not in err
    (tmp_path / "old/checkpoint").mkdir(parents=True)
    (tmp_path / "old/checkpoint/codec.json").write_text("{}")
    assert codec_trial.main([str(REPO / "params.yaml"), str(tmp_path / "old")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("codec_trial: ") and "holds a codec of other params" in err and "\n" not in err
    assert codec_trial.main([str(REPO / "params.yaml"), str(tmp_path / "new"), "--init", str(tmp_path / "none")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("codec_trial: ") and "none/codec.json: no such file" in err and "\n" not in err
    no_edit = tmp_path / "no_edit.yaml"
    no_edit.write_text((REPO / "params.yaml").read_text().replace(
        "    preedit:               # U-Net before coding; fuses the LVLM tower's tokens of the input\n      enabled: true",
        "    preedit:\n      enabled: false"))
    assert "enabled: false" in no_edit.read_text()
    assert codec_trial.main([str(no_edit), str(tmp_path / "w2"), "--edited"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "codec_trial: --edited: codec 'ours' has no pre-editing net"


def test_position_probe_reads_a_linear_code_and_not_noise():
    import torch

    probe = _script("position_probe").probe_accuracy
    torch.manual_seed(0)
    col = torch.arange(16).repeat(40)                                  # 40 "images" of 16 cells
    coded = torch.nn.functional.one_hot(col, 16).float() + 0.1 * torch.randn(640, 16)
    noise = torch.randn(640, 16)
    train, test, mask = slice(0, 480), slice(480, None), torch.ones(640, dtype=torch.bool)
    assert probe(coded, col, train, test, mask) == 1.0
    assert probe(noise, col, train, test, mask) < 0.3
    # A scalar code along one direction: the regression reads it, the one-hot classifier cannot.
    mae = _script("position_probe").probe_mae
    scalar = col[:, None].float() * torch.randn(1, 16) + 0.01 * torch.randn(640, 16)
    assert mae(scalar, col, train, test, mask) < 0.1 and mae(noise, col, train, test, mask) > 3.0
    assert probe(scalar, col, train, test, mask) < 0.5
    # Boxes: fitted and scored on the masked rows only; pixels of the image side.
    box_px = _script("position_probe").probe_box_px
    boxes = torch.rand(640, 4) * 2 - 1
    mask = torch.arange(640) % 2 == 0                                  # every other row an object patch
    coded = torch.cat([boxes @ torch.randn(4, 12), torch.randn(640, 4)], 1)
    coded[~mask] = 100 * torch.randn(int((~mask).sum()), 16)             # wild rows a fit on all would chase
    assert box_px(coded, boxes, train, test, mask, 128) < 1e-6
    assert box_px(torch.randn(640, 16), boxes, train, test, mask, 128) > 25


def test_flops_table_rows_and_bad_input(capsys):
    ft = _script("flops_table")
    rows = ft.table("llava-7b", (*ft.LLAVA15_7B, ft.CLIP_L_TEXT), 576, 40, 16)
    assert len(rows) == 1 + len(ft.BUDGETS) and rows[0].split()[1] == "full"
    ratio = {float(r.split()[1]): float(r.split()[7]) for r in rows[1:]}
    assert ratio[0.05] < ratio[0.10] < ratio[0.25] < ratio[0.50] < 1.0
    assert ratio[0.10] < 1 / 3            # LLaVA-1.5-7B: the LM dominates, so pruning pays
    assert ft.main(["--text-tokens", "-1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("flops_table: ") and "\n" not in err


def test_lm_step_benchmark_times_each_variant_and_checks_its_arguments(capsys):
    bench = _script("bench_lm_step", "benchmarks")
    with pytest.raises(SystemExit):
        bench.main(["--pool", "4"])                    # fewer scenes than one batch
    assert "--pool must be >=" in capsys.readouterr().err
    for bad, says in ((["--scales", "-1"], "--scales"), (["--params", "/no/such.yaml"], "/no/such.yaml")):
        with pytest.raises(SystemExit):
            bench.main(bad)
        err = capsys.readouterr().err.strip().splitlines()
        assert says in err[-1] and not any("Traceback" in x for x in err)
    quick = ["--steps", "1", "--warmup", "1", "--pool", "16", "--threads", "1"]
    assert bench.main(quick + ["--scales", "1", "0"]) == 0
    assert bench.main(quick + ["--scales", "1", "--looks", "on", "--attn", "sdpa", "eager"]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if "s/step" in x]
    variants = [x.split(":")[0].split() for x in lines]
    assert [(v[3], v[5], v[7]) for v in variants] == [("1", "off", "default"), ("0", "off", "default"),
                                                      ("1", "on", "sdpa"), ("1", "on", "eager")]
    assert all(float(x.split("median ")[1].split()[0]) > 0 for x in lines)


def test_scale_benchmark_times_a_random_llava_and_checks_its_arguments(project_root, params, tiny_scenes, capsys):
    import dataclasses

    from vlmcompress.data.stage import run_data_stage

    bench = _script("bench_tokens_scale", "benchmarks")
    for bad, says in ((["--lm-layers", "0"], "must be >= 1"), (["--methods", "nope"], "unknown method")):
        with pytest.raises(SystemExit):
            bench.main(bad)
        assert says in capsys.readouterr().err
    assert bench.main(["--shape", "tiny"]) == 1                # no scenes yet: one line, no traceback
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bench_tokens_scale: ")
    run_data_stage(dataclasses.replace(params, data=dataclasses.replace(params.data, scenes=tiny_scenes)))
    out = project_root / "bench.json"
    assert bench.main(["--shape", "tiny", "--lm-layers", "1", "--repeats", "1", "--batch", "2",
                       "--methods", "random", "recoverable", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["full", "random", "recoverable"]
    assert all(r["prefill_ms"] > 0 for r in rows) and rows[0]["selection_pct"] == 0
    assert rows[2]["text_ms"] > 0 and rows[2]["selection_ms"] >= rows[2]["text_ms"]


def test_readme_equal_cost_table(tmp_path):
    _project(tmp_path)
    m = json.loads((tmp_path / "outputs/tokens/metrics.json").read_text())
    m.update(ours="recoverable", ours_val_acc=61.25, val_questions=500, cost_tolerance=0.02)
    (tmp_path / "outputs/tokens/metrics.json").write_text(json.dumps(m))
    (tmp_path / "outputs/tokens/candidates.csv").write_text(
        "method,val_acc,chosen\nrecoverable,61.25,True\nrecoverable_spread,58.0,False\n")
    (tmp_path / "outputs/tokens/equal_cost.csv").write_text(
        "ours,ours_budget,ours_tokens,ours_gflops,peer,peer_budget,peer_tokens,peer_gflops,gap_pct,matched,diff,se,z,n\n"
        "recoverable,31,31.0,0.512345,fastv,0.10,25.6,0.51,0.46,True,4.5,1.5,3.0,2500\n"
        "recoverable,1,1.0,0.41,random,0.05,12.8,0.39,5.13,False,-2.0,1.0,-2.0,2500\n"
        "recoverable,0.10,25.6,0.5,pool,0.10,25.0,0.5,0.0,True,0.0,0.0,,2500\n")
    body = readme.render(tmp_path)
    assert "Ours is `recoverable`, chosen on 500 validation questions among `recoverable` 61.2 %, " \
           "`recoverable_spread` 58.0 %" in body and "within 2 %" in body
    assert "| fastv @ 0.10 | 26 | 0.510 | 31 (31) | +0.5 % | +4.5 ± 1.5 | 3.0 |" in body
    assert "| random @ 0.05 | 13 | 0.390 | 1 (1) | +5.1 % (not matched) | -2.0 ± 1.0 | -2.0 |" in body
    assert "| pool @ 0.10 | 25 | 0.500 | 0.10 (26) | +0.0 % | +0.0 ± 0.0 | – |" in body
    (tmp_path / "outputs/tokens/equal_cost.csv").unlink()
    assert "_`outputs/tokens/equal_cost.csv` does not exist yet" in readme.render(tmp_path)


# --- every script is run by a documented command, and every documented command runs ------------

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.DOTALL | re.MULTILINE)
INLINE = re.compile(r"`([^`]+)`")
COMMAND = re.compile(r"\bpython3?\s+((?:scripts|benchmarks)/[\w-]+\.py)([^#>|;&]*)")
ENTRY = re.compile(r"docs/experiments/[\w.-]+\.md")


def code_texts(markdown: str) -> list[str]:
    """Where a markdown text can hold a command: each line of a fenced block (``\\``
    continuations joined), each inline span (its line breaks read as spaces) and each line of
    what is left (indented blocks, prose)."""
    fenced = [line for b in FENCE.findall(markdown) for line in b.replace("\\\n", " ").splitlines()]
    rest = FENCE.sub("", markdown)
    spans = [span.replace("\n", " ") for span in INLINE.findall(rest)]
    return fenced + spans + INLINE.sub(" ", rest).splitlines()


def documented_commands(docs: list[Path]) -> list[tuple[str, str, list[str]]]:
    """``(doc, script path, --flags)`` of every ``python scripts/X.py`` / ``python benchmarks/X.py``."""
    return [(doc.name, m.group(1), re.findall(r"(?<!\S)--[a-z][\w-]*", m.group(2)))
            for doc in docs for text in code_texts(doc.read_text(encoding="utf-8"))
            for m in COMMAND.finditer(text)]


def _docs() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs/experiments").glob("*.md"))]


def test_code_texts_and_commands_read_fences_spans_and_continuations(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("Run `python scripts/a.py --x 1\n--y` or\n\n```bash\npython benchmarks/b.py \\\n  --z  # --not\n"
                   ".venv/bin/python scripts/c.py > log\n```\n\n    python scripts/d.py --w 2\n")
    assert documented_commands([doc]) == [("x.md", "benchmarks/b.py", ["--z"]), ("x.md", "scripts/c.py", []),
                                          ("x.md", "scripts/a.py", ["--x", "--y"]), ("x.md", "scripts/d.py", ["--w"])]


def test_every_documented_command_names_a_file_and_its_options():
    bad = []
    for doc, script, flags in documented_commands(_docs()):
        path = REPO / script
        if not path.is_file():
            bad.append(f"{doc}: {script} does not exist")
            continue
        src = path.read_text(encoding="utf-8")
        bad += [f"{doc}: {script} has no option {f}" for f in flags
                if f'"{f}"' not in src and not (f.startswith("--no-") and f'"--{f[5:]}"' in src)]
    assert not bad, "\n".join(bad)


def test_every_script_is_run_by_a_documented_command_and_points_at_its_entry():
    commands = documented_commands(_docs())
    named = {script for _, script, _ in commands}
    in_readme = {script for doc, script, _ in commands if doc == "README.md"}
    unnamed = sorted(f"scripts/{p.name}" for p in (REPO / "scripts").glob("*.py") if f"scripts/{p.name}" not in named)
    assert not unnamed, f"no `python scripts/X.py` command in README.md or docs/experiments/ runs: {unnamed}"
    # A trial or probe (not a README tool) says in its docstring which entry holds its results,
    # and that entry runs it.
    for path in sorted((REPO / "scripts").glob("*.py")):
        script = f"scripts/{path.name}"
        if script in in_readme:
            continue
        entries = ENTRY.findall(ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or "")
        assert entries, f"{script}: its docstring names no docs/experiments/ entry"
        for entry in entries:
            assert (REPO / entry).is_file(), f"{script}: {entry} does not exist"
        assert any(doc == Path(e).name and s == script for e in entries for doc, s, _ in commands), \
            f"{script}: none of {entries} runs it with `python {script}`"


def test_lvlm_trial_reuses_only_the_leading_phases_whose_digests_match(tmp_path):
    trial = _script("lvlm_trial")
    src, work = tmp_path / "src", tmp_path / "work"
    src.mkdir()
    for phase in ("clip", "text", "align", "lm"):
        (src / f"after_{phase}.pt").write_bytes(phase.encode())
    (src / "progress.json").write_text(json.dumps({
        "digests": {"clip": "c", "text": "t", "align": "a", "lm": "l"}, "done": ["clip", "text", "align", "lm"],
        "seconds": {"clip": 1.0, "text": 2.0, "align": 3.0, "lm": 4.0}, "phase": None, "step": 0}))
    # The text phase's recipe changed: clip is reused, and nothing after the first difference.
    taken = trial.reuse_phases(src, work, {"clip": "c", "text": "T", "align": "a", "lm": "x"})
    assert taken == ["clip"] and sorted(p.name for p in work.iterdir()) == ["after_clip.pt", "progress.json"]
    prog = json.loads((work / "progress.json").read_text())
    assert prog["done"] == ["clip"] and prog["digests"] == {"clip": "c"} and prog["step"] == 0
    # A trial dir with a run of its own is never overwritten.
    (work / "progress.json").write_text("{}")
    assert trial.reuse_phases(src, work, {"clip": "c", "text": "t", "align": "a", "lm": "l"}) == []
    assert (work / "progress.json").read_text() == "{}"


def test_grounding_bound_scores_exact_centres_fully_and_far_ones_not_at_all():
    import numpy as np

    bound = _script("grounding_bound")
    boxes = [(10.0, 10.0, 13.0, 13.0), (50.0, 60.0, 30.0, 30.0)]
    classes = [("small", "circle"), ("large", "square")]
    assert bound.class_box_accuracy(boxes, classes, 0.0, 128, np.random.default_rng(0)) == 100.0
    assert bound.class_box_accuracy(boxes, classes, 200.0, 128, np.random.default_rng(0)) == 0.0
    assert bound.iou((0, 0, 2, 2), (1, 0, 3, 2)) == 1 / 3


def test_grounding_probe_reads_one_number_per_coordinate_of_a_forced_box(tmp_path):
    import dataclasses

    import numpy as np
    import torch

    from vlmcompress.config import load_params
    from vlmcompress.lvlm.train import Trainer

    probe = _script("grounding_probe")
    p = load_params(REPO / "params.yaml")
    arch = dataclasses.replace(p.lvlm.arch, vision_hidden=32, vision_layers=1, vision_heads=2, text_hidden=32,
                               text_layers=1, text_heads=2, projection_dim=16, lm_hidden=32, lm_layers=1, lm_heads=2,
                               lm_intermediate=64, stem_context=0)
    train = dataclasses.replace(p.lvlm.train, lm_where_layer=0)
    lvlm = Trainer(dataclasses.replace(p.lvlm, arch=arch, train=train), p.data.scenes, tmp_path, seed=0,
                   log=lambda m: None).lvlm()
    ids, values = probe.number_tokens(lvlm.tokenizer.get_vocab())
    assert len(ids) == 101 and values[0] == 0.0 and values[-1] == 1.0 and bool((values.diff() > 0).all())
    assert probe.box_answer((0.1, 0.25, 1.3, -0.2)) == "[0.10, 0.25, 1.00, 0.00]"
    image = torch.rand(3, arch.image_size, arch.image_size)
    got, numbers, none, no_mass = probe.forced_coordinates(lvlm, image, "the small red circle",
                                                           "[0.10, 0.25, 0.40, 0.50]", ids, values)
    assert len(got) == 4 and all(v in values.tolist() for v in got) and 0 <= numbers <= 4
    assert none is None and no_mass is None
    grid = arch.image_size // arch.patch_size
    patches = probe.box_patches((0.0, 0.0, 0.25, 0.25), grid)
    with probe.AttentionMaps(lvlm) as maps:
        again, _, _, mass = probe.forced_coordinates(lvlm, image, "the small red circle", "[0.10, 0.25, 0.40, 0.50]",
                                                     ids, values, attention=(maps, patches))
    assert again == got                                                      # eager attention: the same answer
    assert mass.shape == (3, arch.lm_layers, arch.lm_heads) and bool((mass[0] <= mass[1] + 1e-6).all())
    assert bool((mass[1] > 0).all()) and bool((mass[1] <= 1 + 1e-6).all()) and bool((mass[2] > 0).all())
    assert lvlm.language_model.config._attn_implementation == "sdpa"             # restored after the block
    with probe.LayerStates(lvlm) as layers:
        _, _, states, _ = probe.forced_coordinates(lvlm, image, "the small red circle", "[0.10, 0.25, 0.40, 0.50]",
                                                   ids, values, layers)
    assert states.shape == (arch.lm_layers, 4, arch.lm_hidden)
    assert not any(m._forward_hooks for m in lvlm.language_model.layers)      # hooks gone after the block
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 3))
    assert probe.probe_mae(x, x @ np.array([0.5, -1.0, 2.0]) + 0.3) < 0.05           # linear: recovered
    assert probe.probe_mae(x, rng.normal(size=200)) > 0.6                             # noise: not
    # A 4 x 4 grid: centres at 1/8, 3/8, 5/8, 7/8; a box over the top-left 2 x 2 cells' centres,
    # and a box between centres that still holds the cell of its own centre.
    assert probe.box_patches((0.1, 0.1, 0.4, 0.4), 4).view(4, 4).nonzero().tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    assert probe.box_patches((0.55, 0.3, 0.6, 0.35), 4).view(4, 4).nonzero().tolist() == [[1, 2]]
    maps = [torch.tensor([[[[0.5, 0.25, 0.25], [0.1, 0.6, 0.3], [0.0, 0.0, 1.0]]]])]       # [1, H=1, T=3, T=3]
    m = probe.slot_mass(maps, torch.tensor([0, 1]), torch.tensor([False, True, True]))
    assert m.shape == (1, 1) and abs(m.item() - (0.5 + 0.9) / 2) < 1e-6
    boxes = np.array([[0.1, 0.1, 0.2, 0.2], [0.5, 0.5, 0.6, 0.62], [0.0, 0.0, 0.3, 0.3]])
    assert probe.size_accuracy(boxes, np.array([True, False, True])) == {"small": (50.0, 2), "large": (100.0, 1)}
    assert probe.size_accuracy(boxes[2:], np.array([False])) == {"large": (0.0, 1)}


def test_readme_matrix_section_shows_the_cells_of_the_committed_recipe(tmp_path):
    import shutil

    sys.path.insert(0, str(REPO / "src"))
    from vlmcompress.config import load_params
    from vlmcompress.lvlm.phases import recipe_digest

    _project(tmp_path)
    assert "_No `params.yaml`" in "\n".join(readme.matrix_section(tmp_path))
    shutil.copyfile(REPO / "params.yaml", tmp_path / "params.yaml")
    p = load_params(tmp_path / "params.yaml")
    want = recipe_digest(p.lvlm, p.data.scenes)
    assert "No matrix cell of the committed recipe yet" in "\n".join(readme.matrix_section(tmp_path))

    def cell(seed, cap, vqa, recipe=want, at_once=1):
        return {"seed": seed, "capability": cap, "vqa_acc": vqa, "train_recipe": recipe, "cells_at_once": at_once,
                "vqa_acc_by_type": {t: 99.0 for t in ("color", "count", "exists", "shape", "spatial")},
                "vqa_majority_acc_by_type": {t: 50.0 for t in ("color", "count", "exists", "shape", "spatial")},
                "retrieval_i2t_r1": 70.0, "retrieval_t2i_r1": 71.0, "grounding_acc50": 80.0, "train_seconds": 3000.0}

    (tmp_path / "docs/experiments").mkdir(parents=True)
    (tmp_path / "docs/experiments/lvlm-matrix-a.json").write_text(json.dumps({"recipe": None, "cells": {
        "seed0-avx2": cell(0, "avx2", 95.0), "seed1-avx2": cell(1, "avx2", 85.0, at_once=2),
        "seed2-avx2": cell(2, "avx2", 10.0, recipe="another")}}))
    text = "\n".join(readme.matrix_section(tmp_path))
    assert "| 0 | avx2 | 95.0 |" in text and "| 1 | avx2 | 85.0 |" in text and "| 2 |" not in text
    assert "| mean |  | 90.0 |" in text and "| min |  | 85.0 |" in text
    assert "| 1 | avx2 | 85.0 | 49.0 | 70.0 | 71.0 | 80.0 | – |" in text     # its CPU shared: no time
    assert "| pipeline |" in text                        # outputs/lvlm/metrics.json beside the cells
    assert "2 cells; cells meeting each floor: vqa 1/2, margins 2/2, r1 2/2, grounding 2/2, time 0/1" in text
