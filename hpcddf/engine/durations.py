"""Measured step durations, shared across attempts and fields of a site's work root.

The runner uses them to decide whether a step still fits in the walltime left; a survey's
later fields thus plan with the durations its earlier fields measured. Each measurement of a
step that had a static estimate also records how far off that estimate was (measured /
estimated): the median of those ratios, the site's *speed*, scales the static estimates of
steps never measured yet, so a first field on a new site learns from its own first steps.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from hpcddf.engine.atomic import write_json_atomic
from hpcddf.engine.paths import durations_file
from hpcddf.engine.state import locked

KEEP = 20  # most recent measurements kept per step
SPEED_KEY = "_speed"  # measured / estimated, most recent first-hand ratios of any step
STARTUP_KEY = "_startup"  # seconds from a job attempt's start to its first step


def load_estimates(work_root: Path) -> dict[str, float]:
    """Median of the recent measured durations of each step."""
    try:
        data = json.loads(durations_file(work_root).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return {step: float(statistics.median(v)) for step, v in data.items() if v and not step.startswith("_")}


def _load(work_root: Path) -> dict[str, list[float]]:
    try:
        return json.loads(durations_file(work_root).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def load_speed(work_root: Path) -> list[float]:
    """The recent measured / estimated ratios of the work root's steps (oldest first)."""
    return [float(r) for r in _load(work_root).get(SPEED_KEY, [])]


def load_startup(work_root: Path) -> float | None:
    """The median time a job attempt of this site took to reach its first step, if measured."""
    values = _load(work_root).get(STARTUP_KEY, [])
    return float(statistics.median(values)) if values else None


def record_startup(work_root: Path, seconds: float) -> None:
    """What sizing plans for a job's own start-up (container, preflight, scratch, state)."""
    _append(work_root, STARTUP_KEY, round(seconds, 2))


def record_duration(work_root: Path, step: str, seconds: float, estimate_s: float | None = None) -> None:
    _append(work_root, step, round(seconds, 3))
    if estimate_s:
        _append(work_root, SPEED_KEY, round(seconds / estimate_s, 4))


def _append(work_root: Path, key: str, value: float) -> None:
    """Add one measurement under the work root's lock, keeping the most recent KEEP."""
    path = durations_file(work_root)
    with locked(work_root):
        data = _load(work_root)
        data[key] = (data.get(key, []) + [value])[-KEEP:]
        write_json_atomic(path, data)
