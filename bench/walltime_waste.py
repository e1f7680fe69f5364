#!/usr/bin/env python3
"""Work lost to walltime kills: a scaled stage with 3x a walltime of work, on the local Slurm.

Six stages (initial .. ampphase_di: 18 steps x 10 s = 180 s of work) run under a 1-minute
walltime per job: the work is 3x the walltime and most stages need several attempts. Work is "redone" when a step was interrupted by the kill and had to run
again: the seconds its interrupted runs had already spent (each scaled step logs a tick a
second). Total node-seconds is the sum of the elapsed time of every attempt (sacct).

    python bench/walltime_waste.py
Ends with: RESULT waste=<redone node-seconds / total node-seconds> ...
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from pathlib import Path

from _common import hpcddf, site_file, wait_for

STEP_S = 10
STEPS = 18


def attempts_node_seconds(job: str) -> tuple[float, int]:
    out = subprocess.run(["sacct", "-D", "-X", "-n", "-P", "-j", job, "-o", "JobID,State,ElapsedRaw"],
                         capture_output=True, text=True, check=True).stdout
    rows = [ln.split("|") for ln in out.splitlines() if ln.strip()]
    return float(sum(int(r[2]) for r in rows)), len(rows)


def _if_recorded(result: tuple[float, int]) -> tuple[float, int] | None:
    return result if result[1] else None


def redone_seconds(logs: Path) -> float:
    """Ticks of step runs that did not finish (a later run of the step did)."""
    lost = 0.0
    for log in logs.glob("*.log"):
        if log.name.startswith("hpcddf-"):
            continue
        for run in log.read_text().split("# hpcddf ")[1:]:
            if ": done" not in run:
                lost += run.count("tick ")
    return lost


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="hpcddf-bench-") as tmp:
        root = Path(tmp)
        site = site_file(root, walltime="1", requeues=8, signal_delay=5)
        t0 = time.time()
        doc = hpcddf("submit", "B1", "--site-file", str(site), "--pipeline", "scaled",
                     "--pipeline-opt", f"seconds={STEP_S}", "--control-exitafter=ampphase_di")
        jobs = doc["fields"]["B1"]["jobs"]
        state_file = root / "work" / "B1" / ".hpcddf" / "state.json"
        wait_for(lambda: all(s["state"] in ("done", "failed") for s in
                             json.loads(state_file.read_text())["stages"].values()), 1800)
        wall = time.time() - t0
        time.sleep(3)
        state = json.loads(state_file.read_text())
        total = 0.0
        attempts = 0
        for job in jobs.values():
            node_s, n = wait_for(lambda j=job: _if_recorded(attempts_node_seconds(j)), 60)
            total += node_s
            attempts += n
        redone = redone_seconds(root / "work" / "B1" / "logs")
        work = STEPS * STEP_S
    summary = ", ".join(f"{k}={v['state']} ({v['attempts']} attempts)" for k, v in state["stages"].items())
    print(f"stages: {summary}")
    print(f"work {work} s in a 60 s walltime; {attempts} job attempts, {total:.0f} node-seconds, "
          f"wall {wall:.0f} s; redone {redone:.0f} s")
    print(f"RESULT waste={redone / total:.4f} redone_s={redone:.0f} node_s={total:.0f} attempts={attempts}")


if __name__ == "__main__":
    main()
