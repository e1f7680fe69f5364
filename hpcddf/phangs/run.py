"""Run ONE PHANGS task on a node (``run_task``, or the submitit callable ``PhangsTask``).

A task carries everything it needs, taken from the key files when it was planned
(:mod:`hpcddf.phangs.plan`): the CASA stages map those values to ``casa_tasks`` options and run
them in the separate CASA environment (:func:`hpcddf.phangs.casaenv.run_casa`); ``derived``
calls the pure-Python noise, mask, moment and convolution functions. This module runs one
task and records its state; the stage runners are in :mod:`hpcddf.phangs.run_casa_stages`
(with the linear mosaic of :mod:`hpcddf.phangs.linmos`) and :mod:`hpcddf.phangs.run_derived`,
the state files and the run context they share in :mod:`hpcddf.phangs.run_common`.

Each task records its state in ``<project work dir>/.hpcddf/phangs/<task id>.json`` (state,
attempts, started, ended, error, products, notes), replaced atomically under the project lock
so that ``hpcddf phangs status`` always reads a whole file. Re-running is cheap and safe: a
task whose state is done and whose products are all present is skipped, every CASA stage skips
a product that exists, and every derived product is made only when missing. When Slurm kills
a task at its walltime, submitit requeues it (``PhangsTask`` is Checkpointable) and the next
attempt continues after the last product made.

Derived products a task may share with another task (a linked config's strict masks, see the
dependency rule in :mod:`hpcddf.phangs.plan`) are made under a per-file lock: the task that
comes second waits for the first one and then finds the file there.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import submitit

from hpcddf.engine.jobenv import job_id_from_env
from hpcddf.engine.state import State, now_iso
from hpcddf.errors import HpcddfError
from hpcddf.phangs.plan_common import Task
from hpcddf.phangs.run_casa_stages import (
    run_imaging,
    run_postprocess,
    run_stage_line,
    run_stage_ms,
)

# Re-exported: hpcddf.phangs.submit imports it (and the state functions below, which
# run_task uses) from this module; its home is run_common.
from hpcddf.phangs.run_common import STATE_DIR as STATE_DIR
from hpcddf.phangs.run_common import (
    RunContext,
    products_present,
    read_task_state,
    update_task_state,
)
from hpcddf.phangs.run_derived import run_derived


def _error_doc(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, HpcddfError):
        doc: dict[str, Any] = {"message": exc.message, "hint": exc.hint}
        tail = getattr(exc, "log_tail", None)
        if tail:
            doc["log_tail"] = tail[-2000:]
        return doc
    return {"message": f"{type(exc).__name__}: {exc}"}


def run_task(task: Task, workdir: str | Path, casa_env: str | None = None) -> dict[str, Any]:
    """Run (or skip) one task, recording its state; exceptions propagate after recording."""
    workdir = Path(workdir)
    prev = read_task_state(workdir, task.id) or {}
    if products_present(prev):
        return {"task": task.id, "skipped": True, "products": prev.get("products", [])}
    if task.outputs and all(Path(p).exists() for p in task.outputs):
        # made by an earlier run (or outside hpcddf): nothing to do, but say so
        update_task_state(workdir, task, state=State.DONE, ended=now_iso(), error=None,
                          products=task.outputs, note="products already present: skipped")
        return {"task": task.id, "skipped": True, "products": task.outputs}
    job = job_id_from_env()
    update_task_state(workdir, task, state=State.RUNNING, started=now_iso(), ended=None,
                      error=None, attempts=int(prev.get("attempts", 0)) + 1,
                      host=socket.gethostname(), **({"job_id": job} if job else {}))
    ctx = RunContext(workdir, task, casa_env, previous_steps=dict(prev.get("steps") or {}))
    t0 = time.time()
    try:
        products = RUNNERS[task.stage](ctx)
    except Exception as exc:
        update_task_state(workdir, task, state=State.FAILED, ended=now_iso(),
                          elapsed_s=round(time.time() - t0, 1), error=_error_doc(exc),
                          steps={**ctx.previous_steps, **ctx.steps}, notes=ctx.notes)
        raise
    update_task_state(workdir, task, state=State.DONE, ended=now_iso(),
                      elapsed_s=round(time.time() - t0, 1), error=None, products=products,
                      steps={**ctx.previous_steps, **ctx.steps}, notes=ctx.notes,
                      note="; ".join(ctx.notes[:2]))
    return {"task": task.id, "skipped": False, "products": products, "notes": ctx.notes}


class PhangsTask(submitit.helpers.Checkpointable):
    """One PHANGS task as a submitit job; a walltime kill requeues it whole (every step it
    already finished is then skipped)."""

    def __init__(self, task: Task, workdir: str, casa_env: str | None = None) -> None:
        self.task = task
        self.workdir = str(workdir)
        self.casa_env = casa_env

    def __call__(self) -> dict[str, Any]:
        return run_task(self.task, self.workdir, self.casa_env)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        # Called from submitit's signal handler: never wait long for the lock there.
        with contextlib.suppress(Exception):
            update_task_state(Path(self.workdir), self.task, timeout=5.0, state=State.REQUEUED,
                              note="walltime reached: requeued, resumes after the last product")
        return super().checkpoint(*args, **kwargs)


RUNNERS: dict[str, Callable[[RunContext], list[str]]] = {
    "stage_ms": run_stage_ms, "stage_line": run_stage_line, "imaging": run_imaging,
    "postprocess": run_postprocess, "derived": run_derived,
}
