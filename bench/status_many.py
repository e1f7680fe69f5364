#!/usr/bin/env python3
"""`hpcddf status` over 1000 recorded fields on the local Slurm: wall time and Slurm calls.

1000 field directories under one work root, each with a state as a submission records it (the
ten stages of a tier1 field, 1000 job ids each stage): 990 fields finished (nothing left to ask
Slurm about) and 10 whose stages are real jobs held in the local Slurm's queue. Slurm's
commands are counted through a PATH wrapper (each call logs its name, then runs the real
command). The baseline, in the same run: the status of one of the live fields alone, the
fixed cost every status call pays (Python start-up, the site, one Slurm query).

    python bench/status_many.py [--fields 1000]
Ends with: RESULT status_s=... slurm_calls=... one_field_s=... fields=...
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import HPCDDF, site_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hpcddf.engine.state import State, now_iso, update_state  # noqa: E402

STAGES = ["initial", "dirin", "dirin_di", "bootstrap", "phase", "ampphase", "ampphase_di",
          "fullampphase", "fulllow", "final"]
SLURM_COMMANDS = ("squeue", "sacct", "scontrol", "sbatch", "scancel", "sinfo")


def wrap_slurm(bindir: Path, calls: Path) -> None:
    """A wrapper per Slurm command on PATH: append the command's name to ``calls``, run it."""
    bindir.mkdir()
    for name in SLURM_COMMANDS:
        real = shutil.which(name)
        if real is None:
            continue
        w = bindir / name
        w.write_text(f'#!/bin/sh\necho {name} >> "{calls}"\nexec "{real}" "$@"\n')
        w.chmod(0o755)


def held_jobs(n: int) -> list[str]:
    """n real jobs, held (pending) in the local Slurm while status asks about them."""
    ids = []
    for _ in range(n):
        out = subprocess.run(["sbatch", "--hold", "--parsable", "-p", "debug", "-t", "1", "-o", "/dev/null",
                              "--wrap", "sleep 1"], capture_output=True, text=True, check=True)
        ids.append(out.stdout.strip().split(";")[0])
    return ids


ERROR = {"message": "step image_dirin_SSD failed: DDF.py (exit code 1)", "step": "image_dirin_SSD",
         "returncode": 1, "log": "logs/image_dirin_SSD.log"}


def record(work: Path, fid: str, job_ids: list[str], kind: str) -> None:
    """The field's state file as a submission and its jobs leave it: ``kind`` done (every stage
    done), live (first stage running, the rest queued) or failed (the first stage with a step
    error, the rest cancelled)."""
    def change(st: dict) -> None:
        st["site"] = "bench"
        st["plan"] = {"field": fid, "site": "bench", "stages": [
            {"name": s, "steps": [s], "resources": {"mem_gb": 1}} for s in STAGES]}
        for k, s in enumerate(STAGES):
            state = {"done": State.DONE, "live": State.RUNNING if k == 0 else State.QUEUED,
                     "failed": State.FAILED if k == 0 else State.CANCELLED}[kind]
            st["stages"][s] = {"state": state, "job_id": job_ids[k], "attempts": 1,
                               "submitted": now_iso(), "elapsed_s": 100.0, "node_hours": 0.1}
            if kind == "failed" and k == 0:
                st["stages"][s]["error"] = ERROR
    update_state(work / fid, fid, change)


def timed_status(env: dict[str, str], site: Path, *fields: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([*HPCDDF, "status", *fields, "--site-file", str(site), "--json"], env=env,
                   check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fields", type=int, default=1000)
    n = ap.parse_args().fields
    with tempfile.TemporaryDirectory(prefix="hpcddf-status-") as tmp:
        root = Path(tmp)
        site = site_file(root)
        work = root / "work"
        live_ids = held_jobs(len(STAGES))
        try:
            for i in range(n):
                fid = f"B{i:05d}"
                live = i % (n // 10 or 1) == 0
                ids = live_ids if live else [str(9_000_000 + i * len(STAGES) + k) for k in range(len(STAGES))]
                record(work, fid, ids, "live" if live else "done")
            calls = root / "calls.txt"
            wrap_slurm(root / "bin", calls)
            env = {**os.environ, "PATH": f"{root / 'bin'}:{os.environ['PATH']}"}
            one = min(timed_status(env, site, "B00000") for _ in range(3))
            calls.unlink(missing_ok=True)
            many = timed_status(env, site)
            used = calls.read_text().split() if calls.exists() else []
        finally:
            subprocess.run(["scancel", *live_ids], check=False)
    print(f"status of {n} fields: {many:.2f} s, Slurm calls: {' '.join(used) or 'none'}; one field: {one:.2f} s")
    print(f"RESULT status_s={many:.2f} slurm_calls={len(used)} one_field_s={one:.2f} fields={n}")


if __name__ == "__main__":
    main()
