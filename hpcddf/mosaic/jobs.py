"""Mosaics on the cluster: which centres can be made, what they wait for, and ONE Slurm array.

``hpcddf mosaic --pointings P [FIELD...|--region|--all]`` plans one mosaic per centre and
product from the pointings table and hpcddf's own field states, under the site's work root:

* a neighbour whose final images exist is **done**;
* one still being reduced (live jobs) is **reducing**: the mosaic waits for its last stage job;
* any other is **missing**: that mosaic is not queued (``--allow-missing`` drops such fields,
  ``--exclude`` leaves fields out on purpose).

All mosaics to make go into one job array, submitted held; each task then gets its own
``afterok`` dependency on just its reducing neighbours (``scontrol update`` of that task), the
states are written and the array is released (the engine's
:func:`~hpcddf.engine.backend.submit_arrays_with_dependencies`). Tasks are throttled (``%N``),
requeued by submitit when the walltime kills them, and a failed neighbour cancels only the
mosaics that need it. Finished mosaics (their done-marker names the same inputs) are skipped.
Each mosaic's directory ``<work_root>/mosaics/<centre>/`` holds its products and a state file
``hpcddf status`` shows.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hpcddf.engine.backend import (
    BRIEF_STOP_GRACE_S,
    HeldArray,
    LocalCallFailed,
    LocalCallInterrupted,
    run_local_call,
    submit_arrays_with_dependencies,
)
from hpcddf.engine.contained import contained, run_in_image
from hpcddf.engine.paths import unit_paths, units_under
from hpcddf.engine.plan import Resources, fit_resources
from hpcddf.engine.sites import Site
from hpcddf.engine.state import LIVE, State, now_iso, read_state, update_state
from hpcddf.engine.unitjob import Change, UnitJob
from hpcddf.errors import HpcddfError, RunInterrupted, SubmissionError
from hpcddf.mosaic.combine import (
    PRODUCTS,
    MosaicInput,
    MosaicOptions,
    parse_common_beam,
)
from hpcddf.mosaic.corrections import (
    CorrectionOptions,
    digest,
    field_corrections,
    quality_scale,
)
from hpcddf.mosaic.make import make_products, write_task
from hpcddf.mosaic.pointings import Pointing, neighbourhood

log = logging.getLogger(__name__)
MOSAICS = "mosaics"
SAFE_ID = re.compile(r"^[A-Za-z0-9_+-][A-Za-z0-9_.+-]*$")


class MosaicPlanError(HpcddfError):
    """The mosaics asked for cannot be planned."""


@dataclass(frozen=True)
class MosaicTask:
    """One mosaic: its centre, product, inputs and what it must wait for."""

    centre: Pointing
    product: str
    outdir: str
    max_sep: float
    inputs: tuple[MosaicInput, ...]
    options: MosaicOptions = MosaicOptions()
    depends: tuple[str, ...] = ()      # Slurm job ids of neighbours' last stages
    waiting_on: tuple[str, ...] = ()   # their field ids
    dropped: tuple[str, ...] = ()      # neighbours left out (missing, --allow-missing)
    preview: bool = True
    catalogue: bool = False
    corrections: CorrectionOptions = CorrectionOptions()
    explicit_scales: tuple[str, ...] = ()  # fields whose --scale wins over --scale-from-quality

    @property
    def name(self) -> str:
        return f"{self.centre.id}-{self.product}"

    def path(self, kind: str) -> Path:
        """``mosaic``/``weights`` FITS, ``preview`` PNG, ``catalogue`` FITS."""
        suffix = {"mosaic": "mosaic.fits", "weights": "mosaic-weights.fits",
                  "preview": "mosaic.png", "catalogue": "mosaic.srl.fits"}[kind]
        return Path(self.outdir) / f"{self.name}-{suffix}"

    def marker(self) -> Path:
        return unit_paths(self.outdir).marker(self.product)

    def input_names(self) -> list[str]:
        return [i.name for i in self.inputs]

    def resolved_inputs(self) -> list[MosaicInput]:
        """The inputs with the corrections and flux factors their fields' products give now."""
        return [resolve_input(i, self.product, self.corrections, i.name in self.explicit_scales)
                for i in self.inputs]

    def recipe(self, inputs: Sequence[MosaicInput] | None = None) -> str:
        """What the mosaic is made of and how (the done-marker's, compared at plan time): a
        changed shift, blanked facet, factor or option makes it again."""
        inputs = self.resolved_inputs() if inputs is None else inputs
        o = self.options
        return digest({"inputs": [(i.name, i.scale, i.noise, i.corrections) for i in inputs],
                       "options": (o.beamcut, o.method, o.island_size, o.common_beam)})


def resolve_input(inp: MosaicInput, product: str, opts: CorrectionOptions, explicit_scale: bool) -> MosaicInput:
    """One field's corrections from its own products (offsets and quality steps)."""
    wd = Path(inp.int_path).parent
    corr = field_corrections(wd, inp.name, PRODUCTS[product].tessel, opts)
    scale, source = inp.scale, ("--scale" if explicit_scale else "")
    if opts.scale_from_quality and not explicit_scale:
        scale = quality_scale(wd, inp.name, opts.scale_from_quality)
        source = f"quality {opts.scale_from_quality}"
    return replace(inp, corrections=corr, scale=scale, scale_from=source)


@dataclass
class MosaicPlan:
    tasks: list[MosaicTask] = field(default_factory=list)      # to queue
    done: list[str] = field(default_factory=list)               # already made
    queued: list[str] = field(default_factory=list)             # already in the queue
    blocked: dict[str, list[str]] = field(default_factory=dict)  # name -> missing neighbours


# ---------------------------------------------------------------- planning (login node)

def mosaic_dir(work_root: Path, centre: str) -> Path:
    return work_root / MOSAICS / centre


def neighbour_status(site: Site, work_root: Path, fid: str, product: str) -> tuple[str, str | None]:
    """('done'|'reducing'|'missing', the job id to wait for) of one neighbouring field."""
    from hpcddf.engine.submission import live_jobs
    wd = work_root / fid
    p = PRODUCTS[product]
    if (wd / p.int_image).is_file() and (wd / p.app_image).is_file():
        return "done", None
    state = read_state(wd)
    # only a field whose record says a stage may still run is asked about (one squeue + sacct
    # each): a survey's tick plans the mosaics of hundreds of finished fields
    recorded_live = any(s.get("state") in LIVE for s in ((state or {}).get("stages") or {}).values())
    if recorded_live and site.scheduler == "slurm" and live_jobs(site, state):
        stages = [s["name"] for s in (state.get("plan") or {}).get("stages", [])]
        last = state["stages"].get(stages[-1], {}) if stages else {}
        if last.get("job_id"):
            return "reducing", str(last["job_id"])
    return "missing", None


def _marker_says(task: MosaicTask, recipe: str) -> bool:
    """The done-marker names the same inputs and recipe (corrections, factors, options)."""
    import json
    try:
        doc = json.loads(task.marker().read_text())
    except (FileNotFoundError, ValueError):
        return False
    return doc.get("inputs") == task.input_names() and doc.get("recipe") == recipe


def _mosaic_live(site: Site, task: MosaicTask) -> bool:
    """A job of this mosaic is still queued or running."""
    from hpcddf.engine.slurm_query import query_jobs
    state = read_state(Path(task.outdir))
    info = (state or {}).get("stages", {}).get(task.product, {})
    if site.scheduler != "slurm" or info.get("state") not in LIVE:
        return False
    job = info.get("job_id")
    return bool(job) and any(j.active for j in query_jobs([str(job)]).values())


def plan_mosaics(site: Site, pointings: Sequence[Pointing], centres: Sequence[Pointing],
                 products: Sequence[str], work_root: Path, exclude: Sequence[str] = (),
                 allow_missing: bool = False, scales: dict[str, float] | None = None,
                 noises: dict[str, float] | None = None, options: MosaicOptions = MosaicOptions(),
                 force: bool = False, preview: bool = True, catalogue: bool = False,
                 corrections: CorrectionOptions = CorrectionOptions()) -> MosaicPlan:
    """What to do for every centre x product; nothing is written or queued."""
    for p in products:
        if p not in PRODUCTS:
            raise MosaicPlanError(f"mosaic product {p!r} is unknown", f"use one of {', '.join(PRODUCTS)}")
    for pid in [c.id for c in centres] + [p.id for p in pointings]:
        if not SAFE_ID.match(pid):
            raise MosaicPlanError(f"pointing id {pid!r} cannot name a directory",
                                  "use letters, digits, _ + - . in the pointings table")
    scales, noises = scales or {}, noises or {}
    parse_common_beam(options.common_beam)
    if corrections.astromap_blank is not None and not corrections.astromap_blank > 0:
        raise MosaicPlanError(f"--astromap-blank {corrections.astromap_blank} must be arcsec > 0", "e.g. 0.5")
    for name, table in (("--scale", scales), ("--noise", noises)):
        unknown = sorted(set(table) - {p.id for p in pointings})
        if unknown:
            raise MosaicPlanError(f"{name} names {unknown[0]}, which is not in the pointings table",
                                  "check the field id")
    plan = MosaicPlan()
    status_cache: dict[tuple[str, str], tuple[str, str | None]] = {}
    resolved: dict[tuple[str, str], MosaicInput] = {}  # a field is in up to 7 mosaics: read it once

    def resolve(task: MosaicTask, inp: MosaicInput) -> MosaicInput:
        key = (inp.name, task.product)
        if key not in resolved:
            resolved[key] = resolve_input(inp, task.product, corrections, inp.name in task.explicit_scales)
        return resolved[key]

    for centre in centres:
        if centre.id in exclude:
            continue
        nb = neighbourhood(centre, pointings, exclude)
        for product in products:
            inputs, depends, waiting, missing = [], [], [], []
            for member in nb.members:
                key = (member.id, product)
                if key not in status_cache:
                    status_cache[key] = neighbour_status(site, work_root, member.id, product)
                state, job = status_cache[key]
                if state == "missing":
                    missing.append(member.id)
                    continue
                if state == "reducing":
                    depends.append(str(job))
                    waiting.append(member.id)
                wd = work_root / member.id
                inputs.append(MosaicInput(member.id, str(wd / PRODUCTS[product].int_image),
                                          str(wd / PRODUCTS[product].app_image),
                                          noise=noises.get(member.id), scale=scales.get(member.id, 1.0)))
            name = f"{centre.id}-{product}"
            if centre.id in missing or (missing and not allow_missing) or len(inputs) < 2:
                plan.blocked[name] = missing or ["(fewer than 2 fields to combine)"]
                continue
            task = MosaicTask(centre, product, str(mosaic_dir(work_root, centre.id)), nb.max_separation,
                              tuple(inputs), options, tuple(depends), tuple(waiting), tuple(missing),
                              preview, catalogue, corrections, tuple(sorted(scales)))
            # fields already reduced: their corrections are read now (an error stops the plan)
            recipe = task.recipe([resolve(task, i) for i in task.inputs]) if not depends else None
            if not force and recipe and task.path("mosaic").is_file() and _marker_says(task, recipe):
                plan.done.append(name)
            elif _mosaic_live(site, task):
                plan.queued.append(name)
            else:
                plan.tasks.append(task)
    return plan


def plan_document(plan: MosaicPlan) -> dict[str, Any]:
    """The plan as data, for --dry-run and --json."""
    return {"to_submit": [{"mosaic": t.name, "inputs": t.input_names(), "waits_for": dict(zip(t.waiting_on, t.depends)),
                           "dropped": list(t.dropped), "outdir": t.outdir, "max_sep_deg": round(t.max_sep, 4)}
                          for t in plan.tasks],
            "done": plan.done, "already_queued": plan.queued, "blocked": plan.blocked}


# ---------------------------------------------------------------- the node job

def _change_state(task: MosaicTask, change: Change, timeout: float | None = None) -> None:
    """Apply ``change`` to the mosaic's record (its product's entry in the mosaic state)."""
    def apply(state: dict[str, Any]) -> None:
        state["plan"] = {"stages": [{"name": p} for p in PRODUCTS]}
        change(state["stages"].setdefault(task.product, {}))
    update_state(Path(task.outdir), task.centre.id, apply, timeout=timeout)


def _set_state(task: MosaicTask, **values: Any) -> None:
    _change_state(task, lambda s: s.update(values))


def _set_state_if_live(task: MosaicTask, **values: Any) -> None:
    """Change a mosaic's state unless its job already ended it (done or failed)."""
    info = (read_state(Path(task.outdir)) or {}).get("stages", {}).get(task.product, {})
    if info.get("state") in LIVE:
        _set_state(task, **values)


class MosaicJob(UnitJob):
    """One mosaic task on a compute node: the engine's unit life (attempts, walltime requeue,
    outcome recorded in the mosaic's state); a requeued mosaic is made again whole."""

    def __init__(self, task: MosaicTask, site: Site | None = None) -> None:
        self.task = task
        self.site = site  # with a container image, the mosaic is made inside it

    def record(self, change: Change, timeout: float | None = None) -> None:
        _change_state(self.task, change, timeout)

    def done_values(self, result: dict[str, Any]) -> dict[str, Any]:
        warnings = result["warnings"]
        return {"note": f"{len(self.task.inputs)} fields" + (f"; {warnings[0]}" if warnings else "")}

    def work(self) -> dict[str, Any]:
        t = self.task
        missing = [i.name for i in t.inputs if not (Path(i.int_path).is_file() and Path(i.app_path).is_file())]
        if missing:
            raise MosaicPlanError(f"mosaic {t.name}: {', '.join(missing)} has no final images",
                                  "its reduction stopped before them; see `hpcddf status " + missing[0] + "`")
        if self.site is not None and contained(self.site):
            return self._in_image()
        return make_products(t)

    def _in_image(self) -> dict[str, Any]:
        """The same call in the site's image: the field and mosaic directories bound (their
        common parent, the work root), a scratch of its own for TMPDIR, the marker read back."""
        t = self.task
        hidden = Path(t.outdir) / ".hpcddf"
        job = os.environ.get("SLURM_JOB_ID") or str(os.getpid())
        scratch = hidden / f"scratch-{t.product}-{job}"
        taskfile = write_task(t, hidden / f"{t.product}.task.pkl")
        root = Path(os.path.commonpath([t.outdir, *(str(Path(i.int_path).parent) for i in t.inputs)]))
        try:
            run_in_image(self.site, root, scratch, f"mosaic-{t.product}",
                         ("python3", "-m", "hpcddf.mosaic.make", str(taskfile)), hidden / "logs")
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return json.loads(t.marker().read_text())


# ---------------------------------------------------------------- submission

@dataclass(frozen=True)
class MosaicResources:
    cpus: int = 4
    mem_gb: int = 16
    walltime_min: int = 120
    max_running: int | None = None


def _resources(site: Site, r: MosaicResources) -> Resources:
    """A mosaic task shares a node: never exclusive, whatever the site says for stages."""
    return replace(fit_resources(site, r.cpus, r.mem_gb, r.walltime_min), exclusive=False)


def submit_mosaic_array(site: Site, tasks: Sequence[MosaicTask], work_root: Path,
                        res: MosaicResources = MosaicResources()) -> dict[str, str]:
    """ONE held array over the tasks; per-task neighbour dependencies; states; then released."""
    folder = work_root / MOSAICS / ".jobs"
    folder.mkdir(parents=True, exist_ok=True)
    array = HeldArray(f"hpcddf-mosaic-{len(tasks)}", _resources(site, res), [MosaicJob(t, site) for t in tasks],
                      what="the mosaic array", max_running=res.max_running)
    job_ids = submit_arrays_with_dependencies(site, folder, [array], lambda ids: [t.depends for t in tasks],
                                              record=lambda ids: _record_queued(tasks, ids),
                                              undo=lambda ids: _record_not_queued(tasks, ids))
    return {t.name: j for t, j in zip(tasks, job_ids, strict=True)}


def _record_queued(tasks: Sequence[MosaicTask], job_ids: Sequence[str]) -> None:
    for t, job_id in zip(tasks, job_ids, strict=True):
        _set_state(t, state=State.QUEUED, job_id=job_id, submitted=now_iso(), attempts=0,
                   inputs=t.input_names(), waits_for=list(t.waiting_on), error=None,
                   note=f"waits for {', '.join(t.waiting_on)}" if t.waiting_on else "")


def _record_not_queued(tasks: Sequence[MosaicTask], job_ids: Sequence[str]) -> None:
    """The submission failed and was cancelled: mosaics already recorded with its jobs say so."""
    for t, job_id in zip(tasks, job_ids):
        info = (read_state(Path(t.outdir)) or {}).get("stages", {}).get(t.product, {})
        if info.get("job_id") == job_id and info.get("state") == State.QUEUED:
            _set_state(t, state=State.CANCELLED, note="submission failed")


def run_mosaics_locally(site: Site, tasks: Sequence[MosaicTask], work_root: Path,
                        progress: Callable[[str], None]) -> dict[str, str]:
    """The same tasks as local jobs in the foreground, one after another."""
    waiting = [t for t in tasks if t.depends]
    if waiting:
        raise MosaicPlanError(f"mosaic {waiting[0].name} waits for {', '.join(waiting[0].waiting_on)}, "
                              "still being reduced", "run it when they are done, or on a Slurm site")
    folder = work_root / MOSAICS / ".jobs"
    ids: dict[str, str] = {}
    for t in tasks:
        _set_state(t, state=State.QUEUED, submitted=now_iso(), inputs=t.input_names(), error=None)
        ids[t.name] = _run_mosaic_locally(site, t, folder, progress)
    return ids


def _run_mosaic_locally(site: Site, t: MosaicTask, folder: Path, progress: Callable[[str], None]) -> str:
    """One mosaic as a local job; its job id."""
    def started(job_id: str) -> None:
        _set_state(t, job_id=job_id)
        progress(f"mosaic {t.name}: running (local job {job_id}, {len(t.inputs)} fields)")

    def stopping(signal_name: str, job_id: str) -> None:
        progress(f"mosaic {t.name}: {signal_name}: stopping (local job {job_id})")

    try:
        done = run_local_call(site, folder, MosaicJob(t, site), 24 * 60, stop_grace_s=BRIEF_STOP_GRACE_S,
                              started=started, stopping=stopping)
    except LocalCallFailed as exc:
        progress(f"mosaic {t.name}: FAILED: {exc.reason}")
        raise SubmissionError(f"mosaic {t.name} failed", f"see {t.outdir} and `hpcddf status`") from None
    except LocalCallInterrupted as exc:
        _set_state_if_live(t, state=State.INTERRUPTED, ended=now_iso(), note=f"interrupted by {exc.signal_name}")
        raise RunInterrupted(f"mosaic {t.name} interrupted by {exc.signal_name}; its job was stopped",
                             "rerun the same command: finished mosaics are skipped") from None
    progress(f"mosaic {t.name}: done -> {t.path('mosaic')}")
    return done.job_id


def parse_assignments(values: Sequence[str], what: str) -> dict[str, float]:
    """``FIELD=NUMBER`` pairs (``--scale``, ``--noise``)."""
    out: dict[str, float] = {}
    for v in values:
        key, sep, num = v.partition("=")
        try:
            value = float(num)
        except ValueError:
            value = float("nan")
        if not sep or not key or not value > 0:
            raise MosaicPlanError(f"{what} {v!r} is not FIELD=POSITIVE_NUMBER", f"e.g. {what} P023=1.05")
        out[key] = value
    return out


def check_mosaic_stack() -> None:
    """The mosaic needs astropy, scipy and reproject in hpcddf's own environment."""
    missing = []
    for mod in ("numpy", "astropy", "scipy", "reproject", "radio_beam"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise MosaicPlanError(f"mosaics need {', '.join(missing)}, not installed here",
                              "pip install 'hpcddf[mosaic]'")


def submit_mosaics(site: Site, pointings_path: str, fields: Sequence[str], region: str | None,
                   all_: bool, products: Sequence[str], work_root: Path, exclude: Sequence[str] = (),
                   allow_missing: bool = False, scales: Sequence[str] = (), noises: Sequence[str] = (),
                   options: MosaicOptions = MosaicOptions(workers=0), force: bool = False,
                   preview: bool = True, catalogue: bool = False,
                   resources: MosaicResources = MosaicResources(), dry_run: bool = False,
                   corrections: CorrectionOptions = CorrectionOptions(),
                   progress: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Plan the mosaics asked for and queue them (Slurm: one array; local: one by one)."""
    from hpcddf.mosaic.pointings import parse_region, read_pointings, select_centres
    check_mosaic_stack()
    pointings = read_pointings(pointings_path)
    centres = select_centres(pointings, list(fields), parse_region(region) if region else None, all_)
    plan = plan_mosaics(site, pointings, centres, products, work_root, exclude, allow_missing,
                        parse_assignments(scales, "--scale"), parse_assignments(noises, "--noise"),
                        options, force, preview, catalogue, corrections)
    doc = {"site": site.name, "work_root": str(work_root), **plan_document(plan)}
    for name, missing in plan.blocked.items():
        progress(f"mosaic {name}: not queued, needs {', '.join(missing)} (reduce them first, "
                 "or --exclude / --allow-missing)")
    if dry_run or not plan.tasks:
        doc["jobs"] = {}
        return doc
    if site.scheduler == "slurm":
        doc["jobs"] = submit_mosaic_array(site, plan.tasks, work_root, resources)
    else:
        doc["jobs"] = run_mosaics_locally(site, plan.tasks, work_root, progress)
    return doc


def collect_mosaic_status(site: Site, work_root: Path | None = None) -> list[dict[str, Any]]:
    """States of the mosaics under the work root (``<work_root>/mosaics/<centre>``)."""
    from hpcddf.engine.status import collect_unit_status
    return collect_unit_status(site, find_mosaics(work_root if work_root is not None else site.work_root))


def find_mosaics(work_root: Path) -> list[Path]:
    root = work_root / MOSAICS
    return units_under(root) if root.is_dir() else []
