"""What the PHANGS task runners share: the task state files, the run context, the error.

Each task records its state in ``<project work dir>/.hpcddf/phangs/<task id>.json``, replaced
atomically under the project lock (:func:`update_task_state`); :class:`RunContext` is what a
stage runner works with (the task, where it logs, the CASA environment, per-product locks and
``ensure``, which makes missing products once). Used by :mod:`hpcddf.phangs.run` (one task),
the stage runners (:mod:`hpcddf.phangs.run_casa_stages`, :mod:`hpcddf.phangs.run_derived`),
the linear mosaic (:mod:`hpcddf.phangs.linmos`) and the submission's status.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpcddf.engine.atomic import write_json_atomic
from hpcddf.engine.paths import HIDDEN, unit_paths
from hpcddf.engine.state import State, locked, now_iso
from hpcddf.errors import HpcddfError
from hpcddf.phangs.plan_common import Task

STATE_DIR = Path(HIDDEN) / "phangs"
LOCK_DIR = Path(HIDDEN) / "phangs-locks"


class PhangsRunError(HpcddfError):
    """A PHANGS task cannot run (a stage this version does not implement, a bad input)."""


# ---------------------------------------------------------------------------------------------
# Task state
# ---------------------------------------------------------------------------------------------

def task_state_path(workdir: Path, task_id: str) -> Path:
    return Path(workdir) / STATE_DIR / f"{task_id}.json"


def read_task_state(workdir: Path, task_id: str) -> dict[str, Any] | None:
    """A task's recorded state, or None if it was never submitted (or the file is unreadable,
    which only a crashed writer on a broken file system could leave)."""
    try:
        return json.loads(task_state_path(workdir, task_id).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def change_task_state(workdir: Path, task: Task, change: Callable[[dict[str, Any]], Any],
                      timeout: float | None = None) -> dict[str, Any]:
    """Apply ``change`` to the task's state under the project lock; write it atomically."""
    workdir = Path(workdir)
    path = task_state_path(workdir, task.id)
    with locked(workdir, timeout):
        state = read_task_state(workdir, task.id) or {
            "task": task.id, "stage": task.stage, "key": list(task.key), "attempts": 0,
            "created": now_iso()}
        change(state)
        state["updated"] = now_iso()
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, state)
    return state


def update_task_state(workdir: Path, task: Task, timeout: float | None = None,
                      **values: Any) -> dict[str, Any]:
    """Merge ``values`` into the task's state (see :func:`change_task_state`)."""
    return change_task_state(workdir, task, lambda s: s.update(values), timeout)


def products_present(state: dict[str, Any] | None) -> bool:
    """The task finished and every product it recorded is still there."""
    if not state or state.get("state") != State.DONE:
        return False
    return all(Path(p).exists() for p in state.get("products") or [])


# ---------------------------------------------------------------------------------------------
# What the stage runners share
# ---------------------------------------------------------------------------------------------

@dataclass
class RunContext:
    """What the stage runners share: where to log and lock, the CASA env, what was done."""

    workdir: Path
    task: Task
    casa_env_path: str | None = None
    previous_steps: dict[str, Any] = field(default_factory=dict)
    steps: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    made: list[str] = field(default_factory=list)
    _env: Any = None

    @property
    def logdir(self) -> Path:
        return unit_paths(self.workdir).logs / self.task.id

    def casa(self, stage: str, **params: Any) -> dict[str, Any]:
        """One casa_tasks stage in the CASA environment; its JSON summary is recorded."""
        from hpcddf.phangs.casaenv import find_casa_env, run_casa
        if self._env is None:
            self._env = find_casa_env(self.casa_env_path)
        summary = run_casa(self._env, stage, self.logdir, **params)
        self.steps[stage] = summary
        return summary

    @contextlib.contextmanager
    def product_lock(self, path: str) -> Iterator[None]:
        """An exclusive lock named after a product file (shared file system, like the state)."""
        d = self.workdir / LOCK_DIR
        d.mkdir(parents=True, exist_ok=True)
        with open(d / f"{Path(path).name}.lock", "a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def ensure(self, paths: list[str], make: Callable[[], Any]) -> bool:
        """Make ``paths`` with ``make`` unless all exist; True when made here."""
        if all(Path(p).exists() for p in paths):
            return False
        with self.product_lock(paths[0]):
            if all(Path(p).exists() for p in paths):
                return False
            for p in paths:
                Path(p).parent.mkdir(parents=True, exist_ok=True)
            make()
        self.made += paths
        return True
