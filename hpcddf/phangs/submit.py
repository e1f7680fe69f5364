"""Queue a PHANGS project's tasks: one held job array per stage, per-task dependencies, release.

``submit_phangs`` plans the project (:func:`hpcddf.phangs.plan.plan_project`) and, on a Slurm
site, submits each stage as ONE job array, held. Every task then gets ``afterok`` on exactly
the tasks it needs, mapped from task ids to their ``ARRAYID_INDEX`` job ids (``scontrol update
JobId=A_i Dependency=afterok:B_j:B_k``), the states are written, and all arrays are released.
``kill_on_invalid_dep`` makes a failed task cancel only what depends on it (the sequence is the
engine's :func:`~hpcddf.engine.backend.submit_arrays_with_dependencies`). On the local site the
same tasks run one after another as local jobs in the foreground, in stage order (a task's
dependencies are all in earlier stages); a task whose dependency failed is not run.

Tasks already done (state done, products present) are not submitted again and nobody waits for
them; on Slurm, tasks still queued or running from an earlier submission are not submitted twice
and their dependents wait for the live job.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from hpcddf.engine.backend import (
    BRIEF_STOP_GRACE_S,
    HeldArray,
    LocalCallFailed,
    LocalCallInterrupted,
    run_local_call,
    submit_arrays_with_dependencies,
)
from hpcddf.engine.paths import HIDDEN
from hpcddf.engine.plan import Resources, fit_resources
from hpcddf.engine.sites import Site
from hpcddf.engine.state import LIVE, State, now_iso
from hpcddf.errors import ConfigError, RunInterrupted, SubmissionError
from hpcddf.phangs.keys import Project, load_project
from hpcddf.phangs.plan import (
    CASA_STAGES,
    STAGES,
    StageArray,
    Task,
    dry_run_document,
    plan_project,
    project_work_dir,
)
from hpcddf.phangs.plan_chunks import array_groups
from hpcddf.phangs.run import (
    STATE_DIR,
    PhangsTask,
    products_present,
    read_task_state,
    update_task_state,
)

JOBS_DIR = Path(HIDDEN) / "phangs-jobs"
MAX_ARRAY_SIZE = 1000  # below Slurm's default MaxArraySize (1001): bigger stages are split
# (cpus, mem_gb, walltime_min) wanted per task, capped by the site; None: a whole node
STAGE_RESOURCES: dict[str, tuple[int | None, int | None, int | None]] = {
    "stage_ms": (4, 16, 240), "stage_line": (4, 32, 480), "imaging": (None, None, None),
    "postprocess": (4, 32, 240), "derived": (2, 16, 240), "release": (1, 4, 60),
}


def load_keys(keydir: str | Path) -> Project:
    """The project of a key directory (its ``master_key.txt``) or of a master key file."""
    path = Path(keydir)
    master = path / "master_key.txt" if path.is_dir() else path
    if not master.is_file():
        raise ConfigError(f"{path} is neither a master key nor a directory holding "
                          "master_key.txt", "give the PHANGS key directory")
    return load_project(master)


def stage_resources(site: Site, stage: str) -> Resources:
    cpus, mem, minutes = STAGE_RESOURCES[stage]
    return fit_resources(site, cpus, mem, minutes)


# ---------------------------------------------------------------------------------------------
# What to submit
# ---------------------------------------------------------------------------------------------

def _live_jobs(site: Site, states: dict[str, dict[str, Any]]) -> dict[str, str]:
    """task id -> job id of tasks an earlier submission left queued or running in Slurm."""
    if site.scheduler != "slurm":
        return {}
    candidates = {tid: str(st["job_id"]) for tid, st in states.items()
                  if st.get("state") in LIVE and st.get("job_id")
                  and st.get("scheduler") == "slurm"}
    if not candidates:
        return {}
    from hpcddf.engine.slurm_query import query_jobs
    info = query_jobs(candidates.values())
    return {tid: job for tid, job in candidates.items() if job in info and info[job].active}


def _triage(site: Site, plan: Sequence[StageArray], work: Path
            ) -> tuple[list[tuple[str, list[Task]]], list[str], dict[str, str]]:
    """(stage, tasks to submit) in order, tasks already done, tasks still live (-> job id)."""
    states = {t.id: read_task_state(work, t.id) or {} for a in plan for t in a.tasks}
    done = [tid for tid, st in states.items() if products_present(st)]
    live = _live_jobs(site, {k: v for k, v in states.items() if k not in done})
    todo = [(a.name, [t for t in a.tasks if t.id not in done and t.id not in live])
            for a in plan]
    return todo, done, live


def _needs_casa(todo: Iterable[tuple[str, list[Task]]]) -> bool:
    return any(stage in CASA_STAGES and not all(Path(p).exists() for p in t.outputs)
               for stage, tasks in todo for t in tasks)


# ---------------------------------------------------------------------------------------------
# Slurm
# ---------------------------------------------------------------------------------------------

def _chunks(tasks: list[Task], size: int) -> list[list[Task]]:
    return [tasks[i:i + size] for i in range(0, len(tasks), size)]


def _arrays(site: Site, todo: list[tuple[str, list[Task]]], work: Path,
            casa_env: str | None) -> list[HeldArray]:
    """One held array per stage (split at MAX_ARRAY_SIZE), in the order of ``todo``; the
    chunk tasks of a chunked cube are an array of their own (:func:`array_groups`)."""
    return [HeldArray(f"hpcddf-phangs-{stage}", stage_resources(site, stage),
                      [PhangsTask(t, str(work), casa_env, site) for t in chunk], what=f"the {stage} array")
            for stage, tasks in todo for group in array_groups(tasks)
            for chunk in _chunks(group, MAX_ARRAY_SIZE)]


def submit_slurm(site: Site, todo: list[tuple[str, list[Task]]], live: dict[str, str],
                 work: Path, casa_env: str | None) -> dict[str, str]:
    """Held arrays, per-task afterok, states written, then every array released."""
    new = [t for _, tasks in todo for t in tasks]
    ids: dict[str, str] = dict(live)  # task id -> job id, of this submission and live earlier ones

    def waits_for(job_ids: list[str]) -> list[list[str]]:
        ids.update((t.id, j) for t, j in zip(new, job_ids, strict=True))
        return [[ids[d] for d in t.depends if d in ids] for t in new]

    def record(job_ids: list[str]) -> None:
        for t in new:
            update_task_state(work, t, state=State.QUEUED, job_id=ids[t.id], scheduler="slurm",
                              submitted=now_iso(), error=None,
                              waits_for=[d for d in t.depends if d in ids], note="")

    def undo(job_ids: list[str]) -> None:
        for t in new[:len(job_ids)]:
            if read_task_state(work, t.id):
                update_task_state(work, t, state=State.CANCELLED, note="submission failed")

    job_ids = submit_arrays_with_dependencies(site, work / JOBS_DIR, _arrays(site, todo, work, casa_env),
                                              waits_for, record, undo,
                                              status_command="hpcddf phangs status")
    return {t.id: j for t, j in zip(new, job_ids, strict=True)}


# ---------------------------------------------------------------------------------------------
# Local
# ---------------------------------------------------------------------------------------------

def run_local(site: Site, todo: list[tuple[str, list[Task]]], work: Path,
              casa_env: str | None, progress: Callable[[str], None]) -> dict[str, str]:
    """Every task here, one after another, as local jobs in the foreground."""
    ids: dict[str, str] = {}
    failed: list[str] = []
    for stage, tasks in todo:
        res = stage_resources(site, stage)
        for t in tasks:
            blocked = [d for d in t.depends if d in failed]
            if blocked:
                update_task_state(work, t, state=State.CANCELLED, scheduler="local",
                                  note=f"not run: {blocked[0]} failed")
                failed.append(t.id)
                progress(f"{t.id}: not run, {blocked[0]} failed")
                continue
            update_task_state(work, t, state=State.QUEUED, scheduler="local", submitted=now_iso(),
                              error=None, note="")
            try:
                ids[t.id] = _run_task_locally(site, t, res.walltime_min, work, casa_env, progress)
            except LocalCallFailed as exc:
                failed.append(t.id)
                progress(f"{t.id}: FAILED: {exc.reason}")
                continue
            progress(f"{t.id}: done")
    if failed:
        raise SubmissionError(f"{len(failed)} PHANGS task(s) failed or were not run, first "
                              f"{failed[0]}", f"see `hpcddf phangs status {work}`")
    return ids


def _run_task_locally(site: Site, t: Task, walltime_min: int, work: Path, casa_env: str | None,
                      progress: Callable[[str], None]) -> str:
    """One task as a local job; its job id. Raises :class:`LocalCallFailed` when it failed."""
    def started(job_id: str) -> None:
        update_task_state(work, t, job_id=job_id)
        progress(f"{t.id}: running (local job {job_id})")

    def stopping(signal_name: str, job_id: str) -> None:
        progress(f"{t.id}: {signal_name}: stopping (local job {job_id})")

    try:
        return run_local_call(site, work / JOBS_DIR, PhangsTask(t, str(work), casa_env, site), walltime_min,
                              stop_grace_s=BRIEF_STOP_GRACE_S, started=started,
                              stopping=stopping).job_id
    except LocalCallInterrupted as exc:
        if (read_task_state(work, t.id) or {}).get("state") in LIVE:  # the job did not end it itself
            update_task_state(work, t, state=State.INTERRUPTED, ended=now_iso(),
                              note=f"interrupted by {exc.signal_name}")
        raise RunInterrupted(f"PHANGS task {t.id} interrupted by {exc.signal_name}; its job and "
                             "commands were stopped",
                             "rerun the same command: finished tasks are skipped") from None


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------

def _names(values: Sequence[str] | str | None) -> list[str] | None:
    """``a,b`` or ``['a', 'b,c']`` as a list; None when nothing was given."""
    if values is None:
        return None
    items = [values] if isinstance(values, str) else list(values)
    names = [n.strip() for v in items for n in v.split(",") if n.strip()]
    return names or None


# PHANGS runs CASA in its own environment (containers/make-casa-env.sh, as PHANGS keeps CASA
# and its Python apart); the science image carries DDFacet/killMS and hpcddf, not CASA
CONTAINER_WARNING = ("warning: [container] has no effect on PHANGS tasks: they run CASA from its own "
                     "environment (--casa-env / HPCDDF_CASA_ENV), outside the site's image")


def submit_phangs(site: Site, keydir: str | Path, targets: Sequence[str] | str | None = None,
                  stages: Sequence[str] | str | None = None, dry_run: bool = False,
                  casa_env: str | None = None,
                  progress: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Plan the project and queue it (or, with ``dry_run``, only show the plan).

    Returns the plan document plus ``jobs`` (task id -> job id of this submission),
    ``done`` (tasks skipped as finished) and ``already_queued`` (task id -> live job id).
    """
    if site.container.runtime != "none":
        progress(CONTAINER_WARNING)
    project = load_keys(keydir)
    plan = plan_project(project, _names(targets), _names(stages),
                        node_mem_gb=stage_resources(site, "imaging").mem_gb)
    work = project_work_dir(project)
    doc: dict[str, Any] = {"site": site.name, "scheduler": site.scheduler,
                           "master_key": str(project.master_key), "work_dir": str(work),
                           **dry_run_document(plan), "jobs": {}, "done": [],
                           "already_queued": {}}
    if dry_run:
        return doc
    todo, doc["done"], doc["already_queued"] = _triage(site, plan, work)
    if _needs_casa(todo):
        from hpcddf.phangs.casaenv import find_casa_env
        casa_env = str(find_casa_env(casa_env).python.parent.parent)
    if not any(tasks for _, tasks in todo):
        progress("nothing to submit: every task is done or already queued")
        return doc
    (work / JOBS_DIR).mkdir(parents=True, exist_ok=True)
    if site.scheduler == "slurm":
        doc["jobs"] = submit_slurm(site, todo, doc["already_queued"], work, casa_env)
    else:
        doc["jobs"] = run_local(site, todo, work, casa_env, progress)
    return doc


def submission_lines(doc: dict[str, Any]) -> list[str]:
    """The human summary of :func:`submit_phangs`'s document."""
    lines = []
    jobs = doc.get("jobs", {})
    for stage in doc["stages"]:
        mine = [jobs[t["id"]] for t in stage["tasks"] if t["id"] in jobs]
        arrays = sorted({j.split("_")[0] for j in mine})
        where = f"job {', '.join(arrays)}" if arrays else "not submitted"
        lines.append(f"{stage['name']}: {stage['array_size']} tasks, {where}")
        for t in stage["tasks"]:
            waits = ", ".join(t["depends"]) or "nothing"
            lines.append(f"  {t['id']}  <- {waits}  {jobs.get(t['id'], '')}".rstrip())
    if doc.get("done"):
        lines.append(f"already done: {len(doc['done'])} task(s)")
    for tid, job in doc.get("already_queued", {}).items():
        lines.append(f"already queued: {tid} ({job})")
    return lines


# ---------------------------------------------------------------------------------------------
# Status
# ---------------------------------------------------------------------------------------------

def _work_dir_of(path: str | Path) -> Path:
    p = Path(path)
    if (p / STATE_DIR).is_dir() and not (p / "master_key.txt").is_file():
        return p
    return project_work_dir(load_keys(p))


def _refresh_from_slurm(rows: list[dict[str, Any]]) -> None:
    """Live Slurm states of the tasks not finished (the engine's one refresher)."""
    from hpcddf.engine.status import refresh_records, unfinished
    if shutil.which("squeue") is None:
        return
    slurm_rows = [r for r in rows if r.get("scheduler") == "slurm"]
    asked = unfinished(slurm_rows)
    stale = refresh_records(asked)
    if stale:
        for r in asked:
            r["stale"] = f"{stale}: state as last recorded"


def phangs_status(path: str | Path) -> list[dict[str, Any]]:
    """Every recorded PHANGS task of a project (key dir, master key or work dir), in stage
    order, Slurm jobs refreshed from the scheduler when it answers."""
    work = _work_dir_of(path)
    root = work / STATE_DIR
    rows = []
    for f in root.rglob("*.json") if root.is_dir() else []:
        tid = f.relative_to(root).with_suffix("").as_posix()
        st = read_task_state(work, tid)
        if st:
            rows.append({**st, "task": tid})
    rows.sort(key=lambda r: (STAGES.index(r["stage"]) if r.get("stage") in STAGES else 99,
                             r["task"]))
    _refresh_from_slurm(rows)
    return rows
