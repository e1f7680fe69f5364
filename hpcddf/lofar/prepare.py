"""From ``hpcddf submit`` arguments to plans, checked before anything is queued.

Order matters: every input (site, configs, field ids, work root, MS presence) is checked
first, and only then is anything written or queued, so bad input never leaves a half-made
field behind.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from hpcddf.engine.durations import load_estimates, load_startup
from hpcddf.engine.fields import (
    Field,
    check_work_root,
    field_for,
    find_measurement_sets,
    make_mslists,
)
from hpcddf.engine.paths import unit_paths
from hpcddf.engine.plan import Plan, chains
from hpcddf.engine.sites import Site
from hpcddf.engine.sizing import size_plan
from hpcddf.errors import ConfigError, FieldError
from hpcddf.lofar.config import (
    Override,
    PipelineConfig,
    load_config,
    uses_catalog_token,
)
from hpcddf.lofar.plan import plan_reduction
from hpcddf.lofar.steps import LIGHT_STEPS

log = logging.getLogger(__name__)

FIELD_CONFIG = "hpcddf.cfg"  # a per-field config in the field directory, layered after -c files
# Without any config file, a field is reduced with ddf-pipeline's defaults and the usual lists.
DEFAULT_LISTS = (Override("data", "mslist", "mslist.txt"),
                 Override("data", "full_mslist", "big-mslist.txt"))


@dataclass(frozen=True)
class FieldJob:
    """A field ready to submit: where it lives, its configuration and its plan."""

    field: Field
    config: PipelineConfig
    plan: Plan


def read_fields_file(path: str) -> list[str]:
    """Field ids from a file, one per line; blank lines and ``#`` comments are ignored."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise FieldError(f"cannot read fields file {path}: {exc.strerror}", "check the path") from None
    except UnicodeDecodeError as exc:
        raise FieldError(f"fields file {path} is not UTF-8 text (byte {exc.start})",
                         "write one field id per line as plain text") from None
    return [ln.split("#", 1)[0].strip() for ln in text.splitlines() if ln.split("#", 1)[0].strip()]


def field_config(site: Site, workdir: Path, files: Sequence[str],
                 overrides: Sequence[Override]) -> PipelineConfig:
    """The field's configuration: given files, then its own ``hpcddf.cfg``, then overrides."""
    layered = list(files)
    own = workdir / FIELD_CONFIG
    if own.is_file():
        layered.append(str(own))
    catalog = str(site.catalog_dir) if site.catalog_dir else None
    cfg = load_config(layered, overrides, catalog_dir=catalog)
    if files:
        return cfg
    # No -c file: the usual lists stand in for ddf-pipeline's defaults, below the field's own
    # hpcddf.cfg and the overrides (so a field config that only changes, say, bootstrap keeps them).
    unset = [o for o in DEFAULT_LISTS if (o.section, o.name) not in cfg.origins]
    if not unset:
        return cfg
    return load_config(layered, unset + list(overrides), catalog_dir=catalog)


def prepare(site: Site, field_ids: Sequence[str], files: Sequence[str] = (),
            overrides: Sequence[Override] = (), work_root: Path | None = None) -> list[FieldJob]:
    """Validate everything and plan every field; writes nothing."""
    if not field_ids:
        raise FieldError("no field given", "pass one or more observation ids, or --fields-file")
    dupes = {f for f in field_ids if list(field_ids).count(f) > 1}
    if dupes:
        raise FieldError(f"field {sorted(dupes)[0]} is given twice", "list each field once")
    root = work_root if work_root is not None else site.work_root
    check_work_root(root)
    jobs = []
    for fid in field_ids:
        fld = field_for(site, fid, root)
        cfg = field_config(site, fld.workdir, files, overrides)
        unexpanded = uses_catalog_token(cfg)
        if unexpanded:
            raise ConfigError(f"{unexpanded[0]} uses $$ but site {site.name} has no catalogue directory",
                              "set [paths] catalog_dir in the site config or DDF_PIPELINE_CATALOGS")
        jobs.append(FieldJob(fld, cfg, sized_plan(cfg, site, fid, root)))
    return jobs


def sized_plan(cfg: PipelineConfig, site: Site, field_id: str, work_root: Path) -> Plan:
    """The field's plan, its stages sized from the step durations measured under the work root."""
    plan = plan_reduction(cfg, site, field_id)
    if site.scheduler != "slurm":
        return plan
    if not site.slurm.size_from_measurements:
        return size_plan(plan, site, {}, LIGHT_STEPS)
    return size_plan(plan, site, load_estimates(work_root), LIGHT_STEPS, load_startup(work_root))


def measurement_sets(site: Site, job: FieldJob) -> list[Path]:
    """The field's MSs: in its directory, else under the site's data root."""
    data = site.data_root / job.field.id if site.data_root else None
    return find_measurement_sets(job.field.workdir, data)


def check_inputs(site: Site, jobs: Sequence[FieldJob]) -> dict[str, list[Path]]:
    """Each field needs its MSs, or its MS lists, before it is queued."""
    found = {}
    for job in jobs:
        listed = job.config.get("data", "mslist")
        ms = measurement_sets(site, job)
        if not ms and not (listed and (job.field.workdir / listed).is_file()):
            where = f"{job.field.workdir}" + (f" or {site.data_root / job.field.id}" if site.data_root else "")
            raise FieldError(f"no measurement sets for field {job.field.id} in {where}",
                             "put the field's *.ms there (or its mslist.txt) before submitting")
        for p in ms:
            _check_found_ms(p)
        for name in {listed, job.config.get("data", "full_mslist")} - {None}:
            if (job.field.workdir / name).is_file():
                check_ms_list(job.field.workdir, name)
        found[job.field.id] = ms
    return found


def _check_found_ms(path: Path) -> None:
    if any(ch in path.name for ch in "\n\r\t"):
        raise FieldError(f"measurement set name {path.name!r} holds a line break or tab",
                         "rename it: MS lists keep one name per line")
    if not (path / "table.dat").is_file():
        raise FieldError(f"{path} is not a Measurement Set (no table.dat)",
                         "remove or rename it: every *.ms in the field directory goes into the MS lists")


def check_ms_list(workdir: Path, name: str) -> None:
    """An existing MS list is the user's: it must name at least one MS, each a Measurement Set
    (a directory with a table.dat) relative to the field directory."""
    path = workdir / name
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise FieldError(f"cannot read MS list {path}: {exc}", "write one MS name per line as plain text") from None
    if not lines:
        raise FieldError(f"MS list {path} is empty", "list the field's measurement sets, one per line, or remove it")
    for entry in lines:
        ms = workdir / entry
        if not (ms / "table.dat").is_file():
            what = "is not a Measurement Set (no table.dat)" if ms.is_dir() else "does not exist"
            raise FieldError(f"MS list {path} names {entry!r}, which {what}",
                             "fix the list (names relative to the field directory) or remove it")


def materialise(site: Site, job: FieldJob, ms: list[Path]) -> None:
    """Create the field directory and its MS lists (existing lists are kept)."""
    job.field.workdir.mkdir(parents=True, exist_ok=True)
    if ms:
        make_mslists(job.field, ms, job.config.get("data", "mslist") or "mslist.txt",
                     job.config.get("data", "full_mslist"))


def dry_run_document(site: Site, jobs: Sequence[FieldJob]) -> dict[str, Any]:
    """The plan as JSON: a top-level ``stages`` list, one entry per stage array of each chain."""
    stages = []
    groups = chains([j.plan for j in jobs])
    for idx, group in enumerate(groups):
        for stage in group[0].stages:
            d = stage.to_dict()
            d["chain"] = idx
            d["fields"] = [p.field for p in group]
            stages.append(d)
    return {"site": site.name, "scheduler": site.scheduler,
            "fields": [j.field.id for j in jobs], "chains": len(groups), "stages": stages}


def prepare_resubmit(site: Site, field_ids: Sequence[str], work_root: Path | None = None) -> list[FieldJob]:
    """Fields to resume, with the configuration frozen at their first submission."""
    from hpcddf.lofar.config import load_config
    root = work_root if work_root is not None else site.work_root
    jobs = []
    for fid in field_ids:
        fld = field_for(site, fid, root)
        frozen = unit_paths(fld.workdir).frozen_config
        if not frozen.is_file():
            raise FieldError(f"field {fid} was never submitted from {root}", f"use hpcddf submit {fid}")
        cfg = load_config([str(frozen)])
        jobs.append(FieldJob(fld, cfg, sized_plan(cfg, site, fid, root)))
    return jobs
