"""The reduction's planner: ddf-pipeline's steps split at its stop points into stages.

``plan_reduction`` reads a configuration and a site and returns the engine's plan data
(:class:`hpcddf.engine.plan.Plan`): which stages run which steps, in which order, each a whole
node of the site. It runs and submits nothing.
"""

from __future__ import annotations

from hpcddf.engine.plan import Plan, Stage, stage_resources
from hpcddf.engine.sites import Site
from hpcddf.errors import PlanError
from hpcddf.lofar.config import PipelineConfig
from hpcddf.lofar.products import check_polcubes
from hpcddf.lofar.steps import STAGE_ENABLED, STAGES, STEPS


def group_steps(cfg: PipelineConfig) -> list[tuple[str, list[str]]]:
    """Enabled steps grouped into enabled stages, in order.

    A stage the configuration switches off (no bootstrap, no full MS list...) is not planned;
    any of its steps that still run join the next planned stage (or the last one).
    """
    if not cfg.get("data", "mslist") and not cfg.get("inputmodel", "basedicomodel"):
        raise PlanError("[data] mslist is not set", "set mslist=mslist.txt in the config")
    groups: list[tuple[str, list[str]]] = []
    carry: list[str] = []
    for stage in STAGES:
        steps = carry + [s.name for s in STEPS if s.stage == stage and s.enabled(cfg)]
        if STAGE_ENABLED[stage](cfg):
            groups.append((stage, steps))
            carry = []
        else:
            carry = steps
    if carry:
        if not groups:
            raise PlanError("the configuration leaves no stage to run",
                            "check [data] full_mslist and [inputmodel]")
        groups[-1][1].extend(carry)
    return [(name, steps) for name, steps in groups if steps]


def plan_reduction(cfg: PipelineConfig, site: Site, field_id: str) -> Plan:
    """Split the reduction of ``field_id`` into chained stages sized for ``site``'s nodes."""
    check_final_beam(cfg)
    check_inputmodel(cfg)
    check_polcubes(cfg)
    res = stage_resources(site)
    stages: list[Stage] = []
    for name, steps in _apply_exitafter(group_steps(cfg), cfg.get("control", "exitafter")):
        deps = (stages[-1].name,) if stages else ()
        stages.append(Stage(name=name, steps=tuple(steps), resources=res, depends_on=deps))
    return Plan(field=field_id, site=site.name, stages=tuple(stages))


def check_final_beam(cfg: PipelineConfig) -> None:
    """An elliptical final beam needs its position angle (ddf-pipeline dies hours in without)."""
    if cfg.get("image", "final_psf_minor_arcsec") is not None and cfg.get("image", "final_psf_pa_deg") is None:
        raise PlanError("[image] final_psf_minor_arcsec is set without final_psf_pa_deg",
                        "set [image] final_psf_pa_deg (degrees) for the elliptical beam, or unset the minor axis")
    if cfg.get("image", "final_psf_minor_arcsec") is not None and cfg.get("image", "final_psf_arcsec") is None:
        raise PlanError("[image] final_psf_minor_arcsec is set without final_psf_arcsec",
                        "set [image] final_psf_arcsec (the major axis, arcsec)")


def check_inputmodel(cfg: PipelineConfig) -> None:
    """Starting from a previous model needs all of its parts (ddf-pipeline exits with code 4)."""
    if not cfg.get("inputmodel", "basedicomodel"):
        return
    missing = [f"[{s}] {n}" for s, n in (("image", "clusterfile"), ("inputmodel", "baseimagename"),
                                          ("inputmodel", "basemaskname")) if not cfg.get(s, n)]
    if missing:
        raise PlanError(f"[inputmodel] basedicomodel is set but {', '.join(missing)} is not",
                        "set the previous run's cluster file, image and mask too (see ddf-pipeline's "
                        "examples/tier1-rerun.cfg)")


def _apply_exitafter(groups: list[tuple[str, list[str]]],
                     exitafter: str | None) -> list[tuple[str, list[str]]]:
    """``[control] exitafter`` ends the plan after that stop point."""
    if exitafter is None or exitafter == "cleanup":
        return groups if exitafter is None else []
    names = [g[0] for g in groups]
    if exitafter not in names:
        raise PlanError(f"exitafter={exitafter} is not a stage of this configuration",
                        f"use one of {', '.join(names)}")
    return groups[: names.index(exitafter) + 1]
