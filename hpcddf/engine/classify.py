"""Why a stage ended: one class per ended stage, from Slurm's accounting and the stage's record.

Two witnesses see an ending: Slurm (sacct's State, ExitCode, DerivedExitCode, Reason and
NodeList of every run of the job, requeues included) and the node job, which records a failed
science command (its step, return code, log tail) before it exits. Slurm alone knows what
killed the whole job (TIMEOUT, NODE_FAIL, BOOT_FAIL, OUT_OF_MEMORY, PREEMPTED); only the record
knows which command failed and how. :func:`classify` weighs both and says, for a person and
for a later automatic resubmission: the class, whether another attempt may pass (transient),
the node(s) involved, a one-line reason and a one-line fix.

Pure functions: the caller asks Slurm (``slurm_query``) and reads the record; nothing here
runs a command or writes a file, so every class is unit-tested on pasted sacct output.
"""

from __future__ import annotations

import re
import signal
from dataclasses import asdict, dataclass
from typing import Any, Protocol, Sequence

from hpcddf.engine.slurm_query import ACTIVE

# the classes, and whether another attempt (with a remedy) may pass
TRANSIENT = {"walltime_requeued": True, "timeout": True, "node_fail": True, "preempted": True,
             "boot_fail": True, "out_of_memory": True, "killed_by_signal": True,
             "command_timeout": True, "step_too_long": False, "cancelled": False,
             "permanent": False, "unknown": False}
OOM_SIGNALS = (signal.SIGKILL, signal.SIGBUS, signal.SIGSEGV)  # DDFacet's out-of-memory deaths
SAME_FAILURE_LIMIT = 2  # a command that fails the same way this often will not pass by retrying
_ENDED = ("failed", "cancelled", "interrupted", "requeued")


class Run(Protocol):
    """One run of a job as sacct -X -D shows it (``slurm_query.JobInfo`` is one)."""

    state: str
    node_list: str
    reason: str
    exit_code: str
    derived_exit_code: str


@dataclass(frozen=True)
class Classification:
    """What ended a stage: ``name`` (a key of TRANSIENT), whether a retry may pass, the nodes
    involved (for ``--exclude``), and one line each of reason and fix for a person."""

    name: str
    transient: bool
    nodes: tuple[str, ...]
    reason: str
    fix: str

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "nodes": list(self.nodes)}


def make(name: str, reason: str, fix: str, nodes: Sequence[str] = ()) -> Classification:
    return Classification(name, TRANSIENT[name], tuple(n for n in nodes if n), reason, fix)


def classify(runs: Sequence[Run], record: dict[str, Any]) -> Classification | None:
    """The class of an ended stage from its job's runs (oldest first, possibly none) and its
    record; None while it is live or once it is done. A failure the record saw
    ``SAME_FAILURE_LIMIT`` times in a row is permanent whatever its class."""
    state = record.get("state")
    last = runs[-1] if runs else None
    if state == "done" or (last is None and state not in _ENDED):
        return None
    if last is None:
        return _repeated(_from_record(record) or unknown(record), record)
    if _live(last.state) and state not in _ENDED:
        return None
    found = _from_slurm(last, record) or _from_record(record) or _from_exit(last, record)
    return _repeated(found, record)


def _live(state: str) -> bool:
    """A run not ended. PREEMPTED counts as live for the queue (Slurm requeues it), but as a
    run's state it ended: a requeued job's next run is a row of its own."""
    return state in ACTIVE and state != "PREEMPTED"


def _nodes(run: Run | None, record: dict[str, Any]) -> list[str]:
    """The node list as sacct gives it (a compact range such as ``node[01-02]`` stays one item:
    that is the form ``--exclude`` takes), else the node the record says it ran on."""
    listed = run.node_list if run is not None and run.node_list not in ("", "None assigned") else ""
    return [listed or str(record.get("node") or record.get("host") or "")]


def _from_slurm(run: Run, record: dict[str, Any]) -> Classification | None:
    """What Slurm itself ended the job for (the record cannot know: the job was killed)."""
    nodes = _nodes(run, record)
    state = run.state
    if state == "NODE_FAIL":
        return make("node_fail", f"node {', '.join(nodes)} failed under the job", "resubmit "
                    "excluding the node (sbatch --exclude); tell the site if it repeats", nodes)
    if state == "BOOT_FAIL":
        return make("boot_fail", f"node {', '.join(nodes)} failed to boot for the job",
                    "resubmit excluding the node (sbatch --exclude)", nodes)
    if state == "OUT_OF_MEMORY":
        return make("out_of_memory", f"Slurm killed the job on {', '.join(nodes)}: out of memory "
                    f"{_where(record)}", "resubmit with more memory ([node] mem_gb) or an exclusive node",
                    nodes)
    if state == "PREEMPTED":
        return make("preempted", "preempted by a higher-priority job and not requeued",
                    "resubmit (hpcddf resubmit), or use a partition without preemption", nodes)
    if state == "CANCELLED":
        return _cancelled(run, record)
    if state in ("TIMEOUT", "DEADLINE"):
        return make("timeout", f"Slurm killed the job at its time limit ({state}) "
                    "without the walltime signal being handled", "resubmit; if it repeats, raise "
                    "[slurm] signal_delay_s so the requeue has time to happen", nodes)
    return None


def _cancelled(run: Run, record: dict[str, Any]) -> Classification:
    """By a person (scancel, hpcddf cancel) or by Slurm for a dependency that failed."""
    note = str(record.get("note") or "")
    why = "its dependency failed" if "Dependency" in run.reason else \
        note if note and note != run.reason else "cancelled (not a failure)"
    return make("cancelled", why, "hpcddf resubmit FIELD when wanted", _nodes(run, record))


def _where(record: dict[str, Any]) -> str:
    step = record.get("current_step") or (record.get("error") or {}).get("step")
    return f"in step {step}" if step else "(no step was running)"


def _from_record(record: dict[str, Any]) -> Classification | None:
    """What the node job recorded: the walltime requeue, a cancel, or the failed command."""
    state = record.get("state")
    if state == "requeued":
        return make("walltime_requeued", "the walltime signal requeued the stage; it resumes "
                    "after its last finished step", "nothing to do: handled", _nodes(None, record))
    if state in ("cancelled", "interrupted"):
        return make("cancelled", str(record.get("note") or "cancelled (not a failure)"),
                    "hpcddf resubmit FIELD when wanted", _nodes(None, record))
    err = record.get("error")
    if state == "failed" and isinstance(err, dict) and err.get("message"):
        return _from_error(err, record)
    return None


def _from_error(err: dict[str, Any], record: dict[str, Any]) -> Classification:
    """A failure the node job recorded (``StepFailed`` and the walltime loop in nodejob.py)."""
    nodes = _nodes(None, record)
    # a StepFailed is recorded as str(exc): its "(fix: see the log ...)" is this class's fix
    msg, step, rc = str(err["message"]).split(" (fix: ")[0], err.get("step"), err.get("returncode")
    if err.get("cut_after_s"):
        return make("step_too_long", msg, str(err.get("detail") or "raise [slurm] max_walltime"), nodes)
    if step and rc is None and "timed out" in msg:
        return make("command_timeout", f"{msg} (a hung command, e.g. killMS)",
                    "resubmit: a hang usually passes; if it repeats, look at the step's log", nodes)
    sig = killed_by(rc)
    if sig is not None:
        oom = " (likely out of memory)" if sig in OOM_SIGNALS else ""
        return make("killed_by_signal", f"step {step}: {err.get('argv', ['?'])[0] if err.get('argv') else '?'} "
                    f"killed by {sig.name}{oom}", "resubmit with more memory ([node] mem_gb) "
                    "or an exclusive node; see the step's log", nodes)
    fix = f"read the log {err['log']}, fix the cause, then hpcddf resubmit" if err.get("log") else \
        str(err.get("detail") or err.get("hint") or "fix the cause, then hpcddf resubmit")
    return make("permanent", msg, fix, nodes)


def killed_by(returncode: Any) -> signal.Signals | None:
    """The signal a command died of: subprocess's negative return code, or a shell's or
    container runtime's 128+N for the signals that mean memory trouble."""
    if not isinstance(returncode, int):
        return None
    number = -returncode if returncode < 0 else returncode - 128 if returncode > 128 else 0
    if returncode > 128 and number not in OOM_SIGNALS:
        return None
    try:
        return signal.Signals(number) if number else None
    except ValueError:
        return None


def _from_exit(run: Run, record: dict[str, Any]) -> Classification:
    """Slurm says the job ended, the record says nothing of it: the job's own exit."""
    nodes = _nodes(run, record)
    code, sig = exit_pair(run.exit_code)
    dsig = exit_pair(run.derived_exit_code)[1]
    if sig or dsig:
        name = _signame(sig or dsig)
        return make("killed_by_signal", f"the job was killed by {name} before it could record why",
                    "resubmit with more memory ([node] mem_gb); see the job's Slurm log", nodes)
    if run.state == "FAILED":
        return make("permanent", f"the job exited {code} before recording an error",
                    "read the job's Slurm log (hpcddf logs FIELD), fix the cause, then resubmit", nodes)
    return make("unknown", f"Slurm says {run.state} but the record says {record.get('state')}",
                "read the stage's log (hpcddf logs FIELD)", nodes)


def exit_pair(text: str) -> tuple[int, int]:
    """sacct's ``code:signal`` ExitCode (or DerivedExitCode) as two numbers."""
    code, _, sig = (text or "0:0").partition(":")
    return (int(code) if code.isdigit() else 0, int(sig) if sig.isdigit() else 0)


def _signame(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def unknown(record: dict[str, Any]) -> Classification:
    """A job Slurm has no word of (accounting off or purged): never taken for a failure."""
    job = record.get("job_id") or "?"
    return make("unknown", f"no word of job {job}: neither squeue nor sacct knows it",
                f"check sacct -j {job} (accounting may be off or purged); the record says "
                f"{record.get('state')}", _nodes(None, record))


# ---------------------------------------------------------------- the same failure again
def failure_signature(error: dict[str, Any]) -> str:
    """What makes two failures "the same": the step, the return code and the log's last line
    with its numbers blanked (a time stamp or a progress count must not make them differ)."""
    tail = str(error.get("log_tail") or "").strip().splitlines()
    last = re.sub(r"\d+", "#", tail[-1] if tail else str(error.get("message")))
    return f"{error.get('step')}|{error.get('returncode')}|{last}"


def _repeated(found: Classification, record: dict[str, Any]) -> Classification:
    """A transient class seen ``SAME_FAILURE_LIMIT`` times in a row with the same signature."""
    history = [str(f) for f in record.get("failures") or []]
    err = record.get("error")
    if not found.transient or not isinstance(err, dict) or len(history) < SAME_FAILURE_LIMIT:
        return found
    latest = history[-SAME_FAILURE_LIMIT:]
    if latest.count(failure_signature(err)) < SAME_FAILURE_LIMIT:
        return found
    return make("permanent", f"{found.reason}: the same failure {SAME_FAILURE_LIMIT} times in a row "
                f"(was {found.name})", f"not transient: {found.fix}", found.nodes)


def ended_class(record: dict[str, Any]) -> dict[str, Any] | None:
    """The class the node job stores with a failure it records itself (None once done)."""
    found = classify((), record)
    return found.to_dict() if found is not None else None
