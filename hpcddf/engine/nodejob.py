"""What runs on the compute node for one stage of one field (the engine's :class:`UnitJob`).

preflight -> scratch -> run the stage's steps not yet done -> record the outcome. On the
walltime signal submitit calls :meth:`UnitJob.checkpoint` and requeues the job; the next
attempt starts over here and the done-markers make it resume after the last finished step.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from hpcddf.engine.contained import check_image, drop_short_tmpdir, science_env, site_launcher
from hpcddf.engine.durations import load_estimates, load_speed, record_duration, record_startup
from hpcddf.engine.jobenv import job_id_from_env
from hpcddf.engine.paths import unit_paths
from hpcddf.engine.preflight import clean_stale_shm, pid_alive
from hpcddf.engine.runner import Interrupted, RunContext, Step, StopRequested, run_steps
from hpcddf.engine.sites import Site
from hpcddf.engine.sizing import lead_s
from hpcddf.engine.staging import clean_scratch, prepare_scratch
from hpcddf.engine.state import State, now_iso, update_state
from hpcddf.engine.unitjob import WALLTIME_SIGNAL, UnitJob, check_node, node_name, record_class
from hpcddf.errors import HpcddfError, StepFailed

log = logging.getLogger("hpcddf.job")

CUTS_BEFORE_STOP = 2  # a step the walltime cut this often will not fit: stop, do not loop


@dataclass(frozen=True)
class NodeInfo:
    """What a pipeline's step builder needs to know about the node the stage runs on."""

    cpus: tuple[int, ...]
    cache_dir: Path
    field_id: str = ""
    python: str = sys.executable
    workdir: Path = Path(".")
    # parallel workers a step should start (None: one per CPU); fewer after a memory death on a
    # whole node (recovery's remedy), each worker holding its own buffers
    workers: int | None = None


@dataclass(frozen=True)
class NodeSteps:
    """What a step builder returns: the stage's executable steps, and the folder (relative to
    the work directory) their command logs go to."""

    steps: list[Step]
    log_dir: str = "logs"


# A pipeline's step builder, run on the node: (stage, step names, node) -> the steps. Pickled
# with the job, so it must be plain data with a __call__ (e.g. lofar.recipes.ReductionSteps).
StepBuilder = Callable[[str, Sequence[str], NodeInfo], NodeSteps]


@dataclass
class StageJob(UnitJob):
    """One stage of one unit of work: the engine's unit life (:class:`UnitJob`) with steps,
    scratch, preflight and early requeue. Pickled by submitit; holds only plain data."""

    host_key = "node"
    requeue_note = "walltime or preemption signal: requeued"

    site: Site
    field_id: str
    workdir: str
    work_root: str
    stage: str
    steps: tuple[str, ...]
    builder: StepBuilder
    walltime_min: int
    last_stage: bool = False
    workers_fraction: float = 1.0  # recovery's memory remedy on a whole node (plan.Resources)
    # a local run: the pid of the foreground ``hpcddf`` this job must not outlive
    foreground_pid: int | None = None
    _stop: bool = field(default=False, repr=False)

    # ---------------------------------------------------------------- the unit's life
    def begin(self) -> int:
        """The stage's log, the attempt recorded, ddf-pipeline's SIGUSR1 and, for a local run,
        the guard that stops it with the foreground ``hpcddf``."""
        _log_to(Path(self.workdir) / "logs" / f"hpcddf-{self.stage}.log")
        self._attempt = super().begin()
        log.info("stage %s of %s: attempt %d on %s", self.stage, self.field_id, self._attempt, node_name())
        signal.signal(signal.SIGUSR1, self._on_usr1)
        self._abort = threading.Event()
        if self.foreground_pid:
            self._guard_foreground(self.foreground_pid)
        return self._attempt

    def _workers(self, ncpu: int) -> int | None:
        if self.workers_fraction >= 1.0:
            return None
        n = max(1, int(ncpu * self.workers_fraction))
        log.info("memory remedy: steps start %d parallel workers on %d CPUs", n, ncpu)
        return n

    def work(self) -> dict[str, Any]:
        """Scratch, preflight, then the stage's steps not yet done."""
        try:
            scratch = prepare_scratch(self.site, self.field_id,
                                      tag=(job_id_from_env(os.environ) or str(os.getpid())).replace("_", "-"))
            ran = self._run(check_node(self.site, scratch.root), scratch.cache_dir)
        finally:
            clean_stale_shm(Path("/dev/shm"), os.getuid(), pid_alive)
        clean_scratch(scratch)
        drop_short_tmpdir(scratch.cache_dir.parent / "tmp")
        return {"field": self.field_id, "stage": self.stage, "ran": ran}

    def done_summary(self, record: dict[str, Any]) -> dict[str, Any]:
        """Steps run over every attempt, not this attempt's: an attempt that found everything
        done by the one before must not make the stage read "ran 0 step(s)"."""
        attempts = int(record.get("attempts_total") or record.get("attempts") or 1)
        note = f"ran {int(record.get('steps_run') or 0)} step(s) in {attempts} attempt(s)"
        if getattr(self, "_late_signal", False):
            note += "; the walltime signal came after the last step: not requeued"
        return {"note": note}

    def on_error(self, exc: Exception) -> None:
        """A stop at a step boundary requeues; an interruption is not a failure; a failed
        step is recorded with its command and log tail."""
        if getattr(self, "_loop_error", None):
            return  # recorded by the walltime signal's handler (_stop_looping)
        if isinstance(exc, StopRequested):
            self._early_requeue(exc.reason, self._attempt)
        elif isinstance(exc, Interrupted):
            self._record_interrupted(exc.reason)
        elif isinstance(exc, StepFailed):
            self.failed({"message": str(exc), "step": exc.step, "argv": exc.argv,
                         "returncode": exc.returncode, "log": exc.log_path, "log_tail": exc.log_tail})
        elif isinstance(exc, HpcddfError):
            self.failed({"message": exc.message, "detail": exc.hint})
        else:  # a bug or an unexpected node problem: still say what happened
            self.failed({"message": f"{type(exc).__name__}: {exc}"})

    def _run(self, cpus: tuple[int, ...], cache_dir: Path) -> list[str]:
        wd = Path(self.workdir)
        paths = unit_paths(wd)
        contained = self.site.container.runtime != "none"
        node = NodeInfo(cpus=cpus, cache_dir=cache_dir, field_id=self.field_id, workdir=wd,
                        python="python3" if contained else sys.executable, workers=self._workers(len(cpus)))
        built = self.builder(self.stage, self.steps, node)
        steps = built.steps
        deadline, usable_s = self._deadline()
        record_startup(Path(self.work_root), time.time() - self._job_start)
        ctx = RunContext(workdir=wd, log_dir=wd / built.log_dir,
                         marker_dir=paths.done_dir, deadline=deadline,
                         safety_s=min(60.0, usable_s * 0.02),
                         estimates=load_estimates(Path(self.work_root)),
                         speed=load_speed(Path(self.work_root)),
                         env=science_env(),
                         on_step=self._on_step, abort_event=self._abort)
        if contained:
            ctx.launcher = site_launcher(self.site, wd, cache_dir.parent)
            check_image(ctx, steps, str(self.site.container.image))
        if self._stop:
            ctx.stop_event.set()
        ctx.abort_reason = getattr(self, "_abort_reason", ctx.abort_reason)
        self._ctx = ctx
        ran = run_steps(ctx, steps, walltime_s=usable_s)
        self.work_complete()  # before scratch is cleaned: a signal now must not requeue
        return ran

    def _deadline(self) -> tuple[float, float]:
        """When the stage must be between steps, and how long a whole attempt has.

        The walltime signal, not the limit, ends useful work: Slurm sends it ``signal_delay_s``
        before the limit, checking only every ~30 s, so it may come up to 30 s earlier still.
        """
        end = self._started + self.walltime_min * 60
        self._job_start = self._started  # the attempt's start as Slurm says (start-up measured from it)
        job = os.environ.get("SLURM_JOB_ID")
        if job and self.site.scheduler == "slurm":
            from hpcddf.engine.slurm_query import job_times
            start, slurm_end = job_times(job)
            end, self._job_start = slurm_end or end, min(start or self._started, self._started)
        lead = lead_s(self.site)
        usable = max(1.0, self.walltime_min * 60 - lead)
        return end - lead, usable

    def __getstate__(self) -> dict[str, Any]:
        """Only the plain fields travel (to the node, and back into the queue on requeue)."""
        state = {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
        state["_stop"] = False
        return state

    # ---------------------------------------------------------------- requeue
    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """The walltime/preemption signal: said in the stage's log, then the unit's requeue,
        unless the step it cut has now been cut as often as a step may be (None: submitit then
        ends the job without requeueing it, and the stage is recorded failed)."""
        log.warning("stage %s: walltime/preemption signal, requeueing", self.stage)
        cut = self._record_cut()
        if cut is not None and len(cut[1]) >= CUTS_BEFORE_STOP:
            self._stop_looping(*cut)
            return None
        return super().checkpoint(*args, **kwargs)

    def _record_cut(self) -> tuple[str, list[float]] | None:
        """The step the signal cuts, and how long it ran each time it was cut (this one too)."""
        current = getattr(self, "_current", None)
        if current is None:
            return None
        step, started = current
        runs: list[float] = []

        def change(s: dict[str, Any]) -> None:
            cuts = s.setdefault("cuts", {})
            cuts[step] = list(cuts.get(step, [])) + [round(time.time() - started, 1)]
            runs.extend(cuts[step])
        self.record(change, timeout=5.0)
        return step, runs or [round(time.time() - started, 1)]

    def _stop_looping(self, step: str, runs: list[float]) -> None:
        """The same step cut again: another attempt would only be cut a third time."""
        ran = " and ".join(f"{r:.0f} s" for r in runs)
        self._loop_error = {
            "message": f"step {step} was cut by the walltime {len(runs)} times (it ran {ran}; the "
                       f"stage's walltime is {self.walltime_min} min): it does not fit one walltime",
            "detail": "raise [slurm] max_walltime in the site config, or split the step; then "
                      "hpcddf resubmit", "step": step, "cut_after_s": runs}
        log.error("stage %s: %s: not requeued", self.stage, self._loop_error["message"])

        def change(s: dict[str, Any]) -> None:
            self.elapsed(s)
            s.update(state=State.FAILED, ended=now_iso(), error=self._loop_error)
            record_class(s)
        self.record(change, timeout=5.0)

    def _early_requeue(self, reason: str, attempt: int) -> None:
        """Requeue now (a step would not fit): through submitit's own handler, capped by the site."""
        if attempt > self.site.slurm.max_requeues:
            msg = f"not requeued: {reason}; already {attempt - 1} requeues (max_requeues)"
            self.failed({"message": msg})
            raise HpcddfError(msg, "raise [slurm] max_requeues or max_walltime in the site config")
        log.warning("stage %s: %s", self.stage, reason)
        self.record(lambda s: s.update(state=State.REQUEUED, note=reason, requeued_at=now_iso()))
        os.kill(os.getpid(), WALLTIME_SIGNAL)  # submitit: checkpoint + requeue + exit
        time.sleep(60)

    # ---------------------------------------------------------------- local runs
    def _guard_foreground(self, pid: int) -> None:
        """A local run must not outlive the ``hpcddf`` that started it.

        SIGTERM (the foreground forwards Ctrl-C, SIGTERM and SIGHUP through submitit's local
        controller) or the foreground's death (even by SIGKILL, which it cannot forward) stops
        the running science command's process group at once and ends the stage "interrupted";
        the done-markers let a rerun resume from the last finished step.
        """
        signal.signal(signal.SIGTERM, lambda signum, frame: self._abort_now(
            f"interrupted by {signal.Signals(signum).name}"))

        def watch() -> None:
            while not self._abort.wait(0.5):
                if not pid_alive(pid):
                    self._abort_now(f"interrupted: hpcddf (pid {pid}) that started this local run is gone")
        threading.Thread(target=watch, name="hpcddf-foreground-guard", daemon=True).start()

    def _abort_now(self, reason: str) -> None:
        ctx = getattr(self, "_ctx", None)
        if ctx is not None:
            ctx.abort_reason = reason
        self._abort_reason = reason
        self._abort.set()

    def _record_interrupted(self, reason: str) -> None:
        def change(s: dict[str, Any]) -> None:
            self.elapsed(s)
            if s.get("state") == State.CANCELLED:  # `hpcddf cancel` said so first: keep its word
                s.setdefault("ended", now_iso())
                return
            s.update(state=State.INTERRUPTED, ended=now_iso(), note=reason, error=None)
            record_class(s)
        self.record(change, timeout=10.0)
        log.warning("stage %s: %s", self.stage, reason)

    def _on_usr1(self, signum: int, frame: Any) -> None:
        """ddf-pipeline's SIGUSR1: stop at the next step boundary."""
        log.warning("stage %s: SIGUSR1, stopping at the next step boundary", self.stage)
        self._stop = True
        ctx = getattr(self, "_ctx", None)
        if ctx is not None:
            ctx.stop_event.set()

    # ---------------------------------------------------------------- field state
    def record(self, change: Any, timeout: float | None = None) -> None:
        """This stage's entry in the field state."""
        def apply(state: dict[str, Any]) -> None:
            change(state["stages"].setdefault(self.stage, {}))
        try:
            update_state(Path(self.workdir), self.field_id, apply, timeout=timeout)
        except TimeoutError:
            log.warning("field state busy: stage %s state not updated", self.stage)

    def _on_step(self, step: str, what: str, info: dict[str, Any]) -> None:
        self._current = (step, time.time()) if what == State.RUNNING else None
        if what == State.DONE and step == self.steps[-1]:
            self.work_complete()  # the last marker is written: a signal from now on is late
        if what == State.DONE:
            record_duration(Path(self.work_root), step, float(info["duration_s"]), info.get("estimate_s"))

        def change(state: dict[str, Any]) -> None:
            state.setdefault("steps", {})[step] = {"state": what, "at": now_iso(),
                                                   "duration_s": info.get("duration_s")}
            stage = state["stages"].setdefault(self.stage, {})
            stage["current_step"] = step if what == State.RUNNING else None
            if what == State.DONE:  # summed over attempts: status shows every step run
                stage["steps_run"] = int(stage.get("steps_run") or 0) + 1
        update_state(Path(self.workdir), self.field_id, change)


def _log_to(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
