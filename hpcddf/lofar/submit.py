"""Submitting reductions: the reduction's hooks into the engine's submission.

Before anything is queued every field is checked as a real submission needs it (steps this
version cannot run, MS lists and their contents, catalogues); under each field's lock the
restart policy (``redofrom``, ``restart=False``) is applied, the Measurement Sets are linked in
and the configuration frozen; on the node :class:`~hpcddf.lofar.recipes.ReductionSteps` reads
that frozen configuration and builds the stage's steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from hpcddf.engine.atomic import write_text_atomic
from hpcddf.engine.paths import unit_paths
from hpcddf.engine.sites import Site
from hpcddf.engine.state import read_state
from hpcddf.engine.submission import SubmitHooks, submit_units
from hpcddf.errors import FieldError, PlanError
from hpcddf.lofar.prepare import FieldJob, check_inputs, materialise, measurement_sets
from hpcddf.lofar.recipes import ReductionSteps
from hpcddf.lofar.redo import apply_restart_policy

DEFAULT_RECIPE: dict[str, Any] = {"name": "ddf", "options": {}}


def check_supported(jobs: Sequence[FieldJob]) -> None:
    """Refuse, before queueing, a plan with a step the reduction has no builder for."""
    from hpcddf.lofar.reduction import unbuildable
    for fj in jobs:
        missing = unbuildable(_steps(fj))
        if missing:
            raise PlanError(f"field {fj.field.id}: step {missing[0]} has no builder in this hpcddf version",
                            "this is a bug: report it with the config")


def _steps(fj: FieldJob) -> list[str]:
    return [s for st in fj.plan.stages for s in st.steps]


def check_fields(site: Site, jobs: Sequence[FieldJob], recipe: dict[str, Any], fetch: bool = True,
                 report: Callable[[str], None] = lambda msg: None) -> dict[str, list[Path]]:
    """Every check a submission of these fields makes before queueing; each field's MSs.

    The catalogues each field's steps read must be present. Missing ones the site can download
    are downloaded here, on the login node, after every other check passed (``fetch``; their
    contents are then checked as a present file's), or, for ``--dry-run``, named in one line
    each as what a real submit would download."""
    if recipe["name"] != "ddf":
        return {j.field.id: [] for j in jobs}
    from hpcddf.lofar.catalogues import describe, plan_fetches, run_fetch
    from hpcddf.lofar.reduction import check_inputs as check_step_inputs
    check_supported(jobs)
    fetches = {fj.field.id: plan_fetches(site, fj.config, fj.field.workdir, _steps(fj),
                                         lambda fj=fj: first_ms(site, fj)) for fj in jobs}
    for fj in jobs:
        pending = {str(f.need.path) for f in fetches[fj.field.id]}
        check_step_inputs(fj.config, _steps(fj), fj.field.workdir, pending)
    found = check_inputs(site, jobs)
    for fj in jobs:
        for f in fetches[fj.field.id]:
            report(f"field {fj.field.id}: {describe(f, now=fetch)}")
            if fetch:
                report(f"field {fj.field.id}: {run_fetch(site, f)}")
        if fetch and fetches[fj.field.id]:
            check_step_inputs(fj.config, _steps(fj), fj.field.workdir)
    return found


def first_ms(site: Site, fj: FieldJob) -> Path:
    """The field's first MS (its MS list's first, else the first found): the phase centre
    ddf-pipeline images about."""
    listed = fj.config.get("data", "mslist")
    if listed and (fj.field.workdir / listed).is_file():
        names = [ln.strip() for ln in (fj.field.workdir / listed).read_text(encoding="utf-8").splitlines() if ln.strip()]
        if names:
            return fj.field.workdir / names[0]
    found = measurement_sets(site, fj)
    if not found:
        check_inputs(site, [fj])  # the one-line error for a field without MSs
    return sorted(found)[0]


def _prepare(site: Site, fj: FieldJob, ms: list[Path] | None) -> None:
    """Link the field's MSs in and freeze its configuration: the jobs read exactly the
    configuration that was planned, whatever changes later."""
    materialise(site, fj, ms or [])
    paths = unit_paths(fj.field.workdir)
    paths.hidden.mkdir(parents=True, exist_ok=True)
    write_text_atomic(paths.frozen_config, fj.config.to_cfg_text())


@dataclass(frozen=True)
class Resubmit:
    """The reduction's resubmission, as a recovery guard job calls it (plain data: pickled)."""

    def __call__(self, site: Site, field_ids: Sequence[str], work_root: Path) -> dict[str, Any]:
        from hpcddf.lofar.prepare import prepare_resubmit
        return resubmit_fields(site, prepare_resubmit(site, field_ids, work_root))


def reduction_hooks(recipe: dict[str, Any], progress: Callable[[str], None] = lambda msg: None) -> SubmitHooks:
    """The reduction's checks (catalogue downloads said through ``progress``), restart policy,
    preparation and node step builder."""
    return SubmitHooks(check=lambda site, jobs: check_fields(site, jobs, recipe, True, progress),
                       restart=lambda fj: apply_restart_policy(fj.field.workdir, fj.config),
                       prepare=_prepare, builder=ReductionSteps(recipe), recipe=recipe,
                       resubmit=Resubmit())


def submit_fields(site: Site, jobs: Sequence[FieldJob], recipe: dict[str, Any] | None = None,
                  progress: Callable[[str], None] = lambda msg: None,
                  new_submission: bool = True) -> dict[str, Any]:
    """Queue every field's remaining stages; returns what was done for each field.

    Only a new submission applies ``redofrom``/``restart=False``; a resubmission (which reads
    the frozen config, redofrom included) never does.
    """
    hooks = reduction_hooks(recipe or DEFAULT_RECIPE, progress)
    return submit_units(site, jobs, hooks, progress, new_submission)


def resubmit_fields(site: Site, jobs: Sequence[FieldJob],
                    progress: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Resume failed or cancelled reductions from where they stopped, with their recipe."""
    recipe = None
    for fj in jobs:
        state = read_state(fj.field.workdir)
        if state is None:
            raise FieldError(f"field {fj.field.id} was never submitted", f"use hpcddf submit {fj.field.id}")
        recipe = recipe or state.get("recipe")
    return submit_fields(site, jobs, recipe, progress, new_submission=False)
