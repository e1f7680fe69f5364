#!/usr/bin/env python3
"""hpcddf's overhead on a real reduction: the simulated field reduced by hpcddf (--site local,
every stage a submitit job with preflight, scratch, markers) vs. the very same DDF.py/kMS.py
commands run bare, one after another, from a shell script.

The bare script is written from the commands hpcddf recorded in its done-markers (as they
ran, with the cache-reuse arguments decided at run time), so both runs do identical science
work. Both start from a freshly simulated field (same seed) and an empty DDFacet cache.

    python bench/overhead.py [--dde-rms-deg 20] [--keep DIR]
Ends with: RESULT overhead=<hpcddf_s / bare_s - 1> hpcddf_s=... bare_s=...
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HPCDDF = [sys.executable, "-m", "hpcddf"]
FIELD = "SIM1"


def simulate(root: Path, dde: float) -> Path:
    workdir = root / FIELD
    subprocess.run([*HPCDDF, "simulate", str(workdir), "--dde-rms-deg", str(dde)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return workdir


def run_hpcddf(root: Path, env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([*HPCDDF, "submit", FIELD, "--site", "local", "--work-root", str(root)],
                   check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def recorded_commands(workdir: Path) -> list[list[str]]:
    markers = [json.loads(p.read_text()) for p in (workdir / ".hpcddf" / "done").glob("*.done.json")]
    markers.sort(key=lambda m: m["started"])
    return [argv for m in markers for argv in m["commands"]]


def bare_script(commands: list[list[str]], caches_old: set[str], cache_new: str, bindir: str) -> str:
    lines = ["#!/bin/bash", "set -euo pipefail", f"export PATH={shlex.quote(bindir)}:$PATH",
             "export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1",
             f"mkdir -p {shlex.quote(cache_new)}", "mkdir -p logs"]
    for k, argv in enumerate(commands):
        for old in sorted(caches_old, key=len, reverse=True):  # one node-local cache per stage job
            argv = [a.replace(old, cache_new) for a in argv]
        lines.append(" ".join(shlex.quote(a) for a in argv) + f" > logs/bare-{k:03d}.log 2>&1")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dde-rms-deg", type=float, default=20.0)
    ap.add_argument("--keep", type=Path, help="keep the run directories here")
    a = ap.parse_args()
    base = Path(a.keep or tempfile.mkdtemp(prefix="hpcddf-overhead-"))
    env = {**os.environ, "TMPDIR": str(base / "tmp")}
    (base / "tmp").mkdir(parents=True, exist_ok=True)

    wd = simulate(base / "hpcddf", a.dde_rms_deg)
    hpcddf_s = run_hpcddf(base / "hpcddf", env)
    commands = recorded_commands(wd)
    caches_old = {arg.split("=", 1)[1] for argv in commands for arg in argv
                  if arg.startswith("--Cache-Dir=")}

    bare = simulate(base / "bare", a.dde_rms_deg)
    shutil.copy(wd / ".hpcddf" / "pipeline.cfg", bare / "pipeline.cfg")
    (bare / ".hpcddf").mkdir()
    shutil.copy(wd / ".hpcddf" / "pipeline.cfg", bare / ".hpcddf" / "pipeline.cfg")
    script = bare / "bare.sh"
    script.write_text(bare_script(commands, caches_old, str(base / "bare-cache"),
                                  str(Path(sys.executable).parent)))
    t0 = time.perf_counter()
    subprocess.run(["bash", str(script)], cwd=bare, check=True, env=env)
    bare_s = time.perf_counter() - t0

    print(f"commands: {len(commands)}; hpcddf {hpcddf_s:.1f} s, bare script {bare_s:.1f} s; dirs in {base}")
    if not a.keep:
        shutil.rmtree(base, ignore_errors=True)
    print(f"RESULT overhead={hpcddf_s / bare_s - 1:.3f} hpcddf_s={hpcddf_s:.1f} bare_s={bare_s:.1f} "
          f"commands={len(commands)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
