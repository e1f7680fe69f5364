"""``hpcddf status``: the recorded state of fields, refreshed from the scheduler when it answers."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Sequence

from hpcddf.engine.classify import classify, unknown
from hpcddf.engine.fields import field_for
from hpcddf.engine.sites import Site
from hpcddf.engine.slurm_query import JobInfo
from hpcddf.engine.state import FINAL, State, empty_state, find_fields, read_state, stage_order
from hpcddf.errors import SubmissionError

log = logging.getLogger(__name__)


def collect_status(site: Site, field_ids: Sequence[str] = (), work_root: Path | None = None,
                   products: Callable[[Path], dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """States of the given fields (or every field under the work root), with live job states.

    ``products`` is the pipeline's summary of what a field's products say (the reduction's
    quality report), merged into its status: science writes products, never the state."""
    root = work_root if work_root is not None else site.work_root
    dirs = [field_for(site, f, root).workdir for f in field_ids] if field_ids else find_fields(root)
    states = []
    for d in dirs:
        st = read_state(d) or empty_state(d.name)
        st.setdefault("field", d.name)
        st.update(products(d) if products else {})
        states.append(st)
    if site.scheduler == "slurm":
        _add_scheduler_states(states)
    return states


def collect_unit_status(site: Site, dirs: Sequence[Path]) -> list[dict[str, Any]]:
    """States of other units of work kept like fields (a mosaic's directory), named by their
    directory, with live job states."""
    states = []
    for d in dirs:
        st = read_state(d) or empty_state(d.name)
        st["field"] = d.name
        states.append(st)
    if site.scheduler == "slurm" and states:
        _add_scheduler_states(states)
    return states


def _add_scheduler_states(states: list[dict[str, Any]]) -> None:
    """One squeue (+ sacct) call for every job of every field shown."""
    stale = refresh_records([s for st in states for s in st.get("stages", {}).values()])
    for st in states:
        _after_failure(st)
        if stale:
            st["stale"] = f"{stale}: states as last recorded"


def _after_failure(state: dict[str, Any]) -> None:
    """A stage cancelled after an earlier stage of the field failed was cancelled by Slurm for
    its dependency (kill_on_invalid_dep), whatever reason sacct kept (a job still held at
    submission says JobHeldUser): say so."""
    failed = False
    for name in stage_order(state):
        rec = state.get("stages", {}).get(name, {})
        if failed and rec.get("state") == State.CANCELLED and _class_name(rec) == "cancelled":
            rec["class"] = {**rec["class"], "reason": "its dependency failed"}
        failed = failed or rec.get("state") == State.FAILED


DEAD = ("FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE")  # Slurm ended the job on a failure


def unfinished(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records with a job whose outcome is not recorded yet: what the scheduler is asked."""
    return [r for r in records if r.get("job_id") and r.get("state") not in FINAL]


def asked(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records Slurm is asked about: those not final, and those whose command the node
    saw killed by a signal (Slurm may know better: its cgroup's out-of-memory kill). Every
    other final record's class is the node's, which Slurm cannot improve."""
    return [r for r in records if r.get("job_id") and (r.get("state") not in FINAL
                                                       or _class_name(r) == "killed_by_signal")]


def _class_name(r: dict[str, Any]) -> str | None:
    return r["class"].get("name") if isinstance(r.get("class"), dict) else None


def refresh_records(records: Sequence[dict[str, Any]]) -> str | None:
    """The one status refresher: live Slurm states of the records (stages of fields and
    mosaics, PHANGS tasks) not final yet, in one squeue (+ sacct) call. Each gets
    ``slurm_state`` and Slurm's reason as its note; a job Slurm cancelled or ended on a
    failure, which could not record it itself, is shown cancelled or failed. Every ended
    record gets its ``class`` (``classify``). Shown, not written: the node job stores the
    class of what it records itself. Returns why the scheduler did not answer (the records
    then stay as recorded), else None."""
    from hpcddf.engine.slurm_query import query_jobs
    pending = asked(records)
    try:
        info = query_jobs([str(r["job_id"]) for r in pending]) if pending else {}
    except SubmissionError as exc:
        _classify_all(records, {})
        return f"scheduler not reachable ({exc.message})"
    for r in unfinished(pending):
        job = info.get(str(r["job_id"]))
        if job is not None:
            _apply_job(r, job)
    _classify_all(records, info, answered=True)
    return None


def _apply_job(r: dict[str, Any], job: JobInfo) -> None:
    r["slurm_state"] = job.state
    if r.get("state") in (State.QUEUED, State.REQUEUED) and job.state == "CANCELLED":
        r["state"] = State.CANCELLED
    if not job.active and job.state in DEAD:
        r["state"] = State.FAILED
    if job.reason and job.reason not in ("None", "(null)"):
        r["note"] = job.reason


def _classify_all(records: Sequence[dict[str, Any]], info: dict[str, JobInfo],
                  answered: bool = False) -> None:
    """The class of each ended record, from its job's runs when Slurm answered for it. A
    record not final whose job Slurm has no word of is *unknown*, never failed."""
    for r in records:
        job = info.get(str(r.get("job_id") or ""))
        if job is None and answered and r.get("job_id") and r.get("state") not in FINAL:
            r["class"] = unknown(r).to_dict()
            continue
        found = classify(job.runs or (job,) if job is not None else (), r)
        if found is not None:
            r["class"] = found.to_dict()
        elif r.get("state") == State.DONE:
            r.pop("class", None)


def add_efficiency(states: Sequence[dict[str, Any]]) -> None:
    """``hpcddf status --efficiency``: every stage's CPU efficiency and peak memory, from one
    sacct call for every field shown."""
    from hpcddf.engine.efficiency import add_efficiency as add
    why = add([s for st in states for s in st.get("stages", {}).values()])
    if why:
        for st in states:
            st["stale"] = "; ".join(x for x in (st.get("stale"), why) if x)
