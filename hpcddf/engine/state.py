"""Field state: what was submitted for a field, when, with which job ids, and how it went.

One JSON file per field, ``<field dir>/.hpcddf/state.json``. The login node (submit, cancel)
and the jobs (stage start/end) both update it, so every change is a read-modify-write under an
exclusive lock on ``.hpcddf/lock``, and the file itself is replaced atomically: readers that
take no lock (``hpcddf status``) always see a whole file.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import enum
import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from hpcddf.engine.atomic import write_json_atomic
from hpcddf.engine.paths import unit_paths, units_under
from hpcddf.errors import FieldError

STATE_VERSION = 1


class State(enum.StrEnum):
    """The one set of words for the state of a unit of work (a stage, a mosaic, a PHANGS task)
    and of a step. A StrEnum: it is stored in JSON as the plain word and compares equal to it."""

    QUEUED = "queued"
    RUNNING = "running"
    REQUEUED = "requeued"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"


LIVE = (State.QUEUED, State.RUNNING, State.REQUEUED)  # the scheduler may still run it
FINAL = (State.DONE, State.FAILED, State.CANCELLED, State.INTERRUPTED)  # nothing will change it


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).astimezone().isoformat(timespec="seconds")


def stage_order(state: Mapping[str, Any]) -> list[str]:
    """The unit's stage names in plan order (the state file keeps its stages sorted by name),
    then any recorded stage the plan does not name."""
    recorded = list(state.get("stages") or {})
    planned = [s["name"] for s in (state.get("plan") or {}).get("stages", [])]
    return planned + [n for n in recorded if n not in planned]


def state_path(workdir: Path) -> Path:
    return unit_paths(workdir).state


def empty_state(field_id: str) -> dict[str, Any]:
    return {"version": STATE_VERSION, "field": field_id, "created": now_iso(), "updated": now_iso(),
            "site": None, "submissions": [], "stages": {}, "steps": {}}


def read_state(workdir: Path, field_id: str | None = None) -> dict[str, Any] | None:
    """The field's state, or None if nothing was ever submitted for it."""
    path = state_path(workdir)
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FieldError(f"state file {path} is corrupt: {exc}", _REBUILD) from None
    problem = _shape_problem(data)
    if problem:
        raise FieldError(f"state file {path} is not an hpcddf state: {problem}", _REBUILD)
    return data


_REBUILD = "move it aside; hpcddf rebuilds it from the done-markers on the next submit"
_SHAPE = {"stages": dict, "steps": dict, "submissions": list}


def _shape_problem(data: Any) -> str | None:
    """What is wrong with the shape of a parsed state (valid JSON written by something else)."""
    if not isinstance(data, dict):
        return f"a JSON {type(data).__name__}, not an object"
    for key, kind in _SHAPE.items():
        if key in data and not isinstance(data[key], kind):
            return f'"{key}" is a {type(data[key]).__name__}, not a JSON {"object" if kind is dict else "array"}'
    for name, unit in data.get("stages", {}).items():
        if not isinstance(unit, dict):
            return f'stage "{name}" is a {type(unit).__name__}, not a JSON object'
    return None


@contextlib.contextmanager
def locked(workdir: Path, timeout: float | None = None) -> Iterator[None]:
    """Exclusive lock on the field (held across processes and nodes sharing the file system).

    With ``timeout`` give up (TimeoutError) instead of waiting for ever: a signal handler must
    not block on a lock its own main thread may hold.
    """
    paths = unit_paths(workdir)
    paths.hidden.mkdir(parents=True, exist_ok=True)
    with open(paths.lock, "a+") as fh:
        _acquire(fh.fileno(), timeout)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _acquire(fd: int, timeout: float | None) -> None:
    if timeout is None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return
    end = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > end:
                raise TimeoutError("field state lock busy") from None
            time.sleep(0.05)


def update_state(workdir: Path, field_id: str, change: Callable[[dict[str, Any]], Any],
                 timeout: float | None = None) -> dict[str, Any]:
    """Apply ``change`` to the field's state under the lock and write it back atomically."""
    with locked(workdir, timeout):
        return update_state_unlocked(workdir, field_id, change)


def update_state_unlocked(workdir: Path, field_id: str,
                          change: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    """As :func:`update_state`, for a caller that already holds :func:`locked`."""
    state = read_state(workdir) or empty_state(field_id)
    change(state)
    state["updated"] = now_iso()
    write_json_atomic(state_path(workdir), state)
    return state


def find_fields(work_root: Path) -> list[Path]:
    """Field directories under ``work_root`` that have a state file."""
    if not work_root.is_dir():
        return []
    return units_under(work_root)


def user_name() -> str:
    return os.environ.get("USER") or str(os.getuid())
