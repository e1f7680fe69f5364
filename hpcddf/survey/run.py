"""``hpcddf survey run``: the tick scheduled by the cluster itself, so nobody stays logged in.

On a Slurm site the tick is a small job (one core, a little memory, minutes) that runs one
tick and, whatever the tick did, queues its successor with ``--begin=now+<tick_minutes>``: a
chain of short jobs that survives logouts, login-node reboots and a tick that failed (a
database outage costs one round, not the survey). The id of the next tick job is kept in the
survey database, so a second ``survey run`` finds the chain instead of starting another, and
``survey run --stop`` cancels it. The chain ends by itself when no field can move any more
(every field done, mosaicked or failed) and no mosaic it queued is still to be made.

Such a job runs on a compute node, which cannot open a SQLite file on the login node's local
disk: on Slurm, ``survey run`` needs the survey on MySQL/MariaDB (``[survey] database``). On
the local site it runs the ticks in the foreground, one every ``tick_minutes``, until done.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from hpcddf.engine.plan import Resources
from hpcddf.engine.sites import Site
from hpcddf.errors import SurveyError

log = logging.getLogger(__name__)
TICK_JOB_KEY = "tick_job"
TICK_WALLTIME_MIN = 60
SETTLED = ("done", "failed", "mosaicked")
KEEP_TICK_LOGS_DAYS = 7.0


@dataclass(frozen=True)
class TickJob:
    """One scheduled tick (pickled into its Slurm job): tick, then queue the next one."""

    site: Site
    database: str

    def __call__(self) -> dict[str, Any]:
        from hpcddf.survey.tick import tick
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
        doc: dict[str, Any] = {}
        try:
            doc = tick(self.site, self.database, progress=log.info)
            log.info("tick: %s", doc)
            if doc.get("mosaics_pending"):
                log.info("%d mosaic(s) queued or running: another tick will mark them", doc["mosaics_pending"])
        finally:  # a failed tick must not end the chain: the next one may well succeed
            if not settled(self.database) or doc.get("mosaics_pending"):
                log.info("next tick: job %s", schedule(self.site, self.database, self.site.survey.tick_minutes))
            else:
                log.info("every field is done, mosaicked or failed: no further tick")
                _set_tick_job(self.database, None)
        return doc


def settled(database: str) -> bool:
    """No field can move by itself any more."""
    from hpcddf.survey import db
    with db.opened(database) as sdb, sdb.read() as conn:
        counts = db.counts(conn)
    return all(n == 0 for s, n in counts.items() if str(s) not in SETTLED)


def tick_resources(site: Site) -> Resources:
    s = site.slurm
    return Resources(cpus=1, mem_gb=min(2, site.mem_gb), walltime_min=TICK_WALLTIME_MIN, exclusive=False,
                     partition=s.partition, account=s.account, qos=s.qos)


def check_reachable(site: Site, database: str) -> None:
    """A tick job on a compute node must reach the database: not a SQLite file."""
    from hpcddf.survey.storage import database_url, is_sqlite
    if site.scheduler == "slurm" and is_sqlite(database_url(database)):
        raise SurveyError("survey run queues the tick as a Slurm job, which runs on a compute node and "
                          "cannot use a SQLite file on this machine's local disk",
                          "put the survey on MySQL/MariaDB ([survey] database), or run "
                          "`hpcddf survey tick` from cron on this machine")


def schedule(site: Site, database: str, minutes: float) -> str:
    """Queue one tick job starting in ``minutes`` (0: now); its id, kept in the database."""
    from hpcddf.engine.backend import submit_call
    folder = Path(_settings(database)["work_root"]) / ".survey-jobs"
    folder.mkdir(parents=True, exist_ok=True)
    prune_old(folder)
    job_id = submit_call(site, folder, tick_resources(site), "hpcddf-survey-tick", TickJob(site, database),
                         "the survey tick", begin=f"now+{round(minutes * 60)}" if minutes else "now")  # seconds
    _set_tick_job(database, job_id)
    return job_id


def prune_old(folder: Path, days: float = KEEP_TICK_LOGS_DAYS) -> None:
    """Tick jobs' folders (logs, pickles) older than ``days``: a survey ticks thousands of times."""
    import shutil
    limit = time.time() - days * 86400
    for job_dir in folder.iterdir():
        try:
            if job_dir.is_dir() and job_dir.stat().st_mtime < limit:
                shutil.rmtree(job_dir)
        except OSError:
            continue


def _settings(database: str) -> dict[str, Any]:
    from hpcddf.survey import db
    with db.opened(database) as sdb, sdb.read() as conn:
        return db.read_settings(conn)


def _set_tick_job(database: str, job_id: str | None) -> None:
    from hpcddf.survey import db
    with db.opened(database) as sdb, sdb.begin() as conn:
        db.set_setting(conn, TICK_JOB_KEY, job_id)


def scheduled_tick(database: str) -> str | None:
    """The tick job the database names, if Slurm still has it queued or running."""
    from hpcddf.engine.slurm_query import query_jobs
    job_id = _settings(database).get(TICK_JOB_KEY)
    if not job_id:
        return None
    info = query_jobs([str(job_id)]).get(str(job_id))
    return str(job_id) if info is not None and info.active else None


def start(site: Site, database: str) -> dict[str, Any]:
    """Start the chain of tick jobs (Slurm), unless one is already queued."""
    from hpcddf.survey.tick import check_settings
    check_reachable(site, database)
    check_settings(site, _settings(database), database)
    have = scheduled_tick(database)
    if have:
        return {"tick_job": have, "started": False}
    return {"tick_job": schedule(site, database, 0), "started": True}


def stop(database: str) -> dict[str, Any]:
    """Cancel the queued tick job: the chain ends (a tick running now finishes its round)."""
    from hpcddf.engine.backend import cancel
    job_id = scheduled_tick(database)
    if job_id:
        cancel([job_id], strict=True)
    _set_tick_job(database, None)
    return {"cancelled": job_id}


def run_foreground(site: Site, database: str, progress: Callable[[str], None],
                   max_ticks: int | None = None) -> dict[str, Any]:
    """The local site: tick every ``tick_minutes`` in this process until the survey settles."""
    from hpcddf.survey.tick import tick
    n = 0
    while True:
        t0 = time.monotonic()
        doc = tick(site, database, progress)
        n += 1
        progress(f"tick {n}: " + (", ".join(f"{k} {len(v)}" for k, v in doc["moves"].items()) or "nothing moved"))
        if settled(database) or (max_ticks is not None and n >= max_ticks):
            return {"ticks": n, "settled": settled(database)}
        time.sleep(max(0.0, site.survey.tick_minutes * 60 - (time.monotonic() - t0)))
