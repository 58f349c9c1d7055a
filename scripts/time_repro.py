"""Time a full reproduction: ``make repro`` (or any command), then the same again with nothing changed.

    python scripts/time_repro.py                       # times `make repro`, then a no-op re-run
    python scripts/time_repro.py --cmd "dvc repro -f" --noop-cmd "make repro"   # every stage forced

Prints ``repro_minutes: <m>`` (and ``noop_seconds: <s>``) and writes them to
``outputs/repro/metrics.json``, which ``scripts/readme_results.py`` puts in the README, with a
digest of each stage's recorded params and outputs from ``dvc.lock``: the README names the
stages that were re-run with other settings or results after the timing, so an old time never
passes for the current pipeline's. A forced run (``dvc repro -f``) reuses the persisted training
checkpoints and coded files of unchanged settings; time ``make repro`` in a fresh clone for the
from-scratch figure.
The command's own output streams through unchanged; a failing command exits with its code
and writes nothing.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import yaml  # noqa: E402

from vlmcompress.io import write_json  # noqa: E402
from vlmcompress.machine import cpu_model  # noqa: E402


def timed(cmd: list[str], cwd: Path) -> tuple[int, float]:
    """Run ``cmd`` in ``cwd``; (exit code, wall seconds)."""
    t0 = time.perf_counter()
    try:
        code = subprocess.run(cmd, cwd=cwd).returncode
    except OSError as exc:
        print(f"time_repro: cannot run {shlex.join(cmd)}: {exc.strerror}", file=sys.stderr)
        return 127, time.perf_counter() - t0
    return code, time.perf_counter() - t0


def stage_digests(lock: Path) -> dict[str, str]:
    """Each stage of a ``dvc.lock``: a 12-hex digest of its params and its outputs' hashes.

    Code dependencies are left out on purpose: an edit that leaves a stage's results as they
    were (``dvc commit``) does not change the work a reproduction does; a re-run that changes
    them changes the outputs. An absent or unreadable lock gives ``{}``.
    """
    try:
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return {}
    out = {}
    for name, entry in stages.items():
        if not isinstance(entry, dict):
            continue
        outs = [[o.get("path"), o.get("md5")] for o in entry.get("outs") or [] if isinstance(o, dict)]
        key = json.dumps({"params": entry.get("params"), "outs": outs}, sort_keys=True, default=str)
        out[str(name)] = hashlib.sha256(key.encode()).hexdigest()[:12]
    return out


def changed_stages(then: dict[str, str], now: dict[str, str]) -> list[str]:
    """Stages whose digest differs between the timed run's lock and the current one (added or removed too)."""
    return sorted(n for n in set(then) | set(now) if then.get(n) != now.get(n))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cmd", default="make repro", help="command to time (default: make repro)")
    ap.add_argument("--noop", action=argparse.BooleanOptionalAction, default=True,
                    help="run the command a second time and time that no-op run too")
    ap.add_argument("--noop-cmd", default=None,
                    help="command of the second, nothing-changed run (default: --cmd; use it when --cmd forces)")
    ap.add_argument("--root", type=Path, default=ROOT, help="project root to run in")
    ap.add_argument("--out", type=Path, default=None, help="metrics file (default: <root>/outputs/repro/metrics.json)")
    args = ap.parse_args(argv)
    cmd = shlex.split(args.cmd)
    code, seconds = timed(cmd, args.root)
    if code != 0:
        print(f"time_repro: `{args.cmd}` failed with exit code {code} after {seconds / 60:.2f} min", file=sys.stderr)
        return code
    result = {"repro_minutes": round(seconds / 60, 2), "cpus": os.cpu_count() or 0, "cpu_model": cpu_model(),
              "command": args.cmd}
    print(f"repro_minutes: {result['repro_minutes']}")
    if args.noop:
        noop = shlex.split(args.noop_cmd) if args.noop_cmd else cmd
        code, again = timed(noop, args.root)
        if code != 0:
            print(f"time_repro: second `{shlex.join(noop)}` failed with exit code {code}", file=sys.stderr)
            return code
        result["noop_seconds"] = round(again, 1)
        print(f"noop_seconds: {result['noop_seconds']}")
    result["stages"] = stage_digests(args.root / "dvc.lock")
    write_json(args.out or args.root / "outputs" / "repro" / "metrics.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
