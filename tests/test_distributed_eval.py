"""The evaluation stages on several processes: ``accelerate launch`` of ``vlmcompress run`` with two
CPU processes (gloo) writes the metrics one process writes, and only the main process writes.

Both runs are subprocesses with one thread each, so the two differ only in how the work is
split: the figures that do not measure time must be equal, not merely close.

Run as a script (by the tests, under ``accelerate launch``), it runs the command line with an
audit hook recording, per process, every file operation under the project's ``outputs/``.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from vlmcompress.distributed import Processes, launched_world_size, merge_shards

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent

# Keys of the stages' metrics that measure time (or the process count): everything else must match.
TIMED_TOKENS = {"eval_seconds", "eval_cpu_seconds", "prefill_speedup_0.10", "selection_overhead_pct",
                "text_encoder_pct", "selection_merge_pct", "prefill_ms_full", "processes", "batches_per_process"}
TIMED_CODEC = {"seconds_encode", "seconds_tasks", "cpu_seconds_encode", "cpu_seconds_tasks", "seconds_total",
               "processes", "image_sets_per_process"}


# --- the pieces -------------------------------------------------------------------------------

@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_shards_tile_the_items_once(world):
    for n in range(12):
        shards = [Processes(rank=r, world=world).shard(n) for r in range(world)]
        assert sorted(i for s in shards for i in s) == list(range(n))
        assert max(map(len, shards)) - min(map(len, shards)) <= 1      # balanced


def test_merge_restores_the_order_and_refuses_gaps_or_repeats():
    parts = [[(0, "a"), (2, "c")], [(1, "b"), (3, "d")]]
    assert merge_shards(parts) == ["a", "b", "c", "d"]
    assert merge_shards([[], []]) == []
    with pytest.raises(RuntimeError, match="do not tile"):
        merge_shards([[(0, "a")], [(2, "c")]])
    with pytest.raises(RuntimeError, match="do not tile"):
        merge_shards([[(0, "a"), (1, "b")], [(1, "b")]])


def test_each_process_takes_its_own_device():
    one = Processes()
    assert one.device("cuda:1") == "cuda:1" and one.device("cpu") == "cpu"
    second = Processes(rank=1, world=2, local_rank=1)
    assert second.device("cuda") == "cuda:1" and second.device("cpu") == "cpu"
    with pytest.raises(ValueError, match="names one device, but 2 processes"):
        second.device("cuda:0")


def test_only_the_main_process_logs():
    said: list[str] = []
    Processes().main_log(said.append)("main")
    Processes(rank=1, world=2, local_rank=1).main_log(said.append)("other")
    assert said == ["main"]


def test_one_process_gathers_and_broadcasts_itself():
    one = Processes()
    assert one.gather({"x": 1}) == [{"x": 1}] and one.from_main([1, 2]) == [1, 2]
    one.barrier()


@pytest.mark.parametrize("raw", ["two", "0", "-1"])
def test_a_bad_world_size_is_a_clear_error(raw, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", raw)
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        launched_world_size()


# --- the stages under accelerate launch ------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(root: Path, tmp: Path) -> dict[str, str]:
    env = {**os.environ, "VLMCOMPRESS_ROOT": str(root), "HF_HOME": str(tmp / "hf"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    env.pop("ACCELERATE_USE_CPU", None)     # implied on a machine without CUDA
    return env


def _one_process(root: Path, tmp: Path, stage: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlmcompress", "run", stage], env=_env(root, tmp),
                          capture_output=True, text=True, timeout=600)


def _two_processes(root: Path, tmp: Path, target: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()), *target]
    return subprocess.run(cmd, env=_env(root, tmp), capture_output=True, text=True, timeout=600)


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _untimed(metrics: dict, timed: set[str]) -> dict:
    return {k: v for k, v in metrics.items() if k not in timed}


def _set_aside(out: Path, to: Path) -> dict:
    """Move a stage's outputs away (the next run starts from nothing); its metrics."""
    shutil.move(str(out), str(to))
    return json.loads((to / "metrics.json").read_text())


def test_two_processes_evaluate_the_token_methods_as_one(project_root, params, tiny_scenes, tmp_path):
    from test_tokens_stage import _tiny_project

    _tiny_project(project_root, params, tiny_scenes, methods=["full", "random", "recoverable", "fastv"],
                  budgets=[0.10], eval={"example_methods": ["full", "recoverable"], "max_refs": 3})
    out = project_root / "outputs" / "tokens"
    assert "on 1 process(es)" in _ok(_one_process(project_root, tmp_path, "tokens"))
    one = _set_aside(out, tmp_path / "one")
    stdout = _ok(_two_processes(project_root, tmp_path, ["-m", "vlmcompress", "run", "tokens"]))
    assert "on 2 process(es)" in stdout
    assert stdout.count("wrote ") == 1                      # the main process alone speaks
    two = json.loads((out / "metrics.json").read_text())
    assert one["processes"] == 1 and two["processes"] == 2
    split = [int(n) for n in two["batches_per_process"].split(",")]   # the work was shared, not repeated
    assert len(split) == 2 and min(split) > 0 and sum(split) == int(one["batches_per_process"])
    assert _untimed(two, TIMED_TOKENS) == _untimed(one, TIMED_TOKENS)
    for name in ("accuracy.csv", "accuracy_by_size.csv", "equal_cost.csv", "paired.csv", "tasks.csv",
                 "grounding.csv", "candidates.csv", "examples.json"):
        assert (out / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    cost1, cost2 = (pd.read_csv(d / "cost.csv").drop(columns="latency_ms") for d in (tmp_path / "one", out))
    pd.testing.assert_frame_equal(cost1, cost2)


def _codec_world(root: Path) -> None:
    """A project with 3 test scenes, the tiny LVLM, one tiny learned codec and a JPEG anchor."""
    from codec_helpers import lively, model_params
    from lvlm_helpers import save_tiny_lvlm
    from vlmcompress.codec.model import build_codec
    from vlmcompress.codec.train import save_codec
    from vlmcompress.config import load_params
    from vlmcompress.data.generate import generate_scenes

    p = yaml.safe_load((REPO / "params.yaml").read_text())
    p["data"]["scenes"].update(n_train=2, n_val=1, n_test=3)
    p["anchors"].update(codecs=[{"name": "jpeg"}], n_points=3, n_calibration=1)
    p["bdrate"]["anchor"] = "jpeg"
    p["eval_codec"].update(n_images=3, max_questions=6, max_captions=2, max_refs=3, batch_size=2,
                           learned_rates=[], workers=0, n_examples=1, example_bpp=0.0, photos=None)
    (root / "params.yaml").write_text(yaml.safe_dump(p))
    generate_scenes(load_params(root / "params.yaml").data.scenes, root / "outputs/data/dataset", workers=1)
    save_tiny_lvlm(root / "outputs/lvlm/model")
    torch.manual_seed(0)
    save_codec(lively(build_codec(model_params(preedit=False))), root / "outputs/codec/models/ours")


def test_two_processes_evaluate_the_codecs_as_one_and_only_the_main_writes(project_root, tmp_path):
    _codec_world(project_root)
    out = project_root / "outputs" / "eval_codec"
    _ok(_one_process(project_root, tmp_path, "eval_codec"))
    one = _set_aside(out, tmp_path / "one")
    audit = tmp_path / "audit"
    stdout = _ok(_two_processes(project_root, tmp_path, [str(Path(__file__)), str(audit), "run", "eval_codec"]))
    assert "on 2 process(es)" in stdout
    ops = {r: json.loads((audit / f"rank{r}.json").read_text()) for r in (0, 1)}
    assert ops[1] == [] and any(path.endswith("metrics.json") for _, path in ops[0])
    two = json.loads((out / "metrics.json").read_text())
    split = [int(n) for n in two["image_sets_per_process"].split(",")]   # the work was shared, not repeated
    assert len(split) == 2 and min(split) > 0 and sum(split) == int(one["image_sets_per_process"])
    assert sum(split) >= 5                                  # enough sets to split: 4 points and the uncoded
    assert _untimed(two, TIMED_CODEC) == _untimed(one, TIMED_CODEC)
    for name in ("curves.csv", "bd_table.csv", "rd_images.csv"):
        assert (out / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name


if __name__ == "__main__":
    audit_dir, argv = Path(sys.argv[1]), sys.argv[2:]
    writes: list = []
    from stage_checks import record_writes

    record_writes(Path(os.environ["VLMCOMPRESS_ROOT"]) / "outputs", writes)
    from vlmcompress.cli import main

    code = main(argv)
    audit_dir.mkdir(exist_ok=True)
    (audit_dir / f"rank{os.environ['RANK']}.json").write_text(json.dumps(writes))
    raise SystemExit(code)
