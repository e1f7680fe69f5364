"""Run the steps of one stage: skip done steps, run the rest's commands, write done-markers.

A step is done only when all its commands succeeded and its outputs exist; its marker (the
step's parameters, versions and durations) is written last, atomically. A restart therefore
never skips a sub-command (ddf-pipeline's ClipCal-after-kMS gap cannot happen here).

Before each step the runner compares the step's expected duration with the walltime left;
if it cannot finish, the stage asks to be requeued at once instead of starting work that the
walltime would kill.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from hpcddf import __version__
from hpcddf.engine.atomic import write_json_atomic
from hpcddf.engine.paths import MARKER_SUFFIX
from hpcddf.engine.state import State
from hpcddf.errors import StepFailed

log = logging.getLogger(__name__)

TERM_GRACE_S = 20.0  # a science command gets this long after SIGTERM before SIGKILL
START_RETRIES = 3  # reruns of a command whose failure matched its ``retry_if``


@dataclass(frozen=True)
class Command:
    """One external program run: argv (never a shell string), its log name and time limit."""

    argv: tuple[str, ...]
    log_name: str
    timeout_s: float | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    # (path, args): args are appended when path exists as the command starts, e.g. DDFacet's
    # "--Cache-PSF=force" only if an earlier command of the stage left a PSF in the cache
    when_exists: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # regular expressions that mark a failure as a transient start-up race, not an error: when
    # the end of the log matches one, the command is run again (at most START_RETRIES times)
    retry_if: tuple[str, ...] = ()
    # inherited environment variables the command must not see (e.g. another Python's)
    unset_env: tuple[str, ...] = ()

    def resolved(self, workdir: Path) -> "Command":
        """The command with its conditional arguments decided now."""
        extra = [a for path, args in self.when_exists if (workdir / path).exists() for a in args]
        if not extra:
            return self
        return replace(self, argv=self.argv + tuple(extra), when_exists=())


@dataclass(frozen=True)
class Step:
    """A declared step: commands run in order, outputs that must exist, what its marker records."""

    name: str
    stage: str
    commands: tuple[Command, ...]
    outputs: tuple[str, ...] = ()
    params: Mapping[str, Any] = field(default_factory=dict)
    estimate_s: float | None = None


class Interrupted(Exception):
    """The run was interrupted from outside (the foreground ``hpcddf`` of a local run got a
    signal or died): the running command was stopped, its step stays not-done."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class StopRequested(Exception):
    """The stage must stop at this step boundary (walltime, SIGUSR1); nothing failed."""

    def __init__(self, reason: str, requeue: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.requeue = requeue


Launcher = Callable[[Command, Path], list[str]]  # wraps argv for a container runtime


def no_container(cmd: Command, workdir: Path) -> list[str]:
    return list(cmd.argv)


@dataclass
class RunContext:
    """Where and how a stage's steps run on this node."""

    workdir: Path
    log_dir: Path
    marker_dir: Path
    deadline: float | None = None           # epoch seconds when the walltime ends
    safety_s: float = 30.0                  # keep this much spare before the deadline
    launcher: Launcher = no_container
    env: Mapping[str, str] = field(default_factory=dict)
    estimates: Mapping[str, float] = field(default_factory=dict)
    # measured / estimated of steps done on this site (earlier fields, and this run's steps)
    speed: list[float] = field(default_factory=list)
    stop_event: threading.Event = field(default_factory=threading.Event)  # at the next step
    abort_event: threading.Event = field(default_factory=threading.Event)  # now, mid-command
    abort_reason: str = "interrupted"
    versions: Mapping[str, str] = field(default_factory=dict)
    on_step: Callable[[str, str, dict[str, Any]], None] | None = None


def marker_path(ctx: RunContext, step: str) -> Path:
    return ctx.marker_dir / f"{step}{MARKER_SUFFIX}"


def read_marker(ctx: RunContext, step: Step) -> dict[str, Any] | None:
    """The step's marker if the step is done: marker parses and every output exists."""
    try:
        data = json.loads(marker_path(ctx, step.name).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if any(not (ctx.workdir / o).exists() for o in step.outputs):
        return None
    return data


# How far a step may overrun what it is expected to take. A static estimate (the pipeline's
# guess, or a new site's first field) can be off by a factor two; a measurement of the same
# step on the same site by little. The runner starts a step late in an attempt only when even
# the overrun would fit, so a wrong guess costs an early requeue, never redone work.
STATIC_MARGIN = 1.0
MEASURED_MARGIN = 0.1
SPEED_KEEP = 20  # the site's speed is the median of this many recent ratios
FRESH_TOLERANCE_S = 5.0  # steps that took less than this before a long one leave it "fresh"


def expected_duration(ctx: RunContext, step: Step) -> float | None:
    """Measured durations of this step (earlier attempts and fields) beat the static estimate,
    which is scaled by how fast this site ran the steps it has measured (the median ratio)."""
    if step.name in ctx.estimates:
        return ctx.estimates[step.name]
    if step.estimate_s is None or not ctx.speed:
        return step.estimate_s
    return step.estimate_s * statistics.median(ctx.speed[-SPEED_KEEP:])


def needed_seconds(ctx: RunContext, step: Step) -> float | None:
    """The time to keep free for the step: its expected duration and the overrun it may have."""
    need = expected_duration(ctx, step)
    if need is None:
        return None
    margin = MEASURED_MARGIN if step.name in ctx.estimates else STATIC_MARGIN
    return need * (1.0 + margin)


def time_left(ctx: RunContext) -> float | None:
    return None if ctx.deadline is None else ctx.deadline - time.time()


def check_fits(ctx: RunContext, step: Step, walltime_s: float | None, best_left: float | None = None) -> None:
    """Requeue now unless the step can finish in the walltime left, or this attempt is fresh.

    A step that would not fit is never started late: it waits for a fresh attempt, where it
    has the most time it can have, even if it is longer than a whole walltime (it then runs
    first thing, and if the walltime cuts it twice the stage stops; see the node job). The
    attempt is fresh while its time left is (within a few seconds) what it had when its first
    step could start, ``best_left``: a requeue would give no more.
    """
    left = time_left(ctx)
    need = needed_seconds(ctx, step)
    if left is None or need is None or need + ctx.safety_s <= left:
        return
    if best_left is not None and left >= best_left - FRESH_TOLERANCE_S:
        if walltime_s is not None and need + ctx.safety_s > walltime_s:
            log.warning("step %s may take ~%.0f s, longer than a whole walltime (%.0f s): running "
                        "it at the start of an attempt, where it has the most time", step.name,
                        need, walltime_s)
        return
    raise StopRequested(f"step {step.name} needs ~{need:.0f} s but only {left:.0f} s of "
                        "walltime are left: requeueing before starting it")


def run_steps(ctx: RunContext, steps: Sequence[Step], walltime_s: float | None = None) -> list[str]:
    """Run every step not yet done, in order; returns the names of the steps run now."""
    ctx.log_dir.mkdir(parents=True, exist_ok=True)
    ctx.marker_dir.mkdir(parents=True, exist_ok=True)
    ran: list[str] = []
    best_left = time_left(ctx)  # what this attempt has for its steps: a requeue gives no more
    for step in steps:
        if read_marker(ctx, step) is not None:
            log.info("step %s: already done", step.name)
            continue
        if ctx.abort_event.is_set():
            raise Interrupted(f"{ctx.abort_reason}: stopped before step {step.name}")
        if ctx.stop_event.is_set():
            raise StopRequested("stop requested (signal): stopping before step " + step.name)
        check_fits(ctx, step, walltime_s, best_left)
        run_step(ctx, step)
        ran.append(step.name)
    return ran


def run_step(ctx: RunContext, step: Step) -> dict[str, Any]:
    """All commands of the step, then a check of its outputs, then the marker (last)."""
    log.info("step %s: starting (%d command(s))", step.name, len(step.commands))
    _notify(ctx, step.name, State.RUNNING, {})
    t0 = time.time()
    durations, ran = [], []
    for cmd in step.commands:
        cmd = cmd.resolved(ctx.workdir)  # conditional arguments decided as the command starts
        durations.append(run_command(ctx, step.name, cmd))
        ran.append(list(cmd.argv))
    missing = [o for o in step.outputs if not (ctx.workdir / o).exists()]
    if missing:
        raise StepFailed(step.name, list(step.commands[-1].argv) if step.commands else [], 0,
                         "", None, reason=f"commands succeeded but outputs are missing: {', '.join(missing)}")
    marker = {"step": step.name, "stage": step.stage, "finished": time.time(), "started": t0,
              "duration_s": time.time() - t0, "command_durations_s": durations,
              "commands": ran, "outputs": list(step.outputs), "estimate_s": step.estimate_s,
              "params": dict(step.params), "versions": {"hpcddf": __version__, **ctx.versions}}
    write_json_atomic(marker_path(ctx, step.name), marker)
    if step.estimate_s:
        ctx.speed.append(marker["duration_s"] / step.estimate_s)
    _notify(ctx, step.name, State.DONE, marker)
    log.info("step %s: done in %.1f s", step.name, marker["duration_s"])
    return marker


def _notify(ctx: RunContext, step: str, what: str, info: dict[str, Any]) -> None:
    if ctx.on_step is not None:
        ctx.on_step(step, what, info)


def run_command(ctx: RunContext, step: str, cmd: Command) -> float:
    """Run one command with its output in its log; raise StepFailed on failure or timeout.

    The command runs in its own process group so that a stop (walltime, SIGUSR1, SystemExit
    from the requeue handler) terminates it and its workers cleanly: SIGTERM, then SIGKILL.
    A failure whose log ends in one of the command's ``retry_if`` patterns is a race at start-up
    (another process changed a shared resource under it), so the command is simply run again.
    """
    cmd = cmd.resolved(ctx.workdir)
    argv = ctx.launcher(cmd, ctx.workdir)
    log_path = ctx.log_dir / cmd.log_name
    t0 = time.time()
    for attempt in range(START_RETRIES + 1):
        rc = _run_once(ctx, cmd, argv, log_path)
        if ctx.abort_event.is_set():
            raise Interrupted(f"{ctx.abort_reason}: {Path(argv[0]).name} of step {step} stopped")
        if rc in (0, None) or attempt == START_RETRIES or not _transient(cmd, log_path):
            break
        log.warning("step %s: %s failed at start-up in a known race (see %s): running it again",
                    step, Path(argv[0]).name, log_path)
    if rc is None:
        raise StepFailed(step, argv, None, tail(log_path), str(log_path),
                         reason=f"timed out after {cmd.timeout_s:.0f} s")
    if rc != 0:
        raise StepFailed(step, argv, rc, tail(log_path), str(log_path))
    return time.time() - t0


def _run_once(ctx: RunContext, cmd: Command, argv: list[str], log_path: Path) -> int | None:
    """One run of the command, appending to its log; its exit code, None on timeout/abort."""
    env = {k: v for k, v in {**os.environ, **ctx.env}.items() if k not in cmd.unset_env}
    env.update(cmd.env)
    with open(log_path, "ab") as fh:
        fh.write(f"# hpcddf {time.strftime('%Y-%m-%d %H:%M:%S')}: {json.dumps(argv)}\n".encode())
        fh.flush()
        proc = subprocess.Popen(argv, cwd=ctx.workdir, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        try:
            return _wait(proc, cmd.timeout_s, ctx.abort_event)
        except BaseException:
            terminate(proc)
            raise


def _transient(cmd: Command, log_path: Path) -> bool:
    """Whether the end of the log shows one of the command's known start-up races."""
    end = tail(log_path, 60)
    return any(re.search(pattern, end) for pattern in cmd.retry_if)


def _wait(proc: subprocess.Popen[bytes], timeout_s: float | None,
          abort: threading.Event | None = None) -> int | None:
    """Wait for the process; None on timeout or abort (after terminating it)."""
    end = None if timeout_s is None else time.time() + timeout_s
    while True:
        try:
            return proc.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            pass
        if (end is not None and time.time() > end) or (abort is not None and abort.is_set()):
            terminate(proc)
            return None


def terminate(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the command's process group, SIGKILL it after a grace period."""
    if proc.poll() is not None:
        return
    for sig, grace in ((signal.SIGTERM, TERM_GRACE_S), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def tail(path: Path, lines: int = 20) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 8192))
            return b"\n".join(fh.read().splitlines()[-lines:]).decode("utf-8", "replace")
    except OSError:
        return ""
