#!/usr/bin/env python3
"""Submission cost of an N-field survey: `hpcddf submit` vs. a raw `sbatch` loop of the same jobs.

Both submit every stage of every field (the default plan: 8 stages) to the local Slurm, each
job held with --begin so nothing runs, then everything is cancelled. hpcddf submits one array
per stage (8 sbatch calls); the baseline is what survey scripts do today, one sbatch per job,
chained afterok per field.

    python bench/submit_survey.py [--fields 100]
Ends with: RESULT ratio=<hpcddf/sbatch> hpcddf_s=... sbatch_s=...
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

from _common import hpcddf, site_file


def raw_sbatch_loop(fields: list[str], stages: int, logdir: Path) -> tuple[float, list[str]]:
    ids = []
    t0 = time.perf_counter()
    for f in fields:
        prev = None
        for k in range(stages):
            argv = ["sbatch", "--parsable", "--begin=now+1hour", f"--job-name=raw-{f}-{k}",
                    "--cpus-per-task=1", "--mem=1G", "--time=10", f"--output={logdir}/%j.out",
                    "--wrap", "true"]
            if prev:
                argv[1:1] = [f"--dependency=afterok:{prev}", "--kill-on-invalid-dep=yes"]
            prev = subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip().split(";")[0]
            ids.append(prev)
    return time.perf_counter() - t0, ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--fields", type=int, default=100)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="hpcddf-bench-") as tmp:
        root = Path(tmp)
        site = site_file(root, extra='extra_sbatch = { begin = "now+1hour" }')
        fields = [f"B{i:04d}" for i in range(a.fields)]
        t0 = time.perf_counter()
        doc = hpcddf("submit", *fields, "--site-file", str(site), "--pipeline", "scaled")
        hpcddf_s = time.perf_counter() - t0
        jobs = {j.split("_")[0] for f in doc["fields"].values() for j in f["jobs"].values()}
        stages = len(next(iter(doc["fields"].values()))["jobs"])
        subprocess.run(["scancel", *sorted(jobs)], check=True)
        (root / "raw").mkdir()
        sbatch_s, raw_ids = raw_sbatch_loop(fields, stages, root / "raw")
        subprocess.run(["scancel", *raw_ids], check=True)
    n = a.fields * stages
    print(f"{a.fields} fields x {stages} stages = {n} jobs")
    print(f"hpcddf submit: {hpcddf_s:.2f} s ({len(jobs)} sbatch calls, one array per stage)")
    print(f"raw sbatch loop: {sbatch_s:.2f} s ({n} sbatch calls)")
    print(f"RESULT ratio={hpcddf_s / sbatch_s:.3f} hpcddf_s={hpcddf_s:.2f} sbatch_s={sbatch_s:.2f}")


if __name__ == "__main__":
    main()
