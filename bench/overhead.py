#!/usr/bin/env python3
"""hpcddf's overhead on a real reduction: the simulated field reduced by hpcddf (--site local,
every stage a submitit job with preflight, scratch, markers) vs. the very same DDF.py/kMS.py
commands run bare, one after another, from a shell script.

Like with like, so that the number cannot hide a regression (or invent one):
* the same work: the bare script is written from the commands hpcddf recorded in its
  done-markers (as they ran, with the cache-reuse arguments decided at run time);
* the same inputs: one simulated field (one seed), copied afresh for every run of either side;
* the same cache layout: hpcddf's local site gives every stage job an empty DDFacet cache on
  node scratch, ${TMPDIR:-/tmp}/hpcddf-${USER:-scratch}/<field>.<job id>/cache, removed when the
  stage ends; the bare script makes and removes one per stage at that same place (one TMPDIR
  for both sides), instead of one cache kept across all stages somewhere else;
* noise and drift hit both sides alike: --runs runs per side, interleaved A B B A A B ...
  (hpcddf first, since the bare script needs its commands), and the medians are compared.

    python bench/overhead.py [--runs 3] [--exitafter STAGE] [--dde-rms-deg 20] [--keep DIR]
--exitafter STAGE (passed as --control-exitafter=STAGE; the bare side runs what that ran) makes
a short version: --exitafter dirin (two stages) takes ~1.5 min a pair of runs on 2 cores, the
whole reduction ~8 min a pair (~25 min with the default --runs 3).
Ends with: RESULT overhead=<median hpcddf_s / median bare_s - 1> hpcddf_s=... bare_s=... ...
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HPCDDF = [sys.executable, "-m", "hpcddf"]
FIELD = "SIM1"
CACHE_ARG = "--Cache-Dir="      # DDF.py's cache
KMS_CACHE_ARG = "--DDFCacheDir"  # kMS.py's (its value is the next argument)


def cache_dirs(argv: list[str]) -> set[str]:
    """The job's DDFacet cache directories a command names (DDF.py's and kMS.py's form)."""
    dirs = {a[len(CACHE_ARG):] for a in argv if a.startswith(CACHE_ARG)}
    dirs |= {argv[i + 1] for i, a in enumerate(argv[:-1]) if a == KMS_CACHE_ARG}
    return dirs


def interleaved(runs: int) -> list[str]:
    """A B, B A, A B, ...: each side goes first in every other pair (A is hpcddf)."""
    order: list[str] = []
    for k in range(runs):
        order += ["hpcddf", "bare"] if k % 2 == 0 else ["bare", "hpcddf"]
    return order


def simulate(workdir: Path, dde: float) -> Path:
    subprocess.run([*HPCDDF, "simulate", str(workdir), "--dde-rms-deg", str(dde)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return workdir


def scratch_root(env: dict[str, str]) -> Path:
    """Where the local site puts node scratch: ${TMPDIR:-/tmp}/hpcddf-${USER:-scratch}."""
    return Path(env.get("TMPDIR") or "/tmp") / f"hpcddf-{env.get('USER') or 'scratch'}"


def run_hpcddf(workdir: Path, env: dict[str, str], exitafter: str | None) -> float:
    extra = [f"--control-exitafter={exitafter}"] if exitafter else []
    t0 = time.perf_counter()
    subprocess.run([*HPCDDF, "submit", FIELD, "--site", "local", "--work-root", str(workdir.parent), *extra],
                   check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def recorded_commands(workdir: Path) -> list[tuple[str, list[str]]]:
    """(stage, argv) of every command hpcddf ran, in the order it ran them."""
    markers = [json.loads(p.read_text()) for p in (workdir / ".hpcddf" / "done").glob("*.done.json")]
    markers.sort(key=lambda m: m["started"])
    return [(m["stage"], argv) for m in markers for argv in m["commands"]]


def rewritten(argv: list[str], cache: str, old_workdir: Path, new_workdir: str) -> list[str]:
    """``argv`` with its job's cache directories and its field directory replaced."""
    for old in sorted(cache_dirs(argv), key=len, reverse=True):
        argv = [a.replace(old, cache) for a in argv]
    return [a.replace(str(old_workdir), new_workdir) for a in argv]


def normalised(commands: list[tuple[str, list[str]]], workdir: Path) -> list[list[str]]:
    """The commands with the run's own paths (cache, field directory) taken out, to compare runs."""
    return [[stage, *rewritten(argv, "<cache>", workdir, "<field>")] for stage, argv in commands]


def bare_script(commands: list[tuple[str, list[str]]], old_workdir: Path, new_workdir: Path,
                scratch: Path, tag: str) -> str:
    """The commands stage by stage, each stage with a new empty cache where hpcddf puts one."""
    lines = ["#!/bin/bash", "set -euo pipefail",
             f"export PATH={shlex.quote(str(Path(sys.executable).parent))}:$PATH",
             "export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1", "mkdir -p logs"]
    stages = list(dict.fromkeys(stage for stage, _ in commands))
    for stage in stages:
        field_dir = scratch / f"{FIELD}.{tag}-{stage}"
        cache = str(field_dir / "cache")
        lines += [f"# stage {stage}", f"mkdir -p {shlex.quote(cache)}"]
        for k, (st, argv) in enumerate(commands):
            if st != stage:
                continue
            argv = rewritten(argv, cache, old_workdir, str(new_workdir))
            lines.append(" ".join(shlex.quote(a) for a in argv) + f" < /dev/null > logs/bare-{k:03d}.log 2>&1")
        lines.append(f"rm -rf {shlex.quote(str(field_dir))}")
    return "\n".join(lines) + "\n"


def run_bare(workdir: Path, env: dict[str, str], first: Path, commands: list[tuple[str, list[str]]],
             tag: str) -> float:
    """The frozen config where hpcddf leaves it (commands read .hpcddf/pipeline.cfg), then the
    script, timed."""
    (workdir / ".hpcddf").mkdir(exist_ok=True)
    shutil.copy(first / ".hpcddf" / "pipeline.cfg", workdir / ".hpcddf" / "pipeline.cfg")
    script = workdir / "bare.sh"
    script.write_text(bare_script(commands, first, workdir, scratch_root(env), tag))
    t0 = time.perf_counter()
    subprocess.run(["bash", str(script)], cwd=workdir, check=True, env=env)
    return time.perf_counter() - t0


def stats(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="runs per side, interleaved (default 3)")
    ap.add_argument("--exitafter", metavar="STAGE", help="stop after this stage (both sides)")
    ap.add_argument("--dde-rms-deg", type=float, default=20.0)
    ap.add_argument("--keep", type=Path, help="keep the run directories here")
    a = ap.parse_args()
    if a.runs < 1:
        ap.error("--runs must be >= 1")
    base = Path(a.keep or tempfile.mkdtemp(prefix="hpcddf-overhead-")).resolve()
    env = {**os.environ, "TMPDIR": str(base / "tmp")}  # one node scratch for both sides
    (base / "tmp").mkdir(parents=True, exist_ok=True)
    pristine = simulate(base / "pristine" / FIELD, a.dde_rms_deg)

    times: dict[str, list[float]] = {"hpcddf": [], "bare": []}
    first: Path | None = None
    commands: list[tuple[str, list[str]]] = []
    same_commands = True
    order = interleaved(a.runs)
    for k, side in enumerate(order):
        wd = base / f"run{k:02d}-{side}" / FIELD
        shutil.copytree(pristine, wd, symlinks=True)
        if side == "hpcddf":
            times[side].append(run_hpcddf(wd, env, a.exitafter))
            if first is None:
                first, commands = wd, recorded_commands(wd)
            elif normalised(recorded_commands(wd), wd) != normalised(commands, first):
                same_commands = False
                print(f"run {k}: hpcddf ran other commands than its first run", flush=True)
        else:
            assert first is not None
            times[side].append(run_bare(wd, env, first, commands, f"bare{k}"))
        print(f"run {k} {side}: {times[side][-1]:.1f} s", flush=True)
        if not a.keep and wd.parent != first.parent:
            shutil.rmtree(wd.parent, ignore_errors=True)

    h, h_min, h_max = stats(times["hpcddf"])
    b, b_min, b_max = stats(times["bare"])
    print(f"commands: {len(commands)} in {len({s for s, _ in commands})} stages; order "
          f"{' '.join(s[0].upper() for s in order)}; median hpcddf {h:.1f} s, bare script {b:.1f} s; "
          f"dirs in {base}")
    if not a.keep:
        shutil.rmtree(base, ignore_errors=True)
    print(f"RESULT overhead={h / b - 1:.3f} hpcddf_s={h:.1f} bare_s={b:.1f} commands={len(commands)} "
          f"runs={a.runs} hpcddf_min={h_min:.1f} hpcddf_max={h_max:.1f} bare_min={b_min:.1f} "
          f"bare_max={b_max:.1f} overhead_min={h_min / b_max - 1:.3f} overhead_max={h_max / b_min - 1:.3f} "
          f"same_commands={int(same_commands)} exitafter={a.exitafter or 'none'} dde_rms_deg={a.dde_rms_deg:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
