#!/usr/bin/env python3
"""`hpcddf survey tick` over a 1000-field survey on the local Slurm: wall time and Slurm calls,
against per-field polling (what a monitor that asks Slurm about each field in turn costs).

A SQLite survey of 1000 pointings, every field reducing, each with a state file as a submission
records it (ten stages, a job id each): 900 finished, 90 whose stages are real jobs held in the
local Slurm's queue, 10 failed with a recorded step error. One tick reconciles them all (900
done, 10 failed, 90 still running), then plans mosaics for the done fields (none can be made:
the fields have no images). Slurm's commands are counted through a PATH wrapper. The baseline,
in the same run on the same fields: one squeue (+ sacct) per reducing field, as per-field
pollers do, timed over every field.

    python bench/survey_tick.py [--fields 1000]
Ends with: RESULT tick_s=... tick_slurm_calls=... per_field_s=... per_field_slurm_calls=... fields=...
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from _common import site_file
from status_many import STAGES, held_jobs, wrap_slurm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hpcddf.engine.sites import load_site_file  # noqa: E402
from hpcddf.engine.state import State, now_iso, read_state, update_state  # noqa: E402
from hpcddf.survey import db  # noqa: E402
from hpcddf.survey.setup import init_survey  # noqa: E402

ERROR = {"message": "step image_dirin_SSD failed: DDF.py (exit code 1)", "step": "image_dirin_SSD",
         "returncode": 1, "log": "logs/image_dirin_SSD.log"}


def kind_of(i: int) -> str:
    """900 done, 90 live, 10 failed per 1000 (in proportion for other sizes)."""
    k = i % 100
    return "failed" if k == 99 else "live" if k >= 90 else "done"


def record(work: Path, fid: str, kind: str, job_ids: list[str]) -> None:
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


def make_survey(root: Path, site: Path, n: int, live_ids: list[str]) -> str:
    """The database with every field reducing, and each field's state file."""
    rows = [f"B{i:05d},{(i % 40) * 1.2:.3f},{20 + (i // 40) * 1.2:.3f}" for i in range(n)]
    (root / "pointings.csv").write_text("id,ra,dec\n" + "\n".join(rows) + "\n")
    database = str(root / "survey.sqlite")
    s = load_site_file(site)
    init_survey(s, root / "pointings.csv", [], root / "work", database)
    ids = [f"B{i:05d}" for i in range(n)]
    sdb = db.open_db(database)
    with sdb.begin() as conn:
        db.move_many(conn, ids, db.FieldState.NEW, db.FieldState.READY, None)
        db.move_many(conn, ids, db.FieldState.READY, db.FieldState.REDUCING, None)
    sdb.close()
    for i, fid in enumerate(ids):
        kind = kind_of(i)
        jobs = live_ids if kind == "live" else [str(9_000_000 + i * len(STAGES) + k) for k in range(len(STAGES))]
        record(root / "work", fid, kind, jobs)
    return database


def per_field(site_path: Path, work: Path, ids: list[str]) -> None:
    """The baseline: each field's jobs asked about on their own."""
    from hpcddf.engine.slurm_query import query_jobs
    from hpcddf.survey.tick import _job_ids, field_outcome
    site = load_site_file(site_path)
    for fid in ids:
        state = read_state(work / fid)
        field_outcome(site, work / fid, fid, state, query_jobs(_job_ids(state)))


def counted(calls: Path) -> Counter[str]:
    """Slurm calls since the last count, by command."""
    n = Counter(calls.read_text().split()) if calls.exists() else Counter()
    calls.unlink(missing_ok=True)
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fields", type=int, default=1000)
    n = ap.parse_args().fields
    from hpcddf.survey.tick import tick
    with tempfile.TemporaryDirectory(prefix="hpcddf-tick-") as tmp:
        root = Path(tmp)
        site = site_file(root)
        live_ids = held_jobs(len(STAGES))
        try:
            database = make_survey(root, site, n, live_ids)
            calls = root / "calls.txt"
            wrap_slurm(root / "bin", calls)
            os.environ["PATH"] = f"{root / 'bin'}:{os.environ['PATH']}"
            t0 = time.perf_counter()
            doc = tick(load_site_file(site), database)
            tick_s = time.perf_counter() - t0
            tick_calls = counted(calls)
            t0 = time.perf_counter()
            per_field(site, root / "work", [f"B{i:05d}" for i in range(n)])
            base_s = time.perf_counter() - t0
            base_calls = counted(calls)
        finally:
            subprocess.run(["scancel", *live_ids], check=False)
    moves = {k: len(v) for k, v in doc["moves"].items()}
    print(f"tick over {n} fields: {tick_s:.2f} s, Slurm calls {dict(tick_calls)}, moves {moves}")
    print(f"per-field polling of the same fields: {base_s:.2f} s, Slurm calls {dict(base_calls)}")
    print(f"RESULT tick_s={tick_s:.2f} tick_slurm_calls={sum(tick_calls.values())} per_field_s={base_s:.2f} "
          f"per_field_slurm_calls={sum(base_calls.values())} fields={n}")


if __name__ == "__main__":
    main()
