#!/usr/bin/env python3
"""How long a stage job takes on the node before its first science command starts.

On the local Slurm: five fields of the scaled pipeline, one stage each (``exitafter=initial``),
submitted as one array. For each task: Slurm's start time of the job (sacct) to the start of
the first step's first command (its done-marker's ``started``, written as the runner starts
the command). In that time the node job unpickles, records its attempt, makes scratch, runs the
preflight and builds the steps. The baseline, in the same run: five bare ``sbatch`` jobs whose
only command is a Python printing the time, i.e. what any job pays before its first line of
Python (Slurm's prolog and process start-up, 1-s resolution of sacct's start time included).

    python bench/jobstart.py [--jobs 5]
Ends with: RESULT jobstart_s=<median> baseline_s=<median> jobs=...
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

from _common import HPCDDF, site_file, wait_for


def slurm_starts(job_ids: list[str]) -> dict[str, float]:
    """Epoch start time of each (array task) job that has started, from sacct."""
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", ",".join(job_ids), "-o", "JobID,Start"],
                         capture_output=True, text=True, check=True).stdout
    starts = {}
    for line in out.splitlines():
        jid, _, start = line.partition("|")
        if start and start not in ("Unknown", "None"):
            starts[jid] = datetime.fromisoformat(start).timestamp()
    return starts


def first_command(workdir: Path) -> float | None:
    started = [json.loads(p.read_text())["started"] for p in (workdir / ".hpcddf" / "done").glob("*.done.json")]
    return min(started) if started else None


def hpcddf_delays(root: Path, n: int) -> list[float]:
    site = site_file(root, walltime="10")
    fields = [f"B{i}" for i in range(n)]
    out = subprocess.run([*HPCDDF, "submit", *fields, "--site-file", str(site), "--pipeline", "scaled",
                          "--pipeline-opt", "seconds=0.2", "--control-exitafter=initial", "--json"],
                         capture_output=True, text=True, check=True)
    doc = json.loads(out.stdout)
    ids = {f: doc["fields"][f]["jobs"]["initial"] for f in fields}
    work = root / "work"
    wait_for(lambda: all(first_command(work / f) for f in fields), 600)
    starts = wait_for(lambda: (s := slurm_starts(list(ids.values()))) and len(s) >= n and s, 120)
    return [first_command(work / f) - starts[ids[f]] for f in fields]


def bare_delays(root: Path, n: int) -> list[float]:
    outs, ids = [], []
    for i in range(n):
        out = root / f"bare{i}.txt"
        r = subprocess.run(["sbatch", "--parsable", "-p", "debug", "-t", "1", "-o", str(out), "--wrap",
                            f"{sys.executable} -c 'import time; print(time.time())'"],
                           capture_output=True, text=True, check=True)
        ids.append(r.stdout.strip().split(";")[0])
        outs.append(out)
    wait_for(lambda: all(o.exists() and o.read_text().strip() for o in outs), 300)
    starts = wait_for(lambda: (s := slurm_starts(ids)) and len(s) >= n and s, 120)
    return [float(o.read_text().split()[0]) - starts[j] for o, j in zip(outs, ids)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=5)
    n = ap.parse_args().jobs
    with tempfile.TemporaryDirectory(prefix="hpcddf-jobstart-") as tmp:
        ours = hpcddf_delays(Path(tmp), n)
        bare = bare_delays(Path(tmp), n)
    print("stage job start -> first command (s):", " ".join(f"{d:.2f}" for d in ours))
    print("bare job start -> first Python line (s):", " ".join(f"{d:.2f}" for d in bare))
    print(f"RESULT jobstart_s={statistics.median(ours):.2f} baseline_s={statistics.median(bare):.2f} jobs={n}")


if __name__ == "__main__":
    main()
