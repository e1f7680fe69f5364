"""The one place that runs jobs: submitit's executors and Slurm's sbatch, scontrol and scancel.

Stage chains (the engine's own fields): each stage of a chain is ONE submission, a plain job
for one field, a job array across the fields otherwise, chained ``afterok`` (plain) or
``aftercorr`` (arrays: task i waits only for task i of the previous stage) with
``kill_on_invalid_dep`` so a failed stage cancels its dependents.

Held arrays (any pipeline's tasks, e.g. mosaics, PHANGS): each array is submitted held, every
task then gets ``afterok`` on exactly the jobs it needs (``scontrol update``), the caller records
its states and every array is released; on any error everything submitted is cancelled. Held
first, so no task can start before its dependencies are set.

Local calls: one call as a submitit local job, run in the foreground; Ctrl-C, SIGTERM and
SIGHUP stop the job and its processes before the caller hears of it, so nothing is orphaned.

Every Slurm command here goes through ``slurm_client``: timeouts, retries with backoff on a
busy controller's transient answers, and an sbatch that is never made twice (submitit runs
``slurm_client``'s sbatch command instead of sbatch itself, through the hook its executors
provide for it). Arrays larger than the cluster (or the site) allows are split into several.
``slurm_query`` only asks Slurm about jobs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import submitit
import submitit.slurm.slurm as submitit_slurm

from hpcddf.engine import slurm_client
from hpcddf.engine.plan import Resources, Stage
from hpcddf.engine.preflight import pid_alive
from hpcddf.engine.runner import TERM_GRACE_S
from hpcddf.engine.sites import Site
from hpcddf.errors import RunInterrupted, SubmissionError

if TYPE_CHECKING:  # the node job's modules are not needed to submit it (pipelines import this)
    from hpcddf.engine.nodejob import StageJob

log = logging.getLogger(__name__)

SCONTROL_TIMEOUT_S = 60.0
SBATCH_TIMEOUT_S = slurm_client.SBATCH_TIMEOUT_S
SBATCH_RETRY = slurm_client.DEFAULT_RETRY
# cancel runs while another error is on its way: one retry, soon
CANCEL_RETRY = slurm_client.Retry(attempts=2, first_delay_s=1.0)
TIMED_OUT = (slurm_client.TIMED_OUT, 137)  # the command timed out / had to be killed
CANCEL_TIMEOUT_S = 30.0
STOP_GRACE_S = TERM_GRACE_S + 20.0  # a stage job stops its science command within TERM_GRACE_S
# for calls that do not act on SIGTERM (in a submitit job it is only logged): no use waiting long
BRIEF_STOP_GRACE_S = 5.0


def _nothing(*args: Any) -> None:
    return None


# ------------------------------------------------------------------------------ stage chains

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
    avoid = _excluded_nodes(site, res)
    if avoid:
        extra["exclude"] = avoid
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


def _excluded_nodes(site: Site, res: Resources) -> str:
    """The stage's own ``--exclude`` (a recovery remedy) and the nodes the site avoids now."""
    from hpcddf.engine.exclusions import excluded
    own = [n for n in str(res.extra.get("exclude") or "").split(",") if n]
    return ",".join(sorted(set(own) | set(excluded(site))))


def submit_slurm_chain(site: Site, stages: Sequence[Stage], members: Sequence[ChainMember],
                       folder: Path) -> dict[str, dict[str, str]]:
    """Submit every stage of the chain; returns field -> stage -> Slurm job id."""
    ids: dict[str, dict[str, str]] = {m.field_id: {} for m in members}
    prev: str | None = None
    array = len(members) > 1
    for k, stage in enumerate(stages):
        params = slurm_parameters(site, stage.resources, job_name([m.field_id for m in members], stage.name),
                                  prev, array, len(members))
        job_ids = _sbatch(site, folder, params, [m.jobs[k] for m in members], f"stage {stage.name}")
        for m, job_id in zip(members, job_ids):
            ids[m.field_id][stage.name] = job_id
        prev = array_id(job_ids[0])
        log.info("stage %s: %s", stage.name, prev)
    return ids


def submit_guard(site: Site, folder: Path, resources: Resources, name: str, call: Callable[[], Any],
                 dependency: str) -> str:
    """One small job that starts only if ``dependency`` (``afternotok`` on a chain's stages) is
    met; ``kill_on_invalid_dep`` has Slurm cancel it when the chain succeeds. Never requeued."""
    return submit_call(site, folder, resources, name, call, "the recovery guard",
                       dependency=dependency, kill_on_invalid_dep="yes")


def submit_call(site: Site, folder: Path, resources: Resources, name: str, call: Callable[[], Any],
                what: str, **sbatch: str) -> str:
    """One small job running ``call``, never requeued (it is short, and whatever it does is
    decided again by its next run); ``sbatch``: further options, e.g. ``begin="now+15minutes"``
    for a job that starts later without anything waiting for it on the login node."""
    params = slurm_parameters(site, resources, name, None, False, 1)
    params["additional_parameters"].update(sbatch)
    params["additional_parameters"].pop("requeue", None)
    return _sbatch(site, folder, params, [call], what)[0]


def run_local_chain(site: Site, stages: Sequence[Stage], member: ChainMember, folder: Path,
                    progress: Callable[[str], None],
                    watch: Callable[[], list[str]] = lambda: []) -> dict[str, str]:
    """Run one field's stages one after another with submitit's local executor.

    ``watch`` is polled while a stage runs and returns progress lines (steps started/done).
    Ctrl-C, SIGTERM or SIGHUP stop the running stage job and its science commands before this
    returns (raising :class:`RunInterrupted`): a foreground run never leaves an orphan.
    """
    ids: dict[str, str] = {}
    for k, stage in enumerate(stages):
        ids[stage.name] = _run_local_stage(site, stage, member, member.jobs[k], folder, progress, watch)
    return ids


def _run_local_stage(site: Site, stage: Stage, member: ChainMember, job: StageJob, folder: Path,
                     progress: Callable[[str], None], watch: Callable[[], list[str]]) -> str:
    """One stage of a local chain; its local job id."""
    fid = member.field_id

    def started(job_id: str) -> None:
        progress(f"{fid}: stage {stage.name} running (local job {job_id}, {len(stage.steps)} steps)")

    def poll() -> None:
        for line in watch():
            progress(f"{fid}: {line}")

    def stopping(signal_name: str, job_id: str) -> None:
        progress(f"{fid}: {signal_name}: stopping stage {stage.name} (local job {job_id})")

    try:
        done = run_local_call(site, folder, job, stage.resources.walltime_min,
                              signal_delay_s=site.slurm.signal_delay_s, started=started, poll=poll,
                              stopping=stopping)
    except LocalCallFailed as exc:
        progress(f"{fid}: stage {stage.name} FAILED: {exc.reason}")
        raise SubmissionError(f"field {fid}: stage {stage.name} failed",
                              f"see `hpcddf status {fid}` and `hpcddf logs {fid}`") from None
    except LocalCallInterrupted as exc:
        raise RunInterrupted(f"field {fid}: stage {stage.name} interrupted by {exc.signal_name}; "
                             "its job and science commands were stopped",
                             f"rerun the same command or `hpcddf resubmit {fid}` "
                             "to resume after the last finished step") from None
    progress(f"{fid}: stage {stage.name} done")
    return done.job_id


# ------------------------------------------------------------------------------ held arrays

@dataclass(frozen=True)
class HeldArray:
    """One submission of :func:`submit_arrays_with_dependencies`: ``calls`` as one job array
    (a plain job for one call) named ``name``, each call asking for ``resources``."""

    name: str
    resources: Resources
    calls: Sequence[Callable[[], Any]]
    what: str = ""                  # what sbatch refused, for its error ("the mosaic array")
    max_running: int | None = None  # array throttle (%N); None: the site's fields.max_running


def array_id(job_id: str) -> str:
    """The array of an array task's id (``123_4`` -> ``123``); a plain job's own id."""
    return job_id.split("_")[0]


def submit_held_array(site: Site, folder: Path, resources: Resources, name: str,
                      calls: Sequence[Callable[[], Any]], max_running: int | None = None,
                      what: str | None = None, max_array: int | None = None) -> list[str]:
    """ONE held submission of ``calls`` (an array, a plain job for one call); their job ids.
    More calls than ``max_array`` are submitted as several arrays of at most that many tasks.

    Held, with ``kill_on_invalid_dep``: nothing starts before :func:`release`, and a task whose
    dependency fails is cancelled rather than left pending forever.
    """
    params = slurm_parameters(site, resources, name, None, True, len(calls))
    params["additional_parameters"].update(hold=True, kill_on_invalid_dep="yes")
    params["array_parallelism"] = max(1, min(max_running or site.fields.max_running, len(calls)))
    ids: list[str] = []
    for part in slurm_client.chunks(calls, max_array or len(calls)):
        ids += _sbatch(site, folder, params, part, what or name)
    return ids


def add_afterok(job_id: str, wait_ids: Sequence[str], status_command: str = "hpcddf status") -> None:
    """Job (or array task) ``job_id`` starts only after every job of ``wait_ids`` succeeded."""
    _scontrol(["update", f"JobId={job_id}", f"Dependency=afterok:{':'.join(wait_ids)}"], status_command)


def release(job_id: str, status_command: str = "hpcddf status") -> None:
    """Let a held job (every task of a held array) start."""
    _scontrol(["release", job_id], status_command)


def cancel(job_ids: Iterable[str], timeout_s: float = CANCEL_TIMEOUT_S, strict: bool = False) -> bool:
    """scancel. Best-effort by default: it runs while another error is on its way, so it
    neither raises nor hangs; False (and a warning in the log) when Slurm did not confirm.
    ``strict`` (the user's own ``hpcddf cancel``): a failure is a SubmissionError instead."""
    ids = sorted({i for i in job_ids if i})
    if not ids:
        return True
    try:
        slurm_client.run(["scancel", *ids], timeout_s, slurm_client.DEFAULT_RETRY if strict else CANCEL_RETRY)
        problem = ""
    except SubmissionError as exc:
        problem = exc.message[:300]
    if problem and strict:
        raise SubmissionError(f"scancel {' '.join(ids)} failed: {problem}", "check the cluster with `hpcddf status`")
    if problem:
        log.warning("scancel %s failed: %s", " ".join(ids), problem)
    return not problem


def submit_arrays_with_dependencies(
        site: Site, folder: Path, arrays: Sequence[HeldArray],
        waits_for: Callable[[list[str]], Sequence[Sequence[str]]],
        record: Callable[[list[str]], None] = _nothing,
        undo: Callable[[list[str]], None] = _nothing,
        status_command: str = "hpcddf status") -> list[str]:
    """Held arrays, per-task ``afterok``, ``record``, release: the job id of every call, in order.

    ``waits_for`` gets those ids and returns, per call, the job ids it must wait for (ids of
    this submission or of earlier ones). ``record`` writes the callers' states before anything is
    released, so a starting task never finds its "queued" record written after its own. On any
    error every array submitted so far is cancelled, ``undo`` gets the ids submitted so far (to
    correct the records) and the error goes on.
    """
    job_ids: list[str] = []
    arrays_ids: list[str] = []
    cap = submission_limits(site, sum(len(a.calls) for a in arrays))
    try:
        for a in arrays:
            ids = submit_held_array(site, folder, a.resources, a.name, a.calls, a.max_running, a.what, cap)
            job_ids += ids
            arrays_ids += [i for i in dict.fromkeys(array_id(j) for j in ids) if i not in arrays_ids]
        for job_id, waits in zip(job_ids, waits_for(list(job_ids)), strict=True):
            if waits:
                add_afterok(job_id, waits, status_command)
        record(list(job_ids))
        for a_id in arrays_ids:
            release(a_id, status_command)
    except BaseException:
        cancel(arrays_ids)
        undo(list(job_ids))
        raise
    return job_ids


def submission_limits(site: Site, jobs: int) -> int:
    """The most tasks one array of this submission may have; a SubmissionError, before
    anything is queued, when its ``jobs`` (array tasks) do not fit what the cluster lets this
    user queue now (a dependency graph cannot be queued in part)."""
    limits = slurm_client.read_limits()
    free = limits.free_jobs()
    if free is not None and jobs > free:
        raise SubmissionError(f"this submission needs {jobs} jobs but the cluster lets you queue "
                              f"{free} more now (MaxSubmitJobs/MaxJobCount)",
                              "submit again when some of your jobs have ended")
    return slurm_client.array_cap(limits, site.slurm.max_array_size)


def _sbatch(site: Site, folder: Path, params: dict[str, Any], calls: Sequence[Callable[[], Any]],
            what: str) -> list[str]:
    """One sbatch through submitit's executor (an array for several calls); the job ids.

    The submission carries a unique token, so a retry after an unclear answer finds it. It is
    queued held and released once submitit has written the job's folder and pickle: a job
    whose answer was lost is found only seconds later, and started before its log folder
    existed it would fail at once. (A submission the caller holds, the caller releases.)"""
    extra = dict(params.get("additional_parameters") or {})
    caller_holds = bool(extra.get("hold"))
    ex = _ClientSlurmExecutor(folder=folder / "%j", max_num_timeout=site.slurm.max_requeues)
    ex._throttling = 0.0  # one sbatch per submission: no need for submitit's pause between calls
    ex.update_parameters(**{**params, "additional_parameters": {**extra, "hold": True}},
                         comment=slurm_client.new_token())
    try:
        with ex.batch():
            jobs = [ex.submit(c) for c in calls]
    except Exception as exc:  # submitit raises plain errors with sbatch's stderr
        raise _sbatch_error(exc, what) from None
    ids = [str(j.job_id) for j in jobs]
    if not caller_holds:
        _release_or_cancel(array_id(ids[0]), what)
    return ids


def _release_or_cancel(job_id: str, what: str) -> None:
    """Release a submission; one that cannot be released is cancelled (it would wait forever)."""
    try:
        release(job_id)
    except SubmissionError as exc:
        cancel([job_id])
        raise SubmissionError(f"{what}: {exc.message}; the job was cancelled", exc.hint) from None


class _ClientSlurmExecutor(submitit.SlurmExecutor):
    """submitit's Slurm executor, its sbatch run by ``slurm_client`` (timeouts, retries, the
    token look-up); submitit runs plain sbatch, without a timeout."""

    def _make_submission_command(self, submission_file_path: Path) -> list[str]:
        return slurm_client.sbatch_command(submission_file_path, SBATCH_RETRY, SBATCH_TIMEOUT_S)

    def _internal_process_submissions(self, delayed_submissions: Any) -> Any:
        # submitit submits an array through a fresh executor of its module's SlurmExecutor
        # class: for the duration of this call that class is this one, so arrays go through
        # slurm_client too (they would otherwise run plain sbatch)
        plain = submitit_slurm.SlurmExecutor
        submitit_slurm.SlurmExecutor = _ClientSlurmExecutor  # type: ignore[misc]
        try:
            return super()._internal_process_submissions(delayed_submissions)
        finally:
            submitit_slurm.SlurmExecutor = plain  # type: ignore[misc]


def _sbatch_error(exc: BaseException, what: str) -> SubmissionError:
    """The one-line error for a failed sbatch: a refusal (sbatch's reason) or no answer."""
    cause = exc.__cause__
    if isinstance(cause, subprocess.CalledProcessError) and cause.returncode in TIMED_OUT:
        return SubmissionError(f"sbatch of {what} failed: no answer from Slurm in {SBATCH_TIMEOUT_S:.0f} s",
                               "check the controller with `sinfo`, then `squeue --me` for a job "
                               "that may have been queued after all, and submit again")
    if slurm_client.is_transient(str(exc)):
        return SubmissionError(f"sbatch of {what} failed: the Slurm controller is busy "
                               f"({str(exc).strip()[:200]}), after {SBATCH_RETRY.attempts} attempts",
                               "check `squeue --me` for a job that may have been queued after all, "
                               "then submit again later")
    return SubmissionError(f"sbatch refused {what}: {str(exc).strip()[:400]}",
                           "check the site's partition/account/qos with `hpcddf sites show`")


def _scontrol(args: Sequence[str], status_command: str) -> None:
    """scontrol update/release: both are safe to repeat, so transient failures are retried."""
    what = f"scontrol {' '.join(args)}"
    hint = f"check the cluster with `{status_command}`"
    try:
        slurm_client.run(["scontrol", *args], SCONTROL_TIMEOUT_S)
    except slurm_client.SlurmCommandFailed as exc:
        raise SubmissionError(f"{what} failed: {exc.stderr.strip()[:300]}", hint) from None
    except SubmissionError as exc:
        raise SubmissionError(f"{what} failed: {exc.message}", hint) from None


# ------------------------------------------------------------------------------ local calls

class LocalCallFailed(SubmissionError):
    """The call raised in its local job; ``reason`` is the line of its error worth showing."""

    def __init__(self, job_id: str, reason: str) -> None:
        super().__init__(f"local job {job_id} failed: {reason}", "see its log in the job folder")
        self.job_id = job_id
        self.reason = reason


class LocalCallInterrupted(RunInterrupted):
    """Ctrl-C, SIGTERM or SIGHUP arrived while the call ran; its job and processes were stopped."""

    def __init__(self, job_id: str, signal_name: str) -> None:
        super().__init__(f"interrupted by {signal_name}; local job {job_id} and its processes were stopped",
                         "rerun the same command")
        self.job_id = job_id
        self.signal_name = signal_name


@dataclass(frozen=True)
class LocalDone:
    """A local call that returned: its job id and what it returned."""

    job_id: str
    result: Any


def _local_job_folder(folder: Path) -> Path:
    """A new folder for one local job, named by when it started (sorts like the runs did).

    Not submitit's ``%j``: its local controller opens the log in ``<folder>/<pid>/`` as soon as
    it starts, but the submitting process creates that folder only after the controller has
    started; on a loaded node the controller won and the job died before running anything. A
    folder known before the start is created by the controller itself.
    """
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"local-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"


def run_local_call(site: Site, folder: Path, call: Callable[[], Any], timeout_min: int, *,
                   signal_delay_s: int | None = None, stop_grace_s: float = STOP_GRACE_S,
                   started: Callable[[str], None] = _nothing, poll: Callable[[], None] = _nothing,
                   stopping: Callable[[str, str], None] = _nothing) -> LocalDone:
    """Run ``call`` as one submitit local job in the foreground, until it ends.

    ``started(job_id)`` runs once the job runs, ``poll()`` every second while it runs, and
    ``stopping(signal name, job_id)`` when Ctrl-C, SIGTERM or SIGHUP arrived: the job is then
    stopped (SIGTERM, ``stop_grace_s`` to end, then its whole process tree is killed) and
    :class:`LocalCallInterrupted` raised. A call that raised gives :class:`LocalCallFailed`.
    The job's processes ignore the terminal's SIGINT and SIGHUP: only this process hears them
    and stops the job in order (submitit's local controller would SIGKILL it 1 s later and
    orphan the commands it started).
    """
    ex = submitit.LocalExecutor(folder=_local_job_folder(folder), max_num_timeout=site.slurm.max_requeues)
    ex.update_parameters(timeout_min=timeout_min,
                         **({} if signal_delay_s is None else {"signal_delay_s": signal_delay_s}))
    with _foreground_signals():
        with _children_ignore_terminal_signals():
            job = ex.submit(call)
        job_id = str(job.job_id)
        try:
            started(job_id)
            _follow(job, poll)
        except _ForegroundSignal as sig:
            name = sig.name
            _stop_undisturbed(job_id, stop_grace_s, lambda: stopping(name, job_id))
            raise LocalCallInterrupted(job_id, name) from None
        except BaseException:  # a hook failed: the job must not outlive this foreground run
            _stop_undisturbed(job_id, stop_grace_s)
            raise
    try:
        return LocalDone(job_id, job.result())
    except Exception as exc:
        raise LocalCallFailed(job_id, first_line(exc)) from None


FOLLOW_S = 0.1  # a local job's end is seen this soon (its process is polled: cheap)
POLL_HOOK_S = 1.0  # how often the caller's poll hook runs while the job runs


def _follow(job: Any, poll: Callable[[], None]) -> None:
    """Wait for a local job, running ``poll`` every POLL_HOOK_S; the next stage of a chain
    starts within FOLLOW_S of the end of this one instead of up to a whole hook interval."""
    next_hook = 0.0
    while not job.done():
        if time.monotonic() >= next_hook:
            poll()
            next_hook = time.monotonic() + POLL_HOOK_S
        time.sleep(FOLLOW_S)
    poll()


def _stop_undisturbed(job_id: str, grace_s: float, before: Callable[[], None] = _nothing) -> None:
    """Stop the local job; a second Ctrl-C (or SIGTERM, SIGHUP) meanwhile must not cut it short."""
    with _handling(_STOP_SIGNALS, signal.SIG_IGN):
        before()
        stop_local_job(int(job_id), grace_s)


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


def stop_local_job(controller_pid: int, grace_s: float = STOP_GRACE_S) -> None:
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


def first_line(exc: BaseException) -> str:
    """The line of a job's error worth one progress line (submitit wraps the job's traceback)."""
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error:" in ln or "StepFailed:" in ln:
            return ln.strip().split(": ", 1)[-1][:300]
    for ln in reversed(lines):
        if "Error" in ln:
            return ln.strip()[:300]
    return lines[-1][:300] if lines else type(exc).__name__
