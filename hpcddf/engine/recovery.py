"""Automatic recovery without a daemon: a guard job per chain decides and resubmits.

After a chain is queued, one tiny guard job waits on it with ``afternotok`` on every stage
(``?``: any one ending not-ok wakes it) and ``kill_on_invalid_dep``, so Slurm cancels the guard
when the whole chain succeeds and nothing runs on the login node. Woken, the guard waits for
the chain to settle, classifies the failed stage (``classify``) and either resubmits the field
from its first step not done, with the remedy the class calls for, or stops it with the class's
reason and fix. Retries are bounded per stage (``[slurm] max_retries``) and a failure seen twice
the same way is permanent (``classify``), so nothing loops.

:func:`decide` is pure (unit-tested on plain records); :class:`Guard` is the pickled job. The
remedy is recorded in the field state (``recovery``) and applied by every later submission of
the field (:func:`remedied`), a manual ``hpcddf resubmit`` included.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from hpcddf.engine.classify import Classification, classify
from hpcddf.engine.plan import Resources, Stage
from hpcddf.engine.sites import Site
from hpcddf.engine.slurm_query import JobInfo, query_jobs
from hpcddf.engine.state import State, locked, now_iso, read_state, stage_order, update_state_unlocked

log = logging.getLogger(__name__)

MEMORY_CLASSES = ("out_of_memory", "killed_by_signal")
NODE_CLASSES = ("node_fail", "boot_fail")
SETTLE_TIMEOUT_S = 120.0  # the chain's dependents are cancelled by Slurm within seconds
GUARD_WALLTIME_MIN = 10

# resubmit(site, field_ids, work_root): the pipeline's resubmission (plain, picklable data)
Resubmit = Callable[[Site, Sequence[str], Path], Any]


@dataclass(frozen=True)
class Decision:
    """What to do about a field whose chain ended: ``action`` is ``resubmit``, ``stop`` or
    ``nothing``; ``stage`` and ``found`` the stage that failed and why; ``remedy`` what the
    next submission changes (``mem_gb`` per stage, ``exclude`` nodes)."""

    action: str
    stage: str | None = None
    found: Classification | None = None
    retries: int = 0
    note: str = ""
    remedy: dict[str, Any] = field(default_factory=dict)


def _failed_stage(state: Mapping[str, Any], jobs: Mapping[str, JobInfo]) -> tuple[str, Classification] | None:
    """The first stage (plan order) that ended for a reason other than its dependency failing."""
    stages = state.get("stages") or {}
    for name in [n for n in stage_order(state) if n in stages]:
        rec = stages[name]
        job = jobs.get(str(rec.get("job_id") or ""))
        found = classify(job.runs or (job,) if job is not None else (), rec)
        if found is None or (found.name == "cancelled" and "dependency" in found.reason):
            continue
        return name, found
    return None


def decide(state: dict[str, Any], jobs: Mapping[str, JobInfo], max_retries: int,
           node_mem_gb: int) -> Decision:
    """The decision for one field from its state and its jobs' sacct rows (pure)."""
    failed = _failed_stage(state, jobs)
    if failed is None:
        return Decision("nothing", note="no stage failed")
    name, found = failed
    rec = state["stages"][name]
    used = int(rec.get("retries") or 0)
    if found.name == "cancelled":
        return Decision("nothing", name, found, used, f"stage {name} was cancelled: not retried")
    if not found.transient:
        return Decision("stop", name, found, used, f"stage {name}: {found.reason}")
    if used >= max_retries:
        return Decision("stop", name, found, used, f"stage {name}: {found.reason}; already retried "
                        f"{used} time(s) ([slurm] max_retries = {max_retries})")
    remedy = _remedy(found, name, state, node_mem_gb)
    return Decision("resubmit", name, found, used + 1,
                    f"stage {name}: {found.name}, retry {used + 1} of {max_retries}", remedy)


def _remedy(found: Classification, stage: str, state: dict[str, Any], node_mem_gb: int) -> dict[str, Any]:
    """More memory (doubled, up to the node's) for a memory death; the node excluded for a node
    fault; the remedies of earlier retries kept."""
    old = dict(state.get("recovery") or {})
    mem = dict(old.get("mem_gb") or {})
    workers = dict(old.get("workers") or {})
    exclude = list(old.get("exclude") or [])
    if found.name in MEMORY_CLASSES:
        asked, whole = _asked_mem(state, stage)
        had = max(asked, int(mem.get(stage) or 0))
        if whole or had >= node_mem_gb:  # no more memory to give: fewer workers share it
            workers[stage] = float(workers.get(stage, 1.0)) / 2
        else:
            mem[stage] = min(node_mem_gb, max(asked * 2, had))
    if found.name in NODE_CLASSES:
        exclude += [n for n in found.nodes if n not in exclude]
    return {"mem_gb": mem, "workers": workers, "exclude": exclude}


def _asked_mem(state: dict[str, Any], stage: str) -> tuple[int, bool]:
    """The memory the stage's plan asks for, and whether it has the whole node."""
    for s in (state.get("plan") or {}).get("stages", []):
        if s.get("name") == stage:
            return int(s["resources"]["mem_gb"]), bool(s["resources"].get("exclusive"))
    return 1, False


def remedied(stage: Stage, remedies: Sequence[dict[str, Any]], node_mem_gb: int) -> Stage:
    """The stage with the recorded remedies of its fields (several in an array chain: the most
    memory any asks for, the fewest workers, every node any excludes)."""
    mem = max([int((r.get("mem_gb") or {}).get(stage.name) or 0) for r in remedies] or [0])
    workers = min([float((r.get("workers") or {}).get(stage.name) or 1.0) for r in remedies] or [1.0])
    exclude = sorted({n for r in remedies for n in r.get("exclude") or []})
    res = stage.resources
    if mem > res.mem_gb and not res.exclusive:
        res = replace(res, mem_gb=min(mem, node_mem_gb))
    if workers < res.workers_fraction:
        res = replace(res, workers_fraction=workers)
    if exclude:
        res = replace(res, extra={**res.extra, "exclude": ",".join(exclude)})
    return replace(stage, resources=res)


def record(state: dict[str, Any], d: Decision) -> None:
    """The decision in the field state: the stage's class and retries, the remedy for the next
    submission, and a ``recovery`` note; a stop leaves the field failed with reason and fix."""
    if d.stage is None or d.found is None:
        return
    rec = state["stages"][d.stage]
    rec["class"] = d.found.to_dict()
    rec["retries"] = d.retries
    state.setdefault("recoveries", []).append({"time": now_iso(), "stage": d.stage,
                                               "class": d.found.name, "action": d.action, "note": d.note})
    if d.action == "resubmit":
        state["recovery"] = d.remedy
    elif d.action == "stop":
        rec.update(state=State.FAILED, note=f"stopped: {d.note}", fix=d.found.fix)


def guard_resources(site: Site) -> Resources:
    """A guard asks for almost nothing: one core, a little memory, a few minutes."""
    s = site.slurm
    return Resources(cpus=1, mem_gb=1, walltime_min=GUARD_WALLTIME_MIN, exclusive=False,
                     partition=s.partition, account=s.account, qos=s.qos)


def guard_dependency(job_ids: Sequence[str]) -> str:
    """Any stage of the chain ending not-ok wakes the guard (an array: any of its tasks)."""
    return "?".join(f"afternotok:{j}" for j in dict.fromkeys(job_ids))


def _settled(workdir: Path, timeout_s: float) -> dict[str, JobInfo]:
    """The field's jobs once none is queued or running (Slurm cancels the dependents of the
    failed stage a moment after it ends)."""
    end = time.monotonic() + timeout_s
    while True:
        state = read_state(workdir) or {}
        ids = [str(s["job_id"]) for s in state.get("stages", {}).values() if s.get("job_id")]
        jobs = query_jobs(ids)
        if not any(j.active for j in jobs.values()) or time.monotonic() > end:
            return jobs
        time.sleep(3)


def recover(site: Site, workdir: Path, field_id: str, settle_s: float = SETTLE_TIMEOUT_S) -> Decision:
    """Decide for one field and record the decision; the caller resubmits."""
    return decide_and_record(site, workdir, field_id, _settled(workdir, settle_s))


def decide_and_record(site: Site, workdir: Path, field_id: str, jobs: Mapping[str, JobInfo]) -> Decision:
    """Decide for one field whose jobs have all ended (``jobs``: their Slurm records) and
    record the decision in its state: the guard and ``survey tick`` decide alike."""
    with locked(workdir):
        state = read_state(workdir) or {}
        d = decide(state, jobs, site.slurm.max_retries, site.mem_gb)
        update_state_unlocked(workdir, field_id, lambda st: record(st, d))
    if d.found is not None and d.found.name in NODE_CLASSES:  # every job of the site avoids it
        from hpcddf.engine.exclusions import remember
        remember(site, d.found.nodes)
    log.info("field %s: %s %s", field_id, d.action, d.note)
    return d


@dataclass(frozen=True)
class Guard:
    """The guard job of one chain (pickled by submitit): recovers each of its fields."""

    site: Site
    fields: tuple[tuple[str, str], ...]  # (field id, work directory)
    resubmit: Resubmit

    def __call__(self) -> dict[str, str]:
        actions = {fid: recover(self.site, Path(wd), fid) for fid, wd in self.fields}
        again = [fid for fid, d in actions.items() if d.action == "resubmit"]
        if again:
            root = Path(dict(self.fields)[again[0]]).parent
            self.resubmit(self.site, again, root)
        return {fid: f"{d.action}: {d.note}" for fid, d in actions.items()}
