"""Run ONE PHANGS task on a node (``run_task``, or the submitit callable ``PhangsTask``).

A task carries everything it needs, taken from the key files when it was planned
(:mod:`hpcddf.phangs.plan`): the CASA stages map those values to ``casa_tasks`` options and run
them in the separate CASA environment (:func:`hpcddf.phangs.casaenv.run_casa`); ``derived``
calls the pure-Python noise, mask, moment and convolution functions; ``release`` copies
products into release_root (:mod:`hpcddf.phangs.run_release`). This module runs one
task and records its state; the stage runners are in :mod:`hpcddf.phangs.run_casa_stages`
(with the linear mosaic of :mod:`hpcddf.phangs.linmos`) and :mod:`hpcddf.phangs.run_derived`,
the state files and the run context they share in :mod:`hpcddf.phangs.run_common`.

Each task records its state in ``<project work dir>/.hpcddf/phangs/<task id>.json`` (state,
attempts, started, ended, error, products, notes), replaced atomically under the project lock
so that ``hpcddf phangs status`` always reads a whole file. Re-running is cheap and safe: a
task whose state is done and whose products are all present is skipped, every CASA stage skips
a product that exists, and every derived product is made only when missing. When Slurm kills
a task at its walltime, submitit requeues it (``PhangsTask`` is the engine's
:class:`~hpcddf.engine.unitjob.UnitJob`, as a reduction stage is) and the next attempt
continues after the last product made.

Derived products a task may share with another task (a linked config's strict masks, see the
dependency rule in :mod:`hpcddf.phangs.plan`) are made under a per-file lock: the task that
comes second waits for the first one and then finds the file there.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from hpcddf.engine.sites import Site
from hpcddf.engine.state import State, now_iso
from hpcddf.engine.unitjob import Change, UnitJob, check_node
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
    change_task_state,
    products_present,
    read_task_state,
    update_task_state,
)
from hpcddf.phangs.run_derived import run_derived
from hpcddf.phangs.run_release import run_release


def run_task(task: Task, workdir: str | Path, casa_env: str | None = None) -> dict[str, Any]:
    """Run (or skip) one task here, recording its state; exceptions propagate after recording."""
    return PhangsTask(task, str(workdir), casa_env)()


class PhangsTask(UnitJob):
    """One PHANGS task as a submitit job: the engine's unit life (attempts, walltime requeue,
    outcome recorded) around the task's stage runner; a requeued task skips every step it
    already finished. With a site, its preflight runs before the first CASA command."""

    def __init__(self, task: Task, workdir: str, casa_env: str | None = None,
                 site: Site | None = None) -> None:
        self.task = task
        self.workdir = str(workdir)
        self.casa_env = casa_env
        self.site = site

    def record(self, change: Change, timeout: float | None = None) -> None:
        change_task_state(Path(self.workdir), self.task, change, timeout)

    def __call__(self) -> dict[str, Any]:
        workdir, task = Path(self.workdir), self.task
        prev = read_task_state(workdir, task.id) or {}
        if products_present(prev):
            return {"task": task.id, "skipped": True, "products": prev.get("products", [])}
        if task.outputs and all(Path(p).exists() for p in task.outputs):
            # made by an earlier run (or outside hpcddf): nothing to do, but say so
            update_task_state(workdir, task, state=State.DONE, ended=now_iso(), error=None,
                              products=task.outputs, note="products already present: skipped")
            return {"task": task.id, "skipped": True, "products": task.outputs}
        self._ctx = RunContext(workdir, task, self.casa_env, previous_steps=dict(prev.get("steps") or {}))
        return super().__call__()

    def work(self) -> dict[str, Any]:
        if self.site is not None:
            check_node(self.site)
        ctx = self._ctx
        products = RUNNERS[self.task.stage](ctx)
        return {"task": self.task.id, "skipped": False, "products": products, "notes": ctx.notes}

    def _steps(self) -> dict[str, Any]:
        return {**self._ctx.previous_steps, **self._ctx.steps}

    def done_values(self, result: dict[str, Any]) -> dict[str, Any]:
        notes = self._ctx.notes
        return {"products": result["products"], "steps": self._steps(), "notes": notes,
                "note": "; ".join(notes[:2])}

    def failed_values(self) -> dict[str, Any]:
        return {"steps": self._steps(), "notes": self._ctx.notes}


RUNNERS: dict[str, Callable[[RunContext], list[str]]] = {
    "stage_ms": run_stage_ms, "stage_line": run_stage_line, "imaging": run_imaging,
    "postprocess": run_postprocess, "derived": run_derived, "release": run_release,
}
