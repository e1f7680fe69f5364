"""Stage requests sized from measured step durations, and stages split where they would not fit.

Without measurements every stage asks for the site's maximum walltime. Once a site's work
root has measured every step of a stage (an earlier field, or an earlier attempt of this one),
the stage asks Slurm for what those steps take plus a margin: a shorter request starts sooner
through backfill. A stage whose steps together would not fit in the site's maximum is split at
step boundaries into several chained jobs, so the requeue that a walltime kill would force is
planned instead, with no step cut and no time lost at the signal.

Likewise cores: where the site allows it (``[slurm] light_cpus``), the light steps that end a
stage (the pipeline says which: masks, catalogues, reports) become a job of their own on a few
cores, so the whole node is given back as soon as the heavy steps are done.

Pure functions on the plan: ``--dry-run`` shows the sized plan a submission would queue.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Mapping, Sequence

from hpcddf.engine.plan import Plan, Resources, Stage, fit_resources
from hpcddf.engine.sites import Site

MARGIN = 0.25  # a request keeps room for measured steps to run this much longer
FIT_MARGIN = 0.1  # a split keeps what the runner keeps for a measured step (runner.MEASURED_MARGIN)
START_S = 60.0  # a job's own start-up (container, preflight, scratch) until it was measured
SLURM_SIGNAL_SLACK_S = 30  # slurmctld checks time limits every 30 s


def lead_s(site: Site) -> float:
    """Time at the end of a walltime in which no step may run (the signal comes that early)."""
    slack = SLURM_SIGNAL_SLACK_S if site.scheduler == "slurm" else 0
    return float(site.slurm.signal_delay_s + slack)


def usable_s(site: Site, walltime_min: int, start_s: float = START_S) -> float:
    """Seconds of step work a job of ``walltime_min`` can hold."""
    return walltime_min * 60 - lead_s(site) - start_s


def needed_minutes(site: Site, step_seconds: Sequence[float], start_s: float = START_S) -> int:
    """The walltime a job needs for steps measured at ``step_seconds``, in whole minutes."""
    need = sum(step_seconds) * (1 + MARGIN) + lead_s(site) + start_s
    return max(1, math.ceil(need / 60))


def split_steps(site: Site, steps: Sequence[str], measured: Mapping[str, float],
                start_s: float = START_S) -> list[list[str]]:
    """Consecutive groups of ``steps`` each fitting the site's maximum walltime as the runner
    would fit them (a split that the runner would not need costs a queue wait, as a requeue
    does); a step too long for any walltime is a group of its own (it runs at the start of
    its job)."""
    room = usable_s(site, site.max_walltime_min, start_s) / (1 + FIT_MARGIN)
    parts: list[list[str]] = [[]]
    used = 0.0
    for step in steps:
        t = measured[step]
        if parts[-1] and used + t > room:
            parts.append([])
            used = 0.0
        parts[-1].append(step)
        used += t
    return parts


def size_stage(site: Site, stage: Stage, measured: Mapping[str, float], start_s: float = START_S) -> list[Stage]:
    """The stage as one or more jobs, each asking for the walltime its measured steps need.

    Unmeasured steps keep the stage as planned (the site's maximum); a stage that asked for a
    custom walltime shorter than the maximum is left alone too."""
    if stage.resources.walltime_min < site.max_walltime_min or any(s not in measured for s in stage.steps):
        return [stage]
    parts = split_steps(site, stage.steps, measured, start_s)
    names = [stage.name] if len(parts) == 1 else [f"{stage.name}.{i + 1}" for i in range(len(parts))]
    out: list[Stage] = []
    for name, steps in zip(names, parts):
        minutes = min(needed_minutes(site, [measured[s] for s in steps], start_s), site.max_walltime_min)
        deps = (out[-1].name,) if out else stage.depends_on
        out.append(Stage(name, tuple(steps), _with_walltime(stage.resources, minutes), deps))
    return out


def split_light_tail(site: Site, stage: Stage, light: frozenset[str]) -> list[Stage]:
    """The stage's trailing light steps as a job of ``light_cpus`` cores after the heavy ones."""
    cpus = site.slurm.light_cpus
    cut = len(stage.steps)
    while cut > 0 and stage.steps[cut - 1] in light:
        cut -= 1
    if cpus <= 0 or cut in (0, len(stage.steps)) or cpus >= site.cpus:
        return [stage]
    mem = max(1, site.mem_gb * cpus // site.cpus)
    res = replace(fit_resources(site, cpus, mem, stage.resources.walltime_min), exclusive=False)
    heavy = replace(stage, steps=stage.steps[:cut])
    return [heavy, Stage(f"{stage.name}.light", stage.steps[cut:], res, (heavy.name,))]


def size_plan(plan: Plan, site: Site, measured: Mapping[str, float],
              light: frozenset[str] = frozenset(), start_s: float | None = None) -> Plan:
    """Every stage sized from ``measured`` (step -> seconds) and the measured job start-up
    (``start_s``; None: START_S), its light tail split off where the site allows it;
    dependencies follow the splits."""
    start = START_S if start_s is None else start_s
    renamed: dict[str, str] = {}
    stages: list[Stage] = []
    for stage in plan.stages:
        deps = tuple(renamed.get(d, d) for d in stage.depends_on)
        parts: list[Stage] = []
        for piece in split_light_tail(site, replace(stage, depends_on=deps), light):
            if parts:
                piece = replace(piece, depends_on=(parts[-1].name,))
            parts.extend(size_stage(site, piece, measured, start))
        renamed[stage.name] = parts[-1].name
        stages.extend(parts)
    return replace(plan, stages=tuple(stages))


def _with_walltime(res: Resources, minutes: int) -> Resources:
    return replace(res, walltime_min=minutes)
