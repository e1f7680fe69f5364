"""Submitting stage jobs through submitit: Slurm chains and arrays, or the local executor.

The engine hands over chains: fields whose remaining stages are the same. Each stage of a
chain is ONE submission: a plain job for one field, a job array across the fields otherwise,
chained ``afterok`` (plain) or ``aftercorr`` (arrays: task i waits only for task i of the
previous stage) with ``kill_on_invalid_dep`` so a failed stage cancels its dependents.
This is the only module that imports submitit's executors.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import submitit

from hpcddf.engine.nodejob import StageJob
from hpcddf.engine.plan import Resources, Stage
from hpcddf.engine.preflight import pid_alive
from hpcddf.engine.runner import TERM_GRACE_S
from hpcddf.engine.sites import Site
from hpcddf.errors import RunInterrupted, SubmissionError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChainMember:
    """One field of a chain: where it lives and the stage jobs to run for it."""

    field_id: str
    workdir: Path
    jobs: tuple[StageJob, ...]


def job_name(fields: Sequence[str], stage: str) -> str:
    who = fields[0] if len(fields) == 1 else f"{len(fields)}fields"
    return f"hpcddf-{who}-{stage}"


def slurm_parameters(site: Site, res: Resources, name: str, after: str | None,
                     array: bool, ntasks: int) -> dict[str, Any]:
    """submitit SlurmExecutor parameters for one stage submission."""
    extra: dict[str, Any] = {"requeue": True, **res.extra}
    if res.account:
        extra["account"] = res.account
    if res.qos:
        extra["qos"] = res.qos
    if after:
        extra["dependency"] = f"{'aftercorr' if array else 'afterok'}:{after}"
        extra["kill_on_invalid_dep"] = "yes"
    params: dict[str, Any] = {
        "job_name": name, "time": res.walltime_min, "nodes": 1, "ntasks_per_node": 1,
        "cpus_per_task": res.cpus, "mem": f"{res.mem_gb}G", "signal_delay_s": site.slurm.signal_delay_s,
        "stderr_to_stdout": True, "additional_parameters": extra,
        "array_parallelism": max(1, min(site.fields.max_running, ntasks)),
    }
    if res.exclusive:
        params["exclusive"] = True
    if res.partition:
        params["partition"] = res.partition
    return params


def submit_slurm_chain(site: Site, stages: Sequence[Stage], members: Sequence[ChainMember],
                       folder: Path) -> dict[str, dict[str, str]]:
    """Submit every stage of the chain; returns field -> stage -> Slurm job id."""
    ids: dict[str, dict[str, str]] = {m.field_id: {} for m in members}
    prev: str | None = None
    array = len(members) > 1
    for k, stage in enumerate(stages):
        ex = submitit.SlurmExecutor(folder=folder / "%j", max_num_timeout=site.slurm.max_requeues)
        ex._throttling = 0.0  # one sbatch per stage: no need for submitit's per-call pause
        ex.update_parameters(**slurm_parameters(site, stage.resources,
                                                job_name([m.field_id for m in members], stage.name),
                                                prev, array, len(members)))
        try:
            with ex.batch():
                jobs = [ex.submit(m.jobs[k]) for m in members]
        except Exception as exc:  # submitit raises plain errors with sbatch's stderr
            raise SubmissionError(f"sbatch refused stage {stage.name}: {str(exc).strip()[:400]}",
                                  "check the site's partition/account/qos with `hpcddf sites show`") from None
        for m, job in zip(members, jobs):
            ids[m.field_id][stage.name] = job.job_id
        prev = jobs[0].job_id.split("_")[0]
        log.info("stage %s: %s", stage.name, prev)
    return ids


def run_local_chain(site: Site, stages: Sequence[Stage], member: ChainMember, folder: Path,
                    progress: Callable[[str], None],
                    watch: Callable[[], list[str]] = lambda: []) -> dict[str, str]:
    """Run one field's stages one after another with submitit's local executor.

    ``watch`` is polled while a stage runs and returns progress lines (steps started/done).
    Ctrl-C, SIGTERM or SIGHUP stop the running stage job and its science commands before this
    returns (raising :class:`RunInterrupted`): a foreground run never leaves an orphan.
    """
    ids: dict[str, str] = {}
    with _foreground_signals():
        for k, stage in enumerate(stages):
            ex = submitit.LocalExecutor(folder=folder / "%j", max_num_timeout=site.slurm.max_requeues)
            ex.update_parameters(timeout_min=stage.resources.walltime_min,
                                 signal_delay_s=site.slurm.signal_delay_s)
            with _children_ignore_terminal_signals():
                job = ex.submit(member.jobs[k])
            ids[stage.name] = str(job.job_id)
            progress(f"{member.field_id}: stage {stage.name} running (local job {job.job_id}, "
                     f"{len(stage.steps)} steps)")
            try:
                _follow(job, member, watch, progress)
                _check_result(job, member.field_id, stage.name, progress)
            except _ForegroundSignal as sig:
                progress(f"{member.field_id}: {sig.name}: stopping stage {stage.name} (local job {job.job_id})")
                stop_local_job(int(job.job_id))
                raise RunInterrupted(f"field {member.field_id}: stage {stage.name} interrupted by {sig.name}; "
                                     "its job and science commands were stopped",
                                     f"rerun the same command or `hpcddf resubmit {member.field_id}` "
                                     "to resume after the last finished step") from None
    return ids


def _follow(job: Any, member: ChainMember, watch: Callable[[], list[str]],
            progress: Callable[[str], None]) -> None:
    while not job.done():
        for line in watch():
            progress(f"{member.field_id}: {line}")
        time.sleep(1.0)
    for line in watch():
        progress(f"{member.field_id}: {line}")


def _check_result(job: Any, field_id: str, stage: str, progress: Callable[[str], None]) -> None:
    try:
        job.result()
    except Exception as exc:
        progress(f"{field_id}: stage {stage} FAILED: {_first_line(exc)}")
        raise SubmissionError(f"field {field_id}: stage {stage} failed",
                              f"see `hpcddf status {field_id}` and `hpcddf logs {field_id}`") from None
    progress(f"{field_id}: stage {stage} done")


class _ForegroundSignal(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.name = signal.Signals(signum).name


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _raise_signal(signum: int, frame: Any) -> None:
    raise _ForegroundSignal(signum)


@contextlib.contextmanager
def _handling(signals: Sequence[signal.Signals], handler: Any) -> Any:
    """``handler`` for ``signals`` inside the block, the previous handlers after it."""
    old = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, previous in old.items():
            signal.signal(s, previous)


def _foreground_signals() -> Any:
    """Ctrl-C, SIGTERM and SIGHUP become one exception here, for the main thread to handle."""
    return _handling(_STOP_SIGNALS, _raise_signal)


def _children_ignore_terminal_signals() -> Any:
    """Processes started inside inherit SIG_IGN for SIGINT and SIGHUP: the terminal's Ctrl-C or
    hang-up reaches only this foreground process, which stops the job in order (submitit's local
    controller would otherwise SIGKILL the job 1 s later and orphan its science command)."""
    return _handling((signal.SIGINT, signal.SIGHUP), signal.SIG_IGN)


def stop_local_job(controller_pid: int, grace_s: float = TERM_GRACE_S + 20.0) -> None:
    """SIGTERM the local job (its controller forwards it; the job stops its command's process
    group), wait for it, then SIGKILL whatever of its process tree is left."""
    try:
        os.kill(controller_pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    end = time.time() + grace_s
    while time.time() < end and pid_alive(controller_pid):
        _reap(controller_pid)
        time.sleep(0.2)
    if pid_alive(controller_pid):
        log.warning("local job %d did not stop in %.0f s: killing its processes", controller_pid, grace_s)
        kill_tree(controller_pid)
    _reap(controller_pid)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid``, its descendants and the process groups they lead (science commands run
    in their own session, with workers in their group)."""
    tree = [pid, *_descendants(pid)]
    for p in tree:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getpgid(p) == p and p != os.getpgrp():
                os.killpg(p, signal.SIGKILL)
            os.kill(p, signal.SIGKILL)


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _first_line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error:" in ln or "StepFailed:" in ln:
            return ln.strip().split(": ", 1)[-1][:300]
    for ln in reversed(lines):
        if "Error" in ln:
            return ln.strip()[:300]
    return lines[-1][:300] if lines else type(exc).__name__
