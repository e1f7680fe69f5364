"""Submit, resubmit and cancel units of work: plans in, chained stage jobs out, state recorded.

A unit (a field's reduction) has a work directory, a plan and a pipeline that knows its
science: the pipeline's :class:`SubmitHooks` check it before anything is queued, prepare it
under its lock, and give the step builder its stage jobs run on the node. Everything else is
here and knows nothing of the science.

Everything about a unit happens under its lock, so two ``hpcddf submit`` of one field give
exactly one chain: the second sees the first's live jobs and leaves the field alone. Stages
whose steps are all done are not submitted again, which is what makes ``resubmit`` resume.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

from hpcddf.engine.backend import (
    ChainMember,
    array_id,
    cancel,
    job_name,
    run_local_chain,
    submit_guard,
    submit_slurm_chain,
)
from hpcddf.engine.fields import Field
from hpcddf.engine.nodejob import StageJob, StepBuilder
from hpcddf.engine.paths import arrays_dir, unit_paths
from hpcddf.engine.plan import Plan, Stage
from hpcddf.engine.preflight import pid_alive
from hpcddf.engine.recovery import Guard, Resubmit, guard_dependency, guard_resources, remedied
from hpcddf.engine.sites import Site
from hpcddf.engine.slurm_client import array_cap, chunks, fields_within, read_limits
from hpcddf.engine.slurm_query import query_jobs
from hpcddf.engine.state import (
    LIVE,
    State,
    locked,
    now_iso,
    read_state,
    update_state,
    update_state_unlocked,
)
from hpcddf.errors import RunInterrupted, SubmissionError

log = logging.getLogger(__name__)

AFTER_FAILURE_NOTE = "an earlier stage failed (its dependency)"  # recovery looks past "dependency"


class FieldJob(Protocol):
    """A unit ready to submit, as the engine sees it: where it lives and its plan."""

    field: Field
    plan: Plan


@dataclass(frozen=True)
class SubmitHooks:
    """What a pipeline does around the engine's submission of its units.

    ``check`` refuses, before anything is queued or written, whatever a real submission would
    refuse, and returns each unit's inputs; ``restart`` (a new submission only) applies the
    pipeline's restart policy under the unit's lock and returns a note for the user;
    ``prepare`` readies a unit that will run (inputs staged, configuration frozen);
    ``builder`` is pickled into every stage job and gives it its steps on the node;
    ``recipe`` is recorded in the unit's state (what a resubmission runs again);
    ``resubmit`` (picklable) resubmits units from a guard job (``[slurm] auto_recover``)."""

    check: Callable[[Site, Sequence[Any]], dict[str, Any]]
    restart: Callable[[Any], str | None]
    prepare: Callable[[Site, Any, Any], None]
    builder: StepBuilder
    recipe: dict[str, Any]
    resubmit: Resubmit | None = None


def stage_done(workdir: Path, stage: Stage) -> bool:
    """A stage is done when every one of its steps has a done-marker."""
    paths = unit_paths(workdir)
    return all(paths.marker(s).is_file() for s in stage.steps)


def remaining_stages(workdir: Path, plan: Plan) -> list[Stage]:
    """The plan from its first stage that is not done; the first one depends on nothing."""
    for i, stage in enumerate(plan.stages):
        if not stage_done(workdir, stage):
            rest = list(plan.stages[i:])
            return [_without_deps(rest[0])] + rest[1:]
    return []


def _without_deps(stage: Stage) -> Stage:
    return Stage(stage.name, stage.steps, stage.resources, ())


@contextlib.contextmanager
def locked_fields(workdirs: Sequence[Path]) -> Iterator[None]:
    """Lock several fields, always in the same order (no deadlock between two submits)."""
    with contextlib.ExitStack() as stack:
        for wd in sorted(set(workdirs)):
            stack.enter_context(locked(wd))
        yield


def live_jobs(site: Site, state: dict[str, Any] | None) -> list[str]:
    """Job ids of the field's last submission that the scheduler still runs or queues."""
    if not state:
        return []
    ids = [str(s["job_id"]) for s in state.get("stages", {}).values() if s.get("job_id")]
    if not ids:
        return []
    if site.scheduler == "local":  # local job ids are the job processes' pids
        return [str(s["job_id"]) for s in state["stages"].values()
                if s.get("state") in LIVE
                and str(s.get("job_id", "")).isdigit() and pid_alive(int(s["job_id"]))]
    return [j for j, info in query_jobs(ids).items() if info.active]


def _stage_jobs(site: Site, fj: FieldJob, stages: Sequence[Stage], hooks: SubmitHooks) -> ChainMember:
    jobs = tuple(StageJob(site=site, field_id=fj.field.id, workdir=str(fj.field.workdir),
                          work_root=str(fj.field.workdir.parent), stage=s.name, steps=s.steps,
                          builder=hooks.builder, walltime_min=s.resources.walltime_min,
                          last_stage=(s.name == fj.plan.stages[-1].name),
                          workers_fraction=s.resources.workers_fraction,
                          foreground_pid=os.getpid() if site.scheduler == "local" else None)
                 for s in stages)
    return ChainMember(fj.field.id, fj.field.workdir, jobs)


def _record_queued(fj: FieldJob, site: Site, stages: Sequence[Stage], ids: dict[str, str],
                   recipe: dict[str, Any]) -> None:
    def change(state: dict[str, Any]) -> None:
        state["site"] = site.name
        state["plan"] = fj.plan.to_dict()
        state["recipe"] = recipe
        state["submissions"].append({"time": now_iso(), "scheduler": site.scheduler,
                                     "stages": [s.name for s in stages], "jobs": ids})
        planned = {s.name for s in fj.plan.stages}
        for name in [n for n in state["stages"] if n not in planned]:
            del state["stages"][name]  # a stage the plan now splits (or no longer splits)
        for s in stages:
            old = state["stages"].get(s.name, {})
            state["stages"][s.name] = {"state": State.QUEUED, "job_id": ids.get(s.name),
                                       "attempts": 0, "submitted": now_iso(),
                                       "elapsed_s": old.get("elapsed_s"),
                                       "node_hours": old.get("node_hours"),
                                       # sums over every attempt survive a resubmission
                                       "attempts_total": old.get("attempts_total"),
                                       "steps_run": old.get("steps_run"),
                                       # the same failure again after a resubmission is permanent
                                       "failures": old.get("failures"),
                                       # automatic resubmissions so far (recovery.py)
                                       "retries": old.get("retries")}
    update_state_unlocked(fj.field.workdir, fj.field.id, change)


def _record_guard(fj: FieldJob, guard: str | None) -> None:
    def change(state: dict[str, Any]) -> None:
        state["guard"] = guard
    update_state_unlocked(fj.field.workdir, fj.field.id, change)


def submit_units(site: Site, jobs: Sequence[FieldJob], hooks: SubmitHooks,
                 progress: Callable[[str], None] = lambda msg: None,
                 new_submission: bool = True) -> dict[str, Any]:
    """Queue every unit's remaining stages; returns what was done for each unit.

    Only a new submission applies the pipeline's restart policy; a resubmission never does.
    """
    inputs = hooks.check(site, jobs)
    result: dict[str, Any] = {"site": site.name, "fields": {}}
    to_run: list[tuple[FieldJob, list[Stage]]] = []
    for fj in jobs:
        fj.field.workdir.mkdir(parents=True, exist_ok=True)
    with locked_fields([j.field.workdir for j in jobs]):
        for fj in jobs:
            stages = _stages_to_run(site, fj, hooks, new_submission, result, progress)
            if stages:
                to_run.append((fj, stages))
        max_array = 0
        if site.scheduler == "slurm" and to_run:
            to_run, max_array = _within_limits(site, to_run, result, progress)
        for fj, _ in to_run:
            hooks.prepare(site, fj, inputs.get(fj.field.id))
        if site.scheduler == "slurm":
            _submit_slurm(site, to_run, hooks, result, max_array)
        else:
            for fj, stages in to_run:
                _record_queued(fj, site, stages, {}, hooks.recipe)
    if site.scheduler == "local":
        _run_local(site, to_run, hooks, result, progress)
    return result


def _stages_to_run(site: Site, fj: FieldJob, hooks: SubmitHooks, new_submission: bool,
                   result: dict[str, Any], progress: Callable[[str], None]) -> list[Stage]:
    """The unit's stages still to run (none if its jobs are live or it is all done)."""
    live = live_jobs(site, read_state(fj.field.workdir))
    if live:
        result["fields"][fj.field.id] = {"status": "already queued", "jobs": {"live": ",".join(live)}}
        return []
    note = hooks.restart(fj) if new_submission else None
    if note:
        progress(f"{fj.field.id}: {note}")
    stages = remaining_stages(fj.field.workdir, fj.plan)
    if not stages:
        result["fields"][fj.field.id] = {"status": "already done", "jobs": {}}
    return stages


def _chains(to_run: Sequence[tuple[FieldJob, list[Stage]]]) -> list[list[tuple[FieldJob, list[Stage]]]]:
    groups: dict[Any, list[tuple[FieldJob, list[Stage]]]] = {}
    for fj, stages in to_run:
        groups.setdefault(tuple((s.name, s.steps) for s in stages), []).append((fj, stages))
    return list(groups.values())


def _within_limits(site: Site, to_run: list[tuple[FieldJob, list[Stage]]], result: dict[str, Any],
                   progress: Callable[[str], None]) -> tuple[list[tuple[FieldJob, list[Stage]]], int]:
    """The units the cluster lets this user queue now (each costs one job per stage; those
    beyond are held back, to be queued by a later submit) and the most tasks of one array.
    Nothing fits: a SubmissionError, before anything is queued."""
    limits = read_limits()
    guard = 1 if site.slurm.auto_recover else 0  # a guard per chain: at most one per unit
    n = fields_within([len(stages) + guard for _, stages in to_run], limits.free_jobs())
    held = [fj.field.id for fj, _ in to_run[n:]]
    for fid in held:
        result["fields"][fid] = {"status": "held back", "jobs": {}}
    if held:
        why = (f"{len(held)} of {len(to_run)} fields held back ({' '.join(held)}): the cluster lets "
               f"you queue {limits.free_jobs()} more jobs now (MaxSubmitJobs/MaxJobCount)")
        if not n:
            raise SubmissionError(f"nothing queued: {why}", "run the same `hpcddf submit` again when "
                                  "some of your jobs have ended")
        progress(f"{why}; run the same `hpcddf submit` again later to queue them")
    return to_run[:n], array_cap(limits, site.slurm.max_array_size)


def _submit_slurm(site: Site, to_run: Sequence[tuple[FieldJob, list[Stage]]],
                  hooks: SubmitHooks, result: dict[str, Any], max_array: int) -> None:
    """One chain per group of units of the same plan shape, split so that no array has more
    than ``max_array`` tasks (each piece a chain of its own: task i of each stage is field i)."""
    for chain in [part for group in _chains(to_run) for part in chunks(group, max_array or len(group))]:
        remedies = [(read_state(fj.field.workdir) or {}).get("recovery") or {} for fj, _ in chain]
        stages = [remedied(s, remedies, site.mem_gb) for s in chain[0][1]]
        members = [_stage_jobs(site, fj, [remedied(s, remedies, site.mem_gb) for s in st], hooks)
                   for fj, st in chain]
        folder = (unit_paths(chain[0][0].field.workdir).jobs if len(chain) == 1
                  else arrays_dir(chain[0][0].field.workdir.parent))
        ids = submit_slurm_chain(site, stages, members, folder)
        guard = _submit_guard(site, chain, hooks, ids, folder)
        for fj, st in chain:
            if len(chain) > 1:
                _link_array_logs(fj.field.workdir, folder, ids[fj.field.id].values())
            _record_queued(fj, site, st, ids[fj.field.id], hooks.recipe)
            _record_guard(fj, guard)
            result["fields"][fj.field.id] = {"status": "submitted", "jobs": ids[fj.field.id]}
            if guard:
                result["fields"][fj.field.id]["guard"] = guard


def _submit_guard(site: Site, chain: Sequence[tuple[FieldJob, list[Stage]]], hooks: SubmitHooks,
                  ids: dict[str, dict[str, str]], folder: Path) -> str | None:
    """The chain's recovery guard (``[slurm] auto_recover``): one job for every field of it,
    woken by any stage ending not-ok, cancelled by Slurm when every stage succeeded."""
    if not site.slurm.auto_recover or hooks.resubmit is None:
        return None
    stage_ids = [array_id(j) for fid in ids for j in ids[fid].values()]
    call = Guard(site, tuple((fj.field.id, str(fj.field.workdir)) for fj, _ in chain), hooks.resubmit)
    name = job_name([fj.field.id for fj, _ in chain], "guard")
    return submit_guard(site, folder, guard_resources(site), name, call, guard_dependency(stage_ids))


def _link_array_logs(workdir: Path, folder: Path, job_ids: Any) -> None:
    """Array tasks log under the work root's array folder; link each field's tasks into its own."""
    jobs = unit_paths(workdir).jobs
    jobs.mkdir(parents=True, exist_ok=True)
    for jid in job_ids:
        link = jobs / jid
        if not link.is_symlink() and not link.exists():
            link.symlink_to(folder / jid)


def step_watcher(workdir: Path) -> Callable[[], list[str]]:
    """Lines for steps that started or finished since the last call (from the field state)."""
    seen: dict[str, str] = {}

    def poll() -> list[str]:
        lines: list[tuple[str, int, str]] = []
        for name, info in (read_state(workdir) or {}).get("steps", {}).items():
            what = info.get("state")
            if seen.get(name) == what:
                continue
            seen[name] = what
            at = str(info.get("at", ""))
            if what == State.RUNNING:
                lines.append((at, 1, f"step {name} running"))
            elif what == State.DONE:
                lines.append((at, 0, f"step {name} done in {float(info.get('duration_s') or 0):.0f} s"))
        return [text for _, _, text in sorted(lines)]
    poll()  # steps of earlier submissions are not news
    return poll


def _run_local(site: Site, to_run: Sequence[tuple[FieldJob, list[Stage]]], hooks: SubmitHooks,
               result: dict[str, Any], progress: Callable[[str], None]) -> None:
    for fj, stages in to_run:
        member = _stage_jobs(site, fj, stages, hooks)
        try:
            ids = run_local_chain(site, stages, member, unit_paths(fj.field.workdir).jobs, progress,
                                  step_watcher(fj.field.workdir))
        except SubmissionError:
            update_state(fj.field.workdir, fj.field.id, _cancel_queued)  # as kill_on_invalid_dep does
            raise
        except RunInterrupted:
            update_state(fj.field.workdir, fj.field.id, _mark_interrupted)
            raise
        result["fields"][fj.field.id] = {"status": "done", "jobs": ids}


def _mark_interrupted(state: dict[str, Any]) -> None:
    """The stage that ran is "interrupted" (its job says so itself unless it was killed), the
    ones after it were never started."""
    for s in state.get("stages", {}).values():
        if s.get("state") in (State.RUNNING, State.REQUEUED):
            s.update(state=State.INTERRUPTED, ended=now_iso(), note=s.get("note") or "interrupted")
        elif s.get("state") == State.QUEUED:
            s.update(state=State.CANCELLED, note="the run was interrupted before this stage")


def _cancel_queued(state: dict[str, Any]) -> None:
    for s in state.get("stages", {}).values():
        if s.get("state") == State.QUEUED:
            s["state"] = State.CANCELLED
            s["note"] = AFTER_FAILURE_NOTE


def cancel_fields(site: Site, fields: Sequence[Field]) -> dict[str, list[str]]:
    """Cancel every live job of the fields; their stages are marked cancelled first, so a job
    dying of the cancellation does not record it as a failure."""
    done: dict[str, list[str]] = {}
    for f in fields:
        with locked(f.workdir):
            state = read_state(f.workdir)
            ids = live_jobs(site, state)
            if state and state.get("guard") and site.scheduler == "slurm":
                # first, or the cancelled stages would wake it; it may have ended: best-effort
                cancel([str(state["guard"])])
            if state:
                update_state_unlocked(f.workdir, f.id, _mark_cancelled)
        if site.scheduler == "slurm":
            cancel(ids, strict=True)
        else:
            for i in ids:
                os.kill(int(i), signal.SIGTERM)
        done[f.id] = ids
    return done


def _mark_cancelled(state: dict[str, Any]) -> None:
    for s in state.get("stages", {}).values():
        if s.get("state") in LIVE:
            s["state"] = State.CANCELLED
            s["ended"] = now_iso()
