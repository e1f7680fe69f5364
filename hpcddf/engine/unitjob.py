"""The one job class every unit of work runs as on the node: a reduction stage, a mosaic, a
PHANGS task.

A unit's record (its dict in its pipeline's state file) goes through the same life whatever the
unit is: started (attempt n, host, job id), requeued at the walltime signal, then done or
failed with the time it took over all attempts and, for a failure, the error. On the walltime
(or preemption) signal submitit calls :meth:`UnitJob.checkpoint`, which records the requeue and
hands the job back to submitit to requeue; the next attempt starts at ``__call__`` again and the
unit's own markers (done-markers, products that exist) make it go on after what the first one
finished.

A pipeline's job says where the record lives (:meth:`UnitJob.record`) and what the work is
(:meth:`UnitJob.work`); it carries only plain data, as submitit pickles it to the node and back
into the queue. The reduction's :class:`~hpcddf.engine.nodejob.StageJob` adds steps, scratch and
early requeue on top of the same life.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable

import submitit

from hpcddf.engine.classify import ended_class, failure_signature
from hpcddf.engine.jobenv import job_id_from_env
from hpcddf.engine.preflight import run_preflight
from hpcddf.engine.sites import Site
from hpcddf.engine.state import State, now_iso
from hpcddf.errors import HpcddfError, PreflightError

Change = Callable[[dict[str, Any]], Any]
log = logging.getLogger("hpcddf.job")
# submitit's walltime/preemption signal (its --signal=USR2@delay), also sent for early requeue
WALLTIME_SIGNAL = signal.SIGUSR2
KEPT_FAILURES = 5  # signatures of the latest failures a record keeps


def error_doc(exc: BaseException) -> dict[str, Any]:
    """What a unit's record says of the error that ended it: our one-line message and hint
    (and the failing command's log tail), or the exception's type and text for anything else."""
    if isinstance(exc, HpcddfError):
        doc: dict[str, Any] = {"message": exc.message, "hint": exc.hint}
        tail = getattr(exc, "log_tail", None)
        if tail:
            doc["log_tail"] = tail[-2000:]
        return doc
    return {"message": f"{type(exc).__name__}: {exc}"}


def record_class(s: dict[str, Any]) -> None:
    """A failure the node job records itself keeps its class in the record (``classify``), and
    its signature in ``failures`` (the last few, surviving resubmissions): the same failure
    again makes it permanent."""
    if s.get("state") == State.FAILED and isinstance(s.get("error"), dict):
        s["failures"] = [*(s.get("failures") or [])[-(KEPT_FAILURES - 1):],
                         failure_signature(s["error"])]
    s["class"] = ended_class(s)


def check_node(site: Site, scratch: Path | None = None) -> tuple[int, ...]:
    """The site's preflight on this node, before the unit's first command: a node that would
    fail the work hours later (shm, hugepages, scratch, cores) stops it now. The usable cores."""
    report = run_preflight(site, scratch=scratch)
    if not report.ok:
        raise PreflightError(f"node {node_name()} failed preflight: "
                             + "; ".join(c.name for c in report.failed()), report.text())
    return tuple(report.cpus)


def node_name() -> str:
    """Slurm's name of this node (what --exclude takes); the host name outside Slurm."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def requeue_underway(exc: BaseException) -> bool:
    """submitit's ``scontrol requeue`` (run from the walltime signal handler) killed by a signal:
    the requeue itself ends this job step and its processes, scontrol among them when it has not
    exited yet (seen on a loaded node). Slurm has the requeue: the attempt is not a failure, and
    the record keeps the REQUEUED the checkpoint wrote."""
    return (isinstance(exc, subprocess.CalledProcessError) and exc.returncode is not None
            and exc.returncode < 0 and list(exc.cmd or [])[:2] == ["scontrol", "requeue"])


class UnitJob(submitit.helpers.Checkpointable):
    """One unit of work on the node; a walltime kill requeues it and records that it did."""

    host_key = "host"  # the record's word for the node it ran on
    requeue_note = "walltime or preemption signal: requeued, resumes after the last product"

    # ---------------------------------------------------------------- what a pipeline provides
    def record(self, change: Change, timeout: float | None = None) -> None:
        """Apply ``change`` to this unit's record, under its state file's lock."""
        raise NotImplementedError

    def work(self) -> Any:
        """The unit's work; raises on failure."""
        raise NotImplementedError

    def done_values(self, result: Any) -> dict[str, Any]:
        """What the record keeps of a finished unit besides its state and times."""
        return {}

    def failed_values(self) -> dict[str, Any]:
        """What the record keeps of a failed unit besides the error (e.g. the steps it did)."""
        return {}

    def done_summary(self, record: dict[str, Any]) -> dict[str, Any]:
        """What the record says of the whole unit once done, from the record itself: only it
        holds the sums over every attempt (this object knows only the attempt that ends)."""
        return {}

    def on_error(self, exc: Exception) -> None:
        """Record what ended the work (before it propagates to submitit)."""
        self.failed(error_doc(exc), **self.failed_values())

    # ---------------------------------------------------------------- the life of a unit
    def __call__(self) -> Any:
        self.begin()
        try:
            result = self.work()
        except Exception as exc:
            if requeue_underway(exc):
                log.warning("the requeue ended this attempt before scontrol returned: requeued")
            else:
                self.on_error(exc)
            raise
        self.work_complete()
        self.finished(**self.done_values(result))
        return result

    def work_complete(self) -> None:
        """The work is done: from now on the walltime signal must not requeue the unit, or the
        next attempt would find nothing to do (an empty attempt, a start-up and a queue wait
        before what depends on it). The signal is logged and the unit ends done. Only the main
        thread may set a handler (a unit run in a thread has no walltime signal)."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(WALLTIME_SIGNAL, self._on_late_signal)

    def _on_late_signal(self, signum: int, frame: Any) -> None:
        log.warning("walltime signal after the work was done: ending done, not requeued")
        self._late_signal = True

    def begin(self) -> int:
        """Record the start of an attempt; its number (Slurm's restart count agrees with it)."""
        self._started = time.time()
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        out: dict[str, int] = {}

        def change(s: dict[str, Any]) -> None:
            before = int(s.get("attempts") or 0)
            if s.get("state") == State.RUNNING and restarts:
                self.note_lost_attempt(s, before)
            s["attempts"] = max(before + 1, restarts + 1)
            # every attempt of every submission: the count beside the summed time and steps
            s["attempts_total"] = int(s.get("attempts_total") or before) + s["attempts"] - before
            s.update({self.host_key: node_name()}, state=State.RUNNING, started=now_iso(),
                     ended=None, error=None, job_id=job_id_from_env() or s.get("job_id"))
            s.pop("class", None)
            out["attempt"] = s["attempts"]
        self.record(change)
        return out["attempt"]

    def note_lost_attempt(self, s: dict[str, Any], attempt: int) -> None:
        """The last attempt never recorded its end and Slurm restarted the job: its node died
        under it (NODE_FAIL) or it was preempted, and Slurm requeued it. Kept, so that the
        stage's history (and a person reading status) knows why it ran again."""
        node = s.get(self.host_key)
        s["lost_attempts"] = [*s.get("lost_attempts", []), {"attempt": attempt, "node": node,
                                                             "started": s.get("started")}]
        s["note"] = (f"attempt {attempt} on {node} ended without a word (node failure or preemption); "
                     "Slurm requeued the job")

    def elapsed(self, s: dict[str, Any]) -> None:
        """Add this attempt's time to the unit's total and node-hours (requeues included)."""
        dt = time.time() - getattr(self, "_started", time.time())
        s["elapsed_s"] = round(float(s.get("elapsed_s") or 0.0) + dt, 1)
        s["node_hours"] = float(s.get("node_hours") or 0.0) + dt / 3600

    def finished(self, **values: Any) -> None:
        def change(s: dict[str, Any]) -> None:
            self.elapsed(s)
            s.update(state=State.DONE, ended=now_iso(), error=None, failures=[], **values)
            s.pop("class", None)
            s.update(self.done_summary(s))
        self.record(change)

    def failed(self, error: dict[str, Any], **values: Any) -> None:
        """Record the failure; a unit `hpcddf cancel` killed stays cancelled (not a failure)."""
        def change(s: dict[str, Any]) -> None:
            self.elapsed(s)
            cancelled = s.get("state") == State.CANCELLED
            s.update(state=State.CANCELLED if cancelled else State.FAILED, ended=now_iso(),
                     error=error, **values)
            record_class(s)
        self.record(change)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on the walltime/preemption signal, before it requeues the job."""
        # in a signal handler: never wait long for the state lock (the main thread may hold it)
        def change(s: dict[str, Any]) -> None:
            self.elapsed(s)  # the killed attempt's node time counts too
            s.update(state=State.REQUEUED, note=self.requeue_note, requeued_at=now_iso())
        with contextlib.suppress(Exception):
            self.record(change, timeout=5.0)
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        """Only the plain fields travel (to the node, and back into the queue on requeue)."""
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
