"""``hpcddf survey tick``: one round of a survey, from the database and the field states.

A tick, in order:

1. **reconciles** every reducing field from its state file and ONE squeue + sacct call for the
   jobs of all of them: done, still running, or ended with a failure, which is classified and
   decided as the recovery guard decides (``engine.recovery.decide``: transient classes are
   resubmitted with their remedy up to ``[slurm] max_retries`` per stage, permanent ones fail
   the field with the reason). Node-hours are copied from the state files.
2. **fetches** new fields (at most ``[survey] fetch_per_tick``): the site's fetch command, then
   the archive tarballs unpacked; data already in place makes a field ready at once.
3. **submits** ready fields up to ``[survey] max_queued`` queued or reducing fields, all in one
   submission (fields of one plan shape share arrays); fields the cluster's limits hold back
   go back to ready for the next tick.
4. **queues mosaics** centred on done fields whose whole neighbourhood is done (failed
   neighbours are left out), and marks a field mosaicked once its mosaic is made.

Every move is compare-and-set in the database (a field moves to reducing before it is
submitted, so two ticks never submit it twice). The field state files stay the truth of a
reduction; the database follows them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from hpcddf.engine.sites import Site
from hpcddf.engine.slurm_query import JobInfo
from hpcddf.engine.state import LIVE, State, read_state, stage_order
from hpcddf.errors import HpcddfError, SurveyError
from hpcddf.survey.db import FieldRow, FieldState, TransitionError

log = logging.getLogger(__name__)
S = FieldState
Progress = Callable[[str], None]


@dataclass
class TickReport:
    """What one tick did: each move (``from->to``: field ids), and lines worth reading."""

    moves: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    mosaics_pending: int = 0  # queued or running: a later tick marks their centres mosaicked

    def moved(self, old: FieldState, new: FieldState, ids: Iterable[str]) -> None:
        ids = list(ids)
        if ids:
            self.moves.setdefault(f"{old}->{new}", []).extend(ids)

    def document(self, started: float) -> dict[str, Any]:
        return {"moves": self.moves, "notes": self.notes, "mosaics_pending": self.mosaics_pending,
                "seconds": round(time.monotonic() - started, 3)}


@dataclass(frozen=True)
class Outcome:
    """Where a reducing field stands: ``running``, ``done``, ``retry`` or ``failed`` (+ why)."""

    kind: str
    reason: str = ""


def tick(site: Site, database: str, progress: Progress = lambda m: None) -> dict[str, Any]:
    """One round over the whole survey; returns what it did."""
    from hpcddf.survey import db
    started = time.monotonic()
    report = TickReport()
    with db.opened(database) as sdb:
        with sdb.read() as conn:
            settings = db.read_settings(conn)
        check_settings(site, settings, sdb.where)
        work_root = Path(settings["work_root"])
        reconcile(site, sdb, work_root, report)
        fetch_new(site, sdb, work_root, report, progress)
        submit_ready(site, sdb, settings, report, progress)
        if site.scheduler == "local":  # the fields submitted have run by now: see how they ended
            reconcile(site, sdb, work_root, report)
        queue_mosaics(site, sdb, work_root, report, progress)
    return report.document(started)


def check_settings(site: Site, settings: Mapping[str, Any], where: str) -> None:
    if not settings:
        raise SurveyError(f"{where} holds no survey", "create it with `hpcddf survey init`")
    if settings.get("site") != site.name:
        raise SurveyError(f"the survey in {where} runs on site {settings.get('site')}, not {site.name}",
                          f"give --site {settings.get('site')}")


def _apply(sdb: Any, old: FieldState, new: FieldState, ids: Sequence[str], reason: str | None,
           report: TickReport) -> list[str]:
    """Move the fields (one statement); if another process moved one meanwhile, each alone, so
    only that one is skipped. Returns the ids moved."""
    from hpcddf.survey import db
    if not ids:
        return []
    try:
        with sdb.begin() as conn:
            db.move_many(conn, ids, old, new, reason)
        report.moved(old, new, ids)
        return list(ids)
    except TransitionError:
        done = []
        for fid in ids:
            try:
                with sdb.begin() as conn:
                    db.move_many(conn, [fid], old, new, reason)
                done.append(fid)
            except TransitionError as exc:
                report.notes.append(f"{fid}: {exc.message}")
        report.moved(old, new, done)
        return done


# ------------------------------------------------------------------ 1. reconcile

def reconcile(site: Site, sdb: Any, work_root: Path, report: TickReport) -> None:
    from hpcddf.survey import db
    with sdb.read() as conn:
        rows = db.fields(conn, [S.REDUCING])
    if not rows:
        return
    states = {r.id: read_state(work_root / r.id) for r in rows}
    jobs = _jobs_of(site, [st for st in states.values() if not _all_done(st)], report)
    outcomes = {fid: field_outcome(site, work_root / fid, fid, st, jobs) for fid, st in states.items()}
    with sdb.begin() as conn:
        db.set_node_hours(conn, {fid: node_hours(st) for fid, st in states.items() if st})
    for (kind, reason), ids in _grouped(outcomes).items():
        if kind == "done":
            _apply(sdb, S.REDUCING, S.DONE, ids, None, report)
        elif kind == "retry":
            _apply(sdb, S.REDUCING, S.READY, ids, reason, report)
        elif kind == "failed":
            _apply(sdb, S.REDUCING, S.FAILED, ids, reason, report)


def _all_done(state: Mapping[str, Any] | None) -> bool:
    """Every stage of the plan recorded done: the field is done, nothing to ask Slurm about."""
    recs = [((state or {}).get("stages") or {}).get(n, {}) for n in stage_order(state or {})]
    return bool(recs) and all(r.get("state") == State.DONE for r in recs)


def _grouped(outcomes: Mapping[str, Outcome]) -> dict[tuple[str, str], list[str]]:
    groups: dict[tuple[str, str], list[str]] = {}
    for fid, o in sorted(outcomes.items()):
        groups.setdefault((o.kind, o.reason), []).append(fid)
    return groups


def _job_ids(state: Mapping[str, Any] | None) -> list[str]:
    if not state:
        return []
    ids = [str(s["job_id"]) for s in (state.get("stages") or {}).values() if s.get("job_id")]
    return ids + ([str(state["guard"])] if state.get("guard") else [])


def _jobs_of(site: Site, states: Iterable[Mapping[str, Any] | None], report: TickReport) -> dict[str, JobInfo]:
    """Every job of every reducing field, in one squeue (+ one sacct) call."""
    from hpcddf.engine.slurm_query import query_jobs
    ids = [j for st in states for j in _job_ids(st)]
    if site.scheduler != "slurm" or not ids:
        return {}
    try:
        return query_jobs(ids)
    except HpcddfError as exc:
        report.notes.append(f"the scheduler did not answer ({exc.message}): reducing fields left as they were")
        return {"*unanswered*": JobInfo("*unanswered*", "PENDING")}


def node_hours(state: Mapping[str, Any]) -> float:
    """The field's node-hours, every attempt of every stage (as its stages record them)."""
    return sum(float(s.get("node_hours") or 0.0) for s in (state.get("stages") or {}).values())


def field_outcome(site: Site, workdir: Path, field_id: str, state: dict[str, Any] | None,
                  jobs: Mapping[str, JobInfo]) -> Outcome:
    """Where one reducing field stands; a failure is decided (and recorded) as the guard would."""
    if state is None:
        return Outcome("retry", "its submission left no state file")
    if _all_done(state):
        return Outcome("done")
    if "*unanswered*" in jobs or _live(state, jobs):
        return Outcome("running")
    recs = [state.get("stages", {}).get(n, {}) for n in stage_order(state)]
    stopped = [r.get("note", "") for r in recs if str(r.get("note", "")).startswith("stopped: ")]
    if stopped:  # the recovery guard already stopped it
        return Outcome("failed", stopped[0].removeprefix("stopped: "))
    return _decided(site, workdir, field_id, jobs)


def _live(state: Mapping[str, Any], jobs: Mapping[str, JobInfo]) -> bool:
    """A job of the field is queued or running, or recorded live and unknown to Slurm (an
    empty answer is never taken as an end)."""
    for job_id in _job_ids(state):
        info = jobs.get(job_id)
        if info is not None and info.active:
            return True
    return any(r.get("state") in LIVE and str(r.get("job_id")) not in jobs and r.get("job_id")
               for r in (state.get("stages") or {}).values())


def _decided(site: Site, workdir: Path, field_id: str, jobs: Mapping[str, JobInfo]) -> Outcome:
    from hpcddf.engine.recovery import decide_and_record
    d = decide_and_record(site, workdir, field_id, jobs)
    if d.action == "resubmit":
        return Outcome("retry", d.note)
    if d.action == "stop":
        fix = f" (fix: {d.found.fix})" if d.found is not None and d.found.fix else ""
        return Outcome("failed", d.note + fix)
    if d.stage:  # cancelled by a person: theirs to resubmit
        return Outcome("failed", d.note)
    # no stage failed and some never ran (a local run stops at the first failed field): again
    return Outcome("retry", "its stages were not run")


# ------------------------------------------------------------------ 2. fetch

def fetch_new(site: Site, sdb: Any, work_root: Path, report: TickReport, progress: Progress) -> None:
    """Data in place: ready. Archives there: unpacked. Else the site's fetch, a few per tick."""
    from hpcddf.survey import db
    with sdb.read() as conn:
        new = db.fields(conn, [S.NEW])
        stuck = db.fields(conn, [S.FETCHING])
    _release_stuck(site, sdb, stuck, report)
    budget = site.survey.fetch_per_tick
    waiting = 0
    for row in new:
        dest = work_root / row.id
        if _data_in_place(site, dest, row.id):
            _apply(sdb, S.NEW, S.READY, [row.id], None, report)
        elif budget and (site.survey.fetch or _has_archives(dest)):
            budget -= 1
            _fetch_one(site, sdb, row, dest, report, progress)
        else:
            waiting += 1
    if waiting:
        why = "fetch budget of this tick used" if site.survey.fetch else "no [survey] fetch command: put their data in place"
        report.notes.append(f"{waiting} new field(s) wait for their data ({why})")


def _data_in_place(site: Site, dest: Path, field_id: str) -> bool:
    from hpcddf.survey.fetch import has_data
    return not _has_archives(dest) and has_data(site, dest, field_id)


def _has_archives(dest: Path) -> bool:
    from hpcddf.survey.fetch import archives
    return dest.is_dir() and bool(archives(dest))


def _release_stuck(site: Site, sdb: Any, stuck: Sequence[FieldRow], report: TickReport) -> None:
    """A field fetching for much longer than a fetch may take: its tick died; fetch it again."""
    from hpcddf.survey.db import utcnow
    limit = 2 * site.survey.fetch_timeout_s
    old = [r.id for r in stuck if (utcnow() - r.state_since).total_seconds() > limit]
    _apply(sdb, S.FETCHING, S.NEW, old, "the tick fetching it ended before the fetch did", report)


def _fetch_one(site: Site, sdb: Any, row: FieldRow, dest: Path, report: TickReport, progress: Progress) -> None:
    from hpcddf.survey.fetch import FetchFailed, has_data, run_fetch, unpack
    if not _apply(sdb, S.NEW, S.FETCHING, [row.id], None, report):
        return
    try:
        dest.mkdir(parents=True, exist_ok=True)
        if site.survey.fetch and not _has_archives(dest):
            progress(f"{row.id}: fetching")
            run_fetch(site, row.id, dest)
        names = unpack(dest)
        if names:
            progress(f"{row.id}: unpacked {len(names)} measurement set(s)")
        if not has_data(site, dest, row.id):
            raise FetchFailed(f"the fetch brought no measurement set into {dest}", transient=False)
    except FetchFailed as exc:
        _fetch_failed(site, sdb, row.id, exc, report)
        return
    _apply(sdb, S.FETCHING, S.READY, [row.id], None, report)


def _fetch_failed(site: Site, sdb: Any, field_id: str, exc: Any, report: TickReport) -> None:
    from hpcddf.survey import db
    with sdb.read() as conn:
        before = sum(1 for e in db.history(conn, field_id) if e["from_state"] == S.FETCHING and e["to_state"] == S.NEW)
    if exc.transient and before < site.survey.fetch_retries:
        _apply(sdb, S.FETCHING, S.NEW, [field_id], f"{exc.reason} (retry {before + 1} of "
               f"{site.survey.fetch_retries})", report)
        return
    why = exc.reason if not exc.transient else f"{exc.reason}; failed {before + 1} times ([survey] fetch_retries)"
    _apply(sdb, S.FETCHING, S.FAILED, [field_id], why, report)


# ------------------------------------------------------------------ 3. submit

def submit_ready(site: Site, sdb: Any, settings: Mapping[str, Any], report: TickReport,
                 progress: Progress) -> None:
    from hpcddf.survey import db
    with sdb.read() as conn:
        ready = db.fields(conn, [S.READY])
        queued = db.counts(conn)[S.REDUCING]
    room = max(0, site.survey.max_queued - queued)
    if ready and not room:
        report.notes.append(f"{len(ready)} ready field(s) wait: {queued} are queued or reducing "
                            f"([survey] max_queued = {site.survey.max_queued})")
    work_root = Path(settings["work_root"])
    ids = _with_data(site, sdb, work_root, [r.id for r in ready[:room]], report)
    ids = _apply(sdb, S.READY, S.REDUCING, ids, None, report)
    if not ids:
        return
    again = [f for f in ids if read_state(work_root / f) is not None]
    fresh = [f for f in ids if f not in again]
    for group, new in ((fresh, True), (again, False)):
        if group:
            _submit_group(site, sdb, settings, group, new, report, progress)


def _with_data(site: Site, sdb: Any, work_root: Path, ids: list[str], report: TickReport) -> list[str]:
    """The fields whose MSs are still in place; the others go back to be fetched again (a
    submission would refuse them all together)."""
    from hpcddf.survey.fetch import has_data
    gone = [f for f in ids if not has_data(site, work_root / f, f)]
    _apply(sdb, S.READY, S.NEW, gone, "its measurement sets are no longer in place: fetched again", report)
    return [f for f in ids if f not in gone]


def _submit_group(site: Site, sdb: Any, settings: Mapping[str, Any], ids: list[str], new: bool,
                  report: TickReport, progress: Progress) -> None:
    from hpcddf.lofar.prepare import prepare, prepare_resubmit
    from hpcddf.lofar.submit import submit_fields
    work_root = Path(settings["work_root"])
    jobs = []
    for fid in ids:  # a field that cannot be planned fails alone
        try:
            jobs += (prepare(site, [fid], settings["configs"], (), work_root) if new
                     else prepare_resubmit(site, [fid], work_root))
        except HpcddfError as exc:
            _apply(sdb, S.REDUCING, S.FAILED, [fid], _said(exc), report)
    if not jobs:
        return
    try:
        result = submit_fields(site, jobs, settings.get("recipe"), progress, new_submission=new)
    except HpcddfError as exc:
        if site.scheduler == "local":  # the fields ran (some failed): the reconcile decides each
            report.notes.append(f"local run: {_said(exc)}")
            return
        # nothing was queued: all of them again next tick
        _apply(sdb, S.REDUCING, S.READY, [j.field.id for j in jobs], f"submission failed: {_said(exc)}", report)
        return
    _record_result(sdb, result, report)


def _record_result(sdb: Any, result: Mapping[str, Any], report: TickReport) -> None:
    by_status: dict[str, list[str]] = {}
    for fid, r in result.get("fields", {}).items():
        by_status.setdefault(r.get("status", ""), []).append(fid)
    _apply(sdb, S.REDUCING, S.READY, by_status.get("held back", []),
           "held back by the cluster's job limits", report)
    _apply(sdb, S.REDUCING, S.DONE, by_status.get("already done", []), None, report)


def _said(exc: HpcddfError) -> str:
    return exc.message + (f" (fix: {exc.hint})" if exc.hint else "")


# ------------------------------------------------------------------ 4. mosaics

def queue_mosaics(site: Site, sdb: Any, work_root: Path, report: TickReport, progress: Progress) -> None:
    """Mosaics centred on done fields whose neighbourhood is complete; made ones: mosaicked."""
    from hpcddf.survey import db
    with sdb.read() as conn:
        rows = db.fields(conn)
    done = [r for r in rows if r.state is S.DONE]
    if not done:
        return
    try:
        from hpcddf.mosaic.auto import queue_survey_mosaics
        from hpcddf.mosaic.pointings import Pointing
    except ImportError as exc:
        report.notes.append(f"mosaics not queued: {exc.name} is not installed (pip install 'hpcddf[mosaic]')")
        return
    pointings = [Pointing(r.id, r.ra, r.dec) for r in rows]
    finished = {r.id for r in rows if r.state in (S.DONE, S.MOSAICKED)}
    failed = [r.id for r in rows if r.state is S.FAILED]
    try:
        auto = queue_survey_mosaics(site, pointings, [r.id for r in done], finished, failed, work_root, progress)
    except HpcddfError as exc:
        report.notes.append(f"mosaics not queued: {_said(exc)}")
        return
    _apply(sdb, S.DONE, S.MOSAICKED, auto.made, None, report)
    report.notes += [f"mosaic {name}: queued" for name in auto.queued]
    report.mosaics_pending = len(auto.queued) + len(auto.running)
    report.notes += [f"mosaic {name}: not queued, {why}" for name, why in auto.left.items()]


# ------------------------------------------------------------------ a person's retry

def retry_failed(site: Site, database: str, ids: Sequence[str], reason: str) -> dict[str, Any]:
    """Failed fields back into the survey after a person looked (``survey retry``): to ready
    when their data is in place (the next tick resumes them from their first stage not done),
    else to new (fetched again). ``reason`` is kept in each field's history."""
    from hpcddf.survey import db
    started = time.monotonic()
    report = TickReport()
    with db.opened(database) as sdb:
        with sdb.read() as conn:
            settings = db.read_settings(conn)
            rows = {r.id: r for r in db.fields(conn)}
        check_settings(site, settings, sdb.where)
        _check_failed(ids, rows, sdb.where)
        work_root = Path(settings["work_root"])
        ready = [f for f in ids if _data_in_place(site, work_root / f, f)]
        _apply(sdb, S.FAILED, S.READY, ready, f"retried: {reason}", report)
        _apply(sdb, S.FAILED, S.NEW, [f for f in ids if f not in ready], f"retried: {reason}", report)
    return report.document(started)


def _check_failed(ids: Sequence[str], rows: Mapping[str, FieldRow], where: str) -> None:
    unknown = [f for f in ids if f not in rows]
    if unknown:
        raise SurveyError(f"field {unknown[0]} is not in the survey in {where}", "check the id (survey status)")
    not_failed = [f for f in ids if rows[f].state is not S.FAILED]
    if not_failed:
        f = not_failed[0]
        raise SurveyError(f"field {f} is {rows[f].state}, not failed: only failed fields are retried",
                          "leave it: the ticks move it on by themselves")
