"""Which commands a stage's steps run: the real reduction or the scaled test pipeline.

A recipe is plain data stored with the plan: ``{"name": "ddf"}`` for the DDFacet/killMS
reduction, ``{"name": "scaled", "options": {...}}`` for the seconds-long stand-in that tests and
site smoke tests use. Both go through the same engine.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from hpcddf.engine.nodejob import NodeInfo, NodeSteps
from hpcddf.engine.paths import unit_paths
from hpcddf.engine.runner import Step
from hpcddf.errors import PlanError
from hpcddf.lofar.config import PipelineConfig, load_config
from hpcddf.lofar.ddfcommands import DDF_PIPELINE_WMAX_M, Machine

log = logging.getLogger(__name__)

RECIPES = ("ddf", "scaled")


@dataclass(frozen=True)
class ReductionSteps:
    """The step builder a reduction stage job runs on the node (picklable plain data): the
    frozen configuration, read there, and the recipe give the stage's executable steps."""

    recipe: dict[str, Any]

    def __call__(self, stage: str, step_names: Sequence[str], node: NodeInfo) -> NodeSteps:
        cfg = load_config([str(unit_paths(node.workdir).frozen_config)])
        return NodeSteps(build_steps(self.recipe, cfg, stage, step_names, node),
                         cfg.get("control", "logging") or "logs")


def make_recipe(name: str, options: Sequence[str] = ()) -> dict[str, Any]:
    """``--pipeline NAME --pipeline-opt key=value...`` as recipe data."""
    if name not in RECIPES:
        raise PlanError(f"unknown pipeline {name!r}", f"use one of {', '.join(RECIPES)}")
    opts: dict[str, Any] = {}
    for item in options:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise PlanError(f"pipeline option {item!r} is not key=value", "write e.g. seconds=2")
        if key in opts:
            raise PlanError(f"pipeline option {key!r} is given twice", "give each --pipeline-opt once")
        _check_option(name, key, value)
        opts[key] = value
    return {"name": name, "options": opts}


# --pipeline-opt keys each pipeline reads, and what their values must be
_NUMBER_KEYS = {"ddf": ("timeout",), "scaled": ("seconds", "estimate")}
_OTHER_KEYS = {"ddf": (), "scaled": ("fail", "fail_times", "fail_fields", "fail_signal")}


def _check_option(pipeline: str, key: str, value: str) -> None:
    """Refuse, before anything is queued, a key the pipeline would never read or a value it
    could not use on the node."""
    from hpcddf.lofar.steps import STEP_NAMES
    base, _, step = key.partition(".")
    known = _NUMBER_KEYS[pipeline] + _OTHER_KEYS[pipeline]
    per_step = pipeline == "scaled" and base in _NUMBER_KEYS["scaled"]  # seconds.STEP, estimate.STEP
    per_field = pipeline == "scaled" and base == "fail_times"  # fail_times.FIELD
    if base not in known or (step and not (per_step or per_field)):
        accepted = ", ".join(known) + (" (seconds.STEP, estimate.STEP per step, fail_times.FIELD per field)"
                                       if pipeline == "scaled" else "")
        raise PlanError(f"--pipeline-opt {key} is not an option of the {pipeline} pipeline",
                        f"use one of: {accepted}")
    if step and per_step and step not in STEP_NAMES:
        raise PlanError(f"--pipeline-opt {key}: {step!r} is not a step", "`hpcddf submit FIELD --dry-run` lists the steps")
    if base in _NUMBER_KEYS[pipeline]:
        _check_number(key, value, positive=(base == "timeout"))
    elif base == "fail" and value not in STEP_NAMES:
        raise PlanError(f"--pipeline-opt fail={value}: not a step", "name a step of the plan")
    elif base == "fail_times" and not value.isdigit():
        raise PlanError(f"--pipeline-opt {key}={value} is not a whole number >= 0", "e.g. fail_times=1")
    elif base == "fail_signal" and f"SIG{value.upper()}" not in signal.Signals.__members__:
        raise PlanError(f"--pipeline-opt fail_signal={value}: not a signal", "e.g. fail_signal=KILL")


def _check_number(key: str, value: str, positive: bool) -> None:
    import math
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number < 0 or (positive and number == 0):
        raise PlanError(f"--pipeline-opt {key}={value} is not a {'positive' if positive else 'non-negative'} "
                        "number of seconds", f"e.g. {key}=2")


def build_steps(recipe: Mapping[str, Any], cfg: PipelineConfig, stage: str,
                step_names: Sequence[str], node: NodeInfo) -> list[Step]:
    """The executable steps of one stage."""
    if recipe["name"] == "scaled":
        from hpcddf.lofar.scaled import build_scaled_steps
        return build_scaled_steps(stage, step_names, recipe.get("options", {}), node.python,
                                  node.field_id)
    return _ddf_steps(recipe, cfg, stage, step_names, node)


DEFAULT_COMMAND_TIMEOUT_S = 48 * 3600.0  # a hung kMS master must not sit out a whole walltime


def machine(cfg: PipelineConfig, node: NodeInfo, options: Mapping[str, Any]) -> Machine:
    """CPUs from the job's allocation unless [machine] says otherwise; the cache dir exists."""
    ncpu = max(1, len(node.cpus))
    cache = cfg.get("control", "cache_dir")
    cache_dir = Path(os.path.expandvars(os.path.expanduser(cache))) if cache else node.cache_dir
    cache_dir.mkdir(parents=True, exist_ok=True)  # DDF 0.9.1 does not create --Cache-Dir
    timeout = float(options.get("timeout", DEFAULT_COMMAND_TIMEOUT_S))
    return Machine(ncpu_ddf=_workers(cfg.get("machine", "NCPU_DDF") or ncpu, node),
                   ncpu_kms=_workers(cfg.get("machine", "NCPU_killms") or ncpu, node),
                   cache_dir=str(cache_dir.resolve()), cpus=tuple(node.cpus), timeout_s=timeout,
                   python=node.python)


def _workers(ncpu: int, node: NodeInfo) -> int:
    """DDFacet's and killMS's worker count: each DDFacet worker grids its own facets, so after a
    memory death on a whole node the engine's remedy (``node.workers``) halves them."""
    return min(ncpu, node.workers) if node.workers else ncpu


def _ddf_steps(recipe: Mapping[str, Any], cfg: PipelineConfig, stage: str,
               step_names: Sequence[str], node: NodeInfo) -> list[Step]:
    from hpcddf.lofar.reduction import Reduction, build, read_list
    wd = node.workdir
    mss = read_list(wd, cfg.get("data", "mslist"))
    full_mss = read_list(wd, cfg.get("data", "full_mslist") or cfg.get("data", "mslist"))
    m = replace(machine(cfg, node, recipe.get("options", {})),
                cf_wmax_m=cf_wmax_m([wd / ms for ms in (*mss, *full_mss)]))
    steps = build(Reduction(cfg=cfg, m=m, mss=mss, full_mss=full_mss, workdir=Path(wd)), stage, list(step_names))
    check_killms_cores(steps, node.cpus)
    return steps


def check_killms_cores(steps: Sequence[Step], cpus: Sequence[int]) -> None:
    """Refuse, before the stage's first step, cores killMS cannot start on.

    killMS 3.3.0 pins its main process to core 0 whatever its options say, and stops with
    "Parent affinity requested (0) is not in available list of cores" when the job does not own
    core 0 (a shared node's cgroup, a pinned shell); measured here under ``taskset -c 1``, after
    the stage's earlier images had run for minutes."""
    uses_kms = any(c.argv and Path(c.argv[0]).name == "kMS.py" for s in steps for c in s.commands)
    if uses_kms and cpus and 0 not in cpus:
        from hpcddf.errors import PreflightError
        raise PreflightError(f"this job's cores ({','.join(map(str, cpus))}) do not include core 0, where "
                             "killMS 3.3.0 always runs its main process",
                             "run the stages on whole nodes ([slurm] exclusive = true in the site) or "
                             "with core 0 in the job's CPU set")


def cf_wmax_m(ms_paths: Sequence[Path]) -> float:
    """ddf-pipeline's 50 km, or the longest baseline of the data when that is shorter.

    No visibility has a |w| longer than its baseline, so DDFacet's w-kernels beyond it are never
    used; yet it computes all 100 of them (and killMS again for every MS), which on a short array
    is most of an image's start-up (measured: a dirty image of the simulated 4.5 km array took
    67 s with 50 km, 22 s with 4.5 km; the images agree to 0.8 % of the peak). LoTSS data, with
    baselines over 50 km, get ddf-pipeline's value unchanged. The ANTENNA tables are tiny: this
    reads no visibilities."""
    try:
        import numpy as np
        from casacore.tables import table
        longest = 0.0
        for ms in dict.fromkeys(ms_paths):
            with table(f"{ms}/ANTENNA", ack=False) as t:
                xyz = t.getcol("POSITION")
            longest = max(longest, float(np.sqrt(((xyz[:, None] - xyz[None]) ** 2).sum(-1)).max()))
    except Exception as exc:  # the MS is checked elsewhere; here only the speed-up is lost
        log.warning("could not read the array's baselines (%s): DDFacet's w-kernels reach %.0f m",
                    exc, DDF_PIPELINE_WMAX_M)
        return DDF_PIPELINE_WMAX_M
    return min(DDF_PIPELINE_WMAX_M, float(np.ceil(longest))) if longest > 0 else DDF_PIPELINE_WMAX_M
