#!/usr/bin/env python3
"""Where the tier1 reduction's time goes, against the demo's: the CI's two full reductions.

Runs, one after the other on this machine, the shared science reduction of the tests
(tests/_tier1.py: the simulated four-subband field reduced with tests/data/tier1-sep2024.cfg
unchanged, on the local default) and the README's demo (``hpcddf demo``, the baseline: the same
engine, the demo field's own short config). Each step's time is read from its done-marker
(``duration_s``: the step's commands, as the runner timed them), so the totals and the slowest
steps name what a faster CI would have to make faster.

    python bench/tier1_chain.py [--keep DIR] [--top 8]

About 30 minutes on 2 idle cores (tier1 ~21, demo ~7). Ends with:
RESULT tier1_s=<wall> demo_s=<wall> ratio=<tier1/demo> tier1_steps_s=<sum of steps>
       slowest=<step> slowest_s=<its time> ddf_share=<share of step time in DDF.py commands>
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HPCDDF = [sys.executable, "-m", "hpcddf"]


def step_times(workdir: Path) -> dict[str, dict]:
    """Each done step's marker: its time and its commands."""
    return {m.name.removesuffix(".done.json"): json.loads(m.read_text())
            for m in sorted((workdir / ".hpcddf" / "done").glob("*.done.json"))}


def ddf_seconds(markers: dict[str, dict]) -> float:
    """The time spent in DDF.py commands (each command's own duration, as the runner timed it)."""
    total = 0.0
    for m in markers.values():
        for argv, sec in zip(m.get("commands", []), m.get("command_durations_s", [])):
            total += sec if argv and Path(argv[0]).name == "DDF.py" else 0.0
    return total


def run(argv: list[str], home: Path) -> float:
    """One reduction on the local default; its wall time. It must succeed."""
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(home),
           "TMPDIR": str(home / "tmp")}
    (home / "tmp").mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    proc = subprocess.run([*HPCDDF, *argv], capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(f"bench: {' '.join(argv[:2])} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return time.monotonic() - t0


def tier1(home: Path) -> tuple[float, Path]:
    from tests._tier1 import prepare, submit_args
    f = prepare(home)
    print("bench: tier1 reduction ...", flush=True)
    return run(submit_args(f), home), f["workdir"]


def demo(home: Path) -> tuple[float, Path]:
    print("bench: demo reduction ...", flush=True)
    return run(["demo", "--work-root", str(home / "work"), "--field", "SIM1"], home), home / "work" / "SIM1"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", type=Path, help="reduce under this directory and keep it")
    ap.add_argument("--top", type=int, default=8, help="how many of the slowest steps to print")
    args = ap.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench-tier1-"))
    t_tier1, wd = tier1(root / "tier1")
    t_demo, _ = demo(root / "demo")
    markers = step_times(wd)
    steps = sorted(((m["duration_s"], name) for name, m in markers.items()), reverse=True)
    for sec, name in steps[:args.top]:
        print(f"  {sec:7.1f} s  {name}")
    total = sum(sec for sec, _ in steps)
    slow_s, slow = steps[0]
    print(f"RESULT tier1_s={t_tier1:.0f} demo_s={t_demo:.0f} ratio={t_tier1 / t_demo:.2f} "
          f"tier1_steps_s={total:.0f} slowest={slow} slowest_s={slow_s:.0f} "
          f"ddf_share={ddf_seconds(markers) / total:.2f}")
    if not args.keep:
        subprocess.run(["rm", "-rf", str(root)], check=False)


if __name__ == "__main__":
    main()
