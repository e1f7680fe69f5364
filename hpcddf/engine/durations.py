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


def load_estimates(work_root: Path) -> dict[str, float]:
    """Median of the recent measured durations of each step."""
    try:
        data = json.loads(durations_file(work_root).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return {step: float(statistics.median(v)) for step, v in data.items() if v and step != SPEED_KEY}


def load_speed(work_root: Path) -> list[float]:
    """The recent measured / estimated ratios of the work root's steps (oldest first)."""
    try:
        data = json.loads(durations_file(work_root).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return []
    return [float(r) for r in data.get(SPEED_KEY, [])]


def record_duration(work_root: Path, step: str, seconds: float, estimate_s: float | None = None) -> None:
    path = durations_file(work_root)
    with locked(work_root):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            data = {}
        data[step] = (data.get(step, []) + [round(seconds, 3)])[-KEEP:]
        if estimate_s:
            data[SPEED_KEY] = (data.get(SPEED_KEY, []) + [round(seconds / estimate_s, 4)])[-KEEP:]
        write_json_atomic(path, data)
