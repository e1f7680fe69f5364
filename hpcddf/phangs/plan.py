"""A PHANGS project's loops as tasks with data-following dependencies (``plan_project``).

PHANGS runs its handlers one after another, each looping over everything (algorithms.md B2).
On a cluster that serialises a project on one node. Here every unit of a loop is a
:class:`Task` and every stage one job array (:class:`StageArray`), and each task waits only for
the tasks that make its inputs, so one galaxy's imaging starts while another's visibilities
are still being staged. Pure Python: nothing here runs CASA or talks to Slurm; ``--dry-run``
shows exactly this plan. This module holds the stage order, the dependency rules and the plan
itself; the planners of the stages are in :mod:`hpcddf.phangs.plan_casa` (the CASA stages) and
:mod:`hpcddf.phangs.plan_derived` (with :mod:`hpcddf.phangs.plan_chain` and
:mod:`hpcddf.phangs.plan_moments`), on the task model of :mod:`hpcddf.phangs.plan_common`.

Stages, in order, and what each task waits for (:data:`DEPENDENCY_RULES`; all are "all of"):

``stage_ms``     (target, product, project, array_tag, obsnum): split one input MS to the
                 product's window, then uvcontsub (lines). Waits for nothing.
``stage_line``   (target, product, interf_config): regrid, concat and statwt the staged MSs of
                 the arrays the config uses. Waits for the ``stage_ms`` task of every one of
                 those MSs.
``imaging``      (target, product, interf_config): dirty, clean mask, multiscale, singlescale,
                 FITS export. Waits for its ``stage_line`` task (one to one). A large cube is
                 imaged in channel chunks (:mod:`hpcddf.phangs.plan_chunks`): tasks
                 (target, product, interf_config, dirtyK / multiscaleK / singlescaleK), each
                 phase of a cube one array waiting for the whole phase before (the first for
                 the ``stage_line`` task), and the cube's task gathers the last phase.
``postprocess``  (whole target, product, config): pbcor, round beam, K, trim, export. A linear
                 mosaic's task waits for the ``imaging`` tasks of ALL its parts; a feather
                 config's for the imaging of its interferometric config.
``derived``      (whole target, product, config): convolve, noise, strict masks (native and
                 every resolution), the broad mask, then the moments round by round: round 1
                 (masked moments), round 2 (mom1wprior from round-1 maps), the velocity field
                 and flat masks, round 3 (moments on flat masks). The broad mask joins this
                 config's strict masks with those of its linked ``mask_configs``, so the task
                 waits for its own ``postprocess`` task AND for the ``postprocess`` task of
                 every linked config (the predecessors of the linked ``derived`` tasks). It
                 makes the linked configs' strict masks itself if they are not there yet,
                 under a per-file lock, so a linked task running at the same time reuses
                 rather than redoes them; a mom1wprior prior that is another config's strict
                 mom1 (PHANGS' 7m+tp 15as) is made the same way, and that config's
                 ``postprocess`` task joins the dependencies. Depending on those predecessors
                 instead of on sibling ``derived`` tasks keeps the array free of internal
                 dependencies and of cycles: two configs may list each other as mask configs.
``release``      (whole target, product, config): copy the postprocessed cube and every derived
                 product into ``release_root/<target dir>`` (PHANGS' release layout),
                 atomically, then a done marker. Waits for the ``postprocess`` and ``derived``
                 tasks it copies from. Planned only when the master key sets release_root.

Targets: ``stage_ms``/``stage_line``/``imaging`` run per target with uv data (mosaic parts
separately); ``postprocess``/``derived`` per whole target (a mosaic replaces its parts).
Selecting a mosaic selects its parts; selecting a part selects only its per-part tasks.
Configs of a whole target: the interferometric configs every part has full data for, plus
feather configs on one of those when the single-dish key has an entry for it. Linked mask
configs that do not exist for a target are ignored, as PHANGS skips masks it cannot find.

A stage filter keeps only the stages named. A kept task's dependencies on stages not run are
dropped, and the files it needs from them must exist already: otherwise a ConfigError names the
first missing file and the stage to run first (unless the task's own products are all there,
when it will only be skipped). Checks that need the key files of a stage (measurement sets on
disk, recipes, rest frequencies, distances, moment definitions) are made only for the stages
that run.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from hpcddf.errors import ConfigError
from hpcddf.phangs.plan_casa import (
    _build_imaging,
    _build_postprocess,
    _build_stage_line,
    _build_stage_ms,
)
from hpcddf.phangs.plan_common import (
    StageArray,
    Task,
    _all_exist,
    _Selection,
    _selection,
)
from hpcddf.phangs.plan_derived import _build_derived
from hpcddf.phangs.plan_release import RELEASED_STAGES, build_release, check_release_root
from hpcddf.phangs.project import Project

STAGES = ("stage_ms", "stage_line", "imaging", "postprocess", "derived", "release")
CASA_STAGES = ("stage_ms", "stage_line", "imaging", "postprocess")
PREVIOUS = {"stage_line": "stage_ms", "imaging": "stage_line", "postprocess": "imaging",
            "derived": "postprocess", "release": "derived"}
DEPENDENCY_RULES = {
    "stage_ms": "nothing",
    "stage_line": "all stage_ms tasks of the MSs of the target's arrays in this config",
    "imaging": "the stage_line task of the same target, product and config (one to one); "
               "a chunked cube's imaging task (the gather) waits for its chunks' last phase",
    "postprocess": "all imaging tasks of the whole target's parts (itself if not a mosaic) "
                   "for this config (a feather config: its interferometric config)",
    "derived": "the postprocess task of this config and of every linked mask_config of the "
               "same target and product (their strict masks feed the broad mask), and of the "
               "config whose map is a mom1wprior prior",
    "release": "the postprocess and derived tasks of the same target, product and config "
               "(the products it copies)",
}


def project_work_dir(project: Project) -> Path:
    """Where the project's task states and job logs live: the deepest directory holding the
    imaging, postprocess and derived roots (the key directory when they share none)."""
    roots = [project.roots[k] for k in ("imaging_root", "postprocess_root", "derived_root")
             if k in project.roots]
    if not roots:
        return project.key_dir
    common = Path(os.path.commonpath([str(r) for r in roots]))
    return project.key_dir if common == Path(common.anchor) else common


BUILDERS: dict[str, Callable[[Project, _Selection, bool], list[Task]]] = {
    "stage_ms": _build_stage_ms, "stage_line": _build_stage_line, "imaging": _build_imaging,
    "postprocess": _build_postprocess, "derived": _build_derived,
}


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------

def select_stages(stages: Sequence[str] | None) -> list[str]:
    """The stages asked for, in pipeline order (all when None)."""
    if stages is None:
        return list(STAGES)
    wanted = [s.strip() for s in stages if s.strip()]
    unknown = [s for s in wanted if s not in STAGES]
    if unknown or not wanted:
        raise ConfigError(f"unknown PHANGS stage {unknown[0]!r}" if unknown
                          else "no PHANGS stage given", f"use some of {', '.join(STAGES)}")
    return [s for s in STAGES if s in wanted]


def _without_unrun(task: Task, by_id: dict[str, Task], keep: set[str]) -> Task:
    """Drop dependencies on stages not run, after checking their products are there."""
    dropped = [by_id[d] for d in task.depends if by_id[d].stage not in keep]
    if not dropped:
        return task
    if not _all_exist(task.outputs):
        made_by = {p: dep for dep in dropped for p in dep.outputs}
        missing = [p for p in task.inputs if p in made_by and not Path(p).exists()]
        if missing:
            dep = made_by[missing[0]]
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ConfigError(f"{missing[0]} does not exist{more}: task {task.id} needs it "
                              f"from {dep.id}",
                              f"run stage {dep.stage} first (add it to --stages)")
    return replace(task, depends=tuple(d for d in task.depends if by_id[d].stage in keep))


def plan_project(project: Project, targets: Sequence[str] | None = None,
                 stages: Sequence[str] | None = None,
                 node_mem_gb: float | None = None) -> list[StageArray]:
    """The project's tasks, one StageArray per selected stage in pipeline order.
    ``node_mem_gb``: the memory an imaging task gets on the site's node, which sizes the
    chunks of a cube whose line product leaves chunksize to it (:mod:`hpcddf.phangs.plan_chunks`)."""
    keep = select_stages(stages)
    if "release" in keep and stages is not None:
        check_release_root(project)
    sel = _selection(project, targets)
    needed = set(keep) | {PREVIOUS[s] for s in keep if s in PREVIOUS}
    # the release copies every derived product: those tasks are planned in detail for it
    detailed = set(keep) | (set(RELEASED_STAGES) - {"postprocess"} if "release" in keep else set())
    if "release" in keep:
        needed |= set(RELEASED_STAGES)
    builders = {**BUILDERS, "imaging": functools.partial(_build_imaging, node_mem_gb=node_mem_gb)}
    built = {name: builders[name](project, sel, name in detailed) for name in STAGES
             if name in needed and name in builders}
    if "release" in keep:
        built["release"] = build_release(project, sel, {t.id: t for tasks in built.values()
                                                        for t in tasks})
    by_id = {t.id: t for tasks in built.values() for t in tasks}
    return [StageArray(name, tuple(_without_unrun(t, by_id, set(keep)) for t in built[name]))
            for name in keep]


def plan_tasks(plan: Sequence[StageArray]) -> list[Task]:
    return [t for array in plan for t in array.tasks]


def dry_run_document(plan: Sequence[StageArray]) -> dict[str, Any]:
    """The plan as JSON-able data: per stage its array size, tasks and their dependencies."""
    return {"stages": [{"name": a.name, "array_size": a.size,
                        "depends_on": DEPENDENCY_RULES[a.name],
                        "tasks": [t.to_dict() for t in a.tasks]} for a in plan],
            "total_tasks": sum(a.size for a in plan)}
