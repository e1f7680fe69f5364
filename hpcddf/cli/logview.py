"""``hpcddf logs``: where a field's logs are and how long each step and stage took.

The durations come from the done-markers (written when a step finished), so the profile is
right even when a stage was requeued between steps.
"""

from __future__ import annotations

import json
from pathlib import Path

from hpcddf.cli.report import seconds
from hpcddf.engine.fields import Field
from hpcddf.engine.paths import markers_in, unit_paths
from hpcddf.engine.runner import tail


def step_markers(workdir: Path) -> list[dict]:
    markers = []
    for p in markers_in(workdir):
        try:
            markers.append(json.loads(p.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError):
            continue
    return sorted(markers, key=lambda m: m.get("started", 0))


def profile_text(workdir: Path) -> str:
    """Time per step and per stage, in run order."""
    markers = step_markers(workdir)
    if not markers:
        return "no step has finished yet\n"
    lines = [f"{'stage':<14} {'step':<30} {'duration':>10}"]
    per_stage: dict[str, float] = {}
    for m in markers:
        per_stage[m["stage"]] = per_stage.get(m["stage"], 0.0) + m["duration_s"]
        lines.append(f"{m['stage']:<14} {m['step']:<30} {seconds(m['duration_s']):>10}")
    lines.append("")
    lines += [f"{'stage total':<14} {name:<30} {seconds(t):>10}" for name, t in per_stage.items()]
    lines.append(f"{'total':<45} {seconds(sum(per_stage.values())):>10}")
    return "\n".join(lines) + "\n"


def field_logs(field: Field, step: str | None = None, tail_lines: int = 0) -> str:
    """The overview (log locations + profile), or one step's command logs."""
    wd = field.workdir
    log_dir = wd / "logs"
    if step:
        logs = sorted(log_dir.glob(f"{step}*.log")) if log_dir.is_dir() else []
        if not logs:
            return f"no logs for step {step} in {log_dir}\n"
        parts = []
        for p in logs:
            body = tail(p, tail_lines) + "\n" if tail_lines else p.read_text(errors="replace")
            parts.append(f"==> {p} <==\n{body}")
        return "\n".join(parts)
    lines = [f"field {field.id}: {wd}",
             f"  command logs: {log_dir}/",
             f"  stage logs:   {log_dir}/hpcddf-<stage>.log",
             f"  job logs:     {unit_paths(wd).jobs}/",
             ""]
    return "\n".join(lines) + profile_text(wd)
