#!/usr/bin/env python3
"""`hpcddf survey tick` over a 1000-field survey on the local Slurm: wall time and Slurm calls,
against per-field polling (what a monitor that asks Slurm about each field in turn costs).

A SQLite survey of 1000 pointings with fields in every state (MIX: new without data, fetching,
ready, reducing, done, failed, mosaicked), each field that was submitted with a state file as a
submission records it (ten stages, a job id each). Of the 700 reducing fields 600 have finished,
90 have stages that are real jobs held in the local Slurm's queue and 10 failed with a recorded
step error. One tick reconciles them all, finds nothing to fetch, leaves the ready fields (the
survey is at [survey] max_queued) and plans mosaics for the done fields (none can be made: the
fields have no images). Slurm's commands are counted through a PATH wrapper. The baseline, in
the same run: one squeue (+ sacct) per reducing field, as per-field pollers do.
Goal (issue 19): <= 2 s and <= 3 Slurm commands per tick, whatever the number of fields.

    python bench/survey_tick.py [--fields 1000]
Ends with: RESULT tick_s=... slurm_calls=... fields=... per_field_s=... per_field_slurm_calls=...
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
from status_many import STAGES, held_jobs, record, wrap_slurm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hpcddf.engine.sites import load_site_file  # noqa: E402
from hpcddf.engine.state import read_state  # noqa: E402
from hpcddf.survey import db  # noqa: E402
from hpcddf.survey.setup import init_survey  # noqa: E402

# per 100 fields: (database state, what its state file records); a tick reconciles the
# reducing ones, finds the new ones without data, leaves the fetching and the ready ones (the
# survey is at [survey] max_queued) and plans mosaics for the done ones
MIX = ([("new", None)] * 10 + [("fetching", None)] * 2 + [("ready", None)] * 5
       + [("reducing", "done")] * 60 + [("reducing", "live")] * 9 + [("reducing", "failed")]
       + [("done", "done")] * 8 + [("failed", "failed")] * 3 + [("mosaicked", "done")] * 2)
PATHS = {"fetching": ["new", "fetching"], "ready": ["new", "ready"],
         "reducing": ["new", "ready", "reducing"], "done": ["new", "ready", "reducing", "done"],
         "failed": ["new", "ready", "reducing", "failed"],
         "mosaicked": ["new", "ready", "reducing", "done", "mosaicked"]}


def _move_along(database: str, kinds: dict[str, tuple[str, str | None]]) -> None:
    """Each field moved through the states a survey would have taken it to its own."""
    sdb = db.open_db(database)
    for target, path in PATHS.items():
        ids = [f for f, (state, _) in kinds.items() if state == target]
        for old, new in zip(path, path[1:]):
            with sdb.begin() as conn:
                db.move_many(conn, ids, db.FieldState(old), db.FieldState(new), "bench")
    sdb.close()


def make_survey(root: Path, site: Path, n: int, live_ids: list[str]) -> tuple[str, list[str]]:
    """The database with fields in every state, the state files; the reducing fields."""
    rows = [f"B{i:05d},{(i % 40) * 1.2:.3f},{20 + (i // 40) * 1.2:.3f}" for i in range(n)]
    (root / "pointings.csv").write_text("id,ra,dec\n" + "\n".join(rows) + "\n")
    database = str(root / "survey.sqlite")
    init_survey(load_site_file(site), root / "pointings.csv", [], root / "work", database)
    kinds = {f"B{i:05d}": MIX[i % len(MIX)] for i in range(n)}
    _move_along(database, kinds)
    for i, (fid, (_, recorded)) in enumerate(kinds.items()):
        if recorded:
            jobs = live_ids if recorded == "live" else [str(9_000_000 + i * len(STAGES) + k)
                                                        for k in range(len(STAGES))]
            record(root / "work", fid, jobs, recorded)
    return database, [f for f, (state, _) in kinds.items() if state == "reducing"]


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
        site.write_text(site.read_text() + "[survey]\nmax_queued = 50\n")
        live_ids = held_jobs(len(STAGES))
        try:
            database, reducing = make_survey(root, site, n, live_ids)
            calls = root / "calls.txt"
            wrap_slurm(root / "bin", calls)
            os.environ["PATH"] = f"{root / 'bin'}:{os.environ['PATH']}"
            t0 = time.perf_counter()
            doc = tick(load_site_file(site), database)
            tick_s = time.perf_counter() - t0
            tick_calls = counted(calls)
            t0 = time.perf_counter()
            per_field(site, root / "work", reducing)
            base_s = time.perf_counter() - t0
            base_calls = counted(calls)
        finally:
            subprocess.run(["scancel", *live_ids], check=False)
    moves = {k: len(v) for k, v in doc["moves"].items()}
    print(f"tick over {n} fields: {tick_s:.2f} s, Slurm calls {dict(tick_calls)}, moves {moves}")
    print("notes:", *doc["notes"][:3], sep="\n  ")
    print(f"per-field polling of its {len(reducing)} reducing fields: {base_s:.2f} s, Slurm calls {dict(base_calls)}")
    print(f"RESULT tick_s={tick_s:.2f} slurm_calls={sum(tick_calls.values())} fields={n} "
          f"per_field_s={base_s:.2f} per_field_slurm_calls={sum(base_calls.values())}")


if __name__ == "__main__":
    main()
